"""The SIP controller: shared by every transport, it turns received messages into bad-actor events.

Protocols (:mod:`sentrypeer.sip.protocol`) frame bytes; this module decides what is recorded (RFC 3261
requests and non-SIP probes), what is only counted (responses, keep-alives, retransmissions) and hands
events to the pipeline. It never raises into a transport: every input ends as an event or a counter.

In responsive mode it also keeps the latest reply of each server transaction, so that a
retransmitted request gets that reply again without being recorded twice (RFC 3261 §17.2.1,
§17.2.2), and passes every transmission through the ``reply_gate`` (rate limits, forbidden
destinations; :mod:`sentrypeer.sip.responder`).
"""

from __future__ import annotations

import collections
import functools
import ipaddress
import time
from collections.abc import Callable

from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import ServerFactory
from twisted.logger import Logger

from sentrypeer.events import (
    NOT_FOUND,
    PARSE_MALFORMED,
    PARSE_NON_SIP,
    PARSE_OK,
    PARSE_TRUNCATED,
    BadActorEvent,
    escape_for_log,
    format_timestamp,
    new_event_uuid,
)
from sentrypeer.sip.message import SIPMessage, SIPParseError, parse_message
from sentrypeer.stats import SIPStats

#: RFC 3261 §17.2.1/§17.2.2: a server transaction absorbs retransmissions for 64*T1 = 32 s.
TRANSACTION_WINDOW = 32.0
#: Upper bound on remembered transactions (~70 bytes each, :class:`TransactionTable`); the oldest
#: are forgotten first.
MAX_TRANSACTIONS = 500_000
#: Upper bound on the bytes of replies kept for retransmissions; the oldest is forgotten first.
MAX_STORED_REPLY_BYTES = 16 * 1024 * 1024

Address = tuple[str, int]


@functools.lru_cache(maxsize=4096)
def normalise_address(host: str) -> str:
    """Return a bare IP address for storage: IPv4-mapped IPv6 shown as IPv4, scope id removed.

    :param host: an address as the socket layer reports it (``::ffff:1.2.3.4``, ``fe80::1%eth0``).
    :returns: the canonical text form; unparsable input is returned unchanged.
    """
    bare = host.split("%", 1)[0]
    try:
        ip = ipaddress.ip_address(bare)
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


class TransactionTable:
    """The server transactions seen recently (RFC 3261 §17.2.3 keys), for retransmission
    matching: bounded in time and count, and compact.

    Keys are kept in a few generations (sets), newest last. A generation takes new keys for
    *window* / :attr:`SLICES` seconds or until it holds *max_entries* / :attr:`SLICES` keys, then
    a new one starts; a generation is dropped whole once *window* seconds have passed since its
    last key, so a key is remembered for *window* seconds at least and *window* / :attr:`SLICES`
    seconds more at most. When the count passes *max_entries*, the oldest generation is dropped
    early (the oldest keys are forgotten first). A key costs a set slot and its ``int`` (about
    70 bytes, half what an ordered dict of expiry times costs), which matters during a flood:
    10,000 new transactions a second for 32 s are 320,000 keys.

    :param window: seconds a key is remembered (:data:`TRANSACTION_WINDOW`).
    :param max_entries: the most keys remembered.
    :param on_forget: called with each key when its generation is dropped (the controller's
        stored replies), only while *wants_forget* returns true.
    """

    SLICES = 8

    def __init__(self, window: float, max_entries: int, on_forget: Callable[[int], None],
                 wants_forget: Callable[[], bool]) -> None:
        self.window = window
        self.max_entries = max(1, max_entries)
        self._slice = window / self.SLICES
        self._per_generation = max(1, -(-self.max_entries // self.SLICES))
        #: ``[started, last_added, keys]`` per generation, oldest first.
        self._generations: collections.deque[list] = collections.deque()
        self._count = 0
        self._on_forget = on_forget
        self._wants_forget = wants_forget

    def __len__(self) -> int:
        return self._count

    def _drop_oldest(self) -> None:
        _, _, keys = self._generations.popleft()
        self._count -= len(keys)
        if self._wants_forget():
            for key in keys:
                self._on_forget(key)

    def expire(self, now: float) -> None:
        """Drop the generations whose last key is *window* seconds old at *now*."""
        generations = self._generations
        while generations and generations[0][1] + self.window <= now:
            self._drop_oldest()

    def __contains__(self, key: int) -> bool:
        for generation in reversed(self._generations):
            if key in generation[2]:
                return True
        return False

    def seen(self, key: int, now: float) -> bool:
        """Whether *key* is remembered (a retransmission); otherwise remember it from *now*."""
        self.expire(now)
        generations = self._generations
        for generation in reversed(generations):
            if key in generation[2]:
                return True
        current = generations[-1] if generations else None
        if current is None or current[0] + self._slice <= now or len(current[2]) >= self._per_generation:
            current = [now, now, set()]
            generations.append(current)
        current[1] = now
        current[2].add(key)
        self._count += 1
        while self._count > self.max_entries:
            self._drop_oldest()
        return False


class SIPController(ServerFactory):
    """Turns framed messages from every transport into events, and counts the rest.

    It is also the ``ServerFactory`` of the stream listeners: one instance serves TCP and TLS (see
    :meth:`stream_factory`), so ``--max-tcp-connections`` bounds both together.

    :param node_id: this node's persistent UUID (``created_by_node_id``).
    :param sink: called with each new :class:`BadActorEvent`; returns ``False`` when the event was
        dropped (full write queue), which is counted.
    :param clock: time source for transaction expiry and stream timeouts.
    :param collected_method: ``passive`` or ``responsive`` (interface.md §3).
    :param verbose: log one line per event (``-v``/``-d``), attacker text escaped.
    :param max_connections: TCP and TLS connections open at once (``--max-tcp-connections``).
    :param idle_timeout: seconds a stream connection may stay silent (``--tcp-idle-timeout``).
    """

    _log = Logger(namespace="sentrypeer.sip")

    def __init__(
        self,
        *,
        node_id: str,
        sink: Callable[[BadActorEvent], bool],
        clock: IReactorTime,
        collected_method: str = "passive",
        verbose: bool = False,
        max_connections: int = 1024,
        idle_timeout: float = 30.0,
        stats: SIPStats | None = None,
        max_transactions: int = MAX_TRANSACTIONS,
        max_stored_reply_bytes: int = MAX_STORED_REPLY_BYTES,
    ) -> None:
        self.node_id = node_id
        self.sink = sink
        self.clock = clock
        self.collected_method = collected_method
        self.verbose = verbose
        self.max_connections = max_connections
        self.idle_timeout = idle_timeout
        self.stats = stats if stats is not None else SIPStats()
        self.max_transactions = max_transactions
        # Hashes of the transaction keys seen within TRANSACTION_WINDOW seconds.
        self._transactions = TransactionTable(
            TRANSACTION_WINDOW, max_transactions, self._forget_reply, lambda: bool(self._replies)
        )
        self.connections: set = set()
        #: Hook for responsive mode: ``responder(message, event, reply)``, called once per new
        #: request; ``reply(data: bytes)`` stores *data* as the transaction's latest reply and
        #: sends it (through :attr:`reply_gate`) on the same transport to the packet's source.
        self.responder: Callable | None = None
        #: ``reply_gate(destination, data) -> bool``, asked before every transmission (first
        #: replies and replays to retransmissions alike); ``False`` suppresses it.
        self.reply_gate: Callable[[Address, bytes], bool] | None = None
        self.max_stored_reply_bytes = max_stored_reply_bytes
        # transaction key -> latest reply sent (or suppressed); insertion order == age.
        self._replies: collections.OrderedDict[int, bytes] = collections.OrderedDict()
        self._reply_bytes = 0

    # -- stream factory ------------------------------------------------------------------------

    def stream_factory(self, transport_type: str) -> ServerFactory:
        """A ``ServerFactory`` building :class:`SIPStreamProtocol` for ``TCP`` or ``TLS``."""
        from sentrypeer.sip.protocol import SIPStreamFactory

        return SIPStreamFactory(self, transport_type)

    # -- receive path --------------------------------------------------------------------------

    def message_received(
        self,
        data: bytes,
        transport_type: str,
        source: Address,
        destination: Address,
        connection_id: int | None = None,
        status: str | None = None,
        reply: Callable[[bytes], None] | None = None,
    ) -> BadActorEvent | None:
        """Handle one framed message or probe.

        :param data: the exact bytes (one UDP datagram, or one stream frame).
        :param transport_type: ``UDP``, ``TCP`` or ``TLS``.
        :param source: ``(host, port)`` of the sender.
        :param destination: ``(host, port)`` the packet was sent to (the real local address).
        :param connection_id: identifies the stream connection (retransmissions are matched per
            connection on TCP/TLS, per source address and port on UDP).
        :param status: ``truncated`` or ``non_sip`` when the framer already knows.
        :param reply: sends bytes back to the source (used by responsive mode).
        :returns: the recorded event, or ``None`` when nothing was recorded (response,
            retransmission).
        """
        stats = self.stats
        message: SIPMessage | None
        try:
            message = parse_message(data)
        except SIPParseError:
            message = None
        if message is not None and not message.is_request:
            stats.responses += 1
            return None
        stats.received[transport_type] += 1
        key = None
        if message is None:
            status = status or PARSE_NON_SIP
        elif status != PARSE_TRUNCATED:
            key = self._transaction_key(message, transport_type, source, connection_id)
            if key is not None and self._seen(key):
                stats.retransmissions += 1
                stored = self._replies.get(key)
                if stored is not None and reply is not None:
                    self._transmit(stored, source, reply)
                return None
        event = self._make_event(data, message, transport_type, source, destination, status)
        parse_status = event.parse_status
        if parse_status != PARSE_OK:
            if parse_status == PARSE_TRUNCATED:
                stats.truncated += 1
            elif parse_status == PARSE_NON_SIP:
                stats.non_sip += 1
            elif parse_status == PARSE_MALFORMED:
                stats.malformed += 1
        if self.sink(event):
            stats.recorded[transport_type] += 1
        else:
            stats.dropped += 1
        if self.verbose:
            self._log.info(
                "{transport} {method} from {source}:{sport} to {dest}:{dport} number={number} "
                "ua={ua} status={status}",
                transport=transport_type,
                method=escape_for_log(event.sip_method),
                source=event.source_ip,
                sport=event.source_port,
                dest=event.destination_ip,
                dport=event.destination_port,
                number=escape_for_log(event.called_number),
                ua=escape_for_log(event.sip_user_agent),
                status=event.parse_status,
            )
        if self.responder is not None and message is not None and reply is not None:
            self.responder(message, event, self._reply_sender(key, source, reply))
        return event

    # -- replies -------------------------------------------------------------------------------

    def _reply_sender(
        self, key: int | None, source: Address, reply: Callable[[bytes], None]
    ) -> Callable[[bytes], None]:
        """The ``reply`` given to the responder: remember, then transmit."""

        def send(data: bytes) -> None:
            if key is not None:
                self._store_reply(key, data)
            self._transmit(data, source, reply)

        return send

    def _transmit(self, data: bytes, source: Address, reply: Callable[[bytes], None]) -> None:
        gate = self.reply_gate
        if gate is not None and not gate(source, data):
            return
        reply(data)

    def _store_reply(self, key: int, data: bytes) -> None:
        """Keep *data* as the latest reply of transaction *key* (RFC 3261 §17.2.1: a retransmitted
        INVITE gets the most recent provisional or the final response), within
        :attr:`max_stored_reply_bytes`."""
        self._transactions.expire(self.clock.seconds())
        if key not in self._transactions:
            return  # the transaction already expired (a late final response)
        self._forget_reply(key)
        if len(data) > self.max_stored_reply_bytes:
            return
        self._replies[key] = data
        self._reply_bytes += len(data)
        while self._reply_bytes > self.max_stored_reply_bytes:
            _, dropped = self._replies.popitem(last=False)
            self._reply_bytes -= len(dropped)

    def _forget_reply(self, key: int) -> None:
        old = self._replies.pop(key, None)
        if old is not None:
            self._reply_bytes -= len(old)

    def _make_event(
        self,
        data: bytes,
        message: SIPMessage | None,
        transport_type: str,
        source: Address,
        destination: Address,
        status: str | None,
    ) -> BadActorEvent:
        # One constructor call with every field: this runs for every recorded packet.
        if message is None:
            number = method = agent = username = realm = NOT_FOUND
            status = status or PARSE_NON_SIP
        else:
            number = message.called_number or NOT_FOUND
            method = message.method or NOT_FOUND
            agent = message.user_agent or NOT_FOUND
            username = message.auth_username or NOT_FOUND
            realm = message.auth_realm or NOT_FOUND
            status = status or message.parse_status
        return BadActorEvent(
            event_timestamp=format_timestamp(time.time_ns()),
            event_uuid=new_event_uuid(),
            created_by_node_id=self.node_id,
            collected_method=self.collected_method,
            transport_type=transport_type,
            source_ip=normalise_address(source[0]),
            destination_ip=normalise_address(destination[0]),
            called_number=number,
            sip_method=method,
            sip_user_agent=agent,
            sip_message=data.decode("utf-8", "backslashreplace") or NOT_FOUND,
            source_port=source[1],
            destination_port=destination[1],
            parse_status=status,
            auth_username=username,
            auth_realm=realm,
            sip_message_bytes=data,
        )

    @staticmethod
    def _transaction_key(
        message: SIPMessage,
        transport_type: str,
        source: Address,
        connection_id: int | None,
    ) -> int | None:
        """RFC 3261 §17.2.3 matching: same transport and source (connection on streams), top Via
        branch, Call-ID, CSeq number and method; ``None`` without a Call-ID or CSeq number."""
        if message.call_id is None or message.cseq_number is None:
            return None
        where = connection_id if connection_id is not None else source
        return hash(
            (
                transport_type,
                where,
                message.top_via_branch,
                message.call_id,
                message.cseq_number,
                message.method,
            )
        )

    def _seen(self, key: int) -> bool:
        """Whether transaction *key* was seen within :data:`TRANSACTION_WINDOW` seconds (a
        retransmission); otherwise remember it from now on."""
        return self._transactions.seen(key, self.clock.seconds())

    def _is_retransmission(
        self,
        message: SIPMessage,
        transport_type: str,
        source: Address,
        connection_id: int | None,
    ) -> bool:
        """Whether *message* retransmits a request seen within :data:`TRANSACTION_WINDOW` seconds
        (RFC 3261 §17.2.3); a new transaction is remembered."""
        key = self._transaction_key(message, transport_type, source, connection_id)
        return key is not None and self._seen(key)
