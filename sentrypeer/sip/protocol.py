"""Twisted protocols for SIP over UDP, TCP and TLS.

They frame bytes and hand complete messages to :class:`~sentrypeer.sip.controller.SIPController`
(the split of ``twisted.names``: ``DNSDatagramProtocol``/``DNSProtocol`` -> ``DNSServerFactory``).

- UDP: one datagram is one message (RFC 3261 §18.1.1: up to 65,535 bytes, never truncated). On a
  wildcard bind the real destination address is read from ``IP_PKTINFO``/``IPV6_PKTINFO`` by
  :class:`PacketInfoUDPPort`, and replies leave from that same address (``sendmsg`` with the
  packet-info control message, RFC 3261 §18.2.2: the response goes back to the source address and
  port of the request), never to a broadcast, multicast, unspecified or port-0 address.
- TCP/TLS: RFC 3261 §18.3 framing by :class:`~sentrypeer.sip.framing.StreamFramer`, keep-alive pongs
  (RFC 5626 §3.5.1), an idle timeout and a connection limit.
"""

from __future__ import annotations

import errno
import functools
import ipaddress
import itertools
import socket
import struct

from OpenSSL import SSL
from twisted.internet import task, udp
from twisted.internet.protocol import DatagramProtocol, Protocol, ServerFactory
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin

from sentrypeer.events import PARSE_NON_SIP, PARSE_TRUNCATED
from sentrypeer.sip import framing
from sentrypeer.sip.responses import can_reply_to

_log = Logger(namespace="sentrypeer.sip")

#: Largest UDP payload we accept in one read: the full 16-bit length (RFC 3261 §18.1.1).
MAX_DATAGRAM = 65535
#: Receive buffer asked of the kernel for UDP sockets, so bursts are queued, not dropped.
UDP_RECEIVE_BUFFER = 8 * 1024 * 1024
#: Seconds of silence after which a stream message sent without Content-Length is complete.
BODY_QUIET_SECONDS = 1.0
#: Keep-alive pongs per connection: a burst of this many, then PONG_RATE per second.
PONG_BURST = 5
PONG_RATE = 1.0

_connection_ids = itertools.count(1)
_LINE_END_VALUES = (0x0D, 0x0A)


def message_deadline(idle_timeout: float) -> float:
    """Seconds a stream message may take from its first byte to its last: twice the idle timeout,
    at least 10 s (60 s with the default ``--tcp-idle-timeout`` of 30 s)."""
    return max(10.0, 2 * idle_timeout)

# Linux values; Python 3.11's socket module lacks IP_PKTINFO and SO_MEMINFO.
IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)
SO_MEMINFO = getattr(socket, "SO_MEMINFO", 55)
_SK_MEMINFO_DROPS = 8  # index of the drop count in the SO_MEMINFO array (linux/sock_diag.h)
#: Seconds between two reads of a UDP socket's kernel drop count.
KERNEL_DROPS_INTERVAL = 1.0
IPV6_RECVPKTINFO = getattr(socket, "IPV6_RECVPKTINFO", 49)
IPV6_PKTINFO = getattr(socket, "IPV6_PKTINFO", 50)
_CMSG_SPACE = 256


def _address_from_cmsg(ancdata: list[tuple[int, int, bytes]]) -> str | None:
    """Destination address from ``recvmsg`` ancillary data (``struct in_pktinfo``: ifindex,
    spec_dst, addr; ``struct in6_pktinfo``: addr, ifindex)."""
    for level, kind, data in ancdata:
        if level == socket.IPPROTO_IP and kind == IP_PKTINFO and len(data) >= 12:
            return socket.inet_ntop(socket.AF_INET, data[8:12])
        if level == socket.IPPROTO_IPV6 and kind == IPV6_PKTINFO and len(data) >= 16:
            return socket.inet_ntop(socket.AF_INET6, data[:16])
    return None


#: ``sendmsg`` errors after which a reply is simply dropped (UDP gives no delivery promise).
_DROP_ERRNOS = frozenset((errno.EAGAIN, errno.EWOULDBLOCK, errno.ENOBUFS, errno.ECONNREFUSED,
                          errno.EHOSTUNREACH, errno.ENETUNREACH))


@functools.lru_cache(maxsize=1024)
def source_address_cmsg(local: str, family: int) -> tuple[tuple[int, int, bytes], ...]:
    """Ancillary data making ``sendmsg`` send from the local address *local* (Linux).

    ``struct in_pktinfo`` (ifindex 0, ``ipi_spec_dst`` = *local*) on an IPv4 socket, ``struct
    in6_pktinfo`` (*local*, ifindex 0) on an IPv6 socket, where an IPv4 address is given in its
    IPv4-mapped form (the kernel accepts that on a dual-stack socket). Empty when *local* is not
    a unicast address of the socket's family (then the kernel picks the source).

    :param local: the address the request was received on.
    :param family: ``AF_INET`` or ``AF_INET6``.
    """
    try:
        ip = ipaddress.ip_address(local.split("%", 1)[0])
    except ValueError:
        return ()
    if not can_reply_to(str(ip), 1):
        return ()
    if family == socket.AF_INET6:
        if isinstance(ip, ipaddress.IPv4Address):
            ip = ipaddress.IPv6Address("::ffff:" + str(ip))
        return ((socket.IPPROTO_IPV6, IPV6_PKTINFO, ip.packed + struct.pack("=I", 0)),)
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is None:
            return ()
        ip = ip.ipv4_mapped
    return ((socket.IPPROTO_IP, IP_PKTINFO, struct.pack("=i4s4s", 0, ip.packed, bytes(4))),)


class PacketInfoUDPPort(udp.Port):
    """A UDP port that records each datagram's real destination address.

    Reads with ``recvmsg`` and the packet-info control message, so a socket bound to ``::`` or
    ``0.0.0.0`` knows which local address was probed (reference §2.7, GitHub issue #3). IPv4
    destinations on a dual-stack ``::`` socket arrive as ``::ffff:a.b.c.d``. Calls
    ``protocol.packetReceived(data, source, destination)``.
    """

    def createInternetSocket(self) -> socket.socket:
        skt = super().createInternetSocket()
        for level, option in (
            (socket.SOL_SOCKET, getattr(socket, "SO_RCVBUFFORCE", None)),
            (socket.SOL_SOCKET, socket.SO_RCVBUF),
        ):
            if option is None:
                continue
            try:
                skt.setsockopt(level, option, UDP_RECEIVE_BUFFER)
                break
            except OSError:
                continue
        if self.addressFamily == socket.AF_INET6:
            skt.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVPKTINFO, 1)
        else:
            skt.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
        return skt

    #: Bytes read per ``doRead`` before the reactor serves other connections (Twisted's default is
    #: 256 KB, some 600 probes: tens of milliseconds of work during a flood, which the API and TCP
    #: clients would wait through).
    maxThroughput = 64 * 1024
    #: Datagrams the kernel dropped on this socket because its receive buffer was full (Linux
    #: ``SO_MEMINFO``), as of the last :meth:`count_kernel_drops`.
    kernel_drops = 0
    _drops_call: task.LoopingCall | None = None

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        #: packet-info control data -> the local address it names (bounded: 256 addresses).
        self._cmsg_cache: dict[bytes, str] = {}

    def startListening(self) -> None:
        super().startListening()
        self._drops_call = task.LoopingCall(self.count_kernel_drops)
        self._drops_call.clock = self.reactor
        self._drops_call.start(KERNEL_DROPS_INTERVAL, now=False)

    def connectionLost(self, reason=None) -> None:
        if self._drops_call is not None and self._drops_call.running:
            self._drops_call.stop()
        self._drops_call = None
        self.count_kernel_drops()
        super().connectionLost(reason)

    def count_kernel_drops(self) -> None:
        """Add the datagrams the kernel dropped since the last call to the protocol's
        ``stats.kernel_drops`` (the running total is read with ``SO_MEMINFO``, Linux only)."""
        skt = getattr(self, "socket", None)
        if skt is None:
            return
        try:
            info = skt.getsockopt(socket.SOL_SOCKET, SO_MEMINFO, 4 * (_SK_MEMINFO_DROPS + 1))
        except OSError:
            return
        if len(info) < 4 * (_SK_MEMINFO_DROPS + 1):
            return
        total = struct.unpack_from("=I", info, 4 * _SK_MEMINFO_DROPS)[0]
        new = (total - self.kernel_drops) & 0xFFFFFFFF  # a 32-bit counter that wraps
        if new:
            self.kernel_drops = total
            stats = getattr(self.protocol, "stats", None)
            if stats is not None:
                stats.kernel_drops += new

    def doRead(self) -> None:
        read = 0
        local_port = self._realPortNumber
        interface = self.interface
        recvmsg = self.socket.recvmsg
        packet_received = self.protocol.packetReceived
        cmsg_cache = self._cmsg_cache
        while read < self.maxThroughput:
            try:
                data, ancdata, flags, addr = recvmsg(self.maxPacketSize, _CMSG_SPACE)
            except OSError as se:
                if se.args[0] in udp._sockErrReadIgnore or se.args[0] in udp._sockErrReadRefuse:
                    return
                _log.failure("UDP receive error on port {port}", port=local_port)
                return
            read += len(data)
            local = None
            if ancdata:
                # The packet-info bytes repeat for every datagram sent to one local address.
                cdata = ancdata[0][2]
                local = cmsg_cache.get(cdata)
                if local is None:
                    local = _address_from_cmsg(ancdata)
                    if len(ancdata) == 1 and local is not None and len(cmsg_cache) < 256:
                        cmsg_cache[cdata] = local
            try:
                packet_received(data, addr if len(addr) == 2 else addr[:2], (local or interface, local_port))
            except Exception:
                _log.failure("unexpected error handling a UDP datagram")


class SIPDatagramProtocol(DatagramProtocol):
    """SIP over UDP: every datagram goes to the controller as one message.

    Empty datagrams and keep-alives (only CR/LF) are counted, never recorded (interface.md §3).
    """

    noisy = False  # no "Starting protocol" log lines

    def __init__(self, controller) -> None:
        self.controller = controller

    @property
    def stats(self):
        """The controller's :class:`~sentrypeer.stats.SIPStats` (the port adds kernel drops)."""
        return self.controller.stats

    def datagramReceived(self, data: bytes, addr: tuple[str, int]) -> None:
        """Entry point when the transport gives no packet info (plain ports, test fakes): the
        destination is the bound address."""
        host = self.transport.getHost()
        self.packetReceived(data, addr, (host.host, host.port))

    def packetReceived(
        self, data: bytes, source: tuple[str, int], destination: tuple[str, int]
    ) -> None:
        """Handle one datagram.

        :param data: the datagram's bytes (0 to 65,535).
        :param source: ``(host, port)`` of the sender.
        :param destination: ``(host, port)`` the datagram was addressed to.
        """
        controller = self.controller
        stats = controller.stats
        stats.datagrams += 1
        if not data or (data[0] in _LINE_END_VALUES and not data.strip(b"\r\n")):
            stats.keepalives += 1
            return
        # A reply function only when something may reply (responsive mode): passive mode records
        # thousands of packets a second and answers none.
        reply = None
        if controller.responder is not None:
            reply = functools.partial(self._reply, to=source, local=destination[0])
        try:
            controller.message_received(data, "UDP", source, destination, reply=reply)
        except Exception:
            stats.internal_errors += 1
            _log.failure("unexpected error recording a UDP datagram")

    def _reply(self, data: bytes, to: tuple[str, int], local: str | None = None) -> None:
        """Send *data* to the packet's source *to* (RFC 3261 §18.2.2 with RFC 3581 §4: the source
        address and port, not the Via sent-by), from *local* when the transport can (packet info),
        else with a plain write. Forbidden destinations are dropped here whatever the caller."""
        if not can_reply_to(to[0], to[1]):
            return
        transport = self.transport
        if isinstance(transport, PacketInfoUDPPort):
            skt = getattr(transport, "socket", None)
            if skt is None:
                return  # the port was closed (a late INVITE timer at shutdown)
            ancillary = source_address_cmsg(local, transport.addressFamily) if local else ()
            if ancillary:
                try:
                    skt.sendmsg([data], ancillary, 0, to)
                    return
                except OSError as e:
                    if e.errno in _DROP_ERRNOS:
                        return
                    # e.g. EINVAL for an address no longer ours: let the kernel choose
        try:
            transport.write(data, to)
        except (OSError, ValueError):
            pass


class SIPStreamProtocol(Protocol, TimeoutMixin):
    """SIP over TCP or TLS: RFC 3261 §18.3 framing, one event per message.

    Keep-alive pings get a CRLF pong (RFC 5626 §3.5.1); a message over the size limits, garbage
    and a negative Content-Length end the connection after being recorded once; a partial message
    at connection end or idle timeout is recorded as ``truncated``.
    """

    def __init__(self, factory: SIPStreamFactory) -> None:
        self.factory = factory
        self.controller = factory.controller
        self.transport_type = factory.transport_type
        self.framer = framing.StreamFramer()
        self.bytes_received = 0
        #: Unique for the life of the process: ``id(self)`` would be reused by a later connection
        #: and make its first request look like a retransmission of this one's.
        self.connection_id = next(_connection_ids)
        self._quiet_call = None
        self._deadline_call = None
        self._finished = False
        self.callLater = self.controller.clock.callLater
        self._pong_tokens = float(PONG_BURST)
        self._pong_time = self.controller.clock.seconds()

    def connectionMade(self) -> None:
        peer, host = self.transport.getPeer(), self.transport.getHost()
        self.source = (peer.host, peer.port)
        self.destination = (host.host, host.port)
        self.controller.connections.add(self)
        stats = self.controller.stats
        stats.connections[self.transport_type] += 1
        stats.connections_open += 1
        self.setTimeout(self.controller.idle_timeout)

    def dataReceived(self, data: bytes) -> None:
        if self._finished:
            return
        self.bytes_received += len(data)
        self.resetTimeout()
        self._handle(self.framer.feed(data))
        self._schedule_quiet_flush()
        self._track_deadline()

    def _may_pong(self) -> bool:
        """Token bucket for pongs: :data:`PONG_BURST` at once, then :data:`PONG_RATE` per second.

        A client that floods pings and never reads would otherwise grow our write buffer without
        bound (each ping queues a pong)."""
        now = self.controller.clock.seconds()
        self._pong_tokens = min(PONG_BURST, self._pong_tokens + (now - self._pong_time) * PONG_RATE)
        self._pong_time = now
        if self._pong_tokens >= 1:
            self._pong_tokens -= 1
            return True
        return False

    def _track_deadline(self) -> None:
        """Start the message deadline when a partial message begins, stop it when none is pending.

        The idle timeout restarts with every byte, so a client dripping one byte every few seconds
        (slowloris) would hold the connection for ever; a message must be complete within
        :func:`message_deadline` seconds of its first byte."""
        pending = self.framer.pending and not self._finished
        active = self._deadline_call is not None and self._deadline_call.active()
        if pending and not active:
            self._deadline_call = self.callLater(
                message_deadline(self.controller.idle_timeout), self._deadline_passed
            )
        elif not pending and active:
            self._deadline_call.cancel()
            self._deadline_call = None

    def _deadline_passed(self) -> None:
        self._deadline_call = None
        if self._finished:
            return
        self.controller.stats.connections_slow += 1
        self.drain()
        self.transport.abortConnection()

    def _schedule_quiet_flush(self) -> None:
        if self._quiet_call is not None and self._quiet_call.active():
            self._quiet_call.cancel()
        self._quiet_call = None
        if self.framer.pending and not self._finished:
            self._quiet_call = self.callLater(BODY_QUIET_SECONDS, self._quiet)

    def _quiet(self) -> None:
        self._quiet_call = None
        if not self._finished:
            self._handle(self.framer.flush())
            self._track_deadline()

    def _handle(self, frames: list[framing.Frame]) -> None:
        stats = self.controller.stats
        for frame in frames:
            try:
                if frame.kind == framing.PING:
                    stats.keepalives += 1
                    if self._may_pong():
                        stats.pongs += 1
                        self.transport.write(b"\r\n")
                    else:
                        stats.pongs_refused += 1
                elif frame.kind == framing.STRAY:
                    stats.stray_bytes += len(frame.data)
                elif frame.kind == framing.RESPONSE:
                    stats.responses += 1
                else:
                    status = {
                        framing.TRUNCATED: PARSE_TRUNCATED,
                        framing.NON_SIP: PARSE_NON_SIP,
                    }.get(frame.kind)
                    self.controller.message_received(
                        frame.data,
                        self.transport_type,
                        self.source,
                        self.destination,
                        connection_id=self.connection_id,
                        status=status,
                        reply=self._reply,
                    )
            except Exception:
                stats.internal_errors += 1
                _log.failure("unexpected error handling a {transport} frame",
                             transport=self.transport_type)
            if frame.close:
                self._finish()
                self.transport.loseConnection()
                return

    def _reply(self, data: bytes) -> None:
        if not self._finished:
            self.transport.write(data)

    def _finish(self) -> None:
        self._finished = True
        self.setTimeout(None)
        if self._deadline_call is not None and self._deadline_call.active():
            self._deadline_call.cancel()
        self._deadline_call = None
        if self._quiet_call is not None and self._quiet_call.active():
            self._quiet_call.cancel()
        self._quiet_call = None

    def drain(self) -> None:
        """Record what is buffered (at shutdown or idle) and stop reading; the transport is closed
        by the caller."""
        if not self._finished:
            frames = self.framer.close()
            self._finish()
            self._handle(frames)

    def timeoutConnection(self) -> None:
        self.controller.stats.connections_idle += 1
        self.drain()
        self.transport.abortConnection()

    def connectionLost(self, reason=None) -> None:
        stats = self.controller.stats
        self.drain()
        self.controller.connections.discard(self)
        stats.connections_open -= 1
        if self.bytes_received == 0:
            if reason is not None and reason.check(SSL.Error):
                stats.tls_handshake_failures += 1
            else:
                stats.connections_silent += 1


class _RejectingProtocol(Protocol):
    """Closes at once: the connection limit was reached."""

    def connectionMade(self) -> None:
        self.transport.abortConnection()


class SIPStreamFactory(ServerFactory):
    """Builds :class:`SIPStreamProtocol` for one stream transport (``TCP`` or ``TLS``); the limit
    of open connections is shared through the controller."""

    noisy = False  # no "Starting factory" log lines

    def __init__(self, controller, transport_type: str) -> None:
        self.controller = controller
        self.transport_type = transport_type

    def buildProtocol(self, addr) -> Protocol:
        stats = self.controller.stats
        if stats.connections_open >= self.controller.max_connections:
            stats.connections_rejected += 1
            return _RejectingProtocol()
        return SIPStreamProtocol(self)
