"""Responsive mode (``-r``) against the real tools attackers use, on loopback: SIPVicious (svmap,
svwar, svcrack), sipsak, SIPp scenarios (``tests/sipp/*.xml``), nmap's service detection; plus a
spoofed-source flood that must not turn the honeypot into a reflector, and the source address of UDP
replies on a wildcard socket."""

from __future__ import annotations

import hashlib
import os
import re
import select
import socket
import time

from twisted.internet import defer, threads, utils

from sentrypeer.sip.persona import shipped_persona

from .support import corpus_bytes, require_tool
from .test_integration import HoneypotTestCase

LOOPBACK_LISTEN = ("udp:0:interface=127.0.0.1", "tcp:0:interface=127.0.0.1")
SIPP_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sipp")
DEFAULT = shipped_persona()


class ResponsiveTestCase(HoneypotTestCase):
    """Starts the honeypot in-process with ``-r`` on loopback ephemeral ports (the service tree
    builds and installs the responder, as ``sentrypeer -r`` does)."""

    timeout = 180

    def start(self, listen=LOOPBACK_LISTEN, **overrides):
        overrides.setdefault("sip_responsive", True)
        service = super().start(listen, **overrides)
        self.responder = service.controller.responder
        return service

    @defer.inlineCallbacks
    def run_tool(self, name: str, *args: str):
        """Run *name* with *args* in the test's directory; returns ``(output, exit status)``."""
        path = require_tool(name)
        env = {"HOME": self.home, "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
        out, err, code = yield utils.getProcessOutputAndValue(path, args, env=env, path=self.home)
        return (out + err).decode("utf-8", "replace"), code


class SIPViciousTests(ResponsiveTestCase):
    @defer.inlineCallbacks
    def test_svmap_lists_persona_user_agent(self):
        """svmap finds the honeypot and shows the default persona's Server string; its OPTIONS
        is recorded as responsive."""
        self.start()
        output, code = yield self.run_tool("svmap", "-p", str(self.port("udp")), "127.0.0.1")
        self.assertEqual(code, 0, output)
        self.assertIn(f"127.0.0.1:{self.port('udp')}", output)
        self.assertIn(DEFAULT.agent, output)
        self.assertNotIn("Traceback", output)
        got = yield self.recorded()
        self.assertEqual([(r["method"], r["collected_method"]) for r in got],
                         [("OPTIONS", "responsive")])

    @defer.inlineCallbacks
    def test_svwar_enumerates_persona_extensions(self):
        """svwar -e100-110 runs to the end without crashing and reports exactly the persona's
        extensions in that range (100-105) as needing authentication; every REGISTER is recorded."""
        self.start()
        output, code = yield self.run_tool(
            "svwar", "-p", str(self.port("udp")), "-e100-110", "127.0.0.1"
        )
        self.assertEqual(code, 0, output)
        self.assertNotIn("Traceback", output)
        self.assertNotIn("svwar will probably not work", output)
        found = set(re.findall(r"^\|\s*(\d+)\s*\|\s*reqauth", output, re.MULTILINE))
        self.assertEqual(found, {str(n) for n in range(100, 106)}, output)
        got = yield self.recorded("method = 'REGISTER'")
        numbers = {r["called_number"] for r in got}
        self.assertTrue({str(n) for n in range(100, 111)} <= numbers, numbers)

    @defer.inlineCallbacks
    def test_svcrack_attempts_recorded_with_digest_username(self):
        """svcrack -u 100 -r 1000-1010 gets challenges, tries the username and the 11 passwords
        (each answered 403) and ends; the database holds those 12 attempts with auth_username 100
        and the persona's realm, and each digest response matches one of the guesses."""
        self.start()
        output, code = yield self.run_tool(
            "svcrack", "-p", str(self.port("udp")), "-u", "100", "-r", "1000-1010", "127.0.0.1"
        )
        self.assertEqual(code, 0, output)
        self.assertNotIn("Traceback", output)
        self.assertNotIn("unknown response", output)
        got = yield self.recorded("auth_username = '100'")
        guessed = set()
        for row in got:
            self.assertEqual(row["method"], "REGISTER")
            self.assertEqual(row["auth_realm"], DEFAULT.realm)
            self.assertEqual(row["collected_method"], "responsive")
            guessed.add(_guessed_password(row["sip_message_bytes"], CANDIDATES))
        # svcrack tries the username itself first, then the range.
        self.assertEqual(len(got), 12, output)
        self.assertEqual(guessed, set(CANDIDATES))


CANDIDATES = ["100"] + [str(n) for n in range(1000, 1011)]


def _guessed_password(message: bytes, candidates: list[str]) -> str | None:
    """The candidate password whose RFC 2617 §3.2.2 digest is the response in *message*."""
    line = re.search(rb"^Authorization: Digest (.*)$", message, re.MULTILINE).group(1).decode()
    params = dict(re.findall(r'(\w+)="?([^",]*)"?', line))
    ha2 = hashlib.md5(f"REGISTER:{params['uri']}".encode()).hexdigest()
    for password in candidates:
        ha1 = hashlib.md5(f"{params['username']}:{params['realm']}:{password}".encode()).hexdigest()
        if "qop" in params:
            data = f"{ha1}:{params['nonce']}:{params['nc']}:{params['cnonce']}:{params['qop']}:{ha2}"
        else:
            data = f"{ha1}:{params['nonce']}:{ha2}"
        if hashlib.md5(data.encode()).hexdigest() == params["response"]:
            return password
    return None


class SipsakAndSIPpTests(ResponsiveTestCase):
    @defer.inlineCallbacks
    def test_sipsak_options_udp_exit_0(self):
        """sipsak -s sip:100@127.0.0.1:PORT accepts the 200 OK and exits 0; one row."""
        self.start()
        output, code = yield self.run_tool(
            "sipsak", "-v", "-s", f"sip:100@127.0.0.1:{self.port('udp')}"
        )
        self.assertEqual(code, 0, output)
        self.assertIn("SIP/2.0 200 OK", output)
        self.assertIn(DEFAULT.agent, output)
        got = yield self.recorded()
        self.assertEqual(len(got), 1)

    @defer.inlineCallbacks
    def test_sipsak_options_tcp_exit_0(self):
        """The same over TCP: the reply is written on the connection."""
        self.start()
        output, code = yield self.run_tool(
            "sipsak", "-E", "tcp", "-s", f"sip:100@127.0.0.1:{self.port('tcp')}"
        )
        self.assertEqual(code, 0, output)

    def sipp(self, scenario: str, port: int, *extra: str):
        return self.run_tool(
            "sipp", "-sf", os.path.join(SIPP_DIR, scenario), "-s", "1000",
            f"127.0.0.1:{port}", "-m", "1", "-nostdin", "-recv_timeout", "15000",
            "-timeout", "30s", "-timeout_error", *extra,
        )

    @defer.inlineCallbacks
    def test_sipp_invite_100_then_challenge_then_ack(self):
        """tests/sipp/invite-challenge.xml: the INVITE gets 100 Trying then the default
        persona's 401; SIPp's ACK follows; both are recorded, the ACK with the INVITE's branch."""
        self.start()
        output, code = yield self.sipp("invite-challenge.xml", self.port("udp"), "-t", "u1")
        self.assertEqual(code, 0, output)
        got = yield self.recorded()
        self.assertEqual([r["method"] for r in got], ["INVITE", "ACK"])
        branch = re.compile(rb"branch=([^;\r\n]+)")
        self.assertEqual(branch.search(got[0]["sip_message_bytes"]).group(1),
                         branch.search(got[1]["sip_message_bytes"]).group(1))

    @defer.inlineCallbacks
    def test_sipp_invite_over_tcp(self):
        """The same scenario over TCP."""
        self.start()
        output, code = yield self.sipp("invite-challenge.xml", self.port("tcp"), "-t", "t1")
        self.assertEqual(code, 0, output)

    @defer.inlineCallbacks
    def test_sipp_cancel_gets_200_and_487(self):
        """tests/sipp/invite-cancel.xml with a "183-487" persona file: 100, 183, then the CANCEL
        gets 200 and the INVITE 487, and SIPp's ACK ends the call."""
        persona = os.path.abspath(self.mktemp()) + ".toml"
        with open(persona, "w") as f:
            f.write('base = "kamailio"\ninvite_response = "183-487"\nringing_seconds = 20\n')
        self.start(sip_persona=persona)
        output, code = yield self.sipp("invite-cancel.xml", self.port("udp"), "-t", "u1")
        self.assertEqual(code, 0, output)
        got = yield self.recorded()
        self.assertEqual([r["method"] for r in got], ["INVITE", "CANCEL", "ACK"])
        self.assertEqual(self.responder.stats.cancelled, 1)
        self.assertEqual(self.responder.pending, 0)


class NmapTests(ResponsiveTestCase):
    @defer.inlineCallbacks
    def test_nmap_version_scan_not_a_honeypot(self):
        """nmap -sV -sU on the SIP port never says honeypot: it identifies the default persona's
        product (FreePBX) from the reply to its SIPOptions probe."""
        self.start(listen=("udp:0:interface=127.0.0.1",))
        output, code = yield self.run_tool(
            "nmap", "-sV", "-sU", "-Pn", "-n", "-T4", "--max-retries", "1",
            "--version-intensity", "5", "-p", str(self.port("udp")), "127.0.0.1",
        )
        self.assertEqual(code, 0, output)
        self.assertNotIn("honeypot", output.lower())
        self.assertRegex(output, rf"{self.port('udp')}/udp\s+open\s+sip")
        self.assertIn("FreePBX", output)


#: Requests the flood keeps in flight at most (sent but not yet read by the honeypot): far below
#: what the honeypot's UDP receive buffer holds, so the sender follows the honeypot's pace and no
#: datagram is lost however loaded the machine is.
FLOOD_WINDOW = 32
#: Seconds without any progress after which the flood stops waiting (a lost datagram; the test then
#: fails on the recorded count rather than hanging).
FLOOD_STALL = 10.0


def _flood(port: int, sources: list[str], per_source: int, template: bytes,
           received) -> dict:
    """Send *per_source* distinct OPTIONS from each address of *sources*, half from each of two
    sockets bound to it, then collect replies for a second; returns ``{(address, port): replies}``.

    Paced by the honeypot itself: ``received()`` (read from this thread, a plain counter) says how
    many requests it has read, and at most :data:`FLOOD_WINDOW` are in flight. The test is about
    rate limiting and recording, not about the machine's peak rate (loss at peak rate is a
    benchmark matter).
    """
    sockets = []
    for address in sources:
        for _ in range(2):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            s.bind((address, 0))
            s.setblocking(False)
            sockets.append(s)
    counts = {s.getsockname(): 0 for s in sockets}

    def drain(timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            ready, _, _ = select.select(sockets, [], [], left)
            if not ready:
                return
            for s in ready:
                try:
                    while s.recv(65536):
                        counts[s.getsockname()] += 1
                except BlockingIOError:
                    pass

    try:
        n = 0
        lost = 0
        start = received()
        for _ in range(per_source // 2):
            for s in sockets:
                progress, last = received(), time.monotonic()
                while n - lost - (received() - start) >= FLOOD_WINDOW:
                    drain(0.002)
                    if received() != progress:
                        progress, last = received(), time.monotonic()
                    elif time.monotonic() - last > FLOOD_STALL:
                        lost = n - (received() - start)  # give up waiting for those
                n += 1
                data = template.replace(b"Call-ID: ", b"Call-ID: flood%d-" % n)
                s.sendto(data, ("127.0.0.1", port))
        drain(1.0)
    finally:
        for s in sockets:
            s.close()
    return counts


class ReflectionTests(ResponsiveTestCase):
    @defer.inlineCallbacks
    def test_spoofed_source_flood_is_rate_limited_but_recorded(self):
        """10,000 requests from 50 loopback addresses (two ports each, as a spoofer would vary
        them), sent as fast as the honeypot reads them, get at most the reply budget per
        destination address (burst of twice --reply-rate plus the rate times the elapsed time),
        every other reply is refused by the limiter, yet every request is recorded."""
        rate = 2.0
        self.start(listen=("udp:0:interface=127.0.0.1",), reply_rate=rate)
        sources = [f"127.77.{i // 250}.{i % 250 + 1}" for i in range(50)]
        template = corpus_bytes("scanners/svmap-0.3.3_options_udp.sip")
        stats = self.service.stats
        started = time.monotonic()
        counts = yield threads.deferToThread(_flood, self.port("udp"), sources, 200, template,
                                             lambda: stats.total("received"))
        elapsed = time.monotonic() - started
        per_address = {}
        for (address, _), n in counts.items():
            per_address[address] = per_address.get(address, 0) + n
        budget = 2 * rate + rate * elapsed
        self.assertEqual(len(per_address), 50)
        for address, n in per_address.items():
            self.assertLessEqual(n, budget, f"{address} got {n} replies in {elapsed:.1f} s")
            self.assertGreaterEqual(n, 1, f"{address} got no reply at all")
        got = yield self.recorded()
        self.assertEqual(len(got), 10_000)
        self.assertEqual(self.service.stats.total("received"), 10_000)
        # replies still in flight when the sender stopped listening are sent but not counted
        sent, limited = self.responder.stats.sent, self.responder.stats.limited
        self.assertGreaterEqual(sent, sum(counts.values()))
        self.assertLessEqual(sent, 50 * budget)
        self.assertEqual(sent + limited, 10_000)


def _probe(address, port, data, bind="127.0.0.1"):
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.bind((bind, 0))
        s.settimeout(5)
        s.sendto(data, (address, port))
        reply, sender = s.recvfrom(65536)
        return reply, sender


class ReplySourceTests(ResponsiveTestCase):
    @defer.inlineCallbacks
    def test_reply_leaves_from_the_probed_address(self):
        """On a wildcard :: socket a probe sent to 127.0.0.2 is answered from 127.0.0.2 (sendmsg
        with packet info), to the probe's source port, not to its Via sent-by."""
        self.start(listen=("udp:0:interface=::",))
        data = corpus_bytes("scanners/svmap-0.3.3_options_udp.sip")  # Via says port 5061
        reply, sender = yield threads.deferToThread(_probe, "127.0.0.2", self.port("udp"), data)
        self.assertEqual(sender, ("127.0.0.2", self.port("udp")))
        self.assertTrue(reply.startswith(b"SIP/2.0 200 OK\r\n"))
        self.assertIn(b";received=127.0.0.1", reply)

    @defer.inlineCallbacks
    def test_reply_source_ipv4_wildcard(self):
        """The same on an IPv4 wildcard socket (IP_PKTINFO)."""
        self.start(listen=("udp:0:interface=0.0.0.0",))
        data = corpus_bytes("scanners/sipsak-0.9.8.1_options_udp.sip")
        reply, sender = yield threads.deferToThread(_probe, "127.0.0.3", self.port("udp"), data)
        self.assertEqual(sender, ("127.0.0.3", self.port("udp")))
        self.assertIn(b"rport=", reply)

    @defer.inlineCallbacks
    def test_reply_over_ipv6(self):
        """On a wildcard :: socket an IPv6 probe to ::1 is answered from ::1 (IPV6_PKTINFO), with
        received=::1 in the top Via (no brackets, RFC 3261 §18.2.1)."""
        self.start(listen=("udp:0:interface=::",))
        data = corpus_bytes("scanners/svmap-0.3.3_options_udp.sip")
        reply, sender = yield threads.deferToThread(_probe, "::1", self.port("udp"), data, "::1")
        self.assertEqual(sender[:2], ("::1", self.port("udp")))
        self.assertIn(b";received=::1\r\n", reply)
