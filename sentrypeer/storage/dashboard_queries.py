"""The SQL behind the web dashboard and the blocklist exports (issue 8).

Pure module (no Twisted import): every function takes a DB-API cursor of :mod:`sqlite3` (or an
``adbapi`` transaction standing in for one) and only reads, so it runs in the database thread
through ``Database.run_query`` and in tests on a plain connection made by
:func:`sentrypeer.storage.queries.migrate`.

Every query reads table ``honey`` through the schema-1 indexes (``source_ip_index``,
``called_number_index``, ``event_timestamp_index``) and returns a bounded number of rows (``LIMIT``
on every list). Times are ``event_timestamp`` strings (``YYYY-MM-DD HH:MM:SS.NNNNNNNNN``, UTC), so a
time range is a string range on ``event_timestamp_index`` and an hour or a day is a prefix of the
string (13 or 10 characters).

Which queries scan more than they return (and could read per-IP / per-number summary tables
instead, once the schema has them) is said in each docstring under "Cost".
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from typing import Any, NamedTuple

from sentrypeer.storage.api_queries import stored_text

#: Columns a "top" list may group by (anything else is refused: the name is put into SQL).
TOP_COLUMNS = frozenset({"source_ip", "called_number", "user_agent", "method", "transport_type"})

#: The most rows any list returns, whatever the caller asks.
MAX_LIST_ROWS = 1000

#: The most events one page of the events table shows.
MAX_PAGE_SIZE = 200

#: The deepest ``offset`` an events page may start at: deeper history is reached with a time filter
#: (an ``OFFSET`` walks every skipped row).
MAX_OFFSET = 100_000

#: The most distinct stored ``source_ip`` spellings a blocklist query reads (the ``ipset`` sets
#: hold up to this many addresses too, see ``sentrypeer.api.blocklist``).
MAX_BLOCKLIST_ROWS = 1_048_576

#: The most distinct own destination addresses read for the blocklist's exclusions.
MAX_OWN_ADDRESSES = 4096

_EVENT_COLUMNS = (
    "honey_id, event_timestamp, source_ip, source_port, transport_type, method, called_number,"
    " user_agent, parse_status, created_by_node_id"
)

#: SQL expression: this node's id (``NULL`` in a database that has none yet).
_NODE_ID_SQL = "(SELECT node_id FROM sentrypeer_node WHERE id = 1)"


class Totals(NamedTuple):
    """Counts over the whole table.

    :ivar events: rows in ``honey``.
    :ivar source_ips: distinct ``source_ip`` values.
    :ivar numbers: distinct ``called_number`` values.
    :ivar first_seen: the earliest ``event_timestamp`` (``None`` when there is none).
    :ivar last_seen: the latest ``event_timestamp``.
    """

    events: int
    source_ips: int
    numbers: int
    first_seen: str | None
    last_seen: str | None


class Count(NamedTuple):
    """One line of a "top" list.

    :ivar value: the grouped value as stored (``None`` for NULL).
    :ivar count: rows with that value.
    :ivar last_seen: the latest ``event_timestamp`` among them (``None`` when not asked for).
    """

    value: str | None
    count: int
    last_seen: str | None = None


class EventRow(NamedTuple):
    """One line of the events table (the columns shown, not the whole event)."""

    honey_id: int
    event_timestamp: str | None
    source_ip: str | None
    source_port: int | None
    transport_type: str | None
    method: str | None
    called_number: str | None
    user_agent: str | None
    parse_status: str | None
    created_by_node_id: str | None


class EventFilter(NamedTuple):
    """The filters of the events table; ``None``/empty means "any".

    :ivar source_ips: spellings of one address (any of them matches), canonical first.
    :ivar number: an exact ``called_number``.
    :ivar method: an exact ``method`` (SIP methods are case-sensitive, RFC 3261 §7.1).
    :ivar since: events at or after this ``event_timestamp`` string.
    :ivar until: events strictly before this ``event_timestamp`` string.
    """

    source_ips: tuple[str, ...] = ()
    number: str | None = None
    method: str | None = None
    since: str | None = None
    until: str | None = None


class EventPage(NamedTuple):
    """A page of the events table.

    :ivar rows: at most the page size, newest first.
    :ivar has_more: whether rows follow this page.
    """

    rows: list[EventRow]
    has_more: bool


class Summary(NamedTuple):
    """What is known about one source address or one called number.

    :ivar events: matching rows.
    :ivar first_seen: the earliest ``event_timestamp``.
    :ivar last_seen: the latest ``event_timestamp``.
    :ivar distinct: distinct values of the other side (numbers tried by an address; addresses that
        tried a number).
    :ivar user_agents: distinct ``user_agent`` values.
    """

    events: int
    first_seen: str | None
    last_seen: str | None
    distinct: int
    user_agents: int


def _bounded(limit: int, ceiling: int = MAX_LIST_ROWS) -> int:
    if limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    return min(limit, ceiling)


def _placeholders(values: Sequence[Any]) -> str:
    if not values:
        raise ValueError("at least one value is needed")
    return ", ".join("?" * len(values))


def cutoff(now: float, seconds: float) -> str:
    """The ``event_timestamp`` string *seconds* before *now* (both in seconds since the epoch, UTC).

    Compared as strings with stored timestamps: ``event_timestamp >= cutoff(now, 86400)`` is "within
    the last day".
    """
    moment = datetime.datetime.fromtimestamp(now - seconds, datetime.UTC)
    return moment.strftime("%Y-%m-%d %H:%M:%S.") + "%09d" % (moment.microsecond * 1000)


def _texts(row: Sequence[Any]) -> tuple[Any, ...]:
    return tuple(stored_text(value) for value in row)


def node_id(cursor: Any) -> str | None:
    """This node's id (table ``sentrypeer_node``), or ``None`` when the database has none."""
    cursor.execute("SELECT node_id FROM sentrypeer_node WHERE id = 1")
    row = cursor.fetchone()
    return None if row is None else str(row[0])


def totals(cursor: Any) -> Totals:
    """Counts over the whole ``honey`` table.

    Cost: ``count(*)`` and the two ``count(DISTINCT …)`` walk a whole index each (no table rows
    read); first/last seen are one index probe each. A summary table of addresses and numbers would
    make the distinct counts a row count.
    """
    cursor.execute("SELECT count(*) FROM honey")
    events = int(cursor.fetchone()[0])
    cursor.execute("SELECT count(DISTINCT source_ip) FROM honey")
    source_ips = int(cursor.fetchone()[0])
    cursor.execute("SELECT count(DISTINCT called_number) FROM honey")
    numbers = int(cursor.fetchone()[0])
    cursor.execute("SELECT min(event_timestamp), max(event_timestamp) FROM honey")
    first_seen, last_seen = _texts(cursor.fetchone())
    return Totals(events, source_ips, numbers, first_seen, last_seen)


def _bucket_counts(cursor: Any, width: int, since: str, until: str) -> dict[str, int]:
    cursor.execute(
        f"SELECT substr(event_timestamp, 1, {width:d}) AS bucket, count(*) FROM honey"
        " WHERE event_timestamp >= ? AND event_timestamp < ? GROUP BY bucket",
        (since, until),
    )
    return {str(bucket): int(count) for bucket, count in cursor.fetchall()}


def hour_starts(now: float, hours: int = 24) -> list[datetime.datetime]:
    """The starts (UTC) of the last *hours* whole hours, the current one last."""
    current = datetime.datetime.fromtimestamp(now, datetime.UTC).replace(
        minute=0, second=0, microsecond=0
    )
    return [current - datetime.timedelta(hours=hours - 1 - i) for i in range(hours)]


def day_starts(now: float, days: int = 30) -> list[datetime.datetime]:
    """The starts (UTC midnight) of the last *days* days, today last."""
    today = datetime.datetime.fromtimestamp(now, datetime.UTC).replace(
        hour=0, minute=0, second=0, microsecond=0
    )
    return [today - datetime.timedelta(days=days - 1 - i) for i in range(days)]


def events_per_hour(cursor: Any, now: float, hours: int = 24) -> list[tuple[datetime.datetime, int]]:
    """Events per hour over the last *hours* hours (the current hour included), oldest first, with
    a zero for every hour without events.

    Cost: a range of ``event_timestamp_index`` (covering: no table rows read).
    """
    starts = hour_starts(now, hours)
    since = starts[0].strftime("%Y-%m-%d %H")
    until = (starts[-1] + datetime.timedelta(hours=1)).strftime("%Y-%m-%d %H")
    counts = _bucket_counts(cursor, 13, since, until)
    return [(start, counts.get(start.strftime("%Y-%m-%d %H"), 0)) for start in starts]


def events_per_day(cursor: Any, now: float, days: int = 30) -> list[tuple[datetime.datetime, int]]:
    """Events per day over the last *days* days (today included), oldest first, zeros included.

    Cost: a range of ``event_timestamp_index`` (covering). A per-day summary table would make it
    *days* rows.
    """
    starts = day_starts(now, days)
    since = starts[0].strftime("%Y-%m-%d")
    until = (starts[-1] + datetime.timedelta(days=1)).strftime("%Y-%m-%d")
    counts = _bucket_counts(cursor, 10, since, until)
    return [(start, counts.get(start.strftime("%Y-%m-%d"), 0)) for start in starts]


def top_values(cursor: Any, column: str, limit: int = 10, since: str | None = None) -> list[Count]:
    """The most frequent values of *column* (most rows first, ties by value), optionally only among
    events at or after *since*.

    :param column: one of :data:`TOP_COLUMNS`.
    :param limit: the most lines (at most :data:`MAX_LIST_ROWS`).
    :param since: an ``event_timestamp`` lower bound, or ``None`` for the whole table.
    :raises ValueError: *column* is not allowed, or *limit* is below 1.

    Cost: every row in range is grouped. For ``source_ip`` and ``called_number`` SQLite can walk
    their index; the other columns take a temporary B-tree. Per-address and per-number summary
    tables (kept by the writer) would turn both of those into an indexed ``ORDER BY count``.
    """
    if column not in TOP_COLUMNS:
        raise ValueError(f"not a column for a top list: {column!r}")
    if since is None:
        where, params, group = "", [], column
    else:
        # "+column": without it SQLite (no ANALYZE statistics) walks the column's index for the
        # GROUP BY and reads every row of the table to test the time; the time range is the
        # smaller set.
        where, params, group = "WHERE event_timestamp >= ?", [since], "+" + column
    cursor.execute(
        f"SELECT {column}, count(*) AS n FROM honey {where} GROUP BY {group}"
        f" ORDER BY n DESC, {column} LIMIT ?",
        (*params, _bounded(limit)),
    )
    return [Count(stored_text(value), int(count)) for value, count in cursor.fetchall()]


def _event_where(filters: EventFilter) -> tuple[str, list[Any]]:
    clauses: list[str] = []
    params: list[Any] = []
    if filters.source_ips:
        clauses.append(f"source_ip IN ({_placeholders(filters.source_ips)})")
        params.extend(filters.source_ips)
    if filters.number is not None:
        clauses.append("called_number = ?")
        params.append(filters.number)
    if filters.method is not None:
        clauses.append("method = ?")
        params.append(filters.method)
    if filters.since is not None:
        clauses.append("event_timestamp >= ?")
        params.append(filters.since)
    if filters.until is not None:
        clauses.append("event_timestamp < ?")
        params.append(filters.until)
    return ("WHERE " + " AND ".join(clauses)) if clauses else "", params


def recent_events(
    cursor: Any, filters: EventFilter | None = None, limit: int = 50, offset: int = 0
) -> EventPage:
    """A page of events matching *filters*, newest first (``event_timestamp`` descending, then
    ``honey_id`` descending; rows without a timestamp last).

    :param limit: events per page (at most :data:`MAX_PAGE_SIZE`).
    :param offset: events to skip (at most :data:`MAX_OFFSET`).
    :raises ValueError: *limit* below 1, *offset* negative or above :data:`MAX_OFFSET`.

    Cost: without an address or number filter, a backwards walk of ``event_timestamp_index``
    of *offset* + *limit* entries; with one, that address's or number's rows through its index,
    then a sort.
    """
    size = _bounded(limit, MAX_PAGE_SIZE)
    if not 0 <= offset <= MAX_OFFSET:
        raise ValueError(f"offset must be between 0 and {MAX_OFFSET}, got {offset}")
    where, params = _event_where(filters or EventFilter())
    cursor.execute(
        f"SELECT {_EVENT_COLUMNS} FROM honey {where}"
        " ORDER BY event_timestamp DESC, honey_id DESC LIMIT ? OFFSET ?",
        (*params, size + 1, offset),
    )
    rows = [EventRow(*_texts(row)) for row in cursor.fetchall()]
    return EventPage(rows[:size], len(rows) > size)


def _summary(cursor: Any, key: str, values: Sequence[str], other: str) -> Summary:
    cursor.execute(
        f"SELECT count(*), min(event_timestamp), max(event_timestamp), count(DISTINCT {other}),"
        f" count(DISTINCT user_agent) FROM honey WHERE {key} IN ({_placeholders(values)})",
        tuple(values),
    )
    events, first_seen, last_seen, distinct, user_agents = _texts(cursor.fetchone())
    return Summary(int(events), first_seen, last_seen, int(distinct), int(user_agents))


def _breakdown(cursor: Any, key: str, values: Sequence[str], column: str, limit: int) -> list[Count]:
    if column not in TOP_COLUMNS:
        raise ValueError(f"not a column for a breakdown: {column!r}")
    cursor.execute(
        f"SELECT {column}, count(*) AS n, max(event_timestamp) FROM honey"
        f" WHERE {key} IN ({_placeholders(values)}) GROUP BY {column}"
        f" ORDER BY n DESC, {column} LIMIT ?",
        (*values, _bounded(limit)),
    )
    return [Count(stored_text(value), int(count), stored_text(last))
            for value, count, last in cursor.fetchall()]


def ip_summary(cursor: Any, spellings: Sequence[str]) -> Summary:
    """Counts for one source address given as its stored spellings (``distinct`` = numbers tried).

    Cost: that address's rows, through ``source_ip_index``.
    """
    return _summary(cursor, "source_ip", spellings, "called_number")


def ip_breakdown(cursor: Any, spellings: Sequence[str], column: str, limit: int = 50) -> list[Count]:
    """The values of *column* (one of :data:`TOP_COLUMNS`) among one address's events, most
    frequent first, with their last-seen time."""
    return _breakdown(cursor, "source_ip", spellings, column, limit)


def number_summary(cursor: Any, number: str) -> Summary:
    """Counts for one called number (``distinct`` = source addresses that tried it).

    Cost: that number's rows, through ``called_number_index``.
    """
    return _summary(cursor, "called_number", (number,), "source_ip")


def number_breakdown(cursor: Any, number: str, column: str, limit: int = 50) -> list[Count]:
    """The values of *column* among one number's events, most frequent first."""
    return _breakdown(cursor, "called_number", (number,), column, limit)


def blocklist_sources(
    cursor: Any, since: str, include_peers: bool, limit: int = MAX_BLOCKLIST_ROWS
) -> list[tuple[str, int]]:
    """Stored ``source_ip`` spellings seen at or after *since*, with their row counts.

    Peer events are those whose ``created_by_node_id`` is set and is not this node's id
    (``sentrypeer_node``); rows without a node id (written by an original SentryPeer) count as
    this node's.

    :param since: an ``event_timestamp`` lower bound (:func:`cutoff`).
    :param include_peers: also count peers' events.
    :param limit: the most spellings returned (at most :data:`MAX_BLOCKLIST_ROWS`), in no
        particular order; the caller validates, merges spellings and applies ``min_count``.

    Cost: every row of the time range (``event_timestamp_index``); without peers each row's
    ``created_by_node_id`` is read from the table. A per-address summary table holding last-seen
    time, count and origin would make this an index range on last-seen.
    """
    origin = "" if include_peers else (
        f" AND (created_by_node_id IS NULL OR created_by_node_id = {_NODE_ID_SQL})"
    )
    # "+source_ip": search event_timestamp_index, not source_ip_index (see top_values).
    cursor.execute(
        "SELECT source_ip, count(*) FROM honey WHERE event_timestamp >= ?"
        f" AND +source_ip IS NOT NULL{origin} GROUP BY +source_ip LIMIT ?",
        (since, _bounded(limit, MAX_BLOCKLIST_ROWS)),
    )
    return [(str(ip), int(count)) for ip, count in cursor.fetchall()]


def own_destinations(cursor: Any, since: str, limit: int = MAX_OWN_ADDRESSES) -> list[str]:
    """The ``destination_ip`` values of this node's own events seen at or after *since*: addresses
    probes were sent to, hence this node's addresses (never to be blocked).

    Cost: every row of the time range, read from the table. A summary table of local addresses
    would make it a few rows.
    """
    cursor.execute(
        "SELECT DISTINCT destination_ip FROM honey WHERE event_timestamp >= ?"
        f" AND destination_ip IS NOT NULL AND created_by_node_id = {_NODE_ID_SQL} LIMIT ?",
        (since, _bounded(limit, MAX_OWN_ADDRESSES)),
    )
    return [str(row[0]) for row in cursor.fetchall()]


__all__ = [
    "MAX_BLOCKLIST_ROWS",
    "MAX_LIST_ROWS",
    "MAX_OFFSET",
    "MAX_OWN_ADDRESSES",
    "MAX_PAGE_SIZE",
    "TOP_COLUMNS",
    "Count",
    "EventFilter",
    "EventPage",
    "EventRow",
    "Summary",
    "Totals",
    "blocklist_sources",
    "cutoff",
    "day_starts",
    "events_per_day",
    "events_per_hour",
    "hour_starts",
    "ip_breakdown",
    "ip_summary",
    "node_id",
    "number_breakdown",
    "number_summary",
    "own_destinations",
    "recent_events",
    "top_values",
]
