"""Tests for :mod:`sentrypeer.webhook`: queueing, ordering, backoff, OAuth2, timeouts and stop."""

from __future__ import annotations

import json
import time

from twisted.internet import defer, reactor, task
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from sentrypeer import __version__
from sentrypeer.eventlog import event_json
from sentrypeer.pipeline import EventPipeline
from sentrypeer.sip.controller import SIPController
from sentrypeer.webhook import AUDIENCE, USER_AGENT, WebhookService, safe_url

from .support import ListSink
from .test_outputs import (
    NODE,
    Collector,
    HTTPServer,
    log_text,
    make_event,
    options_datagram,
    wait_for,
)

URL = "https://collector.example/api/events"
TOKEN_URL = "https://auth.example/oauth/token"
SECRET = "s3cret-never-logged"


class FakeResponse:
    def __init__(self, code: int, body: bytes = b"") -> None:
        self.code = code
        self._body = body

    def content(self):
        return defer.succeed(self._body)


class Call:
    def __init__(self, url, data, headers, kwargs) -> None:
        self.url = url
        self.data = data
        self.headers = headers
        self.kwargs = kwargs
        self.deferred: defer.Deferred = defer.Deferred()
        self.code: int | None = None

    def answer(self, code: int, body: bytes = b"") -> None:
        self.code = code
        self.deferred.callback(FakeResponse(code, body))


class FakeClient:
    """Records every POST; the test answers each one (or never does)."""

    def __init__(self) -> None:
        self.calls: list[Call] = []

    def post(self, url, data=None, headers=None, **kwargs):
        call = Call(url, data, headers, kwargs)
        self.calls.append(call)
        return call.deferred

    def to(self, url: str) -> list[Call]:
        return [c for c in self.calls if c.url == url]

    def pending(self) -> list[Call]:
        return [c for c in self.calls if not c.deferred.called]


class MaxJitter:
    """A ``random.Random`` stand-in whose jitter is always the largest (the full delay)."""

    def uniform(self, a, b):
        return b


class WebhookCase(SynchronousTestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.client = FakeClient()
        self.observer = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)

    def start(self, **kwargs) -> WebhookService:
        kwargs.setdefault("rng", MaxJitter())
        service = WebhookService(kwargs.pop("url", URL), reactor=self.clock,
                                 http_client=self.client, **kwargs)
        service.startService()
        self.addCleanup(lambda: service.stopService() if service.running else None)
        return service

    def token_reply(self, token: str, expires_in=86400) -> bytes:
        return json.dumps({"access_token": token, "expires_in": expires_in}).encode()


class PostTests(WebhookCase):
    def test_plain_post(self):
        """Without OAuth2 (``-w`` alone) the event's compact JSON (the JSON log line without its
        newline) is POSTed with Content-Type application/json and User-Agent SentryPeer/<version>,
        no Authorization header, redirects not followed."""
        service = self.start()
        event = make_event()
        service(event, False)
        self.assertEqual(self.client.calls, [])  # nothing in the caller's stack
        self.clock.advance(0)
        (call,) = self.client.calls
        self.assertEqual(call.url, URL)
        self.assertEqual(call.data, event_json(event))
        self.assertEqual(
            call.headers,
            {"Content-Type": "application/json", "User-Agent": f"SentryPeer/{__version__}"},
        )
        self.assertEqual(USER_AGENT, f"SentryPeer/{__version__}")
        self.assertEqual(call.kwargs.get("allow_redirects"), False)
        call.answer(200)
        self.assertEqual((service.sent, service.pending), (1, 0))

    def test_any_2xx_is_success(self):
        """200, 201, 202 and 204 all count as delivered (the original wanted 200 or 201)."""
        service = self.start()
        for code in (200, 201, 202, 204):
            service(make_event(), False)
            self.clock.advance(0)
            self.client.pending()[0].answer(code)
        self.assertEqual((service.sent, service.errors), (4, 0))

    def test_replicated_events_sent(self):
        """Events replicated from peers are posted like collected ones."""
        service = self.start()
        service(make_event(source_ip="192.0.2.99", sip_message_bytes=None), True)
        self.clock.advance(0)
        self.assertEqual(json.loads(self.client.calls[0].data)["source_ip"], "192.0.2.99")

    def test_in_order_one_at_a_time(self):
        """Events are posted in arrival order, one request in flight at a time."""
        service = self.start()
        events = [make_event(called_number=str(n)) for n in range(5)]
        for event in events:
            service(event, False)
        self.clock.advance(0)
        for n in range(5):
            self.assertEqual(len(self.client.pending()), 1)
            call = self.client.pending()[0]
            self.assertEqual(json.loads(call.data)["called_number"], str(n))
            call.answer(201)
        self.assertEqual(len(self.client.calls), 5)
        self.assertEqual(service.sent, 5)

    def test_failures_retried_in_order_none_twice(self):
        """Failures (5xx, connection refused, 404, 429) keep the event at the head of the queue:
        after the collector recovers every event is delivered exactly once, in order."""
        service = self.start(initial_backoff=1, max_backoff=8)
        for n in range(3):
            service(make_event(called_number=str(n)), False)
        self.clock.advance(0)
        self.client.pending()[0].answer(503)
        self.clock.advance(1)
        self.client.pending()[0].deferred.errback(ConnectionRefusedError())
        self.clock.advance(2)
        self.client.pending()[0].answer(404)
        self.clock.advance(4)
        self.client.pending()[0].answer(429)
        self.clock.advance(8)
        while self.client.pending():
            self.client.pending()[0].answer(200)
        delivered = [json.loads(c.data)["called_number"] for c in self.client.calls
                     if c.code == 200]
        self.assertEqual(delivered, ["0", "1", "2"])
        self.assertEqual((service.sent, service.errors, service.pending), (3, 4, 0))

    def test_backoff_exponential_capped(self):
        """Retry delays double from initial_backoff up to max_backoff; jitter keeps each one
        between half of it and all of it."""
        service = self.start(initial_backoff=1, max_backoff=300)
        self.assertEqual(
            [service.backoff_delay(n) for n in range(1, 12)],
            [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300],
        )
        jittered = WebhookService(URL, reactor=self.clock, http_client=self.client)
        for n in range(1, 40):
            delay = min(300, 2 ** (n - 1))
            self.assertTrue(delay / 2 <= jittered.backoff_delay(n) <= delay)

    def test_retry_waits_for_backoff(self):
        """After a failure nothing is sent before the backoff delay has passed; success resets it."""
        service = self.start(initial_backoff=1)
        service(make_event(), False)
        self.clock.advance(0)
        self.client.pending()[0].answer(500)
        self.clock.advance(0.99)
        self.assertEqual(self.client.pending(), [])
        self.clock.advance(0.01)
        self.client.pending()[0].answer(500)
        self.clock.advance(1.99)
        self.assertEqual(self.client.pending(), [])
        self.clock.advance(0.01)
        self.client.pending()[0].answer(200)
        service(make_event(), False)
        self.clock.advance(0)
        self.client.pending()[0].answer(500)
        self.clock.advance(1)
        self.assertEqual(len(self.client.pending()), 1)

    def test_timeout(self):
        """A request with no answer is cancelled after *timeout* seconds and retried later."""
        service = self.start(timeout=10, initial_backoff=1)
        service(make_event(), False)
        self.clock.advance(0)
        first = self.client.calls[0]
        self.clock.advance(10)
        self.assertTrue(first.deferred.called)  # cancelled
        self.assertEqual(service.errors, 1)
        self.assertIn("TimeoutError", log_text(self.observer, LogLevel.warn)[0])
        self.clock.advance(1)
        self.client.pending()[0].answer(200)
        self.assertEqual(service.sent, 1)

    def test_3xx_and_4xx_retried_not_dropped(self):
        """Every non-2xx reply is a failure that keeps the event at the head of the queue: a 3xx
        (redirects are not followed), 400, 404, 405, 410, 413, 418, 422 or 451 is retried after
        the backoff delay, and the event is delivered once the collector accepts it (the original
        of this port dropped the event on any 3xx and most 4xx)."""
        for code in (301, 302, 307, 308, 400, 404, 405, 409, 410, 413, 415, 418, 422, 451):
            client = self.client = FakeClient()
            service = self.start(initial_backoff=1, max_backoff=1)
            event = make_event(called_number=str(code))
            service(event, False)
            self.clock.advance(0)
            for _ in range(3):
                client.pending()[0].answer(code)
                self.assertEqual((service.pending, service.rejected), (1, 0), code)
                self.assertEqual(client.pending(), [], code)
                self.clock.advance(1)
            client.pending()[0].answer(201)
            self.assertEqual([c.data for c in client.calls], [event_json(event)] * 4, code)
            self.assertEqual((service.sent, service.pending, service.errors), (1, 0, 3), code)
            self.successResultOf(service.stopService())
        warnings = " ".join(log_text(self.observer, LogLevel.warn))
        self.assertIn("answered HTTP 301; retrying with backoff (redirects are not followed", warnings)

    def test_refused_event_dropped_after_bounded_attempts_over_time(self):
        """An event refused with the same 400 is retried with the growing backoff and dropped
        only after MAX_REFUSALS (8) such answers in a row spread over at least 5 minutes (here
        10 attempts over 511 s with the full jitter); it is counted as rejected and logged once,
        and the next event is then posted at once."""
        service = self.start(initial_backoff=1, max_backoff=300)
        for n in range(2):
            service(make_event(called_number=str(n)), False)
        self.clock.advance(0)
        times = []
        while service.rejected == 0:
            call = self.client.pending()[0]
            self.assertEqual(json.loads(call.data)["called_number"], "0")
            times.append(self.clock.seconds())
            call.answer(400)
            if service.rejected == 0:
                self.assertEqual(self.client.pending(), [])
                self.clock.advance(service.backoff_delay(service._failures_in_row))
        self.assertEqual(len(times), 10)
        self.assertGreaterEqual(times[-1] - times[0], 300)
        self.assertEqual(times[:8], [0, 1, 3, 7, 15, 31, 63, 127])
        (call,) = self.client.pending()
        self.assertEqual(json.loads(call.data)["called_number"], "1")
        call.answer(201)
        self.assertEqual((service.rejected, service.sent, service.pending, service.errors),
                         (1, 1, 0, 10))
        refused = [t for t in log_text(self.observer, LogLevel.warn) if "refused an event" in t]
        self.assertEqual(len(refused), 1)
        self.assertIn("10 times in a row", refused[0])
        self.assertIn("HTTP 400", refused[0])

    def test_changing_refusals_never_drop(self):
        """Only the same refusal in a row counts: an event answered 400, 422 and 503 in turn for
        an hour is still waiting, never dropped."""
        service = self.start(initial_backoff=1, max_backoff=60)
        service(make_event(), False)
        self.clock.advance(0)
        for n in range(60):
            self.client.pending()[0].answer((400, 422, 503)[n % 3])
            self.clock.advance(60)
        self.assertEqual((service.rejected, service.pending, len(self.client.pending())), (0, 1, 1))
        self.client.pending()[0].answer(200)
        self.assertEqual(service.sent, 1)

    def test_refusals_dropped_logged_per_episode(self):
        """A collector that refuses every event: each one is dropped after its bounded attempts
        (the backoff is not reset by a drop, so this is slow), one warning starts the episode,
        later drops are summed up at most once a minute, the first 2xx ends it with the total."""
        service = self.start(initial_backoff=1, max_backoff=300, max_refusals=2,
                             min_refusal_period=0)
        for n in range(5):
            service(make_event(called_number=str(n)), False)
        self.clock.advance(0)
        while service.rejected < 4:
            self.client.pending()[0].answer(422)
            if not self.client.pending():
                self.clock.advance(service.backoff_delay(service._failures_in_row))
        self.client.pending()[0].answer(200)
        self.assertEqual((service.rejected, service.sent, service.pending), (4, 1, 0))
        warnings = log_text(self.observer, LogLevel.warn)
        self.assertEqual(len([t for t in warnings if "refused an event" in t]), 1)
        self.assertLessEqual(len(warnings), 30)
        self.assertIn("webhook collector: back to normal after 4 event(s) refused",
                      " ".join(log_text(self.observer, LogLevel.info)))

    def test_failures_logged_once_per_episode(self):
        """Repeated failures are logged once, the recovery once."""
        service = self.start(initial_backoff=1, max_backoff=1)
        service(make_event(), False)
        self.clock.advance(0)
        for _ in range(5):
            self.client.pending()[0].answer(503)
            self.clock.advance(1)
        self.client.pending()[0].answer(200)
        self.assertEqual(len(log_text(self.observer, LogLevel.warn)), 1)
        self.assertEqual(service.errors, 5)
        self.assertIn("back to normal after 5", " ".join(log_text(self.observer, LogLevel.info)))

    def test_full_queue_drops_counted(self):
        """A full queue refuses new events: counted as dropped, logged once per episode, with
        the total once it has drained to half its size; the queued ones are still delivered in
        order.  (The summary used to come with the first event queued after one delivery, which
        logged two lines per event while the queue sat at its limit.)"""
        service = self.start(max_queue=3)
        for n in range(6):
            service(make_event(called_number=str(n)), False)
        self.assertEqual((service.pending, service.dropped), (3, 3))
        full = [t for t in log_text(self.observer, LogLevel.warn) if "queue full" in t]
        self.assertEqual(len(full), 1)
        self.clock.advance(0)
        self.client.pending()[0].answer(200)
        service(make_event(called_number="6"), False)
        self.client.pending()[0].answer(200)
        self.assertEqual(service.pending, 2)
        self.assertNotIn("back to normal", " ".join(log_text(self.observer)))
        self.client.pending()[0].answer(200)
        self.assertIn("webhook queue: back to normal after 3 event(s) dropped (queue full)",
                      " ".join(log_text(self.observer, LogLevel.info)))
        while self.client.pending():
            self.client.pending()[0].answer(200)
        numbers = [json.loads(c.data)["called_number"] for c in self.client.calls]
        self.assertEqual(numbers, ["0", "1", "2", "6"])

    def test_queue_at_its_limit_logs_bounded(self):
        """A queue that sits at its limit for 10 minutes (each delivery makes room for one
        event, two arrive) logs one line when it fills, at most one summary a minute with the
        drops of that minute, and one line with the total once it drains; never a line per
        event, and every drop is in those lines."""
        service = self.start(max_queue=10)
        for _ in range(10):
            service(make_event(), False)
        self.clock.advance(0)
        for _ in range(6000):
            self.client.pending()[0].answer(200)
            service(make_event(), False)
            service(make_event(), False)
            self.clock.advance(0.1)
        self.assertEqual(service.dropped, 6000)
        lines = log_text(self.observer)
        self.assertEqual(len([t for t in lines if "webhook: queue full" in t]), 1)
        summaries = [t for t in lines if "in the last minute" in t]
        self.assertIn(len(summaries), (9, 10))
        self.assertNotIn("back to normal", " ".join(lines))
        while self.client.pending():
            self.client.pending()[0].answer(200)
        lines = log_text(self.observer)
        self.assertLessEqual(len(lines), 13)
        self.assertIn("webhook queue: back to normal after 6000 event(s) dropped (queue full)",
                      lines[-1])
        reported = 1 + sum(int(t.split(": ")[1].split()[0]) for t in summaries)
        self.assertLessEqual(reported, 6000)

    def test_drops_reported_when_queue_drains_without_new_event(self):
        """Drops of a full-queue episode are reported even when no event is queued afterwards:
        the line that ends the episode (queue back to half its size) gives their total."""
        service = self.start(max_queue=2)
        for _ in range(5):
            service(make_event(), False)
        self.clock.advance(0)
        while self.client.pending():
            self.client.pending()[0].answer(200)
        self.assertEqual((service.sent, service.dropped), (2, 3))
        self.assertIn("webhook queue: back to normal after 3 event(s) dropped (queue full)",
                      " ".join(log_text(self.observer, LogLevel.info)))

    def test_drops_reported_while_queue_stays_full_and_at_stop(self):
        """With the collector down and the queue full, drops after the first are summed up
        within a minute even if no event follows; the episode's total is logged at stop."""
        service = self.start(max_queue=2, initial_backoff=1000, max_backoff=1000)
        for _ in range(6):
            service(make_event(), False)
        self.clock.advance(0)
        self.client.pending()[0].answer(503)
        self.clock.advance(59)
        self.assertNotIn("in the last minute", " ".join(log_text(self.observer)))
        self.clock.advance(1)
        self.assertIn("webhook queue: 3 event(s) dropped (queue full) in the last minute "
                      "(still failing)", " ".join(log_text(self.observer, LogLevel.warn)))
        service(make_event(), False)
        self.successResultOf(service.stopService())
        warnings = " ".join(log_text(self.observer, LogLevel.warn))
        self.assertIn("webhook queue: 1 event(s) dropped (queue full) in the last minute", warnings)
        self.assertIn("webhook queue: still failing at stop, after 5 event(s) dropped", warnings)
        self.assertIn("2 event(s) not delivered", warnings)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_queue_bytes_bounded(self):
        """The queue is also bounded in bytes of JSON."""
        service = self.start(max_queue_bytes=6000)
        for _ in range(3):
            service(make_event(sip_message="x" * 2000), False)
        self.assertEqual((service.pending, service.dropped), (2, 1))

    def test_call_never_raises(self):
        """An event that cannot be encoded is counted and logged, never raised."""
        service = self.start()
        service(make_event(source_port=object()), False)
        self.assertEqual(service.errors, 1)
        self.assertEqual(len(self.flushLoggedErrors(TypeError)), 1)

    def test_safe_url(self):
        """Logged URLs lose user info, query and fragment."""
        self.assertEqual(safe_url("https://u:p@h.example:8443/a/b?key=1#f"),
                         "https://h.example:8443/a/b")
        self.assertEqual(safe_url("http://[::1]:80/x"), "http://[::1]:80/x")
        self.assertEqual(repr(WebhookService("https://u:p@h/x?t=1", reactor=self.clock,
                                             http_client=self.client)), "<WebhookService https://h/x>")

    def test_client_id_and_secret_together(self):
        """Only one of client id and secret is a programming error (the config pairs them)."""
        self.assertRaises(ValueError, WebhookService, URL, reactor=self.clock, client_id="x")


class OAuth2Tests(WebhookCase):
    def start_oauth(self, **kwargs) -> WebhookService:
        return self.start(client_id="client-1", client_secret=SECRET, token_url=TOKEN_URL, **kwargs)

    def test_token_request_and_bearer(self):
        """The first event fetches a token: POST JSON {client_id, client_secret, audience,
        grant_type} in that order to the token URL; the event then carries
        ``Authorization: Bearer <token>`` and Content-Type application/json."""
        service = self.start_oauth()
        event = make_event()
        service(event, False)
        self.clock.advance(0)
        (token_call,) = self.client.calls
        self.assertEqual(token_call.url, TOKEN_URL)
        self.assertEqual(token_call.headers["Content-Type"], "application/json")
        body = json.loads(token_call.data)
        self.assertEqual(list(body), ["client_id", "client_secret", "audience", "grant_type"])
        self.assertEqual(
            body,
            {"client_id": "client-1", "client_secret": SECRET, "audience": AUDIENCE,
             "grant_type": "client_credentials"},
        )
        self.assertEqual(AUDIENCE, "https://sentrypeer.com/api")
        token_call.answer(200, self.token_reply("tok-1"))
        post = self.client.calls[1]
        self.assertEqual(post.url, URL)
        self.assertEqual(post.headers["Authorization"], "Bearer tok-1")
        self.assertEqual(post.headers["Content-Type"], "application/json")
        self.assertEqual(post.data, event_json(event))
        post.answer(201)
        self.assertEqual((service.sent, service.token_requests), (1, 1))

    def test_token_cached_until_expiry(self):
        """The token is reused until expires_in minus a margin (60 s, at most a tenth of the
        lifetime), then renewed before use."""
        service = self.start_oauth()
        service(make_event(), False)
        self.clock.advance(0)
        self.client.pending()[0].answer(200, self.token_reply("tok-1", 3600))
        self.client.pending()[0].answer(200)
        for _ in range(3):
            service(make_event(), False)
        self.clock.advance(0)
        while self.client.pending():
            self.client.pending()[0].answer(200)
        self.assertEqual(len(self.client.to(TOKEN_URL)), 1)
        self.clock.advance(3600 - 60 - 1)
        service(make_event(), False)
        self.clock.advance(0)
        self.assertEqual(self.client.pending()[0].url, URL)
        self.client.pending()[0].answer(200)
        self.clock.advance(1)
        service(make_event(), False)
        self.clock.advance(0)
        self.assertEqual(self.client.pending()[0].url, TOKEN_URL)
        self.client.pending()[0].answer(200, self.token_reply("tok-2", 3600))
        self.assertEqual(self.client.pending()[0].headers["Authorization"], "Bearer tok-2")
        self.assertEqual(service.token_requests, 2)

    def test_401_on_cached_token_refreshes_once(self):
        """A 401 or 403 on a cached token fetches a new token once and retries the event at once
        (no recursion, no backoff wait)."""
        service = self.start_oauth()
        service(make_event(), False)
        self.clock.advance(0)
        self.client.pending()[0].answer(200, self.token_reply("tok-1"))
        self.client.pending()[0].answer(200)
        for code, token in ((401, "tok-2"), (403, "tok-3")):
            service(make_event(), False)
            self.clock.advance(0)
            self.client.pending()[0].answer(code)
            renew = self.client.pending()[0]
            self.assertEqual(renew.url, TOKEN_URL)
            renew.answer(200, self.token_reply(token))
            retry = self.client.pending()[0]
            self.assertEqual(retry.headers["Authorization"], f"Bearer {token}")
            retry.answer(200)
        self.assertEqual((service.sent, service.token_requests, service.pending), (3, 3, 0))

    def test_401_on_fresh_token_backs_off(self):
        """A 401 on a token just fetched is an ordinary failure: the event is retried after the
        backoff delay, with a new token, never in a tight loop."""
        service = self.start_oauth(initial_backoff=2)
        service(make_event(), False)
        self.clock.advance(0)
        self.client.pending()[0].answer(200, self.token_reply("tok-1"))
        self.client.pending()[0].answer(401)
        self.assertEqual(self.client.pending(), [])
        self.assertEqual(len(self.client.calls), 2)
        self.clock.advance(2)
        self.assertEqual(self.client.pending()[0].url, TOKEN_URL)
        self.client.pending()[0].answer(200, self.token_reply("tok-2"))
        self.client.pending()[0].answer(200)
        self.assertEqual((service.sent, service.errors), (1, 1))

    def test_token_failures_back_off(self):
        """A token endpoint that fails (error, non-2xx, no access_token, not JSON) delays the
        event with backoff; the collector is not called without a token."""
        service = self.start_oauth(initial_backoff=1, max_backoff=1)
        service(make_event(), False)
        self.clock.advance(0)
        self.client.pending()[0].deferred.errback(ConnectionRefusedError())
        for reply in ((500, b""), (200, b'{"token": "x"}'), (200, b"not json"),
                      (200, b'{"access_token": 5}')):
            self.clock.advance(1)
            self.client.pending()[0].answer(*reply)
        self.assertEqual(self.client.to(URL), [])
        self.assertEqual(service.errors, 5)
        self.clock.advance(1)
        self.client.pending()[0].answer(200, self.token_reply("tok"))
        self.client.pending()[0].answer(200)
        self.assertEqual(service.sent, 1)

    def test_token_without_expires_in(self):
        """A token reply without expires_in is kept until a 401/403 (as the original did)."""
        service = self.start_oauth()
        service(make_event(), False)
        self.clock.advance(0)
        self.client.pending()[0].answer(200, b'{"access_token": "forever"}')
        self.client.pending()[0].answer(200)
        self.clock.advance(10 ** 7)
        service(make_event(), False)
        self.clock.advance(0)
        self.assertEqual(self.client.pending()[0].headers["Authorization"], "Bearer forever")

    def test_secret_and_token_never_logged(self):
        """Across token failures, refusals, collector errors and stop, neither the client secret
        nor the token appears in any log event (text or fields) nor in the service's repr."""
        service = self.start_oauth(initial_backoff=1, max_backoff=1)
        service(make_event(), False)
        self.clock.advance(0)
        self.client.pending()[0].answer(500, SECRET.encode())
        self.clock.advance(1)
        self.client.pending()[0].answer(200, self.token_reply("tok-secret-value"))
        self.client.pending()[0].answer(401, b"tok-secret-value")
        self.clock.advance(1)
        self.client.pending()[0].answer(200, self.token_reply("tok-secret-value"))
        self.client.pending()[0].answer(503, b"tok-secret-value")
        self.clock.advance(1)
        self.assertEqual(len(self.client.pending()), 1)
        service.stopService()
        self.clock.advance(5)
        everything = repr(service) + repr([dict(e) for e in self.observer])
        everything += " ".join(log_text(self.observer))
        self.assertNotIn(SECRET, everything)
        self.assertNotIn("tok-secret-value", everything)
        self.assertGreater(len(self.observer), 2)


class StopTests(WebhookCase):
    def test_stop_grace_then_cancel(self):
        """At stop the request in flight gets stop_grace seconds; then it is cancelled and the
        number of events not delivered is logged and kept in ``undelivered``."""
        service = self.start(stop_grace=2)
        for _ in range(4):
            service(make_event(), False)
        self.clock.advance(0)
        d = service.stopService()
        self.assertNoResult(d)
        self.clock.advance(2)
        self.successResultOf(d)
        self.assertTrue(self.client.calls[0].deferred.called)
        self.assertEqual(service.undelivered, 4)
        self.assertIn("4 event(s) not delivered", " ".join(log_text(self.observer, LogLevel.warn)))
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(len(self.client.calls), 1)

    def test_stop_waits_for_answer_within_grace(self):
        """A request answered within the grace counts as sent; nothing new is started."""
        service = self.start(stop_grace=2)
        service(make_event(), False)
        service(make_event(), False)
        self.clock.advance(0)
        d = service.stopService()
        self.clock.advance(1)
        self.client.calls[0].answer(200)
        self.successResultOf(d)
        self.assertEqual((service.sent, service.undelivered, len(self.client.calls)), (1, 1, 1))

    def test_stop_during_backoff(self):
        """Stop during a backoff wait returns at once."""
        service = self.start(initial_backoff=100)
        service(make_event(), False)
        self.clock.advance(0)
        self.client.calls[0].answer(503)
        self.successResultOf(service.stopService())
        self.assertEqual(service.undelivered, 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_events_before_start_and_after_stop(self):
        """Events queued before start are sent once started; after stop they are dropped
        (counted)."""
        service = WebhookService(URL, reactor=self.clock, http_client=self.client)
        service(make_event(), False)
        self.clock.advance(0)
        self.assertEqual(self.client.calls, [])
        service.startService()
        self.clock.advance(0)
        self.client.calls[0].answer(200)
        self.successResultOf(service.stopService())
        service(make_event(), False)
        self.assertEqual((service.sent, service.dropped), (1, 1))


class RealCollectorTests(TestCase):
    """A local twisted.web server on 127.0.0.1 plays the token endpoint and the collector."""

    def setUp(self):
        self.collector = Collector()
        self.http = HTTPServer(self, self.collector)
        self.http.listen()

    def start(self, **kwargs) -> WebhookService:
        kwargs.setdefault("initial_backoff", 0.02)
        kwargs.setdefault("max_backoff", 0.1)
        service = WebhookService(self.http.url("/api/events"), reactor=reactor, **kwargs)
        service.startService()
        self.addCleanup(lambda: service.stopService() if service.running else None)
        return service

    async def test_plain_post(self):
        """No OAuth2: one POST per event to the URL's path with Content-Type application/json,
        User-Agent SentryPeer/<version>, no Authorization, and the event's compact JSON body."""
        service = self.start()
        event = make_event()
        service(event, False)
        await wait_for(lambda: self.collector.delivered)
        await service.stopService()
        ((path, headers, body, code),) = self.collector.posts
        self.assertEqual((path, code), ("/api/events", 201))
        self.assertEqual(headers["content-type"], "application/json")
        self.assertEqual(headers["user-agent"], f"SentryPeer/{__version__}")
        self.assertNotIn("authorization", headers)
        self.assertEqual(body, event_json(event))
        self.assertEqual(list(json.loads(body))[:3], ["app_name", "app_version", "event_timestamp"])
        self.assertEqual(self.collector.token_requests, [])

    async def test_token_cached_and_refreshed_on_401(self):
        """With OAuth2 the token is fetched once and reused; when the collector stops accepting it
        (401) a new one is fetched once and the event delivered with it."""
        self.collector.require_token = True
        service = self.start(client_id="cid", client_secret=SECRET,
                             token_url=self.http.url("/oauth/token"))
        for n in range(3):
            service(make_event(called_number=str(n)), False)
        await wait_for(lambda: len(self.collector.delivered) == 3)
        self.assertEqual(len(self.collector.token_requests), 1)
        headers, body = self.collector.token_requests[0]
        self.assertEqual(headers["content-type"], "application/json")
        self.assertEqual(json.loads(body)["grant_type"], "client_credentials")
        self.collector.valid_token = "revoked"
        service(make_event(called_number="3"), False)
        await wait_for(lambda: len(self.collector.delivered) == 4)
        self.assertEqual(len(self.collector.token_requests), 2)
        codes = [code for _, _, _, code in self.collector.posts]
        self.assertEqual(codes, [201, 201, 201, 401, 201])
        self.assertEqual(self.collector.posts[-1][1]["authorization"], "Bearer token-2-not-for-logs")
        self.assertEqual(
            [json.loads(b)["called_number"] for b in self.collector.delivered], ["0", "1", "2", "3"]
        )

    async def test_collector_down_then_up(self):
        """The collector answers 503 for a while: the events are delivered once it is back, in
        order, each exactly once."""
        self.collector.mode = "down"
        service = self.start()
        events = [make_event(called_number=str(n)) for n in range(10)]
        for event in events:
            service(event, False)
        await wait_for(lambda: len(self.collector.posts) >= 3)
        self.assertEqual(self.collector.delivered, [])
        self.collector.mode = "ok"
        await wait_for(lambda: service.sent == 10)
        self.assertEqual(self.collector.delivered, [event_json(e) for e in events])
        self.assertGreaterEqual(service.errors, 3)

    async def test_redirecting_then_refusing_collector_then_up(self):
        """Over real HTTP, a collector that answers 307 (not followed), then 400 and 405 for a
        while loses nothing: once it accepts, every event is delivered in order, none twice."""
        self.collector.mode = "status"
        self.collector.status_code = 307
        service = self.start()
        events = [make_event(called_number=str(n)) for n in range(5)]
        for event in events:
            service(event, False)
        for code in (400, 405):
            await wait_for(lambda: len(self.collector.posts) >= 3)
            self.collector.status_code = code
            self.collector.posts.clear()
        await wait_for(lambda: len(self.collector.posts) >= 3)
        self.assertEqual(self.collector.delivered, [])
        self.collector.mode = "ok"
        await wait_for(lambda: service.sent == 5)
        self.assertEqual(self.collector.delivered, [event_json(e) for e in events])
        self.assertEqual(service.rejected, 0)

    async def test_connection_refused_then_up(self):
        """Nothing listens (connection refused): events wait; once the collector listens again
        on the same port they are delivered in order, none twice."""
        port_number = self.http.port_number
        await self.http.stop_listening()
        service = self.start()
        events = [make_event(called_number=str(n)) for n in range(5)]
        for event in events:
            service(event, False)
        await wait_for(lambda: service.errors >= 3)
        self.assertEqual(service.sent, 0)
        self.http.listen(port_number)
        await wait_for(lambda: service.sent == 5)
        self.assertEqual(self.collector.delivered, [event_json(e) for e in events])

    async def test_hanging_collector_does_not_slow_ingest(self):
        """A collector that never answers: SIP ingest through the pipeline is unaffected (every
        event reaches the write queue, each output call returns at once), one request at a time
        waits, and stop gives up after the grace, logging what was not delivered."""
        self.collector.mode = "hang"
        observer = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        service = self.start(stop_grace=0.2)
        store = ListSink()
        store.put = store
        pipeline = EventPipeline(store)
        pipeline.add_output(service)
        controller = SIPController(node_id=NODE, sink=pipeline.submit_collected, clock=reactor)
        await wait_for(lambda: True)
        slowest = 0.0
        started = time.monotonic()
        for n in range(500):
            before = time.monotonic()
            controller.message_received(
                options_datagram(n), "UDP", ("192.0.2.1", 5060), ("192.0.2.2", 5060)
            )
            slowest = max(slowest, time.monotonic() - before)
            if n == 0:
                await wait_for(lambda: self.collector.posts)
        total = time.monotonic() - started
        self.assertEqual(len(store.events), 500)
        self.assertLess(slowest, 0.05)
        self.assertLess(total, 2.0)
        await task.deferLater(reactor, 0.2)
        self.assertEqual(len(self.collector.posts), 1)
        self.assertEqual(service.pending, 500)
        begin = time.monotonic()
        await service.stopService()
        self.assertLess(time.monotonic() - begin, 2.0)
        self.assertEqual(service.undelivered, 500)
        self.assertIn("500 event(s) not delivered", " ".join(log_text(observer, LogLevel.warn)))
        self.assertEqual(pipeline.output_errors, 0)
