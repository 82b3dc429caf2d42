"""Tests for :mod:`sentrypeer.eventlog`: the JSON bad-actor log (format, buffering, errors, rotation)."""

from __future__ import annotations

import errno
import json
import os
import signal
import stat

from twisted.internet import reactor, task
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from sentrypeer.eventlog import FILE_MODE, JSONLogService, event_json
from sentrypeer.events import JSON_KEYS
from sentrypeer.outputs import OutputError

from .support import corpus_rows
from .test_outputs import corpus_events, log_text, make_event, wait_for

HOSTILE_AGENT = '"quoted" \\ back\r\nnew line }{"source_ip":"6.6.6.6"} <script>alert(1)</script>\x00\x1b'


class ClockWithThreads(task.Clock):
    """A clock that also runs ``callFromThread`` calls (at once), for the SIGHUP handler."""

    def callFromThread(self, f, *args, **kwargs):
        f(*args, **kwargs)


def read_lines(path: str) -> list[bytes]:
    with open(path, "rb") as f:
        data = f.read()
    if data:
        assert data.endswith(b"\n"), data[-40:]
    return data.splitlines()


class EventLogCase(SynchronousTestCase):
    def setUp(self):
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        self.path = os.path.join(self.directory, "sentrypeer_json.log")
        self.clock = task.Clock()
        self.observer = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)

    def start(self, **kwargs) -> JSONLogService:
        kwargs.setdefault("handle_sighup", False)
        service = JSONLogService(self.path, reactor=self.clock, **kwargs)
        service.startService()
        self.addCleanup(lambda: service.stopService() if service.running else None)
        return service


class FormatTests(EventLogCase):
    def test_corpus_events_one_line_each(self):
        """Every event of every corpus file (fed as a UDP datagram through the SIP controller) is
        written as one line of valid UTF-8 JSON whose keys are exactly those of interface.md §3,
        in that order, with the event's values; the exact message bytes are not in it."""
        service = self.start()
        expected = []
        with_events = {row["file"] for row in corpus_rows() if row["events"]}
        for name, events in corpus_events():
            if name in with_events:
                self.assertTrue(events, name)
            for event in events:
                service(event, False)
                expected.append((name, event))
        service.stopService()
        lines = read_lines(self.path)
        self.assertEqual(len(lines), len(expected))
        for line, (name, event) in zip(lines, expected, strict=True):
            line.decode("utf-8")
            self.assertNotIn(b"\n", line)
            decoded = json.loads(line)
            self.assertEqual(list(decoded), list(JSON_KEYS), name)
            self.assertEqual(decoded, event.to_json_dict(), name)
            self.assertNotIn("sip_message_bytes", decoded)
            self.assertEqual(line, event_json(event))
        self.assertEqual(service.written, len(expected))

    def test_compact_separators(self):
        """The line is the original's compact form: ``"key":value`` pairs joined by ``,`` without
        spaces, then a newline; ports are JSON integers."""
        service = self.start()
        event = make_event(sip_message="x", sip_user_agent="ua")
        service(event, False)
        service.flush()
        (line,) = read_lines(self.path)
        self.assertTrue(line.startswith(b'{"app_name":"sentrypeer","app_version":"'))
        self.assertIn(b'"source_ip":"203.0.113.7","destination_ip":"198.51.100.2",', line)
        self.assertIn(b'"source_port":5071,"destination_port":5060,"parse_status":"ok"', line)
        self.assertNotIn(b'": ', line)

    def test_hostile_user_agent_stays_in_its_field(self):
        """A User-Agent with quotes, a backslash, CR/LF, ``}{``, ``<script>`` and control
        characters is escaped by the JSON encoder only: one line, the field round-trips exactly,
        no other field changes."""
        service = self.start()
        event = make_event(sip_user_agent=HOSTILE_AGENT, called_number='1"}\n')
        service(event, False)
        service.flush()
        (line,) = read_lines(self.path)
        decoded = json.loads(line)
        self.assertEqual(decoded["sip_user_agent"], HOSTILE_AGENT)
        self.assertEqual(decoded["called_number"], '1"}\n')
        self.assertEqual(decoded["source_ip"], "203.0.113.7")
        self.assertIn(b"<script>alert(1)</script>", line)  # JSON, not HTML: not rewritten
        self.assertIn(b"\\r\\n", line)
        self.assertIn(b"\\u0000\\u001b", line)

    def test_non_ascii_is_utf8(self):
        """Non-ASCII text is written as UTF-8, not as \\u escapes (the original's encoder)."""
        service = self.start()
        service(make_event(sip_user_agent="Grüße ☎ 😀"), False)
        service.flush()
        (line,) = read_lines(self.path)
        self.assertIn("Grüße ☎ 😀".encode(), line)

    def test_lone_surrogate_escaped(self):
        """A lone surrogate (possible in a peer's JSON) does not crash the writer: it is written
        as a JSON \\udXXX escape, the line stays valid UTF-8 and decodes to the same text."""
        service = self.start()
        agent = "bad \ud800 surrogate é"
        service(make_event(sip_user_agent=agent), True)
        service.flush()
        (line,) = read_lines(self.path)
        line.decode("utf-8")
        self.assertIn(b"\\ud800", line)
        self.assertIn("é".encode(), line)
        self.assertEqual(json.loads(line)["sip_user_agent"], agent)
        self.assertEqual((service.written, service.errors), (1, 0))

    def test_replicated_events_written(self):
        """Events replicated from peers are written like collected ones (no sip_message_bytes)."""
        service = self.start()
        service(make_event(source_ip="192.0.2.77", sip_message_bytes=None), True)
        service.flush()
        (line,) = read_lines(self.path)
        self.assertEqual(json.loads(line)["source_ip"], "192.0.2.77")

    def test_signature_last(self):
        """A signed event (from the DHT) has ``signature`` after the interface keys."""
        service = self.start()
        service(make_event(signature="c2ln"), True)
        service.flush()
        (line,) = read_lines(self.path)
        self.assertEqual(list(json.loads(line)), list(JSON_KEYS) + ["signature"])


class FileTests(EventLogCase):
    def test_created_mode_0640(self):
        """A new log is created with mode 0640 (under the usual 022 umask)."""
        old = os.umask(0o022)
        try:
            self.start()
        finally:
            os.umask(old)
        self.assertEqual(FILE_MODE, 0o640)
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o640)

    def test_appends_to_existing_file(self):
        """An existing log is appended to, never truncated, and its mode is left alone."""
        with open(self.path, "wb") as f:
            f.write(b'{"old":1}\n')
        os.chmod(self.path, 0o600)
        service = self.start()
        service(make_event(), False)
        service.stopService()
        lines = read_lines(self.path)
        self.assertEqual(lines[0], b'{"old":1}')
        self.assertEqual(len(lines), 2)
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)

    def test_unwritable_path_is_output_error(self):
        """A log in a missing directory, or a path that is a directory, fails start with a
        one-line OutputError naming the path; nothing is scheduled."""
        for path in (os.path.join(self.directory, "no", "such.log"), self.directory):
            service = JSONLogService(path, reactor=self.clock, handle_sighup=False)
            error = self.assertRaises(OutputError, service.startService)
            self.assertIn(path, str(error))
            self.assertNotIn("\n", str(error))
            self.assertFalse(service.running)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_prepare_opens_once(self):
        """prepare() opens the file before start (for a start-up error) and start reuses it."""
        service = JSONLogService(self.path, reactor=self.clock, handle_sighup=False)
        service.prepare()
        self.assertTrue(os.path.exists(self.path))
        service.prepare()
        service.startService()
        service(make_event(), False)
        service.stopService()
        self.assertEqual(len(read_lines(self.path)), 1)


class BufferingTests(EventLogCase):
    def test_lines_written_within_flush_delay(self):
        """Lines wait in memory (no write per event) and are written together 0.2 s later."""
        service = self.start()
        writes = []

        def counting_write(fd, data):
            writes.append(len(data))
            return os.write(fd, data)

        service._write = counting_write
        for _ in range(100):
            service(make_event(), False)
        self.assertEqual(read_lines(self.path), [])
        self.clock.advance(0.19)
        self.assertEqual(read_lines(self.path), [])
        self.clock.advance(0.01)
        self.assertEqual(len(read_lines(self.path)), 100)
        self.assertEqual(len(writes), 1)
        self.assertEqual(service.counters()["pending"], 0)

    def test_large_buffer_written_at_once(self):
        """When 256 KiB are waiting they are written without waiting for the timer."""
        service = self.start()
        big = make_event(sip_message="x" * 70000)
        for _ in range(4):
            service(big, False)
        self.assertEqual(len(read_lines(self.path)), 4)

    def test_events_before_start_written_after(self):
        """Events given before start are kept and written once the service runs."""
        service = JSONLogService(self.path, reactor=self.clock, handle_sighup=False)
        service(make_event(), False)
        service.startService()
        self.clock.advance(0.2)
        service.stopService()
        self.assertEqual(len(read_lines(self.path)), 1)

    def test_stop_flushes_and_closes(self):
        """Stop writes what is waiting, cancels the timers and closes the file; later events are
        dropped and counted, never raised."""
        service = self.start()
        service(make_event(), False)
        service.stopService()
        self.assertEqual(len(read_lines(self.path)), 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        service(make_event(), False)
        self.assertEqual(service.dropped, 1)
        self.assertEqual(len(read_lines(self.path)), 1)

    def test_write_error_logged_once_and_retried(self):
        """A failing write (disk full) is counted, logged once, and the lines are kept and written,
        in order, by a later flush once the disk has room; the recovery is logged."""
        service = self.start()
        real_write = service._write

        def full(fd, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        service._write = full
        events = [make_event(called_number=str(n)) for n in range(6)]
        for event in events[:3]:
            service(event, False)
            self.clock.advance(1)
        self.assertGreaterEqual(service.errors, 2)
        warnings = log_text(self.observer, LogLevel.warn)
        self.assertEqual(len(warnings), 1)
        self.assertIn("No space left on device", warnings[0])
        service._write = real_write
        for event in events[3:]:
            service(event, False)
        self.clock.advance(1)
        numbers = [json.loads(line)["called_number"] for line in read_lines(self.path)]
        self.assertEqual(numbers, [str(n) for n in range(6)])
        self.assertEqual(service.written, 6)
        self.assertIn("back to normal", " ".join(log_text(self.observer, LogLevel.info)))

    def test_partial_writes(self):
        """Short writes (a pipe or a nearly full disk) keep the rest for the next flush; no line
        is cut or lost, and ``written`` counts whole lines only."""
        service = self.start()
        calls = []

        def short(fd, data):
            # Like a pipe: part of the data is taken, then the next write would block.
            calls.append(len(data))
            if len(calls) > 1:
                raise BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable")
            return os.write(fd, bytes(data[:50]))

        service._write = short
        for n in range(3):
            service(make_event(called_number=str(n)), False)
        self.clock.advance(0.2)
        self.assertEqual(service.written, 0)
        service._write = os.write
        self.clock.advance(0.2)
        lines = read_lines(self.path)
        self.assertEqual([json.loads(line)["called_number"] for line in lines], ["0", "1", "2"])
        self.assertEqual(service.written, 3)

    def test_blocked_pipe_does_not_block(self):
        """A full FIFO (EAGAIN) keeps the lines waiting instead of blocking the reactor."""
        service = self.start()

        def would_block(fd, data):
            raise BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable")

        service._write = would_block
        service(make_event(), False)
        self.clock.advance(0.2)
        self.assertEqual((service.written, service.errors), (0, 0))
        service._write = os.write
        self.clock.advance(0.2)
        self.assertEqual(service.written, 1)

    def test_buffer_limit_drops_and_counts(self):
        """While lines cannot be written, at most max_buffer_bytes wait; newer lines are dropped,
        counted and logged once."""
        service = self.start(max_buffer_bytes=2000)

        def full(fd, data):
            raise OSError(errno.EIO, "Input/output error")

        service._write = full
        for _ in range(20):
            service(make_event(), False)
        self.assertGreater(service.dropped, 10)
        self.assertLessEqual(service.counters()["pending"], 2000)
        drops = [t for t in log_text(self.observer, LogLevel.warn) if "dropping" in t]
        self.assertEqual(len(drops), 1)

    def test_buffer_drops_reported_without_recovery(self):
        """Drops while the file cannot be written are summed up within a minute, and the
        episode's total is logged at stop, even though the log never recovers."""
        service = self.start(max_buffer_bytes=2000)

        def full(fd, data):
            raise OSError(errno.EIO, "Input/output error")

        service._write = full
        for _ in range(20):
            service(make_event(), False)
        dropped = service.dropped
        self.clock.advance(60)
        warnings = " ".join(log_text(self.observer, LogLevel.warn))
        self.assertIn(f"JSON log buffering: {dropped - 1} line(s) dropped (buffer full) in the last "
                      "minute (still failing)", warnings)
        service.stopService()
        warnings = " ".join(log_text(self.observer, LogLevel.warn))
        self.assertIn(f"JSON log buffering: still failing at stop, after {dropped} line(s) dropped",
                      warnings)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_call_never_raises(self):
        """An event that cannot be encoded is counted as an error and logged, never raised into
        the pipeline."""
        service = self.start()
        service(make_event(source_port=object()), False)
        self.assertEqual(service.errors, 1)
        self.assertEqual(len(self.flushLoggedErrors(TypeError)), 1)


class RotationTests(EventLogCase):
    def test_rename_and_reopen_loses_no_line(self):
        """logrotate's ``create`` mode: the file is renamed, then reopen() (what SIGHUP runs)
        writes what was waiting to the old file and opens a new one (mode 0640); together the
        two files hold every line, in order."""
        service = self.start()
        for n in range(3):
            service(make_event(called_number=str(n)), False)
        self.clock.advance(0.2)
        service(make_event(called_number="3"), False)  # still waiting in memory
        os.rename(self.path, self.path + ".1")
        service.reopen()
        for n in range(4, 6):
            service(make_event(called_number=str(n)), False)
        service.stopService()
        old = [json.loads(x)["called_number"] for x in read_lines(self.path + ".1")]
        new = [json.loads(x)["called_number"] for x in read_lines(self.path)]
        self.assertEqual(old + new, [str(n) for n in range(6)])
        self.assertEqual(old, ["0", "1", "2", "3"])
        self.assertEqual(service.reopens, 1)
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode) & ~0o640, 0)

    def test_rename_detected_without_sighup(self):
        """Without a signal, the once-a-second check sees that the path names another file (or
        none) and reopens; no line is lost."""
        service = self.start()
        service(make_event(called_number="0"), False)
        self.clock.advance(0.2)
        os.rename(self.path, self.path + ".1")
        service(make_event(called_number="1"), False)
        self.clock.advance(0.8)
        self.assertEqual(service.reopens, 1)
        self.assertTrue(os.path.exists(self.path))
        service(make_event(called_number="2"), False)
        self.clock.advance(0.2)
        old = [json.loads(x)["called_number"] for x in read_lines(self.path + ".1")]
        new = [json.loads(x)["called_number"] for x in read_lines(self.path)]
        self.assertEqual(old + new, ["0", "1", "2"])
        self.assertEqual(new, ["2"])
        self.clock.advance(5)
        self.assertEqual(service.reopens, 1)

    def test_replaced_file_detected(self):
        """A new file put at the path (another inode) is picked up by the check."""
        service = self.start()
        os.rename(self.path, self.path + ".1")
        with open(self.path, "wb"):
            pass
        self.clock.advance(1)
        service(make_event(), False)
        self.clock.advance(0.2)
        self.assertEqual(len(read_lines(self.path)), 1)
        self.assertEqual(read_lines(self.path + ".1"), [])

    def test_copytruncate(self):
        """logrotate's ``copytruncate``: after the file is truncated in place, new lines are
        appended at its new end (O_APPEND), with no hole of NUL bytes."""
        service = self.start()
        service(make_event(), False)
        self.clock.advance(0.2)
        os.truncate(self.path, 0)
        service(make_event(), False)
        self.clock.advance(1)
        with open(self.path, "rb") as f:
            data = f.read()
        self.assertNotIn(b"\0", data)
        self.assertEqual(len(data.splitlines()), 1)
        self.assertEqual(service.reopens, 0)

    def test_reopen_failure_keeps_old_file(self):
        """When the new file cannot be opened, lines keep going to the old one (logged once) and
        the next check, once it can, opens the new file."""
        service = self.start()
        os.rename(self.path, self.path + ".1")
        os.mkdir(self.path)
        for n in range(3):
            service(make_event(called_number=str(n)), False)
            self.clock.advance(1)
        self.assertEqual(service.reopens, 0)
        self.assertEqual(len(read_lines(self.path + ".1")), 3)
        warnings = [t for t in log_text(self.observer, LogLevel.warn) if "cannot reopen" in t]
        self.assertEqual(len(warnings), 1)
        os.rmdir(self.path)
        self.clock.advance(1)
        self.assertEqual(service.reopens, 1)
        service(make_event(), False)
        self.clock.advance(0.2)
        self.assertEqual(len(read_lines(self.path)), 1)

    def test_sighup_handler_installed_and_restored(self):
        """Start installs a SIGHUP handler that reopens the log through callFromThread (chaining
        a previous Python handler); stop restores the previous handler."""
        calls = []

        def previous(signum, frame):
            calls.append(signum)

        original = signal.signal(signal.SIGHUP, previous)
        self.addCleanup(signal.signal, signal.SIGHUP, original)
        service = JSONLogService(self.path, reactor=ClockWithThreads(), handle_sighup=True)
        service.startService()
        handler = signal.getsignal(signal.SIGHUP)
        self.assertNotEqual(handler, previous)
        handler(signal.SIGHUP, None)
        self.assertEqual(service.reopens, 1)
        self.assertEqual(calls, [signal.SIGHUP])
        service.stopService()
        self.assertEqual(signal.getsignal(signal.SIGHUP), previous)


class RealSignalTests(TestCase):
    async def test_sighup_rotation_real_signal(self):
        """With the real reactor: rename the log, send this process SIGHUP, and the service
        reopens it; every line is in the rotated or the new file, none lost, and the SIGHUP
        handler is restored at stop."""
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        path = os.path.join(directory, "events.json")
        before = signal.getsignal(signal.SIGHUP)
        service = JSONLogService(path, reactor=reactor)
        service.startService()
        self.addCleanup(lambda: service.stopService() if service.running else None)
        for n in range(50):
            service(make_event(called_number=str(n)), False)
        os.rename(path, path + ".1")
        os.kill(os.getpid(), signal.SIGHUP)
        await wait_for(lambda: service.reopens == 1, timeout=5)
        for n in range(50, 100):
            service(make_event(called_number=str(n)), False)
        await wait_for(lambda: service.written == 100, timeout=5)
        service.stopService()
        self.assertEqual(signal.getsignal(signal.SIGHUP), before)
        old = [json.loads(x)["called_number"] for x in read_lines(path + ".1")]
        new = [json.loads(x)["called_number"] for x in read_lines(path)]
        # The first 50 were waiting in memory at the rename: they go to the old file.
        self.assertEqual(old, [str(n) for n in range(50)])
        self.assertEqual(new, [str(n) for n in range(50, 100)])
