"""One svmap probe through every output of a ``twistd -n sentrypeer`` process: the database row, the
JSON log line, the syslog line matched by the shipped Fail2ban filter, the webhook POST, and the REST
API answers (issue "REST API, JSON log, syslog … every recorded event reaches every output")."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time

from twisted.internet import defer, reactor, threads
from twisted.trial.unittest import TestCase
from twisted.web import resource, server

from .support import require_tool

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Collector(resource.Resource):
    """Plays the webhook collector: keeps every POST body and its headers."""

    isLeaf = True

    def __init__(self):
        super().__init__()
        self.posts = []

    def render_POST(self, request):
        self.posts.append((request.getAllHeaders(), request.content.read()))
        request.setResponseCode(201)
        return b"{}"


def free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EveryOutputTests(TestCase):
    timeout = 120

    def run_scenario(self, directory, syslog_path, webhook_port, api_port, svmap, curl):
        syslog = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        syslog.bind(syslog_path)
        syslog.settimeout(20)
        env = {k: v for k, v in os.environ.items() if not k.startswith("SENTRYPEER_")}
        env.update(PYTHONPATH=ROOT, HOME=directory)
        proc = subprocess.Popen(
            [sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
             "-n", "--pidfile=", "--logfile=-", "sentrypeer", "-a", "-j", "-s",
             "--syslog-socket", syslog_path, "-w", f"http://127.0.0.1:{webhook_port}/api/events",
             "--api-listen", f"tcp:{api_port}:interface=127.0.0.1",
             "--sip", "udp:0:interface=127.0.0.1"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=directory,
        )
        try:
            out, port = b"", None
            deadline = time.monotonic() + 30
            while port is None and time.monotonic() < deadline:
                line = proc.stdout.readline()
                if not line:
                    break
                out += line
                match = re.search(rb"listening for SIP on UDP 127\.0\.0\.1:(\d+)", line)
                port = int(match.group(1)) if match else None
            assert port is not None, out
            probe = subprocess.run(
                [svmap, "-p", str(port), "127.0.0.1"], capture_output=True, timeout=60,
                env={"HOME": directory, "PATH": os.environ.get("PATH", "/usr/bin:/bin")},
            )
            syslog_line = syslog.recv(65536)
            answers = {}
            for path in ("/ip-addresses/127.0.0.1", "/numbers/100"):
                got = subprocess.run(
                    [curl, "-s", "-w", "\n%{http_code}", f"http://127.0.0.1:{api_port}{path}"],
                    capture_output=True, timeout=30,
                )
                body, _, code = got.stdout.rpartition(b"\n")
                answers[path] = (int(code), json.loads(body))
            time.sleep(0.5)
        finally:
            proc.send_signal(signal.SIGTERM)
            out += proc.communicate(timeout=30)[0]
            syslog.close()
        return out, probe, syslog_line, answers

    @defer.inlineCallbacks
    def test_svmap_probe_reaches_every_output(self):
        """twistd -n sentrypeer -a -j -s --syslog-socket PATH -w URL: one svmap probe gives the DB
        row, the JSON line, the syslog line (matched by contrib/fail2ban's filter), the webhook
        POST, and /ip-addresses/127.0.0.1 and /numbers/100 answer 200."""
        svmap, curl = require_tool("svmap"), require_tool("curl")
        f2b = require_tool("fail2ban-regex")
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        collector = Collector()
        listening = reactor.listenTCP(0, server.Site(collector), interface="127.0.0.1")
        self.addCleanup(listening.stopListening)
        # AF_UNIX paths are limited to 107 bytes: the socket lives in a short temporary directory.
        sockdir = tempfile.mkdtemp(prefix="sp")
        self.addCleanup(shutil.rmtree, sockdir, True)
        out, probe, syslog_line, answers = yield threads.deferToThread(
            self.run_scenario, directory, os.path.join(sockdir, "log.sock"),
            listening.getHost().port, free_tcp_port(), svmap, curl,
        )
        self.assertNotIn(b"Traceback", out)

        conn = sqlite3.connect(os.path.join(directory, "sentrypeer.db"))
        rows = conn.execute(
            "SELECT event_uuid, source_ip, method, called_number, user_agent FROM honey"
        ).fetchall()
        conn.close()
        self.assertEqual(len(rows), 1, out)
        uuid = rows[0][0]
        self.assertEqual(rows[0][1:], ("127.0.0.1", "OPTIONS", "100", "friendly-scanner"))

        with open(os.path.join(directory, "sentrypeer_json.log"), "rb") as f:
            lines = f.read().splitlines()
        self.assertEqual(len(lines), 1)
        logged = json.loads(lines[0])
        self.assertEqual(logged["event_uuid"], uuid)
        self.assertEqual(list(logged)[:3], ["app_name", "app_version", "event_timestamp"])

        self.assertRegex(syslog_line, rb"^<13>sentrypeer\[\d+\]: Source IP: 127\.0\.0\.1, Method: OPTIONS, "
                                      rb"Agent: friendly-scanner$")
        log_file = os.path.join(directory, "syslog.txt")
        with open(log_file, "wb") as f:
            f.write(b"Nov 30 21:32:16 honeypot " + syslog_line[4:] + b"\n")
        checked = yield threads.deferToThread(
            subprocess.run,
            [f2b, "--print-all-matched", log_file,
             os.path.join(ROOT, "contrib", "fail2ban", "filter.d", "sentrypeer.conf")],
            capture_output=True, timeout=60,
        )
        self.assertIn(b"Lines: 1 lines, 0 ignored, 1 matched", checked.stdout, checked.stdout)

        self.assertEqual(len(collector.posts), 1)
        headers, body = collector.posts[0]
        self.assertEqual(headers[b"content-type"], b"application/json")
        self.assertEqual(json.loads(body)["event_uuid"], uuid)

        self.assertEqual(answers["/ip-addresses/127.0.0.1"], (200, {"bad_actor_found": "127.0.0.1"}))
        self.assertEqual(answers["/numbers/100"], (200, {"phone_number_found": "100"}))
