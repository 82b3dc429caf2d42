"""DHTService: owns the OpenDHT worker process, publishes our events, stores peers' events.

Modelled on :class:`twisted.runner.procmon.ProcessMonitor`, for one process that speaks
:mod:`sentrypeer.dht.protocol`:

* **start**: ``reactor.spawnProcess`` of ``python -m sentrypeer.dht.worker`` (same interpreter).
  No OpenDHT code ever runs in the honeypot's process (guides/opendht-notes.md).
* **restart**: when the child ends (crash, ``abort()`` in the binding, SIGKILL) it is started again
  after a delay that doubles from *min_restart_delay* to *max_restart_delay* while it keeps dying
  within *restart_threshold* seconds, and is back to the minimum after a child that lived longer.
  A child that says nothing for *silence_timeout* seconds (it sends a heartbeat every *heartbeat*
  seconds), or is not ready after *start_timeout*, is killed with SIGKILL and restarted: that is how
  the binding's deadlocks (opendht-notes §4.2) are survived. A worker that cannot import ``opendht``
  is not restarted.
* **stop**: a ``stop`` message and stdin closed; SIGKILL after *stop_grace* seconds; the Deferred
  fires when the process has ended (or *kill_wait* seconds after the SIGKILL, whatever happens).
* **publish** (the service is a pipeline output, ``service(event, replicated)``): collected events
  only (replicated ones are never re-put, reference §9), at most *put_rate* per second (a token
  bucket holding at most ``max(1, put_rate)`` tokens); events beyond are stored locally as always,
  not published, and counted (``not_published_rate``). Accepted events wait in a backlog of at most
  *max_backlog* (also while the child restarts; ``not_published_backlog`` beyond) and at most
  *max_in_flight* puts are outstanding at the child; a put without an answer after *put_timeout*
  seconds is forgotten (``put_timeouts``). Value bytes: :func:`sentrypeer.dht.validate.encode_value`
  (60 KiB at most, signed with ``--dht-sign``).
* **re-publish after a restart**: a "permanent" put is refreshed only by the child that made it, so
  when a child dies its values leave the network within OpenDHT's value lifetime (10 minutes). The
  service keeps a bounded record (*max_recorded* values, *max_recorded_bytes* bytes) of the values it
  published in the last *republish_window* seconds, and when a new child is ready, it puts them again
  (``republished``), except those still waiting in the backlog. Puts that a child answered with a
  failure before it had bootstrapped (its last ``stats`` did not say ``bootstrap_ok``) are put again
  on the next child too, whatever their age (bounded by *max_recorded*). Re-puts wait in their own
  queue of at most *max_backlog* (``not_republished_backlog`` beyond) and share the token bucket,
  always leaving one token to new events when the bucket holds two or more.
* **receive**: every value goes through :func:`sentrypeer.dht.validate.check_value`, then the
  ``event_uuid`` duplicate check: first against the ids seen recently in memory, then in the
  database (one query per batch of up to :data:`CHECK_BATCH`). New events go to
  :meth:`sentrypeer.pipeline.EventPipeline.submit_replicated`, which stores them (``INSERT OR
  IGNORE`` on the unique ``event_uuid`` index, so even a race cannot store one twice) and hands them
  to the JSON log and webhook (syslog only with ``--syslog-peers``). Refused values are counted by
  reason (:attr:`DHTService.rejected`) and logged at most once a minute per reason, with how many
  were not logged; duplicates, and our own values coming back (``own_values`` when this run
  published them, ``rejected_own_node_id`` otherwise, e.g. stored by the run before a restart),
  only at debug level.
"""

from __future__ import annotations

import collections
import os
import sys
from collections.abc import Sequence
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from sentrypeer.dht import (
    EXIT_NO_OPENDHT,
    WORKER_MODULE,
    DHTStartupError,
    bind_addresses,
    check_udp_port,
    require_opendht,
    signing,
    validate,
)
from sentrypeer.dht.protocol import DHTProcessProtocol, IDHTHandler
from sentrypeer.events import BadActorEvent, escape_for_log
from sentrypeer.storage import queries

log = Logger(namespace="sentrypeer.dht")

#: Reasons counted by the service itself, next to :data:`sentrypeer.dht.validate.REASONS`.
DUPLICATE = "duplicate"
BACKLOG = "backlog"
#: Reasons logged only at debug level (expected in normal operation).
QUIET_REASONS = frozenset({DUPLICATE, validate.OWN_NODE_ID})
#: Seconds between two log lines about the same rejection reason.
REJECT_LOG_INTERVAL = 60.0
#: Event ids per database duplicate-check query.
CHECK_BATCH = 500
#: Event ids remembered in memory for the duplicate check (received and published).
RECENT_IDS = 100_000
PUBLISHED_IDS = 10_000
#: OpenDHT's value lifetime: our values younger than this are put again by a new child.
REPUBLISH_WINDOW = 600.0


def _stored_uuids(cursor: Any, uuids: Sequence[str]) -> set[str]:
    """Which of *uuids* the database already holds (runs in the database thread)."""
    return {uuid for uuid in uuids if queries.event_uuid_exists(cursor, uuid)}


def worker_environment(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The child's environment: ours, with this package's directory first on ``PYTHONPATH`` so
    ``python -m sentrypeer.dht.worker`` imports the same code from a checkout or an install."""
    env = dict(os.environ if environ is None else environ)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    paths = [root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != root]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env.pop("PYTHONSTARTUP", None)
    return env


class _BoundedSet:
    """Insertion-ordered set that forgets its oldest members beyond *limit*."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._items: collections.OrderedDict[str, None] = collections.OrderedDict()

    def add(self, item: str) -> None:
        self._items[item] = None
        self._items.move_to_end(item)
        while len(self._items) > self.limit:
            self._items.popitem(last=False)

    def __contains__(self, item: object) -> bool:
        return item in self._items

    def __len__(self) -> int:
        return len(self._items)


@implementer(IDHTHandler)
class DHTService(Service):
    """Runs the DHT worker and connects it to the event pipeline.

    :param reactor: ``IReactorProcess`` (spawns the worker) and ``IReactorTime``.
    :param pipeline: an :class:`~sentrypeer.pipeline.EventPipeline` (``submit_replicated``).
    :param database: a :class:`~sentrypeer.storage.database.Database` (``run_query``), for the
        duplicate check.
    :param node_id: this node's persistent id (values claiming it are refused).
    :param worker_args: the worker's command-line options (see :func:`build_dht_service`).
    :param command: the whole child command line, replacing the worker (tests run fakes).
    :param env: the child's environment (default :func:`worker_environment`).
    :param clock: timers (default *reactor*).
    :param put_rate: most puts per second (``--dht-put-rate``).
    :param private_key: sign our values with it (``--dht-sign``), or ``None``.
    :param trusted_keys: accept only values signed by one of these (``--dht-trusted-nodes``).
    :param value_cap: most bytes per value put.
    :param heartbeat: seconds between the worker's heartbeats (passed to it).

    The other parameters are in seconds or counts, as the module docstring describes.
    """

    name = "dht"

    def __init__(
        self,
        *,
        reactor: Any,
        pipeline: Any,
        database: Any,
        node_id: str,
        worker_args: Sequence[str] = (),
        command: Sequence[str] | None = None,
        env: dict[str, str] | None = None,
        clock: Any = None,
        put_rate: float = 10.0,
        max_in_flight: int = 32,
        max_backlog: int = 1000,
        private_key: Any = None,
        trusted_keys: Sequence[Any] = (),
        value_cap: int = validate.PUT_VALUE_CAP,
        heartbeat: float = 5.0,
        silence_timeout: float = 30.0,
        start_timeout: float = 60.0,
        min_restart_delay: float = 1.0,
        max_restart_delay: float = 60.0,
        restart_threshold: float = 60.0,
        stop_grace: float = 10.0,
        kill_wait: float = 5.0,
        put_timeout: float = 120.0,
        max_pending_checks: int = 10_000,
        max_pending_bytes: int = 16 * 1024 * 1024,
        republish_window: float = REPUBLISH_WINDOW,
        max_recorded: int = 10_000,
        max_recorded_bytes: int = 32 * 1024 * 1024,
    ) -> None:
        self.reactor = reactor
        self.clock = clock if clock is not None else reactor
        self.pipeline = pipeline
        self.database = database
        self.node_id = node_id
        if command is None:
            command = [sys.executable, "-m", WORKER_MODULE, *worker_args, "--heartbeat", str(heartbeat)]
        self.command = list(command)
        self.env = env if env is not None else worker_environment()
        self.put_rate = put_rate
        self.max_in_flight = max_in_flight
        self.max_backlog = max_backlog
        self.private_key = private_key
        self.trusted_keys = list(trusted_keys)
        self.value_cap = value_cap
        self.silence_timeout = silence_timeout
        self.start_timeout = start_timeout
        self.min_restart_delay = min_restart_delay
        self.max_restart_delay = max_restart_delay
        self.restart_threshold = restart_threshold
        self.stop_grace = stop_grace
        self.kill_wait = kill_wait
        self.put_timeout = put_timeout
        self.max_pending_checks = max_pending_checks
        self.max_pending_bytes = max_pending_bytes
        self.republish_window = republish_window
        self.max_recorded = max_recorded
        self.max_recorded_bytes = max_recorded_bytes

        #: Counters for logs, the manhole and tests.
        self.counts: collections.Counter[str] = collections.Counter()
        #: Refused values by reason.
        self.rejected: collections.Counter[str] = collections.Counter()
        #: The last ``ready`` and ``stats`` messages of the worker.
        self.child_info: dict[str, Any] = {}
        self.child_counters: dict[str, Any] = {}
        self.ready = False
        self.restarts = 0
        self.protocol: DHTProcessProtocol | None = None
        self.process: Any = None

        self._delay = min_restart_delay
        self._started_at = 0.0
        self._last_heard = 0.0
        self._restart_call: Any = None
        self._watchdog: LoopingCall | None = None
        self._stopping = False
        self._killed = False
        self._stop_waiters: list[defer.Deferred] = []
        self._kill_call: Any = None
        self._give_up_call: Any = None

        self._tokens = max(1.0, put_rate)
        self._refilled = self.clock.seconds()
        self._backlog: collections.deque[tuple[str, bytes]] = collections.deque()
        self._in_flight: dict[int, tuple[float, str, bytes]] = {}
        self._next_id = 1
        self._published = _BoundedSet(PUBLISHED_IDS)
        #: Values published recently: event_uuid -> (when, bytes), oldest first.
        self._record: collections.OrderedDict[str, tuple[float, bytes]] = collections.OrderedDict()
        self._record_bytes = 0
        #: Puts answered with a failure by a child that had not bootstrapped: event_uuid -> bytes.
        self._unconfirmed: collections.OrderedDict[str, bytes] = collections.OrderedDict()
        #: Re-puts waiting for a token: (event_uuid, bytes).
        self._republish: collections.deque[tuple[str, bytes]] = collections.deque()

        self._recent = _BoundedSet(RECENT_IDS)
        self._pending: list[BadActorEvent] = []
        self._pending_bytes = 0
        self._checking = False
        self._reject_logged: dict[str, float] = {}
        self._reject_unlogged: collections.Counter[str] = collections.Counter()

    # -- life ---------------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._stopping = False
        interval = max(0.05, min(1.0, self.silence_timeout / 4))
        self._watchdog = LoopingCall(self._check)
        self._watchdog.clock = self.clock
        self._watchdog.start(interval, now=False).addErrback(
            lambda f: log.failure("DHT watchdog failed", f)
        )
        self._spawn()

    def _spawn(self) -> None:
        self._restart_call = None
        if not self.running or self.protocol is not None:
            return
        protocol = DHTProcessProtocol(self, self.clock)
        self.protocol = protocol
        self.ready = False
        self._killed = False
        self._started_at = self._last_heard = self.clock.seconds()
        try:
            self.process = self.reactor.spawnProcess(
                protocol, self.command[0], self.command, env=self.env,
                childFDs={0: "w", 1: "r", 2: "r"},
            )
        except Exception:
            log.failure("cannot start the DHT worker {command}", command=" ".join(self.command))
            self.protocol = None
            self.process = None
            self._schedule_restart(self._started_at)

    def _schedule_restart(self, started_at: float) -> None:
        if not self.running or self._stopping:
            return
        if self.clock.seconds() - started_at >= self.restart_threshold:
            self._delay = self.min_restart_delay
        delay = self._delay
        self._delay = min(self._delay * 2, self.max_restart_delay)
        self.restarts += 1
        self._restart_call = self.clock.callLater(delay, self._spawn)
        log.info("DHT worker restarting in {delay:.1f} s", delay=delay)

    def _kill(self) -> None:
        self._killed = True
        if self.process is None:
            return
        try:
            self.process.signalProcess("KILL")
        except ProcessExitedAlready:
            pass
        except OSError:
            log.failure("cannot kill the DHT worker")

    def _check(self) -> None:
        """Every watchdog tick: kill a silent worker, forget puts without an answer."""
        now = self.clock.seconds()
        if self.protocol is not None and not self._killed and not self._stopping:
            limit = self.silence_timeout if self.ready else self.start_timeout
            silent = now - self._last_heard
            if silent > limit:
                self.counts["silent_kills"] += 1
                log.warn(
                    "DHT worker {what} for {seconds:.0f} s; killing it",
                    what="silent" if self.ready else "not ready",
                    seconds=silent,
                )
                self._kill()
        for put_id, (sent, _uuid, _data) in list(self._in_flight.items()):
            if now - sent > self.put_timeout:
                del self._in_flight[put_id]
                self.counts["put_timeouts"] += 1
        self._pump()

    def stopService(self) -> defer.Deferred:
        """Stop the worker: ``stop``, then SIGKILL after *stop_grace* seconds.

        :returns: a Deferred that fires once the process has ended (it never fails).
        """
        super().stopService()
        self._stopping = True
        if self._watchdog is not None and self._watchdog.running:
            self._watchdog.stop()
        if self._restart_call is not None and self._restart_call.active():
            self._restart_call.cancel()
        self._restart_call = None
        dropped = len(self._pending)
        self._pending.clear()
        self._pending_bytes = 0
        if dropped:
            self.counts["not_stored_at_stop"] += dropped
        if self.protocol is None:
            self._log_summary()
            return defer.succeed(None)
        d: defer.Deferred = defer.Deferred()
        self._stop_waiters.append(d)
        if len(self._stop_waiters) == 1:
            if not self.protocol.send_stop():
                self._kill()
            self._kill_call = self.clock.callLater(self.stop_grace, self._grace_over)
        return d

    def _grace_over(self) -> None:
        self._kill_call = None
        log.warn("DHT worker did not stop within {grace} s; killing it", grace=self.stop_grace)
        self.counts["stop_kills"] += 1
        self._kill()
        self._give_up_call = self.clock.callLater(self.kill_wait, self._give_up)

    def _give_up(self) -> None:
        self._give_up_call = None
        log.error("DHT worker pid {pid} did not end after SIGKILL", pid=getattr(self.process, "pid", None))
        self._stopped()

    def _stopped(self) -> None:
        for call in (self._kill_call, self._give_up_call):
            if call is not None and call.active():
                call.cancel()
        self._kill_call = self._give_up_call = None
        waiters, self._stop_waiters = self._stop_waiters, []
        self._log_summary()
        for d in waiters:
            d.callback(None)

    def _log_summary(self) -> None:
        log.info(
            "DHT stopped: published={published} not_published={not_published} received={received} "
            "accepted={accepted} refused={refused} restarts={restarts}",
            published=self.counts["puts_sent"],
            not_published=self.counts["not_published_rate"] + self.counts["not_published_backlog"],
            received=self.counts["values_received"],
            accepted=self.counts["accepted"],
            refused=sum(self.rejected.values()),
            restarts=self.restarts,
        )

    # -- IDHTHandler ----------------------------------------------------------------------------

    def child_heard(self) -> None:
        self._last_heard = self.clock.seconds()

    def child_ready(self, info: dict[str, Any]) -> None:
        self.ready = True
        self.child_info = info
        log.info(
            "DHT node running: UDP port {port}, routing id {node}, OpenDHT {version}{mode}",
            port=info.get("port"),
            node=escape_for_log(str(info.get("node_id")), 64),
            version=escape_for_log(str(info.get("version") or "unknown"), 32),
            mode=_mode_note(info),
        )
        if info.get("ipv6") is False:
            log.warn("DHT node has no IPv6 socket: OpenDHT may need to be killed at stop")
        self._queue_republish()
        self._pump()

    def child_stats(self, stats: dict[str, Any]) -> None:
        self.child_counters = stats
        if stats.get("bootstrap_ok") is True:
            # This child is on the network now: its permanent puts reach it (re-put if it dies
            # while they are recent, from the record).
            self._unconfirmed.clear()

    def child_log(self, level: str, message: str) -> None:
        text = escape_for_log(message, 500)
        getattr(log, level)("DHT worker: {message}", message=text)

    def child_put_done(self, put_id: int, ok: bool, nodes: int) -> None:
        entry = self._in_flight.pop(put_id, None)
        if entry is None:
            return
        self.counts["puts_ok" if ok else "puts_unconfirmed"] += 1
        if not ok and self.child_counters.get("bootstrap_ok") is not True:
            # Stored by a child that is not on the network (yet): if it dies before it gets
            # there, the value is nowhere else. Kept for the next child.
            _sent, uuid, data = entry
            self._unconfirmed[uuid] = data
            self._unconfirmed.move_to_end(uuid)
            while len(self._unconfirmed) > self.max_recorded:
                self._unconfirmed.popitem(last=False)
        self._pump()

    def child_ended(self, protocol: DHTProcessProtocol, reason: Failure) -> None:
        if protocol is not self.protocol:
            return
        self.protocol = None
        self.process = None
        self.ready = False
        self.child_counters = {}
        self._requeue_in_flight()
        if self._stopping:
            self._stopped()
            return
        code = getattr(reason.value, "exitCode", None)
        sig = getattr(reason.value, "signal", None)
        lived = self.clock.seconds() - self._started_at
        if code == EXIT_NO_OPENDHT:
            log.critical("DHT worker cannot import opendht; peer-to-peer sharing is off")
            return
        self.counts["worker_exits"] += 1
        log.warn(
            "DHT worker ended ({how}) after {lived:.1f} s",
            how=f"signal {sig}" if sig is not None else f"exit status {code}",
            lived=lived,
        )
        self._schedule_restart(self._started_at)

    def child_value(self, data: bytes) -> None:
        if not self.running:
            return
        self.counts["values_received"] += 1
        result = validate.check_value(data, self.node_id, self.trusted_keys)
        if isinstance(result, validate.Rejected):
            if result.reason == validate.OWN_NODE_ID and result.event_uuid in self._published:
                self.counts["own_values"] += 1
                return
            self._reject(result.reason, result.detail)
            return
        event = result.event
        if event.event_uuid in self._recent:
            self._reject(DUPLICATE, event.event_uuid)
            return
        size = event.size_hint()
        full = len(self._pending) >= self.max_pending_checks
        if full or self._pending_bytes + size > self.max_pending_bytes:
            self._reject(BACKLOG, event.event_uuid)
            return
        self._recent.add(event.event_uuid)
        self._pending.append(event)
        self._pending_bytes += size
        if not self._checking:
            self._check_batch()

    # -- receiving ------------------------------------------------------------------------------

    def _check_batch(self) -> None:
        if not self._pending:
            self._checking = False
            return
        self._checking = True
        batch = self._pending[:CHECK_BATCH]
        del self._pending[:CHECK_BATCH]
        try:
            d = self.database.run_query(_stored_uuids, [event.event_uuid for event in batch])
        except Exception:
            d = defer.fail()
        d.addErrback(self._check_failed)
        d.addCallback(self._store, batch)
        d.addErrback(lambda f: log.failure("storing events from the DHT failed", f))
        d.addBoth(lambda _: self._check_batch())

    def _check_failed(self, failure: Failure) -> set[str]:
        # As the original (reference §9 step 6): a failed check counts as "not stored"; the
        # unique event_uuid index still keeps a second copy out of the table.
        self.counts["check_failures"] += 1
        if self.counts["check_failures"] == 1:
            log.failure("DHT duplicate check failed (further failures only counted)", failure)
        return set()

    def _store(self, stored: set[str], batch: list[BadActorEvent]) -> None:
        for event in batch:
            self._pending_bytes -= event.size_hint()
            if not self.running:
                self.counts["not_stored_at_stop"] += 1
                continue
            if event.event_uuid in stored:
                self._reject(DUPLICATE, event.event_uuid)
                continue
            self.counts["accepted"] += 1
            log.debug(
                "DHT: event {uuid} from node {node}: {method} from {source}",
                uuid=event.event_uuid,
                node=event.created_by_node_id,
                method=escape_for_log(event.sip_method, 32),
                source=event.source_ip,
            )
            if not self.pipeline.submit_replicated(event):
                self.counts["write_queue_full"] += 1
        self._pending_bytes = max(0, self._pending_bytes)

    def _reject(self, reason: str, detail: str = "") -> None:
        self.rejected[reason] += 1
        now = self.clock.seconds()
        last = self._reject_logged.get(reason)
        if last is not None and now - last < REJECT_LOG_INTERVAL:
            self._reject_unlogged[reason] += 1
            return
        self._reject_logged[reason] = now
        unlogged = self._reject_unlogged.pop(reason, 0)
        emit = log.debug if reason in QUIET_REASONS else log.warn
        emit(
            "DHT: refused a peer's value: {reason} {detail}{more}",
            reason=reason,
            detail=escape_for_log(detail, 100),
            more=f" ({unlogged} more since the last report)" if unlogged else "",
        )

    # -- publishing -----------------------------------------------------------------------------

    def __call__(self, event: BadActorEvent, replicated: bool) -> None:
        """Pipeline output: publish a collected *event* (a replicated one is never re-put)."""
        if replicated or not self.running:
            return
        self.counts["events"] += 1
        if not self._take_token():
            self.counts["not_published_rate"] += 1
            return
        if len(self._backlog) >= self.max_backlog:
            self.counts["not_published_backlog"] += 1
            return
        try:
            data = validate.encode_value(event, self.private_key, self.value_cap)
        except Exception:
            self.counts["encode_failures"] += 1
            log.failure("cannot encode event {uuid} for the DHT", uuid=event.event_uuid)
            return
        self._published.add(event.event_uuid)
        self._remember(event.event_uuid, data)
        self._backlog.append((event.event_uuid, data))
        self._pump()

    def _remember(self, uuid: str, data: bytes) -> None:
        """Record a published value for :meth:`_queue_republish` (bounded in count and bytes)."""
        old = self._record.pop(uuid, None)
        if old is not None:
            self._record_bytes -= len(old[1])
        self._record[uuid] = (self.clock.seconds(), data)
        self._record_bytes += len(data)
        self._expire_record()
        while self._record and (len(self._record) > self.max_recorded
                                or self._record_bytes > self.max_recorded_bytes):
            _uuid, (_when, dropped) = self._record.popitem(last=False)
            self._record_bytes -= len(dropped)

    def _expire_record(self) -> None:
        now = self.clock.seconds()
        while self._record:
            uuid, (when, data) = next(iter(self._record.items()))
            if now - when < self.republish_window:
                break
            del self._record[uuid]
            self._record_bytes -= len(data)

    def _queue_republish(self) -> None:
        """A new child is ready: queue our recent values (and unconfirmed ones) to be put again."""
        self._expire_record()
        waiting = {uuid for uuid, _data in self._backlog}
        waiting.update(uuid for uuid, _data in self._republish)
        values = [(uuid, data) for uuid, data in self._unconfirmed.items()]
        values += [(uuid, data) for uuid, (_when, data) in self._record.items()]
        self._unconfirmed.clear()
        for uuid, data in values:
            if uuid in waiting:
                continue
            waiting.add(uuid)
            if len(self._republish) >= self.max_backlog:
                self.counts["not_republished_backlog"] += 1
                continue
            self._republish.append((uuid, data))

    def _take_token(self, reserve: float = 0.0) -> bool:
        """Take a token, if more than *reserve* tokens would be left for others."""
        now = self.clock.seconds()
        capacity = max(1.0, self.put_rate)
        self._tokens = min(capacity, self._tokens + max(0.0, now - self._refilled) * self.put_rate)
        self._refilled = now
        if self._tokens >= 1.0 + reserve:
            self._tokens -= 1.0
            return True
        return False

    def _pump(self) -> None:
        protocol = self.protocol
        if protocol is None or not self.ready or self._stopping:
            return
        while self._backlog and len(self._in_flight) < self.max_in_flight:
            uuid, data = self._backlog.popleft()
            put_id = self._next_id
            self._next_id += 1
            self._in_flight[put_id] = (self.clock.seconds(), uuid, data)
            if not protocol.send_put(put_id, data):
                self._backlog.appendleft((uuid, data))
                del self._in_flight[put_id]
                return
            self.counts["puts_sent"] += 1
        # Re-puts after a restart: paced by the same token bucket, one token left for new events.
        reserve = 1.0 if max(1.0, self.put_rate) >= 2.0 else 0.0
        while (self._republish and not self._backlog and len(self._in_flight) < self.max_in_flight
               and self._take_token(reserve)):
            uuid, data = self._republish.popleft()
            put_id = self._next_id
            self._next_id += 1
            self._in_flight[put_id] = (self.clock.seconds(), uuid, data)
            if not protocol.send_put(put_id, data):
                self._republish.appendleft((uuid, data))
                del self._in_flight[put_id]
                return
            self.counts["republished"] += 1

    def _requeue_in_flight(self) -> None:
        # The child died with these unanswered: they may or may not be on the network, so put
        # them again (receivers drop the duplicate by event_uuid).
        for _sent, uuid, data in sorted(self._in_flight.values(), reverse=True):
            if len(self._backlog) < self.max_backlog:
                self._backlog.appendleft((uuid, data))
            else:
                self.counts["not_published_backlog"] += 1
        self._in_flight.clear()

    # -- introspection ----------------------------------------------------------------------------

    def counters(self) -> dict[str, int]:
        """Every counter as ``name -> int``: ours, ``rejected_<reason>``, ``worker_<name>``."""
        out = dict(self.counts)
        out.update({f"rejected_{reason}": n for reason, n in self.rejected.items()})
        out.update({f"worker_{k}": v for k, v in self.child_counters.items() if isinstance(v, int)})
        out.update(
            restarts=self.restarts, backlog=len(self._backlog), in_flight=len(self._in_flight),
            pending_checks=len(self._pending), republish_queue=len(self._republish),
            recorded=len(self._record),
        )
        return out


def _mode_note(info: dict[str, Any]) -> str:
    """The start line's note on a binding without permanent puts (Debian 12's 2.4.12)."""
    if info.get("permanent", True) is not False:
        return ""
    interval = info.get("reput_interval")
    if isinstance(interval, (int, float)) and not isinstance(interval, bool) and interval > 0:
        return f" (no permanent puts: re-putting every {interval / 60:g} min)"
    return " (no permanent puts: recent values re-put)"


def build_dht_service(config: Any, reactor: Any, pipeline: Any, node_id: str, database: Any) -> DHTService:
    """The DHT service for ``-p/--p2p``, checked and ready to be added to the service tree.

    Call it at start-up (it reads key files and probes the UDP port synchronously, before the
    reactor runs); add the result as a child after the database service (so it stops first) and
    register it as a pipeline output::

        dht = build_dht_service(config, reactor, pipeline, node_id, database_service.database)
        dht.setServiceParent(root)
        pipeline.add_output(dht)

    :param config: the :class:`~sentrypeer.config.Config` (``bootstrap_node``, ``dht_port``,
        ``dht_bind``, ``dht_network``, ``dht_peer_discovery``, ``dht_put_rate``, ``dht_sign``,
        ``dht_trusted_nodes``, ``db_file``, ``debug``).
    :raises DHTStartupError: one line: the binding is missing (:class:`DHTUnavailableError`), the
        UDP port cannot be bound, a key file or the trusted-nodes file cannot be used.
    """
    from sentrypeer.endpoints import split_host_port

    require_opendht()
    try:
        host, port = split_host_port(config.bootstrap_node, default_port=4222)
    except ValueError as e:
        raise DHTStartupError(f"invalid --bootstrap-node: {e}") from None
    ipv4, ipv6 = bind_addresses(config.dht_bind)
    problem = check_udp_port(ipv4, ipv6, config.dht_port)
    if problem:
        raise DHTStartupError(f"DHT: {problem}")
    worker_args = [
        "--port", str(config.dht_port),
        "--network", str(config.dht_network),
        "--bootstrap-host", host,
        "--bootstrap-port", str(port),
    ]
    if config.dht_bind:
        worker_args += ["--bind", config.dht_bind]
    if config.dht_peer_discovery:
        worker_args.append("--peer-discovery")
    if getattr(config, "debug", False):
        worker_args.append("--verbose")
    try:
        private_key = signing.load_or_create_key(config.db_file) if config.dht_sign else None
        trusted = signing.load_trusted_keys(config.dht_trusted_nodes) if config.dht_trusted_nodes else []
    except signing.NodeKeyError as e:
        raise DHTStartupError(str(e)) from None
    if private_key is not None:
        log.info("DHT values are signed; this node's public key: {key}",
                 key=signing.public_key_text(private_key))
    if trusted:
        log.info("DHT: accepting only values signed by the {n} key(s) in {path}", n=len(trusted),
                 path=config.dht_trusted_nodes)
    return DHTService(
        reactor=reactor,
        pipeline=pipeline,
        database=database,
        node_id=node_id,
        worker_args=worker_args,
        put_rate=config.dht_put_rate,
        private_key=private_key,
        trusted_keys=trusted,
    )

