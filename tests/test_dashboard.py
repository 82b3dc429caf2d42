"""Tests of the web dashboard: ``sentrypeer.api.dashboard`` and ``sentrypeer.storage.dashboard_queries``.

The behaviour pinned is issue 8 items 1 and 2: the pages and charts, escaping of every
attacker-supplied string for its context (the escaping table :data:`INJECTIONS` runs through every
page and chart), the security headers on every response, and the token. The SQL is tested on plain
:mod:`sqlite3`; the pages over HTTP on loopback against a real database file.
"""

from __future__ import annotations

import base64
import datetime
import html
import os
import sqlite3
import time
import uuid
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from typing import Any
from urllib.parse import quote

import treq
from twisted.internet import defer, reactor, task
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers

from sentrypeer.api import dashboard, make_site
from sentrypeer.api.site import SiteResource
from sentrypeer.events import BadActorEvent, format_timestamp
from sentrypeer.storage import dashboard_queries as dq
from sentrypeer.storage import queries
from sentrypeer.storage.database import Database, prepare_database

NODE = "1f45cc1c-4fd4-11ec-89f0-d05099894ba6"
PEER = "7d3c1b2a-0000-4000-8000-000000000001"
#: 2023-11-14 22:13:20 UTC.
NOW = 1_700_000_000.0

#: Attacker strings that must come out as inert text in every context: HTML text, attribute
#: values, URLs and SVG text.
INJECTIONS = (
    "<script>alert(1)</script>",
    '"><img src=x onerror=alert(1)>',
    "javascript:alert(1)",
    "</svg><script>alert(2)</script>",
    "'><svg onload=alert(3)>",
    "</title></textarea><script>alert(4)</script>",
    "&lt;b&gt;already escaped&lt;/b&gt;",
    "<!--",
    "]]><![CDATA[x",
    "a/b?c=d#e%2F..%00",
    "\u202egnp.exe",
    "bell\x07esc\x1b[31mnul\x00end",
)

#: The injection strings the overview shows (its lists stop at ten lines, its latest events at 20).
ON_OVERVIEW = INJECTIONS[:10]

#: Tags and attributes the pages may contain: anything else came from data.
ALLOWED_TAGS = frozenset(
    "html head meta title link body header nav a main footer h1 h2 h3 dl dt dd div section svg line"
    " text rect table thead tbody tr th td p form label input button".split()
)
ALLOWED_ATTRIBUTES = frozenset(
    "lang charset name content rel href type class xmlns role viewbox aria-label x y x1 y1 x2 y2 width"
    " height text-anchor title method action value maxlength placeholder colspan".split()
)
SECURITY_HEADERS = {
    "Content-Security-Policy": dashboard.CSP.decode(),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}


def make_event(n: int, *, at: float = NOW, **fields: Any) -> BadActorEvent:
    """A stored-event fixture: event *n*, ``at`` seconds since the epoch, *fields* overriding."""
    values: dict[str, Any] = dict(
        event_timestamp=format_timestamp(int(at * 1_000_000_000) + n),
        event_uuid=str(uuid.UUID(int=n + 1, version=4)),
        created_by_node_id=NODE,
        collected_method="passive",
        transport_type="UDP",
        source_ip="203.0.113.7",
        destination_ip="192.0.2.1",
        called_number="100",
        sip_method="OPTIONS",
        sip_user_agent="friendly-scanner",
        sip_message="OPTIONS sip:100@192.0.2.1 SIP/2.0\r\n\r\n",
        source_port=5071,
        destination_port=5060,
    )
    values.update(fields)
    return BadActorEvent(**values)


def injection_events(at: float) -> list[BadActorEvent]:
    """One event per :data:`INJECTIONS` string, carrying it in every free-text column (and in
    ``source_ip``, as rows of old databases may hold anything there), plus one with a real
    address."""
    events = []
    for i, text in enumerate(INJECTIONS):
        events.append(
            make_event(
                1000 + i, at=at - i * 60, source_ip=text, called_number=text, sip_method=text,
                sip_user_agent=text, transport_type=text, parse_status=text, created_by_node_id=text,
            )
        )
        events.append(
            make_event(2000 + i, at=at - i * 60, source_ip=f"198.51.100.{i + 1}", called_number=text,
                       sip_method=text, sip_user_agent=text)
        )
    return events


def fresh_connection(events=()) -> sqlite3.Connection:
    """An in-memory database at the current schema, this node's id :data:`NODE`, holding *events*."""
    conn = sqlite3.connect(":memory:")
    queries.migrate(conn)
    with conn:
        queries.get_or_create_node_id(conn.cursor(), NODE)
        queries.insert_events(conn.cursor(), list(events))
    return conn


class Markup(HTMLParser):
    """Collects the tags, attributes and text of an HTML page as a browser's tokenizer sees them."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[str] = []
        self.attributes: list[tuple[str, str, str | None]] = []
        self.texts: list[str] = []
        self.comments: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self.attributes.extend((tag, name, value) for name, value in attrs)

    handle_startendtag = handle_starttag

    def handle_data(self, data: str) -> None:
        self.texts.append(data)

    def handle_comment(self, data: str) -> None:
        self.comments.append(data)

    @property
    def text(self) -> str:
        return "".join(self.texts)


def parse_page(body: bytes) -> Markup:
    parser = Markup()
    parser.feed(body.decode("utf-8"))
    parser.close()
    return parser


class InertMixin:
    """Assertions that a page or chart holds attacker text only as text."""

    def assertInertHTML(self, body: bytes, expected_texts=()) -> Markup:
        """*body* has only our tags and attributes, no event handler, no URL leaving the site, no
        comment, and shows every one of *expected_texts* (as :func:`dashboard.display` writes it)."""
        markup = parse_page(body)
        self.assertLessEqual(set(markup.tags), ALLOWED_TAGS, body[:300])
        for tag, name, value in markup.attributes:
            self.assertIn(name, ALLOWED_ATTRIBUTES, (tag, name, value))
            if name in ("href", "action"):
                self.assertTrue(value.startswith("/") and not value.startswith("//"), value)
                self.assertNotIn(":", value.split("?")[0], value)
        self.assertEqual(markup.comments, [])
        for text in expected_texts:
            self.assertIn(dashboard.display(text), markup.text)
        return markup

    def assertInertSVG(self, svg: str, expected_texts=()) -> None:
        """*svg* is well-formed XML with only SVG drawing elements and shows *expected_texts* as
        character data (cut to the label length where shown on the chart)."""
        root = ET.fromstring(svg)
        tags = {element.tag.rsplit("}", 1)[-1] for element in root.iter()}
        self.assertLessEqual(tags, {"svg", "title", "line", "text", "rect"})
        for element in root.iter():
            for name in element.attrib:
                self.assertFalse(name.lower().startswith("on"), name)
                self.assertNotIn("href", name.lower())
        texts = "".join(root.itertext())
        for text in expected_texts:
            self.assertIn(dashboard.display(text, dashboard.LABEL_CHARS), texts)


# ---------------------------------------------------------------------------------------------
# Escaping and URLs (pure)


class EscapingTests(SynchronousTestCase, InertMixin):
    """Every attacker string is escaped for HTML text, attributes, URLs and SVG."""

    def test_h_escapes_markup_characters(self):
        """h() turns & < > " ' into character references and nothing else is left that a parser
        could read as markup."""
        self.assertEqual(
            dashboard.h("<a href=\"x\" title='y'>&</a>"),
            "&lt;a href=&quot;x&quot; title=&#x27;y&#x27;&gt;&amp;&lt;/a&gt;",
        )
        for text in INJECTIONS:
            escaped = dashboard.h(text)
            self.assertFalse(set(escaped) & set("<>\"'"), escaped)
            self.assertEqual(html.unescape(escaped), dashboard.display(text))

    def test_display_shows_invisible_characters(self):
        """Control, bidi-override, zero-width and other non-printable characters are shown as
        backslash escapes; printable non-ASCII text stays; None and "" are NOT_FOUND."""
        self.assertEqual(dashboard.display("a\x00b\x1b\n\t"), "a\\x00b\\x1b\\x0a\\x09")
        self.assertEqual(dashboard.display("\u202egnp.exe\u200b"), "\\u202egnp.exe\\u200b")
        self.assertEqual(dashboard.display("\udc80"), "\\udc80")
        self.assertEqual(dashboard.display("\U000e0041"), "\\U000e0041")
        self.assertEqual(dashboard.display("Grüße 你好 +44"), "Grüße 你好 +44")
        self.assertEqual(dashboard.display(None), "NOT_FOUND")
        self.assertEqual(dashboard.display(""), "NOT_FOUND")

    def test_display_cuts_long_values(self):
        """A value longer than the limit is cut and ends with an ellipsis; a short one is kept."""
        self.assertEqual(dashboard.display("x" * 10, 4), "xxxx…")
        self.assertEqual(dashboard.display("xxxx", 4), "xxxx")
        self.assertEqual(dashboard.display("\x00" * 10, 2), "\\x00\\x00…")

    def test_segment_encodes_everything_but_unreserved(self):
        """A path segment percent-encodes / : ? # % and every non-ASCII character, so a value is
        one segment of a path on this site, never a scheme or another path."""
        self.assertEqual(dashboard.segment("javascript:alert(1)"), "javascript%3Aalert%281%29")
        self.assertEqual(dashboard.segment("a/b?c#d%"), "a%2Fb%3Fc%23d%25")
        self.assertEqual(dashboard.segment("+44-7_.~"), "%2B44-7_.~")
        self.assertEqual(dashboard.segment("ü"), "%C3%BC")
        self.assertEqual(dashboard.number_href("//evil.example"), "/dashboard/number/%2F%2Fevil.example")
        self.assertEqual(dashboard.decode_path_segment(dashboard.segment("a/b\u202e").encode()), "a/b\u202e")

    def test_link_and_cell(self):
        """Links put the escaped path in href and the escaped text inside; long values are cut in
        the cell with the whole value, escaped, in the title."""
        link = dashboard.link(dashboard.number_href('"><x>'), '"><x>')
        self.assertEqual(link, '<a href="/dashboard/number/%22%3E%3Cx%3E">&quot;&gt;&lt;x&gt;</a>')
        long = "<" * 200
        cell = dashboard.cell(long)
        self.assertIn('title="' + "&lt;" * 200 + '"', cell)
        self.assertIn(">" + "&lt;" * dashboard.CELL_CHARS + "…</td>", cell)

    def test_charts_escape_labels(self):
        """Bar and time charts are well-formed SVG whatever the labels, with the labels as text."""
        items = [(text, i + 1) for i, text in enumerate(INJECTIONS)] + [(None, 3)]
        self.assertInertSVG(dashboard.bar_chart(items, "</svg><script>alert(9)</script>"), INJECTIONS)
        points = [(text, text, i) for i, text in enumerate(INJECTIONS)]
        svg = dashboard.time_chart(points, 'title "quoted" <b>')
        self.assertInertSVG(svg)
        titles = [t.text for t in ET.fromstring(svg).iter("{http://www.w3.org/2000/svg}title")]
        for text in INJECTIONS:
            self.assertTrue(any(dashboard.display(text) in (t or "") for t in titles), text)

    def test_empty_charts(self):
        """Charts of nothing (an empty database) are valid SVG saying so."""
        self.assertInertSVG(dashboard.bar_chart([], "Methods"), ["no events"])
        self.assertInertSVG(dashboard.time_chart([], "Nothing"))
        self.assertInertSVG(dashboard.time_chart([("a", "a", 0)] * 24, "Zeros"))

    def test_every_page_is_inert(self):
        """Overview, events, address and number pages built from the injection events have only
        our markup, and show every injection string as text."""
        conn = fresh_connection(injection_events(NOW))
        cursor = conn.cursor()
        overview = dashboard.render_overview(dashboard.overview_data(cursor, NOW + 1))
        self.assertInertHTML(overview, ON_OVERVIEW)
        query = dashboard.parse_event_query({})
        self.assertInertHTML(dashboard.render_events(query, dashboard.events_data(cursor, query)), INJECTIONS)
        for text in INJECTIONS:
            spellings = dashboard.address_spellings(text)
            self.assertInertHTML(dashboard.render_ip(text, dashboard.ip_data(cursor, spellings)), [text])
            self.assertInertHTML(dashboard.render_number(text, dashboard.number_data(cursor, text)), [text])
            query = dashboard.parse_event_query({b"number": [text.encode()], b"method": [text.encode()]})
            body = dashboard.render_events(query, dashboard.events_data(cursor, query))
            self.assertInertHTML(body, [text])
        self.assertInertHTML(dashboard.error_page(400, "<script>alert(1)</script>"), INJECTIONS[:1])


class ParameterTests(SynchronousTestCase):
    """Query parameters of the events table."""

    def test_times(self):
        """since/until take a date, or a date and minutes or seconds, with a space or a T; a bare
        date as until means the end of that day (exclusive bound)."""
        self.assertEqual(dashboard.parse_time("2024-02-29", "since"), "2024-02-29 00:00:00")
        self.assertEqual(dashboard.parse_time("2024-02-29", "until", True), "2024-03-01 00:00:00")
        self.assertEqual(dashboard.parse_time("2024-02-29T10:05", "since"), "2024-02-29 10:05:00")
        self.assertEqual(dashboard.parse_time("2024-02-29 10:05:07", "until", True), "2024-02-29 10:05:07")
        self.assertIsNone(dashboard.parse_time("", "since"))
        for bad in ("yesterday", "2024-02-30", "2024-1-1", "2024-01-01 25:00", "1' OR '1'='1"):
            self.assertRaises(dashboard.BadRequest, dashboard.parse_time, bad, "since")

    def test_event_query(self):
        """Filters come from ip, number, method, since, until and page; an address is looked up
        under its stored spellings; anything else given as an address is matched as is."""
        query = dashboard.parse_event_query(
            {b"ip": [b"::ffff:1.2.3.4"], b"number": [b" +44 "], b"method": [b"INVITE"], b"page": [b"3"]}
        )
        self.assertEqual(query.filters.source_ips, ("1.2.3.4", "::ffff:1.2.3.4"))
        self.assertEqual(query.filters.number, "+44")
        self.assertEqual(query.filters.method, "INVITE")
        self.assertEqual(query.page, 3)
        odd = dashboard.parse_event_query({b"ip": [b"<x>"]})
        self.assertEqual(odd.filters.source_ips, ("<x>",))
        self.assertEqual(dashboard.parse_event_query({}).filters, dq.EventFilter())

    def test_bad_event_queries(self):
        """A page outside 1..MAX_PAGE, a repeated or non-UTF-8 parameter, or an overlong one is a
        BadRequest (a 400 page)."""
        for args in (
            {b"page": [b"0"]},
            {b"page": [b"-1"]},
            {b"page": [b"x"]},
            {b"page": [str(dashboard.MAX_PAGE + 1).encode()]},
            {b"page": ["٣".encode()]},
            {b"ip": [b"1.2.3.4", b"5.6.7.8"]},
            {b"number": [b"\xff"]},
            {b"method": [b"x" * (dashboard.MAX_PARAMETER_CHARS + 1)]},
            {b"since": [b"soon"]},
        ):
            self.assertRaises(dashboard.BadRequest, dashboard.parse_event_query, args)


# ---------------------------------------------------------------------------------------------
# The SQL


class QueryTests(SynchronousTestCase):
    """The dashboard's SQL on plain sqlite3."""

    def setUp(self):
        events = [
            make_event(1, at=NOW - 30, source_ip="203.0.113.7", called_number="100", sip_method="INVITE"),
            make_event(2, at=NOW - 3600 * 2, source_ip="203.0.113.7", called_number="101"),
            make_event(3, at=NOW - 3600 * 2, source_ip="2001:db8::1", sip_user_agent="sipvicious"),
            make_event(4, at=NOW - 86400 * 3, source_ip="::ffff:198.51.100.9", transport_type="TCP"),
            make_event(5, at=NOW - 86400 * 40, source_ip="198.51.100.10", created_by_node_id=PEER),
            make_event(6, at=NOW + 3600 * 5, source_ip="192.0.2.55"),  # in the future: no bucket
        ]
        self.conn = fresh_connection(events)
        self.cursor = self.conn.cursor()

    def test_totals(self):
        """Totals count rows, distinct addresses and numbers, and give first and last times."""
        t = dq.totals(self.cursor)
        self.assertEqual((t.events, t.source_ips, t.numbers), (6, 5, 2))
        self.assertEqual(t.first_seen[:10], "2023-10-05")
        self.assertEqual(t.last_seen[:13], "2023-11-15 03")

    def test_blob_values_read_as_text(self):
        """BLOB addresses, numbers and times (rows made by hand) come back as text with \\xNN for
        undecodable bytes, from every query the overview and event pages use."""
        self.conn.execute("INSERT INTO honey (event_timestamp, event_uuid, source_ip, called_number,"
                          " user_agent) VALUES (X'3230333020FF', 'b1', X'3130FF', X'373738', X'4142')")
        t = dq.totals(self.cursor)
        self.assertEqual(t.last_seen, "2030 \\xff")
        self.assertIn("10\\xff", [c.value for c in dq.top_values(self.cursor, "source_ip")])
        self.assertIn("778", [c.value for c in dq.top_values(self.cursor, "called_number")])
        row = dq.recent_events(self.cursor).rows[0]
        self.assertEqual((row.event_timestamp, row.source_ip, row.called_number, row.user_agent),
                         ("2030 \\xff", "10\\xff", "778", "AB"))
        summary = dq._summary(self.cursor, "source_ip", [b"10\xff"], "called_number")
        self.assertEqual((summary.events, summary.last_seen), (1, "2030 \\xff"))
        self.assertEqual([c.value for c in dq._breakdown(self.cursor, "source_ip", [b"10\xff"],
                                                          "called_number", 5)], ["778"])

    def test_per_hour_and_day(self):
        """The hour and day series have 24 and 30 buckets, oldest first, ending with the current
        hour/day, zeros included, and count events by their UTC hour/day."""
        hours = dq.events_per_hour(self.cursor, NOW)
        self.assertEqual(len(hours), 24)
        self.assertEqual(hours[-1][0], datetime.datetime(2023, 11, 14, 22, tzinfo=datetime.UTC))
        self.assertEqual(hours[0][0], datetime.datetime(2023, 11, 13, 23, tzinfo=datetime.UTC))
        counts = {start.hour: n for start, n in hours}
        self.assertEqual(counts[22], 1)
        self.assertEqual(counts[20], 2)
        self.assertEqual(sum(n for _, n in hours), 3)
        days = dq.events_per_day(self.cursor, NOW)
        self.assertEqual(len(days), 30)
        self.assertEqual(days[-1], (datetime.datetime(2023, 11, 14, tzinfo=datetime.UTC), 3))
        self.assertEqual(dict(days)[datetime.datetime(2023, 11, 11, tzinfo=datetime.UTC)], 1)
        self.assertEqual(sum(n for _, n in days), 4)

    def test_top_values(self):
        """Top lists count per value, most first, ties by value, within the time bound; only the
        allowed columns, only a positive limit."""
        self.assertEqual(dq.top_values(self.cursor, "called_number")[0], dq.Count("100", 5))
        self.assertEqual(
            dq.top_values(self.cursor, "source_ip", 2, since=dq.cutoff(NOW, 86400)),
            [dq.Count("203.0.113.7", 2), dq.Count("192.0.2.55", 1)],
        )
        transports = dq.top_values(self.cursor, "transport_type")
        self.assertEqual(transports, [dq.Count("UDP", 5), dq.Count("TCP", 1)])
        self.assertRaises(ValueError, dq.top_values, self.cursor, "sip_message")
        self.assertRaises(ValueError, dq.top_values, self.cursor, "method; DROP TABLE honey")
        self.assertRaises(ValueError, dq.top_values, self.cursor, "method", 0)

    def test_recent_events_filters_and_paging(self):
        """Events come newest first; filters combine; paging says whether more follow; the
        offset is bounded."""
        page = dq.recent_events(self.cursor, limit=2)
        self.assertEqual([r.source_ip for r in page.rows], ["192.0.2.55", "203.0.113.7"])
        self.assertTrue(page.has_more)
        last = dq.recent_events(self.cursor, limit=2, offset=4)
        self.assertEqual(len(last.rows), 2)
        self.assertFalse(last.has_more)
        only = dq.recent_events(self.cursor, dq.EventFilter(source_ips=("203.0.113.7",), number="101"))
        self.assertEqual([r.called_number for r in only.rows], ["101"])
        window = dq.EventFilter(since="2023-11-11 00:00:00", until="2023-11-14 22:00:00")
        self.assertEqual(len(dq.recent_events(self.cursor, window).rows), 3)
        self.assertEqual(len(dq.recent_events(self.cursor, dq.EventFilter(method="INVITE")).rows), 1)
        self.assertRaises(ValueError, dq.recent_events, self.cursor, None, 10, dq.MAX_OFFSET + 1)
        self.assertEqual(len(dq.recent_events(self.cursor, limit=10**9).rows), 6)

    def test_summaries(self):
        """Per-address and per-number summaries and breakdowns."""
        s = dq.ip_summary(self.cursor, ("203.0.113.7",))
        self.assertEqual((s.events, s.distinct, s.user_agents), (2, 2, 1))
        self.assertEqual(
            [c[:2] for c in dq.ip_breakdown(self.cursor, ("203.0.113.7",), "called_number")],
            [("100", 1), ("101", 1)],
        )
        n = dq.number_summary(self.cursor, "100")
        self.assertEqual((n.events, n.distinct), (5, 5))
        agents = dq.number_breakdown(self.cursor, "100", "user_agent")
        self.assertEqual([c[:2] for c in agents], [("friendly-scanner", 4), ("sipvicious", 1)])
        none = dq.ip_summary(self.cursor, ("192.0.2.200",))
        self.assertEqual(none, dq.Summary(0, None, None, 0, 0))

    def test_blocklist_sources(self):
        """Blocklist sources are the time range's stored spellings with counts, this node's only
        unless peers are asked for; own destinations are this node's events' destination_ip."""
        since = dq.cutoff(NOW, 86400 * 60)
        local = dict(dq.blocklist_sources(self.cursor, since, False))
        self.assertNotIn("198.51.100.10", local)
        self.assertEqual(local["203.0.113.7"], 2)
        self.assertIn("198.51.100.10", dict(dq.blocklist_sources(self.cursor, since, True)))
        self.assertEqual(dq.own_destinations(self.cursor, since), ["192.0.2.1"])
        self.assertEqual(dq.node_id(self.cursor), NODE)

    def test_queries_use_indexes(self):
        """Every statement the dashboard and blocklist functions run reads honey through an index
        (no plain table scan), and the time-ranged ones through event_timestamp_index rather than
        another index walked whole."""
        cursor = RecordingCursor(self.conn)
        since = dq.cutoff(NOW, 86400)
        timed = []
        for call in (
            lambda: dq.events_per_hour(cursor, NOW),
            lambda: dq.events_per_day(cursor, NOW),
            lambda: [dq.top_values(cursor, column, 10, since) for column in sorted(dq.TOP_COLUMNS)],
            lambda: dq.blocklist_sources(cursor, since, False),
            lambda: dq.blocklist_sources(cursor, since, True),
            lambda: dq.own_destinations(cursor, since),
            lambda: dq.recent_events(cursor, dq.EventFilter(since=since)),
        ):
            cursor.statements.clear()
            call()
            timed.extend(cursor.statements)
        for sql, params in timed:
            plan = cursor.plan(sql, params)
            self.assertIn("event_timestamp_index", plan, sql)
        cursor.statements.clear()
        dq.totals(cursor)
        dq.recent_events(cursor)
        dq.recent_events(cursor, dq.EventFilter(source_ips=("1.2.3.4", "::ffff:1.2.3.4")))
        dq.recent_events(cursor, dq.EventFilter(number="100"))
        dq.ip_summary(cursor, ("1.2.3.4",))
        dq.ip_breakdown(cursor, ("1.2.3.4",), "user_agent")
        dq.number_summary(cursor, "100")
        dq.number_breakdown(cursor, "100", "source_ip")
        for column in ("source_ip", "called_number"):
            dq.top_values(cursor, column)
        for sql, params in cursor.statements:
            for line in cursor.plan(sql, params).split(" | "):
                if "honey" in line and "sentrypeer_node" not in line:
                    self.assertIn("INDEX", line, sql)


class RecordingCursor:
    """A sqlite3 cursor that remembers every statement it runs, and explains them."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._cursor = conn.cursor()
        self._explain = conn.cursor()
        self.statements: list[tuple[str, tuple]] = []

    def execute(self, sql, params=()):
        self.statements.append((sql, tuple(params)))
        return self._cursor.execute(sql, params)

    def plan(self, sql, params) -> str:
        return " | ".join(row[-1] for row in self._explain.execute("EXPLAIN QUERY PLAN " + sql, params))

    def __getattr__(self, name):
        return getattr(self._cursor, name)


# ---------------------------------------------------------------------------------------------
# Over HTTP


class LiveSiteCase(TestCase):
    """Base: a real ``Database`` on a temporary file and the site on a loopback ephemeral port."""

    timeout = 60

    @defer.inlineCallbacks
    def start_site(self, events=(), database=None, **site_options):
        """Serve make_site(database, **site_options) on loopback; without *database*, a new one
        whose node id is NODE (as the fixtures' own events say), holding *events*."""
        if database is None:
            path = os.path.abspath(self.mktemp())
            os.makedirs(os.path.dirname(path), exist_ok=True)
            prepare_database(path)
            database = Database(path, reactor)
            yield database.start()
            self.addCleanup(database.close)
            yield database.run_query(
                lambda cursor: cursor.execute("UPDATE sentrypeer_node SET node_id = ?", (NODE,))
            )
        if events:
            yield database.run_query(queries.insert_events, list(events))
        self.database = database
        self.node_id = yield database.run_query(dq.node_id)
        site = make_site(database, **site_options)
        port = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.base = b"http://127.0.0.1:%d" % port.getHost().port
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(pool.closeCachedConnections)
        self.agent = Agent(reactor, pool=pool)
        return site

    @defer.inlineCallbacks
    def fetch(self, path, method=b"GET", headers=None):
        """Send *path* exactly as given; returns (response, body)."""
        if isinstance(path, str):
            path = path.encode("ascii")
        response = yield self.agent.request(method, self.base + path, Headers(headers or {}))
        body = yield treq.content(response)
        return response, body

    @staticmethod
    def header(response, name):
        values = response.headers.getRawHeaders(name)
        return None if values is None else values[-1]

    def assertSecurityHeaders(self, response):
        for name, value in SECURITY_HEADERS.items():
            self.assertEqual(response.headers.getRawHeaders(name), [value], name)


def basic(token: str, user: str = "") -> dict[str, list[str]]:
    """An ``Authorization: Basic`` header carrying *token* as the password."""
    return {"Authorization": ["Basic " + base64.b64encode(f"{user}:{token}".encode()).decode()]}


class DashboardHTTPTests(LiveSiteCase, InertMixin):
    """The dashboard over HTTP: routes, headers, escaping, token."""

    @defer.inlineCallbacks
    def test_site_routes(self):
        """make_site's root is still the API resource; /dashboard, /blocklist.* and /metrics go to
        their own resources, everything else (look-alikes included) to the API."""
        site = yield self.start_site(live=object())
        root = site.resource
        self.assertIsInstance(root, SiteResource)
        self.assertIs(root.route(b"/dashboard"), root.dashboard)
        self.assertIs(root.route(b"/dashboard/ip/1.2.3.4"), root.dashboard)
        self.assertIs(root.route(b"/blocklist.nft"), root.blocklist)
        self.assertIs(root.route(b"/metrics"), root.metrics)
        for path in (b"/", b"/dashboardx", b"/metrics/", b"/blocklist.txt/", b"/blocklist", b"/numbers"):
            self.assertIs(root.route(path), root, path)
        self.assertIsNone(make_site(object()).resource.metrics)

    @defer.inlineCallbacks
    def test_pages_and_headers(self):
        """Every page answers with its content type and the security headers: overview, events,
        address, number, stylesheet, icon; errors too (400, 404, 405); /dashboard redirects to
        /dashboard/; HEAD answers like GET without a body; the API is unchanged."""
        yield self.start_site([make_event(1, at=time.time())])
        for path, code, content_type in (
            ("/dashboard/", 200, "text/html; charset=utf-8"),
            ("/dashboard/events?ip=203.0.113.7&page=1", 200, "text/html; charset=utf-8"),
            ("/dashboard/ip/203.0.113.7", 200, "text/html; charset=utf-8"),
            ("/dashboard/number/100", 200, "text/html; charset=utf-8"),
            ("/dashboard/style.css", 200, "text/css; charset=utf-8"),
            ("/dashboard/favicon.svg", 200, "image/svg+xml"),
            ("/dashboard/events?page=0", 400, "text/html; charset=utf-8"),
            ("/dashboard/ip/%FF", 400, "text/html; charset=utf-8"),
            ("/dashboard/nope", 404, "text/html; charset=utf-8"),
            ("/dashboard/ip/1.2.3.4/x", 404, "text/html; charset=utf-8"),
            ("/dashboard", 301, "text/html; charset=utf-8"),
        ):
            response, body = yield self.fetch(path)
            self.assertEqual(response.code, code, (path, body[:200]))
            self.assertEqual(self.header(response, "Content-Type"), content_type, path)
            self.assertSecurityHeaders(response)
            if content_type.startswith("text/html"):
                self.assertInertHTML(body)
        response, _ = yield self.fetch("/dashboard")
        self.assertEqual(self.header(response, "Location"), "/dashboard/")
        response, body = yield self.fetch("/dashboard/", method=b"HEAD")
        self.assertEqual((response.code, body), (200, b""))
        self.assertSecurityHeaders(response)
        response, body = yield self.fetch("/dashboard/", method=b"POST")
        self.assertEqual(response.code, 405)
        self.assertEqual(self.header(response, "Allow"), "GET, HEAD")
        self.assertSecurityHeaders(response)
        response, body = yield self.fetch("/")
        self.assertEqual((response.code, body), (200, b'{"status": "OK"}'))

    @defer.inlineCallbacks
    def test_overview_content(self):
        """The overview shows the totals, both time charts, the top lists (linked to the address,
        number and events pages) and the latest events."""
        now = time.time()
        events = [make_event(i, at=now - i * 3600, source_ip=f"203.0.113.{i % 3}") for i in range(30)]
        yield self.start_site(events)
        response, body = yield self.fetch("/dashboard/")
        markup = self.assertInertHTML(body)
        text = markup.text
        self.assertIn("Events per hour, last 24 hours", text)
        self.assertIn("Events per day, last 30 days", text)
        self.assertEqual(markup.tags.count("svg"), 5)
        hrefs = {value for _, name, value in markup.attributes if name == "href"}
        self.assertIn("/dashboard/ip/203.0.113.1", hrefs)
        self.assertIn("/dashboard/number/100", hrefs)
        self.assertIn("/dashboard/events?method=OPTIONS", hrefs)
        self.assertIn("30", text)
        self.assertIn(self.node_id, text)

    @defer.inlineCallbacks
    def test_escaping_table_over_http(self):
        """Every page reachable for the injection events (overview, events filtered by each
        string, and the pages of each address and number, through the links the pages give) has
        only our markup and shows each string as text; the links lead to the right pages."""
        yield self.start_site(injection_events(time.time()))
        response, body = yield self.fetch("/dashboard/")
        self.assertEqual(response.code, 200)
        markup = self.assertInertHTML(body, ON_OVERVIEW)
        links = {value for _, name, value in markup.attributes if name == "href"}
        response, body = yield self.fetch("/dashboard/events")
        links |= {v for _, n, v in self.assertInertHTML(body, INJECTIONS).attributes if n == "href"}
        for text in INJECTIONS:
            self.assertIn(dashboard.number_href(text), links)
            self.assertIn(dashboard.ip_href(text), links)
            for path in (dashboard.number_href(text), dashboard.ip_href(text)):
                response, body = yield self.fetch(path)
                self.assertEqual(response.code, 200, path)
                self.assertSecurityHeaders(response)
                page = self.assertInertHTML(body, [text])
                self.assertIn(dashboard.display(text, dashboard.CELL_CHARS), "".join(page.texts[:40]))
            for name in ("number", "method", "ip"):
                value = quote(text.encode("utf-8", "surrogatepass"), safe="")
                path = f"/dashboard/events?{name}={value}"
                response, body = yield self.fetch(path)
                self.assertEqual(response.code, 200, path)
                page = self.assertInertHTML(body, [text])
                self.assertNotIn("No events.", page.text, path)

    @defer.inlineCallbacks
    def test_paging(self):
        """The events table shows PAGE_SIZE events per page with Older/Newer links that keep the
        filters, and no Older link on the last page."""
        now = time.time()
        count = dashboard.PAGE_SIZE + 5
        yield self.start_site([make_event(i, at=now - i) for i in range(count)])
        _, body = yield self.fetch("/dashboard/events?method=OPTIONS")
        markup = self.assertInertHTML(body)
        self.assertEqual(markup.tags.count("tr"), dashboard.PAGE_SIZE + 1)
        hrefs = [v for tag, name, v in markup.attributes if name == "href" and "page=" in v]
        self.assertEqual(hrefs, ["/dashboard/events?method=OPTIONS&page=2"])
        _, body = yield self.fetch(hrefs[0])
        markup = self.assertInertHTML(body)
        self.assertEqual(markup.tags.count("tr"), 5 + 1)
        hrefs = [v for tag, name, v in markup.attributes if name == "href" and "page=" in v]
        self.assertEqual(hrefs, ["/dashboard/events?method=OPTIONS&page=1"])

    @defer.inlineCallbacks
    def test_token(self):
        """With a token, every dashboard path answers 401 with a Basic challenge (and the security
        headers) unless the request carries the token as the Basic password (any user) or as a
        Bearer token."""
        yield self.start_site([make_event(1, at=time.time())], token="s3cret")
        for path in ("/dashboard/", "/dashboard/events", "/dashboard/style.css", "/dashboard/ip/1.2.3.4"):
            for headers in (None, basic("wrong"), {"Authorization": ["Bearer wrong"]}, basic("s3cret ")):
                response, body = yield self.fetch(path, headers=headers)
                self.assertEqual(response.code, 401, (path, headers))
                self.assertEqual(
                    response.headers.getRawHeaders("WWW-Authenticate"),
                    ['Basic realm="SentryPeer dashboard", charset="UTF-8"'],
                )
                self.assertSecurityHeaders(response)
                self.assertNotIn(b"203.0.113.7", body)
            for headers in (basic("s3cret"), basic("s3cret", "admin"), {"Authorization": ["Bearer s3cret"]}):
                response, _ = yield self.fetch(path, headers=headers)
                self.assertEqual(response.code, 200, (path, headers))

    @defer.inlineCallbacks
    def test_database_error_is_500(self):
        """A failing query gives a 500 page with the security headers and one log line."""

        class Broken:
            def run_query(self, fn, *args):
                return defer.fail(sqlite3.OperationalError("disk I/O error"))

        site = make_site(Broken())
        port = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.base = b"http://127.0.0.1:%d" % port.getHost().port
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(pool.closeCachedConnections)
        self.agent = Agent(reactor, pool=pool)
        response, body = yield self.fetch("/dashboard/")
        self.assertEqual(response.code, 500)
        self.assertSecurityHeaders(response)
        self.assertNotIn(b"disk I/O", body)
        self.flushLoggedErrors()


class ClockTests(SynchronousTestCase):
    """The dashboard's notion of "now" comes from the clock given to make_site; reads go to the
    database's reader connection."""

    def test_reader(self):
        """Reads use the database's run_read when it has one (never waiting for the write queue),
        else run_query."""

        class Both:
            def run_read(self, fn, *args):
                return "read"

            def run_query(self, fn, *args):
                return "query"

        class QueryOnly:
            def run_query(self, fn, *args):
                return "query"

        self.assertEqual(dashboard.reader(Both())(len), "read")
        self.assertEqual(dashboard.reader(QueryOnly())(len), "query")

    def test_clock(self):
        """A task.Clock drives the overview's time window."""
        clock = task.Clock()
        clock.advance(NOW)
        resource = make_site(object(), clock=clock).resource.dashboard
        self.assertEqual(resource._now(), NOW)
