"""Webhook output (``-w URL``, optional OAuth2 ``-i``/``-c``/``--oauth2-token-url``).

Every event, collected or replicated, is POSTed with treq to the webhook URL: the body is the
event's compact JSON (the same bytes as its JSON log line, without the newline), with
``Content-Type: application/json`` and ``User-Agent: SentryPeer/<version>``.  With an OAuth2 client
id and secret, a client-credentials token is fetched first (reference §8.2: a JSON body with
``client_id``, ``client_secret``, ``audience`` ``https://sentrypeer.com/api`` and ``grant_type``
``client_credentials``) and sent as ``Authorization: Bearer <token>``.

What the original got wrong and this module does instead (reference §8, §14 item 15):

* ``-w`` alone posts, with the right Content-Type (the Rust build never posted without OAuth2,
  the C build sent a form Content-Type);
* nothing runs in the packet path: calling the output appends the event to a bounded in-memory
  FIFO queue and returns; one request at a time drains it, in order;
* success is any 2xx (the original: 200 or 201).  Every other outcome (a network error, a
  timeout, any 3xx, 4xx or 5xx reply, a 401/403 that a new token did not cure) keeps the event at
  the head of the queue and retries it after an exponential backoff with jitter
  (:data:`INITIAL_BACKOFF` doubling up to :data:`MAX_BACKOFF`); every request has a timeout
  (:data:`REQUEST_TIMEOUT`).  An event is removed only after a 2xx, so delivery is at least once:
  none is delivered twice unless a response was lost in a timeout (the collector can use
  ``event_uuid`` to drop such a duplicate).  Redirects are not followed (a 3xx is retried like a
  5xx: it is a configuration problem, the events wait for it to be fixed);
* so that one poisoned event cannot block the queue for ever, an event that the collector keeps
  refusing with the same "this request is bad" status (:data:`REFUSAL_STATUSES`: 400, 405, 409,
  410, 413, 415, 422) is dropped, counted as ``rejected``, only after :data:`MAX_REFUSALS`
  such answers in a row spread over at least :data:`MIN_REFUSAL_PERIOD` seconds (the backoff
  keeps growing meanwhile).  A collector that refuses everything thus loses at most one event
  per several minutes, and the drops are logged (one line per episode);
* the token is cached until ``expires_in`` minus a margin (the original ignored ``expires_in``);
  a 401/403 on a cached token fetches a new one once and retries at once, without recursion; a
  401/403 on a fresh token is an ordinary failure (backoff);
* a full queue (:data:`MAX_QUEUE` events or :data:`MAX_QUEUE_BYTES` bytes) refuses new events,
  counted as ``dropped``.  Logging is bounded (:class:`~sentrypeer.outputs.FailureEpisode`): one
  line when the queue fills, at most one summary line a minute while new events are dropped, and
  one line with the total once the queue has drained to half its limits (or at stop), never one
  line per event even when the queue sits at its limit; every drop is reported.  At stop, the
  request in flight gets a short grace, then the number of events not delivered is logged;
* the client secret and the token are never logged (nor the URL's user info or query).
"""

from __future__ import annotations

import json
import random
import urllib.parse
from collections import deque

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.task import deferLater
from twisted.logger import Logger

from sentrypeer import __version__
from sentrypeer.eventlog import event_json
from sentrypeer.events import BadActorEvent
from sentrypeer.outputs import FailureEpisode, describe_error

DEFAULT_TOKEN_URL = "https://authz.sentrypeer.com/oauth/token"
#: The audience of the token request (the original's, reference §8.2).
AUDIENCE = "https://sentrypeer.com/api"
USER_AGENT = f"SentryPeer/{__version__}"
#: Seconds a request (connection, reply and body) may take.
REQUEST_TIMEOUT = 10.0
#: Seconds of the first retry delay; doubled after every failure in a row, up to MAX_BACKOFF.
INITIAL_BACKOFF = 1.0
MAX_BACKOFF = 300.0
#: Seconds before ``expires_in`` at which a token is renewed (at most a tenth of its lifetime).
TOKEN_MARGIN = 60.0
#: Most events and bytes of event JSON waiting for delivery.
MAX_QUEUE = 10_000
MAX_QUEUE_BYTES = 32 * 1024 * 1024
#: Seconds the request in flight may still take after stop was asked.
STOP_GRACE = 2.0

#: Replies that say the event itself is refused: after MAX_REFUSALS of the same one in a row,
#: over at least MIN_REFUSAL_PERIOD seconds, the event is dropped (``rejected``).  Every other
#: non-2xx reply is retried for as long as it lasts.
REFUSAL_STATUSES = frozenset({400, 405, 409, 410, 413, 415, 422})
MAX_REFUSALS = 8
MIN_REFUSAL_PERIOD = 300.0

_DELIVERED, _REFUSED, _RETRY, _BROKEN = "delivered", "refused", "retry", "broken"


def safe_url(url: str) -> str:
    """*url* without user info, query or fragment, for the program's log."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError:
        port = None
    netloc = f"{host}:{port}" if port else host
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _default_client(reactor):
    """A treq client on an Agent with a persistent connection pool; returns ``(client, pool)``."""
    from treq.client import HTTPClient
    from twisted.web.client import Agent, HTTPConnectionPool

    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = 2
    return HTTPClient(Agent(reactor, pool=pool)), pool


class WebhookService(Service):
    """Posts every event to *url*, in order, from a bounded queue, retrying with backoff.

    Counters: ``sent`` (2xx), ``dropped`` (refused by a full queue, or after stop), ``rejected``
    (refused by the collector too many times, see :data:`REFUSAL_STATUSES`), ``errors`` (failed
    attempts, including token failures), ``token_requests``, ``undelivered`` (left in the queue at
    stop); ``pending`` is the queue length.

    :param url: the collector's URL (``http://`` or ``https://``).
    :param reactor: provides ``callLater``/``seconds``, and the connections of the default client.
    :param client_id: OAuth2 client id; OAuth2 is used when it and *client_secret* are given.
    :param client_secret: OAuth2 client secret (never logged).
    :param token_url: the OAuth2 token endpoint.
    :param agent: an ``IAgent`` to build the treq client on (tests, proxies).
    :param http_client: a treq ``HTTPClient``-like object with
        ``post(url, data=..., headers=..., allow_redirects=False)`` returning a Deferred of a
        response with ``code`` and ``content()``; overrides *agent*.
    :param max_queue: most events waiting.
    :param max_queue_bytes: most bytes of JSON waiting.
    :param timeout: seconds per request.
    :param initial_backoff: seconds before the first retry.
    :param max_backoff: the longest retry delay, seconds.
    :param token_margin: seconds before expiry at which a token is renewed.
    :param stop_grace: seconds the request in flight may take after stop.
    :param max_refusals: answers in :data:`REFUSAL_STATUSES` (the same one, in a row) after which
        an event may be dropped.
    :param min_refusal_period: seconds that must also have passed since the first of them.
    :param rng: a :class:`random.Random` for the jitter (tests make it deterministic).
    :raises ValueError: when only one of *client_id* and *client_secret* is given.
    """

    name = "webhook"
    _log = Logger(namespace="sentrypeer.webhook")

    def __init__(
        self,
        url: str,
        *,
        reactor,
        client_id: str | None = None,
        client_secret: str | None = None,
        token_url: str = DEFAULT_TOKEN_URL,
        agent=None,
        http_client=None,
        max_queue: int = MAX_QUEUE,
        max_queue_bytes: int = MAX_QUEUE_BYTES,
        timeout: float = REQUEST_TIMEOUT,
        initial_backoff: float = INITIAL_BACKOFF,
        max_backoff: float = MAX_BACKOFF,
        token_margin: float = TOKEN_MARGIN,
        stop_grace: float = STOP_GRACE,
        max_refusals: int = MAX_REFUSALS,
        min_refusal_period: float = MIN_REFUSAL_PERIOD,
        rng: random.Random | None = None,
    ) -> None:
        if (client_id is None) != (client_secret is None):
            raise ValueError("the OAuth2 client id and secret go together")
        self.url = url
        self.token_url = token_url
        self._client_id = client_id
        self._client_secret = client_secret
        self._reactor = reactor
        self._pool = None
        if http_client is None:
            if agent is not None:
                from treq.client import HTTPClient

                http_client = HTTPClient(agent)
            else:
                http_client, self._pool = _default_client(reactor)
        self._client = http_client
        self._max_queue = max_queue
        self._max_queue_bytes = max_queue_bytes
        self._timeout = timeout
        self._initial_backoff = initial_backoff
        self._max_backoff = max_backoff
        self._token_margin = token_margin
        self._stop_grace = stop_grace
        self._max_refusals = max_refusals
        self._min_refusal_period = min_refusal_period
        self._rng = rng if rng is not None else random.Random()
        self._queue: deque[bytes] = deque()
        self._queued_bytes = 0
        self._token: str | None = None
        self._token_expiry: float | None = None
        self._failures_in_row = 0
        #: (status, answers in a row, time of the first) of the head event's refusals.
        self._refusal: tuple[int, int, float] | None = None
        self._worker: defer.Deferred | None = None
        self._worker_waiters: list[defer.Deferred] = []
        self._kick_call = None
        self._sleep: defer.Deferred | None = None
        self._stopping = False
        self._delivery = FailureEpisode(
            self._log, "webhook deliveries", clock=reactor, noun="failed attempt(s)",
            summaries=False,
        )
        self._full = FailureEpisode(
            self._log, "webhook queue", clock=reactor, noun="event(s) dropped (queue full)"
        )
        self._rejections = FailureEpisode(
            self._log, "webhook collector", clock=reactor,
            noun="event(s) refused by the collector and dropped",
        )
        self.sent = 0
        self.dropped = 0
        self.rejected = 0
        self.errors = 0
        self.token_requests = 0
        self.undelivered = 0

    def __repr__(self) -> str:
        return f"<WebhookService {safe_url(self.url)}>"

    @property
    def oauth2(self) -> bool:
        """Whether requests carry an OAuth2 bearer token."""
        return self._client_id is not None

    @property
    def pending(self) -> int:
        """Events waiting for delivery (the one in flight included)."""
        return len(self._queue)

    def counters(self) -> dict[str, int]:
        """The counters and ``pending``, for metrics."""
        return {
            "sent": self.sent,
            "dropped": self.dropped,
            "rejected": self.rejected,
            "errors": self.errors,
            "token_requests": self.token_requests,
            "undelivered": self.undelivered,
            "pending": self.pending,
        }

    # -- life cycle -----------------------------------------------------------------------------

    def prepare(self) -> None:
        """Nothing to check before start: an unreachable collector is retried, not fatal."""

    def startService(self) -> None:
        """Start draining the queue (events may have been queued before start)."""
        super().startService()
        self._stopping = False
        self._log.info(
            "webhook: posting events to {url}{oauth}",
            url=safe_url(self.url),
            oauth=" with OAuth2" if self.oauth2 else "",
        )
        self._kick()

    def stopService(self) -> defer.Deferred:
        """Stop: the request in flight gets *stop_grace* seconds, then is cancelled; the number of
        events not delivered is logged; the connection pool is closed.

        :returns: a Deferred that fires when all of that is done.
        """
        super().stopService()
        self._stopping = True
        if self._kick_call is not None and self._kick_call.active():
            self._kick_call.cancel()
        self._kick_call = None
        if self._sleep is not None:
            self._sleep.cancel()
        d = self._wait_for_worker()
        d.addCallback(self._finish_stop)
        return d

    def _wait_for_worker(self) -> defer.Deferred:
        if self._worker is None:
            return defer.succeed(None)
        waiter: defer.Deferred = defer.Deferred()
        self._worker_waiters.append(waiter)
        timer = self._reactor.callLater(self._stop_grace, self._cancel_worker)

        def stop_timer(result):
            if timer.active():
                timer.cancel()
            return result

        return waiter.addBoth(stop_timer)

    def _cancel_worker(self) -> None:
        if self._worker is not None:
            self._worker.cancel()

    def _finish_stop(self, _=None):
        self.undelivered = len(self._queue)
        if self._queue:
            self._log.warn(
                "webhook: {count} event(s) not delivered to {url} at stop",
                count=len(self._queue),
                url=safe_url(self.url),
            )
        self._queue.clear()
        self._queued_bytes = 0
        self._refusal = None
        # What the episodes have not reported yet (drops of a full queue included) is logged now.
        for episode in (self._full, self._rejections, self._delivery):
            episode.close()
        if self._pool is not None:
            return self._pool.closeCachedConnections()
        return None

    # -- the output -----------------------------------------------------------------------------

    def __call__(self, event: BadActorEvent, replicated: bool) -> None:
        """Queue *event* (collected or replicated) for delivery; returns at once, never raises."""
        try:
            if self._stopping:
                self.dropped += 1
                return
            body = event_json(event)
            if len(self._queue) >= self._max_queue or (
                self._queued_bytes + len(body) > self._max_queue_bytes
            ):
                self.dropped += 1
                self._full.failed(
                    "webhook: queue full ({count} events, {size} bytes waiting for {url}); new "
                    "events are dropped (counted, summed up every minute) until it drains",
                    count=len(self._queue),
                    size=self._queued_bytes,
                    url=safe_url(self.url),
                )
                return
            self._queue.append(body)
            self._queued_bytes += len(body)
            self._kick()
        except Exception:
            self.errors += 1
            self._log.failure("webhook: cannot queue an event")

    # -- delivery -------------------------------------------------------------------------------

    def _kick(self) -> None:
        """Start the worker on the next reactor turn when there is work and none is running."""
        if (
            self.running
            and not self._stopping
            and self._queue
            and self._worker is None
            and self._kick_call is None
        ):
            self._kick_call = self._reactor.callLater(0, self._start_worker)

    def _start_worker(self) -> None:
        self._kick_call = None
        if self._worker is not None or not self._queue or self._stopping:
            return
        # Set before the callbacks: a client that answers synchronously (a test fake) finishes
        # the loop inside fromCoroutine, and _worker_done must then see it.
        self._worker = worker = defer.Deferred.fromCoroutine(self._drain())
        worker.addErrback(self._worker_failed)
        worker.addBoth(self._worker_done)

    def _worker_failed(self, failure) -> None:
        if not failure.check(defer.CancelledError):
            self.errors += 1
            self._log.failure("webhook: delivery loop failed", failure)

    def _worker_done(self, result):
        self._worker = None
        waiters, self._worker_waiters = self._worker_waiters, []
        for waiter in waiters:
            waiter.callback(None)
        self._kick()
        return None

    async def _drain(self) -> None:
        """Deliver the queue head by head; one request in flight at a time."""
        while self._queue and not self._stopping:
            body = self._queue[0]
            try:
                outcome, code = await self._attempt(body)
            except Exception:
                # A bug, not a network failure: drop this event rather than retry it forever.
                self.errors += 1
                self._log.failure("webhook: cannot deliver an event; dropped")
                outcome, code = _BROKEN, None
            if outcome == _DELIVERED:
                self.sent += 1
                self._failures_in_row = 0
                self._pop(body)
                continue
            if outcome == _BROKEN:
                self._pop(body)
                continue
            if outcome == _REFUSED and self._refused_for_good(code):
                # Dropped; the backoff is kept (a collector that refuses everything stays slow).
                self._pop(body)
                continue
            if outcome == _RETRY:
                self._refusal = None
            if self._stopping:
                return
            self._failures_in_row += 1
            self._sleep = deferLater(self._reactor, self.backoff_delay(self._failures_in_row))
            try:
                await self._sleep
            except defer.CancelledError:
                return
            finally:
                self._sleep = None

    def _pop(self, body: bytes) -> None:
        """Remove the head event (*body*); end a full-queue episode once half the room is back."""
        self._queue.popleft()
        self._queued_bytes -= len(body)
        self._refusal = None
        if self._full.active and (
            len(self._queue) <= self._max_queue // 2
            and self._queued_bytes <= self._max_queue_bytes // 2
        ):
            self._full.succeeded()

    def _refused_for_good(self, code: int) -> bool:
        """Count one more refusal of the head event with *code*; whether it is now dropped (the
        same refusal :data:`MAX_REFUSALS` times in a row, over :data:`MIN_REFUSAL_PERIOD` s)."""
        now = self._reactor.seconds()
        if self._refusal is not None and self._refusal[0] == code:
            _, count, first = self._refusal
            self._refusal = (code, count + 1, first)
        else:
            self._refusal = (code, 1, now)
        _, count, first = self._refusal
        if count < self._max_refusals or now - first < self._min_refusal_period:
            return False
        self.rejected += 1
        self._rejections.failed(
            "webhook: {url} refused an event {count} times in a row over {minutes} min (HTTP "
            "{code}); it is dropped (counted as rejected, later ones summed up every minute)",
            url=safe_url(self.url),
            count=count,
            minutes=round((now - first) / 60),
            code=code,
        )
        return True

    def backoff_delay(self, failures: int) -> float:
        """Seconds to wait after *failures* failed attempts in a row: the exponential delay
        ``initial * 2 ** (failures - 1)`` capped at *max_backoff*, then jittered to between half
        of it and all of it (so many nodes do not retry in step)."""
        delay = min(self._max_backoff, self._initial_backoff * 2 ** min(failures - 1, 32))
        return delay / 2 + self._rng.uniform(0, delay / 2)

    async def _attempt(self, body: bytes) -> tuple[str, int | None]:
        """One delivery attempt of *body*, with at most one token renewal.

        :returns: ``(outcome, status)``: :data:`_DELIVERED` (2xx), :data:`_REFUSED` (a status in
            :data:`REFUSAL_STATUSES`) or :data:`_RETRY` (anything else), and the HTTP status
            (``None`` without a reply).
        """
        code: int | None = None
        for _ in range(2):
            headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT}
            fresh = False
            if self.oauth2:
                token, fresh = await self._get_token()
                if token is None:
                    return _RETRY, None
                headers["Authorization"] = "Bearer " + token
            try:
                code, _content = await self._request(self.url, body, headers)
            except Exception as e:
                if not self._stopping:
                    self._failed("webhook: POST to {url} failed ({error}); retrying with backoff",
                                 error=describe_error(e))
                return _RETRY, None
            if 200 <= code < 300:
                self._delivery.succeeded()
                self._rejections.succeeded()
                return _DELIVERED, code
            if code in (401, 403) and self.oauth2:
                self._token = self._token_expiry = None
                if not fresh:
                    continue  # a cached token was refused: renew it once and retry now
            break
        if 300 <= code < 400:
            hint = " (redirects are not followed: check the URL)"
        elif code in REFUSAL_STATUSES:
            hint = (f" (an event refused this way {self._max_refusals} times over "
                    f"{self._min_refusal_period / 60:g} min is dropped)")
        else:
            hint = ""
        self._failed("webhook: POST to {url} answered HTTP {code}; retrying with backoff{hint}",
                     code=code, hint=hint)
        return (_REFUSED if code in REFUSAL_STATUSES else _RETRY), code

    def _failed(self, fmt: str, **fields) -> None:
        self.errors += 1
        self._delivery.failed(fmt, url=safe_url(self.url), **fields)

    def _request(self, url: str, body: bytes, headers: dict[str, str]) -> defer.Deferred:
        """POST *body*; a Deferred of ``(status, response body)`` that fails after *timeout*."""

        async def exchange() -> tuple[int, bytes]:
            response = await self._client.post(
                url, data=body, headers=headers, allow_redirects=False
            )
            content = await response.content()
            return response.code, content

        d = defer.Deferred.fromCoroutine(exchange())
        d.addTimeout(self._timeout, self._reactor)
        return d

    async def _get_token(self) -> tuple[str | None, bool]:
        """The cached token, or a new one.

        :returns: ``(token, fresh)``; ``(None, False)`` when the token request failed (logged
            once per episode, without the secret or the reply).
        """
        if self._token is not None and (
            self._token_expiry is None or self._reactor.seconds() < self._token_expiry
        ):
            return self._token, False
        self._token = self._token_expiry = None
        self.token_requests += 1
        payload = json.dumps(
            {
                "client_id": self._client_id,
                "client_secret": self._client_secret,
                "audience": AUDIENCE,
                "grant_type": "client_credentials",
            },
            separators=(",", ":"),
        ).encode("utf-8")
        headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT}
        requested_at = self._reactor.seconds()
        try:
            code, content = await self._request(self.token_url, payload, headers)
        except Exception as e:
            if not self._stopping:
                self._token_failed(describe_error(e))
            return None, False
        if not 200 <= code < 300:
            self._token_failed(f"HTTP {code}")
            return None, False
        try:
            reply = json.loads(content)
            token = reply["access_token"]
            expires_in = reply.get("expires_in")
        except (ValueError, TypeError, KeyError, AttributeError):
            self._token_failed("a reply without access_token")
            return None, False
        if not isinstance(token, str) or not token:
            self._token_failed("a reply without access_token")
            return None, False
        self._token = token
        if isinstance(expires_in, (int, float)) and not isinstance(expires_in, bool) and expires_in > 0:
            margin = min(self._token_margin, expires_in / 10)
            self._token_expiry = requested_at + expires_in - margin
        else:
            self._token_expiry = None  # kept until a 401/403, as the original did
        return token, True

    def _token_failed(self, reason: str) -> None:
        self._failed(
            "webhook: OAuth2 token request to {token_url} failed ({reason}); retrying with backoff",
            token_url=safe_url(self.token_url),
            reason=reason,
        )
