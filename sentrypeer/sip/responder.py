"""Responsive mode (``-r``), the Twisted side: when to send the replies :mod:`.responses` builds.

:class:`SIPResponder` is the controller's ``responder`` hook and ``reply_gate``
(:meth:`SIPResponder.install`). It

- answers each new request per :func:`~sentrypeer.sip.responses.decide`, taking the destination's
  rate-limit token *before* building anything (To tag HMAC, nonce, serialisation), so that a flood
  of rate-limited or forbidden requests costs a table lookup each and nothing more;
- for an INVITE sends ``100 Trying`` at once (RFC 3261 §17.2.1) and the persona's final response
  (or 183 then 487) from timers on the injected clock, keeping the INVITE *pending* meanwhile so that
  a CANCEL gets 200 and the INVITE 487 (§9.2); the pending table is bounded (when full, the oldest
  INVITE gets its final response at once);
- remembers each INVITE server transaction for :data:`INVITE_TRANSACTION_SECONDS` after its final
  response (§17.2.1: Timer H, 64*T1), so that a CANCEL arriving then gets 200 without a 487
  (§9.2: the CANCEL matched a transaction, which was already completed); only a CANCEL that
  matches no INVITE transaction gets 481. That table is bounded too
  (:data:`MAX_COMPLETED_INVITES`, oldest forgotten first);
- gates every transmission, replays of stored replies to retransmissions included (§17.2): never to
  a broadcast, multicast, unspecified or port-0 address, never more than
  :data:`~sentrypeer.sip.responses.MAX_REPLY_BYTES`, and at most ``--reply-rate`` replies per second
  per destination address with bursts of twice that, and of at least one reply
  (:class:`ReplyRateLimiter`), so a spoofed-source flood cannot turn the honeypot into a reflector.
  Recording is never limited.

A new request whose reply was refused by the rate limiter gets no reply built, hence none stored:
its retransmissions within the transaction's 32 s get nothing either (answering them would need
the controller to ask the responder again; a compliant client gives up after Timer B/F).

Final responses to INVITE are not retransmitted until an ACK arrives (§17.2.1 timer G): a client that
lost one retransmits its INVITE and gets the stored reply again, and the honeypot never sends
unprompted traffic towards an address that may be spoofed.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Callable
from dataclasses import dataclass, field

from twisted.application.service import Service
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from sentrypeer.events import PARSE_NON_SIP, PARSE_TRUNCATED, BadActorEvent
from sentrypeer.sip import responses
from sentrypeer.sip.message import SIPMessage
from sentrypeer.sip.persona import Persona, resolve_persona

#: INVITEs waiting for their final response at most (each holds its request, ~1-70 KB).
MAX_PENDING_INVITES = 1024
#: Destination addresses the rate limiter remembers at most (~150 bytes each).
MAX_DESTINATIONS = 65536
#: INVITE server transactions remembered after their final response, at most (~100 bytes each).
MAX_COMPLETED_INVITES = 65536
#: How long an INVITE server transaction outlives its final response: 64*T1 (RFC 3261 §17.2.1,
#: Timer H), the same 32 s window in which the controller absorbs retransmissions.
INVITE_TRANSACTION_SECONDS = 32.0

Address = tuple[str, int]
Reply = Callable[[bytes], None]


@dataclass
class ResponderStats:
    """What responsive mode did (plain counters, readable live from the manhole)."""

    sent: int = 0  #: replies handed to a transport
    limited: int = 0  #: replies not sent: the destination's rate limit was reached
    refused: int = 0  #: replies not sent: broadcast, multicast, unspecified or port-0 address
    oversize: int = 0  #: replies not built or not sent: larger than MAX_REPLY_BYTES
    cancelled: int = 0  #: CANCELs that matched a pending INVITE
    cancelled_late: int = 0  #: CANCELs that matched an INVITE already answered (200, no 487)
    hurried: int = 0  #: pending INVITEs finished early because the table was full

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


def _bucket_key(host: str) -> bytes | str:
    """The rate-limited unit for a destination: an IPv4 address (also when IPv4-mapped), or an
    IPv6 /64 (one host usually owns a whole /64, RFC 4291 §2.5.1, so spoofing many addresses of
    one prefix must not multiply its budget)."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is None:
            return ip.packed[:8]
        ip = ip.ipv4_mapped
    return ip.packed


@dataclass
class ReplyRateLimiter:
    """A token bucket per destination: *rate* replies per second, bursts of *burst* (default
    twice the rate), at most *max_entries* destinations remembered.

    The bucket holds at least one token whatever *rate* and *burst* say, or no reply could ever be
    sent: a rate of 0.4 allows one reply, then one every 2.5 s.

    A bucket that has been idle long enough to be full again is the same as no bucket, so it is
    forgotten (oldest first); when the table is full of busy buckets a new destination gets no
    reply at all (fail closed: a flood of spoofed sources cannot evict a victim's bucket).

    :param rate: tokens added per second (``--reply-rate``).
    :param clock: time source (``seconds()``).
    """

    rate: float
    clock: IReactorTime
    burst: float | None = None
    max_entries: int = MAX_DESTINATIONS
    full: int = 0  #: new destinations refused because the table was full
    _buckets: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.rate <= 0:
            raise ValueError("rate must be positive")
        if self.burst is None:
            self.burst = 2.0 * self.rate
        self.burst = max(1.0, float(self.burst))
        self._refill_time = self.burst / self.rate

    def __len__(self) -> int:
        return len(self._buckets)

    def allow(self, host: str) -> bool:
        """Take one token for a reply to *host*; ``False`` when there is none left."""
        now = self.clock.seconds()
        buckets = self._buckets
        # Entries are kept in order of last use: forget those that have refilled completely.
        while buckets:
            oldest = next(iter(buckets))
            if buckets[oldest][1] + self._refill_time > now:
                break
            del buckets[oldest]
        key = _bucket_key(host)
        state = buckets.pop(key, None)
        if state is None:
            if len(buckets) >= self.max_entries:
                self.full += 1
                return False
            tokens = self.burst
        else:
            tokens = min(self.burst, state[0] + (now - state[1]) * self.rate)
        allowed = tokens >= 1.0
        if allowed:
            tokens -= 1.0
        buckets[key] = (tokens, now)
        return allowed


class _PendingInvite:
    __slots__ = ("message", "decision", "context", "reply", "call")

    def __init__(self, message, decision, context, reply) -> None:
        self.message = message
        self.decision = decision
        self.context = context
        self.reply = reply
        self.call = None


class SIPResponder(Service):
    """Answers SIP requests like the PBX of *persona* (responsive mode).

    A :class:`~twisted.application.service.Service` so that stopping the tree cancels the INVITE
    timers; :meth:`install` hooks it into a :class:`~sentrypeer.sip.controller.SIPController`.

    :param persona: the PBX imitated.
    :param clock: time source for timers and rate limits (the reactor; ``task.Clock`` in tests).
    :param reply_rate: replies per second per destination address (``--reply-rate``).
    :param max_pending: bound of the pending-INVITE table.
    :param max_destinations: bound of the rate limiter's table.
    :param max_completed: bound of the table of answered INVITE transactions (CANCEL matching).
    :param secret: key for To tags (default: 32 random bytes).
    :param entropy: ``entropy(n)`` returns *n* random bytes (nonces).
    """

    name = "sip-responder"
    _log = Logger(namespace="sentrypeer.sip")

    def __init__(
        self,
        persona: Persona,
        clock: IReactorTime,
        *,
        reply_rate: float = 10.0,
        max_pending: int = MAX_PENDING_INVITES,
        max_destinations: int = MAX_DESTINATIONS,
        max_completed: int = MAX_COMPLETED_INVITES,
        secret: bytes | None = None,
        entropy: Callable[[int], bytes] = os.urandom,
    ) -> None:
        self.persona = persona
        self.clock = clock
        self.limiter = ReplyRateLimiter(reply_rate, clock, max_entries=max_destinations)
        self.max_pending = max_pending
        self.max_completed = max_completed
        self.stats = ResponderStats()
        self._secret = secret if secret is not None else os.urandom(32)
        self._entropy = entropy
        self._pending: dict[tuple, _PendingInvite] = {}
        # hash of an INVITE's _key -> when its server transaction ends; insertion order is expiry
        # order (one fixed window), so expired entries are always at the front.
        self._completed: dict[int, float] = {}
        # True while the first reply to a new request is being built and sent: its rate-limit
        # token was already taken by __call__, so the gate must not take another.
        self._granted = False

    # -- wiring --------------------------------------------------------------------------------

    def install(self, controller) -> None:
        """Make *controller* answer through this responder and record events as ``responsive``."""
        controller.responder = self
        controller.reply_gate = self.allow_reply
        controller.collected_method = "responsive"

    def stopService(self):
        """Cancel the INVITE timers: nothing is sent after shutdown."""
        for pending in self._pending.values():
            if pending.call is not None and pending.call.active():
                pending.call.cancel()
        self._pending.clear()
        self._completed.clear()
        return super().stopService()

    @property
    def pending(self) -> int:
        """INVITEs waiting for their final response."""
        return len(self._pending)

    @property
    def completed(self) -> int:
        """Answered INVITE transactions still remembered for CANCEL matching."""
        self._expire_completed()
        return len(self._completed)

    # -- the gate ------------------------------------------------------------------------------

    def allow_reply(self, destination: Address, data: bytes) -> bool:
        """The controller's ``reply_gate``: may *data* be sent to *destination* now?

        The first reply to a new request already holds its token (taken by :meth:`__call__`
        before the reply was built); every other transmission (later INVITE responses, replays to
        retransmissions) takes one here.
        """
        granted, self._granted = self._granted, False
        if not responses.can_reply_to(destination[0], destination[1]):
            self.stats.refused += 1
            return False
        if len(data) > responses.MAX_REPLY_BYTES:
            self.stats.oversize += 1
            return False
        if not granted and not self.limiter.allow(destination[0]):
            self.stats.limited += 1
            return False
        self.stats.sent += 1
        return True

    # -- the hook ------------------------------------------------------------------------------

    def __call__(self, message: SIPMessage, event: BadActorEvent, reply: Reply) -> None:
        """The controller's ``responder`` hook, called once per new request (never for a
        retransmission, which the controller answers with the stored reply).

        Cheapest checks first: :func:`~sentrypeer.sip.responses.decide` (no crypto), then the
        destination (forbidden address, rate limit); only a request that will be answered gets
        its To tag, nonce and reply made.

        :param message: the parsed request.
        :param event: its recorded event (addresses, transport, parse status, exact bytes).
        :param reply: sends bytes to the request's source on its transport (and stores them as
            the transaction's latest reply).
        """
        if event.parse_status in (PARSE_TRUNCATED, PARSE_NON_SIP):
            return
        decision = responses.decide(message, self.persona, raw=event.sip_message_bytes)
        if decision.kind == responses.NOTHING:
            return
        source = (event.source_ip, event.source_port)
        if not responses.can_reply_to(*source):
            self.stats.refused += 1
            return
        if not self.limiter.allow(source[0]):
            self.stats.limited += 1
            return
        context = responses.ReplyContext(
            source=source,
            local=(event.destination_ip, event.destination_port),
            transport=event.transport_type,
            to_tag=responses.make_to_tag(self._secret, message, self.persona.to_tag),
            now=self.clock.seconds(),
            entropy=(self._entropy(responses.ENTROPY_BYTES) if decision.challenge
                     else bytes(responses.ENTROPY_BYTES)),
            raw=event.sip_message_bytes,
        )
        self._granted = True
        try:
            if decision.kind == responses.REPLY:
                self._send(message, decision.status, context, reply, decision.challenge,
                           decision.unsupported)
                if message.method == "INVITE":
                    self._complete(self._key(source, message))
            elif decision.kind == responses.INVITE:
                self._invite(message, decision, context, reply)
            else:
                self._cancel(message, context, reply)
        finally:
            self._granted = False

    def _send(self, message, status, context, reply, challenge=None, unsupported=()) -> None:
        data = responses.build_response(
            message, status, self.persona, context, challenge=challenge, unsupported=unsupported
        )
        try:
            if data is None:
                self.stats.oversize += 1
                return
            reply(data)
        finally:
            # The token taken up front covers the first reply built for the request only.
            self._granted = False

    @staticmethod
    def _key(source: Address, message: SIPMessage) -> tuple:
        """What a CANCEL shares with its INVITE (RFC 3261 §9.2 with §17.2.3): the sender, the
        Call-ID, the CSeq number and the top Via branch."""
        return (source, message.call_id, message.cseq_number, message.top_via_branch)

    def _invite(self, message, decision, context, reply) -> None:
        self._send(message, 100, context, reply)
        key = self._key(context.source, message)
        if key in self._pending:
            self._finish(key)
        while len(self._pending) >= self.max_pending:
            self.stats.hurried += 1
            self._finish(next(iter(self._pending)))
        pending = _PendingInvite(message, decision, context, reply)
        self._pending[key] = pending
        step = self._early if decision.early else self._finish
        pending.call = self.clock.callLater(self.persona.invite_delay, step, key)

    def _early(self, key) -> None:
        pending = self._pending.get(key)
        if pending is None:
            return
        pending.call = None
        try:
            self._send(pending.message, pending.decision.early, pending.context, pending.reply)
        except Exception:
            self._log.failure("error sending a provisional response")
        pending.call = self.clock.callLater(self.persona.ringing_seconds, self._finish, key)

    def _finish(self, key, status: int | None = None) -> None:
        pending = self._pending.pop(key, None)
        if pending is None:
            return
        if pending.call is not None and pending.call.active():
            pending.call.cancel()
        pending.call = None
        self._complete(key)
        decision = pending.decision
        final = status if status is not None else decision.status
        challenge = decision.challenge if final == decision.status else None
        try:
            self._send(pending.message, final, pending.context, pending.reply, challenge)
        except Exception:
            self._log.failure("error sending a final response")

    def _expire_completed(self) -> None:
        now = self.clock.seconds()
        completed = self._completed
        while completed:
            oldest = next(iter(completed))
            if completed[oldest] > now:
                break
            del completed[oldest]

    def _complete(self, key: tuple) -> None:
        """Remember that the INVITE transaction *key* got its final response (§17.2.1)."""
        self._expire_completed()
        completed = self._completed
        hashed = hash(key)
        completed.pop(hashed, None)
        while completed and len(completed) >= self.max_completed:
            del completed[next(iter(completed))]
        if self.max_completed > 0:
            completed[hashed] = self.clock.seconds() + INVITE_TRANSACTION_SECONDS

    def _cancel(self, message, context, reply) -> None:
        key = self._key(context.source, message)
        if key in self._pending:
            self.stats.cancelled += 1
            self._send(message, 200, context, reply)
            self._finish(key, 487)
            return
        self._expire_completed()
        if hash(key) in self._completed:
            # §9.2: the INVITE's transaction exists (completed): the CANCEL gets 200, and the
            # final response already sent stands, so there is no 487.
            self.stats.cancelled_late += 1
            self._send(message, 200, context, reply)
            return
        self._send(message, 481, context, reply)


def build_responder(config, clock: IReactorTime) -> SIPResponder:
    """The responder for a :class:`~sentrypeer.config.Config` (``--sip-persona``,
    ``--reply-rate``).

    :raises sentrypeer.sip.persona.PersonaError: when ``--sip-persona`` is unusable (one line).
    """
    persona = resolve_persona(config.sip_persona)
    return SIPResponder(persona, clock, reply_rate=config.reply_rate)
