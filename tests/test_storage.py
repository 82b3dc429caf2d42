"""Tests for :mod:`sentrypeer.storage` (schema, migrations, queries, write queue, service)."""

from __future__ import annotations

import hashlib
import math
import os
import sqlite3
import uuid
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import reactor as global_reactor
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from sentrypeer.events import NOT_FOUND, PARSE_OK, BadActorEvent, format_timestamp
from sentrypeer.storage import SchemaVersionError, StorageError, queries
from sentrypeer.storage.database import (
    SHED_REPORT_INTERVAL,
    Database,
    DatabaseService,
    IEventStore,
    WriteQueue,
    prepare_database,
    retention_cutoff,
)

NODE = "0b6c5b0e-3c8a-4a57-9d0e-2f1e3a9b7c11"

#: The original SentryPeer's DDL (reference §4.1), as it ran it before every insert.
ORIGINAL_DDL = (
    "CREATE TABLE IF NOT EXISTS honey (honey_id INTEGER PRIMARY KEY, event_timestamp TEXT,"
    " event_uuid TEXT, collected_method TEXT, source_ip TEXT, called_number TEXT,"
    " transport_type TEXT, method TEXT, user_agent TEXT, sip_message TEXT,"
    " created_by_node_id TEXT,"
    " created_at DATETIME DEFAULT (strftime('%Y-%m-%d %H:%M:%f','now')))",
    "CREATE INDEX IF NOT EXISTS source_ip_index ON honey (source_ip)",
    "CREATE INDEX IF NOT EXISTS called_number_index ON honey (called_number)",
    "CREATE INDEX IF NOT EXISTS event_uuid_index ON honey (event_uuid)",
)
#: The original's insert: 10 parameters, created_at defaulted (reference §4.3).
ORIGINAL_INSERT = (
    "INSERT INTO honey (event_timestamp, event_uuid, collected_method, source_ip, called_number,"
    " transport_type, method, user_agent, sip_message, created_by_node_id)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
ORIGINAL_COLUMNS = (
    "event_timestamp",
    "event_uuid",
    "collected_method",
    "source_ip",
    "called_number",
    "transport_type",
    "method",
    "user_agent",
    "sip_message",
    "created_by_node_id",
)

UUID_A = "6f1c3e52-8f0e-4c5e-9a43-0c2b4bba1d01"
UUID_B = "9d2f0a1b-5c7e-4f3a-8b6d-1e2f3a4b5c02"
UUID_C = "1a2b3c4d-5e6f-4a7b-8c9d-0e1f2a3b4c03"

#: Rows as the original wrote them: (event_timestamp, event_uuid, collected_method, source_ip,
#: called_number, transport_type, method, user_agent, sip_message, created_by_node_id).
# fmt: off
ORIGINAL_ROWS: list[tuple[Any, ...]] = [
    # 1: Rust build, IPv4 ip:port, 6-digit fraction (42 ns printed as .000042)
    ("2023-03-01 10:00:00.000042", UUID_A, "passive", "203.0.113.7:5071", "100", "UDP",
     "OPTIONS", "friendly-scanner", "OPTIONS sip:100@x SIP/2.0", NODE),
    # 2: Rust build, [v6]:port
    ("2023-03-01 10:00:01.349557105", UUID_B, "passive", "[2001:db8::1]:5060", "+4412", "TCP",
     "INVITE", "sipvicious", "INVITE sip:+4412@x SIP/2.0", NODE),
    # 3: C build, bare IPv6: must not be split
    ("2023-03-01 10:00:02.5000000", UUID_C, "responsive", "2001:db8::1", "NOT_FOUND", "UDP",
     "REGISTER", "NOT_FOUND", "REGISTER sip:x SIP/2.0", NODE),
    # 4: NULL fields, like the original's own tests and its 0-byte packets
    (None, None, None, "198.51.100.2", None, "UDP", "OPTIONS", None, None, None),
    # 5: a second NULL-uuid row: NULLs are never duplicates
    (None, None, None, "198.51.100.3:5060", None, "TCP", None, None, None, None),
    # 6, 7: duplicates of row 1 (racy dedupe), 8: duplicate of row 2
    ("2023-03-01 10:00:03.100000", UUID_A, "passive", "203.0.113.7:5071", "100", "UDP",
     "OPTIONS", "friendly-scanner", "dup 1", "peer-node"),
    ("2023-03-01 10:00:04.200000", UUID_A, "passive", "203.0.113.8", "100", "UDP",
     "OPTIONS", "friendly-scanner", "dup 2", "peer-node"),
    ("2023-03-01 10:00:05.300000", UUID_B, "passive", "[2001:db8::2]:5061", "+4412", "TLS",
     "INVITE", "sipvicious", "dup 3", "peer-node"),
    # 9: a plain bare IPv4, a host:port that is not an address, an out-of-range port
    ("2023-03-01 10:00:06.123456", "2b3c4d5e-6f7a-4b8c-9d0e-1f2a3b4c5d04", "passive",
     "192.0.2.44", "200", "UDP", "OPTIONS", "ua", "m", NODE),
    ("2023-03-01 10:00:07.123456", "3c4d5e6f-7a8b-4c9d-8e0f-2a3b4c5d6e05", "passive",
     "example.net:5060", "200", "UDP", "OPTIONS", "ua", "m", NODE),
    ("2023-03-01 10:00:08.123456", "4d5e6f7a-8b9c-4d0e-9f1a-3b4c5d6e7f06", "passive",
     "192.0.2.45:70000", "200", "UDP", "OPTIONS", "ua", "m", NODE),
]
# fmt: on


def make_original_db(path: str, rows: list[tuple[Any, ...]] = ORIGINAL_ROWS) -> None:
    """Write a database exactly as the original SentryPeer would have (user_version 0)."""
    conn = sqlite3.connect(path)
    try:
        conn.execute("PRAGMA user_version")  # read and ignored, as the original did
        for statement in ORIGINAL_DDL:
            conn.execute(statement)
        conn.executemany(ORIGINAL_INSERT, rows)
        conn.commit()
    finally:
        conn.close()


def make_event(n: int = 0, **fields: Any) -> BadActorEvent:
    """A complete event; *n* makes its uuid and timestamp distinct."""
    values: dict[str, Any] = dict(
        event_timestamp=format_timestamp(1_700_000_000_000_000_000 + n * 1000),
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
        sip_message_bytes=b"OPTIONS sip:100@192.0.2.1 SIP/2.0\r\n\r\n",
    )
    values.update(fields)
    return BadActorEvent(**values)


def fresh_connection() -> sqlite3.Connection:
    """An in-memory database at the current schema."""
    conn = sqlite3.connect(":memory:")
    queries.migrate(conn)
    return conn


def table_layout(conn: sqlite3.Connection) -> dict[str, Any]:
    """Tables with their columns, and indexes with their columns and uniqueness."""
    layout: dict[str, Any] = {}
    for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'"):
        columns = [row[1:] for row in conn.execute(f"PRAGMA table_info({name})")]
        indexes = {}
        for row in conn.execute(f"PRAGMA index_list({name})"):
            index_columns = [r[2] for r in conn.execute(f"PRAGMA index_info({row[1]})")]
            indexes[row[1]] = (bool(row[2]), index_columns)
        layout[name] = (columns, indexes)
    return layout


def file_digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


# ---------------------------------------------------------------------------------------------


class SplitAddressPortTests(SynchronousTestCase):
    """:func:`queries.split_address_port`."""

    def test_ipv4_with_port(self) -> None:
        """``a.b.c.d:port`` splits into the address and an integer port."""
        self.assertEqual(queries.split_address_port("203.0.113.7:5071"), ("203.0.113.7", 5071))

    def test_bracketed_ipv6_with_port(self) -> None:
        """``[v6]:port`` splits into the bare IPv6 address and the port."""
        self.assertEqual(queries.split_address_port("[2001:db8::1]:5060"), ("2001:db8::1", 5060))

    def test_not_split(self) -> None:
        """Bare addresses, host names, bad ports and half-bracketed forms are left alone."""
        for value in (
            "2001:db8::1",
            "::1",
            "2001:db8::1:5060",
            "203.0.113.7",
            "example.net:5060",
            "203.0.113.7:",
            "203.0.113.7:70000",
            "203.0.113.7:-1",
            "203.0.113.7:５０６０",
            "[2001:db8::1]",
            "[2001:db8::1]5060",
            "[not-v6]:5060",
            "",
            "NOT_FOUND",
        ):
            self.assertIsNone(queries.split_address_port(value), value)

    @given(st.ip_addresses(v=4), st.integers(0, 65535))
    def test_ipv4_round_trip(self, address: Any, port: int) -> None:
        """Any IPv4 address and port written ``a:p`` splits back to the same pair."""
        self.assertEqual(queries.split_address_port(f"{address}:{port}"), (str(address), port))

    @given(st.ip_addresses(v=6), st.integers(0, 65535))
    def test_ipv6_round_trip(self, address: Any, port: int) -> None:
        """``[v6]:p`` splits back to the pair; the bare IPv6 address is never split."""
        self.assertEqual(queries.split_address_port(f"[{address}]:{port}"), (str(address), port))
        self.assertIsNone(queries.split_address_port(str(address)))


class MigrationTests(SynchronousTestCase):
    """:func:`queries.migrate` and :func:`prepare_database` on new and original databases."""

    def upgraded(self) -> sqlite3.Connection:
        path = self.mktemp()
        make_original_db(path)
        conn = sqlite3.connect(path)
        self.addCleanup(conn.close)
        self.assertEqual(queries.migrate(conn), (0, queries.SCHEMA_VERSION))
        return conn

    def test_new_database(self) -> None:
        """An empty file gets the current schema and user_version; a second run changes nothing."""
        conn = sqlite3.connect(self.mktemp())
        self.addCleanup(conn.close)
        self.assertEqual(queries.migrate(conn), (0, 2))
        self.assertEqual(queries.user_version(conn), 2)
        tables = set(table_layout(conn))
        self.assertEqual(
            tables,
            {"honey", "honey_duplicate_uuid", "sentrypeer_node", "ip_summary", "number_summary",
             "summary_state"},
        )
        self.assertEqual(queries.migrate(conn), (2, 2))

    def test_fresh_schema(self) -> None:
        """honey has the original's columns, types and order, then ours; the indexes are named."""
        columns, indexes = table_layout(fresh_connection())["honey"]
        self.assertEqual(
            [(c[0], c[1]) for c in columns],
            [
                ("honey_id", "INTEGER"),
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
            ],
        )
        self.assertEqual(
            indexes,
            {
                "source_ip_index": (False, ["source_ip"]),
                "called_number_index": (False, ["called_number"]),
                "event_uuid_index": (True, ["event_uuid"]),
                "event_timestamp_index": (False, ["event_timestamp"]),
            },
        )

    def test_upgrade_matches_fresh_schema(self) -> None:
        """An upgraded original database has the same tables, columns and indexes as a new one."""
        self.assertEqual(table_layout(self.upgraded()), table_layout(fresh_connection()))

    def test_upgrade_keeps_every_row(self) -> None:
        """Every original row is in honey or honey_duplicate_uuid afterwards, under its honey_id."""
        conn = self.upgraded()
        kept = {r[0] for r in conn.execute("SELECT honey_id FROM honey")}
        moved = {r[0] for r in conn.execute("SELECT honey_id FROM honey_duplicate_uuid")}
        self.assertEqual(kept & moved, set())
        self.assertEqual(kept | moved, set(range(1, len(ORIGINAL_ROWS) + 1)))

    def test_upgrade_moves_later_duplicates(self) -> None:
        """For a repeated event_uuid the first row stays in honey; later ones move aside intact."""
        conn = self.upgraded()
        self.assertEqual(
            conn.execute("SELECT honey_id FROM honey WHERE event_uuid = ?", (UUID_A,)).fetchall(),
            [(1,)],
        )
        moved = conn.execute(
            "SELECT honey_id, event_uuid, sip_message, created_by_node_id, source_ip, source_port"
            " FROM honey_duplicate_uuid ORDER BY honey_id"
        ).fetchall()
        self.assertEqual(
            moved,
            [
                (6, UUID_A, "dup 1", "peer-node", "203.0.113.7", 5071),
                (7, UUID_A, "dup 2", "peer-node", "203.0.113.8", None),
                (8, UUID_B, "dup 3", "peer-node", "2001:db8::2", 5061),
            ],
        )
        with self.assertRaises(sqlite3.IntegrityError):
            conn.execute(ORIGINAL_INSERT, ORIGINAL_ROWS[0])

    def test_upgrade_values(self) -> None:
        """ip:port is split, everything else (timestamps, NULLs, bare IPv6) is kept as it was."""
        conn = self.upgraded()
        rows = {
            r[0]: r[1:]
            for r in conn.execute(
                "SELECT honey_id, " + ", ".join(ORIGINAL_COLUMNS) + ", source_port,"
                " destination_ip, destination_port, parse_status, sip_message_bytes FROM honey"
            )
        }
        expected_split = {
            1: ("203.0.113.7", 5071),
            2: ("2001:db8::1", 5060),
            3: ("2001:db8::1", None),
            4: ("198.51.100.2", None),
            5: ("198.51.100.3", 5060),
            9: ("192.0.2.44", None),
            10: ("example.net:5060", None),
            11: ("192.0.2.45:70000", None),
        }
        self.assertEqual(set(rows), set(expected_split))
        for honey_id, (source_ip, source_port) in expected_split.items():
            original = list(ORIGINAL_ROWS[honey_id - 1])
            original[3] = source_ip
            self.assertEqual(
                rows[honey_id],
                (*original, source_port, None, None, None, None),
                f"row {honey_id}",
            )
        self.assertEqual(rows[1][0], "2023-03-01 10:00:00.000042")

    def test_upgrade_keeps_created_at(self) -> None:
        """created_at values written by the original are unchanged, and new rows get a default."""
        path = self.mktemp()
        make_original_db(path)
        before = sqlite3.connect(path)
        created = before.execute("SELECT honey_id, created_at FROM honey").fetchall()
        before.close()
        conn = sqlite3.connect(path)
        self.addCleanup(conn.close)
        queries.migrate(conn)
        after = conn.execute(
            "SELECT honey_id, created_at FROM honey UNION ALL"
            " SELECT honey_id, created_at FROM honey_duplicate_uuid ORDER BY honey_id"
        ).fetchall()
        self.assertEqual(after, sorted(created))
        queries.insert_events(conn.cursor(), [make_event(99)])
        (value,) = conn.execute(
            "SELECT created_at FROM honey WHERE event_uuid = ?", (make_event(99).event_uuid,)
        ).fetchone()
        self.assertRegex(value, r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}$")

    def test_upgraded_rows_read_back(self) -> None:
        """row_to_event reads an original NULL-field row with NOT_FOUND strings and no ports."""
        conn = self.upgraded()
        row = conn.execute(queries.SELECT_EVENT_SQL + " WHERE honey_id = 4").fetchone()
        event = queries.row_to_event(row)
        self.assertEqual(event.source_ip, "198.51.100.2")
        self.assertEqual(event.event_uuid, NOT_FOUND)
        self.assertEqual(event.event_timestamp, NOT_FOUND)
        self.assertEqual(event.destination_ip, NOT_FOUND)
        self.assertIsNone(event.source_port)
        self.assertIsNone(event.sip_message_bytes)
        self.assertEqual(event.parse_status, PARSE_OK)

    def test_upgrade_is_one_transaction(self) -> None:
        """A failure part-way through the upgrade leaves the file exactly at version 0."""
        path = self.mktemp()
        make_original_db(path)
        digest = file_digest(path)

        def boom(conn: Any) -> None:
            raise RuntimeError("simulated failure")

        self.patch(queries, "_split_source_ports", boom)
        conn = sqlite3.connect(path)
        with self.assertRaises(RuntimeError):
            queries.migrate(conn)
        self.assertFalse(conn.in_transaction)
        self.assertEqual(queries.user_version(conn), 0)
        self.assertEqual(len(conn.execute("PRAGMA table_info(honey)").fetchall()), 12)
        conn.close()
        self.assertEqual(file_digest(path), digest)

    def test_upgrade_twice(self) -> None:
        """Opening an upgraded database again is harmless: same version, same rows."""
        path = self.mktemp()
        make_original_db(path)
        first = prepare_database(path)
        conn = sqlite3.connect(path)
        rows = conn.execute("SELECT * FROM honey ORDER BY honey_id").fetchall()
        conn.close()
        self.assertEqual(prepare_database(path), first)
        conn = sqlite3.connect(path)
        self.addCleanup(conn.close)
        self.assertEqual(queries.migrate(conn), (2, 2))
        self.assertEqual(conn.execute("SELECT * FROM honey ORDER BY honey_id").fetchall(), rows)

    def test_original_without_event_uuid_index(self) -> None:
        """An original file lacking the event_uuid index still upgrades, duplicates moved aside."""
        path = self.mktemp()
        make_original_db(path)
        conn = sqlite3.connect(path)
        self.addCleanup(conn.close)
        conn.execute("DROP INDEX event_uuid_index")
        conn.commit()
        queries.migrate(conn)
        self.assertEqual(queries.count_events(conn.cursor()), 8)
        self.assertEqual(table_layout(conn)["honey"][1]["event_uuid_index"], (True, ["event_uuid"]))

    def test_large_split_in_chunks(self) -> None:
        """Splitting walks the table in chunks: rows beyond the first chunk are split too."""
        self.patch(queries, "_SPLIT_CHUNK", 7)
        rows = [
            (
                None,
                str(uuid.UUID(int=i, version=4)),
                "passive",
                f"192.0.2.{i % 250}:{i}",
                None,
                "UDP",
                "OPTIONS",
                None,
                None,
                None,
            )
            for i in range(1, 40)
        ]
        rows[10] = rows[10][:3] + ("2001:db8::1",) + rows[10][4:]
        path = self.mktemp()
        make_original_db(path, rows)
        conn = sqlite3.connect(path)
        self.addCleanup(conn.close)
        queries.migrate(conn)
        self.assertEqual(
            conn.execute("SELECT count(*) FROM honey WHERE source_port = honey_id").fetchone(),
            (38,),
        )
        self.assertEqual(
            conn.execute("SELECT source_ip, source_port FROM honey WHERE honey_id = 11").fetchone(),
            ("2001:db8::1", None),
        )

    def test_newer_version_refused(self) -> None:
        """A schema newer than ours is a SchemaVersionError naming path and versions; untouched."""
        path = self.mktemp()
        conn = sqlite3.connect(path)
        conn.execute("CREATE TABLE future (x)")
        conn.execute("PRAGMA user_version = 7")
        conn.commit()
        conn.close()
        digest = file_digest(path)
        error = self.assertRaises(SchemaVersionError, prepare_database, path)
        self.assertIsInstance(error, StorageError)
        message = str(error)
        self.assertNotIn("\n", message)
        self.assertIn(path, message)
        self.assertIn("7", message)
        self.assertIn("(2)", message)
        self.assertEqual((error.found, error.supported), (7, 2))
        self.assertEqual(file_digest(path), digest)
        self.assertFalse(os.path.exists(path + "-wal"))

    def test_migrate_refuses_newer(self) -> None:
        """migrate() itself refuses a newer schema and leaves no transaction open."""
        conn = sqlite3.connect(":memory:")
        conn.execute("PRAGMA user_version = 3")
        self.assertRaises(SchemaVersionError, queries.migrate, conn)
        self.assertFalse(conn.in_transaction)
        self.assertEqual(queries.user_version(conn), 3)

    def test_migrate_restores_isolation_level(self) -> None:
        """The connection's isolation_level is as it was after migrate()."""
        conn = sqlite3.connect(":memory:", isolation_level="DEFERRED")
        queries.migrate(conn)
        self.assertEqual(conn.isolation_level, "DEFERRED")


class PrepareDatabaseTests(SynchronousTestCase):
    """:func:`prepare_database`: start-up checks and errors."""

    def assertOneLineError(self, path: str, *words: str) -> StorageError:
        error = self.assertRaises(StorageError, prepare_database, path)
        message = str(error)
        self.assertNotIn("\n", message)
        self.assertTrue(message.startswith(f"database {path}: "), message)
        for word in words:
            self.assertIn(word, message)
        return error

    def test_new_file(self) -> None:
        """A new file is created in WAL mode at the current schema, with a UUID node id."""
        path = self.mktemp()
        node_id = prepare_database(path)
        self.assertEqual(str(uuid.UUID(node_id)), node_id)
        conn = sqlite3.connect(path)
        self.addCleanup(conn.close)
        self.assertEqual(queries.user_version(conn), queries.SCHEMA_VERSION)
        self.assertEqual(conn.execute("PRAGMA journal_mode").fetchone(), ("wal",))

    def test_missing_table(self) -> None:
        """A current-version file missing a table (dropped by hand) is refused at start-up with
        one line naming the table, instead of failing every write later."""
        path = self.mktemp()
        prepare_database(path)
        conn = sqlite3.connect(path)
        conn.execute("DROP TABLE ip_summary")
        conn.commit()
        conn.close()
        self.assertOneLineError(path, "ip_summary", "missing")

    def test_page_size(self) -> None:
        """A new file gets 16 KB pages (a batch of inserts dirties fewer pages of the random-key
        indexes per event); an existing file keeps its page size."""
        path = self.mktemp()
        prepare_database(path)
        conn = sqlite3.connect(path)
        self.addCleanup(conn.close)
        self.assertEqual(conn.execute("PRAGMA page_size").fetchone(), (16_384,))
        old = self.mktemp()
        conn = sqlite3.connect(old)
        conn.execute("CREATE TABLE t (x)")
        conn.commit()
        conn.close()
        prepare_database(old)
        conn = sqlite3.connect(old)
        self.addCleanup(conn.close)
        self.assertEqual(conn.execute("PRAGMA page_size").fetchone(), (4096,))

    def test_node_id_persists(self) -> None:
        """The node id is created once and returned unchanged on every later start."""
        path = self.mktemp()
        self.assertEqual(prepare_database(path), prepare_database(path))

    def test_missing_directory(self) -> None:
        """A missing parent directory is an error, and it is not created."""
        directory = self.mktemp()
        path = os.path.join(directory, "sentrypeer.db")
        self.assertOneLineError(path, "does not exist", directory)
        self.assertFalse(os.path.exists(directory))

    def test_parent_is_a_file(self) -> None:
        """A parent that is a file is an error."""
        parent = self.mktemp()
        with open(parent, "w"):
            pass
        self.assertOneLineError(os.path.join(parent, "x.db"), "is not a directory")

    def test_not_a_database(self) -> None:
        """A file that is not SQLite is an error, and is left as it was."""
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(b"this is not an SQLite database\n" * 200)
        digest = file_digest(path)
        self.assertOneLineError(path, "not a database")
        self.assertEqual(file_digest(path), digest)

    def test_path_is_a_directory(self) -> None:
        """A directory given as the database file is an error."""
        path = self.mktemp()
        os.mkdir(path)
        self.assertOneLineError(path, "unable to open")

    def test_unwritable_directory(self) -> None:
        """A directory this user cannot write is an error naming the database path.

        Root may write any ordinary directory, so as root a kernel file system that refuses new
        files (``/proc``) stands in for the read-only directory.
        """
        if os.geteuid() == 0:
            self.assertOneLineError("/proc/sentrypeer-test.db", "unable to open")
            return
        directory = self.mktemp()
        os.mkdir(directory)
        os.chmod(directory, 0o500)
        self.addCleanup(os.chmod, directory, 0o700)
        self.assertOneLineError(os.path.join(directory, "x.db"), "not writable")


class QueryTests(SynchronousTestCase):
    """The event queries on plain sqlite3."""

    def setUp(self) -> None:
        self.conn = fresh_connection()
        self.addCleanup(self.conn.close)
        self.cursor = self.conn.cursor()

    def test_insert_and_read_back(self) -> None:
        """An inserted event reads back equal, every field included."""
        event = make_event(1, auth_username="alice", auth_realm="example.org", parse_status="malformed")
        self.assertEqual(queries.insert_events(self.cursor, [event]), 1)
        self.assertEqual(queries.fetch_event(self.cursor, event.event_uuid), event)

    def test_column_names(self) -> None:
        """sip_method goes to column method and sip_user_agent to user_agent."""
        queries.insert_events(self.cursor, [make_event(1, sip_method="INVITE", sip_user_agent="pplsip")])
        self.assertEqual(
            self.conn.execute("SELECT method, user_agent FROM honey").fetchone(),
            ("INVITE", "pplsip"),
        )

    def test_dedupe_on_event_uuid(self) -> None:
        """A stored event_uuid is skipped, in later calls and within one call."""
        a, b = make_event(1), make_event(2)
        self.assertEqual(queries.insert_events(self.cursor, [a, b, a]), 2)
        self.assertEqual(queries.insert_events(self.cursor, [a, make_event(3), b]), 1)
        self.assertEqual(queries.count_events(self.cursor), 3)
        self.assertEqual(queries.insert_events(self.cursor, []), 0)

    def test_nul_survives(self) -> None:
        """NUL characters in text fields are stored and read back whole."""
        event = make_event(1, sip_user_agent="evil\x00agent", sip_message="A\x00B\x00")
        queries.insert_events(self.cursor, [event])
        self.assertEqual(
            self.conn.execute("SELECT user_agent, sip_message FROM honey").fetchone(),
            ("evil\x00agent", "A\x00B\x00"),
        )
        self.assertEqual(queries.fetch_event(self.cursor, event.event_uuid), event)

    def test_blob_round_trip(self) -> None:
        """sip_message_bytes is a BLOB holding exactly the bytes given (every byte value)."""
        raw = bytes(range(256)) * 3
        event = make_event(1, sip_message_bytes=raw)
        queries.insert_events(self.cursor, [event])
        value, kind = self.conn.execute(
            "SELECT sip_message_bytes, typeof(sip_message_bytes) FROM honey"
        ).fetchone()
        self.assertEqual((value, kind), (raw, "blob"))
        self.assertIsNone(
            queries.row_to_event(
                self.conn.execute(queries.SELECT_EVENT_SQL).fetchone()[:-1] + (None,)
            ).sip_message_bytes
        )

    def test_row_to_event_from_mapping(self) -> None:
        """row_to_event accepts sqlite3.Row objects as well as tuples."""
        event = make_event(1, source_port=None)
        queries.insert_events(self.cursor, [event])
        self.conn.row_factory = sqlite3.Row
        row = self.conn.execute("SELECT * FROM honey").fetchone()
        self.assertEqual(queries.row_to_event(row), event)

    def test_non_ascii_and_converted_types(self) -> None:
        """Non-ASCII text is stored as given; a bytearray is stored as a BLOB of its bytes."""
        event = make_event(1, sip_user_agent="Ünïcode ☃ \\xff", sip_message_bytes=bytearray(b"\xff\x00"))
        queries.insert_events(self.cursor, [event])
        self.assertEqual(
            self.conn.execute("SELECT user_agent, sip_message_bytes FROM honey").fetchone(),
            ("Ünïcode ☃ \\xff", b"\xff\x00"),
        )

    def test_bool_port_refused(self) -> None:
        """A bool is not a port, although Python counts it as an int."""
        error = self.assertRaises(
            InvalidEventError, queries.insert_events, self.cursor, [make_event(1, source_port=True)]
        )
        self.assertEqual(error.index, 0)

    def test_surrogates_are_escaped(self) -> None:
        """A lone surrogate, which SQLite cannot store, is kept as a readable escape."""
        queries.insert_events(self.cursor, [make_event(1, sip_user_agent="a\ud800b")])
        self.assertEqual(self.conn.execute("SELECT user_agent FROM honey").fetchone(), ("a\\ud800b",))

    def test_invalid_event(self) -> None:
        """An event that cannot be stored raises InvalidEventError naming it; nothing is written."""
        events = [make_event(1), make_event(2, source_port=2**70), make_event(3)]
        error = self.assertRaises(InvalidEventError, queries.insert_events, self.cursor, events)
        self.assertEqual(error.index, 1)
        self.assertIn("port", str(error))
        events[1] = make_event(2, called_number=42)
        error = self.assertRaises(InvalidEventError, queries.insert_events, self.cursor, events)
        self.assertEqual(error.index, 1)
        self.assertEqual(queries.count_events(self.cursor), 0)

    def test_event_uuid_exists(self) -> None:
        """event_uuid_exists is true exactly for stored uuids."""
        event = make_event(1, event_uuid=UUID_A)
        self.assertFalse(queries.event_uuid_exists(self.cursor, event.event_uuid))
        queries.insert_events(self.cursor, [event])
        self.assertTrue(queries.event_uuid_exists(self.cursor, event.event_uuid))
        self.assertFalse(queries.event_uuid_exists(self.cursor, event.event_uuid.upper()))

    def test_node_id(self) -> None:
        """The first candidate becomes the node id; later candidates are ignored."""
        self.assertEqual(queries.get_or_create_node_id(self.cursor, "first"), "first")
        self.assertEqual(queries.get_or_create_node_id(self.cursor, "second"), "first")
        self.assertRaises(ValueError, queries.get_or_create_node_id, self.cursor, "")

    def insert_at(self, *timestamps: str | None) -> None:
        events = [make_event(i, event_timestamp=t) for i, t in enumerate(timestamps)]
        queries.insert_events(self.cursor, events)

    def test_prune(self) -> None:
        """Events with a timestamp before the cutoff are deleted, in batches; the rest stay."""
        old = [f"2024-01-01 00:00:{s:02d}.000000001" for s in range(10)]
        new = ["2024-02-01 00:00:00.000000000", "2024-03-01 00:00:00.5"]
        self.insert_at(*old, *new)
        self.assertEqual(queries.prune_events_before(self.cursor, "2024-02-01 00:00:00.000000000", 3), 10)
        self.assertEqual(sorted(r[0] for r in self.conn.execute("SELECT event_timestamp FROM honey")), new)

    def test_prune_batch_is_bounded(self) -> None:
        """One prune step deletes at most its limit and says so."""
        self.insert_at(*[f"2024-01-01 00:00:{s:02d}" for s in range(7)])
        self.assertEqual(queries.prune_events_batch(self.cursor, "2025-01-01 00:00:00", 5), 5)
        self.assertEqual(queries.prune_events_batch(self.cursor, "2025-01-01 00:00:00", 5), 2)
        self.assertEqual(queries.prune_events_batch(self.cursor, "2025-01-01 00:00:00", 5), 0)

    def test_prune_side_table_and_null_timestamps(self) -> None:
        """Moved duplicates are pruned too; rows without a timestamp go by created_at."""
        self.conn.execute(
            "INSERT INTO honey_duplicate_uuid (honey_id, event_timestamp, event_uuid)"
            " VALUES (50, '2020-01-01 00:00:00.1', 'x'), (51, '2030-01-01 00:00:00', 'y')"
        )
        self.conn.execute(
            "INSERT INTO honey (event_timestamp, created_at) VALUES"
            " (NULL, '2020-01-01 00:00:00.000'), (NULL, '2030-01-01 00:00:00.000')"
        )
        self.assertEqual(queries.prune_events_before(self.cursor, "2025-01-01 00:00:00"), 2)
        self.assertEqual(self.conn.execute("SELECT honey_id FROM honey_duplicate_uuid").fetchall(), [(51,)])
        self.assertEqual(
            self.conn.execute("SELECT created_at FROM honey").fetchall(),
            [("2030-01-01 00:00:00.000",)],
        )

    def test_prune_refuses_bad_cutoff(self) -> None:
        """A cutoff that is not a timestamp is refused rather than deleting surprising rows."""
        self.insert_at("2024-01-01 00:00:00")
        for cutoff in ("9", "", "2024-01-01", "2024-01-01T00:00:00Z", None):
            self.assertRaises(ValueError, queries.prune_events_before, self.cursor, cutoff)
        self.assertRaises(ValueError, queries.prune_events_batch, self.cursor, "2024-01-01 00:00:00", 0)
        self.assertEqual(queries.count_events(self.cursor), 1)


InvalidEventError = queries.InvalidEventError


# ---------------------------------------------------------------------------------------------


@implementer(IEventStore)
class SQLiteStore:
    """A synchronous IEventStore on an in-memory database, with scripted failures."""

    def __init__(self) -> None:
        self.conn = fresh_connection()
        self.calls: list[list[BadActorEvent]] = []
        #: The shed counts given with each call (None when there were none).
        self.sheds: list[Any] = []
        #: Exceptions to raise on the next calls, in order.
        self.failures: list[Exception] = []
        self.always_fail: Exception | None = None

    def insert_events(self, events: Any, shed: Any = None) -> Deferred[int]:
        self.calls.append(list(events))
        self.sheds.append(shed)
        if self.always_fail is not None:
            return fail(self.always_fail)
        if self.failures:
            return fail(self.failures.pop(0))
        try:
            with self.conn:
                inserted = queries.insert_events(self.conn.cursor(), events)
                if shed is not None:
                    queries.record_shed(self.conn.cursor(), shed.addresses, shed.numbers)
                return succeed(inserted)
        except Exception as e:
            return fail(e)

    def count(self) -> int:
        return queries.count_events(self.conn.cursor())


@implementer(IEventStore)
class HeldStore:
    """An IEventStore whose calls wait until the test fires them."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[BadActorEvent], Deferred[int]]] = []

    def insert_events(self, events: Any, shed: Any = None) -> Deferred[int]:
        d: Deferred[int] = Deferred()
        self.calls.append((list(events), d))
        return d


def run_due(clock: Clock, limit: int = 1000) -> None:
    """Run every call due now, including ones they schedule for now."""
    for _ in range(limit):
        if not any(c.getTime() <= clock.seconds() for c in clock.getDelayedCalls()):
            return
        clock.advance(0)
    raise AssertionError("calls keep rescheduling themselves")


class WriteQueueTests(SynchronousTestCase):
    """:class:`WriteQueue` with a task.Clock and synchronous stores."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.store = SQLiteStore()

    def queue(self, store: Any = None, **kwargs: Any) -> WriteQueue:
        return WriteQueue(self.store if store is None else store, self.clock, **kwargs)

    def test_stores_provide_interface(self) -> None:
        """The fakes and Database provide IEventStore."""
        verifyObject(IEventStore, self.store)
        verifyObject(IEventStore, HeldStore())
        verifyObject(IEventStore, Database("x.db", self.clock))

    def test_put_writes_later(self) -> None:
        """put() accepts at once and writes nothing until the clock runs; a burst is one batch."""
        q = self.queue()
        for i in range(5):
            self.assertTrue(q.put(make_event(i)))
        self.assertEqual((q.queued, q.depth, self.store.calls), (5, 5, []))
        run_due(self.clock)
        self.assertEqual(len(self.store.calls), 1)
        self.assertEqual(self.store.count(), 5)
        self.assertEqual((q.written, q.inserted, q.batches, q.depth, q.depth_bytes), (5, 5, 1, 0, 0))

    def test_batches(self) -> None:
        """N events are written in ceil(N / batch_size) transactions, in order."""
        q = self.queue(batch_size=7)
        events = [make_event(i) for i in range(30)]
        for event in events:
            q.put(event)
        run_due(self.clock)
        self.assertEqual(len(self.store.calls), math.ceil(30 / 7))
        self.assertEqual([len(c) for c in self.store.calls], [7, 7, 7, 7, 2])
        self.assertEqual([e for c in self.store.calls for e in c], events)
        self.assertEqual((q.batches, q.written), (5, 30))

    def test_count_bound(self) -> None:
        """A queue holding max_events refuses more, counting drops, until it is written."""
        q = self.queue(max_events=3)
        self.assertEqual([q.put(make_event(i)) for i in range(5)], [True] * 3 + [False] * 2)
        self.assertEqual((q.queued, q.dropped, q.depth), (3, 2, 3))
        run_due(self.clock)
        self.assertTrue(q.put(make_event(10)))
        self.assertEqual(q.dropped, 2)

    def test_in_flight_batch_counts(self) -> None:
        """Events of the batch being written still count against the bounds."""
        store = HeldStore()
        q = self.queue(store, max_events=2)
        q.put(make_event(1))
        q.put(make_event(2))
        run_due(self.clock)
        self.assertEqual(len(store.calls), 1)
        self.assertFalse(q.put(make_event(3)))
        store.calls[0][1].callback(2)
        self.assertTrue(q.put(make_event(3)))

    def test_byte_bound(self) -> None:
        """An event that would take depth_bytes over max_bytes is refused; an empty queue takes one."""
        size = make_event(0).size_hint()
        q = self.queue(max_bytes=size * 2 + size // 2)
        self.assertEqual([q.put(make_event(i)) for i in range(3)], [True, True, False])
        self.assertEqual((q.depth_bytes, q.dropped), (size * 2, 1))
        run_due(self.clock)
        tiny = self.queue(max_bytes=10)
        self.assertTrue(tiny.put(make_event(5)))
        self.assertFalse(tiny.put(make_event(6)))

    def test_put_never_raises(self) -> None:
        """put() of something that is not an event returns False, counts it, logs it."""
        q = self.queue()
        self.assertFalse(q.put(object()))  # type: ignore[arg-type]
        self.assertEqual((q.dropped, q.queued), (1, 0))
        self.assertEqual(len(self.flushLoggedErrors(AttributeError)), 1)

    def test_one_batch_in_flight(self) -> None:
        """While a batch is being written no other starts; the next starts once it ends."""
        store = HeldStore()
        q = self.queue(store, batch_size=2)
        for i in range(5):
            q.put(make_event(i))
        run_due(self.clock)
        q.put(make_event(9))
        run_due(self.clock)
        self.assertEqual(len(store.calls), 1)
        store.calls[0][1].callback(2)
        self.assertEqual(len(store.calls), 1)  # the next batch waits for the clock
        run_due(self.clock)
        self.assertEqual(len(store.calls), 2)
        self.assertEqual(len(store.calls[1][0]), 2)

    def test_flush(self) -> None:
        """flush() fires once every event accepted before it is written, not waiting for later ones."""
        store = HeldStore()
        q = self.queue(store, batch_size=3)
        self.successResultOf(q.flush())  # nothing queued: fires at once
        for i in range(3):
            q.put(make_event(i))
        d = q.flush()
        for i in range(3, 6):
            q.put(make_event(i))
        run_due(self.clock)
        self.assertNoResult(d)
        store.calls[0][1].callback(3)
        self.assertIsNone(self.successResultOf(d))
        later = q.flush()
        run_due(self.clock)
        self.assertNoResult(later)
        store.calls[1][1].callback(3)
        self.successResultOf(later)

    def test_flush_cancel(self) -> None:
        """Cancelling a flush stops the wait and discards nothing."""
        q = self.queue()
        q.put(make_event(1))
        d = q.flush()
        d.cancel()
        self.failureResultOf(d, CancelledError)
        run_due(self.clock)
        self.assertEqual(self.store.count(), 1)

    def test_retry_after_failure(self) -> None:
        """A failed batch is logged once, retried with growing delays and finally written whole."""
        observer = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self.store.failures = [
            sqlite3.OperationalError("database is locked"),
            sqlite3.OperationalError("database is locked"),
        ]
        q = self.queue(retry_delay=1.0)
        for i in range(4):
            q.put(make_event(i))
        d = q.flush()
        run_due(self.clock)
        self.assertEqual((q.write_errors, q.written, q.depth), (1, 0, 4))
        self.clock.advance(0.9)
        self.assertEqual(len(self.store.calls), 1)
        self.clock.advance(0.1)
        self.assertEqual((len(self.store.calls), q.write_errors), (2, 2))
        self.clock.advance(1.9)
        self.assertEqual(len(self.store.calls), 2)
        self.clock.advance(0.1)
        self.successResultOf(d)
        self.assertEqual((q.written, q.depth, q.dropped, self.store.count()), (4, 0, 0, 4))
        # A database condition (locked) is one line per failure, never a traceback.
        self.assertEqual(self.flushLoggedErrors(sqlite3.OperationalError), [])
        self.assertEqual([e for e in observer if "log_failure" in e], [])
        lines = [formatEvent(e) for e in observer if "failed (attempt" in e.get("log_format", "")]
        self.assertEqual(len(lines), 2)
        self.assertIn("database is locked", lines[0])

    def test_unexpected_error_keeps_traceback(self) -> None:
        """A failure that is not a database condition (a bug) is logged with its traceback."""
        observer = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self.store.failures = [RuntimeError("bug")]
        q = self.queue(retry_delay=1.0)
        q.put(make_event(1))
        d = q.flush()
        run_due(self.clock)
        self.clock.advance(1.0)
        self.successResultOf(d)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(len([e for e in observer if "log_failure" in e]), 1)

    def test_backoff_capped(self) -> None:
        """Retry delays double up to max_retry_delay."""
        self.store.always_fail = sqlite3.OperationalError("disk I/O error")
        q = self.queue(retry_delay=1.0, max_retry_delay=4.0)
        q.put(make_event(1))
        run_due(self.clock)
        delays = []
        for _ in range(5):
            (call,) = self.clock.getDelayedCalls()
            delays.append(call.getTime() - self.clock.seconds())
            self.clock.advance(delays[-1])
        self.assertEqual(delays, [1.0, 2.0, 4.0, 4.0, 4.0])
        self.assertEqual((q.write_errors, q.depth), (6, 1))
        self.flushLoggedErrors(sqlite3.OperationalError)

    def test_flush_retries_now(self) -> None:
        """flush() during a retry wait tries again at once."""
        self.store.failures = [sqlite3.OperationalError("database is locked")]
        q = self.queue(retry_delay=60.0)
        q.put(make_event(1))
        run_due(self.clock)
        d = q.flush()
        run_due(self.clock)
        self.successResultOf(d)
        self.assertEqual(self.store.count(), 1)
        self.flushLoggedErrors(sqlite3.OperationalError)

    def test_invalid_event_rejected(self) -> None:
        """An event that can never be stored is discarded alone; the rest of its batch is written."""
        observer = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        q = self.queue()
        q.put(make_event(1))
        q.put(make_event(2, source_port=2**70))
        q.put(make_event(3))
        d = q.flush()
        run_due(self.clock)
        self.successResultOf(d)
        self.assertEqual((q.rejected, q.written, q.write_errors, q.depth, q.depth_bytes), (1, 2, 0, 0, 0))
        self.assertEqual(self.store.count(), 2)
        errors = [e for e in observer if e["log_level"] == LogLevel.error]
        self.assertEqual(len(errors), 1)
        self.assertEqual(errors[0]["uuid"], make_event(2).event_uuid)

    def test_on_written(self) -> None:
        """on_written gets each committed batch's events; a failing hook does not stop the queue."""
        seen: list[list[BadActorEvent]] = []

        def hook(events: list[BadActorEvent]) -> None:
            seen.append(events)
            raise ValueError("hook bug")

        q = self.queue(batch_size=2, on_written=hook)
        events = [make_event(i) for i in range(3)]
        for event in events:
            q.put(event)
        run_due(self.clock)
        self.assertEqual(seen, [events[:2], events[2:]])
        self.assertEqual(q.written, 3)
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 2)

    def test_duplicates_counted(self) -> None:
        """Events whose uuid is already stored count as written but not inserted."""
        q = self.queue()
        q.put(make_event(1))
        q.put(make_event(1))
        run_due(self.clock)
        self.assertEqual(
            q.stats(),
            {
                "queued": 2,
                "written": 2,
                "inserted": 1,
                "dropped": 0,
                "shed_overflow": 0,
                "rejected": 0,
                "write_errors": 0,
                "batches": 1,
                "depth": 0,
                "depth_bytes": 0,
            },
        )

    def test_drop_logging(self) -> None:
        """Shedding is logged when it starts, then per report interval (the events shed since the
        last line), then once after a quiet interval; not per event."""
        observer = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        q = self.queue(max_events=1)
        for i in range(5):
            q.put(make_event(i))
        run_due(self.clock)
        q.put(make_event(9))
        self.assertEqual(len(observer), 1)
        self.assertIn("shedding", observer[0]["log_format"])
        self.clock.advance(SHED_REPORT_INTERVAL)
        self.assertEqual(observer[1]["count"], 3)  # shed after the first line
        self.clock.advance(SHED_REPORT_INTERVAL)
        self.assertIn("no events shed", observer[2]["log_format"])
        self.assertEqual(len(observer), 3)


# ---------------------------------------------------------------------------------------------


class FakeDatabase(SQLiteStore):
    """The parts of Database that DatabaseService uses, synchronous; prunes wait for the test."""

    path = "fake.db"

    def __init__(self) -> None:
        super().__init__()
        self.log: list[str] = []
        self.prunes: list[tuple[str, Deferred[int]]] = []

    def start(self) -> Deferred[None]:
        self.log.append("start")
        return succeed(None)

    def close(self) -> Deferred[None]:
        self.log.append("close")
        return succeed(None)

    def prune_before(self, cutoff: str) -> Deferred[int]:
        d: Deferred[int] = Deferred(lambda d: self.log.append("prune cancelled"))
        self.prunes.append((cutoff, d))
        return d


NOW = 1_750_000_000.0


class DatabaseServiceTests(SynchronousTestCase):
    """:class:`DatabaseService` with a fake database and a task.Clock."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        self.database = FakeDatabase()

    def service(self, **kwargs: Any) -> DatabaseService:
        return DatabaseService(
            "fake.db",
            reactor=self.clock,
            database=self.database,  # type: ignore[arg-type]
            **kwargs,
        )

    def test_no_retention(self) -> None:
        """With retention 0 starting opens the database and schedules nothing."""
        s = self.service()
        s.startService()
        self.assertEqual(self.database.log, ["start"])
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.failureResultOf(s.prune(), ValueError)

    def test_stop_flushes_then_closes(self) -> None:
        """stopService writes every queued event first, then closes the database."""
        store = HeldStore()
        s = self.service()
        self.database.insert_events = store.insert_events  # type: ignore[method-assign]
        s.startService()
        self.assertTrue(s.put(make_event(1)))
        run_due(self.clock)
        s.put(make_event(2))
        d = s.stopService()
        self.assertNoResult(d)
        self.assertEqual(self.database.log, ["start"])
        store.calls[0][1].callback(1)
        run_due(self.clock)
        self.assertNoResult(d)
        store.calls[1][1].callback(1)
        self.successResultOf(d)
        self.assertEqual(self.database.log, ["start", "close"])
        self.assertEqual(s.queue.written, 2)

    def test_stop_gives_up_after_timeout(self) -> None:
        """If the database keeps failing, stop waits flush_timeout, logs the loss and closes."""
        observer = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self.database.always_fail = sqlite3.OperationalError("disk I/O error")
        s = self.service(flush_timeout=30.0)
        s.startService()
        s.put(make_event(1))
        d = s.stopService()
        self.clock.advance(29)
        self.assertNoResult(d)
        self.clock.advance(1)
        self.successResultOf(d)
        self.assertEqual(self.database.log, ["start", "close"])
        self.assertTrue(any(e.get("count") == 1 and "not written" in e["log_format"] for e in observer))
        self.flushLoggedErrors(sqlite3.OperationalError)

    def test_retention_schedule(self) -> None:
        """Pruning runs prune_delay after start, then prune_interval after each run ends."""
        s = self.service(retention_days=7, prune_delay=60, prune_interval=3600)
        s.startService()
        self.clock.advance(59)
        self.assertEqual(self.database.prunes, [])
        self.clock.advance(1)
        ((cutoff, d),) = self.database.prunes
        self.assertEqual(cutoff, format_timestamp(int((NOW + 60 - 7 * 86400) * 10**9)))
        self.assertEqual(cutoff, retention_cutoff(self.clock.seconds(), 7))
        self.clock.advance(3 * 3600)  # still running: no second run meanwhile
        self.assertEqual(len(self.database.prunes), 1)
        d.callback(5)
        self.clock.advance(3599)
        self.assertEqual(len(self.database.prunes), 1)
        self.clock.advance(1)
        self.assertEqual(len(self.database.prunes), 2)

    def test_retention_errors_logged(self) -> None:
        """A failed prune is logged and the next one is still scheduled."""
        s = self.service(retention_days=1, prune_delay=10, prune_interval=100)
        s.startService()
        self.clock.advance(10)
        self.database.prunes[0][1].errback(sqlite3.OperationalError("database is locked"))
        self.assertEqual(len(self.flushLoggedErrors(sqlite3.OperationalError)), 1)
        self.clock.advance(100)
        self.assertEqual(len(self.database.prunes), 2)

    def test_manual_prune_waits_for_running_one(self) -> None:
        """prune() while a prune runs starts only after it ends (runs never overlap)."""
        s = self.service(retention_days=1, prune_delay=10)
        s.startService()
        self.clock.advance(10)
        d = s.prune()
        self.assertEqual(len(self.database.prunes), 1)
        self.database.prunes[0][1].callback(1)
        self.assertEqual(len(self.database.prunes), 2)
        self.database.prunes[1][1].callback(0)
        self.assertEqual(self.successResultOf(d), 0)

    def test_stop_cancels_pruning(self) -> None:
        """stopService cancels a running prune and the timer; nothing is logged as an error."""
        s = self.service(retention_days=1, prune_delay=10)
        s.startService()
        self.clock.advance(10)
        self.successResultOf(s.stopService())
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.database.log, ["start", "prune cancelled", "close"])

    def test_node_id_attribute(self) -> None:
        """node_id is None until the root sets it."""
        s = self.service()
        self.assertIsNone(s.node_id)
        s.node_id = NODE
        self.assertEqual(s.node_id, NODE)


# ---------------------------------------------------------------------------------------------


class RealDatabaseTests(TestCase):
    """:class:`Database` with a real adbapi pool on the running reactor."""

    def setUp(self) -> None:
        self.path = self.mktemp()
        prepare_database(self.path)
        self.database = Database(self.path, global_reactor)
        self.addCleanup(self.database.close)

    async def test_ten_thousand_events(self) -> None:
        """10,000 events queued then flushed are 10,000 rows, in few transactions."""
        await self.database.start()
        q = WriteQueue(self.database, global_reactor)  # type: ignore[arg-type]
        for i in range(10_000):
            self.assertTrue(q.put(make_event(i)))
        await q.flush()
        self.assertEqual(await self.database.count_events(), 10_000)
        self.assertEqual((q.written, q.inserted, q.dropped, q.write_errors), (10_000,) * 2 + (0, 0))
        self.assertLessEqual(q.batches, 10)

    async def test_connection_settings(self) -> None:
        """The pool's connection uses WAL, synchronous=NORMAL, busy_timeout and foreign keys."""
        await self.database.start()

        def pragmas(cursor: Any) -> list[Any]:
            out = []
            for name in ("journal_mode", "synchronous", "busy_timeout", "foreign_keys"):
                cursor.execute(f"PRAGMA {name}")
                out.append(cursor.fetchone()[0])
            return out

        self.assertEqual(await self.database.run_query(pragmas), ["wal", 1, 5000, 1])

    async def test_queries(self) -> None:
        """insert_events, event_uuid_exists and count_events work through the pool."""
        await self.database.start()
        self.assertEqual(await self.database.insert_events([make_event(1), make_event(1)]), 1)
        self.assertTrue(await self.database.event_uuid_exists(make_event(1).event_uuid))
        self.assertFalse(await self.database.event_uuid_exists(make_event(2).event_uuid))
        self.assertEqual(await self.database.count_events(), 1)
        fetched = await self.database.run_query(queries.fetch_event, make_event(1).event_uuid)
        self.assertEqual(fetched, make_event(1))

    async def test_prune_in_batches(self) -> None:
        """prune_before deletes older events in several transactions and returns the total."""
        await self.database.start()
        old = [make_event(i, event_timestamp=f"2022-01-01 00:00:{i:02d}") for i in range(25)]
        await self.database.insert_events([*old, make_event(99)])  # 2023-11-14
        self.assertEqual(await self.database.prune_before("2023-01-01 00:00:00", 10), 25)
        self.assertEqual(await self.database.count_events(), 1)

    async def test_not_started(self) -> None:
        """Queries before start() fail with StorageError instead of touching the reactor."""
        with self.assertRaises(StorageError):
            await self.database.count_events()

    async def test_unprepared_file_refused(self) -> None:
        """start() on a file prepare_database() has not migrated fails with StorageError."""
        path = self.mktemp()
        make_original_db(path)
        database = Database(path, global_reactor)
        self.addCleanup(database.close)
        with self.assertRaises(StorageError):
            await database.start()

    async def test_service_stop_writes_everything(self) -> None:
        """Events put into the service are all in the file after stopService."""
        service = DatabaseService(self.path, reactor=global_reactor)
        service.startService()
        for i in range(50):
            service.put(make_event(i))
        await service.stopService()
        conn = sqlite3.connect(self.path)
        self.addCleanup(conn.close)
        self.assertEqual(queries.count_events(conn.cursor()), 50)

    async def test_service_retention(self) -> None:
        """A service with retention deletes events older than retention_days on its clock."""
        clock = Clock()
        clock.advance(NOW)
        await self.database.start()
        old = make_event(1, event_timestamp=format_timestamp(int((NOW - 8 * 86400) * 10**9)))
        recent = make_event(2, event_timestamp=format_timestamp(int((NOW - 6 * 86400) * 10**9)))
        await self.database.insert_events([old, recent])
        service = DatabaseService(
            self.path, reactor=global_reactor, clock=clock, database=self.database, retention_days=7
        )
        self.assertEqual(await service.prune(), 1)
        self.assertFalse(await self.database.event_uuid_exists(old.event_uuid))
        self.assertTrue(await self.database.event_uuid_exists(recent.event_uuid))


class ReaderAndCheckpointTests(TestCase):
    """The reader connection, the checkpointer and the writer's settings (issue 7)."""

    def setUp(self) -> None:
        self.path = self.mktemp()
        prepare_database(self.path)
        self.database = Database(self.path, global_reactor)
        self.addCleanup(self.database.close)

    async def test_run_read_is_read_only(self) -> None:
        """run_read runs on its own connection, in another thread than the writer's, which sees
        committed rows and refuses to write (PRAGMA query_only)."""
        import threading

        await self.database.start()
        await self.database.insert_events([make_event(1)])

        def where(cursor: Any) -> tuple[str, int]:
            cursor.execute("SELECT count(*) FROM honey")
            return threading.current_thread().name, cursor.fetchone()[0]

        reader, rows = await self.database.run_read(where)
        writer, _ = await self.database.run_query(where)
        self.assertEqual(rows, 1)
        self.assertNotEqual(reader, writer)

        def write(cursor: Any) -> None:
            cursor.execute("DELETE FROM honey")

        with self.assertRaises(sqlite3.OperationalError):
            await self.database.run_read(write)
        self.assertEqual(await self.database.count_events(), 1)

    async def test_writer_settings(self) -> None:
        """The writer checkpoints only past WRITER_CHECKPOINT_PAGES (the checkpointer does it
        every CHECKPOINT_INTERVAL) and has a page cache of WRITER_CACHE_KB."""
        from sentrypeer.storage import database as database_module

        await self.database.start()

        def pragmas(cursor: Any) -> list[Any]:
            return [cursor.execute(f"PRAGMA {name}").fetchone()[0]
                    for name in ("wal_autocheckpoint", "cache_size")]

        self.assertEqual(
            await self.database.run_query(pragmas),
            [database_module.WRITER_CHECKPOINT_PAGES, -database_module.WRITER_CACHE_KB],
        )
        call = self.database._checkpoint_call
        self.assertTrue(call is not None and call.active())

    async def test_checkpointer_empties_the_wal(self) -> None:
        """A checkpoint copies every committed frame of the WAL into the database file."""
        from sentrypeer.storage import database as database_module

        await self.database.start()
        await self.database.insert_events([make_event(i) for i in range(500)])
        await self.database._checkpoint_pool.runInteraction(database_module._checkpoint)

        def frames(cursor: Any) -> tuple[int, int]:
            busy, log, checkpointed = cursor.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            return log, checkpointed

        log, checkpointed = await self.database.run_read(frames)
        self.assertEqual(log, checkpointed)

    async def test_close_stops_the_checkpointer(self) -> None:
        """close() cancels the next checkpoint and closes the three pools."""
        await self.database.start()
        call = self.database._checkpoint_call
        await self.database.close()
        self.assertFalse(call.active())
        self.assertIsNone(self.database._checkpoint_call)
        self.failureResultOf(self.database.run_read(lambda c: None), StorageError)

    async def test_shed_counts_through_the_database(self) -> None:
        """insert_events(events, shed) stores the events and adds the shed probes to the
        summaries in the same transaction."""
        from sentrypeer.storage.database import Shed

        await self.database.start()
        stamp = make_event(9).event_timestamp
        shed = Shed({"203.0.113.7": (4, stamp)}, {"100": (4, stamp), "NOT_FOUND": (2, stamp)})
        self.assertEqual(await self.database.insert_events([make_event(1)], shed), 1)

        def summaries(cursor: Any) -> list[Any]:
            return [
                cursor.execute("SELECT source_ip, seen_count, shed_count, seen_last FROM ip_summary")
                .fetchall(),
                cursor.execute("SELECT called_number, seen_count, shed_count FROM number_summary")
                .fetchall(),
            ]

        self.assertEqual(
            await self.database.run_read(summaries),
            [[("203.0.113.7", 5, 4, stamp)], [("100", 5, 4)]],
        )


class BatchDelayTests(SynchronousTestCase):
    """WriteQueue(batch_delay=...): a steady flow is written in batches of hundreds."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.store = HeldStore()
        self.queue = WriteQueue(self.store, self.clock, batch_size=100, batch_delay=0.1)

    def written(self, count: int = 1) -> None:
        for events, d in self.store.calls[-count:]:
            if not d.called:
                d.callback(len(events))

    def test_first_event_written_at_once(self) -> None:
        """After a quiet time the first event is written at once; events arriving meanwhile wait
        batch_delay after that batch, then go in one batch."""
        self.queue.put(make_event(0))
        self.clock.advance(0)
        self.assertEqual(len(self.store.calls), 1)
        for i in range(1, 30):
            self.queue.put(make_event(i))
        self.written()
        self.clock.advance(0.05)
        self.assertEqual(len(self.store.calls), 1)
        self.clock.advance(0.05)
        self.assertEqual([len(events) for events, _ in self.store.calls], [1, 29])

    def test_full_batch_not_delayed(self) -> None:
        """When batch_size events are waiting, the next batch starts at once."""
        self.queue.put(make_event(0))
        self.clock.advance(0)
        self.written()
        for i in range(1, 101):
            self.queue.put(make_event(i))
        self.clock.advance(0)
        self.assertEqual([len(events) for events, _ in self.store.calls], [1, 100])

    def test_flush_not_delayed(self) -> None:
        """flush() ends the delay: the waiting events are written at once."""
        self.queue.put(make_event(0))
        self.clock.advance(0)
        self.queue.put(make_event(1))
        self.written()
        d = self.queue.flush()
        self.clock.advance(0)
        self.assertEqual(len(self.store.calls), 2)
        self.written()
        self.successResultOf(d)

    def test_service_default(self) -> None:
        """DatabaseService gives its queue DEFAULT_BATCH_DELAY (WriteQueue alone: none)."""
        from sentrypeer.storage.database import DEFAULT_BATCH_DELAY

        service = DatabaseService("fake.db", reactor=self.clock, database=FakeDatabase())
        self.assertEqual(service.queue.batch_delay, DEFAULT_BATCH_DELAY)
        self.assertEqual(WriteQueue(self.store, self.clock).batch_delay, 0.0)


class MultiRowInsertTests(SynchronousTestCase):
    """insert_events writes a batch in a few multi-row statements."""

    def test_chunk_sizes(self) -> None:
        """Chunks are powers of two within MAX_PARAMETERS, adding up to the row count."""
        for count in (1, 2, 3, 56, 57, 1000, 2000, 4097, 9999):
            for width in (1, 4, 17):
                sizes = list(queries._chunk_sizes(count, width))
                self.assertEqual(sum(sizes), count)
                for size in sizes:
                    self.assertEqual(size & (size - 1), 0)
                    self.assertLessEqual(size * width, queries.MAX_PARAMETERS)
                self.assertLessEqual(len(sizes), 16)

    @given(st.integers(1, 300), st.integers(0, 30))
    def test_duplicates_across_chunks(self, count: int, repeats: int) -> None:
        """Whatever the batch size and wherever duplicate event_uuids fall (in the same chunk or
        another), each uuid is stored once and the count returned is the rows added."""
        conn = fresh_connection()
        events = [make_event(i) for i in range(count)]
        events += [make_event(i) for i in range(min(repeats, count))]
        with conn:
            self.assertEqual(queries.insert_events(conn.cursor(), events), count)
        self.assertEqual(queries.count_events(conn.cursor()), count)
        conn.close()
