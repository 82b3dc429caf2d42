"""Tests of the summary tables (schema 2) and load shedding: ``sentrypeer.storage`` (issue 7).

The summaries are the truth for ``seen_count`` and ``seen_last``: for every source address and
every listed called number, ``seen_count`` equals the rows of ``honey`` with that value plus the
probes whose events were shed, whoever inserted the rows (this program in batches, a peer's event
seen twice, an operator's ``sqlite3`` shell), after an upgrade from an older schema, and after
retention pruning. The shedding and memory tests drive the write queue with ``task.Clock``.
"""

from __future__ import annotations

import gc
import itertools
import json
import os
import sqlite3
import sys
import uuid
from collections import Counter
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from sentrypeer.events import BadActorEvent, format_timestamp
from sentrypeer.sip import controller as sip_controller
from sentrypeer.sip import message as sip_message
from sentrypeer.storage import api_queries, database, queries
from sentrypeer.storage.database import Shed, WriteQueue

NODE = "1f45cc1c-4fd4-11ec-89f0-d05099894ba6"
ADDRESSES = ("192.0.2.1", "192.0.2.2", "2001:db8::1", "198.51.100.7")
NUMBERS = ("100", "+4420", "0046812", "NOT_FOUND", "12a", "+", "1" * 33, "200")

PROPERTY = settings(deadline=None, max_examples=60, suppress_health_check=[HealthCheck.too_slow])

_uuids = itertools.count(1)


def event(address: str = "192.0.2.1", number: str = "100", second: int = 0, **fields: Any) -> BadActorEvent:
    """A collected event with a fresh event_uuid, at 2023-11-14 22:13:20 + *second* seconds."""
    values: dict[str, Any] = dict(
        event_timestamp=format_timestamp((1_700_000_000 + second) * 1_000_000_000),
        event_uuid=str(uuid.UUID(int=next(_uuids), version=4)),
        created_by_node_id=NODE,
        collected_method="passive",
        transport_type="UDP",
        source_ip=address,
        destination_ip="192.0.2.99",
        called_number=number,
        sip_method="OPTIONS",
        sip_user_agent="friendly-scanner",
        sip_message="OPTIONS sip:x SIP/2.0\r\n\r\n",
        source_port=5060,
        destination_port=5060,
    )
    values.update(fields)
    return BadActorEvent(**values)


def summary(conn: sqlite3.Connection, table: str) -> dict[str, tuple[int, int, str | None]]:
    column = "source_ip" if table == "ip_summary" else "called_number"
    rows = conn.execute(f"SELECT {column}, seen_count, shed_count, seen_last FROM {table}")
    return {value: (count, shed, last) for value, count, shed, last in rows}


def expected(conn: sqlite3.Connection, table: str, shed: dict[str, tuple[int, str]]):
    """What the summary must hold: honey grouped, plus the shed probes. ``seen_last`` is the
    latest event_timestamp of the rows and the shed probes, else (none has one) the latest
    created_at of the rows."""
    if table == "ip_summary":
        column, where = "source_ip", "source_ip IS NOT NULL"
    else:
        column, where = "called_number", api_queries.NUMBER_FILTER_SQL
    groups: dict[str, list] = {}
    for value, count, stamp, created in conn.execute(
        f"SELECT {column}, count(*), max(event_timestamp), max(created_at) FROM honey"
        f" WHERE {where} GROUP BY {column}"
    ):
        groups[value] = [count, 0, stamp, created]
    for value, (count, last) in shed.items():
        group = groups.setdefault(value, [0, 0, None, None])
        group[0] += count
        group[1] += count
        group[2] = last if group[2] is None else max(group[2], last)
    return {value: (count, shed_count, stamp if stamp is not None else created)
            for value, (count, shed_count, stamp, created) in groups.items()}


class Oracle:
    """The shed probes given to record_shed, per address and per listed number."""

    def __init__(self) -> None:
        self.addresses: dict[str, tuple[int, str]] = {}
        self.numbers: dict[str, tuple[int, str]] = {}

    def add(self, table: dict[str, tuple[int, str]], key: str, count: int, last: str) -> None:
        old = table.get(key)
        table[key] = (count, last) if old is None else (old[0] + count, max(old[1], last))

    def shed(self, conn: sqlite3.Connection, events: list[BadActorEvent]) -> None:
        addresses: dict[str, tuple[int, str]] = {}
        numbers: dict[str, tuple[int, str]] = {}
        for e in events:
            self.add(addresses, e.source_ip, 1, e.event_timestamp)
            self.add(numbers, e.called_number, 1, e.event_timestamp)
        with conn:
            queries.record_shed(conn.cursor(), addresses, numbers)
        for key, (count, last) in addresses.items():
            self.add(self.addresses, key, count, last)
        for key, (count, last) in numbers.items():
            if api_queries.is_number(key):
                self.add(self.numbers, key, count, last)


# One operation of the property test.
operations = st.one_of(
    st.tuples(st.just("batch"), st.lists(st.tuples(st.sampled_from(ADDRESSES),
                                                    st.sampled_from(NUMBERS),
                                                    st.integers(0, 50)), max_size=150)),
    st.tuples(st.just("peer-again"), st.integers(0, 20)),
    st.tuples(st.just("shell"), st.tuples(st.sampled_from(ADDRESSES + (None,)),
                                          st.sampled_from(NUMBERS + (None,)),
                                          st.one_of(st.none(), st.integers(0, 50)))),
    st.tuples(st.just("shed"), st.lists(st.tuples(st.sampled_from(ADDRESSES),
                                                   st.sampled_from(NUMBERS),
                                                   st.integers(0, 60)), min_size=1, max_size=20)),
)


class CountingCursor:
    """A cursor counting the statements run through it (each row of executemany is one)."""

    def __init__(self, cursor: sqlite3.Cursor) -> None:
        self.cursor = cursor
        self.statements = 0

    def execute(self, sql: str, parameters: Any = ()) -> sqlite3.Cursor:
        self.statements += 1
        return self.cursor.execute(sql, parameters)

    def executemany(self, sql: str, rows: Any) -> sqlite3.Cursor:
        rows = list(rows)
        self.statements += len(rows)
        return self.cursor.executemany(sql, rows)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.cursor, name)


class SummaryPropertyTests(SynchronousTestCase):
    """Summary counts = rows in honey + shed events, whatever happens."""

    def check(self, conn: sqlite3.Connection, oracle: Oracle) -> None:
        self.assertEqual(summary(conn, "ip_summary"), expected(conn, "ip_summary", oracle.addresses))
        self.assertEqual(summary(conn, "number_summary"),
                         expected(conn, "number_summary", oracle.numbers))

    def apply(self, conn: sqlite3.Connection, oracle: Oracle, stored: list[BadActorEvent],
              op: tuple) -> None:
        kind, arg = op
        if kind == "batch":
            events = [event(a, n, s) for a, n, s in arg]
            with conn:
                self.assertEqual(queries.insert_events(conn.cursor(), events), len(events))
            stored.extend(events)
        elif kind == "peer-again":
            # Events a peer sends again, mixed with new ones: the stored ones are not counted twice.
            again = stored[-arg:] if arg and stored else []
            new = [event("198.51.100.7", "+4420", 70)]
            with conn:
                inserted = queries.insert_events(conn.cursor(), again + new + again)
            self.assertEqual(inserted, 1)
            stored.extend(new)
        elif kind == "shell":
            address, number, second = arg
            stamp = None if second is None else format_timestamp((1_700_000_000 + second) * 10**9)
            with conn:
                conn.execute("INSERT INTO honey (source_ip, called_number, event_timestamp)"
                             " VALUES (?, ?, ?)", (address, number, stamp))
        else:
            oracle.shed(conn, [event(a, n, s) for a, n, s in arg])

    @PROPERTY
    @given(st.lists(operations, max_size=12))
    def test_counts_after_random_operations(self, ops):
        """After any mix of batched inserts, a peer's events received again, rows inserted by
        hand (with or without address, number or timestamp) and shed probes, each summary row
        has seen_count = its honey rows + its shed probes, shed_count = its shed probes and
        seen_last = the latest of coalesce(max(event_timestamp), max(created_at)) and the shed
        probes' times; no other row exists."""
        conn = sqlite3.connect(":memory:")
        self.addCleanup(conn.close)
        queries.migrate(conn)
        oracle = Oracle()
        stored: list[BadActorEvent] = []
        for op in ops:
            self.apply(conn, oracle, stored, op)
            self.check(conn, oracle)

    @PROPERTY
    @given(st.lists(st.tuples(st.sampled_from(ADDRESSES + (None,)), st.sampled_from(NUMBERS + (None,)),
                              st.one_of(st.none(), st.integers(0, 50))), max_size=60),
           st.lists(operations, max_size=6))
    def test_migration_builds_summaries(self, rows, ops):
        """A version-1 database holding rows (some without address, number or timestamp) is
        upgraded to version 2 with summaries equal to grouping honey; later operations keep
        them so."""
        conn = sqlite3.connect(":memory:")
        self.addCleanup(conn.close)
        for statement in queries.schema_statements("v1.sql"):
            conn.execute(statement)
        conn.execute("PRAGMA user_version = 1")
        for address, number, second in rows:
            stamp = None if second is None else format_timestamp((1_700_000_000 + second) * 10**9)
            conn.execute("INSERT INTO honey (source_ip, called_number, event_timestamp, event_uuid)"
                         " VALUES (?, ?, ?, ?)", (address, number, stamp, str(uuid.uuid4())))
        conn.commit()
        self.assertEqual(queries.migrate(conn), (1, queries.SCHEMA_VERSION))
        oracle = Oracle()
        self.check(conn, oracle)
        stored: list[BadActorEvent] = []
        for op in ops:
            self.apply(conn, oracle, stored, op)
        self.check(conn, oracle)

    @PROPERTY
    @given(st.lists(st.one_of(
        operations.filter(lambda op: op[0] != "shed"),
        st.tuples(st.just("update"), st.tuples(st.integers(0, 1000), st.sampled_from(ADDRESSES + (None,)),
                                               st.sampled_from(NUMBERS + (None,)),
                                               st.one_of(st.none(), st.integers(0, 50)))),
    ), max_size=12))
    def test_counts_after_updates(self, ops):
        """Rows changed by hand (UPDATE of address, number and time) move between summaries:
        after any mix with batches and hand inserts, the summaries equal grouping honey."""
        conn = sqlite3.connect(":memory:")
        self.addCleanup(conn.close)
        queries.migrate(conn)
        oracle = Oracle()
        stored: list[BadActorEvent] = []
        for op in ops:
            if op[0] == "update":
                pick, address, number, second = op[1]
                stamp = None if second is None else format_timestamp((1_700_000_000 + second) * 10**9)
                with conn:
                    conn.execute("UPDATE honey SET source_ip = ?, called_number = ?, event_timestamp = ?"
                                 " WHERE honey_id = (SELECT honey_id FROM honey ORDER BY honey_id"
                                 " LIMIT 1 OFFSET ? % max(1, (SELECT count(*) FROM honey)))",
                                 (address, number, stamp, pick))
            else:
                self.apply(conn, oracle, stored, op)
            self.check(conn, oracle)

    def test_prune_uncounts(self):
        """Retention pruning takes the deleted rows out of the summaries: a value left with no
        rows (and no shed probes) disappears, and seen_last falls back to the latest row left."""
        conn = sqlite3.connect(":memory:")
        self.addCleanup(conn.close)
        queries.migrate(conn)
        with conn:
            queries.insert_events(conn.cursor(), [
                event("192.0.2.1", "100", 0), event("192.0.2.1", "100", 10),
                event("192.0.2.2", "200", 1),
            ])
            conn.execute("DELETE FROM honey WHERE event_timestamp = ?",
                         (format_timestamp((1_700_000_000 + 10) * 10**9),))
        cutoff = format_timestamp((1_700_000_000 + 1) * 10**9)
        with conn:
            self.assertEqual(queries.prune_events_before(conn.cursor(), cutoff), 1)
        self.check(conn, Oracle())
        self.assertEqual(list(summary(conn, "ip_summary")), ["192.0.2.2"])

    def test_batching_flag_never_committed(self):
        """insert_events pauses the insert triggers only inside its own transaction: afterwards
        (and after a failed batch) summary_state.batching is 0, so rows inserted by anyone else
        are counted by the triggers."""
        conn = sqlite3.connect(":memory:")
        self.addCleanup(conn.close)
        queries.migrate(conn)
        with conn:
            queries.insert_events(conn.cursor(), [event()])
        self.assertEqual(conn.execute("SELECT batching FROM summary_state").fetchall(), [(0,)])

        def boom(*args: Any, **kwargs: Any) -> None:
            raise sqlite3.OperationalError("disk I/O error")

        self.patch(queries, "_add_counts", boom)  # the next batch fails half-way
        with self.assertRaises(sqlite3.OperationalError):
            with conn:
                queries.insert_events(conn.cursor(), [event()])
        self.assertEqual(conn.execute("SELECT batching FROM summary_state").fetchall(), [(0,)])
        conn.execute("INSERT INTO honey (source_ip) VALUES ('203.0.113.9')")
        self.assertEqual(summary(conn, "ip_summary")["203.0.113.9"][0], 1)

    def test_large_batch_in_few_statements(self):
        """A batch of 5,000 events is written with a handful of multi-row statements (not one
        per row), and every row is counted."""
        conn = sqlite3.connect(":memory:")
        self.addCleanup(conn.close)
        queries.migrate(conn)
        events = [event(f"10.0.{i % 200}.{i % 97}", str(1000 + i % 300), i % 40) for i in range(5000)]
        cursor = CountingCursor(conn.cursor())
        with conn:
            self.assertEqual(queries.insert_events(cursor, events), 5000)
        self.assertLessEqual(cursor.statements, 25)
        self.check(conn, Oracle())


class NeedsEscapeTests(SynchronousTestCase):
    """``summary_state.needs_escape`` (the list routes' licence to skip per-row JSON escaping) is
    set by every writer of the summaries once a value or timestamp JSON must escape arrives, and
    stays 0 while everything is plain."""

    HOSTILE = ('192.0.2.1"', "10.0.0.1\\", "é", "a\x00b", "a\x1fb", "a\x7fb")

    def flag(self, conn: sqlite3.Connection) -> int:
        return conn.execute("SELECT needs_escape FROM summary_state WHERE id = 1").fetchone()[0]

    def fresh(self) -> sqlite3.Connection:
        conn = sqlite3.connect(":memory:")
        self.addCleanup(conn.close)
        queries.migrate(conn)
        return conn

    def test_plain_stays_clear(self):
        """Batched inserts, shed counts and hand-inserted rows of ordinary addresses, numbers and
        timestamps leave the flag at 0."""
        conn = self.fresh()
        with conn:
            queries.insert_events(conn.cursor(), [event(a, n, i) for i, (a, n) in
                                                  enumerate(zip(ADDRESSES, NUMBERS, strict=False))])
            queries.record_shed(conn.cursor(), {"192.0.2.50": (2, format_timestamp(10**18))},
                                {"+4420": (2, format_timestamp(10**18))})
            conn.execute("INSERT INTO honey (source_ip, called_number) VALUES ('192.0.2.51', '1')")
        self.assertEqual(self.flag(conn), 0)

    def test_each_writer_sets_it(self):
        """A hostile address or timestamp sets the flag whether it arrives in a batch (address or
        event_timestamp), as a shed count (address or time), through the insert trigger (a
        row inserted by hand, or by the batch's fallback when a row is already stored), or is
        found by the migration of an older database."""
        cases = []
        for text in self.HOSTILE:
            cases += [
                ("batch address", lambda c, t=text: queries.insert_events(c, [event(t)])),
                ("batch timestamp", lambda c, t=text: queries.insert_events(c, [event(event_timestamp=t)])),
                ("shed address", lambda c, t=text: queries.record_shed(c, {t: (1, "2001")}, {})),
                ("shed time", lambda c, t=text: queries.record_shed(c, {}, {"100": (1, t)})),
                ("trigger", lambda c, t=text: c.execute("INSERT INTO honey (source_ip) VALUES (?)", (t,))),
            ]
        for name, write in cases:
            conn = self.fresh()
            with conn:
                write(conn.cursor())
            self.assertEqual(self.flag(conn), 1, name)
        for text in self.HOSTILE:
            conn = sqlite3.connect(":memory:")
            self.addCleanup(conn.close)
            for statement in queries.schema_statements("v1.sql"):
                conn.execute(statement)
            conn.execute("PRAGMA user_version = 1")
            conn.execute("INSERT INTO honey (source_ip, event_timestamp) VALUES ('192.0.2.1', ?)", (text,))
            conn.commit()
            queries.migrate(conn)
            self.assertEqual(self.flag(conn), 1, text)

    def test_blobs_and_invalid_utf8(self):
        """BLOB addresses or timestamps (hand-made rows) set the flag; the Python encoder then
        lists them decoded as UTF-8 with \\xNN for bad bytes, the total and page in one snapshot.
        The reader connection reads invalid UTF-8 text the same way instead of failing."""
        from sentrypeer.api import resources
        from sentrypeer.storage.database import _configure_reader

        for column, value in (("event_timestamp", b"2027-01\xff"), ("source_ip", b"10\xff"),
                              ("event_timestamp", b"2027-01-01")):
            conn = self.fresh()
            row = (value, "2027") if column == "source_ip" else ("10.9.9.9", value)
            with conn:
                conn.execute("INSERT INTO honey (source_ip, called_number, event_timestamp)"
                             " VALUES (?, '778', ?)", row)
            self.assertEqual(self.flag(conn), 1, (column, value))
            text = value.decode("utf-8", "backslashreplace")
            ips = json.loads(resources._ip_list_body(conn.cursor(), None, 0))["ip_addresses"]
            numbers = json.loads(resources._number_list_body(conn.cursor(), None, 0))["called_numbers"]
            if column == "source_ip":
                self.assertEqual([e["ip_address"] for e in ips], [text])
            else:
                self.assertEqual([e["seen_last"] for e in ips + numbers], [text, text])
        path = self.mktemp()
        conn = sqlite3.connect(path)
        self.addCleanup(conn.close)
        queries.migrate(conn)
        conn.execute("INSERT INTO honey (source_ip) VALUES (CAST(X'3130FF41' AS TEXT))")
        conn.commit()
        reader = sqlite3.connect(path)
        self.addCleanup(reader.close)
        _configure_reader(reader)
        listing = api_queries.list_ip_addresses(reader.cursor())
        self.assertEqual([e.value for e in listing.entries], ["10\\xffA"])

    def test_list_body_falls_back(self):
        """Once set, list_body declines (None) and the Python encoder escapes the value."""
        conn = self.fresh()
        with conn:
            queries.insert_events(conn.cursor(), [event("192.0.2.1"), event('x"y')])
        self.assertIsNone(api_queries.list_body(conn.cursor(), "ip"))
        self.assertIsNone(api_queries.list_body(conn.cursor(), "number"))


# ---------------------------------------------------------------------------------------------
# Shedding through the write queue


class GatedStore:
    """An IEventStore on an in-memory database whose writes complete when the test says."""

    def __init__(self) -> None:
        self.conn = sqlite3.connect(":memory:")
        queries.migrate(self.conn)
        self.pending: list[tuple[list[BadActorEvent], Shed | None, Deferred[int]]] = []

    def insert_events(self, events, shed=None) -> Deferred[int]:
        d: Deferred[int] = Deferred()
        self.pending.append((list(events), shed, d))
        return d

    def release(self) -> None:
        """Write everything asked so far (and what those writes schedule, when run_due runs)."""
        while self.pending:
            events, shed, d = self.pending.pop(0)
            with self.conn:
                inserted = queries.insert_events(self.conn.cursor(), events)
                if shed is not None:
                    queries.record_shed(self.conn.cursor(), shed.addresses, shed.numbers)
            d.callback(inserted)


def drain(clock: Clock, store: GatedStore, queue: WriteQueue) -> None:
    for _ in range(1000):
        clock.advance(1)
        store.release()
        if not queue.depth and not store.pending and not queue._shed_pending():
            return
    raise AssertionError("the queue does not drain")


class SheddingTests(SynchronousTestCase):
    """A full write queue sheds events but every probe is counted."""

    def test_counts_add_up(self):
        """With a queue of 10 events and writes held, 500 events from 7 addresses to 11
        numbers: accepted + dropped = 500; once written, honey holds the accepted ones, the
        summaries count all 500 per address and per number, shed_count = dropped."""
        clock = Clock()
        store = GatedStore()
        queue = WriteQueue(store, clock, max_events=10, batch_size=4)
        sent: list[BadActorEvent] = []
        accepted = 0
        for i in range(500):
            e = event(f"192.0.2.{i % 7}", str(300 + i % 11), i)
            sent.append(e)
            accepted += queue.put(e)
            if i % 100 == 99:
                clock.advance(0)  # a batch starts, and stays in flight
        self.assertEqual(accepted + queue.dropped, 500)
        self.assertGreater(queue.dropped, 400)
        drain(clock, store, queue)
        conn = store.conn
        self.assertEqual(queries.count_events(conn.cursor()), accepted)
        by_address = Counter(e.source_ip for e in sent)
        by_number = Counter(e.called_number for e in sent)
        ips = summary(conn, "ip_summary")
        numbers = summary(conn, "number_summary")
        self.assertEqual({k: v[0] for k, v in ips.items()}, dict(by_address))
        self.assertEqual({k: v[0] for k, v in numbers.items()}, dict(by_number))
        self.assertEqual(sum(v[1] for v in ips.values()), queue.dropped)
        self.assertEqual(sum(v[1] for v in numbers.values()), queue.dropped)
        self.assertEqual(max(v[2] for v in ips.values()), sent[-1].event_timestamp)
        self.assertEqual(queue.shed_overflow, 0)

    def test_shedding_log_lines_bounded(self):
        """Sustained overload for 60 s, the queue flipping between full and not full with every
        batch: one line when shedding starts, one per SHED_REPORT_INTERVAL while it goes on, one
        after a quiet interval; the counts in the lines add up to what was dropped."""
        from twisted.logger import globalLogPublisher

        lines: list[dict] = []

        def observe(e: dict) -> None:
            if e.get("log_namespace") == "sentrypeer.storage" and "shed" in e.get("log_format", ""):
                lines.append(e)

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        clock = Clock()
        store = GatedStore()
        queue = WriteQueue(store, clock, max_events=10, batch_size=10)
        for second in range(60):
            for _tick in range(10):
                for i in range(30):
                    queue.put(event(f"192.0.2.{i % 7}", "100", second))
                clock.advance(0.1)
                store.release()
        self.assertGreater(queue.dropped, 10_000)
        flips = len(lines)
        self.assertLessEqual(flips, 1 + 60 / database.SHED_REPORT_INTERVAL + 1)
        drain(clock, store, queue)
        clock.advance(database.SHED_REPORT_INTERVAL * 2)
        self.assertEqual(lines[-1].get("count"), None)  # the "no events shed" line
        self.assertEqual(1 + sum(e.get("count", 0) for e in lines), queue.dropped)

    def test_stop_reporting_logs_the_rest(self):
        """At shutdown the events shed since the last line are logged, and no report stays
        scheduled."""
        from twisted.logger import globalLogPublisher

        lines: list[dict] = []
        observer = lines.append
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        clock = Clock()
        queue = WriteQueue(GatedStore(), clock, max_events=1)
        for i in range(6):
            queue.put(event(second=i))
        queue.stop_reporting()
        self.assertEqual(queue.dropped, 5)
        self.assertEqual([e["count"] for e in lines if "before stopping" in e.get("log_format", "")], [4])
        self.assertEqual([c.func.__name__ for c in clock.getDelayedCalls()], ["_write_batch"])

    def test_flush_waits_for_shed_counts(self):
        """flush() fires only once the shed counts are in the summaries too."""
        clock = Clock()
        store = GatedStore()
        queue = WriteQueue(store, clock, max_events=1)
        queue.put(event())
        clock.advance(0)
        self.assertFalse(queue.put(event("192.0.2.8")))  # shed: the queue holds one event
        d = queue.flush()
        store.release()
        self.assertNoResult(d)  # the event is written, the shed count not yet
        clock.advance(0)
        store.release()
        self.successResultOf(d)
        self.assertEqual(summary(store.conn, "ip_summary")["192.0.2.8"][:2], (1, 1))

    def test_shed_table_bounded(self):
        """While the database is stuck, shed counts wait in tables of max_shed_keys distinct
        values; probes beyond are counted in shed_overflow (and in dropped), never lost silently."""
        clock = Clock()
        store = GatedStore()
        queue = WriteQueue(store, clock, max_events=1, max_shed_keys=50)
        queue.put(event())
        clock.advance(0)
        for i in range(200):
            queue.put(event(f"10.0.0.{i}", str(1000 + i)))
        self.assertEqual(queue.dropped, 200)
        self.assertEqual(len(queue._shed_addresses), 50)
        self.assertEqual(len(queue._shed_numbers), 50)
        self.assertEqual(queue.shed_overflow, 150)
        drain(clock, store, queue)
        ips = summary(store.conn, "ip_summary")
        self.assertEqual(sum(v[1] for v in ips.values()), 50)


# ---------------------------------------------------------------------------------------------
# Memory


class _Probe:
    """Just what WriteQueue.put reads of an event (cheap to make a million of)."""

    __slots__ = ("event_timestamp", "source_ip", "called_number")

    def __init__(self, i: int) -> None:
        self.event_timestamp = "2024-01-01 00:00:00.000000000"
        self.source_ip = "10.%d.%d.%d" % (i >> 16 & 255, i >> 8 & 255, i & 255)
        self.called_number = str(10_000_000 + i)

    def size_hint(self) -> int:
        return 300


def resident_growth(run, n: int) -> tuple[int, int]:
    """Resident memory (bytes) after the first tenth of *n* iterations of ``run(i)``, and at the
    end (a table growing with the values would take tens of megabytes more)."""

    def resident() -> int:
        gc.collect()
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    middle = 0
    for i in range(n):
        run(i)
        if i == n // 10:
            middle = resident()
    return middle, resident()


class MemoryTests(SynchronousTestCase):
    """Memory stays flat with a million distinct source addresses and numbers: every per-value
    table on the receive path is bounded."""

    N = 1_000_000

    def setUp(self) -> None:
        if not sys.platform.startswith("linux"):
            raise SkipTest("resident memory is read from /proc")

    def assertFlat(self, middle: int, end: int) -> None:
        self.assertLess(end - middle, 16 * 1024 * 1024, (middle, end))

    def test_shed_tables(self):
        """A million shed probes from distinct addresses to distinct numbers, the database
        stuck: the shed tables stop at max_shed_keys and memory stops growing."""
        clock = Clock()
        store = GatedStore()
        queue = WriteQueue(store, clock, max_events=1, max_shed_keys=10_000)
        queue.put(event())
        clock.advance(0)
        middle, end = resident_growth(lambda i: queue.put(_Probe(i)), self.N)
        self.assertEqual(queue.dropped, self.N)
        self.assertEqual(len(queue._shed_addresses), 10_000)
        self.assertFlat(middle, end)

    def test_address_and_name_caches(self):
        """normalise_address (a million distinct addresses) and the header-name cache (a million
        distinct names) keep at most their bound."""
        normalise = sip_controller.normalise_address
        middle, end = resident_growth(lambda i: normalise("10.%d.%d.%d" % (i >> 16 & 255, i >> 8 & 255,
                                                                          i & 255)), self.N)
        self.assertLessEqual(normalise.cache_info().currsize, normalise.cache_info().maxsize)
        self.assertFlat(middle, end)
        middle, end = resident_growth(lambda i: sip_message._header_name(b"X-H%d" % i), self.N)
        self.assertLessEqual(len(sip_message._NAME_CACHE), sip_message._NAME_CACHE_MAX)
        self.assertFlat(middle, end)

    def test_transaction_table(self):
        """A million distinct transactions (distinct sources) within the 32 s window: the
        retransmission table keeps max_transactions, and memory stops growing there."""
        clock = Clock()
        controller = sip_controller.SIPController(
            node_id=NODE, sink=lambda e: True, clock=clock, max_transactions=50_000
        )
        middle, end = resident_growth(lambda i: controller._seen(hash(("UDP", i))), self.N)
        self.assertLessEqual(len(controller._transactions), 50_000)
        self.assertGreaterEqual(len(controller._transactions), 50_000 * 7 // 8)
        self.assertFlat(middle, end)

