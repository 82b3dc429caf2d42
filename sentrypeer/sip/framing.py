"""Cut a TCP or TLS byte stream into SIP messages (RFC 3261 §18.3), incrementally.

Pure module: no Twisted import, no I/O. The transport feeds whatever bytes arrive to
:meth:`StreamFramer.feed` and acts on the returned :class:`Frame` objects; it calls
:meth:`StreamFramer.flush` after a quiet period and :meth:`StreamFramer.close` when the connection
ends or idles out.

Rules (RFC 3261 §18.3, RFC 5626 §3.5.1, interface.md §3):

* A message is its header block, up to and including the first empty line (CRLFCRLF, or LFLF
  from LF-only senders), then exactly Content-Length body bytes (header ``Content-Length`` or
  compact ``l``).
* Between messages, ``CRLFCRLF`` is a keep-alive ping (one :data:`PING` frame; the transport
  answers CRLF); a lone CRLF is ignored.
* A first line that is a status line makes a :data:`RESPONSE` frame: framed like a request, never
  an event.
* On a fresh connection, bytes that cannot start a request or status line make one
  :data:`NON_SIP` frame and the connection is closed.
* A message without Content-Length takes every following line that does not start a new request
  or status line as its body; it is complete when such a line arrives, on :meth:`flush` or on
  :meth:`close`. After a message with a Content-Length, lines that do not start a request or
  status line are discarded, one :data:`STRAY` frame per line.
* Limits: the header block may not exceed ``max_header_bytes`` (counted from its first byte) and
  the body ``max_body_bytes``; beyond, the message is cut there and reported :data:`TRUNCATED`
  and the connection closed. An invalid Content-Length (negative, not a number, conflicting
  values) makes a :data:`MESSAGE` of the header block alone, then the connection is closed.

Every decision depends only on the bytes received so far, never on how they were split into
``feed()`` calls, so any segmentation gives the same frames. The one documented exception is the
data of a :data:`NON_SIP` frame, which also takes the rest of the ``feed()`` call that revealed the
probe (the most complete record of it), up to ``max_header_bytes + max_body_bytes`` bytes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from sentrypeer.sip import message as _message
from sentrypeer.sip.message import (
    CL_ABSENT,
    CL_INVALID,
    CL_VALID,
    StartLineWatcher,
    content_length_info,
    start_line_kind,
)

#: Frame kinds.
MESSAGE = "message"
TRUNCATED = "truncated"
NON_SIP = "non_sip"
PING = "ping"
RESPONSE = "response"
STRAY = "stray"

_LINE_NON_SIP = _message.NON_SIP
_LINE_RESPONSE = _message.RESPONSE
_PING_BYTES = b"\r\n\r\n"
_LINE_ENDS = re.compile(rb"[\r\n]*")

# Framer states.
_IDLE = 0  # between messages: only CR/LF seen since the last unit
_FIRST_LINE = 1  # a unit started; its first line is incomplete
_HEADERS = 2  # a request or status line was read; looking for the empty line
_BODY = 3  # header block read, Content-Length known; waiting for the body
_BODY_NO_CL = 4  # header block read without Content-Length; lines join the body


@dataclass(frozen=True, slots=True)
class Frame:
    """One unit cut from the stream.

    :ivar kind: :data:`MESSAGE`, :data:`TRUNCATED`, :data:`NON_SIP`, :data:`PING`,
        :data:`RESPONSE` or :data:`STRAY`.
    :ivar data: the exact bytes of the message or probe (for :data:`PING` the four ping bytes,
        for :data:`STRAY` the discarded bytes).
    :ivar close: the transport must close the connection after handling this frame.
    :ivar reason: short text for :data:`TRUNCATED`, :data:`NON_SIP`, :data:`STRAY` and closing
        frames; empty otherwise.
    """

    kind: str
    data: bytes = b""
    close: bool = False
    reason: str = ""


class StreamFramer:
    """Incremental SIP stream framer for one TCP or TLS connection (RFC 3261 §18.3).

    Memory is bounded: apart from the bytes of the ``feed()`` call being processed, at most
    ``max_header_bytes + max_body_bytes`` bytes are kept.

    :param max_header_bytes: largest header block (start line, header fields and the empty line),
        in bytes.
    :param max_body_bytes: largest body, in bytes.
    """

    def __init__(self, max_header_bytes: int = 16384, max_body_bytes: int = 65536) -> None:
        if max_header_bytes < 1 or max_body_bytes < 0:
            raise ValueError("limits must be positive")
        self._max_header = max_header_bytes
        self._max_body = max_body_bytes
        self._buf = bytearray()
        self._state = _IDLE
        self._closed = False
        self._seen_message = False  # a message or response was framed on this connection
        self._ping = 0  # bytes of _PING_BYTES matched while idle
        self._reset_unit()

    def _reset_unit(self) -> None:
        self._watcher = StartLineWatcher()
        self._scan = 0  # where the next search for LF resumes
        self._is_response = False
        self._body_start = 0
        self._need = 0  # total unit length (header block + body) to wait for
        self._over = False  # declared body larger than max_body_bytes
        self._line_start = 0  # start of the current line in a no-Content-Length body

    @property
    def pending(self) -> bool:
        """True while a partial message, a message without Content-Length or a partial line is
        buffered (:meth:`flush` or :meth:`close` would act on it)."""
        return self._state != _IDLE and not self._closed

    @property
    def buffered(self) -> int:
        """Bytes currently held (at most ``max_header_bytes + max_body_bytes`` between calls)."""
        return len(self._buf)

    @property
    def closed(self) -> bool:
        """True once a frame with ``close=True`` was returned or :meth:`close` was called; from
        then on :meth:`feed` returns nothing."""
        return self._closed

    def feed(self, data: bytes) -> list[Frame]:
        """Take the next bytes of the stream.

        :param data: bytes as received, any length.
        :returns: the frames completed by these bytes, in stream order.
        """
        if self._closed or not data:
            return []
        self._buf += data
        out: list[Frame] = []
        while not self._closed and self._step(out):
            pass
        return out

    def flush(self) -> list[Frame]:
        """The peer has been quiet: complete a message sent without Content-Length.

        A partial message (incomplete header block, or body shorter than its Content-Length)
        stays pending.

        :returns: at most one :data:`MESSAGE` or :data:`RESPONSE` frame.
        """
        if self._closed or self._state != _BODY_NO_CL:
            return []
        out: list[Frame] = []
        self._emit_unit(out, len(self._buf))
        return out

    def close(self) -> list[Frame]:
        """The connection ended or idled out: report what is buffered and stop.

        A message without Content-Length is complete (:data:`MESSAGE`); any other partial
        message is :data:`TRUNCATED` (a partial response is a :data:`RESPONSE` frame, never an
        event); a partial line that cannot be SIP is :data:`NON_SIP` on a fresh connection and
        :data:`STRAY` after a message; bare line ends give nothing.

        :returns: zero or one frame.
        """
        if self._closed:
            return []
        out: list[Frame] = []
        data = bytes(self._buf)
        if self._state == _BODY_NO_CL:
            self._emit_unit(out, len(self._buf))
        elif self._state == _FIRST_LINE and not self._watcher.possible:
            if self._seen_message:
                out.append(Frame(STRAY, data, reason="stray bytes at connection end"))
            else:
                out.append(Frame(NON_SIP, data, close=True, reason="not SIP"))
        elif self._state != _IDLE:
            if self._is_response or (self._state == _FIRST_LINE and data[:4].upper() == b"SIP/"):
                out.append(Frame(RESPONSE, data, reason="incomplete response at connection end"))
            else:
                out.append(
                    Frame(
                        TRUNCATED, data, close=True, reason="incomplete message at connection end"
                    )
                )
        self._finish()
        return out

    # -- internals -------------------------------------------------------------------------

    def _finish(self) -> None:
        self._closed = True
        self._buf = bytearray()
        self._state = _IDLE

    def _consume(self, n: int) -> bytes:
        """Remove and return the first *n* buffered bytes."""
        chunk = bytes(self._buf[:n])
        del self._buf[:n]
        return chunk

    def _emit_unit(self, out: list[Frame], end: int) -> None:
        """Frame the first *end* bytes as a complete message or response; back to idle."""
        out.append(Frame(RESPONSE if self._is_response else MESSAGE, self._consume(end)))
        self._seen_message = True
        self._state = _IDLE
        self._ping = 0
        self._reset_unit()

    def _emit_closing(self, out: list[Frame], kind: str, data: bytes, reason: str) -> None:
        if kind == TRUNCATED and self._is_response:
            kind = RESPONSE
        out.append(Frame(kind, data, close=True, reason=reason))
        self._finish()

    def _step(self, out: list[Frame]) -> bool:
        """Advance the state machine once; False when more bytes are needed."""
        state = self._state
        if state == _IDLE:
            return self._step_idle(out)
        if state == _FIRST_LINE:
            return self._step_first_line(out)
        if state == _HEADERS:
            return self._step_headers(out)
        if state == _BODY:
            return self._step_body(out)
        return self._step_body_no_cl(out)

    def _step_idle(self, out: list[Frame]) -> bool:
        buf = self._buf
        if not buf:
            return False
        run = _LINE_ENDS.match(buf).end()
        if run:
            chunk = self._consume(run)
            state = self._ping
            if state == 0 and chunk == b"\r\n" * (run // 2):
                out.extend(Frame(PING, _PING_BYTES) for _ in range(run // 4))
                self._ping = 2 if run % 4 else 0
            else:
                for byte in chunk:
                    if byte == _PING_BYTES[state]:
                        state += 1
                        if state == 4:
                            out.append(Frame(PING, _PING_BYTES))
                            state = 0
                    else:
                        state = 1 if byte == 0x0D else 0
                self._ping = state
            return bool(buf)
        self._ping = 0
        self._state = _FIRST_LINE
        self._reset_unit()
        return True

    def _step_first_line(self, out: list[Frame]) -> bool:
        buf = self._buf
        limit = min(len(buf), self._max_header)
        lf = buf.find(b"\n", self._scan, limit)
        if lf >= 0:
            kind = start_line_kind(bytes(buf[:lf]))
            if kind == _LINE_NON_SIP:
                if self._seen_message:
                    out.append(Frame(STRAY, self._consume(lf + 1), reason="stray line"))
                    self._state = _IDLE
                    self._reset_unit()
                    return True
                self._non_sip(out)
                return True
            self._is_response = kind == _LINE_RESPONSE
            self._state = _HEADERS
            self._scan = lf
            return True
        if self._watcher.possible:
            self._watcher.feed(bytes(buf[self._scan : limit]))
        self._scan = limit
        if not self._watcher.possible and not self._seen_message:
            self._non_sip(out)
            return True
        if len(buf) >= self._max_header:
            if not self._watcher.possible:
                self._emit_closing(
                    out, STRAY, self._consume(self._max_header), "over-long stray line"
                )
            else:
                self._is_response = bytes(buf[:4]).upper() == b"SIP/"
                self._emit_closing(
                    out, TRUNCATED, self._consume(self._max_header), "header block too large"
                )
            return True
        return False

    def _non_sip(self, out: list[Frame]) -> None:
        cap = self._max_header + self._max_body
        self._emit_closing(out, NON_SIP, bytes(self._buf[:cap]), "not SIP")

    def _find_header_end(self) -> int:
        """Offset just past the empty line ending the header block, or -1 (not yet seen).

        Only an empty line that ends within the first ``max_header_bytes`` counts.
        """
        buf = self._buf
        limit = min(len(buf), self._max_header)
        j = self._scan
        while True:
            j = buf.find(b"\n", j, limit)
            if j < 0:
                self._scan = max(self._scan, limit)
                return -1
            if j + 1 >= limit:
                self._scan = j
                return -1
            nxt = buf[j + 1]
            if nxt == 0x0A:
                return j + 2
            if nxt == 0x0D:
                if j + 2 >= limit:
                    self._scan = j
                    return -1
                if buf[j + 2] == 0x0A:
                    return j + 3
            j += 1

    def _step_headers(self, out: list[Frame]) -> bool:
        end = self._find_header_end()
        if end < 0:
            if len(self._buf) >= self._max_header:
                self._emit_closing(
                    out, TRUNCATED, self._consume(self._max_header), "header block too large"
                )
                return True
            return False
        kind, length = content_length_info(bytes(self._buf[:end]))
        self._body_start = end
        if kind == CL_ABSENT:
            self._state = _BODY_NO_CL
            self._scan = self._line_start = end
            return True
        if kind == CL_INVALID:
            self._emit_closing(
                out,
                RESPONSE if self._is_response else MESSAGE,
                self._consume(end),
                "invalid Content-Length",
            )
            return True
        if kind == CL_VALID and length <= self._max_body:
            self._need = end + length
        else:
            self._need = end + self._max_body
            self._over = True
        self._state = _BODY
        return True

    def _step_body(self, out: list[Frame]) -> bool:
        if len(self._buf) < self._need:
            return False
        if self._over:
            self._emit_closing(out, TRUNCATED, self._consume(self._need), "body too large")
        else:
            self._emit_unit(out, self._need)
        return True

    def _step_body_no_cl(self, out: list[Frame]) -> bool:
        buf = self._buf
        window = min(len(buf), self._body_start + self._max_body + 1)
        while True:
            lf = buf.find(b"\n", self._scan, window)
            if lf < 0:
                self._scan = window
                break
            start = self._line_start
            self._scan = self._line_start = lf + 1
            if lf - start > self._max_header:
                continue  # far too long to be a start line
            kind = start_line_kind(bytes(buf[start:lf]))
            if kind != _LINE_NON_SIP:
                self._emit_unit(out, start)
                self._state = _HEADERS
                self._is_response = kind == _LINE_RESPONSE
                self._scan = lf - start
                return True
        if len(buf) - self._body_start > self._max_body:
            self._emit_closing(
                out,
                TRUNCATED,
                self._consume(self._body_start + self._max_body),
                "body too large",
            )
            return True
        return False
