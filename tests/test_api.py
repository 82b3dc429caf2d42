"""Tests of the REST API: ``sentrypeer.api`` and ``sentrypeer.storage.api_queries``.

The behaviour pinned is interface.md §5 and reference §5 (with the original's test expectations of
reference §13.1 items 10-13 where they agree with interface.md §5). Most tests run a real site on
a loopback ephemeral port over a real database file; the last one runs ``curl`` against it while
SIP probes stream in through a real UDP listener.
"""

from __future__ import annotations

import base64
import json
import os
import sqlite3
import threading
import uuid
from typing import Any

import treq
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer, reactor, task, utils
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.server import NOT_DONE_YET
from twisted.web.test.requesthelper import DummyRequest

from sentrypeer import __version__
from sentrypeer.api import check_token, make_site, resources
from sentrypeer.api.site import IDLE_TIMEOUT, PrivateSite
from sentrypeer.events import BadActorEvent, format_timestamp
from sentrypeer.service import build_service
from sentrypeer.storage import api_queries, queries
from sentrypeer.storage.database import Database, prepare_database

from .support import make_config, require_tool

NODE = "1f45cc1c-4fd4-11ec-89f0-d05099894ba6"
HEALTH_HTML = b"<html><body><h1>Hello from SentryPeer!</h1><h2>All is well!</h2></body></html>"
NOT_FOUND_BODY = {"error": "The requested resource could not be found."}
ALL_ROUTES = ("/health-check", "/", "/ip-addresses", "/ip-addresses/1.2.3.4", "/numbers", "/numbers/100")
#: Called numbers for the filter: (stored value, listed by /numbers).
NUMBER_CASES = (
    ("100", True),
    ("+4412", True),
    ("0046812", True),
    ("007", True),
    ("0", True),
    ("1" * 32, True),
    ("+" + "1" * 32, True),
    ("1" * 33, False),
    ("+" + "1" * 33, False),
    ("+", False),
    ("++44", False),
    ("+abc", False),
    ("-5", False),
    ("NOT_FOUND", False),
    ("12a", False),
    (" 5", False),
    ("5 ", False),
    ("", False),
    ("1\n", False),
    ("123\x00456", False),
    ("\u0663\u0663", False),  # ARABIC-INDIC DIGIT THREE: a digit, but not an ASCII one
    ("4+4", False),
    ("99999999999999999999", True),  # the original lost it to integer overflow (§4.3)
)


def make_event(n: int, source_ip: str = "203.0.113.7", called_number: str = "100", **fields: Any):
    """A stored-event fixture like sentrypeer.events.BadActorEvent; *n* orders the timestamps."""
    values: dict[str, Any] = dict(
        event_timestamp=format_timestamp(1_700_000_000_000_000_000 + n * 1_000_000_000),
        event_uuid=str(uuid.UUID(int=n + 1, version=4)),
        created_by_node_id=NODE,
        collected_method="passive",
        transport_type="UDP",
        source_ip=source_ip,
        destination_ip="192.0.2.1",
        called_number=called_number,
        sip_method="OPTIONS",
        sip_user_agent="friendly-scanner",
        sip_message=f"OPTIONS sip:{called_number}@192.0.2.1 SIP/2.0\r\n\r\n",
        source_port=5071,
        destination_port=5060,
    )
    values.update(fields)
    return BadActorEvent(**values)


def original_fixture_event() -> BadActorEvent:
    """The row of the original's unit-test fixture (reference §13.1 item 6)."""
    return BadActorEvent(
        event_timestamp="2020-11-18 20:13:17.349557105",
        event_uuid="2ceba0a8-3ac1-426f-9d45-8ecc3f00c21e",
        created_by_node_id=NODE,
        collected_method="passive",
        transport_type="UDP",
        source_ip="104.149.141.214",
        destination_ip="192.0.2.1",
        called_number="100",
        sip_method="INVITE",
        sip_user_agent="friendly-scanner",
        sip_message="OPTIONS sip:100@192.0.2.1 SIP/2.0\r\n\r\n",
    )


def fresh_connection(events=()) -> sqlite3.Connection:
    """An in-memory database at the current schema holding *events*."""
    conn = sqlite3.connect(":memory:")
    queries.migrate(conn)
    with conn:
        queries.insert_events(conn.cursor(), list(events))
    return conn


def listed_values(listing: api_queries.Listing) -> list[str]:
    return [entry.value for entry in listing.entries]


# ---------------------------------------------------------------------------------------------
# The SQL (plain sqlite3)


class NumberFilterTests(SynchronousTestCase):
    """``/numbers`` lists exactly the called numbers of the form ``^\\+?[0-9]{1,32}$``
    (interface.md §5), fixing the original's filter (reference §4.3 item 5, bug §14.12)."""

    def test_edge_cases(self):
        """Leading zeros, 32 digits and ``+`` with 32 digits are listed; ``+``, ``++44``, ``+abc``,
        ``-5``, 33 digits, ``NOT_FOUND``, spaces, newlines, NULs and non-ASCII digits are not."""
        events = [make_event(i, called_number=value) for i, (value, _) in enumerate(NUMBER_CASES)]
        conn = fresh_connection(events)
        listing = api_queries.list_called_numbers(conn.cursor())
        expected = {value for value, listed in NUMBER_CASES if listed}
        self.assertEqual(set(listed_values(listing)), expected)
        self.assertEqual(listing.total, len(expected))

    def test_python_rule_agrees(self):
        """``is_number`` (used to validate ``/numbers/{number}``) gives the table's answers too."""
        for value, listed in NUMBER_CASES:
            self.assertEqual(api_queries.is_number(value), listed, repr(value))

    @settings(max_examples=400, deadline=None)
    @given(
        st.one_of(
            st.text(alphabet="0123456789+-a \n\x00", max_size=36),
            st.text(st.characters(blacklist_categories=("Cs",)), max_size=40),
        )
    )
    def test_sql_filter_equals_regex(self, value):
        """For any text, the SQL filter and the regex ``^\\+?[0-9]{1,32}$`` agree."""
        conn = sqlite3.connect(":memory:")
        try:
            sql = "SELECT " + api_queries.NUMBER_FILTER_SQL + " FROM (SELECT ? AS called_number)"
            (result,) = conn.execute(sql, (value,)).fetchone()
        finally:
            conn.close()
        self.assertEqual(bool(result), api_queries.is_number(value), repr(value))

    def test_null_called_number_not_listed(self):
        """A row without a called number (NULL, as the original's 0-byte packets) is not listed."""
        conn = fresh_connection([make_event(1, called_number="100")])
        conn.execute("INSERT INTO honey (source_ip, called_number) VALUES ('192.0.2.9', NULL)")
        listing = api_queries.list_called_numbers(conn.cursor())
        self.assertEqual(listing, api_queries.Listing(1, [listing.entries[0]]))


class ListQueryTests(SynchronousTestCase):
    """The list queries: totals, counts, ``seen_last``, order and paging (reference §4.3 item 4,
    interface.md §5)."""

    def setUp(self):
        self.conn = fresh_connection(
            [
                make_event(1, "192.0.2.1", "100"),
                make_event(5, "192.0.2.1", "100"),
                make_event(3, "192.0.2.2", "+4420"),
                make_event(3, "192.0.2.3", "0046812", event_uuid=str(uuid.uuid4())),
                make_event(2, "2001:db8::1", "NOT_FOUND", event_uuid=str(uuid.uuid4())),
            ]
        )
        self.cursor = self.conn.cursor()

    def test_ip_list(self):
        """One entry per source_ip with its latest timestamp and row count; ordered by seen_last
        descending, ties by address ascending."""
        listing = api_queries.list_ip_addresses(self.cursor)
        self.assertEqual(listing.total, 4)
        self.assertEqual(
            listing.entries,
            [
                api_queries.Entry("192.0.2.1", make_event(5).event_timestamp, 2),
                api_queries.Entry("192.0.2.2", make_event(3).event_timestamp, 1),
                api_queries.Entry("192.0.2.3", make_event(3).event_timestamp, 1),
                api_queries.Entry("2001:db8::1", make_event(2).event_timestamp, 1),
            ],
        )

    def test_number_list(self):
        """Numbers are grouped like addresses; ``NOT_FOUND`` is left out."""
        listing = api_queries.list_called_numbers(self.cursor)
        self.assertEqual(listing.total, 3)
        self.assertEqual(
            [(e.value, e.seen_count) for e in listing.entries],
            [("100", 2), ("+4420", 1), ("0046812", 1)],
        )

    def test_limit_offset(self):
        """``limit`` and ``offset`` page through the same order; the total is the whole list's."""
        whole = api_queries.list_ip_addresses(self.cursor).entries
        self.assertEqual(api_queries.list_ip_addresses(self.cursor, 2).entries, whole[:2])
        self.assertEqual(api_queries.list_ip_addresses(self.cursor, 2, 1).entries, whole[1:3])
        self.assertEqual(api_queries.list_ip_addresses(self.cursor, None, 3).entries, whole[3:])
        self.assertEqual(api_queries.list_ip_addresses(self.cursor, 0).entries, [])
        page = api_queries.list_called_numbers(self.cursor, 1, 10)
        self.assertEqual(page, api_queries.Listing(3, []))
        huge = api_queries.list_ip_addresses(self.cursor, 10**30, 0)
        self.assertEqual(huge.entries, whole)

    def test_negative_paging_rejected(self):
        """Negative ``limit`` or ``offset`` raise ValueError (the resource answers 400 first)."""
        self.assertRaises(ValueError, api_queries.list_ip_addresses, self.cursor, -1)
        self.assertRaises(ValueError, api_queries.list_called_numbers, self.cursor, None, -1)

    def test_empty_database(self):
        """An empty database gives a zero total and no entries (not the original's 404, §14.13)."""
        cursor = fresh_connection().cursor()
        self.assertEqual(api_queries.list_ip_addresses(cursor), api_queries.Listing(0, []))
        self.assertEqual(api_queries.list_called_numbers(cursor), api_queries.Listing(0, []))

    def test_seen_last_without_timestamps(self):
        """Rows without ``event_timestamp`` fall back to ``created_at``; a NULL ``source_ip`` is
        not listed (the original did not count it either)."""
        conn = fresh_connection()
        conn.execute(
            "INSERT INTO honey (source_ip, called_number, created_at) VALUES ('192.0.2.5', '1', '2001-01-01')"
        )
        conn.execute("INSERT INTO honey (source_ip, called_number) VALUES (NULL, '2')")
        listing = api_queries.list_ip_addresses(conn.cursor())
        self.assertEqual(listing, api_queries.Listing(1, [api_queries.Entry("192.0.2.5", "2001-01-01", 1)]))

    def test_find(self):
        """Look-ups are exact: the first stored candidate spelling is returned; a listed number is
        found, leading zeros included; an unlisted form raises ValueError."""
        self.assertEqual(api_queries.find_ip_address(self.cursor, ["192.0.2.1"]), "192.0.2.1")
        found = api_queries.find_ip_address(self.cursor, ["::ffff:192.0.2.9", "192.0.2.2"])
        self.assertEqual(found, "192.0.2.2")
        self.assertIsNone(api_queries.find_ip_address(self.cursor, ["192.0.2.99"]))
        self.assertEqual(api_queries.find_called_number(self.cursor, "0046812"), "0046812")
        self.assertEqual(api_queries.find_called_number(self.cursor, "+4420"), "+4420")
        self.assertIsNone(api_queries.find_called_number(self.cursor, "4420"))
        self.assertRaises(ValueError, api_queries.find_called_number, self.cursor, "NOT_FOUND")

    def test_queries_use_indexes(self):
        """Every API query reads the summary tables, never ``honey``: look-ups are primary-key
        searches, list pages walk the covering ``seen_last`` index (no sort step)."""
        statements = []
        self.conn.set_trace_callback(statements.append)
        cursor = self.conn.cursor()
        api_queries.list_ip_addresses(cursor, 1, 1)
        api_queries.list_called_numbers(cursor, 1, 1)
        api_queries.list_body(cursor, "ip", 1, 1)
        api_queries.list_body(cursor, "number")
        api_queries.find_ip_address(cursor, ["192.0.2.1"])
        api_queries.find_called_number(cursor, "100")
        self.conn.set_trace_callback(None)
        statements = [s for s in statements if s not in ("BEGIN", "COMMIT")]  # list_body's snapshot
        self.assertEqual(len(statements), 10)
        for statement in statements:
            if "summary_state" in statement:  # list_body's total and needs_escape
                self.assertRegex(statement, r"^SELECT \(SELECT count\(\*\) FROM (ip|number)_summary\)")
                continue
            plan = " ".join(row[3] for row in self.conn.execute("EXPLAIN QUERY PLAN " + statement))
            self.assertNotIn("honey", plan)
            self.assertNotIn("TEMP B-TREE", plan)
            if "WHERE" in statement:
                self.assertRegex(plan, r"SEARCH (ip|number)_summary USING PRIMARY KEY")
            else:
                self.assertRegex(plan, r"SCAN (ip|number)_summary USING COVERING INDEX \w+_seen_last_index")


# ---------------------------------------------------------------------------------------------
# Pure helpers of the resource


class ResolveTests(SynchronousTestCase):
    """Routing is exact matching of the raw path (interface.md §5; bug §14.13; reference §13.1
    items 11-13)."""

    def test_exact_routes(self):
        """The four fixed routes match only themselves."""
        self.assertEqual(resources.resolve(b"/health-check"), ("health-check", None))
        self.assertEqual(resources.resolve(b"/"), ("root", None))
        self.assertEqual(resources.resolve(b"/ip-addresses"), ("ip-addresses", None))
        self.assertEqual(resources.resolve(b"/numbers"), ("numbers", None))

    def test_parameter_routes(self):
        """``/ip-addresses/{ip}`` and ``/numbers/{number}`` capture one raw segment."""
        self.assertEqual(resources.resolve(b"/ip-addresses/8.8.8.8"), ("ip-address", b"8.8.8.8"))
        self.assertEqual(resources.resolve(b"/numbers/%2B44"), ("number", b"%2B44"))
        self.assertEqual(resources.resolve(b"/numbers/+44"), ("number", b"+44"))

    def test_no_route(self):
        """Trailing slashes, prefixes, longer paths and lookalikes are no route (404)."""
        for path in (
            b"/health-check/",
            b"/ip-addresses/",
            b"/numbers/",
            b"/ip-addresses/1.2.3.4/",
            b"/ip-addresses/1.2.3.4/x",
            b"/x/ip-addresses/1.2.3.4",
            b"/x/numbers/123",
            b"/blah",
            b"",
            b"//",
            b"/test/route/check",
            b"/test/rt",
            b"/ip-/",
            b"/ip-",
            b"/ip-this-is-longer-url-than-we-have-a-route-for-but-has-ip-prefix/",
            b"/ip-addresses/ipset/x",
            b"/countries",
            b"/user-agents",
            b"/sip-methods",
            b"/HEALTH-CHECK",
            b"http://host/numbers",
        ):
            self.assertIsNone(resources.resolve(path), path)


class ValidationTests(SynchronousTestCase):
    """Address and number validation and normalisation (reference §5.3, interface.md §5)."""

    def test_valid_addresses(self):
        """inet_pton-valid literals are accepted and canonicalised like stored addresses."""
        cases = {
            "8.8.8.8": "8.8.8.8",
            "0.0.0.0": "0.0.0.0",
            "::1": "::1",
            "::ffff:1.2.3.4": "1.2.3.4",
            "::FFFF:1.2.3.4": "1.2.3.4",
            "2001:0db8::1": "2001:db8::1",
            "2001:DB8:0:0:0:0:0:1": "2001:db8::1",
            "2001:0db8:85a3:0000:0000:8a2e:0370:7334": "2001:db8:85a3::8a2e:370:7334",
        }
        for text, canonical in cases.items():
            self.assertEqual(resources.normalise_ip(text), canonical, text)

    def test_invalid_addresses(self):
        """The original's rejections (reference §5.3) and other near-misses are invalid."""
        for text in (
            "08.8.8.8",
            "1.2.3",
            "256.1.1.1",
            "0x7f.0.0.1",
            "fe80::1%eth0",
            "[::1]",
            "1.2.3.4:5060",
            "1.2.3.4 ",
            " 1.2.3.4",
            "104.14da3afcsasd",
            "1.2.3.4\x00",
            "\u0661.2.3.4",
            "::ffff:01.2.3.4",
            "1:2:3:4:5:6:7:8:9",
            "",
            "ipset",
        ):
            self.assertIsNone(resources.normalise_ip(text), repr(text))
            self.assertIsNone(resources.ip_lookup_forms(text), repr(text))

    def test_lookup_forms(self):
        """Look-ups try the canonical form first, then the IPv4-mapped form, then the text given."""
        self.assertEqual(resources.ip_lookup_forms("1.2.3.4"), ("1.2.3.4", "::ffff:1.2.3.4"))
        self.assertEqual(resources.ip_lookup_forms("::ffff:1.2.3.4"), ("1.2.3.4", "::ffff:1.2.3.4"))
        self.assertEqual(resources.ip_lookup_forms("2001:0db8::1"), ("2001:db8::1", "2001:0db8::1"))
        self.assertEqual(resources.ip_lookup_forms("::1"), ("::1",))

    def test_decode_segment(self):
        """A segment is percent-decoded exactly once; ``+`` stays ``+``; non-ASCII is refused."""
        self.assertEqual(resources.decode_segment(b"%2B44"), "+44")
        self.assertEqual(resources.decode_segment(b"%2b44"), "+44")
        self.assertEqual(resources.decode_segment(b"+44"), "+44")
        self.assertEqual(resources.decode_segment(b"%252B44"), "%2B44")
        self.assertEqual(resources.decode_segment(b"%3A%3A1"), "::1")
        self.assertIsNone(resources.decode_segment(b"%C3%A9"))
        self.assertIsNone(resources.decode_segment(b"1" * 300))

    def test_parse_page(self):
        """``limit``/``offset``: absent means all from 0; non-negative decimal integers only."""
        self.assertEqual(resources.parse_page({}), (None, 0))
        self.assertEqual(resources.parse_page({b"limit": [b"5"], b"offset": [b"2"]}), (5, 2))
        self.assertEqual(resources.parse_page({b"limit": [b"0"]}), (0, 0))
        self.assertEqual(resources.parse_page({b"other": [b"x"]}), (None, 0))
        self.assertEqual(resources.parse_page({b"limit": [b"9" * 30]}), (api_queries.MAX_ROWS, 0))
        for bad in (b"", b"-1", b"+1", b" 1", b"1.0", b"abc", b"1e3", b"0x10", "\u0663".encode(), b"9" * 31):
            for name in (b"limit", b"offset"):
                self.assertRaises(resources.BadRequest, resources.parse_page, {name: [bad]})
        self.assertRaises(resources.BadRequest, resources.parse_page, {b"limit": [b"1", b"2"]})

    def test_wants_json(self):
        """Health check JSON: request Content-Type starting with application/json (the original),
        or Accept listing application/json with q > 0 (bug §14.13); else HTML."""
        yes = [
            (b"application/json", None),
            (b"Application/JSON; charset=utf-8", None),
            (None, b"application/json"),
            (None, b"text/html, application/json;q=0.5"),
            (b"text/plain", b"APPLICATION/JSON"),
        ]
        no = [
            (None, None),
            (b"text/plain", None),
            (None, b"*/*"),
            (None, b"application/*"),
            (None, b"application/json;q=0"),
            (None, b"application/jsonx"),
            (b"x-application/json", None),
        ]
        for content_type, accept in yes:
            self.assertTrue(resources.wants_json(content_type, accept), (content_type, accept))
        for content_type, accept in no:
            self.assertFalse(resources.wants_json(content_type, accept), (content_type, accept))

    def test_encode_listing_matches_json_module(self):
        """List bodies are what ``json.dumps(indent=2)`` gives (the original's jansson layout),
        seen_count a string, a missing seen_last ``NOT_FOUND``, attacker text escaped."""
        entries = [
            api_queries.Entry("1.2.3.4", "2020-11-18 20:13:17.349557105", 1263),
            api_queries.Entry('"}<script>\u00e9\n', None, 1),
        ]
        for listing in (api_queries.Listing(0, []), api_queries.Listing(7, entries)):
            body = resources.encode_listing(
                listing, "called_numbers_total", "called_numbers", "called_number"
            )
            expected = {
                "called_numbers_total": listing.total,
                "called_numbers": [
                    {
                        "called_number": e.value,
                        "seen_last": e.seen_last or "NOT_FOUND",
                        "seen_count": str(e.seen_count),
                    }
                    for e in listing.entries
                ],
            }
            self.assertEqual(body, json.dumps(expected, indent=2).encode("ascii"))


class TokenTests(SynchronousTestCase):
    """``check_token`` for the dashboard: Bearer, or Basic with the token as password."""

    def request(self, *authorization: bytes) -> DummyRequest:
        request = DummyRequest([b""])
        if authorization:
            request.requestHeaders.setRawHeaders(b"Authorization", list(authorization))
        return request

    def basic(self, user: bytes, password: bytes) -> bytes:
        return b"Basic " + base64.b64encode(user + b":" + password)

    def test_open_without_token(self):
        """No token (None or empty) means open: every request passes."""
        self.assertTrue(check_token(self.request(), None))
        self.assertTrue(check_token(self.request(), ""))
        self.assertTrue(check_token(self.request(b"Bearer whatever"), None))

    def test_accepted(self):
        """Bearer with the token (scheme in any case) and Basic with it as password pass."""
        self.assertTrue(check_token(self.request(b"Bearer s3cr\xc3\xa9t"), "s3cr\u00e9t"))
        self.assertTrue(check_token(self.request(b"bearer s3cret"), "s3cret"))
        self.assertTrue(check_token(self.request(self.basic(b"admin", b"s3cret")), "s3cret"))
        self.assertTrue(check_token(self.request(self.basic(b"", b"s3cret")), "s3cret"))

    def test_refused(self):
        """Missing, wrong, empty, malformed or repeated credentials fail."""
        token = "s3cret"
        for header in (
            (),
            (b"Bearer wrong",),
            (b"Bearer ",),
            (b"Bearer",),
            (b"Bearer s3cret2",),
            (b"s3cret",),
            (b"Token s3cret",),
            (self.basic(b"s3cret", b"x"),),
            (b"Basic " + base64.b64encode(b"s3cret"),),
            (b"Basic !!!notbase64",),
            (b"Bearer s3cret", b"Bearer s3cret"),
        ):
            self.assertFalse(check_token(self.request(*header), token), header)

    def test_api_routes_take_bearer_only(self):
        """The API routes' check (``allow_basic=False``) refuses Basic."""
        self.assertFalse(resources.credentials_match(self.basic(b"u", b"t"), "t", allow_basic=False))
        self.assertTrue(resources.credentials_match(b"Bearer t", "t", allow_basic=False))


# ---------------------------------------------------------------------------------------------
# The resource without a network


class FailingDatabase:
    """A database whose every query fails with *error*."""

    def __init__(self, error: Exception) -> None:
        self.error = error
        self.calls = 0

    def run_query(self, fn, *args):
        self.calls += 1
        return defer.fail(self.error)


class RecordingDatabase:
    """A database answering queries with a plain in-memory sqlite3 connection, synchronously."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self.functions = []

    def run_query(self, fn, *args):
        self.functions.append(fn)
        return defer.maybeDeferred(fn, self.conn.cursor(), *args)


class ResourceTests(SynchronousTestCase):
    """The resource driven with DummyRequest: errors, logging and what goes through the database."""

    def render(self, database, path: bytes, method: bytes = b"GET") -> DummyRequest:
        request = DummyRequest([b""])
        request.method = method
        request.path = path
        self.assertIs(resources.APIResource(database).render(request), NOT_DONE_YET)
        return request

    def test_database_error_is_500_and_one_log_line(self):
        """A failing query answers 500 with a JSON error and logs exactly one error event, with
        the attacker-influenced text escaped onto one line and no client address."""
        observer = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        database = FailingDatabase(sqlite3.OperationalError("disk I/O error\n\x1b[2Jforged line"))
        request = self.render(database, b"/numbers/+4420")
        self.assertEqual(request.responseCode, 500)
        self.assertEqual(json.loads(b"".join(request.written)), {"error": "Internal server error"})
        self.assertEqual(request.finished, 1)
        errors = [e for e in observer if e["log_level"] >= LogLevel.warn]
        self.assertEqual(len(errors), 1)
        text = formatEvent(errors[0])
        self.assertNotIn("\n", text)
        self.assertNotIn("\x1b", text)
        self.assertIn("OperationalError", text)
        self.assertIn("/numbers/+4420", text)
        self.assertIn("\\n\\x1b[2Jforged line", text)
        self.assertEqual(errors[0]["log_namespace"], "sentrypeer.api")

    def test_unexpected_exception_is_500(self):
        """A bug raising inside the resource still gives a JSON 500, not Twisted's HTML page."""
        observer = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)

        class Broken:
            def run_query(self, fn, *args):
                raise RuntimeError("boom")

        request = self.render(Broken(), b"/ip-addresses")
        self.assertEqual(request.responseCode, 500)
        self.assertEqual(request.responseHeaders.getRawHeaders(b"Content-Type"), [b"application/json"])
        self.assertEqual(len([e for e in observer if e["log_level"] >= LogLevel.warn]), 1)

    def test_client_gone_before_answer(self):
        """When the client disconnects before the query answers, nothing is written."""
        pending = defer.Deferred()

        class Slow:
            def run_query(self, fn, *args):
                return pending

        request = self.render(Slow(), b"/numbers")
        request.processingFailed(Exception("connection lost"))
        pending.callback(b"{}")
        self.assertEqual(request.written, [])

    def test_queries_go_through_run_query(self):
        """Every data route reads through ``database.run_query`` with an api_queries function (or
        the list bodies' wrappers), never directly."""
        database = RecordingDatabase(fresh_connection([make_event(1)]))
        for path in (b"/ip-addresses", b"/numbers", b"/ip-addresses/203.0.113.7", b"/numbers/100"):
            request = self.render(database, path)
            self.assertEqual(request.responseCode, 200, path)
        self.assertEqual(len(database.functions), 4)
        self.assertIn(api_queries.find_ip_address, database.functions)
        self.assertIn(api_queries.find_called_number, database.functions)

    def test_no_database_for_static_and_invalid(self):
        """``/``, the health check, 400s, 404s and 405s never touch the database."""
        database = FailingDatabase(AssertionError("not expected"))
        for path, method, code in (
            (b"/", b"GET", 200),
            (b"/health-check", b"GET", 200),
            (b"/numbers/12a", b"GET", 400),
            (b"/ip-addresses/08.8.8.8", b"GET", 400),
            (b"/blah", b"GET", 404),
            (b"/numbers", b"POST", 405),
        ):
            self.assertEqual(self.render(database, path, method).responseCode, code, path)
        self.assertEqual(database.calls, 0)


class ReadingDatabase(RecordingDatabase):
    """A RecordingDatabase that also has ``run_read`` (like Database), recorded apart."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        super().__init__(conn)
        self.reads = []

    def run_read(self, fn, *args):
        self.reads.append(fn)
        return defer.maybeDeferred(fn, self.conn.cursor(), *args)


class ListBodyTests(SynchronousTestCase):
    """The list bodies written by SQLite (``api_queries.list_body``) are byte for byte what the
    Python encoder gives for the same listing (issue 7)."""

    def bodies(self, conn: sqlite3.Connection, what: str, limit=None, offset=0):
        cursor = conn.cursor()
        keys = api_queries.LIST_KEYS[what]
        listing = (api_queries.list_ip_addresses if what == "ip" else api_queries.list_called_numbers)(
            cursor, limit, offset
        )
        return api_queries.list_body(cursor, what, limit, offset), resources.encode_listing(listing, *keys)

    @settings(max_examples=150, deadline=None)
    @given(
        st.lists(
            st.tuples(
                st.one_of(st.sampled_from(["192.0.2.1", "2001:db8::1", "::ffff:1.2.3.4"]),
                          st.text(max_size=12)),
                st.one_of(st.sampled_from(["100", "+4420", "0046812"]), st.text(alphabet="+0123456789",
                                                                                 max_size=34)),
                st.integers(0, 40),
            ),
            max_size=25,
        ),
        st.one_of(st.none(), st.integers(0, 30)),
        st.integers(0, 5),
    )
    def test_sql_body_equals_python(self, rows, limit, offset):
        """For any stored addresses and numbers (control characters, quotes, backslashes,
        non-ASCII and NULs included) and any page, list_body gives the Python encoder's bytes,
        or None (then the resource encodes the page in Python) exactly when some stored address
        needs escaping (``summary_state.needs_escape``; numbers and timestamps here are plain)."""
        events = [make_event(n, ip, number, event_uuid=str(uuid.uuid4())) for ip, number, n in rows]
        conn = fresh_connection(events)
        for what in ("ip", "number"):
            sql, python = self.bodies(conn, what, limit, offset)
            escape = any(resources.json_line({"v": ip}) != b'{"v": "%s"}' % ip.encode()
                         for ip, _, _ in rows)
            if sql is None:
                self.assertTrue(escape, rows)
            else:
                self.assertFalse(escape, rows)
                self.assertEqual(sql, python)
            self.assertEqual(json.loads(python), json.loads(
                resources._ip_list_body(conn.cursor(), limit, offset) if what == "ip"
                else resources._number_list_body(conn.cursor(), limit, offset)))

    def test_seen_last_missing_or_empty(self):
        """A summary without seen_last, or with an empty one, is NOT_FOUND in both encoders."""
        conn = fresh_connection([make_event(1, "192.0.2.1", "100"), make_event(2, "192.0.2.2", "200")])
        conn.execute("UPDATE ip_summary SET seen_last = NULL WHERE source_ip = '192.0.2.1'")
        conn.execute("UPDATE ip_summary SET seen_last = '' WHERE source_ip = '192.0.2.2'")
        sql, python = self.bodies(conn, "ip")
        self.assertEqual(sql, python)
        self.assertEqual(json.loads(sql)["ip_addresses"][0]["seen_last"], "NOT_FOUND")

    def test_routes_prefer_run_read(self):
        """With a database that has run_read (the reader connection), every data route reads
        through it and none through run_query."""
        database = ReadingDatabase(fresh_connection([make_event(1)]))
        for path in (b"/ip-addresses", b"/numbers", b"/ip-addresses/203.0.113.7", b"/numbers/100"):
            request = DummyRequest([b""])
            request.path = path
            resources.APIResource(database).render(request)
            self.assertEqual(request.responseCode, 200, path)
        self.assertEqual(len(database.reads), 4)
        self.assertEqual(database.functions, [])


class SiteObjectTests(SynchronousTestCase):
    """``make_site`` builds a private site (no access log) with a bounded idle timeout."""

    def test_site(self):
        """The site keeps no request log, shows no tracebacks, times idle connections out after
        IDLE_TIMEOUT on the clock given, and serves APIResource."""
        clock = task.Clock()
        site = make_site(object(), token="t", clock=clock)
        self.assertIsInstance(site, PrivateSite)
        self.assertIsInstance(site.resource, resources.APIResource)
        self.assertEqual(site.resource.token, "t")
        self.assertIs(site.reactor, clock)
        self.assertEqual(site.timeOut, IDLE_TIMEOUT)
        self.assertFalse(site.displayTracebacks)
        self.assertIsNone(site.log(DummyRequest([b""])))

    def test_empty_token_is_open(self):
        """An empty token means no token (an empty variable counts as unset, interface.md §2)."""
        self.assertIsNone(make_site(object(), token="").resource.token)


# ---------------------------------------------------------------------------------------------
# A real site on loopback, over a real database file


class SiteTestCase(TestCase):
    """Base: a real ``Database`` on a temporary file and the site on a loopback ephemeral port."""

    timeout = 60

    @defer.inlineCallbacks
    def open_database(self, events=()):
        path = os.path.abspath(self.mktemp())
        os.makedirs(os.path.dirname(path), exist_ok=True)
        prepare_database(path)
        database = Database(path, reactor)
        yield database.start()
        self.addCleanup(database.close)
        if events:
            yield database.run_query(queries.insert_events, list(events))
        return database

    @defer.inlineCallbacks
    def start_site(self, events=(), token=None, database=None):
        if database is None:
            database = yield self.open_database(events)
        self.database = database
        site = make_site(database, token=token)
        port = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.base = b"http://127.0.0.1:%d" % port.getHost().port
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(pool.closeCachedConnections)
        self.agent = Agent(reactor, pool=pool)
        self.http = treq.client.HTTPClient(self.agent)
        return site

    @defer.inlineCallbacks
    def fetch(self, path, method=b"GET", headers=None):
        """Send *path* exactly as given (bytes, nothing re-encoded); returns (response, body)."""
        if isinstance(path, str):
            path = path.encode("ascii")
        response = yield self.agent.request(method, self.base + path, Headers(headers or {}))
        body = yield treq.content(response)
        return response, body

    @defer.inlineCallbacks
    def fetch_json(self, path, code=200, **kwargs):
        response, body = yield self.fetch(path, **kwargs)
        self.assertEqual(response.code, code, (path, body))
        self.assertEqual(self.header(response, "Content-Type"), "application/json")
        return json.loads(body)

    @staticmethod
    def header(response, name):
        values = response.headers.getRawHeaders(name)
        return None if values is None else values[-1]

    def assertAPIHeaders(self, response, content_type="application/json"):
        self.assertEqual(response.headers.getRawHeaders("Content-Type"), [content_type])
        self.assertEqual(response.headers.getRawHeaders("X-Powered-By"), ["SentryPeer"])
        self.assertEqual(response.headers.getRawHeaders("X-SentryPeer-Version"), [__version__])
        self.assertEqual(response.headers.getRawHeaders("Access-Control-Allow-Origin"), ["*"])


class RouteTests(SiteTestCase):
    """Every route, status, header and shape over HTTP (interface.md §5, reference §5)."""

    @defer.inlineCallbacks
    def test_original_expectations(self):
        """The original's HTTP test (reference §13.1 item 10) on its fixture row: health check JSON
        version, then /health-check 200, /blah 404, /ip-addresses/8.8.8.8 404,
        /ip-addresses/104.149.141.214 200, /ip-addresses 200, /ip-addresses/104.14da3afcsasd 400,
        /numbers 200, /numbers/123456789 404, /numbers/100 200."""
        yield self.start_site([original_fixture_event()])
        health = yield self.fetch_json("/health-check", headers={"Content-Type": ["application/json"]})
        self.assertEqual(health["version"], __version__)
        for path, code in (
            ("/health-check", 200),
            ("/blah", 404),
            ("/ip-addresses/8.8.8.8", 404),
            ("/ip-addresses/104.149.141.214", 200),
            ("/ip-addresses", 200),
            ("/ip-addresses/104.14da3afcsasd", 400),
            ("/numbers", 200),
            ("/numbers/123456789", 404),
            ("/numbers/100", 200),
        ):
            response, _ = yield self.fetch(path)
            self.assertEqual(response.code, code, path)

    @defer.inlineCallbacks
    def test_health_check_html(self):
        """Without a JSON Content-Type or Accept the health check is the original's HTML page;
        ``*/*`` (curl's default) and a query string change nothing."""
        yield self.start_site()
        for path, headers in (
            ("/health-check", None),
            ("/health-check", {"Accept": ["*/*"]}),
            ("/health-check?format=json", {"Accept": ["text/html"]}),
        ):
            response, body = yield self.fetch(path, headers=headers)
            self.assertEqual(response.code, 200)
            self.assertAPIHeaders(response, "text/html")
            self.assertEqual(body, HEALTH_HTML)

    @defer.inlineCallbacks
    def test_health_check_json(self):
        """JSON, pretty with keys status/message/version in that order, for a request
        Content-Type of application/json (the original's rule) or an Accept asking for it."""
        yield self.start_site()
        expected = (
            '{\n  "status": "OK",\n  "message": "Hello from SentryPeer!",\n  "version": "%s"\n}' % __version__
        ).encode()
        for headers in (
            {"Content-Type": ["application/json"]},
            {"Content-Type": ["application/json; charset=utf-8"]},
            {"Accept": ["application/json"]},
        ):
            response, body = yield self.fetch("/health-check", headers=headers)
            self.assertEqual(response.code, 200)
            self.assertAPIHeaders(response)
            self.assertEqual(body, expected)
            self.assertEqual(response.length, len(expected))

    @defer.inlineCallbacks
    def test_root(self):
        """``/`` answers ``{"status": "OK"}`` on one line."""
        yield self.start_site()
        response, body = yield self.fetch("/")
        self.assertEqual(response.code, 200)
        self.assertAPIHeaders(response)
        self.assertEqual(body, b'{"status": "OK"}')

    @defer.inlineCallbacks
    def test_ip_list_shape(self):
        """``/ip-addresses``: integer total, entries of ip_address / seen_last / seen_count (a
        string), newest first, indented by two spaces."""
        yield self.start_site(
            [
                make_event(1, "192.0.2.1"),
                make_event(4, "192.0.2.1"),
                make_event(2, "2001:db8::1"),
            ]
        )
        response, body = yield self.fetch("/ip-addresses")
        self.assertEqual(response.code, 200)
        self.assertAPIHeaders(response)
        expected = {
            "ip_addresses_total": 2,
            "ip_addresses": [
                {"ip_address": "192.0.2.1", "seen_last": make_event(4).event_timestamp, "seen_count": "2"},
                {"ip_address": "2001:db8::1", "seen_last": make_event(2).event_timestamp, "seen_count": "1"},
            ],
        }
        self.assertEqual(body, json.dumps(expected, indent=2).encode())
        self.assertEqual(list(json.loads(body)), ["ip_addresses_total", "ip_addresses"])

    @defer.inlineCallbacks
    def test_number_list_shape(self):
        """``/numbers``: called_numbers_total and called_numbers entries; every number of the
        form ``^\\+?[0-9]{1,32}$`` is listed (leading zeros too), nothing else."""
        events = [make_event(i, called_number=value) for i, (value, _) in enumerate(NUMBER_CASES)]
        yield self.start_site(events)
        got = yield self.fetch_json("/numbers")
        listed = [value for value, ok in NUMBER_CASES if ok]
        self.assertEqual(list(got), ["called_numbers_total", "called_numbers"])
        self.assertEqual(got["called_numbers_total"], len(listed))
        self.assertEqual(sorted(e["called_number"] for e in got["called_numbers"]), sorted(listed))
        for entry in got["called_numbers"]:
            self.assertEqual(list(entry), ["called_number", "seen_last", "seen_count"])
            self.assertEqual(entry["seen_count"], "1")
        timestamps = [e["seen_last"] for e in got["called_numbers"]]
        self.assertEqual(timestamps, sorted(timestamps, reverse=True))

    @defer.inlineCallbacks
    def test_empty_database(self):
        """An empty database gives 200 with a zero total and an empty list on both list routes
        (the original's 404 was bug §14.13); look-ups are 404 with the original's messages."""
        yield self.start_site()
        got = yield self.fetch_json("/ip-addresses")
        self.assertEqual(got, {"ip_addresses_total": 0, "ip_addresses": []})
        got = yield self.fetch_json("/numbers")
        self.assertEqual(got, {"called_numbers_total": 0, "called_numbers": []})
        response, body = yield self.fetch("/ip-addresses/8.8.8.8")
        self.assertEqual((response.code, body), (404, b'{"message": "No bad actor found"}'))
        response, body = yield self.fetch("/numbers/100")
        self.assertEqual((response.code, body), (404, b'{"message": "No phone number found"}'))

    @defer.inlineCallbacks
    def test_single_lookups(self):
        """Found: 200 with a pretty ``bad_actor_found`` / ``phone_number_found`` body."""
        yield self.start_site([make_event(1, "192.0.2.1", "+441234"), make_event(2, "192.0.2.2", "0046812")])
        response, body = yield self.fetch("/ip-addresses/192.0.2.1")
        self.assertEqual(response.code, 200)
        self.assertAPIHeaders(response)
        self.assertEqual(body, b'{\n  "bad_actor_found": "192.0.2.1"\n}')
        response, body = yield self.fetch("/numbers/0046812")
        self.assertEqual(response.code, 200)
        self.assertEqual(body, b'{\n  "phone_number_found": "0046812"\n}')

    @defer.inlineCallbacks
    def test_plus_numbers(self):
        """``/numbers/+44…`` and the percent-encoded ``/numbers/%2B44…`` find ``+44…``;
        ``%252B`` is decoded once only (400); ``44…`` is another number (404)."""
        yield self.start_site([make_event(1, called_number="+441234567890")])
        for path in ("/numbers/+441234567890", "/numbers/%2B441234567890", "/numbers/%2b441234567890"):
            got = yield self.fetch_json(path)
            self.assertEqual(got, {"phone_number_found": "+441234567890"})
        yield self.fetch_json("/numbers/441234567890", code=404)
        got = yield self.fetch_json("/numbers/%252B441234567890", code=400)
        self.assertIn("error", got)

    @defer.inlineCallbacks
    def test_normalised_ip_lookups(self):
        """IPv4-mapped and non-canonical IPv6 spellings find the stored canonical address, and
        the answer names the stored form (interface.md §5)."""
        yield self.start_site([make_event(1, "1.2.3.4"), make_event(2, "2001:db8::1")])
        for path, found in (
            ("/ip-addresses/::ffff:1.2.3.4", "1.2.3.4"),
            ("/ip-addresses/%3A%3Affff%3A1.2.3.4", "1.2.3.4"),
            ("/ip-addresses/2001:0db8::1", "2001:db8::1"),
            ("/ip-addresses/2001:DB8:0:0:0:0:0:1", "2001:db8::1"),
            ("/ip-addresses/2001:db8::1", "2001:db8::1"),
        ):
            got = yield self.fetch_json(path)
            self.assertEqual(got, {"bad_actor_found": found}, path)
        yield self.fetch_json("/ip-addresses/2001:db8::2", code=404)

    @defer.inlineCallbacks
    def test_bad_requests(self):
        """Invalid addresses and numbers answer 400 ``{"error": …}`` (the original's 404 for a
        bad number was bug §14.13), with the API headers."""
        yield self.start_site([make_event(1)])
        for path in (
            "/ip-addresses/08.8.8.8",
            "/ip-addresses/1.2.3.4:5060",
            "/ip-addresses/104.14da3afcsasd",
            "/ip-addresses/%5B::1%5D",
            "/ip-addresses/fe80::1%25eth0",
            "/ip-addresses/ipset",
            "/ip-addresses/1.2.3.4%00",
            "/ip-addresses/1.2.3.4%2F32",
            "/numbers/12a",
            "/numbers/++44",
            "/numbers/+abc",
            "/numbers/-5",
            "/numbers/+",
            "/numbers/NOT_FOUND",
            "/numbers/" + "1" * 33,
            "/numbers/%2B%2B44",
            "/numbers/%C3%A9",
            "/numbers/1%0A",
        ):
            response, body = yield self.fetch(path)
            self.assertEqual(response.code, 400, path)
            self.assertAPIHeaders(response)
            self.assertEqual(json.loads(body), {"error": "The request data was invalid"})

    @defer.inlineCallbacks
    def test_not_found(self):
        """Unknown paths, trailing slashes and prefixed routes are 404 with the original's JSON
        error (exact matching, bug §14.13)."""
        yield self.start_site([make_event(1, "1.2.3.4")])
        for path in (
            "/blah",
            "/health-check/",
            "/ip-addresses/",
            "/numbers/",
            "/x/ip-addresses/1.2.3.4",
            "/anything/numbers/100",
            "/ip-addresses/1.2.3.4/",
            "/numbers/100/x",
            "/countries",
            "/countries/:country",
            "/user-agents",
            "/sip-methods",
            "/%6Eumbers",
            "/blah?x=/numbers",
        ):
            response, body = yield self.fetch(path)
            self.assertEqual(response.code, 404, path)
            self.assertAPIHeaders(response)
            self.assertEqual(json.loads(body), NOT_FOUND_BODY)

    @defer.inlineCallbacks
    def test_query_string_never_routes(self):
        """A query string does not change which route answers."""
        yield self.start_site([make_event(1, "1.2.3.4")])
        yield self.fetch_json("/ip-addresses?x=1")
        yield self.fetch_json("/ip-addresses/1.2.3.4?limit=nonsense")
        yield self.fetch_json("/numbers/100?/x")
        response, _ = yield self.fetch("/?a=b")
        self.assertEqual(response.code, 200)

    @defer.inlineCallbacks
    def test_limit_offset(self):
        """``limit`` and ``offset`` page the lists; the total stays the whole list's."""
        yield self.start_site([make_event(i, f"192.0.2.{i}", str(1000 + i)) for i in range(1, 8)])
        whole = yield self.fetch_json("/ip-addresses")
        page = yield self.fetch_json("/ip-addresses?limit=3&offset=2")
        self.assertEqual(page["ip_addresses_total"], 7)
        self.assertEqual(page["ip_addresses"], whole["ip_addresses"][2:5])
        numbers = yield self.fetch_json("/numbers")
        page = yield self.fetch_json("/numbers?offset=5")
        self.assertEqual(page["called_numbers"], numbers["called_numbers"][5:])
        page = yield self.fetch_json("/numbers?limit=0")
        self.assertEqual(page, {"called_numbers_total": 7, "called_numbers": []})
        page = yield self.fetch_json("/numbers?limit=%31")
        self.assertEqual(len(page["called_numbers"]), 1)

    @defer.inlineCallbacks
    def test_invalid_limit_offset(self):
        """Anything but a non-negative integer for ``limit``/``offset`` is a 400."""
        yield self.start_site([make_event(1)])
        bad = ("limit=-1", "limit=abc", "offset=1.5", "limit=", "offset=-0", "limit=1&limit=2", "limit=+3")
        for query in bad:
            for route in ("/ip-addresses", "/numbers"):
                got = yield self.fetch_json(f"{route}?{query}", code=400)
                self.assertEqual(list(got), ["error"])

    @defer.inlineCallbacks
    def test_head(self):
        """HEAD answers every route like GET: same status and headers (Content-Length of the GET
        body included), no body."""
        yield self.start_site([make_event(1, "1.2.3.4", "100")])
        for path in ALL_ROUTES + ("/blah", "/numbers/12a"):
            get, get_body = yield self.fetch(path)
            head, head_body = yield self.fetch(path, method=b"HEAD")
            self.assertEqual(head.code, get.code, path)
            self.assertEqual(head_body, b"", path)
            self.assertEqual(get.length, len(get_body), path)
            self.assertEqual(self.header(head, "Content-Length"), str(len(get_body)), path)
            self.assertEqual(self.header(head, "Content-Type"), self.header(get, "Content-Type"))
            self.assertAPIHeaders(head, self.header(get, "Content-Type"))

    @defer.inlineCallbacks
    def test_other_methods_405(self):
        """Other methods get 405 with a JSON error and ``Allow: GET, HEAD`` (the original dropped
        the connection, bug §14.13)."""
        yield self.start_site([make_event(1, "1.2.3.4", "100")])
        for method in (b"POST", b"PUT", b"DELETE", b"OPTIONS", b"PATCH", b"PROPFIND"):
            for path in ALL_ROUTES:
                response, body = yield self.fetch(path, method=method)
                self.assertEqual(response.code, 405, (method, path))
                self.assertEqual(response.headers.getRawHeaders("Allow"), ["GET, HEAD"])
                self.assertAPIHeaders(response)
                self.assertEqual(list(json.loads(body)), ["error"])

    @defer.inlineCallbacks
    def test_treq_client(self):
        """An ordinary client (treq, URL as text) gets the same answers as exact-bytes requests."""
        yield self.start_site([make_event(1, "1.2.3.4", "+4412")])
        response = yield self.http.get((self.base + b"/numbers/+4412").decode())
        self.assertEqual(response.code, 200)
        self.assertEqual((yield response.json()), {"phone_number_found": "+4412"})
        response = yield self.http.get((self.base + b"/ip-addresses").decode(), params={"limit": "1"})
        self.assertEqual((yield response.json())["ip_addresses_total"], 1)

    @defer.inlineCallbacks
    def test_queries_run_off_the_reactor_thread(self):
        """The data routes' SQL runs in the database thread, never in the reactor's."""
        database = yield self.open_database([make_event(1)])
        threads = []

        class Spy:
            def run_query(self, fn, *args):
                def spied(cursor, *args):
                    threads.append(threading.current_thread())
                    return fn(cursor, *args)

                return database.run_query(spied, *args)

        yield self.start_site(database=Spy())
        for path in ("/ip-addresses", "/numbers", "/ip-addresses/203.0.113.7", "/numbers/100"):
            yield self.fetch_json(path)
        self.assertEqual(len(threads), 4)
        self.assertNotIn(threading.main_thread(), threads)

    @defer.inlineCallbacks
    def test_database_error(self):
        """A database error is a 500 JSON error with the API headers, logged once."""
        observer = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        yield self.start_site(database=FailingDatabase(sqlite3.OperationalError("database is locked")))
        response, body = yield self.fetch("/ip-addresses")
        self.assertEqual(response.code, 500)
        self.assertAPIHeaders(response)
        self.assertEqual(json.loads(body), {"error": "Internal server error"})
        errors = [e for e in observer if e["log_level"] >= LogLevel.warn]
        self.assertEqual(len(errors), 1)
        self.assertIn("database is locked", formatEvent(errors[0]))

    @defer.inlineCallbacks
    def test_no_request_logging(self):
        """Serving requests logs nothing that names the client (privacy): no access log."""
        observer = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        yield self.start_site([make_event(1)])
        for path in ALL_ROUTES + ("/blah",):
            yield self.fetch(path)
        for event in observer:
            text = formatEvent(event)
            if "_HTTP11ClientFactory" in text:
                continue  # the test's own HTTP client
            self.assertNotIn("127.0.0.1", text)
            self.assertNotIn("/numbers", text)


class TokenRouteTests(SiteTestCase):
    """``--api-token`` (issue 3): every route but ``/health-check`` needs the Bearer token."""

    @defer.inlineCallbacks
    def test_token_required(self):
        """Without or with a wrong token: 401, JSON error, ``WWW-Authenticate: Bearer``, API
        headers; HTTP Basic is not accepted by the API routes."""
        yield self.start_site([make_event(1, "1.2.3.4", "100")], token="s3cret")
        basic = b"Basic " + base64.b64encode(b"user:s3cret")
        for headers in (None, {"Authorization": ["Bearer wrong"]}, {"Authorization": [basic]}):
            for path in ALL_ROUTES[1:]:
                response, body = yield self.fetch(path, headers=headers)
                self.assertEqual(response.code, 401, (path, headers))
                self.assertEqual(response.headers.getRawHeaders("WWW-Authenticate"), ["Bearer"])
                self.assertAPIHeaders(response)
                self.assertEqual(list(json.loads(body)), ["error"])

    @defer.inlineCallbacks
    def test_token_accepted(self):
        """With ``Authorization: Bearer <token>`` every route answers as without a token; the
        health check needs no token."""
        yield self.start_site([make_event(1, "1.2.3.4", "100")], token="s3cret")
        auth = {"Authorization": ["Bearer s3cret"]}
        for path in ALL_ROUTES:
            response, _ = yield self.fetch(path, headers=auth)
            self.assertEqual(response.code, 200, path)
        response, body = yield self.fetch("/health-check")
        self.assertEqual((response.code, body), (200, HEALTH_HTML))
        yield self.fetch_json("/numbers/12a", code=400, headers=auth)
        yield self.fetch_json("/blah", code=404)

    @defer.inlineCallbacks
    def test_no_token_open(self):
        """Without a token the API is open: an Authorization header is ignored."""
        yield self.start_site([make_event(1, "1.2.3.4", "100")])
        for path in ALL_ROUTES:
            response, _ = yield self.fetch(path, headers={"Authorization": ["Bearer whatever"]})
            self.assertEqual(response.code, 200, path)


# ---------------------------------------------------------------------------------------------
# curl against the site while SIP probes stream in


def _probe(i: int, number: str, port: int) -> bytes:
    return (
        f"OPTIONS sip:{number}@127.0.0.1 SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP 127.0.0.1:{port};branch=z9hG4bK-api-{i}\r\n"
        f"From: <sip:probe@127.0.0.1>;tag=t{i}\r\n"
        f"To: <sip:{number}@127.0.0.1>\r\n"
        f"Call-ID: api-{i}@127.0.0.1\r\n"
        "CSeq: 1 OPTIONS\r\n"
        "User-Agent: api-stream-test\r\n"
        "Max-Forwards: 70\r\n"
        "Content-Length: 0\r\n\r\n"
    ).encode("ascii")


class CurlIntegrationTests(SiteTestCase):
    """``curl`` against the API on loopback while UDP probes stream into a real SIP listener."""

    timeout = 120
    PROBES = 1500
    NUMBERS = ("100", "+442071234567", "0046812118532", "5551234", "+15550100")

    @defer.inlineCallbacks
    def curl(self, path: str, *options: str):
        """Run curl; returns (status code, body bytes)."""
        args = ("-sS", "--max-time", "20", "-o", "-", "-w", "\n%{http_code}", *options, self.url + path)
        out, err, code = yield utils.getProcessOutputAndValue(self.curl_path, args, env={})
        self.assertEqual(code, 0, err)
        body, _, status = out.rpartition(b"\n")
        return int(status), body

    @defer.inlineCallbacks
    def test_curl_while_probes_stream_in(self):
        """Every probe sent through the UDP listener is recorded while curl queries the API, and
        curl's answers are right: during the stream (valid, consistent lists) and after it (every
        probe counted, per number and per address)."""
        self.curl_path = require_tool("curl")
        directory = os.path.abspath(self.mktemp())
        service = build_service(make_config(directory, ["udp:0:interface=127.0.0.1"]), reactor)
        service.privilegedStartService()
        service.startService()
        self.addCleanup(service.stopService)
        sip_port = service.ports[0][1].getHost().port
        yield self.start_site(database=service.database_service.database)
        self.url = self.base.decode()

        sender = reactor.listenUDP(0, DatagramProtocol(), interface="127.0.0.1")
        self.addCleanup(sender.stopListening)
        source_port = sender.getHost().port
        sent = []

        def send_some():
            for _ in range(10):
                i = len(sent)
                if i >= self.PROBES:
                    loop.stop()
                    return
                probe = _probe(i, self.NUMBERS[i % len(self.NUMBERS)], source_port)
                sender.write(probe, ("127.0.0.1", sip_port))
                sent.append(i)

        loop = task.LoopingCall(send_some)
        streaming = loop.start(0.005)

        answers = 0
        while not streaming.called:
            status, body = yield self.curl("/numbers")
            self.assertEqual(status, 200)
            got = json.loads(body)
            self.assertEqual(got["called_numbers_total"], len(got["called_numbers"]))
            self.assertLessEqual(sum(int(e["seen_count"]) for e in got["called_numbers"]), self.PROBES)
            status, body = yield self.curl("/health-check", "-H", "Accept: application/json")
            self.assertEqual((status, json.loads(body)["version"]), (200, __version__))
            answers += 1
        yield streaming
        self.assertGreater(answers, 0)
        self.assertEqual(len(sent), self.PROBES)

        # Everything sent arrives and is written.
        for _ in range(200):
            if service.stats.total("received") >= self.PROBES:
                break
            yield task.deferLater(reactor, 0.05, lambda: None)
        yield service.database_service.queue.flush()
        self.assertEqual(service.stats.total("received"), self.PROBES)
        self.assertEqual(service.stats.total("recorded"), self.PROBES)
        self.assertEqual(service.stats.dropped, 0)
        count = yield service.database_service.database.run_query(queries.count_events)
        self.assertEqual(count, self.PROBES)

        status, body = yield self.curl("/numbers")
        got = json.loads(body)
        self.assertEqual(status, 200)
        self.assertEqual(got["called_numbers_total"], len(self.NUMBERS))
        per_number = {e["called_number"]: e["seen_count"] for e in got["called_numbers"]}
        self.assertEqual(per_number, {n: str(self.PROBES // len(self.NUMBERS)) for n in self.NUMBERS})
        status, body = yield self.curl("/ip-addresses")
        self.assertEqual(status, 200)
        self.assertEqual(
            [(e["ip_address"], e["seen_count"]) for e in json.loads(body)["ip_addresses"]],
            [("127.0.0.1", str(self.PROBES))],
        )
        status, body = yield self.curl("/ip-addresses/127.0.0.1")
        self.assertEqual((status, json.loads(body)), (200, {"bad_actor_found": "127.0.0.1"}))
        status, body = yield self.curl("/ip-addresses/::ffff:127.0.0.1", "-g")
        self.assertEqual((status, json.loads(body)), (200, {"bad_actor_found": "127.0.0.1"}))
        status, body = yield self.curl("/numbers/%2B442071234567")
        self.assertEqual((status, json.loads(body)), (200, {"phone_number_found": "+442071234567"}))
        status, body = yield self.curl("/numbers/+442071234567")
        self.assertEqual(status, 200)
        status, body = yield self.curl("/health-check")
        self.assertEqual((status, body), (200, HEALTH_HTML))
        status, body = yield self.curl("/numbers", "-X", "POST")
        self.assertEqual(status, 405)
        status, body = yield self.curl("/ip-addresses/08.8.8.8")
        self.assertEqual(status, 400)
        status, body = yield self.curl("/numbers", "-I")
        self.assertEqual(status, 200)
        self.assertIn(b"X-Powered-By: SentryPeer", body)
