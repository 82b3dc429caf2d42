"""Tests for the service tree: the twistd plugin, wiring, start-up failures and ordered shutdown."""

from __future__ import annotations

import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time

from twisted.application.service import IServiceMaker
from twisted.internet import defer, reactor, task, threads
from twisted.internet.address import IPv4Address
from twisted.internet.testing import EventLoggingObserver, StringTransport
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.plugin import getPlugins
from twisted.trial.unittest import SynchronousTestCase, TestCase

from sentrypeer.service import SentryPeerService, build_service
from sentrypeer.sip.controller import SIPController
from sentrypeer.storage.database import DatabaseService

from .support import ListSink, MemoryReactorWithUDP, corpus_bytes, make_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPTIONS = corpus_bytes("scanners/svmap-0.3.3_options_udp.sip")


def critical_lines(observer) -> list[str]:
    return [formatEvent(e) for e in observer if e["log_level"] >= LogLevel.critical]


class PluginTests(SynchronousTestCase):
    def test_plugin_found(self):
        """twistd finds the plugin: getPlugins(IServiceMaker) yields tapname 'sentrypeer', whose
        Options and makeService build a SentryPeerService."""
        makers = [m for m in getPlugins(IServiceMaker) if m.tapname == "sentrypeer"]
        self.assertEqual(len(makers), 1)
        options = makers[0].options()
        options.environ = {}
        options.home = self.mktemp()
        options.parseOptions(["-f", os.path.join(self.mktemp() + "x.db"), "-R"])
        service = makers[0].makeService(options)
        self.assertIsInstance(service, SentryPeerService)
        self.assertTrue(service.config.sip_disable)


class WiringTests(SynchronousTestCase):
    def setUp(self):
        self.directory = os.path.abspath(self.mktemp())
        self.reactor = MemoryReactorWithUDP()

    def test_default_listeners(self):
        """On the embedded defaults the tree listens on UDP and TCP 5060 and TLS 5061 on ::
        (dual stack), UDP with 65,535-byte datagrams, and generates the TLS pair next to the
        database."""
        config = make_config(self.directory)
        service = build_service(config, self.reactor)
        service.privilegedStartService()
        self.assertEqual(self.reactor.udpPorts[5060][1:], ("::", 65535))
        self.assertEqual([(p, i) for p, _, _, i in self.reactor.tcpServers], [(5060, "::")])
        self.assertEqual([(p, i) for p, _, _, _, i in self.reactor.sslServers], [(5061, "::")])
        self.assertTrue(os.path.exists(os.path.join(self.directory, "cert.pem")))
        self.assertIsInstance(list(service)[0], DatabaseService)
        self.assertRegex(service.node_id, r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-")

    def test_sip_disabled(self):
        """-R opens no SIP listener."""
        service = build_service(make_config(self.directory, sip_disable=True), self.reactor)
        service.privilegedStartService()
        self.assertEqual((self.reactor.udpPorts, self.reactor.tcpServers), ({}, []))

    def test_node_id_persists(self):
        """The node id is created once and kept in the database across restarts."""
        first = build_service(make_config(self.directory, sip_disable=True), self.reactor)
        first.privilegedStartService()
        second = build_service(make_config(self.directory, sip_disable=True), self.reactor)
        second.privilegedStartService()
        self.assertEqual(first.node_id, second.node_id)

    def test_responsive_settings_without_r_warned(self):
        """--sip-persona or --reply-rate without -r have no effect: one warning each."""
        observer = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        config = make_config(self.directory, sip_disable=True, sip_persona="kamailio", reply_rate=3.0)
        build_service(config, self.reactor).privilegedStartService()
        warnings = [formatEvent(e) for e in observer if e["log_level"] == LogLevel.warn]
        self.assertEqual(len([w for w in warnings if "no effect without -r" in w]), 2)

    def test_api_listener(self):
        """-a serves the REST API on --api-listen (default tcp:8082 on 127.0.0.1)."""
        service = build_service(make_config(self.directory, sip_disable=True, api=True), self.reactor)
        service.privilegedStartService()
        self.assertEqual([(p, i) for p, _, _, i in self.reactor.tcpServers], [(8082, "127.0.0.1")])

    def test_api_port_in_use(self):
        """An API port that cannot be bound is one line and exit status 1."""
        with socket.socket() as busy:
            busy.bind(("127.0.0.1", 0))
            busy.listen()
            port = busy.getsockname()[1]
            config = make_config(self.directory, sip_disable=True, api=True,
                                 api_listen=f"tcp:{port}:interface=127.0.0.1")
            observer = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
            error = self.assertRaises(SystemExit, build_service(config, reactor).privilegedStartService)
            self.assertEqual(error.code, 1)
            self.assertEqual(critical_lines(observer),
                             [f"sentrypeer: cannot listen on TCP 127.0.0.1:{port}: Address already in use"])


class StartupFailureTests(SynchronousTestCase):
    def assertOneLineExit(self, config, *words):
        observer = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        service = build_service(config, MemoryReactorWithUDP())
        error = self.assertRaises(SystemExit, service.privilegedStartService)
        self.assertEqual(error.code, 1)
        lines = critical_lines(observer)
        self.assertEqual(len(lines), 1, lines)
        self.assertNotIn("\n", lines[0])
        self.assertNotIn("Traceback", lines[0])
        for word in words:
            self.assertIn(word, lines[0])

    def test_unwritable_database(self):
        """A database path that cannot be opened: one line naming it, exit status 1."""
        directory = os.path.abspath(self.mktemp())
        config = make_config(directory, db_file=os.path.join(directory, "missing", "x.db"))
        self.assertOneLineExit(config, "missing/x.db")

    def test_only_key_exists(self):
        """A TLS key without its certificate: one line naming the missing file."""
        directory = os.path.abspath(self.mktemp())
        config = make_config(directory)
        with open(config.key, "w") as f:
            f.write("x")
        self.assertOneLineExit(config, config.cert, "missing")

    def test_unreadable_key(self):
        """A key file that is not a PEM key: one line naming it."""
        directory = os.path.abspath(self.mktemp())
        config = make_config(directory)
        for path in (config.cert, config.key):
            with open(path, "w") as f:
                f.write("not pem\n")
        self.assertOneLineExit(config, config.key)

    def test_port_in_use(self):
        """A port that cannot be bound: one line naming transport, address, port and cause."""
        with socket.socket() as busy:
            busy.bind(("127.0.0.1", 0))
            busy.listen()
            port = busy.getsockname()[1]
            directory = os.path.abspath(self.mktemp())
            config = make_config(directory, [f"tcp:{port}:interface=127.0.0.1"])
            observer = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
            service = build_service(config, reactor)
            self.assertRaises(SystemExit, service.privilegedStartService)
            lines = critical_lines(observer)
            self.assertEqual(lines, [f"sentrypeer: cannot listen on TCP 127.0.0.1:{port}: "
                                     "Address already in use"])
            self.assertEqual(service.ports, [])

    def test_bad_blocklist_exclude(self):
        """A --blocklist-exclude file with a line that is no address or CIDR: one line naming it."""
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        path = os.path.join(directory, "exclude.txt")
        with open(path, "w") as f:
            f.write("192.0.2.0/24\nnot-a-cidr\n")
        config = make_config(directory, sip_disable=True, api=True, blocklist_exclude=path)
        self.assertOneLineExit(config, "--blocklist-exclude", "not-a-cidr")

    def test_bad_api_listen(self):
        """An --api-listen description Twisted cannot parse is one line naming it."""
        directory = os.path.abspath(self.mktemp())
        config = make_config(directory, sip_disable=True, api=True, api_listen="bogus:8082")
        self.assertOneLineExit(config, "--api-listen", "bogus:8082")

class VerboseLogTests(SynchronousTestCase):
    def test_event_line_escapes_attacker_text(self):
        """With -v each event is one log line; attacker text (newlines, escape sequences) is
        escaped so it cannot forge log lines."""
        observer = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        controller = SIPController(node_id="n", sink=ListSink(), clock=task.Clock(), verbose=True)
        evil = OPTIONS.replace(b"friendly-scanner", b"x\x1b[31m\\nFAKE\rline")
        controller.message_received(evil, "UDP", ("192.0.2.1", 5060), ("192.0.2.2", 5060))
        lines = [formatEvent(e) for e in observer if "number=" in e.get("log_format", "")]
        self.assertEqual(len(lines), 1)
        self.assertNotIn("\x1b", lines[0])
        self.assertNotIn("\r", lines[0])
        self.assertIn("\\x1b[31m", lines[0])


class ShutdownTests(TestCase):
    @defer.inlineCallbacks
    def test_stop_records_buffered_then_flushes(self):
        """stopService closes the listeners, records a partial stream message as truncated,
        flushes every queued event and closes the database last."""
        directory = os.path.abspath(self.mktemp())
        config = make_config(directory, ["udp:0:interface=127.0.0.1"])
        service = build_service(config, reactor)
        service.privilegedStartService()
        service.startService()
        for i in range(500):
            service.controller.message_received(
                OPTIONS.replace(b"Call-ID: ", b"Call-ID: %d-" % i), "UDP",
                ("192.0.2.1", 5060), ("192.0.2.2", 5060),
            )
        protocol = service.controller.stream_factory("TCP").buildProtocol(None)
        protocol.makeConnection(StringTransport(
            hostAddress=IPv4Address("TCP", "192.0.2.2", 5060),
            peerAddress=IPv4Address("TCP", "192.0.2.3", 4000),
        ))
        protocol.dataReceived(OPTIONS[:100])
        yield service.stopService()
        self.assertEqual(service.ports, [])
        conn = sqlite3.connect(config.db_file)
        statuses = [r[0] for r in conn.execute("SELECT parse_status FROM honey ORDER BY honey_id")]
        conn.close()
        self.assertEqual(len(statuses), 501)
        self.assertEqual(statuses[-1], "truncated")
        self.assertIsNone(service.database_service.database._pool)


class TwistdTests(TestCase):
    """``twistd -n sentrypeer`` as users start it."""

    timeout = 60

    def twistd(self, directory, *args):
        env = {k: v for k, v in os.environ.items() if not k.startswith("SENTRYPEER_")}
        env.update(PYTHONPATH=ROOT, HOME=directory)
        return subprocess.Popen(
            [sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
             "--nodaemon", "--pidfile=", "--logfile=-", "sentrypeer", *args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=directory,
        )

    def _records_a_probe(self):
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        proc = self.twistd(directory, "--sip", "udp:0:interface=127.0.0.1")
        try:
            out = b""
            deadline = time.monotonic() + 30
            port = None
            while port is None and time.monotonic() < deadline:
                line = proc.stdout.readline()
                if not line:
                    break
                out += line
                match = re.search(rb"listening for SIP on UDP 127\.0\.0\.1:(\d+)", line)
                port = int(match.group(1)) if match else None
            self.assertIsNotNone(port, out)
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.sendto(OPTIONS, ("127.0.0.1", port))
            time.sleep(0.5)
            proc.send_signal(signal.SIGTERM)
            out += proc.communicate(timeout=30)[0]
        finally:
            if proc.poll() is None:
                proc.kill()
        return proc.returncode, out, os.path.join(directory, "sentrypeer.db")

    @defer.inlineCallbacks
    def test_twistd_records_probe(self):
        """twistd -n sentrypeer (default database sentrypeer.db in the working directory)
        records a UDP probe and stops cleanly on SIGTERM (twistd ends by re-raising the signal,
        so the status is 0 or -SIGTERM)."""
        code, out, db_file = yield threads.deferToThread(self._records_a_probe)
        self.assertIn(code, (0, -signal.SIGTERM), out)
        self.assertIn(b"SentryPeer stopped: received=1 recorded=1 written=1", out)
        self.assertNotIn(b"Traceback", out)
        conn = sqlite3.connect(db_file)
        got = conn.execute("SELECT method, called_number, user_agent FROM honey").fetchall()
        conn.close()
        self.assertEqual(got, [("OPTIONS", "100", "friendly-scanner")])

    @defer.inlineCallbacks
    def test_twistd_startup_failure_one_line(self):
        """Under twistd a port in use is one logged line and a non-zero exit, no traceback."""
        with socket.socket() as busy:
            busy.bind(("127.0.0.1", 0))
            busy.listen()
            port = busy.getsockname()[1]
            directory = os.path.abspath(self.mktemp())
            os.makedirs(directory)
            proc = self.twistd(directory, "--sip", f"tcp:{port}:interface=127.0.0.1")
            out, _ = yield threads.deferToThread(proc.communicate, None, 30)
        self.assertNotEqual(proc.returncode, 0)
        self.assertNotIn(b"Traceback", out)
        self.assertEqual(len(re.findall(rb"cannot listen on TCP", out)), 1, out)
