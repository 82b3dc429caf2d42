"""Tests for :mod:`sentrypeer.syslog` and the shipped Fail2ban filter and jail."""

from __future__ import annotations

import configparser
import os
import socket
import time

from twisted.internet import reactor, task, utils
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from sentrypeer.syslog import MAX_AGENT, PRI, SyslogService, escape_field, format_message

from .support import require_tool
from .test_outputs import (
    corpus_events,
    listen_datagram,
    log_text,
    make_event,
    short_tempdir,
    wait_for,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILTER = os.path.join(ROOT, "contrib", "fail2ban", "filter.d", "sentrypeer.conf")
JAIL = os.path.join(ROOT, "contrib", "fail2ban", "jail.d", "sentrypeer.conf")
DECOY = "198.51.100.9"

#: Attacker text trying to make a filter match DECOY instead of the real source address.
INJECTIONS = [
    dict(sip_user_agent=f"x, Source IP: {DECOY}"),
    dict(sip_user_agent=f"x\r\nNov 30 21:32:16 host sentrypeer[1]: Source IP: {DECOY}, Method: "
                        f"INVITE, Agent: y"),
    dict(sip_user_agent=f"x\nsentrypeer[1]: Source IP: {DECOY}, Method: INVITE, Agent: y"),
    dict(sip_method=f"INVITE, Source IP: {DECOY}, Method: INVITE"),
    dict(sip_method=f"X\rsentrypeer[1]: Source IP: {DECOY}, Method: Y"),
    dict(sip_user_agent="x, Source IP: 2001:db8::bad, Method: OPTIONS"),
    dict(sip_user_agent=f"\u2028sentrypeer[1]: Source IP: {DECOY}, Method: Y\x85"),
]


class FormatTests(SynchronousTestCase):
    def test_message_format(self):
        """The datagram is ``<13>sentrypeer[PID]: Source IP: <ip>, Method: <m>, Agent: <ua>``:
        facility USER (1), severity NOTICE (5), the original's text, no trailing newline."""
        self.assertEqual(PRI, 13)
        event = make_event(source_ip="144.21.55.36", sip_user_agent="sipsak 0.9.7")
        self.assertEqual(
            format_message(event, 303741),
            b"<13>sentrypeer[303741]: Source IP: 144.21.55.36, Method: OPTIONS, Agent: sipsak 0.9.7",
        )

    def test_ipv6_and_mapped(self):
        """IPv6 sources are shown bare, canonical; IPv4-mapped addresses as IPv4."""
        self.assertIn(
            b"Source IP: 2001:db8::7, ",
            format_message(make_event(source_ip="2001:0db8:0:0::7"), 1),
        )
        self.assertIn(
            b"Source IP: 192.0.2.1, ", format_message(make_event(source_ip="::ffff:192.0.2.1"), 1)
        )

    def test_not_an_address(self):
        """A source_ip that is not an IP address (a peer's bad value) gives no line at all."""
        for value in ("203.0.113.7:5060", "x, Source IP: 198.51.100.9", "", "NOT_FOUND"):
            self.assertIsNone(format_message(make_event(source_ip=value), 1))

    def test_attacker_text_escaped(self):
        """Control characters, non-ASCII, ``\\`` and ``:`` in attacker text become \\xNN,
        \\uNNNN, \\UNNNNNNNN escapes: the line is one line of printable ASCII."""
        self.assertEqual(escape_field("a\nb\r\x00\x1b\x7f", 99), "a\\x0ab\\x0d\\x00\\x1b\\x7f")
        self.assertEqual(escape_field("é\u202e😀", 99), "\\xe9\\u202e\\U0001f600")
        self.assertEqual(escape_field("a\\x0a:b", 99), "a\\x5cx0a\\x3ab")
        self.assertEqual(escape_field("Mozilla/5.0 (X; rv 1) ok", 99), "Mozilla/5.0 (X; rv 1) ok")
        self.assertEqual(escape_field(None, 9), "NOT_FOUND")
        for fields in INJECTIONS:
            line = format_message(make_event(**fields), 1)
            text = line.decode("ascii")
            self.assertTrue(text.isprintable(), text)
            self.assertEqual(text.count(":"), 4, text)  # tag, Source IP, Method, Agent

    def test_long_text_cut(self):
        """A long user agent is cut at MAX_AGENT characters and ends in ``...``; the datagram
        stays small."""
        line = format_message(make_event(sip_user_agent="A" * 5000, sip_method="M" * 5000), 1)
        self.assertTrue(line.endswith(b"A" * MAX_AGENT + b"..."))
        self.assertLess(len(line), 1024)

    def test_corpus_events(self):
        """Every corpus event gives one printable-ASCII line with the source address."""
        for name, events in corpus_events():
            for event in events:
                line = format_message(event, 7).decode("ascii")
                self.assertTrue(line.isprintable(), name)
                self.assertTrue(line.startswith("<13>sentrypeer[7]: Source IP: 192.0.2.1, "), name)


class ServiceTests(SynchronousTestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.observer = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self.path = os.path.join(os.path.abspath(self.mktemp()), "log")

    def test_missing_socket_one_warning_retries(self):
        """No socket (a container without /dev/log): start does not fail, one warning is logged,
        new attempts follow after 0.2 s, doubling up to every 30 s, without new warnings; lines
        are dropped and counted (no receiver was ever reached, so none are kept), and their
        number is logged at stop.  (Attempts used to be every 30 s from the start, which left a
        late syslog daemon without lines for half a minute.)"""
        service = SyslogService(self.path, reactor=self.clock, pid=1)
        service.startService()
        self.assertFalse(service.connected)
        delays = []
        for _ in range(12):
            (call,) = self.clock.getDelayedCalls()
            delays.append(round(call.getTime() - self.clock.seconds(), 3))
            service(make_event(), False)
            self.clock.advance(delays[-1])
        self.assertEqual(delays, [0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 12.8, 25.6, 30, 30, 30, 30])
        self.assertEqual((service.dropped, service.sent, service.pending), (12, 0, 0))
        warnings = log_text(self.observer, LogLevel.warn)
        self.assertEqual(len(warnings), 1)
        self.assertIn(self.path, warnings[0])
        self.assertIn("retrying in 0.2 s, then at growing intervals of up to 30 s", warnings[0])
        service.stopService()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertIn("12 line(s) were not sent", " ".join(log_text(self.observer, LogLevel.info)))

    def test_not_a_socket(self):
        """A path that is not a socket is treated like a missing one (warning, retry)."""
        os.makedirs(os.path.dirname(self.path))
        with open(self.path, "w"):
            pass
        service = SyslogService(self.path, reactor=self.clock)
        service.startService()
        self.assertFalse(service.connected)
        self.assertIn("not a socket", log_text(self.observer, LogLevel.warn)[0])
        service.stopService()

    def test_peers_skipped_by_default(self):
        """Replicated (peer) events are skipped without include_peers (--syslog-peers)."""
        service = SyslogService(self.path, reactor=self.clock)
        service(make_event(), True)
        self.assertEqual((service.skipped, service.dropped), (1, 0))

    def test_invalid_address_counted(self):
        """An event whose source is not an IP address is counted as invalid and not sent."""
        service = SyslogService(self.path, reactor=self.clock)
        service(make_event(source_ip="nonsense"), False)
        self.assertEqual((service.invalid, service.dropped), (1, 0))

    def test_never_raises(self):
        """An unexpected failure is counted and logged once, never raised into the pipeline."""
        service = SyslogService(self.path, reactor=self.clock)
        service(make_event(sip_method=12), False)
        service(make_event(sip_method=12), False)
        self.assertEqual(service.errors, 2)
        self.assertEqual(len(self.flushLoggedErrors(TypeError)), 1)


class FakePort:
    """A connected datagram port whose receiver takes *capacity* more datagrams (``None``: all),
    or refuses them (the receiver went away)."""

    def __init__(self, protocol) -> None:
        self.protocol = protocol
        self.received: list[bytes] = []
        self.capacity: int | None = None
        self.refuse = False
        self.closed = False

    def write(self, data):
        if self.refuse:
            self.protocol.connectionRefused()  # as Twisted does on ECONNREFUSED
            return None
        if self.capacity is not None:
            if self.capacity <= 0:
                return None  # EAGAIN, swallowed by Twisted
            self.capacity -= 1
        self.received.append(data)
        return len(data)

    def stopListening(self):
        self.closed = True


class FakeReactor(task.Clock):
    """A clock whose connectUNIXDatagram gives FakePorts (the path must still be a socket)."""

    def __init__(self) -> None:
        super().__init__()
        self.ports: list[FakePort] = []

    def connectUNIXDatagram(self, path, protocol, **kwargs):
        port = FakePort(protocol)
        self.ports.append(port)
        return port


class BufferTests(SynchronousTestCase):
    """The waiting lines of a busy or restarting receiver, with a fake port and clock."""

    def setUp(self):
        self.reactor = FakeReactor()
        self.observer = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self.path = os.path.join(short_tempdir(self), "log")
        self.bind()

    def bind(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.addCleanup(self.sock.close)
        self.sock.bind(self.path)

    def start(self, **kwargs) -> SyslogService:
        service = SyslogService(self.path, reactor=self.reactor, pid=1, **kwargs)
        service.startService()
        self.addCleanup(lambda: service.stopService() if service.running else None)
        return service

    def test_busy_receiver_lines_wait_in_order(self):
        """A receiver that takes nothing for a while: lines wait in memory, none dropped; they
        are offered again after 10 ms, then 20, 40, 50, 50 ms while it stays busy, and all
        arrive in order once it takes them; one line starts the busy episode and one ends it
        with the count (the original of this port dropped every such line)."""
        service = self.start()
        port = self.reactor.ports[0]
        port.capacity = 0
        events = [make_event(sip_user_agent=f"ua-{n}") for n in range(100)]
        for event in events:
            service(event, False)
        self.assertEqual((service.sent, service.pending, service.dropped), (0, 100, 0))
        delays = []
        for _ in range(5):
            (call,) = [c for c in self.reactor.getDelayedCalls() if c.func == service._flush]
            delays.append(round(call.getTime() - self.reactor.seconds(), 3))
            self.reactor.advance(delays[-1])
        self.assertEqual(delays, [0.01, 0.02, 0.04, 0.05, 0.05])
        port.capacity = None
        self.reactor.advance(0.05)
        self.assertEqual(port.received, [format_message(e, 1) for e in events])
        self.assertEqual((service.sent, service.pending, service.dropped), (100, 0, 0))
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        lines = log_text(self.observer)
        self.assertEqual(len([t for t in lines if "is busy" in t]), 1)
        self.assertIn("syslog receiver: back to normal after 100 line(s) delayed", lines[-1])

    def test_receiver_at_its_limit_logs_bounded(self):
        """A receiver that takes one line per 10 ms while two arrive, for 3 minutes: the buffer
        fills, then drops are counted; the busy and buffer-full episodes are each logged once at
        their start and then at most once a minute, never per line; once the receiver catches
        up each logs one line with its total."""
        service = self.start(max_pending=1000)
        port = self.reactor.ports[0]
        for _ in range(18_000):
            port.capacity = 1
            service(make_event(), False)
            service(make_event(), False)
            self.reactor.advance(0.01)
        self.assertGreater(service.dropped, 10_000)
        self.assertEqual(service.sent + service.pending + service.dropped, 36_000)
        lines = log_text(self.observer)
        self.assertLessEqual(len(lines), 1 + 2 + 2 * 3)
        self.assertNotIn("back to normal", " ".join(lines))
        port.capacity = None
        self.reactor.advance(0.05)
        self.assertEqual(service.pending, 0)
        info = " ".join(log_text(self.observer, LogLevel.info))
        self.assertIn(f"syslog buffer: back to normal after {service.dropped} line(s) dropped", info)
        self.assertIn("syslog receiver: back to normal after", info)
        self.assertLessEqual(len(log_text(self.observer)), 1 + 2 + 2 * 3 + 2)

    def test_buffer_full_drops_counted_and_reported(self):
        """Only a full buffer drops lines: counted, one warning, the later drops summed up
        within a minute even if nothing else happens."""
        service = self.start(max_pending=10)
        self.reactor.ports[0].capacity = 0
        for _ in range(25):
            service(make_event(), False)
        self.assertEqual((service.pending, service.dropped), (10, 15))
        warnings = log_text(self.observer, LogLevel.warn)
        self.assertEqual(len(warnings), 1)
        self.assertIn("new lines are dropped", warnings[0])
        self.reactor.advance(60)
        self.assertIn("syslog buffer: 14 line(s) dropped (buffer full) in the last minute "
                      "(still failing)", " ".join(log_text(self.observer, LogLevel.warn)))

    def test_stop_counts_waiting_lines(self):
        """At stop the waiting lines are offered once more; those not taken are counted as
        dropped and logged; no timer is left."""
        service = self.start()
        port = self.reactor.ports[0]
        port.capacity = 0
        for _ in range(5):
            service(make_event(), False)
        port.capacity = 2
        service.stopService()
        self.assertEqual((service.sent, service.dropped, service.pending), (2, 3, 0))
        self.assertIn("3 line(s) not delivered", " ".join(log_text(self.observer, LogLevel.warn)))
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_receiver_restart_reconnects_soon_and_keeps_lines(self):
        """The receiver goes away (ECONNREFUSED, its socket removed): one warning, new attempts
        after 0.2, 0.4, 0.8 s...; the lines produced meanwhile wait and arrive in order, before
        the later ones, as soon as the socket is back (it used to be a fixed 30 s, with those
        lines dropped)."""
        service = self.start()
        first = self.reactor.ports[0]
        service(make_event(sip_user_agent="before"), False)
        first.refuse = True
        self.sock.close()
        os.unlink(self.path)
        service(make_event(sip_user_agent="down-1"), False)
        self.assertFalse(service.connected)
        self.assertTrue(first.closed)
        attempts = []
        for _ in range(3):
            (call,) = self.reactor.getDelayedCalls()
            attempts.append(round(call.getTime(), 3))
            self.reactor.advance(call.getTime() - self.reactor.seconds())
            service(make_event(sip_user_agent=f"down-{len(attempts) + 1}"), False)
        self.assertEqual(attempts, [0.2, 0.6, 1.4])
        self.assertEqual((service.pending, service.dropped, len(self.reactor.ports)), (4, 0, 1))
        self.bind()
        self.reactor.advance(1.6)
        second = self.reactor.ports[1]
        service(make_event(sip_user_agent="after"), False)
        agents = [d.split(b"Agent: ")[1].decode() for d in second.received]
        self.assertEqual(agents, ["down-1", "down-2", "down-3", "down-4", "after"])
        self.assertEqual((service.reconnects, service.sent, service.pending), (1, 6, 0))
        warnings = log_text(self.observer, LogLevel.warn)
        self.assertEqual(len(warnings), 1)
        self.assertIn("lost the socket", warnings[0])


def read_available(sock: socket.socket, received: list[bytes], most: int) -> None:
    """Read at most *most* datagrams that are waiting on the non-blocking *sock*."""
    for _ in range(most):
        try:
            received.append(sock.recv(4096))
        except BlockingIOError:
            return


class RealSocketTests(TestCase):
    def setUp(self):
        self.directory = short_tempdir(self)
        self.path = os.path.join(self.directory, "log")

    def start(self, **kwargs) -> SyslogService:
        service = SyslogService(self.path, reactor=reactor, **kwargs)
        service.startService()
        self.addCleanup(lambda: service.stopService() if service.running else None)
        return service

    async def test_datagram_received(self):
        """Through the Twisted UNIX datagram transport the receiver gets exactly the RFC 3164
        datagram, collected events only by default."""
        receiver = listen_datagram(self, self.path)
        service = self.start(pid=123)
        self.assertTrue(service.connected)
        service(make_event(source_ip="203.0.113.7", sip_user_agent="sipsak 0.9.7"), False)
        service(make_event(source_ip="203.0.113.8"), True)
        await wait_for(lambda: receiver.datagrams)
        await task.deferLater(reactor, 0.05)
        self.assertEqual(
            receiver.datagrams,
            [b"<13>sentrypeer[123]: Source IP: 203.0.113.7, Method: OPTIONS, Agent: sipsak 0.9.7"],
        )
        self.assertEqual((service.sent, service.skipped), (1, 1))

    async def test_peers_with_include_peers(self):
        """With include_peers (--syslog-peers) replicated events are sent too."""
        receiver = listen_datagram(self, self.path)
        service = self.start(include_peers=True)
        service(make_event(source_ip="203.0.113.8"), True)
        await wait_for(lambda: receiver.datagrams)
        self.assertIn(b"Source IP: 203.0.113.8,", receiver.datagrams[0])

    async def test_socket_appears_later(self):
        """A socket created after start is connected on a later attempt; lines then arrive."""
        service = self.start(retry_interval=0.05)
        service(make_event(), False)
        self.assertEqual(service.dropped, 1)
        receiver = listen_datagram(self, self.path)
        await wait_for(lambda: service.connected)
        service(make_event(), False)
        await wait_for(lambda: receiver.datagrams)
        self.assertEqual(service.sent, 1)

    async def test_receiver_restart(self):
        """When the receiver restarts (its socket re-created), the next line reconnects at once
        and is delivered to the new socket."""
        first = listen_datagram(self, self.path)
        service = self.start()
        service(make_event(source_ip="203.0.113.1"), False)
        await wait_for(lambda: first.datagrams)
        await first.port.stopListening()
        if os.path.exists(self.path):
            os.unlink(self.path)
        second = listen_datagram(self, self.path)
        service(make_event(source_ip="203.0.113.2"), False)
        await wait_for(lambda: second.datagrams)
        self.assertIn(b"Source IP: 203.0.113.2,", second.datagrams[0])
        self.assertEqual(service.reconnects, 1)
        self.assertEqual(service.sent, 2)

    def test_busy_receiver_never_blocks(self):
        """A receiver that does not read: once its queue is full, lines wait in memory instead
        of being dropped (they used to be dropped on EAGAIN); the sender never blocks."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.addCleanup(sock.close)
        sock.bind(self.path)
        service = self.start()
        started = time.monotonic()
        for _ in range(2000):
            service(make_event(), False)
        self.assertLess(time.monotonic() - started, 2.0)
        self.assertGreater(service.sent, 0)
        self.assertGreater(service.pending, 0)
        self.assertEqual(service.sent + service.pending, 2000)
        self.assertEqual((service.dropped, service.errors), (0, 0))
        self.assertTrue(service.connected)

    async def test_slow_reader_gets_every_line_in_order(self):
        """A real receiver that reads in bursts (up to 50 datagrams every 5 ms, its queue holding
        net.unix.max_dgram_qlen of them) gets every line of a 5,000-event burst, in order; the
        burst itself never waits for it."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.addCleanup(sock.close)
        sock.bind(self.path)
        sock.setblocking(False)
        service = self.start(pid=5)
        events = [make_event(sip_user_agent=f"ua-{n:05d}") for n in range(5000)]
        started = time.monotonic()
        for event in events:
            service(event, False)
        self.assertLess(time.monotonic() - started, 5.0)
        received: list[bytes] = []
        deadline = time.monotonic() + 60
        while len(received) < 5000 and time.monotonic() < deadline:
            await task.deferLater(reactor, 0.005)
            read_available(sock, received, 50)
        self.assertEqual(received, [format_message(e, 5) for e in events])
        self.assertEqual((service.sent, service.dropped, service.pending), (5000, 0, 0))

    async def test_receiver_killed_and_restarted(self):
        """The receiver's socket is closed and removed, then re-created 1 s later: the line
        produced while it was down and one produced after the restart both arrive, in order,
        within a couple of seconds (reconnection after 0.2 s, doubling; it used to be 30 s)."""
        first = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.addCleanup(first.close)
        first.bind(self.path)
        first.settimeout(5)
        service = self.start(pid=6)
        service(make_event(sip_user_agent="before"), False)
        self.assertEqual(first.recv(4096).split(b"Agent: ")[1], b"before")
        first.close()
        os.unlink(self.path)
        service(make_event(sip_user_agent="while-down"), False)
        await task.deferLater(reactor, 1.0)
        second = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.addCleanup(second.close)
        second.bind(self.path)
        second.setblocking(False)
        restarted = time.monotonic()
        service(make_event(sip_user_agent="after"), False)
        received: list[bytes] = []
        await wait_for(lambda: read_available(second, received, 10) or len(received) >= 2,
                       timeout=2.0)
        self.assertLess(time.monotonic() - restarted, 2.0)
        self.assertEqual([d.split(b"Agent: ")[1] for d in received], [b"while-down", b"after"])
        self.assertEqual((service.sent, service.dropped, service.reconnects), (3, 0, 1))


class Fail2banTests(TestCase):
    """The product's datagrams, as a syslog file and the journal show them, checked with
    fail2ban-regex against the shipped filter."""

    ATTACKERS = ["203.0.113.7", "2001:db8::7", "203.0.113.8", "2001:db8:1::42"]

    async def received_lines(self) -> list[str]:
        directory = short_tempdir(self)
        path = os.path.join(directory, "log")
        receiver = listen_datagram(self, path)
        service = SyslogService(path, reactor=reactor, pid=4242)
        service.startService()
        self.addCleanup(lambda: service.stopService() if service.running else None)
        sources = []
        for n, fields in enumerate(INJECTIONS):
            source = self.ATTACKERS[n % len(self.ATTACKERS)]
            service(make_event(source_ip=source, **fields), False)
            sources.append(source)
        for source in self.ATTACKERS:
            service(make_event(source_ip=source), False)
            sources.append(source)
        # A peer's event about the decoy is not sent without --syslog-peers.
        service(make_event(source_ip=DECOY), True)
        await wait_for(lambda: len(receiver.datagrams) == len(sources))
        await task.deferLater(reactor, 0.05)
        self.assertEqual(len(receiver.datagrams), len(sources))
        lines = []
        for datagram in receiver.datagrams:
            text = datagram.decode("ascii")
            self.assertTrue(text.startswith("<13>sentrypeer[4242]: "))
            lines.append(text[len("<13>"):])
        self.sources = sources
        return lines

    async def fail2ban_matches(self, log_lines: list[str]) -> list[str]:
        tool = require_tool("fail2ban-regex")
        log_file = os.path.abspath(self.mktemp())
        with open(log_file, "w", encoding="ascii") as f:
            f.write("".join(line + "\n" for line in log_lines))
        out, err, code = await utils.getProcessOutputAndValue(
            tool, ["-r", "-o", "ip", log_file, FILTER], env=dict(os.environ)
        )
        self.assertEqual(code, 0, err)
        return out.decode().split()

    async def test_syslog_file_format(self):
        """Lines as rsyslog writes them (``Nov 30 21:32:16 host sentrypeer[PID]: ...``): the
        filter finds exactly the attackers' addresses, IPv4 and IPv6, never the decoy from
        attacker text or from a peer."""
        lines = await self.received_lines()
        matched = await self.fail2ban_matches([f"Nov 30 21:32:16 host {line}" for line in lines])
        self.assertEqual(matched, self.sources)
        self.assertNotIn(DECOY, matched)

    async def test_high_precision_syslog_file_format(self):
        """Lines with an RFC 3339 time stamp (rsyslog's high-precision file format) match too."""
        lines = await self.received_lines()
        matched = await self.fail2ban_matches(
            [f"2025-11-30T21:32:16.123456+00:00 host {line}" for line in lines]
        )
        self.assertEqual(matched, self.sources)

    async def test_journal_format(self):
        """Lines as Fail2ban's systemd backend builds them (``host sentrypeer[PID]: MESSAGE``) and
        the bare ``sentrypeer[PID]: MESSAGE`` form: exactly the attackers' addresses."""
        lines = await self.received_lines()
        matched = await self.fail2ban_matches([f"honeypot {line}" for line in lines] + lines)
        self.assertEqual(matched, self.sources + self.sources)
        self.assertNotIn(DECOY, matched)

    async def test_unescaped_injection_would_not_match_decoy(self):
        """Defence in depth, should escaping ever fail: the filter is anchored, so a decoy after
        the real prefix on the same line, a continuation line that does not start with a host
        and the tag, or a tag inside another program's line never match."""
        matched = await self.fail2ban_matches([
            "Nov 30 21:32:16 host sentrypeer[1]: Source IP: 203.0.113.7, Method: OPTIONS, "
            f"Agent: x, Source IP: {DECOY}, Method: OPTIONS",
            f"Agent tail, sentrypeer[1]: Source IP: {DECOY}, Method: OPTIONS",
            f"Nov 30 21:32:16 host other[1]: x sentrypeer[1]: Source IP: {DECOY}, Method: OPTIONS",
        ])
        self.assertEqual(matched, ["203.0.113.7"])


class JailTests(SynchronousTestCase):
    def test_jail_reads_the_journal(self):
        """The example jail uses the shipped filter on the systemd journal, matching SentryPeer's
        identifier, and documents the file backend in comments."""
        parser = configparser.ConfigParser(interpolation=None)
        parser.read(JAIL)
        jail = parser["sentrypeer"]
        self.assertEqual(jail["filter"], "sentrypeer")
        self.assertEqual(jail["backend"], "systemd")
        self.assertEqual(jail["journalmatch"], "SYSLOG_IDENTIFIER=sentrypeer")
        self.assertEqual(jail["enabled"], "true")
        with open(JAIL) as f:
            text = f.read()
        self.assertIn("#logpath = /var/log/syslog", text)

    def test_filter_is_anchored(self):
        """The filter's failregex is anchored at the line start and uses <ADDR> (no DNS)."""
        parser = configparser.ConfigParser(interpolation=None)
        parser.read(FILTER)
        regex = parser["Definition"]["failregex"]
        self.assertTrue(regex.startswith("^"))
        self.assertIn("sentrypeer\\[\\d+\\]: Source IP: <ADDR>, Method:", regex)
