"""Tests for :mod:`sentrypeer.endpoints`: SIP listen descriptions and ``host:port`` addresses."""

from twisted.trial.unittest import SynchronousTestCase

from sentrypeer.endpoints import (
    ListenSpec,
    format_listen,
    parse_host_port,
    parse_listen,
    split_host_port,
)


class ParseListenTests(SynchronousTestCase):
    """``parse_listen`` implements the ``TRANSPORT:PORT[:interface=ADDR]`` grammar (interface.md §2)."""

    def test_defaultInterface(self):
        """Without ``interface=`` a listener binds ``::`` (IPv6 and IPv4, dual stack)."""
        self.assertEqual(parse_listen("udp:5060"), ListenSpec("udp", 5060, "::"))

    def test_transports(self):
        """``udp``, ``tcp`` and ``tls`` are the transports."""
        for transport in ("udp", "tcp", "tls"):
            self.assertEqual(parse_listen(f"{transport}:5061").transport, transport)

    def test_transportCaseInsensitive(self):
        """The transport name is matched case-insensitively and kept in lower case."""
        self.assertEqual(parse_listen("TLS:5061"), ListenSpec("tls", 5061, "::"))

    def test_ipv4Interface(self):
        """An IPv4 interface, ``0.0.0.0`` included, is accepted."""
        self.assertEqual(
            parse_listen("tcp:5060:interface=127.0.0.1"), ListenSpec("tcp", 5060, "127.0.0.1")
        )
        self.assertEqual(parse_listen("udp:5060:interface=0.0.0.0").interface, "0.0.0.0")

    def test_plainIPv6Interface(self):
        """A plain IPv6 interface needs no escaping: everything after ``interface=`` is the address."""
        self.assertEqual(parse_listen("tcp:5060:interface=::1"), ListenSpec("tcp", 5060, "::1"))
        self.assertEqual(parse_listen("udp:5060:interface=::").interface, "::")

    def test_escapedIPv6Interface(self):
        """The Twisted-escaped form ``interface=\\:\\:1`` means ``::1``."""
        self.assertEqual(parse_listen("tls:5061:interface=\\:\\:1"), ListenSpec("tls", 5061, "::1"))

    def test_interfaceCanonical(self):
        """The interface is kept in canonical form, so equal addresses give equal specs."""
        self.assertEqual(parse_listen("udp:5060:interface=0:0::0:1").interface, "::1")

    def test_portZero(self):
        """Port 0 (an ephemeral port) is allowed."""
        self.assertEqual(parse_listen("udp:0").port, 0)

    def test_portBounds(self):
        """Port 65535 is the highest port; 65536 is rejected as out of range."""
        self.assertEqual(parse_listen("tcp:65535").port, 65535)
        e = self.assertRaises(ValueError, parse_listen, "tcp:65536")
        self.assertIn("out of range", str(e))

    def test_badPorts(self):
        """A missing, negative, signed or non-numeric port is rejected."""
        for description in ("udp", "udp:", "udp:-1", "udp:+5", "udp:five", "udp:5060.0", "udp:٥"):
            self.assertRaises(ValueError, parse_listen, description)

    def test_unknownTransport(self):
        """A transport other than udp/tcp/tls is rejected, the message naming it."""
        e = self.assertRaises(ValueError, parse_listen, "sctp:5060")
        self.assertIn("'sctp'", str(e))
        self.assertIn("udp, tcp, tls", str(e))

    def test_unknownParameter(self):
        """Any parameter other than ``interface`` is rejected, the message naming it."""
        e = self.assertRaises(ValueError, parse_listen, "tcp:5060:backlog=50")
        self.assertIn("'backlog'", str(e))
        self.assertRaises(ValueError, parse_listen, "tcp:5060:interface")
        self.assertRaises(ValueError, parse_listen, "tcp:5060:")

    def test_badInterface(self):
        """An interface that is not an IP literal (a name, garbage, empty) is rejected."""
        for description in (
            "tcp:5060:interface=localhost",
            "tcp:5060:interface=example.com",
            "tcp:5060:interface=",
            "tcp:5060:interface=::1:backlog=5",
            "tcp:5060:interface=[::1]",
        ):
            e = self.assertRaises(ValueError, parse_listen, description)
            self.assertIn(repr(description), str(e))

    def test_formatRoundTrip(self):
        """``format_listen`` writes the canonical text, which parses back to the same spec."""
        spec = parse_listen("tls:5061:interface=\\:\\:1")
        self.assertEqual(format_listen(spec), "tls:5061:interface=::1")
        self.assertEqual(parse_listen(format_listen(spec)), spec)
        self.assertEqual(format_listen(ListenSpec("udp", 5060)), "udp:5060:interface=::")


class HostPortTests(SynchronousTestCase):
    """``parse_host_port`` reads the original's ``-z`` form; ``split_host_port`` the general one."""

    def test_ipv4(self):
        """``ADDR:PORT`` with an IPv4 address."""
        self.assertEqual(parse_host_port("0.0.0.0:5061"), ("0.0.0.0", 5061))
        self.assertEqual(parse_host_port("127.0.0.1:8088"), ("127.0.0.1", 8088))

    def test_ipv6(self):
        """``[ADDR]:PORT`` with an IPv6 address, returned without brackets."""
        self.assertEqual(parse_host_port("[::]:5061"), ("::", 5061))
        self.assertEqual(parse_host_port("[::1]:5062"), ("::1", 5062))

    def test_localhost(self):
        """``localhost`` (which the original resolved) becomes ``127.0.0.1`` without DNS."""
        self.assertEqual(parse_host_port("localhost:5061"), ("127.0.0.1", 5061))

    def test_otherNamesRejected(self):
        """Other host names are refused: there is no blocking DNS lookup at start-up."""
        e = self.assertRaises(ValueError, parse_host_port, "sip.example.com:5061")
        self.assertIn("'sip.example.com'", str(e))

    def test_portRequired(self):
        """The port is mandatory in the ``-z`` form."""
        for text in ("127.0.0.1", "[::1]", "127.0.0.1:", "localhost"):
            self.assertRaises(ValueError, parse_host_port, text)

    def test_bareIPv6Rejected(self):
        """An unbracketed IPv6 address with a port is ambiguous and rejected, asking for brackets."""
        e = self.assertRaises(ValueError, parse_host_port, "::1:5061")
        self.assertIn("[ADDR]:PORT", str(e))

    def test_malformed(self):
        """Out-of-range ports, a missing bracket, junk after it and an empty host are rejected."""
        for text in ("127.0.0.1:65536", "[::1:5061", "[::1]x5061", ":5061", "[nothost]:5061"):
            self.assertRaises(ValueError, parse_host_port, text)

    def test_splitDefaultPort(self):
        """``split_host_port`` keeps names unresolved and uses ``default_port`` for a bare host."""
        self.assertEqual(
            split_host_port("bootstrap.sentrypeer.org", 4222), ("bootstrap.sentrypeer.org", 4222)
        )
        self.assertEqual(split_host_port("bootstrap.sentrypeer.org:4223", 4222)[1], 4223)
        self.assertEqual(split_host_port("[2001:db8::1]", 4222), ("2001:db8::1", 4222))
        self.assertEqual(split_host_port("2001:db8::1", 4222), ("2001:db8::1", 4222))

    def test_splitBadHost(self):
        """``split_host_port`` rejects a host with characters no host name has."""
        for text in ("bad host:4222", "a/b:4222", "-x:4222", "a..b", "host\n"):
            self.assertRaises(ValueError, split_host_port, text, 4222)
