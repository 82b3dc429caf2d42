"""Integration tests: real listeners on loopback ephemeral ports, driven by the tools users meet
(SIPVicious svmap/svwar, sipsak, SIPp, openssl s_client), each asserting the rows written."""

from __future__ import annotations

import os
import re
import signal
import socket
import sqlite3
import sys
import time

from twisted.internet import defer, reactor, threads, utils
from twisted.trial.unittest import TestCase

from sentrypeer.service import build_service

from .support import corpus_bytes, make_config, require_tool

LOOPBACK_LISTEN = (
    "udp:0:interface=127.0.0.1",
    "tcp:0:interface=127.0.0.1",
    "tls:0:interface=127.0.0.1",
)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rows(db_file: str, where: str = "1") -> list[sqlite3.Row]:
    """Every ``honey`` row of the database (read with a separate plain connection)."""
    conn = sqlite3.connect(db_file)
    conn.row_factory = sqlite3.Row
    try:
        return conn.execute(f"SELECT * FROM honey WHERE {where} ORDER BY honey_id").fetchall()
    finally:
        conn.close()


class HoneypotTestCase(TestCase):
    timeout = 120

    def start(self, listen=LOOPBACK_LISTEN, **overrides):
        directory = os.path.abspath(self.mktemp())
        config = make_config(directory, listen, **overrides)
        service = build_service(config, reactor)
        service.privilegedStartService()
        service.startService()
        self.addCleanup(service.stopService)
        self.service = service
        self.db_file = config.db_file
        self.home = directory
        return service

    def port(self, transport: str) -> int:
        for spec, port in self.service.ports:
            if spec.transport == transport:
                return port.getHost().port
        raise AssertionError(f"no {transport} listener")

    @defer.inlineCallbacks
    def recorded(self, where: str = "1"):
        """Rows in the database once everything received so far has been written."""
        yield self.service.database_service.queue.flush()
        return rows(self.db_file, where)

    @defer.inlineCallbacks
    def run_tool(self, name: str, *args: str, stdin: bytes | None = None):
        path = require_tool(name)
        env = {"HOME": self.home, "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
        if stdin is None:
            out, err, code = yield utils.getProcessOutputAndValue(path, args, env=env)
        else:
            out, err, code = yield threads.deferToThread(self._run_with_stdin, path, args, env, stdin)
        return out + err, code

    @staticmethod
    def _run_with_stdin(path, args, env, data):
        import subprocess

        proc = subprocess.run([path, *args], input=data, capture_output=True, env=env, timeout=60)
        return proc.stdout, proc.stderr, proc.returncode

    def assertRow(self, row, transport, method, number, agent, source="127.0.0.1"):
        self.assertEqual(row["transport_type"], transport)
        self.assertEqual(row["method"], method)
        self.assertEqual(row["called_number"], number)
        self.assertEqual(row["user_agent"], agent)
        self.assertEqual(row["source_ip"], source)
        self.assertEqual(row["destination_ip"], source)
        self.assertEqual(row["collected_method"], "passive")
        self.assertIsNotNone(row["sip_message_bytes"])


class ScannerTests(HoneypotTestCase):
    @defer.inlineCallbacks
    def test_svmap_options_udp(self):
        """svmap's OPTIONS probe over UDP is one row: OPTIONS, number 100, friendly-scanner."""
        self.start()
        yield self.run_tool("svmap", "-p", str(self.port("udp")), "127.0.0.1")
        got = yield self.recorded()
        self.assertEqual(len(got), 1)
        self.assertRow(got[0], "UDP", "OPTIONS", "100", "friendly-scanner")

    @defer.inlineCallbacks
    def test_svmap_invite_fraud_number(self):
        """svmap -m INVITE -e 00972… records the Request-URI number, not the To user."""
        self.start()
        yield self.run_tool(
            "svmap", "-p", str(self.port("udp")), "-m", "INVITE", "-e", "00972599000123",
            "127.0.0.1",
        )
        got = yield self.recorded()
        self.assertEqual(len(got), 1)
        self.assertRow(got[0], "UDP", "INVITE", "00972599000123", "friendly-scanner")

    @defer.inlineCallbacks
    def test_svwar_register(self):
        """svwar against a silent honeypot sends its first REGISTER and stops: that REGISTER is
        recorded, its number taken from the To URI (the Request-URI has no user part)."""
        self.start()
        yield self.run_tool("svwar", "-p", str(self.port("udp")), "-e100-103", "127.0.0.1")
        got = yield self.recorded()
        self.assertEqual(len(got), 1)
        row = got[0]
        # svwar's first REGISTER is its sanity check for a random extension.
        self.assertRegex(row["called_number"], r"^[0-9]+$")
        self.assertIn(f"To: \"{row['called_number']}\"<sip:{row['called_number']}@".encode(),
                      row["sip_message_bytes"])
        self.assertRow(row, "UDP", "REGISTER", row["called_number"], "friendly-scanner")

    @defer.inlineCallbacks
    def test_sipsak_udp_retransmissions_one_row(self):
        """sipsak over UDP retransmits its OPTIONS when unanswered: one row, the rest counted."""
        self.start()
        yield self.run_tool("sipsak", "-D", "8", "-s", f"sip:100@127.0.0.1:{self.port('udp')}")
        got = yield self.recorded()
        self.assertEqual(len(got), 1)
        self.assertRow(got[0], "UDP", "OPTIONS", "100", "sipsak 0.9.8.1")
        self.assertGreaterEqual(self.service.stats.retransmissions, 2)

    @defer.inlineCallbacks
    def test_sipsak_tcp(self):
        """sipsak over TCP: one row with transport TCP."""
        self.start()
        yield self.run_tool(
            "sipsak", "-D", "8", "-E", "tcp", "-s", f"sip:100@127.0.0.1:{self.port('tcp')}"
        )
        got = yield self.recorded()
        self.assertEqual(len(got), 1)
        self.assertRow(got[0], "TCP", "OPTIONS", "100", "sipsak 0.9.8.1")

    @defer.inlineCallbacks
    def test_sipp_uac_udp(self):
        """sipp -sn uac over UDP: its INVITE with SDP and two retransmissions is one row."""
        self.start()
        yield self.run_tool(
            "sipp", "-sn", "uac", "-s", "1000", f"127.0.0.1:{self.port('udp')}", "-m", "1",
            "-t", "u1", "-max_retrans", "2", "-recv_timeout", "3000", "-nostdin",
        )
        got = yield self.recorded()
        self.assertEqual(len(got), 1)
        self.assertRow(got[0], "UDP", "INVITE", "1000", "NOT_FOUND")
        self.assertIn(b"v=0", got[0]["sip_message_bytes"])
        self.assertEqual(self.service.stats.retransmissions, 2)

    @defer.inlineCallbacks
    def test_sipp_uac_tcp(self):
        """sipp -sn uac over TCP: one INVITE row, body framed by Content-Length."""
        self.start()
        yield self.run_tool(
            "sipp", "-sn", "uac", "-s", "1000", f"127.0.0.1:{self.port('tcp')}", "-m", "1",
            "-t", "t1", "-recv_timeout", "3000", "-nostdin",
        )
        got = yield self.recorded()
        self.assertEqual(len(got), 1)
        self.assertRow(got[0], "TCP", "INVITE", "1000", "NOT_FOUND")
        self.assertTrue(got[0]["sip_message_bytes"].endswith(b"\r\n"))

    @defer.inlineCallbacks
    def test_tls_openssl_s_client(self):
        """An OPTIONS carried by openssl s_client over TLS is one row with transport TLS; the
        self-signed pair was generated next to the database, key mode 0600."""
        self.start()
        message = corpus_bytes("scanners/sipsak-0.9.8.1_options_tcp.sip")
        yield self.run_tool(
            "openssl", "s_client", "-quiet", "-connect", f"127.0.0.1:{self.port('tls')}",
            stdin=message,
        )
        got = yield self.recorded()
        self.assertEqual(len(got), 1)
        self.assertRow(got[0], "TLS", "OPTIONS", "100", "sipsak 0.9.8.1")
        self.assertEqual(got[0]["sip_message_bytes"], message)
        key = os.path.join(self.home, "key.pem")
        self.assertEqual(os.stat(key).st_mode & 0o777, 0o600)


def _udp_send(address, family, payloads):
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        for payload in payloads:
            s.sendto(payload, address)


def _tcp_send(address, family, data):
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.connect(address)
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        s.settimeout(10)
        while s.recv(65536):
            pass


class SocketTests(HoneypotTestCase):
    @defer.inlineCallbacks
    def test_ipv6_loopback(self):
        """Listeners on ::1 record UDP and TCP probes with source and destination ::1."""
        self.start(listen=("udp:0:interface=::1", "tcp:0:interface=\\:\\:1"))
        data = corpus_bytes("scanners/svmap-0.3.3_options_udp.sip")
        yield threads.deferToThread(_udp_send, ("::1", self.port("udp")), socket.AF_INET6, [data])
        yield threads.deferToThread(_tcp_send, ("::1", self.port("tcp")), socket.AF_INET6, data)
        got = yield self.recorded()
        self.assertEqual(sorted(r["transport_type"] for r in got), ["TCP", "UDP"])
        for row in got:
            self.assertRow(row, row["transport_type"], "OPTIONS", "100", "friendly-scanner", "::1")

    @defer.inlineCallbacks
    def test_dual_stack_records_real_destination(self):
        """On a wildcard :: socket an IPv4 probe is recorded with the IPv4 address it was sent
        to (IPV6_PKTINFO), not the wildcard."""
        self.start(listen=("udp:0:interface=::",))
        data = corpus_bytes("scanners/svmap-0.3.3_options_udp.sip")
        port = self.port("udp")
        yield threads.deferToThread(_udp_send, ("127.0.0.2", port), socket.AF_INET, [data])
        got = yield self.recorded()
        self.assertEqual(len(got), 1)
        self.assertEqual(got[0]["destination_ip"], "127.0.0.2")
        self.assertEqual(got[0]["destination_port"], port)
        self.assertEqual(got[0]["source_ip"], "127.0.0.1")

    @defer.inlineCallbacks
    def test_4k_invite_with_sdp_udp(self):
        """A 4 KB INVITE with SDP in one datagram is recorded whole (the original cut at 1024)."""
        self.start()
        sdp = b"v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
        sdp += b"".join(b"a=rtpmap:%d X/8000\r\n" % i for i in range(200))
        sdp = sdp[:3800]
        invite = (
            b"INVITE sip:0046812118532@127.0.0.1 SIP/2.0\r\n"
            b"Via: SIP/2.0/UDP 127.0.0.1:5071;branch=z9hG4bK-4k\r\n"
            b"From: <sip:a@127.0.0.1>;tag=4\r\nTo: <sip:0046812118532@127.0.0.1>\r\n"
            b"Call-ID: big4k\r\nCSeq: 1 INVITE\r\nUser-Agent: big\r\n"
            b"Content-Type: application/sdp\r\nContent-Length: %d\r\n\r\n" % len(sdp)
        ) + sdp
        self.assertGreater(len(invite), 4000)
        yield threads.deferToThread(
            _udp_send, ("127.0.0.1", self.port("udp")), socket.AF_INET, [invite]
        )
        got = yield self.recorded()
        self.assertEqual(len(got), 1)
        self.assertEqual(got[0]["sip_message_bytes"], invite)
        self.assertEqual(got[0]["called_number"], "0046812118532")
        self.assertEqual(got[0]["parse_status"], "ok")

    @defer.inlineCallbacks
    def test_2000_pipelined_options_one_tcp_connection(self):
        """2,000 pipelined OPTIONS on one TCP connection are 2,000 rows."""
        self.start()
        template = corpus_bytes("scanners/sipsak-0.9.8.1_options_tcp.sip")
        data = b"".join(template.replace(b"Call-ID: ", b"Call-ID: %d-" % i) for i in range(2000))
        yield threads.deferToThread(
            _tcp_send, ("127.0.0.1", self.port("tcp")), socket.AF_INET, data
        )
        got = yield self.recorded()
        self.assertEqual(len(got), 2000)
        self.assertEqual({r["transport_type"] for r in got}, {"TCP"})


class ProcessTests(TestCase):
    """The product as users start it: a separate process."""

    timeout = 120

    def spawn(self, *args):
        import subprocess

        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        db_file = os.path.join(directory, "sentrypeer.db")
        env = dict(os.environ, PYTHONPATH=ROOT, HOME=directory)
        env = {k: v for k, v in env.items() if not k.startswith("SENTRYPEER_")}
        proc = subprocess.Popen(
            [sys.executable, "-m", "sentrypeer", "-f", db_file, *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=directory,
        )
        self.addCleanup(lambda: proc.poll() is None and proc.kill())
        return proc, db_file

    def wait_for_port(self, proc, transport):
        pattern = re.compile(rf"listening for SIP on {transport} \S+:(\d+)".encode())
        deadline = time.monotonic() + 30
        seen = b""
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            seen += line
            match = pattern.search(line)
            if match:
                return int(match.group(1))
        raise AssertionError(f"no {transport} listener announced: {seen!r}")

    def _burst_then_sigterm(self):
        proc, db_file = self.spawn("--sip", "udp:0:interface=127.0.0.1")
        port = self.wait_for_port(proc, "UDP")
        template = corpus_bytes("scanners/svmap-0.3.3_options_udp.sip")
        sent = 0
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            # paced at about 2,000 datagrams/s: this test is about the flush, not the peak rate
            for i in range(3000):
                s.sendto(template.replace(b"Call-ID: ", b"Call-ID: burst%d-" % i), ("127.0.0.1", port))
                sent += 1
                if i % 100 == 99:
                    time.sleep(0.05)
        time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        return proc.returncode, err, db_file, sent

    @defer.inlineCallbacks
    def test_paced_udp_burst_then_sigterm(self):
        """After a paced burst of distinct probes and SIGTERM, the database holds exactly as many
        rows as datagrams the product counted as received: nothing lost in the flush."""
        code, err, db_file, sent = yield threads.deferToThread(self._burst_then_sigterm)
        self.assertEqual(code, 0, err[-2000:])
        match = re.search(rb"received=(\d+) recorded=(\d+) written=(\d+) dropped=(\d+)", err)
        self.assertIsNotNone(match, err[-2000:])
        received, recorded, written, dropped = map(int, match.groups())
        self.assertEqual(len(rows(db_file)), received)
        self.assertEqual((recorded, written, dropped), (received, received, 0))
        self.assertEqual(received, sent)
        self.assertNotIn(b"Traceback", err)
