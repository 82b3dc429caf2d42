"""The SQL of SentryPeer's database: schema migrations and event queries.

Pure module (no Twisted import): every function takes a DB-API cursor or connection of the standard
:mod:`sqlite3` module, so it runs unchanged inside ``adbapi.ConnectionPool.runInteraction`` (whose
transaction object stands in for a cursor) and in tests on a plain connection.

Schema (``PRAGMA user_version``):

- **0**: a database made by the original SentryPeer (reference §4.1: table ``honey``, three
  non-unique indexes, ``user_version`` never set), or an empty file.
- **1**: ``schema/v1.sql``. The original's ``honey`` table with its column
  names, plus ``destination_ip``, ``source_port``, ``destination_port``, ``parse_status``,
  ``auth_username``, ``auth_realm`` and ``sip_message_bytes`` (interface.md §4); ``event_uuid_index``
  made UNIQUE; ``event_timestamp_index``; the side table ``honey_duplicate_uuid``; the one-row table
  ``sentrypeer_node`` holding this node's persistent id.
- **2** (:data:`SCHEMA_VERSION`): ``schema/upgrade-to-v2.sql`` adds the summary tables
  ``ip_summary`` and ``number_summary`` (per source address and per listed called number: count,
  shed count, last seen), kept up to date by triggers on every insert into and delete from
  ``honey``, and built from the existing rows by the upgrade; :func:`record_shed` counts the probes
  whose events were shed. The API's list routes read them instead of grouping ``honey``.

Upgrade of an original database (:func:`migrate`), in place and in one transaction:

1. missing columns are appended to ``honey`` (existing rows get NULL in them);
2. a ``source_ip`` written as ``a.b.c.d:port`` or ``[v6]:port`` (what the Rust build stored,
   reference §14.1) is split into ``source_ip`` and ``source_port`` (see :func:`split_address_port`;
   a bare IPv6 address is left alone);
3. rows whose ``event_uuid`` repeats that of an earlier row (the original's dedupe was
   check-then-insert, hence racy, §14.9) are moved, unchanged and with their ``honey_id``, to
   ``honey_duplicate_uuid``; the earliest row stays in ``honey``; then ``event_uuid_index`` is rebuilt
   as UNIQUE. ``honey`` plus ``honey_duplicate_uuid`` hold every row the file had;
4. nothing else changes: timestamps stay as the original wrote them (local time, 6 to 9 fraction
   digits, §3), NULL fields stay NULL.
"""

from __future__ import annotations

import functools
import importlib.resources
import ipaddress
import operator
import re
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from itertools import chain as _chain
from typing import Any

from sentrypeer.events import BadActorEvent, or_not_found
from sentrypeer.storage import SchemaVersionError
from sentrypeer.storage.api_queries import is_number, is_plain, number_filter_sql, plain_sql

#: The schema version this module creates and upgrades to (``PRAGMA user_version``).
SCHEMA_VERSION = 2

#: Rows per DELETE statement when pruning (:func:`prune_events_batch`).
PRUNE_BATCH_SIZE = 5000

#: Rows read per query while splitting ``ip:port`` during the upgrade (bounds memory).
_SPLIT_CHUNK = 10_000

#: ``honey`` columns written for an event, with the :class:`BadActorEvent` attribute each comes from.
#: Rows given to :func:`row_to_event` are in this column order (see :data:`SELECT_EVENT_SQL`).
_COLUMN_ATTRIBUTES = (
    ("event_timestamp", "event_timestamp"),
    ("event_uuid", "event_uuid"),
    ("collected_method", "collected_method"),
    ("source_ip", "source_ip"),
    ("called_number", "called_number"),
    ("transport_type", "transport_type"),
    ("method", "sip_method"),
    ("user_agent", "sip_user_agent"),
    ("sip_message", "sip_message"),
    ("created_by_node_id", "created_by_node_id"),
    ("destination_ip", "destination_ip"),
    ("source_port", "source_port"),
    ("destination_port", "destination_port"),
    ("parse_status", "parse_status"),
    ("auth_username", "auth_username"),
    ("auth_realm", "auth_realm"),
    ("sip_message_bytes", "sip_message_bytes"),
)
EVENT_COLUMNS = tuple(column for column, _ in _COLUMN_ATTRIBUTES)
_PORT_COLUMNS = frozenset({"source_port", "destination_port"})
_BLOB_COLUMNS = frozenset({"sip_message_bytes"})

#: ``SELECT`` of the :data:`EVENT_COLUMNS` of ``honey``; append a ``WHERE`` clause.
SELECT_EVENT_SQL = "SELECT " + ", ".join(EVENT_COLUMNS) + " FROM honey"

#: Parameters one statement may bind: SQLite's default limit is 32,766 since 3.32, 999 before.
MAX_PARAMETERS = 32_766 if sqlite3.sqlite_version_info >= (3, 32, 0) else 999


def _chunk_sizes(count: int, width: int) -> Iterator[int]:
    """Split *count* rows of *width* parameters into statements of a power-of-two number of rows
    (so a few statement texts serve every batch size), each within :data:`MAX_PARAMETERS`.

    Batches are written with a handful of multi-row statements, not one statement per row: the
    database thread gives up the GIL during each ``sqlite3_step`` and must then wait for the
    reactor thread, which receives packets meanwhile, to give it back (up to the interpreter's
    switch interval, 5 ms). Once per statement is affordable, once per row is not.
    """
    largest = 1 << ((MAX_PARAMETERS // width).bit_length() - 1)
    while count:
        size = min(largest, 1 << (count.bit_length() - 1))
        yield size
        count -= size


@functools.lru_cache(maxsize=64)
def _multi_row_sql(head: str, row: str, rows: int, tail: str = "") -> str:
    """``head VALUES row, row, ... tail`` with *rows* copies of *row*."""
    return f"{head} VALUES {', '.join([row] * rows)}{tail}"


def _execute_rows(cursor: Any, head: str, row: str, rows: Sequence[Sequence[Any]], tail: str = "") -> int:
    """Execute ``head VALUES (...), ... tail`` for *rows* in a few statements; the rows changed."""
    changed = 0
    start = 0
    width = row.count("?")
    for size in _chunk_sizes(len(rows), width):
        cursor.execute(_multi_row_sql(head, row, size, tail), list(_chain(*rows[start : start + size])))
        changed += cursor.rowcount
        start += size
    return changed


_INSERT_HEAD = "INSERT OR IGNORE INTO honey ({})".format(", ".join(EVENT_COLUMNS))
_INSERT_ROW = "({})".format(", ".join("?" * len(EVENT_COLUMNS)))

#: Every ``honey`` column of schema 1 after ``honey_id``, with the type the upgrade adds it with.
#: The order is v1.sql's. ``created_at`` gets no default when added: SQLite's ``ALTER TABLE`` refuses
#: non-constant defaults (only relevant to a file lacking a column the original always created).
_HONEY_COLUMN_TYPES = (
    ("event_timestamp", "TEXT"),
    ("event_uuid", "TEXT"),
    ("collected_method", "TEXT"),
    ("source_ip", "TEXT"),
    ("called_number", "TEXT"),
    ("transport_type", "TEXT"),
    ("method", "TEXT"),
    ("user_agent", "TEXT"),
    ("sip_message", "TEXT"),
    ("created_by_node_id", "TEXT"),
    ("created_at", "DATETIME"),
    ("destination_ip", "TEXT"),
    ("source_port", "INTEGER"),
    ("destination_port", "INTEGER"),
    ("parse_status", "TEXT"),
    ("auth_username", "TEXT"),
    ("auth_realm", "TEXT"),
    ("sip_message_bytes", "BLOB"),
)

_CUTOFF_RE = re.compile(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}(\.\d{1,9})?")


class InvalidEventError(ValueError):
    """An event cannot be stored as it is (a field of the wrong type or out of range).

    Raised by :func:`insert_events` before any SQL runs, so the transaction is untouched and the
    other events can be written without this one.

    :param index: the position of the offending event in the sequence given.
    :param reason: what is wrong, in words.
    """

    def __init__(self, index: int, reason: str) -> None:
        self.index = index
        self.reason = reason
        super().__init__(f"event #{index}: {reason}")


# ---------------------------------------------------------------------------------------------
# Schema and migrations


def user_version(conn: Any) -> int:
    """Return the database's ``PRAGMA user_version`` (0 for a new or original database).

    :param conn: a :class:`sqlite3.Connection` or cursor.
    :raises sqlite3.DatabaseError: when the file is not a database.
    """
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


def schema_statements(name: str) -> list[str]:
    """The SQL statements of the package schema file *name* (e.g. ``"v1.sql"``), in order.

    Statements are split where :func:`sqlite3.complete_statement` says one ends, at a line end; a
    file must not put two statements on one line. Comment-only text is dropped.

    :param name: a file name in ``sentrypeer/storage/schema``.
    """
    text = importlib.resources.files("sentrypeer.storage").joinpath("schema", name)
    return list(_split_statements(text.read_text(encoding="utf-8")))


def _split_statements(script: str) -> Iterator[str]:
    pending: list[str] = []
    for line in script.splitlines(keepends=True):
        pending.append(line)
        statement = "".join(pending)
        if sqlite3.complete_statement(statement):
            pending = []
            yield statement.strip()
    rest = [line for line in pending if line.strip() and not line.lstrip().startswith("--")]
    if rest:
        raise ValueError(f"schema file ends inside a statement: {rest[0].strip()!r}")


def _run_schema_file(conn: Any, name: str) -> None:
    for statement in schema_statements(name):
        statement = _COUNT_ROW_TOKEN.sub(lambda m: _count_row_sql(m.group(1)), statement)
        statement = _UNCOUNT_ROW_TOKEN.sub(lambda m: _uncount_row_sql(m.group(1)), statement)
        statement = _NUMBER_FILTER_TOKEN.sub(lambda m: number_filter_sql(m.group(1)), statement)
        conn.execute(_PLAIN_TOKEN.sub(lambda m: plain_sql(m.group(1)), statement))


#: ``NUMBER_FILTER[expr]`` in a schema file: :func:`~sentrypeer.storage.api_queries.number_filter_sql`.
_NUMBER_FILTER_TOKEN = re.compile(r"NUMBER_FILTER\[([A-Za-z_.]+)\]")
#: ``COUNT_ROW[r]`` and ``UNCOUNT_ROW[r]`` in a schema file: :func:`_count_row_sql`,
#: :func:`_uncount_row_sql`.
_COUNT_ROW_TOKEN = re.compile(r"\bCOUNT_ROW\[(NEW|OLD)\]")
_UNCOUNT_ROW_TOKEN = re.compile(r"\bUNCOUNT_ROW\[(NEW|OLD)\]")
#: ``PLAIN[expr]`` in a schema file: :func:`~sentrypeer.storage.api_queries.plain_sql`.
_PLAIN_TOKEN = re.compile(r"PLAIN\[([A-Za-z_.]+)\]")


def _table_exists(conn: Any, name: str) -> bool:
    row = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)).fetchone()
    return row is not None


def _database_file(conn: Any) -> str:
    for _seq, name, file in conn.execute("PRAGMA database_list"):
        if name == "main":
            return file or ":memory:"
    return "?"


def migrate(conn: sqlite3.Connection) -> tuple[int, int]:
    """Bring the database to :data:`SCHEMA_VERSION`, one transaction per version step.

    A new (empty) database gets ``schema/v1.sql``; an original SentryPeer database is upgraded in
    place as the module docstring describes. Each step takes the write lock (``BEGIN IMMEDIATE``),
    re-reads ``user_version`` under it (another process may have migrated meanwhile), runs, sets
    ``user_version`` and commits; on any error it rolls back and re-raises, leaving the file at the
    previous version. Running it on a current database changes nothing.

    :param conn: a :class:`sqlite3.Connection` not inside a transaction. Its ``isolation_level`` is
        restored on return.
    :returns: ``(version found, version now)``.
    :raises sentrypeer.storage.SchemaVersionError: the file's version is newer than
        :data:`SCHEMA_VERSION`; nothing was written.
    :raises sqlite3.Error: from SQLite (not a database, read-only, locked, ...).
    """
    found: int | None = None
    saved_isolation = conn.isolation_level
    conn.isolation_level = None  # explicit BEGIN/COMMIT, so DDL is inside the transaction too
    try:
        while True:
            conn.execute("BEGIN IMMEDIATE")
            try:
                version = user_version(conn)
                if found is None:
                    found = version
                if version > SCHEMA_VERSION:
                    raise SchemaVersionError(_database_file(conn), version, SCHEMA_VERSION)
                if version == SCHEMA_VERSION:
                    conn.execute("COMMIT")
                    return found, version
                _STEPS[version](conn)
                conn.execute(f"PRAGMA user_version = {version + 1:d}")
            except BaseException:
                if conn.in_transaction:  # some errors (disk full, ...) roll back by themselves
                    conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
    finally:
        conn.isolation_level = saved_isolation


def _step_from_0(conn: Any) -> None:
    """Version 0 to 1: a new database, or an original SentryPeer one (module docstring)."""
    if not _table_exists(conn, "honey"):
        _run_schema_file(conn, "v1.sql")
        return
    present = {row[1] for row in conn.execute("PRAGMA table_info(honey)")}
    for column, sql_type in _HONEY_COLUMN_TYPES:
        if column not in present:
            conn.execute(f"ALTER TABLE honey ADD COLUMN {column} {sql_type}")
    # The original's non-unique index, should the file lack it: it keeps the duplicate search of
    # upgrade-from-original.sql fast, and makes v1.sql skip its UNIQUE event_uuid_index, which that
    # file builds once the duplicates are out of the way.
    conn.execute("CREATE INDEX IF NOT EXISTS event_uuid_index ON honey (event_uuid)")
    _split_source_ports(conn)
    _run_schema_file(conn, "v1.sql")
    _run_schema_file(conn, "upgrade-from-original.sql")


def _step_from_1(conn: Any) -> None:
    """Version 1 to 2: the summary tables, filled from the rows already there, and their triggers."""
    _run_schema_file(conn, "upgrade-to-v2.sql")


#: ``version -> step`` bringing a database from that version to the next.
_STEPS: dict[int, Callable[[Any], None]] = {0: _step_from_0, 1: _step_from_1}


def split_address_port(value: str) -> tuple[str, int] | None:
    """Split the Rust-built original's ``a.b.c.d:port`` or ``[v6]:port`` into address and port.

    Anything else (a bare IPv4 or IPv6 address such as ``2001:db8::1``, a host name, a port that is
    not a decimal number from 0 to 65535) is not split.

    :param value: a ``source_ip``/``destination_ip`` string as stored or received.
    :returns: ``(address, port)`` with the brackets removed, or ``None`` to keep *value* as it is.
    """
    if value.startswith("["):
        address, bracket, port = value[1:].partition("]:")
        if not bracket:
            return None
        try:
            ipaddress.IPv6Address(address)
        except ValueError:
            return None
    else:
        address, colon, port = value.rpartition(":")
        if not colon:
            return None
        try:
            ipaddress.IPv4Address(address)
        except ValueError:
            return None
    if not (port.isascii() and port.isdigit() and len(port) <= 5) or int(port) > 65535:
        return None
    return address, int(port)


def _split_source_ports(conn: Any) -> None:
    """Upgrade step: split ``ip:port`` in ``honey.source_ip``, walking the table by ``honey_id``."""
    select = (
        "SELECT honey_id, source_ip FROM honey"
        " WHERE {} source_ip LIKE '%:%' AND source_port IS NULL ORDER BY honey_id LIMIT ?"
    )
    first, following = select.format(""), select.format("honey_id > ? AND")
    last_id: int | None = None
    while True:
        if last_id is None:
            rows = conn.execute(first, (_SPLIT_CHUNK,)).fetchall()
        else:
            rows = conn.execute(following, (last_id, _SPLIT_CHUNK)).fetchall()
        if not rows:
            return
        updates = []
        for honey_id, source_ip in rows:
            split = split_address_port(source_ip) if isinstance(source_ip, str) else None
            if split is not None:
                updates.append((split[0], split[1], honey_id))
        conn.executemany("UPDATE honey SET source_ip = ?, source_port = ? WHERE honey_id = ?", updates)
        last_id = rows[-1][0]


# ---------------------------------------------------------------------------------------------
# Node identity


def get_or_create_node_id(cursor: Any, candidate: str) -> str:
    """Return this node's persistent id, storing *candidate* when there is none yet.

    :param cursor: a cursor (or ``adbapi`` transaction) on a schema-1 database; the caller commits.
    :param candidate: a fresh UUID string, used only on the first call for this database.
    :returns: the stored node id (the first candidate ever given).
    :raises ValueError: *candidate* is empty.
    """
    if not candidate:
        raise ValueError("empty node id candidate")
    cursor.execute("INSERT OR IGNORE INTO sentrypeer_node (id, node_id) VALUES (1, ?)", (candidate,))
    cursor.execute("SELECT node_id FROM sentrypeer_node WHERE id = 1")
    return str(cursor.fetchone()[0])


# ---------------------------------------------------------------------------------------------
# Events


def _text(value: Any) -> str | None:
    if value.__class__ is str and value.isascii():  # the common case, first
        return value
    if value is None:
        return None
    if not isinstance(value, str):
        raise TypeError(f"expected str, got {type(value).__name__}")
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            # Lone surrogates (e.g. from a JSON "\ud800" received from a peer) cannot be stored
            # as TEXT; keep them readable as \udXXX rather than lose the event.
            value = value.encode("utf-8", "backslashreplace").decode("utf-8")
    return value


def _is_port(value: Any) -> bool:
    return value is None or (value.__class__ is int and 0 <= value <= 65535)


def _port(value: Any) -> int | None:
    if _is_port(value):
        return value
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected int port, got {type(value).__name__}")
    if not 0 <= value <= 65535:
        raise ValueError(f"port {value} out of range 0-65535")
    return value


def _blob(value: Any) -> bytes | None:
    if value is None or value.__class__ is bytes:
        return value
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise TypeError(f"expected bytes, got {type(value).__name__}")
    return bytes(value)


#: Per :data:`EVENT_COLUMNS` entry: the function checking and converting its value.
_CONVERTERS = tuple(
    _port if column in _PORT_COLUMNS else _blob if column in _BLOB_COLUMNS else _text
    for column in EVENT_COLUMNS
)
_event_values = operator.attrgetter(*(attribute for _, attribute in _COLUMN_ATTRIBUTES))
_text_values = operator.attrgetter(
    *(a for c, a in _COLUMN_ATTRIBUTES if c not in _PORT_COLUMNS and c not in _BLOB_COLUMNS)
)


def event_to_row(event: BadActorEvent) -> tuple[Any, ...]:
    """The :data:`EVENT_COLUMNS` values of *event*, checked for SQLite.

    Strings are stored as given (NUL characters included); lone surrogates, which SQLite cannot
    store as UTF-8, are written as ``\\udXXX``.

    :raises TypeError: a field has the wrong type.
    :raises ValueError: a port is outside 0-65535.
    """
    # Runs for every stored event in the database thread, holding the GIL the reactor needs:
    # check the usual case (ASCII strings, int ports, bytes) with a few C calls, and go field by
    # field only otherwise.
    values = _event_values(event)
    try:
        plain = "".join(_text_values(event)).isascii()
    except TypeError:  # a None or non-str text field
        plain = False
    raw = event.sip_message_bytes
    if (
        plain
        and _is_port(event.source_port)
        and _is_port(event.destination_port)
        and (raw is None or raw.__class__ is bytes)
    ):
        return values
    return tuple([convert(value) for convert, value in zip(_CONVERTERS, values, strict=True)])


def insert_events(cursor: Any, events: Sequence[BadActorEvent]) -> int:
    """Insert *events* into ``honey``, skipping any whose ``event_uuid`` is already stored, and
    count the new rows in the summary tables.

    ``sip_method`` goes to column ``method`` and ``sip_user_agent`` to ``user_agent`` (the
    original's names); ``created_at`` takes its default. Every event is checked before any SQL runs.
    Rows go in a few multi-row statements (:func:`_chunk_sizes`). The summaries' insert triggers
    are paused for the transaction (``summary_state.batching``, see ``schema/upgrade-to-v2.sql``)
    and the rows are added to ``ip_summary`` and ``number_summary`` once per distinct address and
    number instead.

    :param cursor: a cursor (or ``adbapi`` transaction) on a schema-2 database; the caller commits.
    :param events: the events, in order; duplicates among them are skipped too.
    :returns: the number of rows inserted.
    :raises InvalidEventError: an event cannot be stored; nothing was executed.
    """
    rows = []
    for index, event in enumerate(events):
        try:
            rows.append(event_to_row(event))
        except (TypeError, ValueError, AttributeError) as e:
            raise InvalidEventError(index, str(e)) from e
    if not rows:
        return 0
    cursor.execute("SELECT coalesce(max(honey_id), 0) FROM honey")
    last_id = cursor.fetchone()[0]
    cursor.execute("UPDATE summary_state SET batching = 1 WHERE id = 1")
    try:
        inserted = _execute_rows(cursor, _INSERT_HEAD, _INSERT_ROW, rows)
        if inserted:
            _flag_escapes(cursor, {row[3] for row in rows} | {row[0] for row in rows})
        if inserted == len(rows) and all(row[0] is not None for row in rows):
            addresses, numbers = _summarize(rows)
            _add_counts(cursor, addresses, numbers, shed=False)
        elif inserted:
            # Some rows were already stored (a peer's event seen before), or lack a timestamp:
            # count exactly the rows this transaction added, as the triggers would have.
            cursor.execute(_SUMMARIZE_SINCE.format(table="ip_summary", column="source_ip",
                                                   where="source_ip IS NOT NULL"), (last_id,))
            cursor.execute(_SUMMARIZE_SINCE.format(table="number_summary", column="called_number",
                                                   where=number_filter_sql("called_number")),
                           (last_id,))
    finally:
        cursor.execute("UPDATE summary_state SET batching = 0 WHERE id = 1")
    return int(inserted)


def _flag_escapes(cursor: Any, values: Iterable[str | None]) -> None:
    """Set ``summary_state.needs_escape`` when one of *values* (addresses, timestamps) is text JSON
    must escape (:func:`~sentrypeer.storage.api_queries.is_plain`); the insert trigger's check,
    for the rows summarised here. A called number the lists show is always plain."""
    if not all(value is None or is_plain(value) for value in values):
        cursor.execute("UPDATE summary_state SET needs_escape = 1 WHERE id = 1")


def _summarize(rows: Sequence[tuple[Any, ...]]) -> tuple[dict, dict]:
    """Per address and per listed number of *rows* (:data:`EVENT_COLUMNS` tuples, every
    ``event_timestamp`` set): ``value -> (rows, latest event_timestamp)``."""
    addresses: dict[str, list] = {}
    numbers: dict[str, list] = {}
    listed: dict[str, bool] = {}
    for row in rows:
        stamp, address, number = row[0], row[3], row[4]
        if address is not None:
            entry = addresses.get(address)
            if entry is None:
                addresses[address] = [1, stamp]
            else:
                entry[0] += 1
                if stamp > entry[1]:
                    entry[1] = stamp
        if number is not None:
            ok = listed.get(number)
            if ok is None:
                ok = listed[number] = is_number(number)
            if ok:
                entry = numbers.get(number)
                if entry is None:
                    numbers[number] = [1, stamp]
                else:
                    entry[0] += 1
                    if stamp > entry[1]:
                        entry[1] = stamp
    return addresses, numbers


def _add_counts(cursor: Any, addresses: Mapping[str, Sequence], numbers: Mapping[str, Sequence],
                shed: bool) -> None:
    """Add ``value -> (count, latest event_timestamp)`` to the summaries (as shed probes when
    *shed*: to ``shed_count`` too)."""
    for table, column, counts in (("ip_summary", "source_ip", addresses),
                                  ("number_summary", "called_number", numbers)):
        if counts:
            _execute_rows(
                cursor,
                f"INSERT INTO {table} ({column}, seen_count, shed_count, seen_last, timestamped)",
                "(?, ?, ?, ?, 1)",
                [(key, count, count if shed else 0, last) for key, (count, last) in counts.items()],
                _ADD_TAIL.format(column=column),
            )


#: Adds a count and a latest ``event_timestamp`` to a summary row (creating it). The timestamp
#: replaces a ``created_at`` one (``timestamped`` 0), as ``coalesce(max(event_timestamp), ...)``.
_ADD_TAIL = (
    " ON CONFLICT ({column}) DO UPDATE SET"
    " seen_count = seen_count + excluded.seen_count,"
    " shed_count = shed_count + excluded.shed_count,"
    " seen_last = CASE WHEN NOT timestamped OR seen_last IS NULL OR excluded.seen_last > seen_last"
    " THEN excluded.seen_last ELSE seen_last END,"
    " timestamped = 1"
)

#: ``ON CONFLICT`` clause adding an ``INSERT INTO <summary> (column, seen_count, seen_last,
#: timestamped)`` to the existing summary row: the counts add up; seen_last follows the API's rule
#: ``coalesce(max(event_timestamp), max(created_at))`` (a time from event_timestamp beats one from
#: created_at). Shared by :data:`_SUMMARIZE_SINCE` and the triggers (:func:`_count_row_sql`).
_MERGE_SUMMARY = (
    " ON CONFLICT ({column}) DO UPDATE SET seen_count = seen_count + excluded.seen_count,"
    " seen_last = CASE"
    " WHEN excluded.timestamped > timestamped THEN excluded.seen_last"
    " WHEN excluded.timestamped < timestamped THEN seen_last"
    " WHEN seen_last IS NULL OR excluded.seen_last > seen_last THEN excluded.seen_last"
    " ELSE seen_last END,"
    " timestamped = max(timestamped, excluded.timestamped)"
)

#: The insert triggers' work for every row after ``honey_id`` ``?``, grouped.
_SUMMARIZE_SINCE = (
    "INSERT INTO {table} ({column}, seen_count, seen_last, timestamped)"
    " SELECT {column}, count(*), coalesce(max(event_timestamp), max(created_at)),"
    " max(event_timestamp) IS NOT NULL FROM honey WHERE honey_id > ? AND {where} GROUP BY {column}"
    + _MERGE_SUMMARY
)

#: ``(table, column, "row r counts in it" SQL for r)`` of each summary.
_SUMMARY_ROWS: tuple[tuple[str, str, Callable[[str], str]], ...] = (
    ("ip_summary", "source_ip", lambda r: f"{r}.source_ip IS NOT NULL"),
    ("number_summary", "called_number", lambda r: number_filter_sql(f"{r}.called_number")),
)


def _count_row_sql(r: str) -> str:
    """``COUNT_ROW[r];`` of a schema file: the trigger statements (the file's ``;`` ends the last)
    counting row *r* (``NEW``) in both summaries, and setting ``needs_escape`` when its address or
    time is not plain (a listed number always is)."""
    statements = [
        f"INSERT INTO {table} ({column}, seen_count, seen_last, timestamped)"
        f" SELECT {r}.{column}, 1, coalesce({r}.event_timestamp, {r}.created_at),"
        f" {r}.event_timestamp IS NOT NULL WHERE {counts(r)}" + _MERGE_SUMMARY.format(column=column)
        for table, column, counts in _SUMMARY_ROWS
    ]
    statements.append(
        "UPDATE summary_state SET needs_escape = 1 WHERE id = 1 AND needs_escape = 0 AND ("
        + " OR ".join(f"NOT {plain_sql(f'{r}.{c}')}" for c in ("source_ip", "event_timestamp", "created_at"))
        + ")"
    )
    return ";\n".join(statements)


def _uncount_row_sql(r: str) -> str:
    """``UNCOUNT_ROW[r];`` of a schema file: the trigger statements taking row *r* (``OLD``) out of
    both summaries (see ``schema/upgrade-to-v2.sql``)."""
    statements = []
    for table, column, _ in _SUMMARY_ROWS:
        same = f"{column} = {r}.{column}"
        statements += [
            f"UPDATE {table} SET seen_count = seen_count - 1 WHERE {same}",
            f"DELETE FROM {table} WHERE {same} AND seen_count <= 0",
            f"UPDATE {table} SET (seen_last, timestamped) = ("
            f"SELECT coalesce(max(event_timestamp), max(created_at)), max(event_timestamp) IS NOT NULL"
            f" FROM honey WHERE {same}) WHERE {same} AND shed_count = 0"
            f" AND seen_last IS coalesce({r}.event_timestamp, {r}.created_at)",
        ]
    return ";\n".join(statements)


def record_shed(
    cursor: Any,
    addresses: Mapping[str, tuple[int, str]],
    numbers: Mapping[str, tuple[int, str]],
) -> None:
    """Count probes whose events were shed (not stored in ``honey``) in the summary tables.

    Each one adds to ``seen_count`` and ``shed_count`` of its address and number, and its time
    to ``seen_last`` (interface.md §5 ``seen_count``: every probe counts, stored or not).

    :param cursor: a cursor (or ``adbapi`` transaction) on a schema-2 database; the caller commits.
    :param addresses: ``source_ip -> (probes, latest event_timestamp)``.
    :param numbers: the same per called number; only numbers the API lists are kept
        (:func:`~sentrypeer.storage.api_queries.is_number`), others are ignored.
    """
    listed = {key: value for key, value in numbers.items() if is_number(key)}
    _flag_escapes(cursor, [*addresses, *(last for _, last in addresses.values()),
                           *(last for _, last in listed.values())])
    _add_counts(cursor, addresses, listed, shed=True)


def row_to_event(row: Sequence[Any] | Mapping[str, Any]) -> BadActorEvent:
    """Build a :class:`BadActorEvent` from a ``honey`` row.

    NULL (and empty) text columns, as in rows of the original or its 0-byte packets, become
    :data:`~sentrypeer.events.NOT_FOUND`; a NULL ``parse_status`` takes the event's default; NULL
    ports and ``sip_message_bytes`` stay ``None``.

    :param row: the :data:`EVENT_COLUMNS` values in that order (see :data:`SELECT_EVENT_SQL`), or a
        mapping from column name (e.g. :class:`sqlite3.Row`).
    """
    if isinstance(row, Mapping) or hasattr(row, "keys"):
        values = [row[column] for column in EVENT_COLUMNS]
    else:
        values = list(row)
    fields: dict[str, Any] = {}
    for (column, attribute), value in zip(_COLUMN_ATTRIBUTES, values, strict=True):
        if column in _PORT_COLUMNS:
            fields[attribute] = value
        elif column in _BLOB_COLUMNS:
            fields[attribute] = None if value is None else bytes(value)
        elif column == "parse_status":
            if value:
                fields[attribute] = value
        else:
            fields[attribute] = or_not_found(value)
    return BadActorEvent(**fields)


def fetch_event(cursor: Any, event_uuid: str) -> BadActorEvent | None:
    """Return the stored event with *event_uuid*, or ``None``."""
    cursor.execute(SELECT_EVENT_SQL + " WHERE event_uuid = ?", (event_uuid,))
    row = cursor.fetchone()
    return None if row is None else row_to_event(row)


def event_uuid_exists(cursor: Any, event_uuid: str) -> bool:
    """Whether an event with *event_uuid* is stored (exact string match, uses the unique index)."""
    cursor.execute("SELECT EXISTS (SELECT 1 FROM honey WHERE event_uuid = ?)", (event_uuid,))
    return bool(cursor.fetchone()[0])


def count_events(cursor: Any) -> int:
    """The number of rows in ``honey`` (duplicates moved aside by the upgrade not included)."""
    cursor.execute("SELECT count(*) FROM honey")
    return int(cursor.fetchone()[0])


def _prune_sql(table: str) -> str:
    # The rowid sub-select with LIMIT bounds each statement; both OR terms use
    # event_timestamp_index. Rows without event_timestamp (the original's 0-byte packets) go by
    # created_at, which SQLite wrote in UTC.
    return (
        f"DELETE FROM {table} WHERE honey_id IN (SELECT honey_id FROM {table}"
        " WHERE event_timestamp < ?1 OR (event_timestamp IS NULL AND created_at < ?1) LIMIT ?2)"
    )


_PRUNE_TABLES = ("honey", "honey_duplicate_uuid")
_PRUNE_SQL = {table: _prune_sql(table) for table in _PRUNE_TABLES}


def _check_cutoff(cutoff: str) -> None:
    # A malformed cutoff compares in surprising ways with timestamps ("9" > "2026-..."), and a
    # prune with it could delete everything: refuse it.
    if not isinstance(cutoff, str) or not _CUTOFF_RE.fullmatch(cutoff):
        raise ValueError(f"cutoff must be 'YYYY-MM-DD HH:MM:SS[.fraction]', got {cutoff!r}")


def prune_events_batch(cursor: Any, cutoff: str, limit: int = PRUNE_BATCH_SIZE) -> int:
    """Delete at most *limit* events older than *cutoff* (one bounded step of a prune).

    Deletes from ``honey`` first, then from ``honey_duplicate_uuid``. "Older" compares strings:
    ``event_timestamp < cutoff``, or ``created_at < cutoff`` for rows without a timestamp. Rows
    written by the original carry local-time timestamps (kept as they were), so for them the cutoff
    is off by the UTC offset of the machine that wrote them.

    :param cursor: a cursor (or ``adbapi`` transaction); the caller commits.
    :param cutoff: ``YYYY-MM-DD HH:MM:SS`` with an optional fraction, UTC
        (:func:`sentrypeer.events.format_timestamp`).
    :param limit: the most rows to delete, at least 1.
    :returns: the number of rows deleted; less than *limit* means nothing older is left.
    :raises ValueError: *cutoff* is not in that form, or *limit* is below 1.
    """
    _check_cutoff(cutoff)
    if limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    deleted = 0
    for table in _PRUNE_TABLES:
        if deleted >= limit:
            break
        cursor.execute(_PRUNE_SQL[table], (cutoff, limit - deleted))
        deleted += int(cursor.rowcount)
    return deleted


def prune_events_before(cursor: Any, cutoff: str, batch_size: int = PRUNE_BATCH_SIZE) -> int:
    """Delete every event older than *cutoff*, *batch_size* rows per statement.

    All statements run in the caller's transaction; to release the write lock between batches,
    call :func:`prune_events_batch` in separate transactions instead (as
    ``Database.prune_before`` does).

    :param cursor: a cursor (or ``adbapi`` transaction); the caller commits.
    :param cutoff: see :func:`prune_events_batch`.
    :param batch_size: rows per DELETE statement.
    :returns: the total number of rows deleted.
    :raises ValueError: see :func:`prune_events_batch`.
    """
    total = 0
    while True:
        deleted = prune_events_batch(cursor, cutoff, batch_size)
        total += deleted
        if deleted < batch_size:
            return total


__all__ = [
    "EVENT_COLUMNS",
    "MAX_PARAMETERS",
    "PRUNE_BATCH_SIZE",
    "SCHEMA_VERSION",
    "SELECT_EVENT_SQL",
    "InvalidEventError",
    "count_events",
    "event_to_row",
    "event_uuid_exists",
    "fetch_event",
    "get_or_create_node_id",
    "insert_events",
    "migrate",
    "prune_events_batch",
    "prune_events_before",
    "record_shed",
    "row_to_event",
    "schema_statements",
    "split_address_port",
    "user_version",
]
