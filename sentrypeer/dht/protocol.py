"""The honeypot's side of the pipe to the DHT worker: :class:`DHTProcessProtocol`.

Newline-delimited JSON over the child's stdin and stdout (the messages are listed in
:mod:`sentrypeer.dht`). The protocol only frames and checks messages; what to do with them is the
*handler*'s business (:class:`IDHTHandler`, implemented by
:class:`sentrypeer.dht.service.DHTService`, and by fakes in tests).

Bounded: a line longer than :data:`~sentrypeer.dht.MAX_LINE_BYTES` is discarded up to its newline
and counted, never buffered; so are lines that are not a JSON object with a known ``op`` and the
right field types. The child's stderr is logged a line at a time (escaped, cut to 300 characters),
at most :data:`STDERR_LINES_PER_MINUTE` lines a minute, the rest counted.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Interface, implementer

from sentrypeer.dht import (
    MAX_LINE_BYTES,
    OP_LOG,
    OP_PUT,
    OP_PUT_DONE,
    OP_READY,
    OP_STATS,
    OP_STOP,
    OP_VALUE,
)
from sentrypeer.events import escape_for_log

#: Lines of the child's stderr logged per minute; more are counted, not logged.
STDERR_LINES_PER_MINUTE = 20
#: Longest stderr line kept, in bytes (the rest of the line is dropped).
MAX_STDERR_LINE = 4096
_LOG_LEVELS = ("debug", "info", "warn", "error")


class IDHTHandler(Interface):
    """What the protocol calls for each message from the worker (all calls on the reactor thread)."""

    def child_ready(info: dict[str, Any]) -> None:
        """The node runs: ``info`` has ``port``, ``port6``, ``node_id``, ``version``, ``permanent``."""

    def child_value(data: bytes) -> None:
        """A value was received on the key (raw bytes, not yet checked)."""

    def child_put_done(put_id: int, ok: bool, nodes: int) -> None:
        """A put finished (``ok`` False is common and not a loss, opendht-notes §4.5)."""

    def child_stats(stats: dict[str, Any]) -> None:
        """Counters from the worker (also its heartbeat)."""

    def child_log(level: str, message: str) -> None:
        """A log line from the worker (``level``: debug, info, warn or error)."""

    def child_heard() -> None:
        """Any well-formed line arrived: the worker is alive."""

    def child_ended(protocol: DHTProcessProtocol, reason: Failure) -> None:
        """The process ended (``reason.value`` is ProcessDone or ProcessTerminated)."""


@implementer(IDHTHandler)
class NullHandler:
    """A handler that ignores everything (the default until one is set)."""

    def child_ready(self, info):
        pass

    def child_value(self, data):
        pass

    def child_put_done(self, put_id, ok, nodes):
        pass

    def child_stats(self, stats):
        pass

    def child_log(self, level, message):
        pass

    def child_heard(self):
        pass

    def child_ended(self, protocol, reason):
        pass


def _decode_b64(text: Any) -> bytes | None:
    if not isinstance(text, str):
        return None
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class DHTProcessProtocol(ProcessProtocol):
    """Frames the worker's stdout into messages and writes commands to its stdin.

    :param handler: an :class:`IDHTHandler`.
    :param clock: for the stderr rate limit.
    :ivar malformed: lines from the child that were ignored (too long, not JSON, unknown ``op``,
        wrong field types).
    :ivar stderr_dropped: stderr lines not logged because of the rate limit.
    :ivar ended: whether :meth:`processEnded` ran.
    """

    _log = Logger(namespace="sentrypeer.dht")

    def __init__(self, handler: IDHTHandler, clock: IReactorTime) -> None:
        self.handler = handler
        self.clock = clock
        self.malformed = 0
        self.lines = 0
        self.stderr_dropped = 0
        self.ended = False
        self._buffer = b""
        self._discarding = False
        self._err_buffer = b""
        self._err_discarding = False
        self._err_window_start = 0.0
        self._err_window_count = 0

    # -- to the child -------------------------------------------------------------------------

    def send(self, message: dict[str, Any]) -> bool:
        """Write *message* as one line to the child's stdin.

        :returns: ``False`` when the child is gone (nothing written).
        """
        if self.transport is None or self.ended:
            return False
        line = json.dumps(message, separators=(",", ":")).encode("ascii") + b"\n"
        self.transport.write(line)
        return True

    def send_put(self, put_id: int, data: bytes) -> bool:
        """Ask the child to put *data* (the value bytes) permanently on the key."""
        return self.send({"op": OP_PUT, "id": put_id, "data": base64.b64encode(data).decode("ascii")})

    def send_stop(self) -> bool:
        """Ask the child to leave the network and exit, then close its stdin."""
        sent = self.send({"op": OP_STOP})
        if sent:
            self.transport.closeStdin()
        return sent

    def request_stats(self) -> bool:
        """Ask the child for a ``stats`` message now."""
        return self.send({"op": OP_STATS})

    # -- from the child -----------------------------------------------------------------------

    def outReceived(self, data: bytes) -> None:
        buffer = self._buffer + data
        start = 0
        while True:
            end = buffer.find(b"\n", start)
            if end < 0:
                break
            line = buffer[start:end]
            start = end + 1
            if self._discarding:
                self._discarding = False  # the end of an over-long line
                continue
            if len(line) + 1 > MAX_LINE_BYTES:
                self.malformed += 1
                continue
            self._line(line)
            if self.ended:
                return
        rest = buffer[start:]
        if self._discarding:
            rest = b""
        elif len(rest) >= MAX_LINE_BYTES:
            self.malformed += 1
            self._discarding = True
            rest = b""
        self._buffer = rest

    def _line(self, line: bytes) -> None:
        self.lines += 1
        try:
            message = json.loads(line)
        except (ValueError, RecursionError):
            message = None
        if not isinstance(message, dict) or not self._dispatch(message):
            self.malformed += 1

    def _dispatch(self, message: dict[str, Any]) -> bool:
        """Call the handler for a well-formed *message*; ``False`` when it is not one."""
        op = message.get("op")
        handler = self.handler
        if op == OP_VALUE:
            data = _decode_b64(message.get("data"))
            if data is None:
                return False
            handler.child_heard()
            handler.child_value(data)
        elif op == OP_PUT_DONE:
            put_id, ok, nodes = message.get("id"), message.get("ok"), message.get("nodes", 0)
            if not _is_int(put_id) or not isinstance(ok, bool) or not _is_int(nodes):
                return False
            handler.child_heard()
            handler.child_put_done(put_id, ok, nodes)
        elif op == OP_STATS:
            handler.child_heard()
            handler.child_stats({k: v for k, v in message.items() if k != "op"})
        elif op == OP_READY:
            port, node_id = message.get("port"), message.get("node_id")
            if not _is_int(port) or not isinstance(node_id, str):
                return False
            handler.child_heard()
            handler.child_ready({k: v for k, v in message.items() if k != "op"})
        elif op == OP_LOG:
            level, text = message.get("level"), message.get("message")
            if level not in _LOG_LEVELS or not isinstance(text, str):
                return False
            handler.child_heard()
            handler.child_log(level, text)
        else:
            return False
        return True

    def errReceived(self, data: bytes) -> None:
        buffer = self._err_buffer + data
        lines = buffer.split(b"\n")
        rest = lines.pop()
        for line in lines:
            if self._err_discarding:
                self._err_discarding = False
                continue
            self._stderr_line(line)
        if self._err_discarding:
            rest = b""
        elif len(rest) > MAX_STDERR_LINE:
            self._stderr_line(rest)
            self._err_discarding = True
            rest = b""
        self._err_buffer = rest

    def _stderr_line(self, line: bytes) -> None:
        line = line.rstrip(b"\r")
        if not line.strip():
            return
        now = self.clock.seconds()
        if now - self._err_window_start >= 60:
            if self.stderr_dropped:
                self._log.warn(
                    "DHT worker: {count} more stderr line(s) not logged", count=self.stderr_dropped
                )
                self.stderr_dropped = 0
            self._err_window_start = now
            self._err_window_count = 0
        self._err_window_count += 1
        if self._err_window_count > STDERR_LINES_PER_MINUTE:
            self.stderr_dropped += 1
            return
        text = line.decode("utf-8", "backslashreplace")
        self._log.warn("DHT worker stderr: {line}", line=escape_for_log(text, 300))

    def processEnded(self, reason: Failure) -> None:
        self.ended = True
        if self._err_buffer:
            self._stderr_line(self._err_buffer)
            self._err_buffer = b""
        self.handler.child_ended(self, reason)
