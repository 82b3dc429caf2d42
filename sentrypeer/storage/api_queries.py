"""The SQL behind the REST API (interface.md §5, reference §4.3 and §5).

Pure module (no Twisted import): every function takes a DB-API cursor of the standard :mod:`sqlite3`
module (or an ``adbapi`` transaction standing in for one), so it runs in a database thread through
``Database.run_read`` and in tests on a plain connection made by
:func:`sentrypeer.storage.queries.migrate`. The functions only read.

The list routes and look-ups read the summary tables of schema 2 (``ip_summary``,
``number_summary``, see ``schema/upgrade-to-v2.sql``), which triggers keep equal to grouping
``honey`` (plus the probes counted while events were shed), so no API query ever scans ``honey``:
at a million events ``/ip-addresses`` reads its 20,000 summary rows, not a million rows.

Differences from the original's queries (reference §4.3 items 3-6, bugs §14.12-13):

- ``/numbers`` lists every ``called_number`` of the form ``^\\+?[0-9]{1,32}$`` (:data:`NUMBER_RE`),
  leading zeros included (``0046…``), and nothing else (not ``+abc``, ``-5``, ``NOT_FOUND``); the
  filter is SQL (:data:`NUMBER_FILTER_SQL`), applied by the summary triggers.
- ``seen_count`` counts every probe, including those whose full event was shed because the write
  queue was full (``sentrypeer.storage.queries.record_shed``).
- Lists have a deterministic order (``seen_last`` descending, then the value ascending: the order
  of the summaries' ``seen_last`` indexes) and optional ``limit``/``offset``.
- :func:`list_body` reads the total and the page in one statement (one snapshot), so they agree.
- IP look-ups take several candidate spellings of one address (the caller normalises, see
  ``sentrypeer.api.resources.ip_lookup_forms``); every look-up is a primary-key equality.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable, Iterator
from typing import Any, NamedTuple

#: The most digits a called number may have (interface.md §5).
MAX_NUMBER_DIGITS = 32

#: What the API calls a number (interface.md §5): an optional ``+`` and 1 to 32 ASCII digits. Use
#: with ``fullmatch`` (``$`` would also match before a final newline).
NUMBER_RE = re.compile(r"\+?[0-9]{1,%d}" % MAX_NUMBER_DIGITS)

#: The largest ``limit``/``offset`` handed to SQLite (it binds 64-bit signed integers); larger
#: requests are clamped to it, which changes nothing in practice.
MAX_ROWS = 2**62


def number_filter_sql(column: str) -> str:
    """The SQL condition "*column* is a number the API lists", equivalent to :data:`NUMBER_RE`.

    - the range test keeps SQLite on an index of *column* (``'+'`` sorts before the digits, and
      ``':'`` right after ``'9'``), skipping ``NOT_FOUND`` and other text without reading it;
    - the two GLOBs: a digit or ``+digit`` first, then nothing but digits (``[0-9]`` is ASCII only);
    - the length: at most 32 digits, plus one for a leading ``+``;
    - ``length(text) = length(blob)``: all ASCII and no NUL (SQLite's ``length`` and ``GLOB`` stop at
      a NUL in text, so ``'123' || char(0) || 'x'`` would otherwise pass).

    :param column: an SQL expression, such as ``called_number`` or, in a trigger,
        ``NEW.called_number``.
    """
    c, n = column, MAX_NUMBER_DIGITS
    return (
        f"({c} >= '+' AND {c} < ':'"
        f" AND ({c} GLOB '[0-9]*' OR {c} GLOB '+[0-9]*')"
        f" AND NOT substr({c}, 2) GLOB '*[^0-9]*'"
        f" AND length({c}) <= {n} + (substr({c}, 1, 1) = '+')"
        f" AND length({c}) = length(CAST({c} AS BLOB)))"
    )


#: :func:`number_filter_sql` on ``called_number``.
NUMBER_FILTER_SQL = number_filter_sql("called_number")


class Entry(NamedTuple):
    """One line of a list route: a distinct value and how it was seen.

    :ivar value: the ``source_ip`` or ``called_number``.
    :ivar seen_last: the latest ``event_timestamp`` of its rows (``created_at`` when none of them
        has one; ``None`` when neither exists).
    :ivar seen_count: the number of rows with that value.
    """

    value: str
    seen_last: str | None
    seen_count: int


class Listing(NamedTuple):
    """A page of a list route.

    :ivar total: the number of distinct values in the whole list (not just this page).
    :ivar entries: the page, ``seen_last`` descending, ties by value ascending.
    """

    total: int
    entries: list[Entry]


def is_number(text: str) -> bool:
    """Whether *text* is a number the API lists and looks up (:data:`NUMBER_RE`)."""
    return NUMBER_RE.fullmatch(text) is not None


def _page(limit: int | None, offset: int) -> tuple[int, int]:
    if limit is not None and limit < 0:
        raise ValueError(f"limit must not be negative, got {limit}")
    if offset < 0:
        raise ValueError(f"offset must not be negative, got {offset}")
    # SQLite: a negative LIMIT means no limit.
    return (-1 if limit is None else min(limit, MAX_ROWS)), min(offset, MAX_ROWS)


#: ``(summary table, its value column)`` of each list.
_SUMMARIES = {"ip": ("ip_summary", "source_ip"), "number": ("number_summary", "called_number")}
#: JSON keys of each list body (reference §5.6): ``(total, list, item)``.
LIST_KEYS = {
    "ip": ("ip_addresses_total", "ip_addresses", "ip_address"),
    "number": ("called_numbers_total", "called_numbers", "called_number"),
}


@contextlib.contextmanager
def _snapshot(cursor: Any) -> Iterator[None]:
    """Run the statements inside in one read transaction (one snapshot), unless the cursor's
    connection is already in a transaction (then they are anyway)."""
    explicit = not getattr(getattr(cursor, "connection", None), "in_transaction", True)
    if explicit:
        cursor.execute("BEGIN")
    try:
        yield
    finally:
        if explicit:
            cursor.execute("COMMIT")


def stored_text(value: Any) -> Any:
    """A value read from the database as text when it is a BLOB or undecodable text (only rows
    written by hand hold them in text columns): UTF-8 with undecodable bytes as ``\\xNN``, as the
    SIP fields are; anything else unchanged. Also the reader connection's ``text_factory``."""
    return value.decode("utf-8", "backslashreplace") if isinstance(value, bytes) else value


def _text(value: Any) -> str | None:
    """:func:`stored_text`, and a number stored by hand as its digits (``None`` stays ``None``)."""
    value = stored_text(value)
    return value if value is None or isinstance(value, str) else str(value)


def _listing(cursor: Any, what: str, limit: int | None, offset: int) -> Listing:
    sql_limit, sql_offset = _page(limit, offset)
    table, column = _SUMMARIES[what]
    with _snapshot(cursor):
        cursor.execute(f"SELECT count(*) FROM {table}")
        total = int(cursor.fetchone()[0])
        cursor.execute(
            f"SELECT {column}, seen_last, seen_count FROM {table}"
            f" ORDER BY seen_last DESC, {column} ASC LIMIT ? OFFSET ?",
            (sql_limit, sql_offset),
        )
        rows = cursor.fetchall()
    entries = [Entry(_text(value), _text(seen_last), int(count)) for value, seen_last, count in rows]
    return Listing(total, entries)


def list_ip_addresses(cursor: Any, limit: int | None = None, offset: int = 0) -> Listing:
    """Distinct ``source_ip`` values with their last timestamp and probe count (``/ip-addresses``).

    Rows without a ``source_ip`` are left out (the original did not count them either).

    :param cursor: a cursor on a schema-2 database.
    :param limit: the most entries to return; ``None`` for all (the original's behaviour).
    :param offset: entries to skip first.
    :raises ValueError: *limit* or *offset* is negative.
    """
    return _listing(cursor, "ip", limit, offset)


def list_called_numbers(cursor: Any, limit: int | None = None, offset: int = 0) -> Listing:
    """Distinct called numbers of the form :data:`NUMBER_RE` with their last timestamp and probe
    count (``/numbers``).

    :param cursor: a cursor on a schema-2 database.
    :param limit: the most entries to return; ``None`` for all.
    :param offset: entries to skip first.
    :raises ValueError: *limit* or *offset* is negative.
    """
    return _listing(cursor, "number", limit, offset)


def plain_sql(expression: str) -> str:
    """The SQL condition "*expression* is text that JSON writes as itself between quotes", as
    :func:`is_plain`: text, not a BLOB; ASCII (as many characters as bytes: SQLite's ``length`` of
    text stops at a NUL, a blob's does not), printable (``GLOB '*[^ -~]*'`` finds a control
    character or DEL), no ``"`` and no backslash. NULL for a NULL *expression*.

    Used where it runs once per value (the summaries' insert trigger, the schema migration), never
    per row of a list: ``GLOB`` is slow.
    """
    e = expression
    return (
        f"(typeof({e}) IN ('text', 'null') AND length({e}) = length(CAST({e} AS BLOB))"
        f" AND NOT {e} GLOB '*[^ -~]*'"
        f" AND instr({e}, '\"') = 0 AND instr({e}, '\\') = 0)"
    )


def is_plain(text: str) -> bool:
    """Whether JSON writes *text* as itself between quotes (``json.dumps`` escapes nothing):
    printable ASCII without ``"`` or backslash. Python's twin of :func:`plain_sql`."""
    return text.isascii() and text.isprintable() and '"' not in text and "\\" not in text


def _list_body_sql(what: str) -> str:
    table, column = _SUMMARIES[what]
    _, _, item_key = LIST_KEYS[what]
    # (a CASE costs SQLite less than coalesce(nullif(...)): a third of the formatting time)
    last = "CASE WHEN seen_last > '' THEN seen_last ELSE 'NOT_FOUND' END"
    item = (
        f"printf('    {{\n      \"{item_key}\": \"%s\",\n      \"seen_last\": \"%s\",\n"
        f"      \"seen_count\": \"%d\"\n    }}', {column}, {last}, seen_count)"
    )
    # group_concat takes the rows in the order the subquery gives them (SQLite before 3.44 has no
    # ORDER BY inside an aggregate; tests.test_api.ListBodyTests checks the bytes). As a blob, so
    # Python copies the bytes without decoding them.
    return (
        f"SELECT count(*), CAST(group_concat(item, ',' || char(10)) AS BLOB) FROM"
        f" (SELECT {item} AS item FROM {table} ORDER BY seen_last DESC, {column} ASC LIMIT ? OFFSET ?)"
    )


_LIST_BODY_SQL = {what: _list_body_sql(what) for what in _SUMMARIES}


def list_body(cursor: Any, what: str, limit: int | None = None, offset: int = 0) -> bytes | None:
    """The JSON body of ``/ip-addresses`` (*what* ``"ip"``) or ``/numbers`` (``"number"``),
    formatted by SQLite.

    The text is what ``json.dumps(..., indent=2)`` gives for the listing (reference §5.6:
    ``seen_count`` a string, a missing ``seen_last`` ``NOT_FOUND``). SQLite formats each entry
    (``printf``) and joins them (``group_concat``, :data:`_CHUNK_ROWS` entries at a time) while the
    calling thread has released the GIL; no Python object is made per entry. The total and the
    page are read in one transaction, so they agree. Values are written without
    escaping as long as ``summary_state.needs_escape`` is 0: whatever writes the summaries sets it
    once a value or timestamp that JSON must escape arrives (see ``schema/upgrade-to-v2.sql``);
        checking every row here instead would cost several times the formatting. At 100,000 numbers
    this is a 12 MB body made in about 100 ms on the benchmark machine.

    :param cursor: a cursor on a schema-2 database.
    :param what: ``"ip"`` or ``"number"``.
    :param limit: the most entries; ``None`` for all.
    :param offset: entries to skip first.
    :returns: the body, or ``None`` when some value may need JSON escaping (non-ASCII, control
        characters, quotes, backslashes): the caller encodes that page itself (:func:`_listing`).
    :raises ValueError: *limit* or *offset* is negative.
    """
    sql_limit, sql_offset = _page(limit, offset)
    total_key, list_key, _ = LIST_KEYS[what]
    table, _ = _SUMMARIES[what]
    with _snapshot(cursor):
        cursor.execute(f"SELECT (SELECT count(*) FROM {table}),"
                       " (SELECT needs_escape FROM summary_state WHERE id = 1)")
        total, needs_escape = cursor.fetchone()
        if needs_escape or needs_escape is None:
            return None
        # In chunks, so SQLite's buffer stays a few MB whatever the list's size.
        chunks = []
        remaining = sql_limit if sql_limit >= 0 else MAX_ROWS
        while remaining > 0:
            size = min(remaining, _CHUNK_ROWS)
            cursor.execute(_LIST_BODY_SQL[what], (size, sql_offset))
            count, chunk = cursor.fetchone()
            if count:
                chunks.append(chunk)
            if count < size:
                break
            remaining -= count
            sql_offset += count
    head = b'{\n  "%s": %d,\n  "%s": ' % (total_key.encode(), total, list_key.encode())
    if not chunks:
        return head + b"[]\n}"
    return b"".join((head, b"[\n", b",\n".join(chunks), b"\n  ]\n}"))


#: Entries :func:`list_body` formats in one statement (about 4 MB of JSON). Each statement
#: walks the index from the start again (``OFFSET``): smaller chunks cost more.
_CHUNK_ROWS = 32_768


def find_ip_address(cursor: Any, candidates: Iterable[str]) -> str | None:
    """The first of *candidates* seen as a ``source_ip``, or ``None`` (``/ip-addresses/{ip}``).

    Each candidate is an exact primary-key equality on ``ip_summary``.

    :param cursor: a cursor on a schema-2 database.
    :param candidates: spellings of one address, the preferred (canonical) one first.
    """
    for candidate in candidates:
        cursor.execute("SELECT source_ip FROM ip_summary WHERE source_ip = ?", (candidate,))
        row = cursor.fetchone()
        if row is not None:
            return str(row[0])
    return None


def find_called_number(cursor: Any, number: str) -> str | None:
    """*number* if it was seen as a ``called_number`` (exact primary-key match on
    ``number_summary``), else ``None`` (``/numbers/{number}``).

    :param cursor: a cursor on a schema-2 database.
    :param number: a number of the form :data:`NUMBER_RE`.
    :raises ValueError: *number* is not of that form, so ``/numbers`` would never list it.
    """
    if not is_number(number):
        raise ValueError(f"not a number: {number!r}")
    cursor.execute("SELECT called_number FROM number_summary WHERE called_number = ?", (number,))
    row = cursor.fetchone()
    return None if row is None else str(row[0])


__all__ = [
    "MAX_NUMBER_DIGITS",
    "MAX_ROWS",
    "NUMBER_FILTER_SQL",
    "NUMBER_RE",
    "Entry",
    "Listing",
    "LIST_KEYS",
    "find_called_number",
    "find_ip_address",
    "is_number",
    "list_body",
    "list_called_numbers",
    "list_ip_addresses",
    "number_filter_sql",
]
