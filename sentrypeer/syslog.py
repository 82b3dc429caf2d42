"""Syslog output (``-s``): one RFC 3164 datagram per event on the local syslog socket, for Fail2ban.

The message is the original's (reference §7): ident ``sentrypeer`` with the PID, facility USER,
severity NOTICE, text ``Source IP: <ip>, Method: <method>, Agent: <user agent>``.  A syslog file
then shows::

    Nov 30 21:32:16 host sentrypeer[303741]: Source IP: 203.0.113.7, Method: OPTIONS, Agent: sipsak 0.9.7

and the shipped Fail2ban filter (``contrib/fail2ban/filter.d/sentrypeer.conf``) bans the address.

Choices made here:

* The datagram is ``<13>sentrypeer[PID]: MSG``, without the RFC 3164 timestamp and hostname.  On
  the local socket the receiver stamps the time and host itself: journald parses
  ``<PRI>TAG[PID]: MSG`` into ``SYSLOG_IDENTIFIER``/``SYSLOG_PID``/``MESSAGE``, rsyslog's imuxsock
  does not parse a hostname from local messages and uses the reception time when there is no
  timestamp.  Leaving them out avoids a local-time clock formatter on the hot path and keeps the
  line identical for both receivers.
* It goes through a Twisted UNIX datagram transport (``connectUNIXDatagram``), never blocking.
  A receiver that is momentarily busy (``EAGAIN``/``ENOBUFS``: its queue holds only
  ``net.unix.max_dgram_qlen`` datagrams, often 10) does not lose lines: they wait, in order, in a
  bounded in-memory FIFO (:data:`MAX_PENDING` lines, :data:`MAX_PENDING_BYTES` bytes) and are
  resent as soon as the reactor reports the socket writable again (Linux does so when the
  receiver's queue has room) and, failing that, on a short timer (:data:`RESEND_DELAY` seconds,
  doubling up to :data:`MAX_RESEND_DELAY` while the receiver stays busy) until it takes them.
  Lines are dropped (counted) only when that FIFO is full; what is still in it at stop is
  counted and logged.
* A receiver that goes away (``ECONNREFUSED``, e.g. rsyslog or journald restarting) is
  reconnected at once, then after a short growing delay (:data:`FIRST_RETRY` seconds, doubling up
  to :data:`RETRY_INTERVAL`); lines produced meanwhile wait in the same FIFO and are delivered,
  in order, when it is back.
* No socket at all (Debian 12 containers often have no ``/dev/log``): one warning, then new
  attempts on the same growing delay; until a receiver has been reached once, lines are dropped
  (counted), not kept, since there may never be one.
* Logging is bounded (:class:`~sentrypeer.outputs.FailureEpisode`): one line when a busy,
  unavailable or full-buffer episode starts, at most one summary line a minute while it lasts,
  one line with the total at its end; never one line per event.
* The source address is ours (the socket's) and is checked to be an IP address; method and user
  agent are attacker text: every character outside printable ASCII, the backslash and the colon
  are written as ``\\xNN``/``\\uNNNN``/``\\UNNNNNNNN`` escapes, so the line has no CR/LF or other
  control character, is pure ASCII, and attacker text can never contain ``Source IP:``, a
  ``sentrypeer[1]:`` tag or an IPv6 address that a looser filter might pick up.  Long values are
  cut (:data:`MAX_METHOD`, :data:`MAX_AGENT` characters, then ``...``).
* Events replicated from peers are sent only with ``include_peers`` (``--syslog-peers``):
  Fail2ban must not ban on the word of unauthenticated peers (reference §7, §14 item 22).
"""

from __future__ import annotations

import errno
import ipaddress
import os
import re
import stat
from collections import deque

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.protocol import ConnectedDatagramProtocol
from twisted.logger import Logger, LogLevel

from sentrypeer.events import BadActorEvent
from sentrypeer.outputs import FailureEpisode, describe_error

#: RFC 3164/5424 facility USER (1) and severity NOTICE (5): PRI = 1 * 8 + 5.
FACILITY_USER = 1
SEVERITY_NOTICE = 5
PRI = FACILITY_USER * 8 + SEVERITY_NOTICE
IDENT = "sentrypeer"
#: Seconds before the first new attempt to reach a missing or lost syslog socket; doubled after
#: each failed attempt up to RETRY_INTERVAL.
FIRST_RETRY = 0.2
RETRY_INTERVAL = 30.0
#: Most lines, and bytes, waiting in memory for a busy or restarting receiver.
MAX_PENDING = 10_000
MAX_PENDING_BYTES = 4 * 1024 * 1024
#: Seconds before waiting lines are resent to a busy receiver; doubled while it stays busy, up to
#: MAX_RESEND_DELAY.
RESEND_DELAY = 0.01
MAX_RESEND_DELAY = 0.05
#: Most waiting lines sent in one reactor turn (the rest go on the next turn).
RESEND_BATCH = 1000
#: Characters of the method and of the user agent shown (before escaping).
MAX_METHOD = 64
MAX_AGENT = 256

# What is shown as is: printable ASCII (0x20-0x7e) except the colon (0x3a) and the backslash (0x5c).
_UNSAFE = re.compile(r"[^\x20-\x39\x3b-\x5b\x5d-\x7e]")
_BUSY_ERRNOS = frozenset({errno.EAGAIN, errno.EWOULDBLOCK, errno.ENOBUFS, errno.ENOMEM})
# Outcomes of SyslogService._send.
_SENT, _BUSY, _LOST = object(), object(), object()


def _escape_char(match: re.Match) -> str:
    code = ord(match.group())
    if code < 0x100:
        return "\\x%02x" % code
    if code < 0x10000:
        return "\\u%04x" % code
    return "\\U%08x" % code


def escape_field(text: str | None, limit: int) -> str:
    """Make attacker text safe for one syslog line and for the Fail2ban filter.

    Every character that is not printable ASCII, and ``\\`` and ``:``, becomes ``\\xNN``,
    ``\\uNNNN`` or ``\\UNNNNNNNN`` (a newline is ``\\x0a``); text longer than *limit* characters
    is cut and ends in ``...``.

    :param text: attacker text; ``None`` shows as ``NOT_FOUND``.
    :param limit: the most characters of *text* kept.
    :returns: printable ASCII containing neither ``:`` nor an unescaped ``\\``.
    """
    if text is None:
        return "NOT_FOUND"
    cut = text[:limit]
    shown = _UNSAFE.sub(_escape_char, cut)
    return shown + ("..." if len(text) > limit else "")


def format_message(event: BadActorEvent, pid: int) -> bytes | None:
    """The datagram for *event*: ``<13>sentrypeer[PID]: Source IP: <ip>, Method: <m>, Agent: <ua>``.

    :param event: the event; its ``source_ip`` must be an IPv4 or IPv6 address (an IPv4-mapped
        IPv6 address is shown as IPv4).
    :param pid: the process id shown in the tag.
    :returns: ASCII bytes, or ``None`` when ``source_ip`` is not an IP address (such a line would
        be useless to Fail2ban and could only be misleading).
    """
    try:
        ip = ipaddress.ip_address(event.source_ip)
    except (ValueError, TypeError):
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    text = "<%d>%s[%d]: Source IP: %s, Method: %s, Agent: %s" % (
        PRI,
        IDENT,
        pid,
        ip,
        escape_field(event.sip_method, MAX_METHOD),
        escape_field(event.sip_user_agent, MAX_AGENT),
    )
    return text.encode("ascii")


class _SyslogProtocol(ConnectedDatagramProtocol):
    """Reports the socket's fate to the service; nothing is ever read."""

    def __init__(self, service: SyslogService) -> None:
        self._service = service

    def datagramReceived(self, datagram) -> None:
        pass

    def connectionFailed(self, failure) -> None:
        self._service._connection_failed(self, failure.value)

    def connectionRefused(self) -> None:
        self._service._connection_refused(self)


class SyslogService(Service):
    """Sends one syslog datagram per event to the Unix socket *socket_path*.

    Counters: ``sent``, ``dropped`` (no receiver reached yet, the waiting lines' FIFO full, or
    still waiting at stop), ``skipped`` (peer events without *include_peers*), ``invalid`` (no IP
    address in ``source_ip``), ``errors`` (unexpected failures), ``reconnects``; ``pending`` is
    the number of lines waiting in memory.

    :param socket_path: the syslog socket, ``/dev/log`` by default (``--syslog-socket``).
    :param reactor: provides ``connectUNIXDatagram``, ``callLater`` and ``seconds``.
    :param include_peers: also send events replicated from peers (``--syslog-peers``).
    :param pid: the PID shown in the tag; default: this process's, read at start (after twistd
        may have forked).
    :param retry_interval: the longest delay between attempts to reach a missing socket, seconds.
    :param first_retry: the first such delay (doubled after each failed attempt).
    :param max_pending: most lines waiting in memory.
    :param max_pending_bytes: most bytes of lines waiting in memory.
    :param resend_delay: seconds before waiting lines are resent to a busy receiver.
    :param max_resend_delay: the longest such delay while it stays busy.
    """

    name = "syslog"
    _log = Logger(namespace="sentrypeer.syslog")

    def __init__(
        self,
        socket_path: str,
        *,
        reactor,
        include_peers: bool = False,
        pid: int | None = None,
        retry_interval: float = RETRY_INTERVAL,
        first_retry: float = FIRST_RETRY,
        max_pending: int = MAX_PENDING,
        max_pending_bytes: int = MAX_PENDING_BYTES,
        resend_delay: float = RESEND_DELAY,
        max_resend_delay: float = MAX_RESEND_DELAY,
    ) -> None:
        self.socket_path = socket_path
        self.include_peers = include_peers
        self._reactor = reactor
        self._pid = pid
        self._retry_interval = retry_interval
        self._first_retry = min(first_retry, retry_interval)
        self._next_retry = self._first_retry
        self._max_pending = max_pending
        self._max_pending_bytes = max_pending_bytes
        self._first_resend = resend_delay
        self._max_resend = max(resend_delay, max_resend_delay)
        self._next_resend = resend_delay
        self._pending: deque[bytes] = deque()
        self._pending_bytes = 0
        self._port = None
        self._protocol: _SyslogProtocol | None = None
        self._retry_call = None
        self._resend_call = None
        self._writing = False  # whether the reactor watches the socket for writability
        self._no_receiver_drops = 0
        self._failed_reason: BaseException | None = None
        self._unavailable = FailureEpisode(
            self._log, "syslog socket connections", clock=reactor, noun="failed attempt(s)",
            summaries=False,
        )
        self._busy = FailureEpisode(
            self._log, "syslog receiver", clock=reactor, level=LogLevel.info,
            noun="line(s) delayed (receiver busy)",
        )
        self._overflow = FailureEpisode(
            self._log, "syslog buffer", clock=reactor, noun="line(s) dropped (buffer full)"
        )
        self._error_logged = False
        self._connected_once = False
        self.sent = 0
        self.dropped = 0
        self.skipped = 0
        self.invalid = 0
        self.errors = 0
        self.reconnects = 0

    def __repr__(self) -> str:
        return f"<SyslogService {self.socket_path!r}>"

    @property
    def connected(self) -> bool:
        """Whether a socket to the syslog receiver is open."""
        return self._port is not None

    @property
    def pending(self) -> int:
        """Lines waiting in memory for the receiver."""
        return len(self._pending)

    def counters(self) -> dict[str, int]:
        """The counters and ``pending``, for metrics."""
        return {
            "sent": self.sent,
            "dropped": self.dropped,
            "skipped": self.skipped,
            "invalid": self.invalid,
            "errors": self.errors,
            "reconnects": self.reconnects,
            "pending": self.pending,
        }

    # -- life cycle -----------------------------------------------------------------------------

    def prepare(self) -> None:
        """Nothing can make syslog a start-up failure (a missing socket is only a warning)."""

    def startService(self) -> None:
        """Fix the PID and connect (or warn once and retry on a growing delay)."""
        super().startService()
        if self._pid is None:
            self._pid = os.getpid()
        self._next_retry = self._first_retry
        self._connect()

    def stopService(self):
        """Stop retrying, offer the waiting lines to the receiver one last time (without
        waiting), count and log those it did not take, and close the socket.

        :returns: a Deferred that fires when the socket is closed, or ``None``.
        """
        super().stopService()
        for name in ("_retry_call", "_resend_call"):
            call = getattr(self, name)
            if call is not None and call.active():
                call.cancel()
            setattr(self, name, None)
        self._flush(last=True)
        if self._pending:
            lost = len(self._pending)
            self.dropped += lost
            self._log.warn(
                "syslog: {count} line(s) not delivered to {path} at stop",
                count=lost,
                path=self.socket_path,
            )
            self._pending.clear()
            self._pending_bytes = 0
        if self._no_receiver_drops:
            self._log.info(
                "syslog: {count} line(s) were not sent: no receiver was reached on {path}",
                count=self._no_receiver_drops,
                path=self.socket_path,
            )
            self._no_receiver_drops = 0
        for episode in (self._overflow, self._busy, self._unavailable):
            episode.close()
        return self._disconnect()

    # -- the output -----------------------------------------------------------------------------

    def __call__(self, event: BadActorEvent, replicated: bool) -> None:
        """Send *event* to syslog (a replicated one only with *include_peers*), or keep it in
        order behind the lines already waiting; never blocks or raises."""
        try:
            if replicated and not self.include_peers:
                self.skipped += 1
                return
            data = format_message(event, self._pid if self._pid is not None else os.getpid())
            if data is None:
                self.invalid += 1
                return
            self._deliver(data)
        except Exception:
            self.errors += 1
            if not self._error_logged:
                self._error_logged = True
                self._log.failure("syslog: cannot send an event (logged once)")

    def _deliver(self, data: bytes) -> None:
        if not self.running or (self._port is None and not self._connected_once):
            # Stopped, or no receiver ever reached (maybe none will ever be): not kept.
            self.dropped += 1
            if self.running:
                self._no_receiver_drops += 1
            return
        if self._port is not None and not self._pending:
            outcome = self._send(data)
            if outcome is _SENT:
                self.sent += 1
                return
            if not self._enqueue(data):
                return
            if outcome is _BUSY:
                self._line_delayed()
                self._schedule_resend()
                self._watch_writable(True)
            else:
                # The receiver went away (a restart re-creates the socket): reconnect now; the
                # line is sent (after any other waiting one) once connected.
                self._connect()
            return
        if self._enqueue(data) and self._port is not None:
            self._line_delayed()

    def _line_delayed(self) -> None:
        self._busy.failed(
            "syslog: the receiver on {path} is busy; lines wait in memory (at most {count}) and "
            "are resent in order until it takes them",
            path=self.socket_path,
            count=self._max_pending,
        )

    def _enqueue(self, data: bytes) -> bool:
        """Append *data* to the waiting lines; ``False`` (dropped, counted) when they are full."""
        if (
            len(self._pending) >= self._max_pending
            or self._pending_bytes + len(data) > self._max_pending_bytes
        ):
            self.dropped += 1
            self._overflow.failed(
                "syslog: {count} line(s) ({size} bytes) are waiting for {path}; new lines are "
                "dropped (counted, summed up every minute) until they are delivered",
                count=len(self._pending),
                size=self._pending_bytes,
                path=self.socket_path,
            )
            return False
        self._pending.append(data)
        self._pending_bytes += len(data)
        return True

    def _send(self, data: bytes) -> object:
        """Write one datagram (with a socket); returns :data:`_SENT`, :data:`_BUSY` (the receiver
        did not take it) or :data:`_LOST` (the socket failed and is now closed)."""
        port = self._port
        try:
            result = port.write(data)
        except OSError as e:
            if e.errno in _BUSY_ERRNOS:
                return _BUSY
            self._lost(e)
            return _LOST
        if result is None:
            # Twisted swallows EAGAIN, and reports ECONNREFUSED through the protocol (which
            # closed the socket, see _connection_refused).
            return _BUSY if self._port is port else _LOST
        return _SENT

    def _schedule_resend(self, delay: float | None = None) -> None:
        if self.running and (self._resend_call is None or not self._resend_call.active()):
            self._resend_call = self._reactor.callLater(
                self._next_resend if delay is None else delay, self._flush
            )

    def _watch_writable(self, on: bool) -> None:
        """Have the reactor call :meth:`_on_writable` when the socket can take a datagram again
        (or stop that).  Twisted's datagram ports do not offer this, so the port's ``doWrite``
        is pointed at this service; a port without ``startWriting`` (a test's fake) is left to
        the resend timer."""
        port = self._port
        if port is None or on == self._writing:
            return
        try:
            if on:
                port.doWrite = self._on_writable
                port.startWriting()
            else:
                port.stopWriting()
        except Exception:
            self._writing = False
            return
        self._writing = on

    def _on_writable(self) -> None:
        self._flush(woken=True)

    def _flush(self, last: bool = False, woken: bool = False) -> None:
        """Send the waiting lines, in order, until the receiver is busy again (then wait until
        the socket is writable, or a short, growing delay) or the socket is lost (then
        reconnect).

        :param last: at stop: do not schedule anything.
        :param woken: called because the reactor found the socket writable.
        """
        if self._resend_call is not None and self._resend_call.active():
            self._resend_call.cancel()
        self._resend_call = None
        sent_now = 0
        while self._pending and self._port is not None:
            if sent_now >= RESEND_BATCH and not last:
                self._schedule_resend(0)  # let the reactor breathe; go on at once after
                return
            data = self._pending[0]
            try:
                outcome = self._send(data)
            except Exception:
                outcome = None  # not the receiver's doing (e.g. too long): drop this line
                self.errors += 1
                if not self._error_logged:
                    self._error_logged = True
                    self._log.failure("syslog: cannot send a line (logged once)")
            if outcome is _BUSY:
                if last:
                    return
                self._next_resend = (
                    self._first_resend if sent_now
                    else min(self._max_resend, self._next_resend * 2)
                )
                self._schedule_resend()
                # Woken for nothing: leave it to the timer rather than spin on a socket that is
                # reported writable but is not; the next timer flush watches again.
                self._watch_writable(not (woken and not sent_now))
                return
            if outcome is _LOST:
                if not last:
                    self._schedule_reconnect()
                return
            self._pending.popleft()
            self._pending_bytes -= len(data)
            if outcome is _SENT:
                self.sent += 1
                sent_now += 1
            if self._overflow.active and (
                len(self._pending) <= self._max_pending // 2
                and self._pending_bytes <= self._max_pending_bytes // 2
            ):
                self._overflow.succeeded()
        if not self._pending:
            self._next_resend = self._first_resend
            self._watch_writable(False)
            self._busy.succeeded()
            self._overflow.succeeded()

    # -- connection -----------------------------------------------------------------------------

    def _schedule_reconnect(self, delay: float | None = None) -> None:
        if self.running and (self._retry_call is None or not self._retry_call.active()):
            self._retry_call = self._reactor.callLater(
                self._next_retry if delay is None else delay, self._connect
            )

    def _connect(self) -> None:
        if self._retry_call is not None and self._retry_call.active():
            self._retry_call.cancel()  # called directly (after a lost socket), not by the timer
        self._retry_call = None
        if not self.running or self._port is not None:
            return
        reason: str | None = None
        try:
            if not stat.S_ISSOCK(os.stat(self.socket_path).st_mode):
                reason = "not a socket"
        except OSError as e:
            reason = describe_error(e)
        if reason is None:
            protocol = _SyslogProtocol(self)
            self._protocol = protocol
            self._failed_reason = None
            try:
                port = self._reactor.connectUNIXDatagram(self.socket_path, protocol)
            except Exception as e:  # Twisted reports failures through the protocol; be safe
                port, self._failed_reason = None, e
            if port is not None and self._failed_reason is None and self._protocol is protocol:
                self._port = port
                if self._connected_once:
                    self.reconnects += 1  # logged by the end of the unavailability episode
                else:
                    self._log.info("syslog: sending events to {path}", path=self.socket_path)
                self._connected_once = True
                self._next_retry = self._first_retry
                self._unavailable.succeeded()
                if self._pending:
                    self._flush()
                return
            reason = describe_error(self._failed_reason) if self._failed_reason else "refused"
        self._unavailable.failed(
            "syslog socket {path} unavailable ({reason}); {meanwhile}; retrying in {delay:g} s, "
            "then at growing intervals of up to {interval:g} s",
            path=self.socket_path,
            reason=reason,
            meanwhile=(
                f"lines wait in memory (at most {self._max_pending})" if self._connected_once
                else "events are not sent to syslog meanwhile"
            ),
            delay=self._next_retry,
            interval=self._retry_interval,
        )
        self._schedule_reconnect()
        self._next_retry = min(self._retry_interval, self._next_retry * 2)

    def _connection_failed(self, protocol: _SyslogProtocol, reason: BaseException) -> None:
        if protocol is self._protocol:
            self._failed_reason = reason
            self._protocol = None

    def _connection_refused(self, protocol: _SyslogProtocol) -> None:
        if protocol is self._protocol:
            self._lost(ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"))

    def _lost(self, error: BaseException) -> None:
        # Part of the unavailability episode: a receiver that keeps failing is logged once.
        self._unavailable.failed(
            "syslog: lost the socket {path} ({error}); reconnecting, lines wait in memory",
            path=self.socket_path,
            error=describe_error(error),
        )
        self._disconnect()
        # Also when the loss was seen outside a send (a read): the waiting lines need a socket.
        # (A send that finds the socket lost reconnects at once by itself.)
        self._schedule_reconnect()

    def _disconnect(self):
        self._watch_writable(False)
        self._writing = False
        port, self._port = self._port, None
        self._protocol = None
        if port is None:
            return None
        try:
            return port.stopListening()
        except Exception:
            self._log.failure("syslog: error closing the socket")
            return defer.succeed(None)
