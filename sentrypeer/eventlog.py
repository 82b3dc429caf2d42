"""The JSON bad-actor event log (``-j``, ``-l FILE``): one compact JSON object per line.

The format is the original's (reference §6) with the keys of interface.md §3, in that order: the
13 original keys, then our additions.  ``json.dumps(..., ensure_ascii=False, separators=(",", ":"))``
plus ``\\n``, UTF-8.  Attacker text is escaped by the JSON encoder and nothing else: a User-Agent
with quotes, newlines, ``}`` or ``<script>`` stays inside its string.  The exact bytes of a message
(``sip_message_bytes``) are not part of the JSON; they are in the database.

Differences from the original, on purpose:

* the original opened and closed the file for every event (which is how it survived logrotate);
  here the file stays open and lines are buffered for at most :data:`FLUSH_DELAY` seconds, so the
  reactor never waits on thousands of tiny writes.  Logrotate keeps working because the file is
  reopened on ``SIGHUP`` and whenever the path no longer names the open file (checked every
  :data:`CHECK_INTERVAL` seconds), whichever comes first; ``copytruncate`` works too (``O_APPEND``);
* a log that cannot be written never stops the database, syslog or the webhook (reference §14
  item 16): the error is logged once, counted, and the lines are kept and written by the next
  flush, up to :data:`MAX_BUFFER_BYTES`;
* invalid UTF-8 cannot occur (string fields are already escaped, interface.md §3), and a lone
  surrogate (from a peer's JSON) is written as a ``\\uXXXX`` escape instead of failing.

The writer opens the file with ``O_NONBLOCK``: a FIFO or pipe (``-l /dev/stdout`` in a container)
that is full delays lines instead of blocking the reactor.
"""

from __future__ import annotations

import json
import os
import re
import signal

from twisted.application.service import Service
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from sentrypeer.events import BadActorEvent
from sentrypeer.outputs import FailureEpisode, OutputError, describe_error

#: Seconds a line may wait in memory before it is written.
FLUSH_DELAY = 0.2
#: Seconds between checks that the path still names the open file (logrotate moved it).
CHECK_INTERVAL = 1.0
#: Buffered bytes that trigger a write at once rather than after :data:`FLUSH_DELAY`.
FLUSH_NOW_BYTES = 256 * 1024
#: Most bytes kept in memory while the file cannot be written; new lines beyond are dropped.
MAX_BUFFER_BYTES = 16 * 1024 * 1024
#: The permissions of a newly created log (further restricted by the umask).
FILE_MODE = 0o640

_OPEN_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY
_SURROGATE = re.compile("[\ud800-\udfff]")


def _escape_surrogate(match: re.Match) -> str:
    return "\\u%04x" % ord(match.group())


def event_json(event: BadActorEvent) -> bytes:
    """The event as compact JSON, UTF-8, without a trailing newline (the JSON log line and the
    webhook body).

    Keys are those of :meth:`BadActorEvent.to_json_dict`, in its order.  Non-ASCII text is kept as
    UTF-8 (``ensure_ascii=False``, like the original's encoder); a lone surrogate, which UTF-8
    cannot encode, becomes a JSON ``\\udXXX`` escape so the output stays valid.

    :param event: the event.
    :returns: the encoded object; never raises for an event of the documented field types.
    """
    text = json.dumps(event.to_json_dict(), ensure_ascii=False, separators=(",", ":"))
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        # Surrogates can only be inside string values (the keys are fixed ASCII), where a
        # \\uXXXX escape is valid JSON for them.
        return _SURROGATE.sub(_escape_surrogate, text).encode("utf-8")


class JSONLogService(Service):
    """Appends one JSON line per event to *path*, for collected and replicated events alike.

    Counters: ``written`` (lines handed to the kernel), ``dropped`` (lines not kept: buffer full,
    or after stop), ``errors`` (failed open/write/close calls), ``reopens``.

    :param path: the log file (relative to the working directory, as in the original).
    :param reactor: provides ``callLater`` (and ``callFromThread`` when *handle_sighup*).
    :param handle_sighup: install a ``SIGHUP`` handler that reopens the file (restored at stop).
        Tests using a fake clock pass ``False`` and call :meth:`reopen` themselves.
    :param flush_delay: seconds a line may wait in memory.
    :param check_interval: seconds between rotation checks (and retries after write errors).
    :param max_buffer_bytes: most bytes waiting in memory.
    """

    name = "json-log"
    _log = Logger(namespace="sentrypeer.eventlog")

    def __init__(
        self,
        path: str,
        *,
        reactor,
        handle_sighup: bool = True,
        flush_delay: float = FLUSH_DELAY,
        check_interval: float = CHECK_INTERVAL,
        max_buffer_bytes: int = MAX_BUFFER_BYTES,
    ) -> None:
        self.path = path
        self._reactor = reactor
        self._handle_sighup = handle_sighup
        self._flush_delay = flush_delay
        self._check_interval = check_interval
        self._max_buffer_bytes = max_buffer_bytes
        self._fd: int | None = None
        self._identity: tuple[int, int] | None = None
        self._buffer: list[bytes] = []
        self._buffered = 0
        self._flush_call = None
        self._checker: LoopingCall | None = None
        self._previous_sighup = None
        self._sighup_installed = False
        self._closed = False
        #: The write function; a seam for tests that simulate a full disk.
        self._write = os.write
        # Bounded logging (one line per episode start, a summary a minute, one at the end);
        # retried writes and reopens are only counted until they work again.
        self._write_failures = FailureEpisode(
            self._log, "JSON log writes", clock=reactor, summaries=False
        )
        self._reopen_failures = FailureEpisode(
            self._log, "JSON log reopens", clock=reactor, summaries=False
        )
        self._drops = FailureEpisode(
            self._log, "JSON log buffering", clock=reactor, noun="line(s) dropped (buffer full)"
        )
        self.written = 0
        self.dropped = 0
        self.errors = 0
        self.reopens = 0

    def __repr__(self) -> str:
        return f"<JSONLogService {self.path!r}>"

    def counters(self) -> dict[str, int]:
        """The counters, plus ``pending`` (bytes waiting in memory), for metrics."""
        return {
            "written": self.written,
            "dropped": self.dropped,
            "errors": self.errors,
            "reopens": self.reopens,
            "pending": self._buffered,
        }

    # -- life cycle -----------------------------------------------------------------------------

    def prepare(self) -> None:
        """Open the file now, so that an unusable path is a start-up error.

        Called by the root service before the reactor runs; :meth:`startService` calls it too.

        :raises OutputError: one line naming the path and the cause (missing directory,
            permission denied, a directory...).
        """
        if self._fd is not None:
            return
        try:
            self._fd, self._identity = self._open()
        except OSError as e:
            raise OutputError(f"cannot open JSON log {self.path}: {describe_error(e)}") from None
        self._closed = False

    def startService(self) -> None:
        """Open the file (see :meth:`prepare`), start the rotation check, handle ``SIGHUP``.

        :raises OutputError: when the file cannot be opened.
        """
        self.prepare()
        super().startService()
        self._checker = LoopingCall(self._check)
        self._checker.clock = self._reactor
        self._checker.start(self._check_interval, now=False)
        if self._handle_sighup:
            self._install_sighup()
        if self._buffer:
            self._schedule_flush()

    def stopService(self) -> None:
        """Write what is buffered, close the file, restore the previous ``SIGHUP`` handler.

        Lines that still cannot be written are logged as lost (their count).
        """
        super().stopService()
        if self._checker is not None and self._checker.running:
            self._checker.stop()
        self._checker = None
        self._restore_sighup()
        self._flush()
        if self._buffer:
            lost = b"".join(self._buffer).count(b"\n")
            self.dropped += lost
            self._log.error(
                "JSON log {path}: {lost} line(s) could not be written before stop",
                path=self.path,
                lost=lost,
            )
            self._buffer, self._buffered = [], 0
        for episode in (self._drops, self._write_failures, self._reopen_failures):
            episode.close()
        self._close(self._fd)
        self._fd = None
        self._closed = True

    # -- the output -----------------------------------------------------------------------------

    def __call__(self, event: BadActorEvent, replicated: bool) -> None:
        """Queue *event* as one line (collected and replicated events alike); never blocks or
        raises.  The line is written within :data:`FLUSH_DELAY` seconds."""
        try:
            if self._closed:
                self.dropped += 1
                return
            line = event_json(event) + b"\n"
            if self._buffered + len(line) > self._max_buffer_bytes:
                self.dropped += 1
                self._drops.failed(
                    "JSON log {path}: {size} bytes are waiting to be written; dropping new lines "
                    "(counted, summed up every minute) until they are",
                    path=self.path,
                    size=self._buffered,
                )
                return
            self._buffer.append(line)
            self._buffered += len(line)
            if self.running:
                if self._buffered >= FLUSH_NOW_BYTES and not self._write_failures.active:
                    self._flush()
                else:
                    self._schedule_flush()
        except Exception:
            self.errors += 1
            self._log.failure("JSON log {path}: cannot queue an event", path=self.path)

    # -- writing --------------------------------------------------------------------------------

    def _open(self) -> tuple[int, tuple[int, int]]:
        fd = os.open(self.path, _OPEN_FLAGS, FILE_MODE)
        try:
            st = os.fstat(fd)
        except OSError:
            os.close(fd)
            raise
        return fd, (st.st_dev, st.st_ino)

    def _close(self, fd: int | None) -> None:
        if fd is None:
            return
        try:
            os.close(fd)
        except OSError as e:
            self.errors += 1
            self._log.warn("JSON log {path}: close failed: {error}", path=self.path,
                           error=describe_error(e))

    def _schedule_flush(self, delay: float | None = None) -> None:
        if self._flush_call is None or not self._flush_call.active():
            self._flush_call = self._reactor.callLater(
                self._flush_delay if delay is None else delay, self._flush
            )

    def flush(self) -> None:
        """Write every buffered line now (a failed write keeps them for the next try)."""
        self._flush()

    def _flush(self) -> None:
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush_call = None
        if not self._buffer or self._fd is None:
            return
        data = b"".join(self._buffer) if len(self._buffer) > 1 else self._buffer[0]
        view = memoryview(data)
        offset = 0
        error: OSError | None = None
        try:
            while offset < len(data):
                written = self._write(self._fd, view[offset:])
                if written <= 0:
                    break
                offset += written
        except BlockingIOError:
            pass  # a full pipe or FIFO: the rest waits for the next flush
        except OSError as e:
            error = e
        finally:
            view.release()
        self.written += data.count(b"\n", 0, offset)
        rest = data[offset:]
        self._buffer = [rest] if rest else []
        self._buffered = len(rest)
        if error is not None:
            self.errors += 1
            self._write_failures.failed(
                "JSON log {path}: write failed ({error}); keeping {size} bytes to retry",
                path=self.path,
                error=describe_error(error),
                size=len(rest),
            )
        elif not rest:
            self._write_failures.succeeded()
            self._drops.succeeded()
        if rest and self.running:
            # Retry soon, but after an error not faster than the rotation check.
            self._schedule_flush(self._check_interval if error is not None else None)

    # -- rotation ---------------------------------------------------------------------------------

    def _check(self) -> None:
        """Reopen when the path names another file or none (logrotate's ``create`` mode)."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            moved = True
        except OSError:
            return  # cannot tell (e.g. a directory became unreadable): keep the open file
        else:
            moved = (st.st_dev, st.st_ino) != self._identity
        if moved:
            self.reopen()

    def reopen(self) -> None:
        """Write what is buffered to the open file, then open *path* afresh and close the old file.

        Called on ``SIGHUP`` and when the rotation check finds the file moved.  Lines are never
        lost: they end in the old file or in the new one.  When the new file cannot be opened the
        old one stays in use (logged once) and the next check tries again.
        """
        if self._fd is None or not self.running:
            return
        self._flush()
        try:
            fd, identity = self._open()
        except OSError as e:
            self.errors += 1
            self._reopen_failures.failed(
                "JSON log {path}: cannot reopen ({error}); still writing to the old file",
                path=self.path,
                error=describe_error(e),
            )
            return
        self._reopen_failures.succeeded()
        old, self._fd, self._identity = self._fd, fd, identity
        self._close(old)
        self.reopens += 1
        self._log.info("JSON log {path} reopened", path=self.path)
        if self._buffer:
            self._schedule_flush()

    def _install_sighup(self) -> None:
        if not hasattr(signal, "SIGHUP") or not hasattr(self._reactor, "callFromThread"):
            return
        try:
            self._previous_sighup = signal.signal(signal.SIGHUP, self._on_sighup)
        except ValueError:
            # Not the main thread (embedded use): rotation relies on the periodic check.
            self._log.warn("JSON log: cannot handle SIGHUP here; relying on the rotation check")
            return
        self._sighup_installed = True

    def _restore_sighup(self) -> None:
        if not self._sighup_installed:
            return
        self._sighup_installed = False
        previous = self._previous_sighup
        if previous is None:
            previous = signal.SIG_DFL  # the handler was not set from Python
        try:
            if signal.getsignal(signal.SIGHUP) == self._on_sighup:
                signal.signal(signal.SIGHUP, previous)
        except ValueError:
            pass

    def _on_sighup(self, signum, frame) -> None:
        # Runs between two bytecodes of the main thread: only hand the work to the reactor.
        self._reactor.callFromThread(self.reopen)
        previous = self._previous_sighup
        if callable(previous):
            previous(signum, frame)
