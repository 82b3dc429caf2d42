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
* It goes through a Twisted UNIX datagram transport (``connectUNIXDatagram``), never blocking:
  when the receiver is slow (``EAGAIN``/``ENOBUFS``) the line is dropped and counted, never queued.
* No socket (Debian 12 containers often have no ``/dev/log``): one warning, then a new attempt
  every :data:`RETRY_INTERVAL` seconds; lines are dropped (counted) meanwhile.  A receiver that
  restarts (``ECONNREFUSED``) is reconnected at once.
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

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.protocol import ConnectedDatagramProtocol
from twisted.logger import Logger

from sentrypeer.events import BadActorEvent
from sentrypeer.outputs import FailureEpisode, describe_error

#: RFC 3164/5424 facility USER (1) and severity NOTICE (5): PRI = 1 * 8 + 5.
FACILITY_USER = 1
SEVERITY_NOTICE = 5
PRI = FACILITY_USER * 8 + SEVERITY_NOTICE
IDENT = "sentrypeer"
#: Seconds between attempts to reach a missing syslog socket.
RETRY_INTERVAL = 30.0
#: Characters of the method and of the user agent shown (before escaping).
MAX_METHOD = 64
MAX_AGENT = 256

# What is shown as is: printable ASCII (0x20-0x7e) except the colon (0x3a) and the backslash (0x5c).
_UNSAFE = re.compile(r"[^\x20-\x39\x3b-\x5b\x5d-\x7e]")
_DROP_ERRNOS = frozenset({errno.EAGAIN, errno.EWOULDBLOCK, errno.ENOBUFS, errno.ENOMEM})
# Outcomes of SyslogService._send.
_SENT, _BUSY, _LOST, _NO_SOCKET = object(), object(), object(), object()


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

    Counters: ``sent``, ``dropped`` (no socket, or the receiver was busy), ``skipped`` (peer
    events without *include_peers*), ``invalid`` (no IP address in ``source_ip``), ``errors``
    (unexpected failures), ``reconnects``.

    :param socket_path: the syslog socket, ``/dev/log`` by default (``--syslog-socket``).
    :param reactor: provides ``connectUNIXDatagram`` and ``callLater``.
    :param include_peers: also send events replicated from peers (``--syslog-peers``).
    :param pid: the PID shown in the tag; default: this process's, read at start (after twistd
        may have forked).
    :param retry_interval: seconds between attempts to reach a missing socket.
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
    ) -> None:
        self.socket_path = socket_path
        self.include_peers = include_peers
        self._reactor = reactor
        self._pid = pid
        self._retry_interval = retry_interval
        self._port = None
        self._protocol: _SyslogProtocol | None = None
        self._retry_call = None
        self._failed_reason: BaseException | None = None
        self._unavailable = FailureEpisode(self._log, "syslog socket connections")
        self._busy = FailureEpisode(self._log, "syslog sends")
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

    def counters(self) -> dict[str, int]:
        """The counters, for metrics."""
        return {
            "sent": self.sent,
            "dropped": self.dropped,
            "skipped": self.skipped,
            "invalid": self.invalid,
            "errors": self.errors,
            "reconnects": self.reconnects,
        }

    # -- life cycle -----------------------------------------------------------------------------

    def prepare(self) -> None:
        """Nothing can make syslog a start-up failure (a missing socket is only a warning)."""

    def startService(self) -> None:
        """Fix the PID and connect (or warn once and retry every *retry_interval* seconds)."""
        super().startService()
        if self._pid is None:
            self._pid = os.getpid()
        self._connect()

    def stopService(self):
        """Stop retrying and close the socket.

        :returns: a Deferred that fires when the socket is closed, or ``None``.
        """
        super().stopService()
        if self._retry_call is not None and self._retry_call.active():
            self._retry_call.cancel()
        self._retry_call = None
        return self._disconnect()

    # -- the output -----------------------------------------------------------------------------

    def __call__(self, event: BadActorEvent, replicated: bool) -> None:
        """Send *event* to syslog (a replicated one only with *include_peers*); never blocks or
        raises."""
        try:
            if replicated and not self.include_peers:
                self.skipped += 1
                return
            data = format_message(event, self._pid if self._pid is not None else os.getpid())
            if data is None:
                self.invalid += 1
                return
            outcome = self._send(data)
            if outcome is _LOST and self.running:
                # The receiver went away (a restart re-creates the socket): reconnect once, now.
                self._connect()
                outcome = self._send(data)
            if outcome is _SENT:
                self.sent += 1
                self._busy.succeeded()
                return
            self.dropped += 1
            if outcome is _BUSY:
                self._busy.failed(
                    "syslog: the receiver on {path} is busy; dropping lines (counted) until it "
                    "keeps up",
                    path=self.socket_path,
                )
        except Exception:
            self.errors += 1
            if not self._error_logged:
                self._error_logged = True
                self._log.failure("syslog: cannot send an event (logged once)")

    def _send(self, data: bytes) -> object:
        """Write one datagram; returns :data:`_SENT`, :data:`_BUSY` (dropped by a busy receiver),
        :data:`_LOST` (the socket failed and is now closed) or :data:`_NO_SOCKET`."""
        port = self._port
        if port is None:
            return _NO_SOCKET
        try:
            result = port.write(data)
        except OSError as e:
            if e.errno in _DROP_ERRNOS:
                return _BUSY
            self._lost(e)
            return _LOST
        if result is None:
            # Twisted swallows EAGAIN, and reports ECONNREFUSED through the protocol (which
            # closed the socket, see _connection_refused).
            return _BUSY if self._port is port else _LOST
        return _SENT

    # -- connection -----------------------------------------------------------------------------

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
                    self.reconnects += 1
                self._connected_once = True
                self._unavailable.succeeded()
                self._log.info("syslog: sending events to {path}", path=self.socket_path)
                return
            reason = describe_error(self._failed_reason) if self._failed_reason else "refused"
        self._unavailable.failed(
            "syslog socket {path} unavailable ({reason}); events are not sent to syslog, retrying "
            "every {interval} s",
            path=self.socket_path,
            reason=reason,
            interval=self._retry_interval,
        )
        if self.running:
            self._retry_call = self._reactor.callLater(self._retry_interval, self._connect)

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
            "syslog: lost the socket {path} ({error}); reconnecting",
            path=self.socket_path,
            error=describe_error(error),
        )
        self._disconnect()

    def _disconnect(self):
        port, self._port = self._port, None
        self._protocol = None
        if port is None:
            return None
        try:
            return port.stopListening()
        except Exception:
            self._log.failure("syslog: error closing the socket")
            return defer.succeed(None)
