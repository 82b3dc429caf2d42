"""SentryPeer's database on Twisted: start-up preparation, the pool, the write queue, the service.

- :func:`prepare_database`: synchronous, once at start-up before the reactor runs (WAL, schema
  migration, node id).
- :class:`Database`: ``adbapi`` pools of one SQLite connection each (the writer, a reader for the
  API, a checkpointer); every method returns a Deferred.
- :class:`WriteQueue`: the event pipeline's bounded, batching, never-blocking sink, which sheds
  events when full and still counts their probes in the summary tables.
- :class:`DatabaseService`: owns both, flushes on stop, prunes old events (``--retention-days``).

The original opened the file per operation, re-ran its DDL on every insert and wrote from several
threads without ``busy_timeout``, losing events to SQLITE_BUSY (reference §4.2, §14.9); here one
connection does all the work, writes are batched into few transactions, and a failed batch is
retried rather than dropped.
"""

from __future__ import annotations

import collections
import os
import sqlite3
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from twisted.application.service import Service
from twisted.enterprise import adbapi
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    DeferredLock,
    TimeoutError,
    fail,
    maybeDeferred,
    succeed,
)
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Interface, implementer

from sentrypeer.events import BadActorEvent, format_timestamp, new_event_uuid
from sentrypeer.storage import SchemaVersionError, StorageError, queries
from sentrypeer.storage.api_queries import is_number, stored_text

log = Logger(namespace="sentrypeer.storage")

#: ``--write-queue-size`` default: events waiting for the database.
DEFAULT_WRITE_QUEUE_SIZE = 100_000
#: ``--write-queue-bytes`` default: bytes (``BadActorEvent.size_hint``) waiting for the database.
DEFAULT_WRITE_QUEUE_BYTES = 32 * 1024 * 1024
#: Events per transaction of the write queue.
DEFAULT_BATCH_SIZE = 2000
#: Seconds the write queue lets events gather between two batches of a steady flow.
DEFAULT_BATCH_DELAY = 0.1
#: Distinct addresses (and numbers) whose shed counts may wait for the next transaction.
DEFAULT_MAX_SHED_KEYS = 50_000
#: Page size of a new database file, bytes (SQLite's default is 4,096; see :func:`prepare_database`).
NEW_PAGE_SIZE = 16_384
#: Tables a current database must have (checked at start-up: without them nothing can be stored).
REQUIRED_TABLES = ("honey", "ip_summary", "number_summary", "summary_state", "sentrypeer_node")
#: Seconds between two log lines about shed events while shedding goes on.
SHED_REPORT_INTERVAL = 10.0
#: SQLite ``busy_timeout``, milliseconds: how long a statement waits for another process's lock.
BUSY_TIMEOUT_MS = 5000
#: Seconds between two checkpoints of the checkpointer (see :class:`Database`).
CHECKPOINT_INTERVAL = 0.5
#: WAL pages (4 KB) beyond which the writer checkpoints by itself (SQLite's default is 1000).
WRITER_CHECKPOINT_PAGES = 10_000
#: The writer connection's page cache, KB (SQLite's default is 2,000).
WRITER_CACHE_KB = 16_384

__all__ = [
    "BUSY_TIMEOUT_MS",
    "DEFAULT_BATCH_DELAY",
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_MAX_SHED_KEYS",
    "DEFAULT_WRITE_QUEUE_BYTES",
    "DEFAULT_WRITE_QUEUE_SIZE",
    "Database",
    "DatabaseService",
    "IEventStore",
    "SchemaVersionError",
    "Shed",
    "StorageError",
    "WriteQueue",
    "prepare_database",
    "retention_cutoff",
]


# ---------------------------------------------------------------------------------------------
# Start-up


def _describe(error: Exception, path: str) -> str:
    """One-line cause for *error*, with a hint where SQLite's own words are vague."""
    cause = str(error) or type(error).__name__
    if isinstance(error, sqlite3.Error) and (
        "unable to open" in cause or "readonly" in cause or "read-only" in cause
    ):
        directory = os.path.dirname(os.path.abspath(path))
        if os.path.exists(path) and not os.access(path, os.R_OK | os.W_OK):
            cause += " (the file is not readable and writable by this user)"
        elif not os.access(directory, os.W_OK | os.X_OK):
            cause += f" (directory {directory} is not writable by this user)"
    return cause


def prepare_database(path: str) -> str:
    """Make the database file ready to use and return this node's id. Synchronous.

    Called once at start-up, before the reactor runs (so blocking is fine): opens *path* with
    :mod:`sqlite3` (creating the file, never its directory), refuses a schema newer than this
    program's without writing anything, switches the file to WAL mode, migrates it
    (:func:`sentrypeer.storage.queries.migrate`: creates a new database, upgrades an original
    SentryPeer one in place), then creates or reads the persistent node id (interface.md §3) and
    closes the file. Running it again is harmless.

    :param path: the database file (``--db-file``).
    :returns: this node's id, a UUID string, the same across restarts.
    :raises sentrypeer.storage.StorageError: with a one-line message naming *path* and the cause
        (missing or unwritable directory, not a database, read-only, locked, ...);
        :class:`~sentrypeer.storage.SchemaVersionError` for a newer schema.
    """
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        what = "is not a directory" if os.path.exists(directory) else "does not exist"
        raise StorageError(path, f"directory {directory} {what}")
    conn = None
    try:
        new = not os.path.exists(path) or os.path.getsize(path) == 0
        conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_MS / 1000)
        found = queries.user_version(conn)
        if found > queries.SCHEMA_VERSION:
            raise SchemaVersionError(path, found, queries.SCHEMA_VERSION)
        if not new and found < queries.SCHEMA_VERSION:
            log.info(
                "Database {path}: upgrading schema version {found} to {version} (a large file takes a while)",
                path=path,
                found=found,
                version=queries.SCHEMA_VERSION,
            )
        if new:
            conn.execute(f"PRAGMA page_size={NEW_PAGE_SIZE:d}")
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            log.warn(
                "Database {path}: journal mode is {mode}, not WAL; readers may block writers",
                path=path,
                mode=mode,
            )
        before, after = queries.migrate(conn)
        missing = [name for name in REQUIRED_TABLES if not queries._table_exists(conn, name)]
        if missing:
            raise StorageError(path, f"schema version {after} but table {', '.join(missing)} missing "
                                     "(changed by hand?); restore it from a backup")
        if before != after:
            log.info(
                "Database {path}: {what} schema version {after}",
                path=path,
                what="created with" if new else f"upgraded from {before} to",
                after=after,
            )
        with conn:
            node_id = queries.get_or_create_node_id(conn.cursor(), new_event_uuid())
        return node_id
    except SchemaVersionError as e:
        raise SchemaVersionError(path, e.found, e.supported) from None
    except StorageError:
        raise
    except (sqlite3.Error, OSError) as e:
        raise StorageError(path, _describe(e, path)) from e
    finally:
        if conn is not None:
            conn.close()


# ---------------------------------------------------------------------------------------------
# The pool


def _configure(conn: sqlite3.Connection) -> None:
    """``cp_openfun`` of the pool: per-connection settings (WAL itself persists in the file)."""
    conn.execute("PRAGMA journal_mode=WAL").fetchall()
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS:d}")
    conn.execute("PRAGMA foreign_keys=ON")


def _configure_writer(conn: sqlite3.Connection) -> None:
    """``cp_openfun`` of the writer pool: checkpoints are the checkpointer's job (see
    :class:`Database`); the writer runs one itself only when the WAL passes
    :data:`WRITER_CHECKPOINT_PAGES` pages (the checkpointer fell behind). A page cache of
    :data:`WRITER_CACHE_KB`: every batch updates pages all over five indexes and two summaries,
    and SQLite's default 2 MB makes it read most of them back from the file each time."""
    _configure(conn)
    conn.execute(f"PRAGMA wal_autocheckpoint={WRITER_CHECKPOINT_PAGES:d}")
    conn.execute(f"PRAGMA cache_size=-{WRITER_CACHE_KB:d}")


def _configure_reader(conn: sqlite3.Connection) -> None:
    """``cp_openfun`` of the reader and checkpointer pools: no writing at all. Text that is not
    valid UTF-8 (only an operator's hand-made row can hold it) is read with undecodable bytes as
    ``\\xNN`` instead of failing the whole API request."""
    _configure(conn)
    conn.execute("PRAGMA query_only=ON")
    conn.text_factory = stored_text


def _checkpoint(cursor: Any) -> None:
    """Copy what the WAL holds into the database file, without waiting for anyone (PASSIVE)."""
    cursor.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()


def _write(cursor: Any, events: list[BadActorEvent], shed: Shed | None) -> int:
    """One write transaction of the :class:`WriteQueue`: the events, then the shed counts."""
    inserted = queries.insert_events(cursor, events)
    if shed is not None:
        queries.record_shed(cursor, shed.addresses, shed.numbers)
    return inserted


def _check_schema(cursor: Any, path: str) -> None:
    found = queries.user_version(cursor)
    if found != queries.SCHEMA_VERSION:
        raise StorageError(
            path,
            f"schema version {found}, expected {queries.SCHEMA_VERSION} (prepare_database() must run first)",
        )


class Shed(NamedTuple):
    """Probes whose events the :class:`WriteQueue` shed, counted per address and per number
    (``value -> (probes, latest event_timestamp)``), for
    :func:`~sentrypeer.storage.queries.record_shed`."""

    addresses: dict[str, tuple[int, str]]
    numbers: dict[str, tuple[int, str]]


class IEventStore(Interface):
    """Where a :class:`WriteQueue` writes (a :class:`Database`, or a fake in tests)."""

    def insert_events(events: Sequence[BadActorEvent], shed: Shed | None = None) -> Deferred[int]:
        """Store *events* in one transaction, skipping already stored event_uuids, and add the
        *shed* counts (only given, and needed, when the queue has shed events) to the summaries.

        :returns: a Deferred firing with the number of rows inserted, or failing (nothing stored;
            :class:`~sentrypeer.storage.queries.InvalidEventError` names an event that can never
            be stored).
        """


@implementer(IEventStore)
class Database:
    """The SQLite database behind an ``adbapi.ConnectionPool`` of exactly one connection.

    ``cp_max=1``: SQLite allows one writer at a time, so several pool connections would only take
    turns on the file lock and fail with "database is locked" under load; one connection in one
    thread serialises all work instead (reads too, which are short). ``check_same_thread=False``
    because the pool opens the connection in its thread but closes it from the reactor thread.
    The connection uses WAL (readers in other processes, such as an operator's ``sqlite3`` shell,
    do not block us), ``synchronous=NORMAL``, ``busy_timeout`` :data:`BUSY_TIMEOUT_MS` and
    ``foreign_keys=ON`` (:func:`_configure`).

    The pool is created in :meth:`start`, not here, because creating one hooks it onto the reactor.

    A second pool of one connection, the reader (``PRAGMA query_only``), runs :meth:`run_read`: in
    WAL mode a reader never waits for the writer nor the writer for it, so the API's queries and
    the write queue's batches proceed side by side in their own threads (each releases the GIL
    while SQLite works).

    A third, the checkpointer, copies the WAL into the database file every
    :data:`CHECKPOINT_INTERVAL` seconds (``wal_checkpoint(PASSIVE)``). With SQLite's default the
    writer does it after a commit that takes the WAL past 1,000 pages, and then waits for the
    ``fsync`` while events queue up; here it checkpoints only past
    :data:`WRITER_CHECKPOINT_PAGES` pages, should the checkpointer fall behind. Durability is
    unchanged (``synchronous=NORMAL``: commits are not synced, checkpoints are).

    :param path: the database file, already prepared by :func:`prepare_database`.
    :param reactor: the reactor running the pool's thread (``IReactorCore`` and
        ``IReactorThreads``).
    """

    def __init__(self, path: str, reactor: Any) -> None:
        self.path = path
        self._reactor = reactor
        self._pool: adbapi.ConnectionPool | None = None
        self._read_pool: adbapi.ConnectionPool | None = None
        self._checkpoint_pool: adbapi.ConnectionPool | None = None
        self._checkpoint_call: IDelayedCall | None = None
        self._checkpoint_failed = False

    def start(self) -> Deferred[None]:
        """Create the pool and check the file's schema version.

        :returns: a Deferred firing with ``None``, or failing with
            :class:`~sentrypeer.storage.StorageError` (file not prepared) or :class:`sqlite3.Error`.
        """
        if self._pool is None:
            self._pool = self._new_pool(_configure_writer)
            self._read_pool = self._new_pool(_configure_reader)
            self._checkpoint_pool = self._new_pool(_configure_reader)
            self._schedule_checkpoint()
        return self._pool.runInteraction(_check_schema, self.path)

    def _new_pool(self, configure: Callable[[sqlite3.Connection], None]) -> adbapi.ConnectionPool:
        return adbapi.ConnectionPool(
            "sqlite3",
            self.path,
            check_same_thread=False,
            cp_min=1,
            cp_max=1,
            cp_openfun=configure,
            cp_reactor=self._reactor,
        )

    def _schedule_checkpoint(self) -> None:
        if self._checkpoint_pool is not None:
            self._checkpoint_call = self._reactor.callLater(CHECKPOINT_INTERVAL, self._checkpoint_tick)

    def _checkpoint_tick(self) -> None:
        self._checkpoint_call = None
        if self._checkpoint_pool is None:
            return
        d = self._checkpoint_pool.runInteraction(_checkpoint)
        d.addCallbacks(self._checkpoint_done, self._checkpoint_error)
        d.addErrback(lambda f: log.failure("Database checkpoint scheduling failed", f))

    def _checkpoint_done(self, _: object) -> None:
        self._checkpoint_failed = False
        self._schedule_checkpoint()

    def _checkpoint_error(self, failure: Failure) -> None:
        if not self._checkpoint_failed:  # once per episode: the writer checkpoints meanwhile
            log.warn("Database {path}: checkpoint failed: {error}", path=self.path,
                     error=failure.getErrorMessage())
        self._checkpoint_failed = True
        self._schedule_checkpoint()

    def close(self) -> Deferred[None]:
        """Close the pools (waits for interactions in progress). Calling it again does nothing."""
        if self._checkpoint_call is not None and self._checkpoint_call.active():
            self._checkpoint_call.cancel()
        self._checkpoint_call = None
        pools = (self._checkpoint_pool, self._read_pool, self._pool)
        self._pool = self._read_pool = self._checkpoint_pool = None
        for pool in pools:
            if pool is not None:
                pool.close()
        return succeed(None)

    def run_query(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Deferred[Any]:
        """Run ``fn(cursor, *args, **kwargs)`` in the pool's thread, in one transaction.

        *fn* is a :mod:`sentrypeer.storage.queries`-style function; it is committed when it returns
        and rolled back when it raises.

        :returns: a Deferred firing with what *fn* returns, or failing with what it raises
            (:class:`~sentrypeer.storage.StorageError` when the database is not started).
        """
        if self._pool is None:
            return fail(StorageError(self.path, "the database is not started"))
        return self._pool.runInteraction(fn, *args, **kwargs)

    def run_read(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Deferred[Any]:
        """Run the read-only ``fn(cursor, *args, **kwargs)`` on the reader connection, in its
        thread (writing raises :class:`sqlite3.OperationalError`).

        :returns: a Deferred firing with what *fn* returns, or failing with what it raises.
        """
        if self._read_pool is None:
            return fail(StorageError(self.path, "the database is not started"))
        return self._read_pool.runInteraction(fn, *args, **kwargs)

    def insert_events(self, events: Sequence[BadActorEvent], shed: Shed | None = None) -> Deferred[int]:
        """Insert *events* and count *shed* probes in one transaction
        (:func:`~sentrypeer.storage.queries.insert_events`,
        :func:`~sentrypeer.storage.queries.record_shed`).

        :returns: a Deferred firing with the number of new rows.
        """
        return self.run_query(_write, list(events), shed)

    def event_uuid_exists(self, event_uuid: str) -> Deferred[bool]:
        """Whether an event with *event_uuid* is stored."""
        return self.run_query(queries.event_uuid_exists, event_uuid)

    def count_events(self) -> Deferred[int]:
        """The number of stored events."""
        return self.run_query(queries.count_events)

    def prune_before(self, cutoff: str, batch_size: int = queries.PRUNE_BATCH_SIZE) -> Deferred[int]:
        """Delete the events older than *cutoff*, *batch_size* rows per transaction.

        Each batch is its own transaction, so writes of the :class:`WriteQueue` interleave and the
        write lock is never held for long. Cancelling the Deferred starts no further batch (the one
        in progress still completes in the pool's thread).

        :param cutoff: ``YYYY-MM-DD HH:MM:SS[.fraction]``, UTC (see
            :func:`~sentrypeer.storage.queries.prune_events_batch` for the comparison rules).
        :returns: a Deferred firing with the number of rows deleted.
        """
        return Deferred.fromCoroutine(self._prune(cutoff, batch_size))

    async def _prune(self, cutoff: str, batch_size: int) -> int:
        total = 0
        while True:
            deleted = await self.run_query(queries.prune_events_batch, cutoff, batch_size)
            total += deleted
            if deleted < batch_size:
                return total


# ---------------------------------------------------------------------------------------------
# The write queue


class _Entry(NamedTuple):
    event: BadActorEvent
    size: int
    #: 1-based position among accepted events (orders flush() waiters).
    seq: int


_new_entry = tuple.__new__  # builds an _Entry without the keyword-argument machinery


class WriteQueue:
    """Bounded FIFO of events on their way to the database, written in batches.

    :meth:`put` never blocks and never raises: the SIP and DHT code call it per event. Events are
    written in batches of up to *batch_size*, one transaction each, with at most one batch in
    flight. The first event after a quiet time is written at once (``callLater(0)``); after a
    batch, the next one starts at once if *batch_size* events are waiting (or someone waits in
    :meth:`flush`), else *batch_delay* seconds later, so that a steady flow is written in batches
    of hundreds: a transaction costs SQLite a fixed amount of page writes whatever its size, and
    writing events one or two at a time would cost several times the CPU per event.

    Load shedding loses nothing silently. When the queue is full (by count or bytes) the event is
    shed: it is not stored in ``honey``, but its probe is still counted, per source address and per
    called number, in the summary tables (``seen_count``, ``shed_count``, ``seen_last``; see
    :func:`~sentrypeer.storage.queries.record_shed`) by the next write transaction, and in
    ``dropped``. The counts waiting for that transaction are held in two tables of at most
    *max_shed_keys* distinct values each; a probe whose value finds its table full is counted in
    ``shed_overflow`` only (it happens when the database stalls while a flood of distinct sources
    goes on). The first shed event of an episode is logged at once, then the count of events shed
    since the previous line every :data:`SHED_REPORT_INTERVAL` seconds while shedding goes on,
    then one line when an interval passes without any (and :meth:`stop_reporting` logs what is
    left at shutdown): a bounded number of lines however long the overload lasts.

    A batch that fails is kept and retried after *retry_delay* seconds, doubling up to
    *max_retry_delay*: a transient error (SQLITE_BUSY, disk full, ...) delays events but never
    loses them. The first failure of a run is logged with its traceback, later ones in one line.
    Only an event that can never be stored
    (:class:`~sentrypeer.storage.queries.InvalidEventError`: a field of the wrong type) is taken out
    of its batch, logged and counted in ``rejected``; the rest of the batch is written at once.

    Counters (plain attributes, read by stats/manhole): ``queued`` (accepted), ``dropped`` (shed
    by :meth:`put`: not stored, counted in the summaries), ``shed_overflow`` (shed and not counted
    in a summary), ``written`` (in committed batches), ``inserted`` (new rows; ``written`` minus
    event_uuids already stored), ``rejected``, ``write_errors`` (failed attempts), ``batches``
    (committed transactions), ``depth`` and ``depth_bytes`` (accepted, not yet written, the batch in
    flight included).

    :param store: where to write (:class:`IEventStore`, normally a :class:`Database`).
    :param clock: schedules batches and retries.
    :param max_events: ``--write-queue-size``; :meth:`put` refuses events while ``depth`` is this.
    :param max_bytes: ``--write-queue-bytes``; :meth:`put` refuses an event that would take
        ``depth_bytes`` over this (an empty queue takes any one event).
    :param batch_size: most events per transaction.
    :param retry_delay: seconds before the first retry of a failed batch.
    :param max_retry_delay: longest wait between retries, seconds.
    :param on_written: called with the events of each committed batch, in order, after the commit;
        what it raises is logged and otherwise ignored.
    :param max_shed_keys: most distinct addresses, and numbers, whose shed counts wait for the
        next transaction.
    :param batch_delay: seconds between a batch and the next one when fewer than *batch_size*
        events wait.
    """

    def __init__(
        self,
        store: IEventStore,
        clock: IReactorTime,
        *,
        max_events: int = DEFAULT_WRITE_QUEUE_SIZE,
        max_bytes: int = DEFAULT_WRITE_QUEUE_BYTES,
        batch_size: int = DEFAULT_BATCH_SIZE,
        retry_delay: float = 1.0,
        max_retry_delay: float = 60.0,
        on_written: Callable[[list[BadActorEvent]], None] | None = None,
        max_shed_keys: int = DEFAULT_MAX_SHED_KEYS,
        batch_delay: float = 0.0,
    ) -> None:
        if max_events < 1 or max_bytes < 1 or batch_size < 1 or max_shed_keys < 1:
            raise ValueError("max_events, max_bytes, batch_size and max_shed_keys must be at least 1")
        self._store = store
        self._clock = clock
        self.max_events = max_events
        self.max_bytes = max_bytes
        self.batch_size = batch_size
        self.retry_delay = retry_delay
        self.max_retry_delay = max_retry_delay
        self.on_written = on_written
        self.max_shed_keys = max_shed_keys
        self.batch_delay = batch_delay

        self.queued = 0
        self.written = 0
        self.inserted = 0
        self.dropped = 0
        self.shed_overflow = 0
        self.rejected = 0
        self.write_errors = 0
        self.batches = 0
        self.depth_bytes = 0

        self._pending: collections.deque[_Entry] = collections.deque()
        #: The batch being written, or waiting for its retry, and the shed counts going with it.
        self._batch: list[_Entry] = []
        self._batch_shed: Shed | None = None
        #: Shed counts not yet in a batch: value -> [probes, latest event_timestamp].
        self._shed_addresses: dict[str, list] = {}
        self._shed_numbers: dict[str, list] = {}
        self._in_flight = False
        self._call: IDelayedCall | None = None
        #: Whether _call is a batch_delay wait (ended early by a full batch or flush()).
        self._delayed = False
        self._failures = 0
        #: Shed events not yet in a log line, and the call that will log them.
        self._shed_unreported = 0
        self._shed_report_call: IDelayedCall | None = None
        #: (seq of the last event to wait for, Deferred), in seq order.
        self._waiters: collections.deque[tuple[int, Deferred[None]]] = collections.deque()

    @property
    def depth(self) -> int:
        """Accepted events not yet written (the batch in flight included)."""
        return len(self._pending) + len(self._batch)

    def put(self, event: BadActorEvent) -> bool:
        """Queue *event* for writing. O(1); never blocks, never raises.

        :returns: ``True`` if accepted; ``False`` if shed because the queue is full (by count or
            bytes): counted in ``dropped`` and in the summaries (see the class docstring).
        """
        try:
            size = event.size_hint()
            depth = len(self._pending) + len(self._batch)
            if depth >= self.max_events or (depth and self.depth_bytes + size > self.max_bytes):
                self._shed(event, depth)
                return False
            self.queued += 1
            pending = self._pending
            pending.append(_new_entry(_Entry, (event, size, self.queued)))
            self.depth_bytes += size
            if self._call is None:
                if not self._in_flight:
                    self._schedule(0)
            elif self._delayed and len(pending) >= self.batch_size:
                self._reschedule_now()
            return True
        except Exception:
            self.dropped += 1
            log.failure("Write queue refused an event it could not handle")
            return False

    def _shed(self, event: BadActorEvent, depth: int) -> None:
        """Count *event* as shed: in ``dropped``, and per address and number for the summaries."""
        self.dropped += 1
        if self._shed_report_call is None:
            # The first shed event of an episode: one line now, then one report per interval
            # while shedding goes on (the queue flips between full and not full with every
            # batch under sustained overload: a line per flip would be dozens a second).
            log.warn(
                "Write queue full ({depth} events, {size} bytes): shedding events (not stored, "
                "but their probes still counted per address and number); reporting every "
                "{interval:g} s until it stops",
                depth=depth,
                size=self.depth_bytes,
                interval=SHED_REPORT_INTERVAL,
            )
            self._shed_report_call = self._clock.callLater(SHED_REPORT_INTERVAL, self._report_shed)
        else:
            self._shed_unreported += 1
        stamp = event.event_timestamp
        counted = self._count_shed(self._shed_addresses, event.source_ip, stamp)
        number = event.called_number
        if is_number(number):
            counted = self._count_shed(self._shed_numbers, number, stamp) and counted
        if not counted:
            self.shed_overflow += 1
        if self._call is None and not self._in_flight:
            self._schedule(0)

    def _report_shed(self) -> None:
        """Log the events shed since the last line; end the episode after a quiet interval."""
        count, self._shed_unreported = self._shed_unreported, 0
        if count:
            log.warn(
                "Write queue: {count} more events shed in the last {interval:g} s ({total} since "
                "start; counted per address and number)",
                count=count,
                interval=SHED_REPORT_INTERVAL,
                total=self.dropped,
            )
            self._shed_report_call = self._clock.callLater(SHED_REPORT_INTERVAL, self._report_shed)
        else:
            self._shed_report_call = None
            log.info("Write queue: no events shed for {interval:g} s ({total} shed since start)",
                     interval=SHED_REPORT_INTERVAL, total=self.dropped)

    def stop_reporting(self) -> None:
        """Cancel the pending shedding report and log what it would have said (at shutdown)."""
        call, self._shed_report_call = self._shed_report_call, None
        if call is not None and call.active():
            call.cancel()
        count, self._shed_unreported = self._shed_unreported, 0
        if count:
            log.warn("Write queue: {count} more events shed before stopping ({total} since start)",
                     count=count, total=self.dropped)

    def _count_shed(self, table: dict[str, list], key: str, stamp: str) -> bool:
        entry = table.get(key)
        if entry is not None:
            entry[0] += 1
            if stamp > entry[1]:
                entry[1] = stamp
            return True
        if len(table) >= self.max_shed_keys:
            return False
        table[key] = [1, stamp]
        return True

    def flush(self) -> Deferred[None]:
        """Wait until every event accepted before this call is written (or rejected), and the
        shed counts so far are in the summaries.

        A batch waiting for its retry is retried at once. Cancelling the Deferred stops waiting
        (nothing is discarded).

        :returns: a Deferred firing with ``None``.
        """
        target = self.queued
        if self._oldest_unfinished() > target:
            return succeed(None)
        d: Deferred[None] = Deferred(lambda d: self._waiters.remove((target, d)))
        self._waiters.append((target, d))
        if (self._failures or self._delayed) and not self._in_flight and self._call is not None:
            self._reschedule_now()
        return d

    def stats(self) -> dict[str, int]:
        """The counters, as a new dict."""
        names = (
            "queued", "written", "inserted", "dropped", "shed_overflow", "rejected", "write_errors",
            "batches",
        )
        out = {name: getattr(self, name) for name in names}
        out["depth"] = self.depth
        out["depth_bytes"] = self.depth_bytes
        return out

    # -- internals

    def _shed_pending(self) -> bool:
        return bool(self._shed_addresses or self._shed_numbers or self._batch_shed is not None)

    def _oldest_unfinished(self) -> int:
        if self._batch:
            return self._batch[0].seq
        if self._pending:
            return self._pending[0].seq
        if self._shed_pending():
            return self.queued  # only shed counts left: flush() waits for them too
        return self.queued + 1

    def _schedule(self, delay: float, delayed: bool = False) -> None:
        if self._in_flight or self._call is not None:
            return
        if not (self._batch or self._pending or self._shed_pending()):
            return
        self._delayed = delayed
        self._call = self._clock.callLater(delay, self._write_batch)

    def _reschedule_now(self) -> None:
        if self._call is not None:
            self._call.cancel()
            self._call = None
        self._schedule(0)

    def _write_batch(self) -> None:
        self._call = None
        self._delayed = False
        if not self._batch and self._batch_shed is None:
            count = min(self.batch_size, len(self._pending))
            pending = self._pending
            self._batch = [pending.popleft() for _ in range(count)]
            if self._shed_addresses or self._shed_numbers:
                self._batch_shed = Shed(
                    {k: (v[0], v[1]) for k, v in self._shed_addresses.items()},
                    {k: (v[0], v[1]) for k, v in self._shed_numbers.items()},
                )
                self._shed_addresses = {}
                self._shed_numbers = {}
        if not self._batch and self._batch_shed is None:
            return
        self._in_flight = True
        events = [entry.event for entry in self._batch]
        if self._batch_shed is None:
            d = maybeDeferred(self._store.insert_events, events)
        else:
            d = maybeDeferred(self._store.insert_events, events, self._batch_shed)
        d.addCallbacks(self._batch_written, self._batch_failed)
        d.addErrback(lambda f: log.failure("Write queue internal error", f))

    def _batch_written(self, inserted: int) -> None:
        batch, self._batch = self._batch, []
        self._batch_shed = None
        self._in_flight = False
        self.batches += 1
        self.written += len(batch)
        self.inserted += inserted
        self.depth_bytes -= sum(entry.size for entry in batch)
        if self._failures:
            log.info(
                "Write queue: {count} events written after {failures} failed attempts",
                count=len(batch),
                failures=self._failures,
            )
            self._failures = 0
        if self.on_written is not None and batch:
            try:
                self.on_written([entry.event for entry in batch])
            except Exception:
                log.failure("Write queue: the on_written hook failed")
        self._wake_waiters()
        if self.batch_delay and len(self._pending) < self.batch_size and not self._waiters:
            self._schedule(self.batch_delay, delayed=True)
        else:
            self._schedule(0)

    def _batch_failed(self, failure: Failure) -> None:
        self._in_flight = False
        error = failure.value
        if isinstance(error, queries.InvalidEventError) and 0 <= error.index < len(self._batch):
            entry = self._batch.pop(error.index)
            self.rejected += 1
            self.depth_bytes -= entry.size
            log.error(
                "Write queue: event {uuid} cannot be stored and is discarded: {reason}",
                uuid=getattr(entry.event, "event_uuid", "?"),
                reason=error.reason,
            )
            self._wake_waiters()
            self._schedule(0)
            return
        self.write_errors += 1
        self._failures += 1
        delay = min(self.max_retry_delay, self.retry_delay * 2 ** (self._failures - 1))
        if self._failures == 1 and not failure.check(sqlite3.Error):
            # Not a database condition (locked, disk full...): a bug, so keep the traceback.
            log.failure(
                "Write queue: writing {count} events failed; retrying in {delay} s",
                failure,
                count=len(self._batch),
                delay=delay,
            )
        else:
            log.warn(
                "Write queue: writing {count} events failed (attempt {failures}): "
                "{error}; retrying in {delay} s",
                count=len(self._batch),
                failures=self._failures,
                error=failure.getErrorMessage(),
                delay=delay,
            )
        self._schedule(delay)

    def _wake_waiters(self) -> None:
        oldest = self._oldest_unfinished()
        while self._waiters and self._waiters[0][0] < oldest:
            _, d = self._waiters.popleft()
            d.callback(None)


# ---------------------------------------------------------------------------------------------
# The service


def retention_cutoff(now: float, retention_days: float) -> str:
    """The ``event_timestamp`` before which events are older than *retention_days* days.

    :param now: seconds since the epoch (``clock.seconds()``).
    :param retention_days: days to keep, more than 0.
    :returns: a UTC timestamp string (:func:`sentrypeer.events.format_timestamp`).
    """
    return format_timestamp(round((now - retention_days * 86400) * 1_000_000_000))


class DatabaseService(Service):
    """Owns the :class:`Database` and its :class:`WriteQueue`; prunes old events.

    :func:`prepare_database` is run by the root service before this starts; the root stores the
    node id it returns in :attr:`node_id`. :meth:`startService` starts the pool (a failure is
    logged); :meth:`stopService` writes out the queue, then closes the pool, and its Deferred fires
    when both are done. Stop this service after the SIP listeners and the DHT, which feed it.

    Retention (``--retention-days``, interface.md §2): when *retention_days* is more than 0, events
    older than that are deleted *prune_delay* seconds after start, then *prune_interval* seconds
    after each prune ends (so runs never overlap); the cutoff is computed in UTC from *clock*.
    Errors are logged, and the next run is scheduled anyway.

    :param path: the database file (``--db-file``), already prepared.
    :param reactor: runs the pool (see :class:`Database`); also the clock unless *clock* is given.
    :param clock: schedules batches, retries and prunes (default: *reactor*).
    :param database: use this instead of ``Database(path, reactor)`` (tests); its ``path``,
        ``start``, ``close``, ``insert_events`` and ``prune_before`` are used.
    :param retention_days: days to keep events; 0 keeps them forever.
    :param max_events: ``--write-queue-size``.
    :param max_bytes: ``--write-queue-bytes``.
    :param batch_size: events per transaction.
    :param batch_delay: see :class:`WriteQueue`.
    :param on_written: see :class:`WriteQueue`.
    :param prune_interval: seconds between prunes.
    :param prune_delay: seconds from start to the first prune.
    :param flush_timeout: longest wait, in seconds, for the queue at stop (``None``: no limit);
        events still unwritten then (the database kept failing) are logged as lost.
    """

    name = "database"

    #: This node's persistent id, set by the root service from :func:`prepare_database`.
    node_id: str | None = None

    def __init__(
        self,
        path: str,
        *,
        reactor: Any,
        clock: IReactorTime | None = None,
        database: Database | None = None,
        retention_days: float = 0,
        max_events: int = DEFAULT_WRITE_QUEUE_SIZE,
        max_bytes: int = DEFAULT_WRITE_QUEUE_BYTES,
        batch_size: int = DEFAULT_BATCH_SIZE,
        batch_delay: float = DEFAULT_BATCH_DELAY,
        on_written: Callable[[list[BadActorEvent]], None] | None = None,
        prune_interval: float = 3600.0,
        prune_delay: float = 60.0,
        flush_timeout: float | None = 30.0,
    ) -> None:
        self.database = database if database is not None else Database(path, reactor)
        self.clock = clock if clock is not None else reactor
        self.retention_days = retention_days
        self.prune_interval = prune_interval
        self.prune_delay = prune_delay
        self.flush_timeout = flush_timeout
        self.queue = WriteQueue(
            self.database,
            self.clock,
            max_events=max_events,
            max_bytes=max_bytes,
            batch_size=batch_size,
            batch_delay=batch_delay,
            on_written=on_written,
        )
        self._prune_lock = DeferredLock()
        self._prune_call: IDelayedCall | None = None
        self._pruning: Deferred[int] | None = None

    def put(self, event: BadActorEvent) -> bool:
        """Queue *event* for writing: :meth:`WriteQueue.put`."""
        return self.queue.put(event)

    def startService(self) -> None:
        super().startService()
        d = self.database.start()
        d.addErrback(lambda f: log.failure("Database {path} failed to start", f, path=self.database.path))
        if self.retention_days > 0:
            self._schedule_prune(self.prune_delay)

    def stopService(self) -> Deferred[None]:
        super().stopService()
        if self._prune_call is not None:
            self._prune_call.cancel()
            self._prune_call = None
        if self._pruning is not None:
            self._pruning.cancel()
        self.queue.stop_reporting()
        d = self.queue.flush()
        if self.flush_timeout is not None:
            d.addTimeout(self.flush_timeout, self.clock)
        d.addErrback(self._flush_failed)
        d.addCallback(lambda _: self.database.close())
        d.addErrback(lambda f: log.failure("Closing the database failed", f))
        return d

    def _flush_failed(self, failure: Failure) -> None:
        if failure.check(TimeoutError):
            log.error(
                "Database {path}: gave up after {timeout} s; {count} events were not written",
                path=self.database.path,
                timeout=self.flush_timeout,
                count=self.queue.depth,
            )
        else:
            log.failure("Database: flushing the write queue failed", failure)

    def prune(self) -> Deferred[int]:
        """Delete the events older than ``retention_days`` now, after any prune in progress.

        :returns: a Deferred firing with the number of rows deleted.
        :raises ValueError: (as a failed Deferred) when ``retention_days`` is not more than 0.
        """
        if not self.retention_days > 0:
            return fail(ValueError("retention is off (retention_days is 0)"))
        return self._prune_lock.run(self._prune_now)

    def _prune_now(self) -> Deferred[int]:
        cutoff = retention_cutoff(self.clock.seconds(), self.retention_days)
        d = self.database.prune_before(cutoff)
        self._pruning = d

        def done(result: int | Failure) -> int | Failure:
            self._pruning = None
            if isinstance(result, int) and result:
                log.info(
                    "Database: pruned {count} events older than {cutoff}",
                    count=result,
                    cutoff=cutoff,
                )
            return result

        return d.addBoth(done)

    def _schedule_prune(self, delay: float) -> None:
        self._prune_call = self.clock.callLater(delay, self._prune_tick)

    def _prune_tick(self) -> None:
        self._prune_call = None
        d = self.prune()

        def failed(failure: Failure) -> None:
            if not failure.check(CancelledError):
                log.failure("Database: pruning old events failed", failure)

        def next_run(_: object) -> None:
            if self.running:
                self._schedule_prune(self.prune_interval)

        d.addErrback(failed)
        d.addCallback(next_run)
        d.addErrback(lambda f: log.failure("Database: scheduling the next prune failed", f))
