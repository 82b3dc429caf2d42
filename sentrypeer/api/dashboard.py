"""The web dashboard at ``/dashboard/`` (issue 8): HTML pages and server-side SVG charts.

Everything shown comes from attackers (addresses aside, every column of ``honey`` is text they
chose), so the pages are built to be inert whatever the data:

- every stored string goes through :func:`display` (control, format, bidi-override and other
  invisible characters shown as ``\\xNN``/``\\uNNNN`` text; also what keeps the SVG well-formed XML)
  and then :func:`html.escape` with quotes, for HTML text, attribute values and SVG ``<text>``
  alike (:func:`h`);
- a stored string put into a URL is percent-encoded as one path segment (:func:`segment`) or a
  query value (:func:`urlencode`), then HTML-escaped; every link is a relative path on this site,
  so a ``javascript:`` "number" is only ever part of a path;
- there is no JavaScript at all, and every response carries :data:`SECURITY_HEADERS`: a
  Content-Security-Policy that allows nothing but this origin's stylesheet and images (no script,
  inline or not, no other origin, no framing, forms only to this origin), ``nosniff``,
  ``Referrer-Policy: no-referrer`` and ``X-Frame-Options: DENY``;
- charts are SVG drawn here (:func:`time_chart`, :func:`bar_chart`), inline in the page: no
  network access at run time, no charting library.

With ``--api-token`` set, every dashboard page asks for it: HTTP Basic with the token as password
(any user name), or ``Authorization: Bearer <token>`` as for the API; otherwise ``401`` with
``WWW-Authenticate: Basic realm="SentryPeer dashboard"``.

Routes (``GET`` and ``HEAD``; anything else is ``405``):

- ``/dashboard/``: totals, events per hour (24 h) and per day (30 days), the top source addresses,
  called numbers, User-Agents, methods and transports of the last 30 days, the latest events;
- ``/dashboard/events``: the events table, filtered by ``ip``, ``number``, ``method``, ``since``,
  ``until`` (UTC, ``YYYY-MM-DD`` or ``YYYY-MM-DD HH:MM[:SS]``, ``T`` accepted as separator;
  ``until`` is exclusive and a bare date means the end of that day), ``page`` (1-based);
- ``/dashboard/ip/{address}`` and ``/dashboard/number/{number}``: first and last seen, counts, the
  numbers tried (addresses that tried), User-Agents, methods and the latest events;
- ``/dashboard/style.css`` and ``/dashboard/favicon.svg``: the only static files (in this module).

The response helpers (:func:`send_secure`, :func:`require_token`, :func:`answer_later`) are shared
with the blocklist and metrics resources.
"""

from __future__ import annotations

import datetime
import html
import re
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple
from urllib.parse import quote, unquote_to_bytes
from urllib.parse import urlencode as _urlencode

from twisted.internet.defer import maybeDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from sentrypeer import __version__
from sentrypeer.api.resources import check_token, ip_lookup_forms, log_server_error
from sentrypeer.events import NOT_FOUND
from sentrypeer.storage import dashboard_queries as dq

log = Logger(namespace="sentrypeer.api.dashboard")

#: The dashboard's path prefix.
PREFIX = b"/dashboard"

#: ``Content-Security-Policy`` of every response: nothing but this origin's stylesheet and images;
#: no script at all (``default-src 'none'`` covers ``script-src``), forms post only here, no
#: framing, no ``<base>``.
CSP = (
    b"default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self';"
    b" frame-ancestors 'none'; base-uri 'none'"
)

#: Headers on every response of the dashboard, the blocklists and the metrics.
SECURITY_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"Content-Security-Policy", CSP),
    (b"X-Content-Type-Options", b"nosniff"),
    (b"Referrer-Policy", b"no-referrer"),
    (b"X-Frame-Options", b"DENY"),
    (b"Cross-Origin-Resource-Policy", b"same-origin"),
    (b"Cache-Control", b"no-store"),
)

HTML_TYPE = b"text/html; charset=utf-8"
TEXT_TYPE = b"text/plain; charset=utf-8"
CSS_TYPE = b"text/css; charset=utf-8"
SVG_TYPE = b"image/svg+xml"

ALLOWED_METHODS = (b"GET", b"HEAD")
#: The challenge the dashboard answers ``401`` with (browsers then ask for the token).
DASHBOARD_CHALLENGE = (b'Basic realm="SentryPeer dashboard", charset="UTF-8"',)

#: Events per page of the events table.
PAGE_SIZE = 50
#: The last page number accepted (deeper history: narrow the time range).
MAX_PAGE = dq.MAX_OFFSET // PAGE_SIZE
#: Lines of each "top" list on the overview.
TOP_LIMIT = 10
#: Days the overview's top lists cover.
TOP_DAYS = 30
#: Characters of a stored string shown in a table cell (the whole value is in its ``title``).
CELL_CHARS = 120
#: Characters of a stored string shown as a chart label.
LABEL_CHARS = 30
#: Longest decoded path segment or query value accepted.
MAX_PARAMETER_CHARS = 8192


class BadRequest(ValueError):
    """A parameter cannot be used: a ``400`` page showing the message (our text only)."""


# ---------------------------------------------------------------------------------------------
# Responses (shared with the blocklist and metrics resources)


def send_secure(
    request: Any,
    code: int,
    body: bytes,
    content_type: bytes,
    headers: Iterable[tuple[bytes, Sequence[bytes]]] = (),
) -> None:
    """Write a whole response with :data:`SECURITY_HEADERS` and finish *request*.

    ``HEAD`` gets the headers (``Content-Length`` of the body included) without the body.

    :param headers: extra ``(name, values)`` pairs.
    """
    request.setResponseCode(code)
    out = request.responseHeaders
    out.setRawHeaders(b"Content-Type", [content_type])
    for name, value in SECURITY_HEADERS:
        out.setRawHeaders(name, [value])
    for name, values in headers:
        out.setRawHeaders(name, list(values))
    out.setRawHeaders(b"Content-Length", [b"%d" % len(body)])
    request.write(body)
    request.finish()


def method_allowed(request: Any, error: Callable[[int, str], bytes], content_type: bytes) -> bool:
    """``True`` for ``GET`` and ``HEAD``; otherwise answers ``405`` with ``Allow`` and ``False``.

    :param error: builds the error body from a status and a message.
    """
    if request.method in ALLOWED_METHODS:
        return True
    send_secure(
        request,
        http.NOT_ALLOWED,
        error(http.NOT_ALLOWED, "Method not allowed"),
        content_type,
        [(b"Allow", [b", ".join(ALLOWED_METHODS)])],
    )
    return False


def require_token(
    request: Any,
    token: str | None,
    challenges: Sequence[bytes],
    error: Callable[[int, str], bytes],
    content_type: bytes,
) -> bool:
    """``True`` when *request* carries *token* (Bearer, or Basic with it as the password: see
    :func:`sentrypeer.api.resources.check_token`) or no token is set; otherwise answers ``401``
    with ``WWW-Authenticate: <challenges>`` and returns ``False``."""
    if check_token(request, token):
        return True
    send_secure(
        request,
        http.UNAUTHORIZED,
        error(http.UNAUTHORIZED, "The API token is required (HTTP Basic password, or Bearer)"),
        content_type,
        [(b"WWW-Authenticate", list(challenges))],
    )
    return False


def reader(database: Any) -> Callable[..., Any]:
    """How to run a read-only ``fn(cursor, *args)`` on *database*: its reader connection
    (``run_read``, which neither waits for nor holds up the write queue's batches) when it has
    one, else ``run_query``."""
    return getattr(database, "run_read", None) or database.run_query


def answer_later(
    request: Any,
    work: Callable[[], Any],
    respond: Callable[[Any], None],
    error: Callable[[int, str], bytes],
    content_type: bytes,
) -> None:
    """Run *work* (which may return a Deferred: a database query) and hand its result to
    *respond*, unless the client has gone meanwhile.

    A failure (of *work* or *respond*) is one log line without the client's address
    (:func:`sentrypeer.api.resources.log_server_error`) and a ``500`` with *error*'s body.
    """
    finished: list[object] = []
    request.notifyFinish().addBoth(finished.append)

    def done(result: Any) -> None:
        if not finished:
            respond(result)

    def failed(failure: Failure) -> None:
        log_server_error(request, failure)
        if finished:
            return
        if getattr(request, "startedWriting", False):
            request.loseConnection()
            return
        send_secure(
            request, http.INTERNAL_SERVER_ERROR, error(http.INTERNAL_SERVER_ERROR, "Internal error"),
            content_type,
        )

    d = maybeDeferred(work)
    d.addCallback(done)
    d.addErrback(failed)
    d.addErrback(lambda f: log.failure("dashboard: answering a request failed", f))


# ---------------------------------------------------------------------------------------------
# Escaping


def display(value: str | None, limit: int | None = None) -> str:
    """*value* as text a person can read and a parser cannot misread.

    Characters that are not printable (``str.isprintable``: C0/C1 controls, format characters such
    as bidi overrides and zero-width joiners, surrogates, private-use and unassigned code points,
    separators other than the space) are written as ``\\xNN``, ``\\uNNNN`` or ``\\UNNNNNNNN``; that
    also removes everything XML 1.0 forbids, so the result is safe in SVG once escaped. ``None``
    and ``""`` are :data:`~sentrypeer.events.NOT_FOUND`, as in the API.

    :param limit: the most characters of *value* kept; a cut value ends with ``…``.
    """
    if not value:
        return NOT_FOUND
    text = value if limit is None or len(value) <= limit else value[:limit]
    if not text.isprintable():
        out = []
        for char in text:
            if char.isprintable():
                out.append(char)
                continue
            code = ord(char)
            if code < 0x100:
                out.append("\\x%02x" % code)
            elif code < 0x10000:
                out.append("\\u%04x" % code)
            else:
                out.append("\\U%08x" % code)
        text = "".join(out)
    return text + "…" if limit is not None and len(value) > limit else text


def h(value: str | None, limit: int | None = None) -> str:
    """:func:`display`, escaped for HTML text, a quoted HTML attribute value or SVG text
    (``& < > " '`` become character references)."""
    return html.escape(display(value, limit), quote=True)


def segment(value: str) -> str:
    """*value* percent-encoded as one URL path segment (everything but ``A-Z a-z 0-9 - . _ ~``,
    so ``/``, ``:``, ``?`` and ``#`` too; UTF-8 first)."""
    return quote(value.encode("utf-8", "surrogatepass"), safe="")


def urlencode(params: dict[str, str]) -> str:
    """A query string of *params* (empty values left out), each value percent-encoded."""
    return _urlencode({k: v for k, v in params.items() if v}, quote_via=quote, safe="")


def ip_href(value: str) -> str:
    """The (unescaped) path of an address's page."""
    return "/dashboard/ip/" + segment(value)


def number_href(value: str) -> str:
    """The (unescaped) path of a called number's page."""
    return "/dashboard/number/" + segment(value)


def events_href(**params: str) -> str:
    """The (unescaped) path of the events table with *params* as filters."""
    query = urlencode(params)
    return "/dashboard/events" + ("?" + query if query else "")


def link(href: str, text: str | None, limit: int | None = CELL_CHARS) -> str:
    """``<a>`` to the site path *href* showing *text*; the whole text is the ``title`` when cut."""
    shown = h(text, limit)
    title = f' title="{h(text, MAX_PARAMETER_CHARS)}"' if text and limit and len(text) > limit else ""
    return f'<a href="{html.escape(href, quote=True)}"{title}>{shown}</a>'


def cell(text: str | None, limit: int | None = CELL_CHARS) -> str:
    """A ``<td>`` showing *text* (cut at *limit*, the whole value in ``title`` when cut)."""
    if text and limit and len(text) > limit:
        return f'<td class="w" title="{h(text, MAX_PARAMETER_CHARS)}">{h(text, limit)}</td>'
    return f'<td class="w">{h(text)}</td>'


def number_cell(n: int) -> str:
    """A right-aligned ``<td>`` with *n* written with thousands separators."""
    return f'<td class="n">{n:,}</td>'


# ---------------------------------------------------------------------------------------------
# SVG charts (pure)

_SVG_OPEN = '<svg xmlns="http://www.w3.org/2000/svg" class="chart" role="img" viewBox="0 0 {w} {h}"'


def _svg_open(width: int, height: int, title: str) -> list[str]:
    return [
        _SVG_OPEN.format(w=width, h=height) + f' aria-label="{h(title)}">',
        f"<title>{h(title)}</title>",
    ]


def _scale_max(values: Iterable[int]) -> int:
    """A round upper bound for an axis (1, 2 or 5 times a power of ten), at least 1."""
    top = max(values, default=0)
    step = 1
    while True:
        for factor in (1, 2, 5):
            if step * factor >= top:
                return step * factor
        step *= 10


def time_chart(
    points: Sequence[tuple[str, str, int]], title: str, width: int = 720, height: int = 220
) -> str:
    """A vertical bar chart of counts over time, as a standalone SVG document.

    :param points: ``(axis label, bar title, count)`` per bar, oldest first; labels are shown
        under every few bars so that they do not overlap, titles are the bars' tooltips.
    :param title: the chart's accessible name.
    """
    left, right, top, bottom = 48, 8, 12, 36
    plot_w, plot_h = width - left - right, height - top - bottom
    peak = _scale_max(count for _, _, count in points)
    out = _svg_open(width, height, title)
    for fraction in (0, 0.5, 1):
        y = top + plot_h - fraction * plot_h
        out.append(f'<line class="grid" x1="{left}" y1="{y:.1f}" x2="{width - right}" y2="{y:.1f}"/>')
        out.append(
            f'<text class="axis" x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">'
            f"{peak * fraction:,.0f}</text>"
        )
    n = max(len(points), 1)
    slot = plot_w / n
    every = max(1, -(-n // 12))
    for i, (label, bar_title, count) in enumerate(points):
        bar_h = plot_h * count / peak
        x = left + i * slot + slot * 0.1
        y = top + plot_h - bar_h
        out.append(
            f'<rect class="bar" x="{x:.1f}" y="{y:.1f}" width="{slot * 0.8:.1f}" height="{bar_h:.1f}">'
            f"<title>{h(bar_title)}: {count:,}</title></rect>"
        )
        if i % every == 0 or i == n - 1:
            out.append(
                f'<text class="axis" x="{x + slot * 0.4:.1f}" y="{height - bottom + 16}"'
                f' text-anchor="middle">{h(label, LABEL_CHARS)}</text>'
            )
    out.append("</svg>")
    return "".join(out)


def bar_chart(items: Sequence[tuple[str | None, int]], title: str, width: int = 480) -> str:
    """A horizontal bar chart of labelled counts (a "top" list), as a standalone SVG document.

    :param items: ``(label, count)``, drawn top to bottom; labels are attacker text, shown through
        :func:`display` and cut to :data:`LABEL_CHARS` (the whole label is the bar's tooltip).
    """
    row_h, label_w, right = 22, 220, 60
    height = max(1, len(items)) * row_h + 8
    peak = max((count for _, count in items), default=0) or 1
    out = _svg_open(width, height, title)
    if not items:
        out.append(f'<text class="axis" x="4" y="18">{h("no events")}</text>')
    for i, (label, count) in enumerate(items):
        y = 4 + i * row_h
        bar_w = (width - label_w - right) * count / peak
        out.append(
            f'<text class="label" x="{label_w - 6}" y="{y + 15}" text-anchor="end">'
            f"{h(label, LABEL_CHARS)}</text>"
            f'<rect class="bar" x="{label_w}" y="{y + 3}" width="{bar_w:.1f}" height="{row_h - 6}">'
            f"<title>{h(label, MAX_PARAMETER_CHARS)}: {count:,}</title></rect>"
            f'<text class="axis" x="{label_w + bar_w + 4:.1f}" y="{y + 15}">{count:,}</text>'
        )
    out.append("</svg>")
    return "".join(out)


def hourly_points(counts: Sequence[tuple[datetime.datetime, int]]) -> list[tuple[str, str, int]]:
    """:func:`time_chart` points for :func:`~sentrypeer.storage.dashboard_queries.events_per_hour`."""
    return [(start.strftime("%H:00"), start.strftime("%Y-%m-%d %H:00 UTC"), n) for start, n in counts]


def daily_points(counts: Sequence[tuple[datetime.datetime, int]]) -> list[tuple[str, str, int]]:
    """:func:`time_chart` points for :func:`~sentrypeer.storage.dashboard_queries.events_per_day`."""
    return [(start.strftime("%m-%d"), start.strftime("%Y-%m-%d UTC"), n) for start, n in counts]


# ---------------------------------------------------------------------------------------------
# Pages (pure: data in, bytes out)

STYLE = b"""\
body{font-family:system-ui,sans-serif;margin:0;color:#1b1f24;background:#f6f7f9}
header{background:#1f3a5f;color:#fff;padding:.6em 1em}
header a{color:#fff;margin-right:1.2em;text-decoration:none;font-weight:600}
main{padding:1em;max-width:1200px}
h1{font-size:1.4em;overflow-wrap:anywhere}h2{font-size:1.15em;margin-top:1.6em}h3{font-size:1em}
table{border-collapse:collapse;background:#fff;margin:.4em 0;max-width:100%}
th,td{border:1px solid #d5d9de;padding:.25em .5em;text-align:left;vertical-align:top;
overflow-wrap:break-word;font-size:.9em}
td.w{overflow-wrap:anywhere;min-width:8em}td.nw{white-space:nowrap}
td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}
.grid-2{display:grid;grid-template-columns:repeat(auto-fit,minmax(420px,1fr));gap:1em}
.chart{width:100%;height:auto;background:#fff;border:1px solid #d5d9de}
.chart .bar{fill:#3b6ea5}.chart .grid{stroke:#e3e6ea}
.chart text{font-size:11px;fill:#1b1f24;font-family:system-ui,sans-serif}
.chart .axis{fill:#555}
form.filters{display:flex;flex-wrap:wrap;gap:.6em;align-items:end;background:#fff;padding:.6em;
border:1px solid #d5d9de}
form.filters label{display:flex;flex-direction:column;font-size:.85em}
.error{background:#fdecea;border:1px solid #f5c2bd;padding:.8em}
.pager a{margin-right:1em}
footer{color:#666;font-size:.8em;padding:1em}
dl.facts{display:grid;grid-template-columns:max-content auto;gap:.2em 1em;background:#fff;padding:.6em;
border:1px solid #d5d9de}dl.facts dt{font-weight:600}dl.facts dd{margin:0}
"""

FAVICON = (
    b'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 16 16">'
    b'<rect width="16" height="16" rx="3" fill="#1f3a5f"/>'
    b'<path d="M4 11h2V7H4zm3 0h2V4H7zm3 0h2V8h-2z" fill="#fff"/></svg>'
)

#: Columns of the events table: (heading, numeric).
_EVENT_HEADINGS = (
    ("Time (UTC)", False), ("Source", False), ("Port", True), ("Transport", False),
    ("Method", False), ("Called number", False), ("User-Agent", False), ("Status", False),
    ("Origin", False),
)


def page(title: str, body: Iterable[str]) -> bytes:
    """A whole HTML document: *title* is our text (escaped here), *body* already-escaped HTML."""
    parts = [
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">",
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        '<meta name="referrer" content="no-referrer">',
        f"<title>SentryPeer: {html.escape(title)}</title>",
        '<link rel="stylesheet" href="/dashboard/style.css">',
        '<link rel="icon" href="/dashboard/favicon.svg" type="image/svg+xml">',
        "</head><body><header><nav>",
        '<a href="/dashboard/">SentryPeer dashboard</a><a href="/dashboard/events">Events</a>',
        "</nav></header><main>",
        *body,
        f"</main><footer>SentryPeer {html.escape(__version__)}. Times are UTC.</footer></body></html>\n",
    ]
    return "".join(parts).encode("utf-8")


def error_page(code: int, message: str) -> bytes:
    """The page of an error status; *message* is our text (escaped here)."""
    reason = http.RESPONSES.get(code, b"Error").decode("ascii")
    return page(
        reason, [f"<h1>{code} {html.escape(reason)}</h1>", f'<p class="error">{html.escape(message)}</p>']
    )


def _timestamp(value: str | None) -> str:
    """A stored timestamp cut to whole seconds for display (escaped)."""
    return h(value[:19] if value else value)


def _origin(node: str | None, local_node: str | None) -> str:
    if node is None or node == local_node:
        return "this node"
    return "peer " + node[:8]


def events_table(rows: Sequence[dq.EventRow], local_node: str | None) -> list[str]:
    """The HTML of an events table (the empty case says so)."""
    if not rows:
        return ["<p>No events.</p>"]
    out = ["<table><thead><tr>"]
    out.extend(f'<th{" class=n" if numeric else ""}>{heading}</th>' for heading, numeric in _EVENT_HEADINGS)
    out.append("</tr></thead><tbody>")
    for row in rows:
        source = link(ip_href(row.source_ip), row.source_ip) if row.source_ip else h(None)
        number = link(number_href(row.called_number), row.called_number) if row.called_number else h(None)
        method = link(events_href(method=row.method), row.method, 32) if row.method else h(None)
        out.append(
            f'<tr><td class="nw">{_timestamp(row.event_timestamp)}</td><td class="w">{source}</td>'
            f'<td class="n">{"" if row.source_port is None else int(row.source_port)}</td>'
            f'{cell(row.transport_type, 16)}<td class="w">{method}</td><td class="w">{number}</td>'
            f"{cell(row.user_agent)}{cell(row.parse_status, 16)}"
            f"{cell(_origin(row.created_by_node_id, local_node), 40)}</tr>"
        )
    out.append("</tbody></table>")
    return out


def count_table(
    heading: str, items: Sequence[dq.Count], href: Callable[[str], str] | None, with_last_seen: bool = False
) -> list[str]:
    """A two- or three-column table of values and counts; values link to *href* when given."""
    out = [f"<table><thead><tr><th>{html.escape(heading)}</th><th class=n>Events</th>"]
    if with_last_seen:
        out.append("<th>Last seen (UTC)</th>")
    out.append("</tr></thead><tbody>")
    if not items:
        out.append(f'<tr><td colspan="{3 if with_last_seen else 2}">None</td></tr>')
    for item in items:
        value = link(href(item.value), item.value) if href and item.value else h(item.value, CELL_CHARS)
        out.append(f'<tr><td class="w">{value}</td>{number_cell(item.count)}')
        if with_last_seen:
            out.append(f'<td class="nw">{_timestamp(item.last_seen)}</td>')
        out.append("</tr>")
    out.append("</tbody></table>")
    return out


def _merge_missing(items: Sequence[dq.Count]) -> list[tuple[str | None, int]]:
    """Chart items: NULL and ``NOT_FOUND`` shown as one ``NOT_FOUND`` bar."""
    merged: dict[str, int] = {}
    for item in items:
        key = item.value or NOT_FOUND
        merged[key] = merged.get(key, 0) + item.count
    return sorted(merged.items(), key=lambda kv: (-kv[1], kv[0]))


class Overview(NamedTuple):
    """What the overview page shows (filled in the database thread by :func:`overview_data`)."""

    node_id: str | None
    totals: dq.Totals
    per_hour: list[tuple[datetime.datetime, int]]
    per_day: list[tuple[datetime.datetime, int]]
    top: dict[str, list[dq.Count]]
    latest: dq.EventPage


def overview_data(cursor: Any, now: float) -> Overview:
    """``run_query`` function: everything the overview shows, read in one transaction."""
    since = dq.cutoff(now, TOP_DAYS * 86400)
    top = {column: dq.top_values(cursor, column, TOP_LIMIT, since) for column in sorted(dq.TOP_COLUMNS)}
    return Overview(
        dq.node_id(cursor),
        dq.totals(cursor),
        dq.events_per_hour(cursor, now),
        dq.events_per_day(cursor, now),
        top,
        dq.recent_events(cursor, dq.EventFilter(), 20),
    )


def render_overview(data: Overview) -> bytes:
    """The overview page."""
    t = data.totals
    body = [
        "<h1>Overview</h1>",
        '<dl class="facts">',
        f"<dt>Events</dt><dd>{t.events:,}</dd>",
        f"<dt>Source addresses</dt><dd>{t.source_ips:,}</dd>",
        f"<dt>Called numbers</dt><dd>{t.numbers:,}</dd>",
        f"<dt>First event</dt><dd>{_timestamp(t.first_seen)}</dd>",
        f"<dt>Last event</dt><dd>{_timestamp(t.last_seen)}</dd>",
        f"<dt>This node</dt><dd>{h(data.node_id)}</dd>",
        "</dl>",
        '<div class="grid-2"><section><h2>Events per hour, last 24 hours</h2>',
        time_chart(hourly_points(data.per_hour), "Events per hour, last 24 hours"),
        "</section><section><h2>Events per day, last 30 days</h2>",
        time_chart(daily_points(data.per_day), "Events per day, last 30 days"),
        "</section></div>",
        f"<h2>Last {TOP_DAYS} days</h2>",
        '<div class="grid-2">',
    ]
    top = data.top
    charts = (("method", "Methods"), ("transport_type", "Transports"), ("user_agent", "User-Agents"))
    for column, heading in charts:
        body.append(f"<section><h3>{heading}</h3>")
        body.append(bar_chart(_merge_missing(top[column]), f"{heading}, last {TOP_DAYS} days"))
        body.append("</section>")
    body.append("<section><h3>Source addresses</h3>")
    body.extend(count_table("Address", top["source_ip"], ip_href))
    body.append("</section><section><h3>Called numbers</h3>")
    body.extend(count_table("Number", top["called_number"], number_href))
    body.append("</section><section><h3>User-Agents</h3>")
    body.extend(count_table("User-Agent", top["user_agent"], None))
    body.append("</section><section><h3>Methods</h3>")
    body.extend(count_table("Method", top["method"], lambda m: events_href(method=m)))
    body.append("</section></div>")
    body.append(f'<h2>Latest events</h2><p><a href="{events_href()}">All events</a></p>')
    body.extend(events_table(data.latest.rows, data.node_id))
    return page("Overview", body)


class EventQuery(NamedTuple):
    """The events table's parameters as given (for the form and the links) and as used."""

    form: dict[str, str]
    filters: dq.EventFilter
    page: int


def _single(args: dict[bytes, list[bytes]], name: str) -> str:
    values = args.get(name.encode("ascii")) or []
    if len(values) > 1:
        raise BadRequest(f"{name} given more than once")
    if not values:
        return ""
    try:
        text = values[0].decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest(f"{name} is not UTF-8") from None
    if len(text) > MAX_PARAMETER_CHARS:
        raise BadRequest(f"{name} is too long")
    return text.strip()


_TIME_FORMATS = ("%Y-%m-%d %H:%M:%S", "%Y-%m-%d %H:%M", "%Y-%m-%d")
#: strptime alone also takes "2024-1-1" and " 2024-01-01".
_TIME_RE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}( [0-9]{2}:[0-9]{2}(:[0-9]{2})?)?")


def parse_time(text: str, name: str, end_of_day: bool = False) -> str | None:
    """A UTC time parameter as an ``event_timestamp`` comparison string.

    :param text: ``YYYY-MM-DD``, ``YYYY-MM-DD HH:MM`` or ``YYYY-MM-DD HH:MM:SS`` (``T`` instead of
        the space too, as HTML ``datetime-local`` inputs send); empty for none.
    :param end_of_day: a bare date means the start of the next day (for the exclusive ``until``).
    :returns: ``YYYY-MM-DD HH:MM:SS``, or ``None`` for an empty *text*.
    :raises BadRequest: any other text.
    """
    if not text:
        return None
    normalised = text.replace("T", " ", 1)
    if not _TIME_RE.fullmatch(normalised):
        raise BadRequest(f"{name} must be YYYY-MM-DD or YYYY-MM-DD HH:MM[:SS] (UTC)")
    for form in _TIME_FORMATS:
        try:
            moment = datetime.datetime.strptime(normalised, form)
        except ValueError:
            continue
        if form == "%Y-%m-%d" and end_of_day:
            try:
                moment += datetime.timedelta(days=1)
            except OverflowError:
                return None
        return moment.strftime("%Y-%m-%d %H:%M:%S")
    raise BadRequest(f"{name} must be YYYY-MM-DD or YYYY-MM-DD HH:MM[:SS] (UTC)")


def address_spellings(text: str) -> tuple[str, ...]:
    """The stored spellings to look an address up by: those of
    :func:`~sentrypeer.api.resources.ip_lookup_forms` for an address literal, else *text* itself
    (rows of older databases may hold something else; it is matched exactly)."""
    return ip_lookup_forms(text) or (text,)


def parse_event_query(args: dict[bytes, list[bytes]]) -> EventQuery:
    """The events table's query parameters (``ip``, ``number``, ``method``, ``since``, ``until``,
    ``page``).

    :raises BadRequest: a parameter given twice, not UTF-8, too long, a bad time, or a page number
        that is not an integer from 1 to :data:`MAX_PAGE`.
    """
    form = {name: _single(args, name) for name in ("ip", "number", "method", "since", "until")}
    page_text = _single(args, "page") or "1"
    well_formed = page_text.isascii() and page_text.isdigit() and len(page_text) <= 7
    if not well_formed or not 1 <= int(page_text) <= MAX_PAGE:
        raise BadRequest(f"page must be a whole number from 1 to {MAX_PAGE}")
    filters = dq.EventFilter(
        source_ips=address_spellings(form["ip"]) if form["ip"] else (),
        number=form["number"] or None,
        method=form["method"] or None,
        since=parse_time(form["since"], "since"),
        until=parse_time(form["until"], "until", end_of_day=True),
    )
    return EventQuery(form, filters, int(page_text))


def events_data(cursor: Any, query: EventQuery) -> tuple[str | None, dq.EventPage]:
    """``run_query`` function: this node's id and the page of events."""
    offset = (query.page - 1) * PAGE_SIZE
    return dq.node_id(cursor), dq.recent_events(cursor, query.filters, PAGE_SIZE, offset)


def _input(name: str, label: str, value: str, placeholder: str = "") -> str:
    hint = f' placeholder="{html.escape(placeholder)}"' if placeholder else ""
    return (
        f'<label>{label}<input type="text" name="{name}" value="{h(value) if value else ""}"'
        f' maxlength="{MAX_PARAMETER_CHARS}"{hint}></label>'
    )


def render_events(query: EventQuery, result: tuple[str | None, dq.EventPage]) -> bytes:
    """The events table with its filter form and paging links."""
    local_node, events = result
    form = query.form
    body = [
        "<h1>Events</h1>",
        '<form class="filters" method="get" action="/dashboard/events">',
        _input("ip", "Source address", form["ip"]),
        _input("number", "Called number", form["number"]),
        _input("method", "Method", form["method"], "INVITE"),
        _input("since", "Since (UTC)", form["since"], "YYYY-MM-DD HH:MM"),
        _input("until", "Until (UTC)", form["until"], "YYYY-MM-DD HH:MM"),
        '<button type="submit">Filter</button>',
        f'<a href="{events_href()}">Clear</a>',
        "</form>",
    ]
    body.extend(events_table(events.rows, local_node))
    pager = []
    if query.page > 1:
        newer = html.escape(events_href(**form, page=str(query.page - 1)))
        pager.append(f'<a rel="prev" href="{newer}">Newer</a>')
    if events.has_more and query.page < MAX_PAGE:
        older = html.escape(events_href(**form, page=str(query.page + 1)))
        pager.append(f'<a rel="next" href="{older}">Older</a>')
    body.append(f'<p class="pager">Page {query.page} {"".join(pager)}</p>')
    return page("Events", body)


class Detail(NamedTuple):
    """What an address's or a number's page shows."""

    node_id: str | None
    summary: dq.Summary
    breakdowns: dict[str, list[dq.Count]]
    events: dq.EventPage


_IP_BREAKDOWNS = ("called_number", "user_agent", "method", "transport_type")
_NUMBER_BREAKDOWNS = ("source_ip", "user_agent", "method", "transport_type")


def ip_data(cursor: Any, spellings: tuple[str, ...]) -> Detail:
    """``run_query`` function: the page of one source address."""
    return Detail(
        dq.node_id(cursor),
        dq.ip_summary(cursor, spellings),
        {column: dq.ip_breakdown(cursor, spellings, column) for column in _IP_BREAKDOWNS},
        dq.recent_events(cursor, dq.EventFilter(source_ips=spellings), PAGE_SIZE),
    )


def number_data(cursor: Any, number: str) -> Detail:
    """``run_query`` function: the page of one called number."""
    return Detail(
        dq.node_id(cursor),
        dq.number_summary(cursor, number),
        {column: dq.number_breakdown(cursor, number, column) for column in _NUMBER_BREAKDOWNS},
        dq.recent_events(cursor, dq.EventFilter(number=number), PAGE_SIZE),
    )


def _detail_facts(s: dq.Summary, other: str) -> list[str]:
    return [
        '<dl class="facts">',
        f"<dt>Events</dt><dd>{s.events:,}</dd>",
        f"<dt>First seen</dt><dd>{_timestamp(s.first_seen)}</dd>",
        f"<dt>Last seen</dt><dd>{_timestamp(s.last_seen)}</dd>",
        f"<dt>{other}</dt><dd>{s.distinct:,}</dd>",
        f"<dt>User-Agents</dt><dd>{s.user_agents:,}</dd>",
        "</dl>",
    ]


def render_ip(address: str, data: Detail) -> bytes:
    """The page of one source address (*address* as asked for)."""
    return _render_detail(
        "Source address", address, data, ("Numbers tried", "Number", "called_number", number_href),
        (events_href(ip=address), "All events from this address"),
    )


def render_number(number: str, data: Detail) -> bytes:
    """The page of one called number."""
    return _render_detail(
        "Called number", number, data, ("Source addresses", "Address", "source_ip", ip_href),
        (events_href(number=number), "All events to this number"),
    )


def _render_detail(title: str, value: str, data: Detail, first: tuple, more: tuple) -> bytes:
    """The page of one address or number: facts, the other side's top list (*first*: section
    heading, column name, breakdown key, link maker), User-Agents, methods, transports, and the
    latest events with a link (*more*: href, text) to all of them."""
    heading, column, key, href = first
    b = data.breakdowns
    body = [f"<h1>{title} {h(value, CELL_CHARS)}</h1>"]
    body.extend(_detail_facts(data.summary, heading))
    body.append(f'<div class="grid-2"><section><h2>{heading}</h2>')
    body.extend(count_table(column, b[key], href, True))
    body.append("</section><section><h2>User-Agents</h2>")
    body.extend(count_table("User-Agent", b["user_agent"], None, True))
    body.append("</section><section><h2>Methods</h2>")
    body.append(bar_chart(_merge_missing(b["method"]), "Methods"))
    body.append("</section><section><h2>Transports</h2>")
    body.append(bar_chart(_merge_missing(b["transport_type"]), "Transports"))
    body.append("</section></div>")
    link, text = more
    body.append(f'<h2>Latest events</h2><p><a href="{html.escape(link)}">{text}</a></p>')
    body.extend(events_table(data.events.rows, data.node_id))
    return page(title, body)


def decode_path_segment(raw: bytes) -> str:
    """One percent-encoded path segment as text (UTF-8).

    :raises BadRequest: empty, not UTF-8 once decoded, or longer than :data:`MAX_PARAMETER_CHARS`.
    """
    if not raw or len(raw) > 3 * MAX_PARAMETER_CHARS:
        raise BadRequest("the path segment is empty or too long")
    try:
        text = unquote_to_bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("the path segment is not UTF-8") from None
    if len(text) > MAX_PARAMETER_CHARS:
        raise BadRequest("the path segment is too long")
    return text


# ---------------------------------------------------------------------------------------------
# The resource


class DashboardResource(Resource):
    """Every ``/dashboard`` path (one leaf resource; routing in :meth:`render`).

    Order of checks: method (``405``), token (``401``), route (``404``), parameters (``400``),
    then the page, built from one read transaction in the database's thread (:func:`reader`).

    :param database: anything with ``run_read(fn, *args) -> Deferred`` or
        ``run_query(fn, *args) -> Deferred`` (:class:`sentrypeer.storage.database.Database`).
    :param token: ``--api-token``; ``None`` or empty for an open dashboard.
    :param clock: gives "now" (``seconds()``) for the time charts; ``None`` for the system clock.
    """

    isLeaf = True

    def __init__(self, database: Any, token: str | None = None, clock: Any = None) -> None:
        super().__init__()
        self.database = database
        self.token = token or None
        self._now: Callable[[], float] = clock.seconds if clock is not None else time.time

    def render(self, request: Any) -> int:
        """Answer *request* (``NOT_DONE_YET``: the page is written when its query is done)."""
        try:
            self._dispatch(request)
        except Exception:
            failure = Failure()
            log_server_error(request, failure)
            if not getattr(request, "startedWriting", False):
                send_secure(request, http.INTERNAL_SERVER_ERROR, error_page(500, "Internal error"), HTML_TYPE)
        return NOT_DONE_YET

    def _dispatch(self, request: Any) -> None:
        if not method_allowed(request, error_page, HTML_TYPE):
            return
        if not require_token(request, self.token, DASHBOARD_CHALLENGE, error_page, HTML_TYPE):
            return
        path = request.path
        if path == PREFIX:
            send_secure(
                request, http.MOVED_PERMANENTLY, error_page(301, "Moved to /dashboard/"), HTML_TYPE,
                [(b"Location", [b"/dashboard/"])],
            )
            return
        rest = path[len(PREFIX):]
        try:
            if rest == b"/":
                self._page(request, overview_data, render_overview, self._now())
            elif rest == b"/events":
                query = parse_event_query(request.args)
                self._page(request, events_data, lambda result: render_events(query, result), query)
            elif rest == b"/style.css":
                send_secure(request, http.OK, STYLE, CSS_TYPE)
            elif rest == b"/favicon.svg":
                send_secure(request, http.OK, FAVICON, SVG_TYPE)
            elif rest.startswith(b"/ip/") and b"/" not in rest[4:]:
                address = decode_path_segment(rest[4:])
                spellings = address_spellings(address)
                self._page(request, ip_data, lambda data: render_ip(address, data), spellings)
            elif rest.startswith(b"/number/") and b"/" not in rest[8:]:
                number = decode_path_segment(rest[8:])
                self._page(request, number_data, lambda data: render_number(number, data), number)
            else:
                send_secure(request, http.NOT_FOUND, error_page(404, "No such page."), HTML_TYPE)
        except BadRequest as e:
            send_secure(request, http.BAD_REQUEST, error_page(400, str(e)), HTML_TYPE)

    def _page(self, request: Any, fn: Callable[..., Any], render: Callable[[Any], bytes], *args: Any) -> None:
        def respond(result: Any) -> None:
            send_secure(request, http.OK, render(result), HTML_TYPE)

        answer_later(request, lambda: reader(self.database)(fn, *args), respond, error_page, HTML_TYPE)


__all__ = [
    "CSP",
    "SECURITY_HEADERS",
    "BadRequest",
    "DashboardResource",
    "answer_later",
    "bar_chart",
    "display",
    "h",
    "method_allowed",
    "parse_event_query",
    "parse_time",
    "require_token",
    "segment",
    "send_secure",
    "time_chart",
]
