"""Tests for :mod:`sentrypeer.dht.protocol` and :mod:`sentrypeer.dht.service`, without OpenDHT:
the pipe framing, the service's publishing and receiving rules on a fake reactor and clock, and the
process handling (restart with backoff, a hung child killed at stop, a silent child killed, malformed
lines) with a fake child script (``tests/fixtures/dht/fake_worker.py``)."""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import queue
import signal
import socket
import sqlite3
import sys
import time
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from twisted.internet import defer, reactor
from twisted.internet.error import ProcessDone, ProcessExitedAlready, ProcessTerminated
from twisted.internet.task import Clock, deferLater
from twisted.logger import capturedLogs
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from sentrypeer import dht
from sentrypeer.dht import MAX_LINE_BYTES, signing, validate
from sentrypeer.dht.protocol import DHTProcessProtocol, NullHandler
from sentrypeer.dht.service import DHTService, build_dht_service, worker_environment
from sentrypeer.events import BadActorEvent
from sentrypeer.storage import queries

from .support import make_config

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "dht"
FAKE_WORKER = str(FIXTURES / "fake_worker.py")
C_VALUE = (FIXTURES / "c_node_value.json").read_bytes()
OUR_NODE = "5d41402a-bc4b-4a76-b971-9d911017c592"


def event(n: int = 0, **changes) -> BadActorEvent:
    fields = dict(
        event_timestamp="2026-01-02 03:04:05.000000042",
        event_uuid=f"0b6b7ef8-5c8a-4b8e-9c8e-{n:012x}",
        created_by_node_id=OUR_NODE,
        collected_method="passive",
        transport_type="UDP",
        source_ip="192.0.2.7",
        destination_ip="192.0.2.1",
        sip_method="OPTIONS",
        source_port=5060,
        destination_port=5060,
    )
    fields.update(changes)
    return BadActorEvent(**fields)


def c_value(**changes) -> bytes:
    value = json.loads(C_VALUE)
    value.update(changes)
    return json.dumps(value, separators=(",", ":")).encode()


# ---------------------------------------------------------------------------------------------
# Fakes


class RecordingHandler(NullHandler):
    def __init__(self):
        self.calls = []

    def child_ready(self, info):
        self.calls.append(("ready", info))

    def child_value(self, data):
        self.calls.append(("value", data))

    def child_put_done(self, put_id, ok, nodes):
        self.calls.append(("put_done", put_id, ok, nodes))

    def child_stats(self, stats):
        self.calls.append(("stats", stats))

    def child_log(self, level, message):
        self.calls.append(("log", level, message))

    def child_ended(self, protocol, reason):
        self.calls.append(("ended", reason))


class FakeProcess:
    """An ``IProcessTransport`` stand-in recording writes and signals."""

    _pids = iter(range(40000, 50000))

    def __init__(self, protocol, args, env, child_fds):
        self.protocol = protocol
        self.args = args
        self.env = env
        self.child_fds = child_fds
        self.data = b""
        self.signals = []
        self.stdin_closed = False
        self.ended = False
        self.pid = next(self._pids)

    def write(self, data):
        self.data += data

    def closeStdin(self):
        self.stdin_closed = True

    def signalProcess(self, sig):
        if self.ended:
            raise ProcessExitedAlready()
        self.signals.append(sig)

    def messages(self):
        return [json.loads(line) for line in self.data.splitlines()]

    def say(self, **message):
        self.protocol.outReceived(json.dumps(message).encode() + b"\n")

    def ready(self):
        self.say(op="ready", port=4222, port6=4222, node_id="ab" * 20, version="fake", permanent=True)

    def end(self, code=0, sig=None):
        self.ended = True
        reason = ProcessDone(0) if code == 0 and sig is None else ProcessTerminated(code, sig)
        self.protocol.processEnded(Failure(reason))


class FakeProcessReactor(Clock):
    """A clock that also spawns :class:`FakeProcess` es."""

    def __init__(self):
        super().__init__()
        self.processes: list[FakeProcess] = []

    def spawnProcess(self, protocol, executable, args=(), env=None, path=None, uid=None, gid=None,
                     usePTY=False, childFDs=None):
        process = FakeProcess(protocol, list(args), env, childFDs)
        self.processes.append(process)
        protocol.makeConnection(process)
        return process


class FakePipeline:
    def __init__(self):
        self.replicated = []

    def submit_replicated(self, event):
        self.replicated.append(event)
        return True


class SQLiteDatabase:
    """``run_query`` on an in-memory schema-1 database, synchronously (or held, when *hold*)."""

    def __init__(self):
        self.conn = sqlite3.connect(":memory:")
        queries.migrate(self.conn)
        self.hold = False
        self.held = []
        self.queries = 0

    def run_query(self, fn, *args):
        self.queries += 1
        if self.hold:
            d = defer.Deferred()
            self.held.append((d, fn, args))
            return d
        return defer.succeed(fn(self.conn.cursor(), *args))

    def release(self):
        held, self.held = self.held, []
        for d, fn, args in held:
            d.callback(fn(self.conn.cursor(), *args))

    def store(self, *events):
        with self.conn:
            queries.insert_events(self.conn.cursor(), list(events))


# ---------------------------------------------------------------------------------------------
# Framing


class FramingTests(SynchronousTestCase):
    def setUp(self):
        self.handler = RecordingHandler()
        self.protocol = DHTProcessProtocol(self.handler, Clock())
        self.process = FakeProcess(self.protocol, [], {}, {})
        self.protocol.makeConnection(self.process)

    def test_byte_at_a_time(self):
        """A message split into single bytes is dispatched once, when its newline arrives."""
        line = b'{"op":"value","data":"' + base64.b64encode(b"hello") + b'"}\n'
        for i in range(len(line)):
            self.protocol.outReceived(line[i:i + 1])
        self.assertEqual(self.handler.calls, [("value", b"hello")])

    def test_several_in_one_chunk(self):
        """Several messages in one read are dispatched in order; a partial last line waits."""
        self.protocol.outReceived(
            b'{"op":"put_done","id":7,"ok":false,"nodes":0}\n{"op":"stats","puts":3}\n'
            b'{"op":"log","level":"warn","message":"bootstrap"}\n{"op":"sta'
        )
        self.assertEqual(self.handler.calls, [
            ("put_done", 7, False, 0), ("stats", {"puts": 3}), ("log", "warn", "bootstrap"),
        ])
        self.protocol.outReceived(b'ts"}\n')
        self.assertEqual(self.handler.calls[-1], ("stats", {}))

    def test_malformed_counted_and_ignored(self):
        """Lines that are not a JSON object with a known op and right field types are counted and
        ignored; the next good line still works."""
        bad = [
            b"not json", b"[1]", b'"x"', b"{}", b'{"op":"explode"}', b'{"op":"value"}',
            b'{"op":"value","data":"***"}', b'{"op":"put_done","id":"1","ok":true}',
            b'{"op":"put_done","id":1,"ok":1}', b'{"op":"put_done","id":true,"ok":true}',
            b'{"op":"ready","node_id":"x"}', b'{"op":"ready","port":1}',
            b'{"op":"log","level":"panic","message":"x"}', b'{"op":"log","level":"info"}',
            b"\xff\xfe", b"[" * 100_000,
        ]
        self.protocol.outReceived(b"\n".join(bad) + b"\n")
        self.assertEqual(self.protocol.malformed, len(bad))
        self.assertEqual(self.handler.calls, [])
        self.protocol.outReceived(b'{"op":"stats"}\n')
        self.assertEqual(self.handler.calls, [("stats", {})])

    def test_overlong_line_discarded_without_buffering(self):
        """A line longer than the limit, arriving in chunks, is dropped up to its newline and counted
        once; the buffer never holds more than the limit; the next line is read normally."""
        chunk = b"A" * 50_000
        for _ in range(10):
            self.protocol.outReceived(chunk)
            self.assertLessEqual(len(self.protocol._buffer), MAX_LINE_BYTES)
        self.protocol.outReceived(b'B"}\n{"op":"stats"}\n')
        self.assertEqual(self.protocol.malformed, 1)
        self.assertEqual(self.handler.calls, [("stats", {})])

    def test_overlong_line_in_one_chunk(self):
        """An over-long line received whole is counted and skipped too."""
        self.protocol.outReceived(b"A" * (MAX_LINE_BYTES + 1) + b'\n{"op":"stats"}\n')
        self.assertEqual(self.protocol.malformed, 1)
        self.assertEqual(self.handler.calls, [("stats", {})])

    def test_largest_value_fits(self):
        """A 64 KiB value (OpenDHT's maximum), base64 in a message, is within the line limit."""
        data = os.urandom(64 * 1024)
        self.protocol.outReceived(b'{"op":"value","data":"' + base64.b64encode(data) + b'"}\n')
        self.assertEqual(self.handler.calls, [("value", data)])

    def test_commands(self):
        """``put`` carries the value as base64 with its id; ``stop`` also closes the child's stdin;
        every command is one JSON line."""
        self.protocol.send_put(3, b"\x00\xffvalue")
        self.protocol.request_stats()
        self.protocol.send_stop()
        self.assertEqual(self.process.messages(), [
            {"op": "put", "id": 3, "data": base64.b64encode(b"\x00\xffvalue").decode()},
            {"op": "stats"},
            {"op": "stop"},
        ])
        self.assertTrue(self.process.stdin_closed)

    def test_nothing_sent_after_end(self):
        """Once the process ended, commands are refused (``False``) and nothing is written."""
        self.process.end()
        self.assertFalse(self.protocol.send_put(1, b"x"))
        self.assertEqual(self.process.data, b"")
        self.assertEqual(self.handler.calls[-1][0], "ended")

    def test_stderr_logged_escaped_and_rate_limited(self):
        """The child's stderr is logged a line at a time, escaped, at most 20 lines a minute; the
        rest is counted and reported when the minute is over."""
        clock = Clock()
        clock.advance(1000)
        self.protocol.clock = clock
        with capturedLogs() as events:
            self.protocol.errReceived(b"Exception ignored in: 'opendht._core.value_callback'\n\x1b[31mred\n")
            self.protocol.errReceived(b"".join(b"line %d\n" % i for i in range(30)))
        lines = [e["line"] for e in events if "line" in e]
        self.assertEqual(lines[0], "Exception ignored in: 'opendht._core.value_callback'")
        self.assertEqual(lines[1], "\\x1b[31mred")
        self.assertEqual(len(lines), 20)
        self.assertEqual(self.protocol.stderr_dropped, 12)
        clock.advance(61)
        with capturedLogs() as events:
            self.protocol.errReceived(b"later\n")
        self.assertEqual([e.get("count") for e in events if "count" in e], [12])


# ---------------------------------------------------------------------------------------------
# The service on a fake reactor


class ServiceTestCase(SynchronousTestCase):
    def make(self, **kw):
        self.reactor = FakeProcessReactor()
        self.reactor.advance(1000)
        self.pipeline = FakePipeline()
        self.database = SQLiteDatabase()
        options = dict(
            reactor=self.reactor, pipeline=self.pipeline, database=self.database, node_id=OUR_NODE,
            worker_args=["--port", "0"], env={"PATH": "/usr/bin"}, put_rate=100.0,
        )
        options.update(kw)
        self.service = DHTService(**options)
        self.service.startService()
        self.addCleanup(self._stop)
        return self.service

    def _stop(self):
        if self.service.running:
            d = self.service.stopService()
            if self.service.process is not None:
                self.service.process.end()
            self.successResultOf(d)

    @property
    def child(self) -> FakeProcess:
        return self.reactor.processes[-1]

    def puts(self, process=None):
        return [m for m in (process or self.child).messages() if m["op"] == "put"]


class SpawnTests(ServiceTestCase):
    def test_command_and_environment(self):
        """The worker runs under this interpreter as ``-m sentrypeer.dht.worker`` with the options and
        the heartbeat; stdin is written, stdout and stderr read; the default environment puts this
        checkout first on PYTHONPATH."""
        self.make(heartbeat=2.5)
        self.assertEqual(self.child.args, [sys.executable, "-m", "sentrypeer.dht.worker", "--port", "0",
                                           "--heartbeat", "2.5"])
        self.assertEqual(self.child.child_fds, {0: "w", 1: "r", 2: "r"})
        env = worker_environment({"PYTHONPATH": "/elsewhere", "PYTHONSTARTUP": "x"})
        root = str(Path(__file__).resolve().parent.parent)
        self.assertEqual(env["PYTHONPATH"].split(os.pathsep), [root, "/elsewhere"])
        self.assertNotIn("PYTHONSTARTUP", env)

    def test_start_line_unknown_version_and_reput_note(self):
        """The start line says OpenDHT "unknown" when the binding reports no version (Debian's
        2.4.12), and carries the re-put interval when the binding has no permanent puts."""
        self.make()
        with capturedLogs() as events:
            self.child.say(op="ready", port=4222, port6=4222, node_id="ab" * 20, version="",
                           permanent=False, reput_interval=540.0)
        [line] = [e for e in events if "mode" in e]
        self.assertEqual(line["version"], "unknown")
        self.assertEqual(line["mode"], " (no permanent puts: re-putting every 9 min)")

    def test_ready_logged(self):
        """``ready`` marks the service ready and keeps the worker's port and routing id."""
        service = self.make()
        self.assertFalse(service.ready)
        self.child.ready()
        self.assertTrue(service.ready)
        self.assertEqual(service.child_info["port"], 4222)


class PublishTests(ServiceTestCase):
    def test_collected_event_put(self):
        """A collected event is put with the value bytes of :func:`validate.encode_value`."""
        service = self.make()
        self.child.ready()
        service(event(1), False)
        [put] = self.puts()
        self.assertEqual(base64.b64decode(put["data"]), validate.encode_value(event(1)))
        self.assertEqual(service.counts["puts_sent"], 1)

    def test_replicated_not_put(self):
        """Events received from peers are never put again (reference §9)."""
        service = self.make()
        self.child.ready()
        service(event(1), True)
        self.assertEqual(self.puts(), [])

    def test_signed_when_key_given(self):
        """With a key (``--dht-sign``) the value carries a signature that verifies."""
        key = Ed25519PrivateKey.generate()
        service = self.make(private_key=key)
        self.child.ready()
        service(event(1), False)
        value = json.loads(base64.b64decode(self.puts()[0]["data"]))
        self.assertTrue(signing.verify([key.public_key()], value))

    def test_rate_limit(self):
        """At most ``put_rate`` puts per second: a burst beyond is counted as not published (still
        stored locally by the pipeline); a second later there is room again."""
        service = self.make(put_rate=2.0)
        self.child.ready()
        for n in range(10):
            service(event(n), False)
        self.assertEqual(len(self.puts()), 2)
        self.assertEqual(service.counts["not_published_rate"], 8)
        self.reactor.advance(1.0)
        for n in range(10, 15):
            service(event(n), False)
        self.assertEqual(len(self.puts()), 4)
        self.assertEqual(service.counts["not_published_rate"], 11)

    def test_fractional_rate(self):
        """A rate below one per second allows one put, then one per 1/rate seconds."""
        service = self.make(put_rate=0.5)
        self.child.ready()
        service(event(1), False)
        service(event(2), False)
        self.reactor.advance(1.0)
        service(event(3), False)
        self.reactor.advance(1.0)
        service(event(4), False)
        self.assertEqual(len(self.puts()), 2)

    def test_in_flight_bound(self):
        """No more than ``max_in_flight`` puts wait for an answer; the rest wait in the backlog and go
        out as answers arrive."""
        service = self.make(max_in_flight=3)
        self.child.ready()
        for n in range(10):
            service(event(n), False)
        self.assertEqual(len(self.puts()), 3)
        self.assertEqual(service.counters()["backlog"], 7)
        self.child.say(op="put_done", id=1, ok=False, nodes=0)
        self.assertEqual(len(self.puts()), 4)
        self.assertEqual(service.counts["puts_unconfirmed"], 1)

    def test_backlog_bound(self):
        """Beyond ``max_backlog`` waiting events (here while the child is not ready) events are not
        published, and counted."""
        service = self.make(max_backlog=5)
        for n in range(8):
            service(event(n), False)
        self.assertEqual(service.counts["not_published_backlog"], 3)
        self.child.ready()
        self.assertEqual(len(self.puts()), 5)

    def test_put_timeout(self):
        """A put never answered is forgotten after ``put_timeout``, freeing its in-flight slot."""
        service = self.make(max_in_flight=1, put_timeout=10.0)
        self.child.ready()
        service(event(1), False)
        service(event(2), False)
        self.assertEqual(len(self.puts()), 1)
        self.child.say(op="stats")  # keep it from being killed as silent meanwhile
        self.reactor.advance(5)
        self.child.say(op="stats")
        self.reactor.advance(6)
        self.assertEqual(service.counts["put_timeouts"], 1)
        self.assertEqual(len(self.puts()), 2)

    def test_in_flight_requeued_after_crash(self):
        """Puts not answered when the child dies are put again by the next child."""
        service = self.make(min_restart_delay=1.0)
        self.child.ready()
        service(event(1), False)
        first = self.child
        first.end(1)
        self.reactor.advance(1.0)
        self.assertIsNot(self.child, first)
        self.child.ready()
        self.assertEqual(len(self.puts()), 1)
        self.assertEqual(base64.b64decode(self.puts()[0]["data"]), validate.encode_value(event(1)))


    def restart(self, code=1):
        """End the current child and let the service start and ready the next one."""
        first = self.child
        first.end(code)
        self.reactor.advance(self.service._restart_call.getTime() - self.reactor.seconds())
        self.assertIsNot(self.child, first)
        self.child.ready()

    def put_events(self, process=None):
        return [json.loads(base64.b64decode(m["data"]))["event_uuid"] for m in self.puts(process)]

    def answer_all(self, ok=True):
        for put in self.puts():
            self.child.say(op="put_done", id=put["id"], ok=ok, nodes=2 if ok else 0)

    def test_recent_values_republished_after_restart(self):
        """A permanent put is refreshed only by the child that made it: when a new child is ready, our
        values published (and answered) in the last 10 minutes are put again; older ones are not."""
        service = self.make()
        self.child.ready()
        service(event(1), False)
        self.reactor.advance(300)
        self.child.say(op="stats", bootstrap_ok=True)
        service(event(2), False)
        service(event(3), False)
        self.answer_all()
        self.reactor.advance(301)  # event 1 is now 601 s old
        self.child.say(op="stats", bootstrap_ok=True)
        self.restart()
        self.reactor.advance(1)
        self.assertEqual(self.put_events(), [event(n).event_uuid for n in (2, 3)])
        self.assertEqual(service.counts["republished"], 2)
        self.assertEqual(self.put_events(self.reactor.processes[0]),
                         [event(n).event_uuid for n in (1, 2, 3)])

    def test_republish_not_doubled_with_requeued_puts(self):
        """A put still unanswered when the child died is put once by the next child (requeued), not
        twice (requeued and republished)."""
        service = self.make()
        self.child.ready()
        service(event(1), False)
        service(event(2), False)
        self.child.say(op="put_done", id=1, ok=True, nodes=2)
        self.restart()
        self.reactor.advance(1)
        self.assertEqual(sorted(self.put_events()), sorted(event(n).event_uuid for n in (1, 2)))

    def test_republish_record_bounded(self):
        """The record of published values is bounded in count and in bytes (the oldest are
        forgotten), and the re-put queue by ``max_backlog`` (``not_republished_backlog`` beyond)."""
        service = self.make(max_recorded=3)
        self.child.ready()
        for n in range(5):
            service(event(n), False)
        self.answer_all()
        self.restart()
        self.reactor.advance(1)
        self.assertEqual(self.put_events(), [event(n).event_uuid for n in (2, 3, 4)])

        size = len(validate.encode_value(event(0)))
        service = self.make(max_recorded_bytes=2 * size + size // 2, max_backlog=1)
        self.child.ready()
        for n in range(4):
            service(event(n), False)
        self.answer_all()
        self.assertEqual(service.counters()["recorded"], 2)
        self.restart()
        self.reactor.advance(1)
        self.assertEqual(self.put_events(), [event(2).event_uuid])
        self.assertEqual(service.counts["not_republished_backlog"], 1)

    def test_republish_paced_by_put_rate(self):
        """Re-puts share the put-rate token bucket, leaving one token to new events: at 4 puts/s,
        20 recorded values go out over several seconds, and a new event meanwhile is still put."""
        service = self.make(put_rate=4.0)
        self.child.ready()
        for n in range(20):
            self.reactor.advance(0.25)
            service(event(n), False)
        self.answer_all()
        self.assertEqual(service.counts["not_published_rate"], 0)
        self.reactor.advance(10)
        self.restart()
        self.assertLessEqual(len(self.puts()), 3)
        service(event(99), False)
        self.assertIn(event(99).event_uuid, self.put_events())
        for _ in range(3):
            self.reactor.advance(1)
            self.answer_all()
        self.assertLess(service.counts["republished"], 20)
        for _ in range(10):
            self.reactor.advance(1)
            self.answer_all()
        self.assertEqual(service.counts["republished"], 20)
        self.assertEqual(len(set(self.put_events())), 21)

    def test_failed_before_bootstrap_retried_on_next_child(self):
        """A put answered with a failure by a child that had not bootstrapped is put again by the next
        child even when older than 10 minutes; failures after the child bootstrapped are not kept
        beyond the 10-minute record."""
        service = self.make()
        self.child.ready()
        service(event(1), False)
        self.answer_all(ok=False)
        self.reactor.advance(700)
        self.child.say(op="stats", bootstrap_ok=False)
        self.restart()
        self.reactor.advance(1)
        self.assertEqual(self.put_events(), [event(1).event_uuid])

        self.child.say(op="stats", bootstrap_ok=True)
        service(event(2), False)
        for put in self.puts():
            self.child.say(op="put_done", id=put["id"], ok=False, nodes=0)
        self.reactor.advance(700)
        self.child.say(op="stats", bootstrap_ok=True)
        self.restart()
        self.reactor.advance(1)
        self.assertEqual(self.puts(), [])


class ProcessLifeTests(ServiceTestCase):
    def test_restart_backoff_doubles_and_resets(self):
        """A child dying young is restarted after 1, 2, 4 ... seconds up to the maximum; after a child
        that lived past the threshold, the delay is back to the minimum (procmon's rule)."""
        service = self.make(min_restart_delay=1.0, max_restart_delay=8.0, restart_threshold=30.0)
        delays = []
        for _ in range(6):
            self.child.end(1)
            count = len(self.reactor.processes)
            waited = 0.0
            while len(self.reactor.processes) == count and waited < 100:
                self.reactor.advance(0.5)
                waited += 0.5
            delays.append(waited)
        self.assertEqual(delays, [1.0, 2.0, 4.0, 8.0, 8.0, 8.0])
        self.child.ready()
        for _ in range(70):  # a long life, with heartbeats
            self.reactor.advance(0.5)
            self.child.say(op="stats")
        self.child.end(None, signal.SIGSEGV)
        self.reactor.advance(1.0)
        self.assertEqual(len(self.reactor.processes), 8)
        self.assertEqual(service.restarts, 7)

    def test_silent_child_killed(self):
        """A ready child silent for longer than ``silence_timeout`` is killed (SIGKILL) and, once it
        ended, restarted."""
        service = self.make(silence_timeout=3.0)
        self.child.ready()
        self.reactor.advance(2.0)
        self.child.say(op="stats")
        self.reactor.advance(2.0)
        self.assertEqual(self.child.signals, [])
        self.reactor.pump([1.0] * 3)
        self.assertEqual(self.child.signals, ["KILL"])
        self.assertEqual(service.counts["silent_kills"], 1)
        self.child.end(None, signal.SIGKILL)
        self.reactor.advance(service.min_restart_delay)
        self.assertEqual(len(self.reactor.processes), 2)

    def test_never_ready_child_killed(self):
        """A child that does not say ``ready`` within ``start_timeout`` is killed."""
        self.make(start_timeout=10.0, silence_timeout=1.0)
        self.reactor.pump([1.0] * 9)
        self.assertEqual(self.child.signals, [])
        self.reactor.pump([1.0] * 3)
        self.assertEqual(self.child.signals, ["KILL"])

    def test_clean_stop(self):
        """Stop sends ``stop``, closes stdin, and fires once the child has exited; no restart."""
        service = self.make()
        self.child.ready()
        d = service.stopService()
        self.assertEqual(self.child.messages()[-1], {"op": "stop"})
        self.assertTrue(self.child.stdin_closed)
        self.assertNoResult(d)
        self.child.end(0)
        self.successResultOf(d)
        self.reactor.advance(100)
        self.assertEqual(len(self.reactor.processes), 1)
        self.assertEqual(self.child.signals, [])

    def test_hung_child_killed_at_stop(self):
        """A child that ignores ``stop`` is killed with SIGKILL after the grace period; stop fires when
        it has ended."""
        service = self.make(stop_grace=5.0)
        self.child.ready()
        d = service.stopService()
        self.reactor.advance(4.9)
        self.assertEqual(self.child.signals, [])
        self.reactor.advance(0.2)
        self.assertEqual(self.child.signals, ["KILL"])
        self.assertNoResult(d)
        self.child.end(None, signal.SIGKILL)
        self.successResultOf(d)
        self.assertEqual(service.counts["stop_kills"], 1)

    def test_unkillable_child_does_not_block_stop(self):
        """If even SIGKILL does not end the child (it is stuck in the kernel), stop still fires after
        ``kill_wait`` seconds, with an error logged."""
        service = self.make(stop_grace=1.0, kill_wait=2.0)
        self.child.ready()
        with capturedLogs() as events:
            d = service.stopService()
            self.reactor.advance(1.0)
            self.reactor.advance(2.0)
            self.successResultOf(d)
        self.assertTrue(any("did not end after SIGKILL" in e.get("log_format", "") for e in events))
        self.service.process = None  # for the cleanup

    def test_no_opendht_not_restarted(self):
        """A worker that exits with status 3 (``import opendht`` failed) is not restarted: restarting
        could not help. A critical line says peer-to-peer is off."""
        with capturedLogs() as events:
            self.make()
            self.child.end(dht.EXIT_NO_OPENDHT)
            self.reactor.advance(100)
        self.assertEqual(len(self.reactor.processes), 1)
        self.assertTrue(any("cannot import opendht" in e.get("log_format", "") for e in events))

    def test_spawn_failure_retried(self):
        """When spawning itself fails (an OSError), it is retried with backoff."""
        reactor_ = FakeProcessReactor()
        calls = []
        real = reactor_.spawnProcess

        def flaky(*args, **kw):
            calls.append(reactor_.seconds())
            if len(calls) < 3:
                raise OSError("no such interpreter")
            return real(*args, **kw)

        reactor_.spawnProcess = flaky
        service = DHTService(reactor=reactor_, pipeline=FakePipeline(), database=SQLiteDatabase(),
                             node_id=OUR_NODE, env={})
        service.startService()
        reactor_.pump([0.5] * 10)
        self.assertEqual(len(calls), 3)
        self.assertEqual(len(reactor_.processes), 1)
        d = service.stopService()
        reactor_.processes[0].end()
        self.successResultOf(d)
        self.flushLoggedErrors(OSError)


class ReceiveTests(ServiceTestCase):
    def value(self, data: bytes):
        self.child.say(op="value", data=base64.b64encode(data).decode())

    def test_accepted_value_reaches_pipeline(self):
        """A valid value from another node is handed to ``submit_replicated`` with the sender's node
        id and event id."""
        service = self.make()
        self.child.ready()
        self.value(C_VALUE)
        [got] = self.pipeline.replicated
        self.assertEqual(got.created_by_node_id, json.loads(C_VALUE)["created_by_node_id"])
        self.assertEqual(service.counts["accepted"], 1)

    def test_duplicate_in_database(self):
        """A value whose event_uuid is already stored is refused as a duplicate."""
        service = self.make()
        self.child.ready()
        result = validate.check_value(C_VALUE, OUR_NODE)
        self.database.store(result.event)
        self.value(C_VALUE)
        self.assertEqual(self.pipeline.replicated, [])
        self.assertEqual(service.rejected["duplicate"], 1)

    def test_duplicate_while_check_pending(self):
        """The same value twice while the first database check is still running is submitted once:
        the id is remembered before the check (no check-then-insert race)."""
        service = self.make()
        self.child.ready()
        self.database.hold = True
        self.value(C_VALUE)
        self.value(C_VALUE)
        self.value(c_value(event_uuid="11111111-2222-4333-8444-555555555555"))
        self.assertEqual(self.pipeline.replicated, [])
        self.database.release()
        self.database.release()
        self.assertEqual([e.event_uuid for e in self.pipeline.replicated],
                         [json.loads(C_VALUE)["event_uuid"], "11111111-2222-4333-8444-555555555555"])
        self.assertEqual(service.rejected["duplicate"], 1)
        self.assertEqual(self.database.queries, 1 + 1)

    def test_check_failure_counts_as_new(self):
        """When the duplicate check fails, the event is treated as new (the original's rule; the
        unique index still keeps the table right) and the failure is logged once."""
        service = self.make()
        self.child.ready()
        self.database.run_query = lambda fn, *a: defer.fail(sqlite3.OperationalError("locked"))
        self.value(C_VALUE)
        self.value(c_value(event_uuid="11111111-2222-4333-8444-555555555555"))
        self.assertEqual(len(self.pipeline.replicated), 2)
        self.assertEqual(service.counts["check_failures"], 2)
        self.assertEqual(len(self.flushLoggedErrors(sqlite3.OperationalError)), 1)

    def test_own_echo_quiet_forgery_counted(self):
        """Our own published value coming back is counted as ``own_values``, not refused; a value
        claiming our node id that we did not publish is refused as ``own_node_id``."""
        service = self.make()
        self.child.ready()
        mine = event(5)
        service(mine, False)
        self.value(validate.encode_value(mine))
        self.assertEqual(service.counts["own_values"], 1)
        self.assertEqual(service.rejected, {})
        self.value(validate.encode_value(event(6)))
        self.assertEqual(service.rejected["own_node_id"], 1)
        self.assertEqual(self.pipeline.replicated, [])

    def test_own_values_from_before_restart_quiet(self):
        """Our own values stored on the network by the run before a restart (our node id, an event
        this run did not publish) are counted as ``own_node_id`` but logged at debug level only."""
        service = self.make()
        self.child.ready()
        with capturedLogs() as events:
            self.value(validate.encode_value(event(7)))
        self.assertEqual(service.rejected["own_node_id"], 1)
        [line] = [e for e in events if e.get("reason") == "own_node_id"]
        self.assertEqual(line["log_level"].name, "debug")
        self.assertEqual(self.pipeline.replicated, [])

    def test_poisoned_counted_by_reason(self):
        """Refused values are counted by reason and never reach the pipeline."""
        service = self.make()
        self.child.ready()
        self.value(b"[]")
        self.value(b"{bad")
        self.value(b"{bad")
        self.value(c_value(source_ip="evil.example"))
        self.assertEqual(dict(service.rejected), {"not_object": 1, "bad_json": 2, "bad_address": 1})
        self.assertEqual(service.counters()["rejected_bad_json"], 2)
        self.assertEqual(self.pipeline.replicated, [])

    def test_rejections_logged_once_a_minute_per_reason(self):
        """The first refusal of a reason is logged; more within a minute are only counted; the next
        log line after the minute says how many were not logged. Attacker text is escaped."""
        self.make()
        self.child.ready()
        with capturedLogs() as events:
            for _ in range(5):
                self.value(c_value(source_ip="1.2.3.4\n\x1b[2Jfake log line"))
            self.value(b"[]")
            self.reactor.advance(30)
            self.child.say(op="stats")
            self.value(c_value(source_ip="x"))
            self.reactor.advance(31)
            self.child.say(op="stats")
            self.value(c_value(source_ip="y"))
        lines = [e for e in events if "reason" in e]
        self.assertEqual([(e["reason"], e["more"]) for e in lines], [
            ("bad_address", ""), ("not_object", ""), ("bad_address", " (5 more since the last report)"),
        ])
        self.assertNotIn("\n", lines[0]["detail"])
        self.assertIn("\\n\\x1b[2J", lines[0]["detail"])

    def test_trusted_mode(self):
        """With trusted keys, unsigned values and values signed by another key are refused; values
        signed by a listed key are accepted."""
        listed, other = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
        service = self.make(trusted_keys=[listed.public_key()])
        self.child.ready()

        def signed(key, uuid):
            value = json.loads(c_value(event_uuid=uuid))
            value["signature"] = signing.sign(key, value)
            return json.dumps(value).encode()

        self.value(C_VALUE)
        self.value(signed(other, "11111111-2222-4333-8444-555555555555"))
        self.value(signed(listed, "11111111-2222-4333-8444-666666666666"))
        self.assertEqual(dict(service.rejected), {"unsigned": 1, "untrusted_signature": 1})
        self.assertEqual([e.event_uuid for e in self.pipeline.replicated],
                         ["11111111-2222-4333-8444-666666666666"])

    def test_pending_bound(self):
        """Beyond ``max_pending_checks`` values waiting for the database, values are refused as
        ``backlog`` (memory stays bounded when a peer floods us)."""
        service = self.make(max_pending_checks=3)
        self.child.ready()
        self.database.hold = True
        for n in range(6):
            self.value(c_value(event_uuid=f"11111111-2222-4333-8444-{n:012x}"))
        # one batch is at the database, three wait, the rest are refused
        self.assertEqual(service.rejected["backlog"], 2)

    def test_stop_drops_pending(self):
        """Values still waiting for their check at stop are not stored (counted)."""
        service = self.make()
        self.child.ready()
        self.database.hold = True
        self.value(C_VALUE)
        d = service.stopService()
        self.child.end(0)
        self.successResultOf(d)
        self.database.release()
        self.assertEqual(self.pipeline.replicated, [])
        self.assertEqual(service.counts["not_stored_at_stop"], 1)


# ---------------------------------------------------------------------------------------------
# Building from the configuration


class BuildTests(SynchronousTestCase):
    def config(self, **overrides):
        directory = os.path.abspath(self.mktemp())
        overrides.setdefault("bootstrap_node", "127.0.0.1:9")
        overrides.setdefault("dht_port", 0)
        return make_config(directory, p2p=True, **overrides)

    def build(self, config):
        return build_dht_service(config, FakeProcessReactor(), FakePipeline(), OUR_NODE, SQLiteDatabase())

    def setUp(self):
        if importlib.util.find_spec("opendht") is None:
            self.patch(dht, "opendht_available", lambda: True)

    def test_worker_arguments(self):
        """The configuration becomes the worker's options: port, network, bootstrap host and port
        (default 4222), bind address, peer discovery only when asked for."""
        config = self.config(dht_network=7, dht_bind="127.0.0.1", bootstrap_node="[::1]:5000",
                             dht_put_rate=3.0)
        service = self.build(config)
        self.assertEqual(service.command[3:], [
            "--port", "0", "--network", "7", "--bootstrap-host", "::1", "--bootstrap-port", "5000",
            "--bind", "127.0.0.1", "--heartbeat", "5.0",
        ])
        self.assertEqual(service.put_rate, 3.0)
        self.assertIsNone(service.private_key)
        service = self.build(self.config(bootstrap_node="bootstrap.example", dht_peer_discovery=True))
        self.assertIn("4222", service.command)
        self.assertIn("--peer-discovery", service.command)

    def test_sign_creates_key_next_to_database(self):
        """``--dht-sign`` loads (creating on first use) the node key next to the database."""
        config = self.config(dht_sign=True)
        service = self.build(config)
        self.assertEqual(signing.public_key_text(service.private_key), signing.show_node_key(config.db_file))

    def test_trusted_file_problems_are_startup_errors(self):
        """A missing or bad trusted-nodes file is a one-line start-up error."""
        config = self.config(dht_trusted_nodes=os.path.abspath(self.mktemp()))
        e = self.assertRaises(dht.DHTStartupError, self.build, config)
        self.assertIn("trusted nodes file", str(e))

    def test_port_in_use_is_startup_error(self):
        """A DHT port that cannot be bound is a one-line start-up error naming it (OpenDHT itself
        would abort the worker)."""
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
            config = self.config(dht_port=port, dht_bind="127.0.0.1")
            e = self.assertRaises(dht.DHTStartupError, self.build, config)
        self.assertIn(f"127.0.0.1:{port}", str(e))

    def test_missing_opendht(self):
        """Without the binding, ``-p`` is one clear start-up error naming the package to install."""
        self.patch(dht, "opendht_available", lambda: False)
        e = self.assertRaises(dht.DHTUnavailableError, self.build, self.config())
        self.assertIn("opendht", str(e))
        self.assertNotIn("\n", str(e))
        self.assertIsInstance(e, dht.DHTStartupError)

    def test_require_opendht_uses_find_spec(self):
        """The check finds the module without importing it into the honeypot's process."""
        self.patch(importlib.util, "find_spec", lambda name: None)
        self.assertFalse(dht.opendht_available())
        self.assertRaises(dht.DHTUnavailableError, dht.require_opendht)

    def test_bind_addresses(self):
        """An IPv4 bind also binds ``::1`` and an IPv6 one ``127.0.0.1`` (an IPv6 socket keeps
        OpenDHT's stop clean, opendht-notes §4.3); ``::`` is both families; none is OpenDHT's all."""
        self.assertEqual(dht.bind_addresses(None), ("", ""))
        self.assertEqual(dht.bind_addresses("127.0.0.1"), ("127.0.0.1", "::1"))
        self.assertEqual(dht.bind_addresses("::"), ("0.0.0.0", "::"))
        self.assertEqual(dht.bind_addresses("2001:db8::1"), ("127.0.0.1", "2001:db8::1"))


# ---------------------------------------------------------------------------------------------
# Real child processes running the fake worker


class RecordingReactor:
    """Delegates to the real reactor and records when processes are spawned."""

    def __init__(self):
        self.spawned = []

    def spawnProcess(self, *args, **kw):
        process = reactor.spawnProcess(*args, **kw)
        self.spawned.append((time.monotonic(), process, process.pid))
        return process

    def __getattr__(self, name):
        return getattr(reactor, name)


class FakeChildTests(TestCase):
    timeout = 60

    def start(self, mode, *extra, **kw):
        self.spawner = RecordingReactor()
        self.pipeline = FakePipeline()
        options = dict(
            reactor=self.spawner, clock=reactor, pipeline=self.pipeline, database=SQLiteDatabase(),
            node_id=OUR_NODE, command=[sys.executable, FAKE_WORKER, mode, *extra],
            env=dict(os.environ), put_rate=100.0, min_restart_delay=0.1, max_restart_delay=0.8,
            stop_grace=2.0, kill_wait=5.0, silence_timeout=5.0,
        )
        options.update(kw)
        self.service = DHTService(**options)
        self.service.startService()
        self.addCleanup(self._cleanup)
        return self.service

    @defer.inlineCallbacks
    def _cleanup(self):
        if self.service.running:
            yield self.service.stopService()
        for _, process, _pid in self.spawner.spawned:
            try:
                process.signalProcess("KILL")
            except ProcessExitedAlready:
                pass

    @defer.inlineCallbacks
    def wait_for(self, predicate, timeout=10.0):
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                self.fail(f"timed out after {timeout} s")
            yield deferLater(reactor, 0.02, lambda: None)

    @defer.inlineCallbacks
    def test_framing_puts_and_values(self):
        """Through a real pipe: the child's values reach the pipeline, puts reach the child as one
        JSON line each and are acknowledged, and a clean stop ends the process with status 0."""
        values = self.mktemp()
        with open(values, "wb") as f:
            f.write(C_VALUE + b"\n" + c_value(event_uuid="11111111-2222-4333-8444-555555555555") + b"\n")
        record = os.path.abspath(self.mktemp())
        service = self.start("normal", "--values", values, "--record", record)
        yield self.wait_for(lambda: len(self.pipeline.replicated) == 2)
        for n in range(5):
            service(event(n), False)
        yield self.wait_for(lambda: service.counts["puts_ok"] == 5)
        yield service.stopService()
        with open(record, "rb") as f:
            lines = [json.loads(line) for line in f]
        self.assertEqual([m["op"] for m in lines], ["put"] * 5 + ["stop"])
        self.assertEqual(base64.b64decode(lines[0]["data"]), validate.encode_value(event(0)))
        self.assertEqual(service.restarts, 0)

    @defer.inlineCallbacks
    def test_malformed_lines_ignored_and_counted(self):
        """Garbage from the child (not JSON, an array, an unknown op, bad types, a 200 KB line) is
        counted and ignored; the child's good messages that follow still work."""
        service = self.start("garbage")
        yield self.wait_for(lambda: service.ready)
        self.assertEqual(service.protocol.malformed, 7)
        service(event(1), False)
        yield self.wait_for(lambda: service.counts["puts_ok"] == 1)

    @defer.inlineCallbacks
    def test_restart_with_backoff_after_crash(self):
        """A child that keeps crashing is restarted with growing delays (0.1, 0.2, 0.4 s ... here)."""
        service = self.start("crash")
        yield self.wait_for(lambda: len(self.spawner.spawned) >= 5, timeout=20)
        yield service.stopService()
        times = [t for t, _, _ in self.spawner.spawned]
        gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
        self.assertGreaterEqual(gaps[1], 0.2)
        self.assertGreaterEqual(gaps[2], 0.4)
        self.assertGreaterEqual(gaps[3], 0.8)
        self.assertGreaterEqual(service.counts["worker_exits"], 4)

    @defer.inlineCallbacks
    def test_values_put_again_after_child_killed(self):
        """Through real pipes: values answered by a child that is then killed with SIGKILL are put
        again by the restarted child."""
        record = os.path.abspath(self.mktemp())
        service = self.start("normal", "--record", record)
        yield self.wait_for(lambda: service.ready)
        for n in range(3):
            service(event(n), False)
        yield self.wait_for(lambda: service.counts["puts_ok"] == 3)
        os.kill(service.process.pid, signal.SIGKILL)
        yield self.wait_for(lambda: service.restarts == 1 and service.ready)
        yield self.wait_for(lambda: service.counts["puts_ok"] == 6)
        yield service.stopService()
        with open(record, "rb") as f:
            puts = [json.loads(line) for line in f if b'"put"' in line]
        uuids = [json.loads(base64.b64decode(m["data"]))["event_uuid"] for m in puts]
        self.assertEqual(uuids, [event(n).event_uuid for n in range(3)] * 2)
        self.assertEqual(service.counts["republished"], 3)

    @defer.inlineCallbacks
    def test_hung_child_killed_at_stop(self):
        """A child that ignores ``stop``, SIGTERM and its closed stdin is killed with SIGKILL after the
        grace period; stop returns once it is gone, leaving no process behind."""
        service = self.start("hang", stop_grace=0.5)
        yield self.wait_for(lambda: service.ready)
        pid = service.process.pid
        started = time.monotonic()
        yield service.stopService()
        self.assertLess(time.monotonic() - started, 5.0)
        self.assertEqual(service.counts["stop_kills"], 1)
        self.assertRaises(ProcessLookupError, os.kill, pid, 0)

    @defer.inlineCallbacks
    def test_silent_child_killed_and_restarted(self):
        """A child that stops talking (a deadlocked binding) is killed after ``silence_timeout`` and
        a new one started."""
        service = self.start("silent", silence_timeout=0.5)
        yield self.wait_for(lambda: len(self.spawner.spawned) >= 2, timeout=10)
        first_pid = self.spawner.spawned[0][2]
        self.assertGreaterEqual(service.counts["silent_kills"], 1)
        yield self.wait_for(lambda: not _alive(first_pid), timeout=5)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# ---------------------------------------------------------------------------------------------
# The worker's logic, in this process, on a fake ``opendht`` module (the real one is exercised by
# tests/test_dht_integration.py)


class FakeSockAddr:
    def __init__(self, host="", port=0):
        self.host, self.port = host, port

    def isUnspecified(self):
        return self.host in ("", "0.0.0.0", "::")

    def getFamily(self):
        return 0 if not self.host else socket.AF_INET6 if ":" in self.host else socket.AF_INET

    def getPort(self):
        return self.port

    @staticmethod
    def resolve(host, service):
        return [FakeSockAddr(host, int(service))]


class FakeValue:
    def __init__(self, data, type_id=0):
        self.data = data
        self.user_type = ""


class FakeListenToken:
    _cb = {}


class FakeRunner:
    def __init__(self, permanent=True, ipv6=True, host="127.0.0.1"):
        self.host = host
        self.calls = []
        self.puts = []
        self.value_cb = None
        self.ipv6 = ipv6
        if not permanent:
            self.put = self._put_old

    def run(self, **kw):
        self.calls.append(("run", kw))

    def getBound(self, af=0):
        if af == socket.AF_INET6 and not self.ipv6:
            return FakeSockAddr()
        return FakeSockAddr(self.host, 4567)

    def getNodeId(self):
        return "cd" * 20

    def listen(self, key, cb):
        self.value_cb = cb
        FakeListenToken._cb["cb"] = {"cb": cb}
        return FakeListenToken()

    def put(self, key, value, done_cb=None, permanent=False):
        self.puts.append((value.data, permanent, value.user_type))
        done_cb(True, [object(), object()])

    def _put_old(self, key, value, done_cb=None):
        self.puts.append((value.data, None, value.user_type))
        done_cb(False, [])

    def bootstrap(self, host, port):
        self.calls.append(("bootstrap", host, port))

    def ping(self, addr, cb):
        cb(True)

    def cancelListen(self, token):
        self.calls.append(("cancelListen",))

    def shutdown(self, cb=None):
        self.calls.append(("shutdown",))
        cb()


class FakeDHTModule:
    """Just enough of ``opendht`` for :class:`sentrypeer.dht.worker.Node`."""

    SockAddr = FakeSockAddr
    Value = FakeValue
    ListenToken = FakeListenToken
    version = "fake"

    def __init__(self, runner):
        self._runner = runner
        self.InfoHash = type("InfoHash", (), {"get": staticmethod(lambda name: f"hash({name})")})
        self.configs = []

    def DhtRunner(self):
        return self._runner

    def DhtConfig(self):
        config = _Recorder()
        self.configs.append(config)
        return config


class _Recorder:
    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        return lambda *args: self.calls.append((name, *args))


class WorkerTests(SynchronousTestCase):
    def node(self, *argv, runner=None):
        from sentrypeer.dht import worker

        self.worker = worker
        self.runner = runner or FakeRunner()
        self.module = FakeDHTModule(self.runner)
        self.counters = worker.Counters()
        self.out = worker.Output(None, 1.0, lambda: {"op": "stats"}, self.counters)
        args = worker._parse_args(["--port", "0", "--bind", "127.0.0.1", *argv])
        node = worker.Node(self.module, args, self.out, self.counters)
        node._maintain = lambda: None  # no background thread here
        self.patch(worker.threading, "Thread", _NoThread)
        return node

    def queued(self):
        items = []
        while not self.out._queue.empty():
            items.append(self.out._queue.get_nowait())
        return items

    def serve(self, node, data: bytes):
        import io

        node.serve(io.BytesIO(data))

    def test_start(self):
        """Start uses a fresh config with the network id and peer discovery off, binds IPv4 plus
        ``::1``, listens on the key and reports port, routing id and permanent-put support."""
        node = self.node("--network", "9")
        ready = node.start()
        self.assertEqual(ready["op"], "ready")
        self.assertEqual((ready["port"], ready["port6"], ready["node_id"]), (4567, 4567, "cd" * 20))
        self.assertTrue(ready["permanent"])
        self.assertEqual(self.module.configs[0].calls,
                         [("setNetwork", 9), ("setPeerDiscovery", False, False)])
        self.assertEqual(self.runner.calls[0][1]["ipv4"], "127.0.0.1")
        self.assertEqual(self.runner.calls[0][1]["ipv6"], "::1")
        self.assertEqual(node.key, "hash(bad_actors)")

    def test_bound_to_all_addresses(self):
        """Bound to all addresses (``0.0.0.0`` and ``::``, the default), the port is still reported:
        only OpenDHT's "[invalid address]" means no socket."""
        node = self.node(runner=FakeRunner(host="0.0.0.0"))
        node.args.bind = None
        ready = node.start()
        self.assertEqual((ready["port"], ready["port6"]), (4567, 4567))
        self.assertEqual((self.runner.calls[0][1]["ipv4"], self.runner.calls[0][1]["ipv6"]), ("", ""))

    def test_put_permanent_with_callback(self):
        """A ``put`` command puts the decoded bytes permanently, always with a done callback (without
        one the binding blocks and drops ``permanent``), typed text/plain as the original; the answer
        is a ``put_done``."""
        node = self.node()
        node.start()
        self.serve(node, b'{"op":"put","id":5,"data":"' + base64.b64encode(b"{}") + b'"}\n')
        self.assertEqual(self.runner.puts, [(b"{}", True, "text/plain")])
        self.assertEqual(self.queued(), [{"op": "put_done", "id": 5, "ok": True, "nodes": 2}])

    def test_bad_commands_counted(self):
        """Malformed commands (not JSON, unknown op, bad base64, an over-long line, an empty or too
        large value) are counted and skipped; ``stop`` ends the loop."""
        node = self.node()
        node.start()
        too_big = base64.b64encode(b"x" * (64 * 1024 + 1))
        self.serve(node, b"junk\n" + b'{"op":"explode"}\n' + b'{"op":"put","id":1,"data":"***"}\n'
                   + b"A" * (MAX_LINE_BYTES + 5) + b"\n" + b'{"op":"put","id":2,"data":""}\n'
                   + b'{"op":"put","id":3,"data":"' + too_big + b'"}\n'
                   + b'{"op":"stop"}\n' + b'{"op":"put","id":4,"data":"e30="}\n')
        self.assertEqual(self.counters.snapshot()["malformed_commands"], 6)
        self.assertEqual(self.runner.puts, [])

    def test_value_callback_never_fails(self):
        """The listen callback queues values, counts expiries, and returns True even when queueing
        fails (a False or an exception would end the listen, opendht-notes §4.4)."""
        node = self.node()
        node.start()
        cb = self.runner.value_cb
        self.assertIs(cb(FakeValue(b"v1"), False), True)
        self.assertIs(cb(FakeValue(b"v2"), True), True)
        self.assertIs(cb(object(), False), True)  # no .data: swallowed
        self.assertEqual(self.queued(), [("value", b"v1")])
        self.assertEqual(self.counters.snapshot()["expired"], 1)

    def test_full_queue_drops_and_counts(self):
        """When the honeypot does not read, values beyond the queue are dropped and counted; the DHT
        thread never blocks."""
        node = self.node()
        node.start()
        self.patch(self.out, "_queue", queue.Queue(2))
        for n in range(5):
            self.runner.value_cb(FakeValue(b"%d" % n), False)
        self.assertEqual(self.counters.snapshot()["dropped_queue_full"], 3)

    def test_old_binding_reputs_recent_values(self):
        """Without permanent puts (OpenDHT 2.4.12), this node's values are put again 540 s after their
        put, while younger than 600 s; older ones are forgotten."""
        node = self.node(runner=FakeRunner(permanent=False))
        self.assertFalse(node.start()["permanent"])
        self.serve(node, b'{"op":"put","id":1,"data":"e30="}\n')
        first = node._reput[0][0]
        node._reput_due(first + 100)
        self.assertEqual(len(self.runner.puts), 1)
        node._reput_due(first + 540.5)
        self.assertEqual(len(self.runner.puts), 2)
        node._reput_due(first + 599.5)
        self.assertEqual(len(self.runner.puts), 2)
        node._reput_due(first + 600.5)
        self.assertEqual(len(node._reput), 0)
        self.assertEqual(self.counters.snapshot()["reputs"], 1)

    def test_bootstrap_from_itself_not_retried(self):
        """A seed node whose bootstrap node is its own address and bound port logs once that it is
        the bootstrap node, bootstraps from nobody, and is not retried; another port is bootstrapped
        as usual."""
        node = self.node("--bootstrap-host", "127.0.0.1", "--bootstrap-port", "4567")
        node.start()
        self.assertIs(node._bootstrap(), True)
        self.assertTrue(node._bootstrap_self)
        self.assertNotIn("bootstrap", [c[0] for c in self.runner.calls])
        [log] = [m for m in self.queued() if m.get("op") == "log"]
        self.assertEqual(log["level"], "info")
        self.assertIn("this node is the bootstrap node", log["message"])
        self.assertTrue(node.stats()["bootstrap_self"])

        node = self.node("--bootstrap-host", "127.0.0.1", "--bootstrap-port", "4568")
        node.start()
        self.assertIs(node._bootstrap(), True)
        self.assertFalse(node._bootstrap_self)
        self.assertIn(("bootstrap", "127.0.0.1", "4568"), self.runner.calls)

    def test_version_unknown_without_one(self):
        """A binding without ``__version__`` or ``version`` (Debian's 2.4.12) reports its installed
        distribution's version, else "unknown", never an empty string."""
        from importlib import metadata

        from sentrypeer.dht import worker

        def missing(name):
            raise metadata.PackageNotFoundError(name)

        self.patch(metadata, "version", missing)
        self.assertEqual(worker._version(object()), "unknown")
        self.assertEqual(worker._version(type("M", (), {"__version__": "4.4.2"})), "4.4.2")

    def test_stop_cancels_with_refcount_fix(self):
        """Stop gives the shared listen-token slot a reference before ``cancelListen`` (the binding
        releases the wrong callback otherwise, opendht-notes §4.1), then shuts down; no ``join``."""
        node = self.node()
        node.start()
        shared = FakeListenToken._cb["cb"]
        before = sys.getrefcount(shared)
        node.stop()
        self.assertEqual(sys.getrefcount(shared), before + 1)
        self.assertEqual(self.runner.calls[-2:], [("cancelListen",), ("shutdown",)])

    def test_stop_without_ipv6_skips_cancel(self):
        """With no IPv6 socket the listen cannot be cancelled (opendht-notes §4.3): stop only shuts
        down, and the process exits without ``join``."""
        node = self.node(runner=FakeRunner(ipv6=False))
        self.assertIsNone(node.start()["port6"])
        node.stop()
        self.assertEqual(self.runner.calls[-1], ("shutdown",))
        self.assertNotIn(("cancelListen",), self.runner.calls)

    def test_port_in_use_refused_before_opendht(self):
        """A port already bound is reported as a start error before OpenDHT tries (it would abort the
        process)."""
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind(("127.0.0.1", 0))
            node = self.node()
            node.args.port = s.getsockname()[1]
            e = self.assertRaises(RuntimeError, node.start)
        self.assertIn("cannot bind UDP 127.0.0.1", str(e))
        self.assertEqual(self.runner.calls, [])


class _NoThread:
    def __init__(self, *args, **kw):
        pass

    def start(self):
        pass
