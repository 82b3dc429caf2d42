"""The benchmark (``bench/``, ``make bench``) in its short mode, so that it cannot rot.

No target is asserted: the short mode runs every phase for a second or two at low rates on a
machine that may be busy. What is pinned is that every phase runs end to end against the real
product and reports every figure, and the numbers that do not depend on speed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from twisted.internet import threads
from twisted.trial.unittest import SynchronousTestCase, TestCase

from bench.__main__ import PHASES, Figure, latency_summary, print_table, rss_summary

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_bench(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SENTRYPEER_")}
    env["PYTHONPATH"] = ROOT
    return subprocess.run(
        [sys.executable, "-m", "bench", *args], cwd=ROOT, env=env, capture_output=True, timeout=600
    )


class ShortRunTests(TestCase):
    timeout = 700

    async def test_short_json(self):
        """``python -m bench --short --json`` runs every phase and reports every figure of issue 7
        with the command reproducing it; at its low rates nothing is lost, the TCP messages are
        all recorded, and the API answers every route with 200."""
        done = await threads.deferToThread(run_bench, "--short", "--json")
        self.assertEqual(done.returncode, 0, done.stderr.decode(errors="replace")[-3000:])
        report = json.loads(done.stdout)
        self.assertTrue(report["short"])
        measures = [f["measure"] for f in report["figures"]]
        for fragment in ("bare Twisted UDP reader", "UDP ingest", "CPU per recorded event",
                         "full blast", "/health-check while blasted", "pipelined", "concurrent",
                         "/ip-addresses at", "/numbers (whole list)", "/numbers?limit=1000",
                         "/ip-addresses/{ip}", "/numbers/{number}", "while /numbers is requested",
                         "resident memory"):
            self.assertTrue(any(fragment in m for m in measures), fragment)
        for figure in report["figures"]:
            self.assertTrue(figure["command"].startswith("python -m bench --only "), figure)
        details = report["details"]
        self.assertEqual(details["udp"]["loss"], 0)
        self.assertEqual(details["blast"]["unaccounted"], 0)
        self.assertEqual(details["tcp"]["pipelined_rows"], 200)
        self.assertEqual(details["tcp"]["concurrent_rows"], 50)
        self.assertEqual(details["api-ingest"]["loss"], 0)
        for route in details["api"]["routes"].values():
            self.assertEqual(route["statuses"], [200])
        self.assertEqual(details["builddb"]["events"], 20_000)
        self.assertEqual(details["builddb"]["schema"][1], 2)

    async def test_table(self):
        """Without ``--json`` one Markdown table is printed, headed by the machine and load."""
        done = await threads.deferToThread(run_bench, "--short", "--only", "tcp")
        self.assertEqual(done.returncode, 0, done.stderr.decode(errors="replace")[-3000:])
        text = done.stdout.decode()
        self.assertIn("SentryPeer benchmark, ", text)
        self.assertIn("load average at start", text)
        self.assertIn("| measure | target | result | met | reproduce |", text)
        self.assertIn("`python -m bench --only tcp --short`", text)


class HelperTests(SynchronousTestCase):
    def test_phases(self):
        """The phases are the ones the runner documents, in running order."""
        self.assertEqual(PHASES, ("bare", "udp", "blast", "tcp", "api", "api-ingest"))

    def test_summaries(self):
        """Latency summaries give median, 95th percentile and maximum in milliseconds; memory
        summaries the peak and the means of the second and last thirds."""
        self.assertEqual(latency_summary([0.001, 0.002, 0.003]),
                         {"n": 3, "median_ms": 2.0, "p95_ms": 3.0, "max_ms": 3.0})
        self.assertEqual(latency_summary([]), {"n": 0})
        samples = [(i, kb) for i, kb in enumerate([1024] * 3 + [2048] * 3 + [3072] * 3)]
        self.assertEqual(rss_summary(samples), {"peak_mb": 3.0, "middle_mb": 2.0, "end_mb": 3.0})

    def test_print_table(self):
        """A missed target is marked **MISSED**, a figure without target "-"."""
        import io

        out = io.StringIO()
        info = {"date": "d", "cpu": "c", "kernel": "k", "python": "p", "sqlite": "s",
                "load_average": (0.0, 0.0, 0.0), "load_average_end": (1.0, 1.0, 1.0)}
        print_table([Figure("m", "t", "r", False, "cmd"), Figure("m2", "", "r2", None, "cmd2")],
                    info, out)
        lines = out.getvalue().splitlines()
        self.assertIn("| m | t | r | **MISSED** | `cmd` |", lines)
        self.assertIn("| m2 |  | r2 | - | `cmd2` |", lines)
