"""Tests of the blocklist exports: ``sentrypeer.api.blocklist`` (issue 8 item 3).

The behaviour pinned: which addresses are listed (time range, ``min_count``, peers, the operator's
allowlist, loopback/link-local/own addresses never), the three formats, the HTTP parameters and
token, and that the ``.ipset`` output loads with ``ipset restore`` and the ``.nft`` output passes
``nft -c -f`` and loads with ``nft -f``, inside a network namespace the test creates (root only;
under CI a missing tool or privilege is a failure, locally a skip).
"""

from __future__ import annotations

import ipaddress
import os
import subprocess
import time

from twisted.internet import defer, task
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from sentrypeer.api import blocklist as bl
from sentrypeer.api import make_site
from sentrypeer.storage import dashboard_queries as dq

from .support import in_ci, require_tool
from .test_dashboard import NODE, NOW, PEER, LiveSiteCase, basic, fresh_connection, make_event

DAY = 86400
#: "Yesterday": within 2 days, not within 1.
D1 = DAY + 3600


def fixture_events(now: float) -> list:
    """IPv4 and IPv6, old and new, local and peers', allowlisted, special and own addresses."""
    spec = [
        # (source_ip, seconds ago, node, count)
        ("203.0.113.7", 3600, NODE, 3),
        ("::ffff:203.0.113.7", 7200, NODE, 1),  # same address, another spelling: counts merge
        ("203.0.113.8", 2 * DAY, NODE, 1),
        ("2001:db8:1::5", D1, NODE, 2),
        ("2001:DB8:1:0::6", D1, NODE, 1),  # not canonical as stored: listed canonical
        ("198.51.100.1", 10 * DAY, NODE, 5),  # older than the default 7 days
        ("198.51.100.2", D1, PEER, 4),  # a peer's event
        ("192.0.2.10", D1, NODE, 2),  # allowlisted range 192.0.2.0/24
        ("2001:db8:ffff::1", D1, NODE, 2),  # allowlisted range 2001:db8:ffff::/48
        ("127.0.0.1", D1, NODE, 1),
        ("::1", D1, NODE, 1),
        ("169.254.10.1", D1, NODE, 1),
        ("fe80::1", D1, NODE, 1),
        ("0.0.0.0", D1, NODE, 1),
        ("ff02::1", D1, NODE, 1),
        ("203.0.113.99", D1, NODE, 1),  # the node's own address (destination of its events)
        ("198.51.100.200", D1, NODE, 1),  # an own address given as a listen address
        ("not-an-address", D1, NODE, 1),
        ("<script>alert(1)</script>", D1, NODE, 1),
        ("203.0.113.50:5060", D1, NODE, 1),  # old ip:port row
        ("fe80::2%eth0", D1, NODE, 1),
        ("", D1, NODE, 1),
    ]
    events = []
    n = 0
    for source, ago, node, count in spec:
        for _ in range(count):
            events.append(make_event(n, at=now - ago, source_ip=source, created_by_node_id=node))
            n += 1
    events.append(
        make_event(n, at=now - 3600, source_ip="203.0.113.60", destination_ip="203.0.113.99")
    )
    return events


EXCLUDE = bl.parse_exclude("192.0.2.0/24\n2001:db8:ffff::/48  # trunks\n")
OWN = ("198.51.100.200",)


def blocklist_for(conn, now=NOW, days=7, min_count=1, peers=False) -> bl.Blocklist:
    """The blocklist of *conn* as the resource builds it."""
    since = dq.cutoff(now, days * DAY)
    sources, destinations = bl.blocklist_data(conn.cursor(), since, peers)
    v4, v6 = bl.build_blocklist(
        sources, min_count=min_count, excluded=bl.NetworkSet(EXCLUDE), own=(*OWN, *destinations)
    )
    return bl.Blocklist(v4, v6, days, min_count, peers, now)


def addresses(blocklist: bl.Blocklist) -> list[str]:
    return [str(a) for a in (*blocklist.v4, *blocklist.v6)]


class ExcludeFileTests(SynchronousTestCase):
    """The --blocklist-exclude file."""

    def test_entries(self):
        """Addresses and CIDRs, IPv4 and IPv6, comments and blank lines; host bits are allowed;
        an IPv4-mapped IPv6 entry covers its IPv4 addresses too."""
        networks = bl.parse_exclude(
            "# trunks\n\n192.0.2.7/24\n 198.51.100.1 # one host\n2001:db8::/32\n::ffff:203.0.113.0/120\n"
        )
        self.assertEqual(
            [str(n) for n in networks],
            ["192.0.2.0/24", "198.51.100.1/32", "2001:db8::/32", "::ffff:cb00:7100/120", "203.0.113.0/24"],
        )

    def test_errors(self):
        """A bad line is a one-line BlocklistExcludeError naming the source and the line number;
        an unreadable or non-UTF-8 file too."""
        with self.assertRaises(bl.BlocklistExcludeError) as caught:
            bl.parse_exclude("10.0.0.0/8\n\n10.0.0.300\n", "--blocklist-exclude /etc/x")
        self.assertEqual(
            str(caught.exception),
            "--blocklist-exclude /etc/x: line 3: '10.0.0.300' is not an IP address or CIDR",
        )
        self.assertNotIn("\n", str(caught.exception))
        missing = os.path.abspath(self.mktemp())
        with self.assertRaises(bl.BlocklistExcludeError) as caught:
            bl.load_exclude_file(missing)
        self.assertEqual(str(caught.exception), f"--blocklist-exclude {missing}: No such file or directory")
        binary = self.mktemp()
        with open(binary, "wb") as f:
            f.write(b"10.0.0.0/8\n\xff\xfe\n")
        self.assertRaises(bl.BlocklistExcludeError, bl.load_exclude_file, binary)
        good = self.mktemp()
        with open(good, "w") as f:
            f.write("10.0.0.0/8\n")
        self.assertEqual(bl.load_exclude_file(good), (ipaddress.ip_network("10.0.0.0/8"),))

    def test_own_listen_addresses(self):
        """Listen specs give their single addresses (canonical, once each), never wildcards."""
        from sentrypeer.endpoints import parse_listen

        specs = [parse_listen(text) for text in (
            "udp:5060", "udp:5060:interface=0.0.0.0", "tcp:5060:interface=192.0.2.5",
            "tls:5061:interface=2001:db8::0001", "udp:5070:interface=192.0.2.5",
        )]
        self.assertEqual(bl.own_listen_addresses(specs), ("192.0.2.5", "2001:db8::1"))

    def test_network_set(self):
        """NetworkSet answers membership for both versions, overlapping networks included."""
        networks = bl.NetworkSet(bl.parse_exclude("10.0.0.0/8\n10.1.0.0/16\n192.0.2.1\n2001:db8::/32"))
        for inside in ("10.0.0.0", "10.255.255.255", "192.0.2.1", "2001:db8::", "2001:db8:ffff::1"):
            self.assertIn(ipaddress.ip_address(inside), networks)
        for outside in ("9.255.255.255", "11.0.0.0", "192.0.2.2", "2001:db9::", "::"):
            self.assertNotIn(ipaddress.ip_address(outside), networks)
        self.assertNotIn(ipaddress.ip_address("1.2.3.4"), bl.NetworkSet([]))


class SelectionTests(SynchronousTestCase):
    """Which addresses a blocklist holds."""

    def setUp(self):
        self.conn = fresh_connection(fixture_events(NOW))

    def test_normalise(self):
        """Stored spellings become addresses: mapped IPv6 is IPv4, ip:port loses the port, scoped
        and non-addresses are None."""
        cases = {
            "203.0.113.7": "203.0.113.7",
            "::ffff:203.0.113.7": "203.0.113.7",
            "2001:DB8::1": "2001:db8::1",
            "203.0.113.7:5060": "203.0.113.7",
            "[2001:db8::1]:5060": "2001:db8::1",
            "fe80::1%eth0": None,
            "localhost": None,
            "": None,
            "1" * 100: None,
        }
        for text, expected in cases.items():
            got = bl.normalise_address(text)
            self.assertEqual(None if got is None else str(got), expected, text)

    def test_default_selection(self):
        """Default: this node's events of the last 7 days, canonical and merged, sorted, IPv4
        first; no old, peer, allowlisted, loopback, link-local, unspecified, multicast, own, or
        non-address entries."""
        self.assertEqual(
            addresses(blocklist_for(self.conn)),
            ["203.0.113.7", "203.0.113.8", "203.0.113.50", "203.0.113.60", "2001:db8:1::5", "2001:db8:1::6"],
        )

    def test_days_min_count_peers(self):
        """days widens the range, min_count counts merged spellings, peers=1 adds peers' events."""
        self.assertIn("198.51.100.1", addresses(blocklist_for(self.conn, days=11)))
        self.assertEqual(addresses(blocklist_for(self.conn, min_count=2)), ["203.0.113.7", "2001:db8:1::5"])
        self.assertEqual(addresses(blocklist_for(self.conn, min_count=4)), ["203.0.113.7"])
        self.assertEqual(addresses(blocklist_for(self.conn, min_count=5)), [])
        with_peers = addresses(blocklist_for(self.conn, peers=True))
        self.assertIn("198.51.100.2", with_peers)
        self.assertNotIn("192.0.2.10", with_peers)
        self.assertEqual(addresses(blocklist_for(self.conn, days=1)), ["203.0.113.7", "203.0.113.60"])

    def test_empty(self):
        """An empty database gives empty lists in every format, still valid."""
        empty = blocklist_for(fresh_connection())
        self.assertEqual(addresses(empty), [])
        self.assertEqual(bl.format_text(empty).count(b"\n"), 2)
        self.assertNotIn(b"add ", bl.format_ipset(empty))
        self.assertNotIn(b"add element", bl.format_nft(empty))


class FormatTests(SynchronousTestCase):
    """The three output formats."""

    def setUp(self):
        self.blocklist = bl.Blocklist(
            [ipaddress.ip_address("192.0.2.1"), ipaddress.ip_address("203.0.113.7")],
            [ipaddress.ip_address("2001:db8::1")],
            7, 2, False, NOW,
        )

    def test_text(self):
        """Two comment lines, then one address per line, IPv4 first."""
        self.assertEqual(
            bl.format_text(self.blocklist).decode(),
            "# SentryPeer blocklist (one address per line), generated 2023-11-14 22:13:20 UTC\n"
            "# 2 IPv4 and 1 IPv6 source addresses seen within 7 days, at least 2 events each,"
            " from this node's own events\n"
            "192.0.2.1\n203.0.113.7\n2001:db8::1\n",
        )

    def test_ipset(self):
        """Two hash:ip sets (inet, inet6) with a fixed maxelem, each filled as a temporary set that
        is swapped in and destroyed."""
        lines = [line for line in bl.format_ipset(self.blocklist).decode().splitlines() if line[:1] != "#"]
        params = f"hash:ip family inet hashsize 1024 maxelem {bl.IPSET_MAXELEM}"
        params6 = params.replace("inet", "inet6")
        self.assertEqual(
            lines,
            [
                f"create sentrypeer-v4 {params} -exist",
                f"create sentrypeer-v4-new {params} -exist",
                "flush sentrypeer-v4-new",
                "add sentrypeer-v4-new 192.0.2.1",
                "add sentrypeer-v4-new 203.0.113.7",
                "swap sentrypeer-v4-new sentrypeer-v4",
                "destroy sentrypeer-v4-new",
                f"create sentrypeer-v6 {params6} -exist",
                f"create sentrypeer-v6-new {params6} -exist",
                "flush sentrypeer-v6-new",
                "add sentrypeer-v6-new 2001:db8::1",
                "swap sentrypeer-v6-new sentrypeer-v6",
                "destroy sentrypeer-v6-new",
            ],
        )

    def test_nft(self):
        """A table inet sentrypeer with an ipv4_addr and an ipv6_addr set, flushed then filled in
        chunks of NFT_CHUNK elements."""
        text = bl.format_nft(self.blocklist).decode()
        self.assertIn("table inet sentrypeer {\n\tset blocklist_v4 {\n\t\ttype ipv4_addr\n\t}\n", text)
        self.assertIn("\tset blocklist_v6 {\n\t\ttype ipv6_addr\n\t}\n}\n", text)
        self.assertIn(
            "flush set inet sentrypeer blocklist_v4\nflush set inet sentrypeer blocklist_v6\n"
            "add element inet sentrypeer blocklist_v4 { 192.0.2.1, 203.0.113.7 }\n"
            "add element inet sentrypeer blocklist_v6 { 2001:db8::1 }\n",
            text,
        )
        many = bl.Blocklist(
            [ipaddress.IPv4Address(0x0A000000 + i) for i in range(bl.NFT_CHUNK * 2 + 1)], [], 7, 1, True, NOW
        )
        self.assertEqual(bl.format_nft(many).count(b"add element"), 3)


class ParameterTests(SynchronousTestCase):
    """days, min_count and peers."""

    def test_parameters(self):
        """Defaults 7, 1, no peers; decimal values in range are taken; other parameters ignored."""
        self.assertEqual(bl.parse_parameters({}), bl.Parameters(7, 1, False))
        self.assertEqual(
            bl.parse_parameters({b"days": [b"30"], b"min_count": [b"3"], b"peers": [b"1"], b"x": [b"y"]}),
            bl.Parameters(30, 3, True),
        )

    def test_bad_parameters(self):
        """Out of range, signed, non-decimal, non-ASCII digits, empty or repeated values are
        refused."""
        for args in (
            {b"days": [b"0"]},
            {b"days": [b"3651"]},
            {b"days": [b"-1"]},
            {b"days": [b"+7"]},
            {b"days": [b"7.5"]},
            {b"days": [b""]},
            {b"days": ["٧".encode()]},
            {b"min_count": [b"0"]},
            {b"peers": [b"2"]},
            {b"peers": [b"yes"]},
            {b"days": [b"1", b"2"]},
        ):
            self.assertRaises(bl.BadParameter, bl.parse_parameters, args)


class BlocklistHTTPTests(LiveSiteCase):
    """The blocklists over HTTP."""

    @defer.inlineCallbacks
    def test_routes_and_headers(self):
        """Each format answers text/plain with the security headers and the same addresses; a bad
        parameter is 400, POST 405, and HEAD has no body."""
        now = time.time()
        yield self.start_site(fixture_events(now), blocklist_exclude=EXCLUDE, own_addresses=OWN)
        response, body = yield self.fetch("/blocklist.txt")
        self.assertEqual(response.code, 200)
        self.assertEqual(self.header(response, "Content-Type"), "text/plain; charset=utf-8")
        self.assertSecurityHeaders(response)
        listed = [line for line in body.decode().splitlines() if not line.startswith("#")]
        self.assertEqual(
            listed,
            ["203.0.113.7", "203.0.113.8", "203.0.113.50", "203.0.113.60", "2001:db8:1::5", "2001:db8:1::6"],
        )
        response, body = yield self.fetch("/blocklist.txt?days=11&min_count=2&peers=1")
        listed = [line for line in body.decode().splitlines() if not line.startswith("#")]
        self.assertEqual(listed, ["198.51.100.1", "198.51.100.2", "203.0.113.7", "2001:db8:1::5"])
        for path in ("/blocklist.ipset", "/blocklist.nft"):
            response, body = yield self.fetch(path)
            self.assertEqual(response.code, 200)
            self.assertSecurityHeaders(response)
            for address in ("203.0.113.7", "2001:db8:1::6"):
                self.assertIn(address.encode(), body)
            self.assertNotIn(b"192.0.2.10", body)
        for path, code in (("/blocklist.txt?days=0", 400), ("/blocklist.nft?peers=2", 400)):
            response, body = yield self.fetch(path)
            self.assertEqual(response.code, code)
            self.assertSecurityHeaders(response)
        response, _ = yield self.fetch("/blocklist.txt", method=b"POST")
        self.assertEqual((response.code, self.header(response, "Allow")), (405, "GET, HEAD"))
        response, body = yield self.fetch("/blocklist.nft", method=b"HEAD")
        self.assertEqual((response.code, body), (200, b""))

    @defer.inlineCallbacks
    def test_token(self):
        """With a token the lists need it (Bearer, or the Basic password); otherwise 401 with Basic
        and Bearer challenges."""
        yield self.start_site(fixture_events(time.time()), token="tok")
        response, body = yield self.fetch("/blocklist.txt")
        self.assertEqual(response.code, 401)
        challenges = [c.decode() for c in bl.CHALLENGES]
        self.assertEqual(response.headers.getRawHeaders("WWW-Authenticate"), challenges)
        self.assertNotIn(b"203.0.113.7", body)
        self.assertSecurityHeaders(response)
        for headers in (basic("tok"), {"Authorization": ["Bearer tok"]}):
            response, body = yield self.fetch("/blocklist.txt", headers=headers)
            self.assertEqual(response.code, 200)
            self.assertIn(b"203.0.113.7", body)

    def test_clock(self):
        """The time range is measured from the clock given to make_site."""
        clock = task.Clock()
        clock.advance(NOW)
        self.assertEqual(make_site(object(), clock=clock).resource.blocklist._now(), NOW)


class FirewallToolTests(SynchronousTestCase):
    """The outputs load into the real tools, in a network namespace of the test's own."""

    def setUp(self):
        self.unshare = require_tool("unshare")
        if os.geteuid() != 0:
            message = "loading ipset/nftables needs root (CI runs as root)"
            if in_ci():
                raise AssertionError(message)
            raise SkipTest(message)
        conn = fresh_connection(fixture_events(NOW))
        self.blocklist = blocklist_for(conn, days=11, peers=True)
        self.assertTrue(self.blocklist.v4 and self.blocklist.v6)
        many_v4 = [ipaddress.IPv4Address(0xC6336400 + i) for i in range(3000)]
        many_v6 = [ipaddress.IPv6Address(0x20010DB8000000000000000000000000 + i) for i in range(2500)]
        self.big = bl.Blocklist(many_v4, many_v6, 7, 1, False, NOW)
        self.empty = bl.Blocklist([], [], 7, 1, False, NOW)

    def in_namespace(self, script: str, *files: bytes) -> str:
        """Run the shell *script* in a new network namespace with *files* as $1, $2...; returns
        its output, failing the test on a non-zero status."""
        paths = []
        for i, content in enumerate(files):
            path = os.path.abspath(self.mktemp()) + f".{i}"
            with open(path, "wb") as f:
                f.write(content)
            paths.append(path)
        result = subprocess.run(
            [self.unshare, "--net", "sh", "-euc", script, "sh", *paths],
            capture_output=True, timeout=60, check=False,
        )
        output = (result.stdout + result.stderr).decode(errors="replace")
        self.assertEqual(result.returncode, 0, output)
        return output

    def test_ipset_restore(self):
        """ipset restore loads the .ipset output (both families), loading again replaces the
        contents (a smaller list leaves no stale entry), and the temporary sets are gone."""
        ipset = require_tool("ipset")
        output = self.in_namespace(
            f'{ipset} restore < "$1"; {ipset} restore < "$2"; {ipset} restore < "$3";'
            f" {ipset} list -n; {ipset} list sentrypeer-v4; {ipset} list sentrypeer-v6;"
            f' {ipset} restore < "$4"; echo AFTER-EMPTY;'
            f' {ipset} list sentrypeer-v4 | grep -c "^[0-9]" || true',
            bl.format_ipset(self.big), bl.format_ipset(self.blocklist), bl.format_ipset(self.blocklist),
            bl.format_ipset(self.empty),
        )
        names, _, rest = output.partition("Name:")
        self.assertEqual(sorted(names.split()), ["sentrypeer-v4", "sentrypeer-v6"])
        self.assertIn("family inet ", rest)
        self.assertIn("family inet6 ", rest)
        for address in addresses(self.blocklist):
            self.assertIn(f"\n{address}\n", rest + "\n")
        self.assertNotIn("198.51.100.5\n", rest.partition("AFTER-EMPTY")[0])  # from the big list
        self.assertEqual(rest.partition("AFTER-EMPTY")[2].split(), ["0"])

    def test_nft(self):
        """nft -c -f accepts the .nft output (small, chunked and empty lists), and nft -f loads it
        twice with the sets holding exactly the last list."""
        nft = require_tool("nft")
        self.in_namespace(
            f'{nft} -c -f "$1"; {nft} -c -f "$2"; {nft} -c -f "$3"',
            bl.format_nft(self.blocklist), bl.format_nft(self.big), bl.format_nft(self.empty),
        )
        output = self.in_namespace(
            f'{nft} -f "$1"; {nft} -f "$2"; {nft} list set inet sentrypeer blocklist_v4;'
            f" {nft} list set inet sentrypeer blocklist_v6",
            bl.format_nft(self.big), bl.format_nft(self.blocklist),
        )
        for address in addresses(self.blocklist):
            self.assertIn(address, output)
        self.assertNotIn("198.51.100.5,", output)
        self.assertNotIn("2001:db8::5,", output)
