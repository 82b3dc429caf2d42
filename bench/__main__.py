"""The benchmark runner: ``python -m bench [--short] [--json] [--only PHASES]``.

Phases (each starts its own product process on loopback ephemeral ports and stops it):

- ``bare``: the bare Twisted UDP reader (:mod:`bench.bare_reader`) under one unpaced sender: what
  Python on this machine can receive, the reference for the product's rate.
- ``udp``: the product under paced UDP ingest (:data:`TARGET_RATE` distinct probes per second from
  many loopback sources, 60 s): events recorded, loss, kernel drops, CPU per event, memory.
- ``blast``: the product under one unpaced sender: every datagram recorded, shed or dropped by the
  kernel (all counted), and the API's ``/health-check`` answering meanwhile.
- ``tcp``: 2,000 pipelined messages on one connection, then 1,000 concurrent connections.
- ``api``: the million-event database (:mod:`bench.builddb`), then latency of every list and
  look-up route, by the client and inside the server.
- ``api-ingest``: paced UDP ingest on that database while a client requests ``/numbers`` in a loop.

Loss is ``sent - recorded - shed``; kernel receive-buffer drops come from ``/proc/net/udp`` and the
product's own count (``SO_MEMINFO``). Sender processes report the rate they achieved; a phase where a
sender fell behind its target is reported as such. Rates measured on a machine that is busy with
other work are lower: the load average is printed with the table.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import http.client
import json
import os
import platform
import queue
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field

from bench.probes import probe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = sys.executable

#: Issue 7's targets.
TARGET_RATE = 10_500
TARGET_IP_LIST_MS = 100.0
TARGET_NUMBER_LIST_MS = 250.0
TARGET_NUMBER_PAGE_MS = 20.0
TARGET_LOOKUP_SERVER_MS = 0.5
TARGET_RSS_MB = 150.0
TARGET_CPU_MS = 0.1

PHASES = ("bare", "udp", "blast", "tcp", "api", "api-ingest")


@dataclass
class Settings:
    """How big and how long each phase is (full run, or ``--short``)."""

    udp_seconds: float = 60.0
    udp_rate: float = TARGET_RATE
    senders: int = 2
    sources: int = 250
    numbers: int = 5000
    blast_seconds: float = 10.0
    pipelined: int = 2000
    concurrent: int = 1000
    db_events: int = 1_000_000
    db_ips: int = 20_000
    db_numbers: int = 100_000
    requests: int = 200
    lookups: int = 1000
    ingest_seconds: float = 60.0
    ingest_rate: float = TARGET_RATE


SHORT = Settings(
    udp_seconds=2.0, udp_rate=2000, senders=2, sources=20, numbers=500, blast_seconds=1.0,
    pipelined=200, concurrent=50, db_events=20_000, db_ips=1000, db_numbers=5000, requests=10,
    lookups=20, ingest_seconds=2.0, ingest_rate=1000,
)


@dataclass
class Figure:
    """One line of the table."""

    measure: str
    target: str
    result: str
    met: bool | None  # None: no target, or not measurable (say why in note)
    command: str
    note: str = ""
    values: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# Processes


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SENTRYPEER_")}
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


class JSONLines:
    """Reads a child's stdout in a thread; :meth:`wait_for` returns the next line with a key."""

    def __init__(self, stream) -> None:
        self._lines: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream) -> None:
        for raw in stream:
            try:
                self._lines.put(json.loads(raw))
            except ValueError:
                continue
        self._lines.put(None)

    def wait_for(self, key: str, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no {key!r} line within {timeout} s")
            try:
                line = self._lines.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                raise RuntimeError(f"the process ended before a {key!r} line")
            if key in line:
                return line


def _proc_stat(pid: int) -> tuple[float, int]:
    """(CPU seconds of all threads, resident kB) of process *pid*."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    cpu = (int(fields[11]) + int(fields[12])) / ticks
    rss_kb = 0
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss_kb = int(line.split()[1])
    return cpu, rss_kb


def udp_socket_counters(port: int) -> dict[str, int]:
    """``rx_queue`` (bytes waiting) and ``drops`` of the 127.0.0.1 UDP socket on *port*, from
    ``/proc/net/udp``; zeros when not found."""
    wanted = "0100007F:%04X" % port
    try:
        with open("/proc/net/udp", encoding="ascii") as f:
            for line in f:
                parts = line.split()
                if len(parts) > 12 and parts[1] == wanted:
                    rx_queue = int(parts[4].split(":")[1], 16)
                    return {"rx_queue": rx_queue, "drops": int(parts[12])}
    except OSError:
        pass
    return {"rx_queue": 0, "drops": 0}


class Product:
    """One ``bench.product`` process: start, observe (CPU, memory, counters), stop."""

    def __init__(self, workdir: str, name: str, db_file: str, *args: str) -> None:
        self.log_path = os.path.join(workdir, f"{name}.log")
        self._log = open(self.log_path, "wb")
        self.command = [PYTHON, "-m", "bench.product", "-f", db_file, *args]
        self.proc = subprocess.Popen(
            self.command, stdout=subprocess.PIPE, stderr=self._log, cwd=workdir, env=_env(),
        )
        self.lines = JSONLines(self.proc.stdout)
        self.rss: list[tuple[float, int]] = []
        self._sampling = True
        try:
            ready = self.lines.wait_for("ready", 120)
        except Exception:
            self.kill()
            raise RuntimeError(f"the product did not start; see {self.log_path}") from None
        self.pid = ready["pid"]
        self.udp = ready.get("udp")
        self.tcp = ready.get("tcp")
        self.api = ready.get("api")
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()

    def _sample(self) -> None:
        started = time.monotonic()
        while self._sampling and self.proc.poll() is None:
            try:
                self.rss.append((time.monotonic() - started, _proc_stat(self.pid)[1]))
            except (OSError, ValueError, IndexError):
                return
            time.sleep(0.25)

    def cpu_seconds(self) -> float:
        return _proc_stat(self.pid)[0]

    def snapshot(self) -> dict:
        os.kill(self.pid, signal.SIGUSR1)
        return self.lines.wait_for("snapshot", 30)

    def wait_idle(self, timeout: float = 120.0) -> dict:
        """Wait until the UDP socket is empty and the write queue has written everything."""
        deadline = time.monotonic() + timeout
        while True:
            snap = self.snapshot()
            empty = self.udp is None or udp_socket_counters(self.udp)["rx_queue"] == 0
            if empty and snap["queue"].get("depth", 0) == 0:
                return snap
            if time.monotonic() > deadline:
                return snap
            time.sleep(0.2)

    def stop(self) -> dict:
        self._sampling = False
        self.proc.send_signal(signal.SIGTERM)
        try:
            final = self.lines.wait_for("final", 180)
            self.proc.wait(60)
        finally:
            self.kill()
        return final

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
        self._log.close()


def run_senders(port: int, rate: float, seconds: float, settings: Settings, workers: int,
                count: int | None = None) -> dict:
    """Run *workers* sender processes (rate split between them) and sum their reports."""
    procs = []
    for worker in range(workers):
        command = [
            PYTHON, "-m", "bench.sender", "--port", str(port), "--rate", str(rate / workers),
            "--duration", str(seconds), "--sources", str(settings.sources), "--worker", str(worker),
            "--numbers", str(settings.numbers),
        ]
        if count is not None:
            command += ["--count", str(max(1, count // workers))]
        procs.append(subprocess.Popen(command, stdout=subprocess.PIPE, cwd=ROOT, env=_env()))
    reports = []
    for proc in procs:
        out, _ = proc.communicate(timeout=seconds + 120)
        reports.append(json.loads(out.decode().strip().splitlines()[-1]))
    sent = sum(r["sent"] for r in reports)
    elapsed = max(r["elapsed"] for r in reports)
    return {
        "sent": sent,
        "elapsed": elapsed,
        "rate": round(sent / elapsed, 1) if elapsed else 0.0,
        "behind": any(r["behind"] for r in reports),
        "workers": reports,
    }


def count_rows(db_file: str, where: str = "1") -> int:
    conn = sqlite3.connect(db_file)
    try:
        return conn.execute(f"SELECT count(*) FROM honey WHERE {where}").fetchone()[0]
    finally:
        conn.close()


def rss_summary(samples: list[tuple[float, int]]) -> dict:
    """Peak resident memory, and the mean of the second and last thirds of the run (flatness)."""
    if not samples:
        return {"peak_mb": 0.0, "middle_mb": 0.0, "end_mb": 0.0}
    values = [kb / 1024 for _, kb in samples]
    third = max(1, len(values) // 3)
    return {
        "peak_mb": round(max(values), 1),
        "middle_mb": round(statistics.fmean(values[third : 2 * third] or values), 1),
        "end_mb": round(statistics.fmean(values[-third:]), 1),
    }


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(fraction * (len(ordered) - 1))))]


def latency_summary(seconds: list[float]) -> dict:
    if not seconds:
        return {"n": 0}
    return {
        "n": len(seconds),
        "median_ms": round(statistics.median(seconds) * 1000, 3),
        "p95_ms": round(_percentile(seconds, 0.95) * 1000, 3),
        "max_ms": round(max(seconds) * 1000, 3),
    }


class HTTPClient:
    """A keep-alive HTTP/1.1 client on 127.0.0.1 timing whole responses (body read to the end)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)

    def get(self, path: str) -> tuple[int, int, float]:
        """``(status, body bytes, seconds)``."""
        started = time.perf_counter()
        try:
            self.conn.request("GET", path)
            response = self.conn.getresponse()
            body = response.read()
        except (OSError, http.client.HTTPException):
            self.conn.close()
            self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
            raise
        return response.status, len(body), time.perf_counter() - started

    def close(self) -> None:
        self.conn.close()


class Looper:
    """Requests *path* in a loop in a thread until stopped; keeps the latencies."""

    def __init__(self, port: int, path: str, pause: float = 0.0) -> None:
        self.path = path
        self.pause = pause
        self.seconds: list[float] = []
        self.errors = 0
        self.statuses: set[int] = set()
        self._stop = threading.Event()
        self._client = HTTPClient(port)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                status, _, took = self._client.get(self.path)
                self.statuses.add(status)
                self.seconds.append(took)
            except (OSError, http.client.HTTPException):
                self.errors += 1
                time.sleep(0.05)
            if self.pause:
                self._stop.wait(self.pause)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(120)
        self._client.close()


# ---------------------------------------------------------------------------------------------
# Phases


class Runner:
    def __init__(self, settings: Settings, workdir: str, short: bool, fresh_db: bool,
                 extra: str = "") -> None:
        self.s = settings
        self.extra = extra
        self.workdir = workdir
        self.short = short
        self.fresh_db = fresh_db
        self.figures: list[Figure] = []
        self.results: dict[str, dict] = {}
        self.memory: dict[str, dict] = {}

    def command(self, phase: str) -> str:
        return "python -m bench --only " + phase + (" --short" if self.short else "") + self.extra

    def fresh_db_file(self, name: str) -> str:
        path = os.path.join(self.workdir, name + ".db")
        for suffix in ("", "-wal", "-shm"):
            if os.path.exists(path + suffix):
                os.unlink(path + suffix)
        return path

    def add(self, figure: Figure) -> None:
        self.figures.append(figure)

    # -- bare reader

    def phase_bare(self) -> None:
        proc = subprocess.Popen([PYTHON, "-m", "bench.bare_reader"], stdout=subprocess.PIPE,
                                cwd=ROOT, env=_env())
        lines = JSONLines(proc.stdout)
        try:
            port = lines.wait_for("port", 60)["port"]
            sent = run_senders(port, 0, self.s.blast_seconds, self.s, 1)
            time.sleep(0.5)
            drops = udp_socket_counters(port)["drops"]
            proc.send_signal(signal.SIGTERM)
            final = lines.wait_for("datagrams", 60)
            proc.wait(30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(30)
        rate = final["datagrams"] / sent["elapsed"] if sent["elapsed"] else 0.0
        self.results["bare"] = {"sent": sent, "received": final["datagrams"], "rate": round(rate, 1),
                                "kernel_drops": drops, "cpu_seconds": final["cpu_seconds"]}
        self.add(Figure(
            "bare Twisted UDP reader, one unpaced sender", "(reference)",
            f"{rate:,.0f} datagrams/s read ({final['datagrams']:,} of {sent['sent']:,} sent in "
            f"{sent['elapsed']:.1f} s; {drops:,} dropped by the kernel)",
            None, self.command("bare"), values=self.results["bare"],
        ))

    # -- paced UDP ingest

    def _ingest(self, product: Product, rate: float, seconds: float, db_file: str) -> dict:
        """Paced senders into *product*; wait until written; returns the phase's numbers."""
        before = product.snapshot()
        cpu_before = product.cpu_seconds()
        sent = run_senders(product.udp, rate, seconds, self.s, self.s.senders)
        after = product.wait_idle()
        cpu_after = product.cpu_seconds()
        socket_counters = udp_socket_counters(product.udp)
        handled = after["stats"]["datagrams"] - before["stats"]["datagrams"]
        shed = after["queue"]["dropped"] - before["queue"]["dropped"]
        kernel = after["stats"]["kernel_drops"] - before["stats"]["kernel_drops"]
        return {
            "sent": sent,
            "datagrams_read": handled,
            "shed": shed,
            "kernel_drops_product": kernel,
            "kernel_drops_proc": socket_counters["drops"],
            "cpu_seconds": round(cpu_after - cpu_before, 3),
            "before": before,
            "after": after,
        }

    def phase_udp(self) -> None:
        db_file = self.fresh_db_file("udp")
        product = Product(self.workdir, "udp", db_file, "--sip", "udp:0:interface=127.0.0.1")
        try:
            result = self._ingest(product, self.s.udp_rate, self.s.udp_seconds, db_file)
        finally:
            final = product.stop()
        rows = count_rows(db_file)
        sent = result["sent"]
        loss = sent["sent"] - rows - result["shed"]
        recorded_rate = rows / sent["elapsed"] if sent["elapsed"] else 0.0
        cpu_ms = result["cpu_seconds"] / rows * 1000 if rows else float("nan")
        memory = rss_summary(product.rss)
        self.memory["udp"] = memory
        result.update(rows=rows, loss=loss, recorded_rate=round(recorded_rate, 1),
                      cpu_ms_per_event=round(cpu_ms, 4), memory=memory, final=final)
        self.results["udp"] = result
        zero_loss = loss == 0 and result["shed"] == 0 and result["kernel_drops_proc"] == 0
        met = zero_loss and recorded_rate >= TARGET_RATE * 0.995 and not sent["behind"]
        note = "sender fell behind its target" if sent["behind"] else ""
        self.add(Figure(
            f"UDP ingest, {self.s.udp_seconds:g} s, distinct OPTIONS/INVITE, "
            f"{self.s.senders * self.s.sources} sources",
            f">= {TARGET_RATE:,} events/s, zero loss",
            f"{recorded_rate:,.0f} events/s recorded ({rows:,} of {sent['sent']:,} sent at "
            f"{sent['rate']:,.0f}/s); loss {loss}, shed {result['shed']}, kernel drops "
            f"{result['kernel_drops_proc']}",
            None if self.short else met, self.command("udp"), note, values={"rate": recorded_rate},
        ))
        self.add(Figure(
            "CPU per recorded event (UDP ingest, all threads)", f"<= {TARGET_CPU_MS} ms",
            f"{cpu_ms:.3f} ms ({result['cpu_seconds']:.1f} CPU s for {rows:,} events)",
            None if self.short else cpu_ms <= TARGET_CPU_MS, self.command("udp"),
        ))

    # -- full blast

    def phase_blast(self) -> None:
        db_file = self.fresh_db_file("blast")
        product = Product(self.workdir, "blast", db_file, "--sip", "udp:0:interface=127.0.0.1",
                          "-a", "--api-listen", "tcp:0:interface=127.0.0.1")
        health = Looper(product.api, "/health-check", pause=0.1)
        try:
            before = product.snapshot()
            sent = run_senders(product.udp, 0, self.s.blast_seconds, self.s, 1)
            after = product.wait_idle()
            health.stop()
            drops_proc = udp_socket_counters(product.udp)["drops"]
        finally:
            health.stop()
            final = product.stop()
        rows = count_rows(db_file)
        shed = after["queue"]["dropped"] - before["queue"]["dropped"]
        kernel = after["stats"]["kernel_drops"] - before["stats"]["kernel_drops"]
        handled = after["stats"]["datagrams"] - before["stats"]["datagrams"]
        unaccounted = sent["sent"] - rows - shed - kernel
        elapsed = sent["elapsed"]
        rate = (rows + shed) / elapsed if elapsed else 0.0
        bare = self.results.get("bare", {}).get("rate")
        ratio = f"; {rate / bare:.2f} of the bare reader's {bare:,.0f}/s" if bare else ""
        latency = latency_summary(health.seconds)
        memory = rss_summary(product.rss)
        self.memory["blast"] = memory
        self.results["blast"] = {
            "sent": sent, "rows": rows, "shed": shed, "kernel_drops_product": kernel,
            "kernel_drops_proc": drops_proc, "datagrams_read": handled, "unaccounted": unaccounted,
            "handled_rate": round(rate, 1), "health": latency, "health_errors": health.errors,
            "memory": memory, "final": final,
        }
        self.add(Figure(
            "UDP at full blast (one unpaced sender)",
            "every datagram recorded or counted as shed; responsive",
            f"sent {sent['sent']:,} at {sent['rate']:,.0f}/s: recorded {rows:,}, shed {shed:,}, "
            f"kernel drops {kernel:,} (counted by the product; /proc/net/udp: {drops_proc:,}), "
            f"unaccounted {unaccounted:,}; handled {rate:,.0f}/s{ratio}",
            None if self.short else unaccounted == 0, self.command("blast"),
            "kernel drops are counted in total, not per address",
        ))
        self.add(Figure(
            "  /health-check while blasted", "responsive",
            f"median {latency.get('median_ms', 0):.1f} ms, max {latency.get('max_ms', 0):.1f} ms "
            f"over {latency['n']} requests, {health.errors} errors",
            None if self.short else (latency["n"] > 0 and health.errors == 0
                                     and latency["max_ms"] < 1000),
            self.command("blast"),
        ))

    # -- TCP

    def phase_tcp(self) -> None:
        db_file = self.fresh_db_file("tcp")
        product = Product(self.workdir, "tcp", db_file, "--sip", "tcp:0:interface=127.0.0.1",
                          "--max-tcp-connections", str(self.s.concurrent + 100))
        try:
            pipelined = b"".join(
                probe(i, tag=b"p%d" % i, source=b"127.0.0.1", transport=b"TCP")
                for i in range(self.s.pipelined)
            )
            started = time.monotonic()
            _tcp_exchange(product.tcp, [pipelined])
            pipelined_seconds = time.monotonic() - started
            product.wait_idle()
            messages = [
                probe(i, tag=b"c%d" % i, source=b"127.0.0.1", transport=b"TCP")
                for i in range(self.s.concurrent)
            ]
            started = time.monotonic()
            _tcp_exchange(product.tcp, messages)
            concurrent_seconds = time.monotonic() - started
            product.wait_idle()
        finally:
            final = product.stop()
        pipelined_rows = count_rows(db_file, "transport_type = 'TCP' AND sip_message LIKE '%Call-ID: p%'")
        concurrent_rows = count_rows(db_file, "transport_type = 'TCP' AND sip_message LIKE '%Call-ID: c%'")
        self.results["tcp"] = {"pipelined_rows": pipelined_rows, "concurrent_rows": concurrent_rows,
                               "pipelined_seconds": round(pipelined_seconds, 3),
                               "concurrent_seconds": round(concurrent_seconds, 3), "final": final}
        self.add(Figure(
            f"TCP: {self.s.pipelined:,} pipelined messages on one connection", "all recorded",
            f"{pipelined_rows:,} recorded in {pipelined_seconds:.2f} s",
            pipelined_rows == self.s.pipelined, self.command("tcp"),
        ))
        self.add(Figure(
            f"TCP: {self.s.concurrent:,} concurrent connections", "all recorded",
            f"{concurrent_rows:,} recorded in {concurrent_seconds:.2f} s",
            concurrent_rows == self.s.concurrent, self.command("tcp"),
        ))

    # -- API at a million events

    def api_database(self) -> str:
        """The built database (kept in the work directory between runs, unless --fresh-db)."""
        name = f"api-{self.s.db_events}-{self.s.db_ips}-{self.s.db_numbers}.db"
        path = os.path.join(self.workdir, name)
        if self.fresh_db or not os.path.exists(path):
            for suffix in ("", "-wal", "-shm"):
                if os.path.exists(path + suffix):
                    os.unlink(path + suffix)
            out = subprocess.run(
                [PYTHON, "-m", "bench.builddb", path, "--events", str(self.s.db_events),
                 "--ips", str(self.s.db_ips), "--numbers", str(self.s.db_numbers)],
                cwd=ROOT, env=_env(), check=True, capture_output=True, timeout=3600,
            )
            self.results["builddb"] = json.loads(out.stdout.decode().strip().splitlines()[-1])
        copy = self.fresh_db_file("api-run")
        shutil.copyfile(path, copy)
        return copy

    def phase_api(self) -> None:
        db_file = self.api_database()
        product = Product(self.workdir, "api", db_file, "--sip", "udp:0:interface=127.0.0.1",
                          "-a", "--api-listen", "tcp:0:interface=127.0.0.1")
        routes = {}
        try:
            client = HTTPClient(product.api)
            conn = sqlite3.connect(db_file)
            ips = [r[0] for r in conn.execute(
                "SELECT source_ip FROM ip_summary ORDER BY random() LIMIT ?", (self.s.lookups,))]
            numbers = [r[0] for r in conn.execute(
                "SELECT called_number FROM number_summary ORDER BY random() LIMIT ?",
                (self.s.lookups,))]
            conn.close()
            product.snapshot()  # start the server-time window here
            plan = [
                ("/ip-addresses", ["/ip-addresses"] * self.s.requests),
                ("/numbers", ["/numbers"] * self.s.requests),
                ("/numbers?limit", ["/numbers?limit=1000"] * self.s.requests),
                ("/ip-addresses/{ip}", ["/ip-addresses/" + ip for ip in ips]),
                ("/numbers/{number}", ["/numbers/" + n.replace("+", "%2B") for n in numbers]),
            ]
            for name, paths in plan:
                seconds, sizes, statuses = [], set(), set()
                for path in paths:
                    status, size, took = client.get(path)
                    seconds.append(took)
                    sizes.add(size)
                    statuses.add(status)
                routes[name] = {"client": latency_summary(seconds), "statuses": sorted(statuses),
                                "body_bytes": max(sizes)}
            client.close()
            snap = product.snapshot()
            for name, values in snap["server_times"].items():
                if name in routes:
                    routes[name]["server"] = latency_summary(values)
            self.results["api"] = {"routes": routes, "database": self.results.get("builddb")}
            self._api_ingest(product, db_file)
        finally:
            final = product.stop()
        self.memory["api"] = rss_summary(product.rss)
        self.results["api"]["final"] = final
        size = f"{self.s.db_events:,} events, {self.s.db_ips:,} IPs, {self.s.db_numbers:,} numbers"

        def line(name: str, target_ms: float | None, what: str, server: bool = False) -> None:
            r = routes[name]
            client = r["client"]
            text = (f"median {client['median_ms']:.2f} ms, p95 {client['p95_ms']:.2f} ms "
                    f"({client['n']} requests, {r['body_bytes']:,} B, status {r['statuses']})")
            met = None
            if server:
                srv = r.get("server", {})
                text += (f"; server median {srv.get('median_ms', float('nan')):.3f} ms, "
                         f"p95 {srv.get('p95_ms', float('nan')):.3f} ms")
                if target_ms is not None and srv:
                    met = srv["median_ms"] <= target_ms
            elif target_ms is not None:
                met = client["median_ms"] <= target_ms
            self.add(Figure(what, "" if target_ms is None else f"<= {target_ms:g} ms median", text,
                            None if self.short else met, self.command("api")))

        line("/ip-addresses", TARGET_IP_LIST_MS, f"/ip-addresses at {size}")
        line("/numbers", TARGET_NUMBER_LIST_MS, "/numbers (whole list)")
        line("/numbers?limit", TARGET_NUMBER_PAGE_MS, "/numbers?limit=1000")
        line("/ip-addresses/{ip}", TARGET_LOOKUP_SERVER_MS, "/ip-addresses/{ip}", server=True)
        line("/numbers/{number}", TARGET_LOOKUP_SERVER_MS, "/numbers/{number}", server=True)
        if "api-ingest" in self.results:
            self._api_ingest_figures()

    def _api_ingest(self, product: Product, db_file: str) -> None:
        if "api-ingest" not in self.only:
            return
        rows_before = count_rows(db_file)
        looper = Looper(product.api, "/numbers")
        try:
            result = self._ingest(product, self.s.ingest_rate, self.s.ingest_seconds, db_file)
        finally:
            looper.stop()
        result["numbers_requests"] = latency_summary(looper.seconds)
        result["numbers_errors"] = looper.errors
        result["rows_before"] = rows_before
        result["db_file"] = db_file
        self.results["api-ingest"] = result

    def _api_ingest_figures(self) -> None:
        result = self.results["api-ingest"]
        rows = count_rows(result["db_file"]) - result["rows_before"]
        sent = result["sent"]
        loss = sent["sent"] - rows - result["shed"]
        result.update(rows=rows, loss=loss)
        n = result["numbers_requests"]
        self.add(Figure(
            f"UDP ingest at {self.s.ingest_rate:,.0f}/s while /numbers is requested in a loop",
            "zero events lost",
            f"{rows:,} of {sent['sent']:,} recorded (sent at {sent['rate']:,.0f}/s); loss {loss}, "
            f"shed {result['shed']}, kernel drops {result['kernel_drops_proc']}; /numbers answered "
            f"{n.get('n', 0)} times meanwhile (median {n.get('median_ms', 0):.0f} ms)",
            None if self.short else (loss == 0 and result["shed"] == 0 and not sent["behind"]),
            self.command("api-ingest"), "sender fell behind its target" if sent["behind"] else "",
        ))

    def memory_figure(self) -> None:
        if not self.memory:
            return
        peak = max(m["peak_mb"] for m in self.memory.values())
        parts = ", ".join(f"{name} peak {m['peak_mb']:.0f} MB (middle {m['middle_mb']:.0f}, "
                          f"end {m['end_mb']:.0f})" for name, m in self.memory.items())
        flat = all(m["end_mb"] <= m["middle_mb"] * 1.15 + 5 for m in self.memory.values())
        self.add(Figure(
            "resident memory of the product", f"<= {TARGET_RSS_MB:g} MB, flat", parts,
            None if self.short else (peak <= TARGET_RSS_MB and flat), self.command(
                ",".join(self.memory)),
        ))

    def run(self, only: tuple[str, ...]) -> None:
        self.only = only
        if "bare" in only:
            self.phase_bare()
        if "udp" in only:
            self.phase_udp()
        if "blast" in only:
            self.phase_blast()
        if "tcp" in only:
            self.phase_tcp()
        if "api" in only or "api-ingest" in only:
            self.phase_api()
        self.memory_figure()


def _tcp_exchange(port: int, payloads: list[bytes]) -> None:
    """Open one connection per payload at once, send each, half-close, read until closed."""
    sockets = []
    try:
        for _ in payloads:
            sockets.append(socket.create_connection(("127.0.0.1", port), timeout=60))
        for s, payload in zip(sockets, payloads, strict=True):
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
        for s in sockets:
            while s.recv(65536):
                pass
    finally:
        for s in sockets:
            s.close()


# ---------------------------------------------------------------------------------------------
# Output


def machine() -> dict:
    model = ""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "host": platform.node(),
        "cpu": f"{os.cpu_count()} x {model}".strip(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "load_average": os.getloadavg(),
    }


def print_table(figures: list[Figure], info: dict, out) -> None:
    out.write(f"SentryPeer benchmark, {info['date']}, {info['cpu']}, Linux {info['kernel']}, "
              f"Python {info['python']}, SQLite {info['sqlite']}\n")
    out.write("load average at start %.2f %.2f %.2f, at end %.2f %.2f %.2f\n\n"
              % (*info["load_average"], *info["load_average_end"]))
    out.write("| measure | target | result | met | reproduce |\n| --- | --- | --- | --- | --- |\n")
    for f in figures:
        met = {True: "yes", False: "**MISSED**", None: "-"}[f.met]
        note = f" ({f.note})" if f.note else ""
        out.write(f"| {f.measure} | {f.target} | {f.result}{note} | {met} | `{f.command}` |\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("--short", action="store_true", help="a few seconds per phase, low rates")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    parser.add_argument("--only", default=",".join(PHASES), help="phases: " + ",".join(PHASES))
    parser.add_argument("--workdir", help="where databases and logs go (default: a temp dir)")
    parser.add_argument("--fresh-db", action="store_true", help="rebuild the API database")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--rate", type=float, help="paced UDP rate of the udp and api-ingest phases "
                        f"(events/s; default {TARGET_RATE:,}): find the highest rate with zero loss")
    parser.add_argument("--seconds", type=float, help="length of the udp and api-ingest phases (s)")
    args = parser.parse_args(argv)
    only = tuple(p.strip() for p in args.only.split(",") if p.strip())
    unknown = set(only) - set(PHASES)
    if unknown:
        parser.error(f"unknown phases: {', '.join(sorted(unknown))}")
    workdir = args.workdir or tempfile.mkdtemp(prefix="sentrypeer-bench-")
    os.makedirs(workdir, exist_ok=True)
    info = machine()
    settings = dataclasses.replace(SHORT if args.short else Settings())
    extra = ""
    if args.rate is not None:
        if not 0 < args.rate <= 1_000_000:
            parser.error("--rate must be between 0 and 1,000,000 events/s")
        settings.udp_rate = settings.ingest_rate = args.rate
        extra += f" --rate {args.rate:g}"
    if args.seconds is not None:
        if not 0 < args.seconds <= 3600:
            parser.error("--seconds must be between 0 and 3,600")
        settings.udp_seconds = settings.ingest_seconds = args.seconds
        extra += f" --seconds {args.seconds:g}"
    runner = Runner(settings, workdir, args.short, args.fresh_db, extra)
    try:
        runner.run(only)
    finally:
        info["load_average_end"] = os.getloadavg()
        if not args.keep and not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        json.dump({"machine": info, "short": args.short,
                   "figures": [asdict(f) for f in runner.figures], "details": runner.results},
                  sys.stdout, indent=2, default=str)
        sys.stdout.write("\n")
    else:
        print_table(runner.figures, info, sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
