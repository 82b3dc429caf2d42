"""The SQL behind the REST API (interface.md §5, reference §4.3 and §5).

Pure module (no Twisted import): every function takes a DB-API cursor of the standard :mod:`sqlite3`
module (or an ``adbapi`` transaction standing in for one), so it runs in the database thread through
``Database.run_query`` and in tests on a plain connection made by
:func:`sentrypeer.storage.queries.migrate`. The functions only read.

Differences from the original's queries (reference §4.3 items 3-6, bugs §14.12-13):

- ``/numbers`` lists every ``called_number`` of the form ``^\\+?[0-9]{1,32}$`` (:data:`NUMBER_RE`),
  leading zeros included (``0046…``), and nothing else (not ``+abc``, ``-5``, ``NOT_FOUND``); the
  filter is SQL (:data:`NUMBER_FILTER_SQL`), so the total and the page agree.
- Lists have a deterministic order (``seen_last`` descending, then the value ascending) and optional
  ``limit``/``offset``.
- The total and the page are read in one transaction (``run_query`` runs one), so they agree.
- IP look-ups take several candidate spellings of one address (the caller normalises, see
  ``sentrypeer.api.resources.ip_lookup_forms``); every look-up is an equality on an indexed column.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any, NamedTuple

#: The most digits a called number may have (interface.md §5).
MAX_NUMBER_DIGITS = 32

#: What the API calls a number (interface.md §5): an optional ``+`` and 1 to 32 ASCII digits. Use
#: with ``fullmatch`` (``$`` would also match before a final newline).
NUMBER_RE = re.compile(r"\+?[0-9]{1,%d}" % MAX_NUMBER_DIGITS)

#: The largest ``limit``/``offset`` handed to SQLite (it binds 64-bit signed integers); larger
#: requests are clamped to it, which changes nothing in practice.
MAX_ROWS = 2**62

#: SQL condition on ``called_number`` equivalent to :data:`NUMBER_RE`:
#:
#: - the range test keeps SQLite on ``called_number_index`` (``'+'`` sorts before the digits, and
#:   ``':'`` right after ``'9'``), skipping ``NOT_FOUND`` and other text without reading it;
#: - the two GLOBs: a digit or ``+digit`` first, then nothing but digits (``[0-9]`` is ASCII only);
#: - the length: at most 32 digits, plus one for a leading ``+``;
#: - ``length(text) = length(blob)``: all ASCII and no NUL (SQLite's ``length`` and ``GLOB`` stop at
#:   a NUL in text, so ``'123' || char(0) || 'x'`` would otherwise pass).
NUMBER_FILTER_SQL = (
    "(called_number >= '+' AND called_number < ':'"
    " AND (called_number GLOB '[0-9]*' OR called_number GLOB '+[0-9]*')"
    " AND NOT substr(called_number, 2) GLOB '*[^0-9]*'"
    " AND length(called_number) <= %d + (substr(called_number, 1, 1) = '+')"
    " AND length(called_number) = length(CAST(called_number AS BLOB)))"
) % MAX_NUMBER_DIGITS


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


def _listing(cursor: Any, column: str, where: str, limit: int | None, offset: int) -> Listing:
    sql_limit, sql_offset = _page(limit, offset)
    cursor.execute(f"SELECT count(DISTINCT {column}) FROM honey WHERE {where}")
    total = int(cursor.fetchone()[0])
    cursor.execute(
        f"SELECT {column}, coalesce(max(event_timestamp), max(created_at)) AS seen_last,"
        f" count(*) AS seen_total FROM honey WHERE {where} GROUP BY {column}"
        f" ORDER BY seen_last IS NULL, seen_last DESC, {column} ASC LIMIT ? OFFSET ?",
        (sql_limit, sql_offset),
    )
    entries = [Entry(str(value), seen_last, int(count)) for value, seen_last, count in cursor.fetchall()]
    return Listing(total, entries)


def list_ip_addresses(cursor: Any, limit: int | None = None, offset: int = 0) -> Listing:
    """Distinct ``source_ip`` values with their last timestamp and row count (``/ip-addresses``).

    Rows without a ``source_ip`` are left out (the original did not count them either).

    :param cursor: a cursor on a schema-1 database.
    :param limit: the most entries to return; ``None`` for all (the original's behaviour).
    :param offset: entries to skip first.
    :raises ValueError: *limit* or *offset* is negative.
    """
    return _listing(cursor, "source_ip", "source_ip IS NOT NULL", limit, offset)


def list_called_numbers(cursor: Any, limit: int | None = None, offset: int = 0) -> Listing:
    """Distinct called numbers of the form :data:`NUMBER_RE` with their last timestamp and row
    count (``/numbers``; :data:`NUMBER_FILTER_SQL` does the filtering).

    :param cursor: a cursor on a schema-1 database.
    :param limit: the most entries to return; ``None`` for all.
    :param offset: entries to skip first.
    :raises ValueError: *limit* or *offset* is negative.
    """
    return _listing(cursor, "called_number", NUMBER_FILTER_SQL, limit, offset)


def find_ip_address(cursor: Any, candidates: Iterable[str]) -> str | None:
    """The first of *candidates* stored as a ``source_ip``, or ``None`` (``/ip-addresses/{ip}``).

    Each candidate is an exact, indexed equality (``source_ip_index``).

    :param cursor: a cursor on a schema-1 database.
    :param candidates: spellings of one address, the preferred (canonical) one first.
    """
    for candidate in candidates:
        cursor.execute("SELECT source_ip FROM honey WHERE source_ip = ? LIMIT 1", (candidate,))
        row = cursor.fetchone()
        if row is not None:
            return str(row[0])
    return None


def find_called_number(cursor: Any, number: str) -> str | None:
    """*number* if some row has it as ``called_number`` (exact match, ``called_number_index``),
    else ``None`` (``/numbers/{number}``).

    :param cursor: a cursor on a schema-1 database.
    :param number: a number of the form :data:`NUMBER_RE`.
    :raises ValueError: *number* is not of that form, so ``/numbers`` would never list it.
    """
    if not is_number(number):
        raise ValueError(f"not a number: {number!r}")
    cursor.execute("SELECT called_number FROM honey WHERE called_number = ? LIMIT 1", (number,))
    row = cursor.fetchone()
    return None if row is None else str(row[0])


__all__ = [
    "MAX_NUMBER_DIGITS",
    "MAX_ROWS",
    "NUMBER_FILTER_SQL",
    "NUMBER_RE",
    "Entry",
    "Listing",
    "find_called_number",
    "find_ip_address",
    "is_number",
    "list_called_numbers",
    "list_ip_addresses",
]
