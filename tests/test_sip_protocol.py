"""Tests for the SIP controller and the UDP/TCP/TLS protocols, with Twisted's in-memory fakes."""

from __future__ import annotations

from OpenSSL import SSL
from twisted.internet import task
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from sentrypeer.events import NOT_FOUND
from sentrypeer.sip.controller import SIPController, normalise_address
from sentrypeer.sip.protocol import SIPDatagramProtocol, SIPStreamFactory

from .support import ANY, ListSink, corpus_bytes, corpus_rows

NODE = "11111111-2222-4333-8444-555555555555"
OPTIONS = (
    b"OPTIONS sip:100@127.0.0.1 SIP/2.0\r\n"
    b"Via: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK-1\r\n"
    b"From: <sip:a@127.0.0.1>;tag=1\r\nTo: <sip:100@127.0.0.1>\r\n"
    b"Call-ID: c1\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n"
)


def make_controller(**kwargs):
    clock = task.Clock()
    sink = ListSink(kwargs.pop("accept", True))
    controller = SIPController(node_id=NODE, sink=sink, clock=clock, **kwargs)
    return controller, sink, clock


def send_udp(controller, data, source=("203.0.113.7", 5071), dest=("198.51.100.2", 5060)):
    SIPDatagramProtocol(controller).packetReceived(data, source, dest)


def open_stream(controller, transport_type="TCP", peer=("203.0.113.7", 40001)):
    protocol = SIPStreamFactory(controller, transport_type).buildProtocol(None)
    transport = StringTransport(
        hostAddress=IPv4Address("TCP", "198.51.100.2", 5060),
        peerAddress=IPv4Address("TCP", *peer),
    )
    protocol.makeConnection(transport)
    return protocol, transport


def feed(protocol, data, one_byte_at_a_time=False):
    if one_byte_at_a_time:
        for i in range(len(data)):
            protocol.dataReceived(data[i : i + 1])
    else:
        protocol.dataReceived(data)


class CorpusMixin:
    def assertEventsMatch(self, row, events, label):
        self.assertEqual(len(events), row["events"], f"{label}: event count")
        for i, event in enumerate(events):
            for key in ("sip_method", "called_number", "sip_user_agent", "parse_status"):
                values = row[key]
                # a single value (e.g. "*") stands for every event of the row
                want = values[i] if len(values) > 1 else values[0]
                if want != ANY:
                    self.assertEqual(getattr(event, key), want, f"{label}: event {i} {key}")


class UDPCorpusTests(SynchronousTestCase, CorpusMixin):
    def test_corpus_over_udp(self):
        """Every corpus file sent as one datagram gives the events of expected.tsv, with the
        exact bytes, the source and destination addresses and ports kept."""
        for row in corpus_rows():
            if row["transport"] != "udp":
                continue
            controller, sink, _ = make_controller()
            data = corpus_bytes(row["file"])
            send_udp(controller, data)
            self.assertEventsMatch(row, sink.events, row["file"] + " udp")
            for event in sink.events:
                self.assertEqual(event.sip_message_bytes, data)
                self.assertEqual(event.transport_type, "UDP")
                self.assertEqual(
                    (event.source_ip, event.source_port), ("203.0.113.7", 5071)
                )
                self.assertEqual(
                    (event.destination_ip, event.destination_port), ("198.51.100.2", 5060)
                )
                self.assertEqual(event.created_by_node_id, NODE)
                self.assertEqual(event.collected_method, "passive")
            self.assertEqual(controller.stats.internal_errors, 0)

    def test_keepalive_and_empty_not_recorded(self):
        """Empty datagrams, CRLF and CRLFCRLF are counted as keep-alives, never recorded."""
        controller, sink, _ = make_controller()
        for data in (b"", b"\r\n", b"\r\n\r\n"):
            send_udp(controller, data)
        self.assertEqual(sink.events, [])
        self.assertEqual(controller.stats.keepalives, 3)
        self.assertEqual(controller.stats.datagrams, 3)

    def test_response_not_recorded(self):
        """A SIP response is counted, not recorded (the original crashed on one, §14.2)."""
        controller, sink, _ = make_controller()
        send_udp(controller, b"SIP/2.0 200 OK\r\nCall-ID: x\r\nCSeq: 1 OPTIONS\r\n\r\n")
        self.assertEqual(sink.events, [])
        self.assertEqual(controller.stats.responses, 1)
        self.assertEqual(controller.stats.total("received"), 0)

    def test_retransmission_counted_not_recorded(self):
        """The same request from the same source within 32 s is a retransmission (RFC 3261
        §17.2); after the window it is a new event."""
        controller, sink, clock = make_controller()
        send_udp(controller, OPTIONS)
        clock.advance(31)
        send_udp(controller, OPTIONS)
        self.assertEqual(len(sink.events), 1)
        self.assertEqual(controller.stats.retransmissions, 1)
        clock.advance(2)
        send_udp(controller, OPTIONS)
        self.assertEqual(len(sink.events), 2)

    def test_retransmission_key_includes_source_port_and_method(self):
        """A different source port, or an ACK with the INVITE's branch, is a new transaction."""
        controller, sink, _ = make_controller()
        send_udp(controller, OPTIONS, source=("203.0.113.7", 5071))
        send_udp(controller, OPTIONS, source=("203.0.113.7", 5072))
        send_udp(controller, OPTIONS.replace(b"1 OPTIONS", b"1 ACK").replace(b"OPTIONS sip", b"ACK sip"))
        self.assertEqual(len(sink.events), 3)
        self.assertEqual(controller.stats.retransmissions, 0)

    def test_transaction_memory_is_bounded(self):
        """At most max_transactions are remembered (at least 7/8 of them: a generation of the
        oldest is forgotten at once); the oldest are forgotten first."""
        controller, sink, _ = make_controller(max_transactions=16)
        for i in range(50):
            send_udp(controller, OPTIONS.replace(b"Call-ID: c1", b"Call-ID: c%d" % i))
        self.assertLessEqual(len(controller._transactions), 16)
        self.assertGreaterEqual(len(controller._transactions), 14)
        self.assertEqual(len(sink.events), 50)
        send_udp(controller, OPTIONS.replace(b"Call-ID: c1", b"Call-ID: c49"))  # remembered
        send_udp(controller, OPTIONS.replace(b"Call-ID: c1", b"Call-ID: c0"))  # forgotten
        self.assertEqual(controller.stats.retransmissions, 1)
        self.assertEqual(len(sink.events), 51)

    def test_transaction_window(self):
        """A retransmission is absorbed for 32 s (RFC 3261 §17.2: 64*T1) and at most 32 + 32/8 s
        after the transaction's generation last took a key; later it is a new event."""
        controller, sink, clock = make_controller()
        send_udp(controller, OPTIONS)
        clock.advance(31.9)
        send_udp(controller, OPTIONS)
        self.assertEqual((len(sink.events), controller.stats.retransmissions), (1, 1))
        other = OPTIONS.replace(b"Call-ID: c1", b"Call-ID: c2")
        send_udp(controller, other)  # a new generation (4 s passed), seen at 31.9 s
        clock.advance(4.2)  # 36.1 s: the first generation is gone
        send_udp(controller, OPTIONS)
        self.assertEqual((len(sink.events), controller.stats.retransmissions), (3, 1))
        clock.advance(27.7)  # 63.8 s: "other" is 31.9 s old
        send_udp(controller, other)
        self.assertEqual(controller.stats.retransmissions, 2)
        clock.advance(0.2)  # 32.1 s
        send_udp(controller, other)
        self.assertEqual((len(sink.events), controller.stats.retransmissions), (4, 2))

    def test_dropped_event_counted(self):
        """When the sink refuses (full write queue) the drop is counted, not recorded."""
        controller, sink, _ = make_controller(accept=False)
        send_udp(controller, OPTIONS)
        self.assertEqual(controller.stats.dropped, 1)
        self.assertEqual(controller.stats.total("recorded"), 0)

    def test_ipv4_mapped_source_normalised(self):
        """IPv4-mapped IPv6 addresses from a dual-stack socket are stored as IPv4."""
        controller, sink, _ = make_controller()
        send_udp(controller, OPTIONS, source=("::ffff:203.0.113.9", 5071),
                 dest=("::ffff:127.0.0.1", 5060))
        self.assertEqual(sink.events[0].source_ip, "203.0.113.9")
        self.assertEqual(sink.events[0].destination_ip, "127.0.0.1")

    def test_normalise_address(self):
        """Addresses are canonical text; scope ids are removed; junk is kept unchanged."""
        self.assertEqual(normalise_address("::ffff:1.2.3.4"), "1.2.3.4")
        self.assertEqual(normalise_address("fe80::1%eth0"), "fe80::1")
        self.assertEqual(normalise_address("2001:0db8::0001"), "2001:db8::1")
        self.assertEqual(normalise_address("not an address"), "not an address")

    def test_datagram_via_transport_uses_bound_address(self):
        """Without packet info, the destination recorded is the bound address."""
        controller, sink, _ = make_controller()
        protocol = SIPDatagramProtocol(controller)

        class Transport:
            def getHost(self):
                return IPv6Address("UDP", "::1", 5060)

        protocol.transport = Transport()
        protocol.datagramReceived(OPTIONS, ("::1", 5999))
        self.assertEqual(sink.events[0].destination_ip, "::1")
        self.assertEqual(sink.events[0].source_port, 5999)

    def test_parser_exception_never_escapes(self):
        """An unexpected error in the pipeline is counted and logged, never raised."""
        controller, sink, _ = make_controller()

        def broken(event):
            raise RuntimeError("boom")

        controller.sink = broken
        send_udp(controller, OPTIONS)
        self.assertEqual(controller.stats.internal_errors, 1)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class StreamCorpusTests(SynchronousTestCase, CorpusMixin):
    def _drive(self, row, one_byte):
        controller, sink, _ = make_controller()
        protocol, transport = open_stream(controller)
        data = corpus_bytes(row["file"])
        feed(protocol, data, one_byte)
        closed_by_us = transport.disconnecting
        protocol.connectionLost(Failure(ConnectionDone()))
        return controller, sink, transport, closed_by_us

    def test_corpus_over_tcp_one_write(self):
        """Every corpus file written at once on a fresh TCP connection, then the connection
        closed, gives the events of expected.tsv."""
        for row in corpus_rows():
            if row["transport"] == "tcp":
                controller, sink, _, _ = self._drive(row, False)
                self.assertEventsMatch(row, sink.events, row["file"] + " tcp")
                self.assertEqual(controller.stats.internal_errors, 0)

    def test_corpus_over_tcp_byte_at_a_time(self):
        """The same, one byte per dataReceived call: framing does not depend on segmentation."""
        for row in corpus_rows():
            if row["transport"] == "tcp":
                controller, sink, _, _ = self._drive(row, True)
                self.assertEventsMatch(row, sink.events, row["file"] + " tcp 1-byte")
                self.assertEqual(controller.stats.internal_errors, 0)

    def test_ping_gets_pong(self):
        """A CRLFCRLF ping gets a CRLF pong (RFC 5626 §3.5.1) and records nothing."""
        controller, sink, _ = make_controller()
        protocol, transport = open_stream(controller)
        feed(protocol, corpus_bytes("edge/keepalive_crlfcrlf.bin"))
        self.assertEqual(transport.value(), b"\r\n")
        self.assertEqual(sink.events, [])

    def test_http_garbage_recorded_once_and_closed(self):
        """An HTTP request on the SIP port is one non_sip event, then the connection closes; no
        reply is written."""
        controller, sink, _ = make_controller()
        protocol, transport = open_stream(controller)
        feed(protocol, corpus_bytes("edge/http-get_tcp.bin"))
        self.assertTrue(transport.disconnecting)
        self.assertEqual(transport.value(), b"")
        self.assertEqual([e.parse_status for e in sink.events], ["non_sip"])
        self.assertEqual(sink.events[0].sip_method, NOT_FOUND)
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(len(sink.events), 1)

    def test_tls_client_hello_on_plain_port(self):
        """A TLS ClientHello on the plain TCP port is recorded once as non_sip, then closed."""
        controller, sink, _ = make_controller()
        protocol, transport = open_stream(controller)
        feed(protocol, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40)
        self.assertTrue(transport.disconnecting)
        self.assertEqual([e.parse_status for e in sink.events], ["non_sip"])

    def test_pipelined_2000(self):
        """2,000 pipelined OPTIONS in one write are 2,000 events, in order."""
        controller, sink, _ = make_controller()
        protocol, _ = open_stream(controller)
        data = b"".join(
            OPTIONS.replace(b"Call-ID: c1", b"Call-ID: p%d" % i) for i in range(2000)
        )
        feed(protocol, data)
        self.assertEqual(len(sink.events), 2000)
        self.assertEqual(sink.events[1999].sip_message_bytes,
                         OPTIONS.replace(b"Call-ID: c1", b"Call-ID: p1999"))

    def test_retransmission_on_same_connection(self):
        """The same request twice on one connection is one event; on another connection it is
        a new transaction."""
        controller, sink, _ = make_controller()
        protocol, _ = open_stream(controller)
        feed(protocol, OPTIONS + OPTIONS)
        self.assertEqual(len(sink.events), 1)
        other, _ = open_stream(controller)
        feed(other, OPTIONS)
        self.assertEqual(len(sink.events), 2)

    def test_idle_timeout_records_partial_as_truncated(self):
        """A partial message is recorded as truncated when the idle timeout closes the
        connection (clerr.dat: Content-Length larger than the body)."""
        controller, sink, clock = make_controller(idle_timeout=30)
        protocol, transport = open_stream(controller)
        feed(protocol, corpus_bytes("rfc4475/clerr.dat"))
        self.assertEqual(sink.events, [])
        clock.advance(31)
        self.assertEqual([e.parse_status for e in sink.events], ["truncated"])
        self.assertEqual(sink.events[0].called_number, "user")
        self.assertTrue(transport.disconnecting)
        self.assertEqual(controller.stats.connections_idle, 1)

    def test_no_content_length_flushed_after_quiet_period(self):
        """A message without Content-Length is recorded after a quiet second, with its body."""
        controller, sink, clock = make_controller()
        protocol, _ = open_stream(controller)
        data = corpus_bytes("edge/no-content-length-body_tcp.sip")
        feed(protocol, data)
        clock.advance(1.5)
        self.assertEqual(len(sink.events), 1)
        self.assertEqual(sink.events[0].sip_message_bytes, data)

    def test_connection_limit(self):
        """Connections beyond --max-tcp-connections (TCP and TLS together) are refused and
        counted."""
        controller, _, _ = make_controller(max_connections=2)
        open_stream(controller, "TCP")
        open_stream(controller, "TLS")
        protocol = SIPStreamFactory(controller, "TCP").buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(controller.stats.connections_rejected, 1)
        self.assertEqual(controller.stats.connections_open, 2)

    def test_silent_connection_and_tls_failure_counted(self):
        """Connections that send nothing, and failed TLS handshakes, are counted, not recorded."""
        controller, sink, _ = make_controller()
        protocol, _ = open_stream(controller)
        protocol.connectionLost(Failure(ConnectionDone()))
        protocol, _ = open_stream(controller, "TLS")
        protocol.connectionLost(Failure(SSL.Error([("SSL routines", "", "wrong version")])))
        self.assertEqual(controller.stats.connections_silent, 1)
        self.assertEqual(controller.stats.tls_handshake_failures, 1)
        self.assertEqual(sink.events, [])
        self.assertEqual(controller.stats.connections_open, 0)

    def test_tls_transport_type(self):
        """Events from the TLS factory carry transport_type TLS."""
        controller, sink, _ = make_controller()
        protocol, _ = open_stream(controller, "TLS")
        feed(protocol, OPTIONS)
        self.assertEqual(sink.events[0].transport_type, "TLS")

    def test_drain_records_partial(self):
        """drain() (used at shutdown) records a buffered partial message as truncated."""
        controller, sink, _ = make_controller()
        protocol, _ = open_stream(controller)
        feed(protocol, OPTIONS[:60])
        protocol.drain()
        self.assertEqual([e.parse_status for e in sink.events], ["truncated"])


class StreamHardeningTests(SynchronousTestCase):
    """Defences of the stream transports found by review (connection ids, pings, slowloris)."""

    def test_new_connection_is_not_a_retransmission_of_a_closed_one(self):
        """The same request on successive connections (opened and closed one after the other, so
        the memory of one is reused by the next) is a new event each time: retransmissions are
        matched per connection (interface.md §3)."""
        controller, sink, _ = make_controller()
        for _ in range(20):
            protocol, _ = open_stream(controller)
            feed(protocol, OPTIONS)
            protocol.connectionLost(Failure(ConnectionDone()))
            del protocol
        self.assertEqual(len(sink.events), 20)
        self.assertEqual(controller.stats.retransmissions, 0)

    def test_ping_flood_pongs_are_rate_limited(self):
        """A client that floods CRLFCRLF pings gets at most a burst of pongs, then one per
        second; the rest are counted, so our write buffer cannot grow without bound."""
        from sentrypeer.sip.protocol import PONG_BURST

        controller, sink, clock = make_controller()
        protocol, transport = open_stream(controller)
        feed(protocol, b"\r\n\r\n" * 1000)
        self.assertEqual(transport.value(), b"\r\n" * PONG_BURST)
        self.assertEqual(controller.stats.pongs_refused, 1000 - PONG_BURST)
        clock.advance(2)
        feed(protocol, b"\r\n\r\n" * 10)
        self.assertEqual(transport.value(), b"\r\n" * (PONG_BURST + 2))
        self.assertEqual(sink.events, [])

    def test_slowloris_message_deadline(self):
        """A message dripped one byte every few seconds (each byte resets the idle timeout) is
        recorded as truncated and the connection closed once the message deadline passes."""
        from sentrypeer.sip.protocol import message_deadline

        controller, sink, clock = make_controller(idle_timeout=30)
        protocol, transport = open_stream(controller)
        deadline = message_deadline(30)
        elapsed = 0.0
        for byte in OPTIONS[:40]:
            if transport.disconnecting:
                break
            protocol.dataReceived(bytes([byte]))
            clock.advance(4)
            elapsed += 4
        self.assertLessEqual(elapsed, deadline + 4)
        self.assertEqual([e.parse_status for e in sink.events], ["truncated"])
        self.assertEqual(controller.stats.connections_slow, 1)
        self.assertTrue(transport.disconnecting)

    def test_deadline_cleared_between_messages(self):
        """Complete messages stop the deadline: a connection sending a whole request every 20 s
        for several minutes stays open and every request is an event."""
        controller, sink, clock = make_controller(idle_timeout=30)
        protocol, transport = open_stream(controller)
        for i in range(15):
            feed(protocol, OPTIONS.replace(b"Call-ID: c1", b"Call-ID: d%d" % i))
            clock.advance(20)
        self.assertEqual(len(sink.events), 15)
        self.assertFalse(transport.disconnecting)


class KernelDropTests(TestCase):
    """PacketInfoUDPPort counts the datagrams the kernel dropped for it (issue 7)."""

    def test_kernel_drops_counted(self):
        """Datagrams that overflow the socket's receive buffer while the reactor is busy are
        added to stats.kernel_drops when the port reads SO_MEMINFO (every second, and on
        demand): the same number /proc/net/udp shows for the socket."""
        import socket
        import sys

        from twisted.internet import reactor

        from sentrypeer.sip.protocol import PacketInfoUDPPort

        if not sys.platform.startswith("linux"):
            raise SkipTest("SO_MEMINFO is Linux")
        controller, _, _ = make_controller()
        port = PacketInfoUDPPort(0, SIPDatagramProtocol(controller), "127.0.0.1", 65535, reactor)
        port.startListening()
        self.addCleanup(port.stopListening)
        port.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # tiny: it overflows
        number = port.getHost().port
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            for _ in range(300):
                s.sendto(b"x" * 1000, ("127.0.0.1", number))
        port.count_kernel_drops()
        drops = controller.stats.kernel_drops
        self.assertGreater(drops, 0)
        with open("/proc/net/udp", encoding="ascii") as f:
            rows = [line.split() for line in f if ":%04X " % number in line]
        self.assertEqual(drops, int(rows[0][12]))
        port.count_kernel_drops()  # nothing new: nothing added
        self.assertEqual(controller.stats.kernel_drops, drops)


class EventIdentityTests(SynchronousTestCase):
    """The cheaper event fields keep their format (interface.md §3)."""

    def test_uuids(self):
        """Events get distinct lower-case version-4 UUIDs (RFC 4122 variant), made in batches."""
        import uuid

        from sentrypeer.events import new_event_uuid

        seen = set()
        for _ in range(3000):
            text = new_event_uuid()
            value = uuid.UUID(text)
            self.assertEqual((value.version, value.variant, str(value)), (4, uuid.RFC_4122, text))
            seen.add(text)
        self.assertEqual(len(seen), 3000)

    def test_uuid_pool_not_shared_with_a_child(self):
        """A forked child starts with an empty pool: parent and child never hand out the same
        UUID."""
        import os

        from sentrypeer import events

        events.new_event_uuid()
        self.assertTrue(events._uuid_pool)
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: report the pool size, then leave at once
            os.write(write, b"%d" % len(events._uuid_pool))
            os._exit(0)
        os.close(write)
        size = os.read(read, 20)
        os.close(read)
        os.waitpid(pid, 0)
        self.assertEqual(size, b"0")

    def test_timestamp_format(self):
        """format_timestamp (which reuses the formatted second) gives nine fraction digits in
        UTC, whatever the order of the calls."""
        import random
        import time

        from sentrypeer.events import format_timestamp

        values = [random.randrange(0, 4_000_000_000 * 10**9) for _ in range(500)]
        values += [1_700_000_000 * 10**9 + i for i in (0, 1, 999_999_999, 10**9)]
        for ns in values + values[::-1]:
            seconds, nanos = divmod(ns, 10**9)
            expected = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(seconds)) + ".%09d" % nanos
            self.assertEqual(format_timestamp(ns), expected)
