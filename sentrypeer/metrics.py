"""Prometheus metrics at ``/metrics`` (issue 8), read from the live counters the manhole shows.

Nothing here counts an event a second time: :class:`SentryPeerCollector` is a custom
``prometheus_client`` collector that, at each scrape, reads the plain counters of the running
objects (the root service's ``stats``, the write queue, the responder, the DHT service, the
outputs). The only counters this module keeps itself are those nothing else had:

- :class:`EventCounts`, the events per transport and method, received and recorded. It wraps the
  SIP controller's sink, so it sees each event once, after retransmission filtering, with the
  write queue's verdict;
- :class:`LatencyHistogram`, the database batch latency, filled by :class:`TimedEventStore`
  around the database the write queue writes to.

Labels are bounded: a method label is one of the methods of RFC 3261, 3262, 3265, 3311, 3428,
3515, 3903 and 6086 (:data:`METHODS`) or ``other``, never the attacker's text; transports are
``UDP``, ``TCP``, ``TLS`` or ``other``; DHT refusal reasons are the validator's names
(:data:`DHT_REASONS`) or ``other``.

Wiring (``sentrypeer/service.py``): ``make_site(..., live=root)``; the root keeps
``event_counts`` (:class:`EventCounts` around ``pipeline.submit_collected``, given to the
controller as its sink) and ``batch_latency`` (the histogram of the :class:`TimedEventStore` given
to ``DatabaseService(database=...)``). Every attribute is looked up at scrape time, so the site may
be built before the objects exist; a missing one just has no samples.
"""

from __future__ import annotations

import bisect
import collections
import math
import types
from collections.abc import Callable, Iterator, Sequence
from typing import Any

try:
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
except ImportError:  # the counters below work without it; only the exposition needs it
    CollectorRegistry = None  # type: ignore[assignment,misc]
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.logger import Logger
from twisted.web import http
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from sentrypeer import __version__

log = Logger(namespace="sentrypeer.metrics")

#: SIP request methods with a label of their own: RFC 3261 (INVITE, ACK, OPTIONS, BYE, CANCEL,
#: REGISTER), 3262 (PRACK), 3265 (SUBSCRIBE, NOTIFY), 3311 (UPDATE), 3428 (MESSAGE), 3515 (REFER),
#: 3903 (PUBLISH), 6086 (INFO). Methods are case-sensitive (RFC 3261 §7.1).
METHODS = (
    "INVITE", "ACK", "OPTIONS", "BYE", "CANCEL", "REGISTER", "PRACK", "SUBSCRIBE", "NOTIFY",
    "UPDATE", "MESSAGE", "REFER", "PUBLISH", "INFO",
)
_METHOD_SET = frozenset(METHODS)
TRANSPORTS = ("UDP", "TCP", "TLS")
_TRANSPORT_SET = frozenset(TRANSPORTS)
OTHER = "other"


def _dht_reasons() -> frozenset[str]:
    from sentrypeer.dht import service as dht_service
    from sentrypeer.dht import validate

    return frozenset((*validate.REASONS, dht_service.DUPLICATE, dht_service.BACKLOG))


try:
    #: DHT refusal reasons with a label of their own (the validator's and the service's).
    DHT_REASONS = _dht_reasons()
except ImportError:  # pragma: no cover - the DHT package is part of this one
    DHT_REASONS = frozenset()

#: ``Content-Type`` of ``/metrics``: the classic text format (version 0.0.4), which every
#: ``prometheus_client`` version writes with ``generate_latest`` and every Prometheus reads.
EXPOSITION_TYPE = b"text/plain; version=0.0.4; charset=utf-8"
CHALLENGES = (b'Basic realm="SentryPeer", charset="UTF-8"', b'Bearer realm="SentryPeer"')

#: Upper bounds (seconds) of the database batch latency buckets.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def method_label(method: str | None) -> str:
    """*method* when it is one of :data:`METHODS` (exactly), else ``other``."""
    return method if method in _METHOD_SET else OTHER  # type: ignore[return-value]


def transport_label(transport: str | None) -> str:
    """*transport* when it is ``UDP``, ``TCP`` or ``TLS``, else ``other``."""
    return transport if transport in _TRANSPORT_SET else OTHER  # type: ignore[return-value]


def reason_label(reason: str) -> str:
    """A DHT refusal reason when it is a known one, else ``other``."""
    return reason if reason in DHT_REASONS else OTHER


class EventCounts:
    """The SIP controller's sink, counting events by transport and method on the way.

    ``received[(transport, method)]`` counts every event handed to the sink; ``recorded[...]``
    those the sink accepted (the write queue had room). Keys are labels (:func:`transport_label`,
    :func:`method_label`), so there are at most 4 x 15 of each.

    :param sink: the real sink, ``pipeline.submit_collected``: ``(event) -> bool``.
    """

    def __init__(self, sink: Callable[[Any], bool]) -> None:
        self.sink = sink
        self.received: collections.Counter[tuple[str, str]] = collections.Counter()
        self.recorded: collections.Counter[tuple[str, str]] = collections.Counter()

    def __call__(self, event: Any) -> bool:
        key = (transport_label(event.transport_type), method_label(event.sip_method))
        self.received[key] += 1
        accepted = self.sink(event)
        if accepted:
            self.recorded[key] += 1
        return accepted

    def as_dict(self) -> dict[str, dict[str, int]]:
        """``{"received": {"UDP INVITE": n, ...}, "recorded": {...}}`` (for the manhole)."""
        return {
            name: {f"{t} {m}": n for (t, m), n in sorted(counter.items())}
            for name, counter in (("received", self.received), ("recorded", self.recorded))
        }


class LatencyHistogram:
    """Cumulative-free bucket counts of observed durations (a Prometheus histogram's state).

    :param bounds: the buckets' upper bounds in seconds, increasing (``+Inf`` is added).
    """

    def __init__(self, bounds: Sequence[float] = LATENCY_BUCKETS) -> None:
        if list(bounds) != sorted(bounds):
            raise ValueError("bucket bounds must increase")
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, seconds: float) -> None:
        """Record one duration (a negative one, from a clock step, counts as 0)."""
        seconds = max(0.0, seconds)
        self.counts[bisect.bisect_left(self.bounds, seconds)] += 1
        self.sum += seconds
        self.count += 1

    def buckets(self) -> list[tuple[str, float]]:
        """``(le, cumulative count)`` pairs, ``+Inf`` last, for :class:`HistogramMetricFamily`."""
        out = []
        running = 0
        for bound, n in zip((*self.bounds, math.inf), self.counts, strict=True):
            running += n
            out.append(("+Inf" if bound == math.inf else repr(float(bound)), float(running)))
        return out


class TimedEventStore:
    """A database (``IEventStore``) whose ``insert_events`` calls are timed into a histogram.

    Every other attribute is the wrapped object's, so it can stand in for the
    :class:`~sentrypeer.storage.database.Database` given to ``DatabaseService(database=...)``.
    Each attempt is observed, failed ones included (they also count in ``write_errors``).

    :param store: the real database.
    :param histogram: where durations go.
    :param clock: ``seconds()`` (the reactor).
    """

    def __init__(self, store: Any, histogram: LatencyHistogram, clock: Any) -> None:
        self._store = store
        self.histogram = histogram
        self._clock = clock

    def insert_events(self, events: Sequence[Any], *args: Any, **kwargs: Any) -> Deferred:
        """The wrapped ``insert_events(events, ...)`` (extra arguments passed on), timed."""
        started = self._clock.seconds()

        def observed(result: Any) -> Any:
            self.histogram.observe(self._clock.seconds() - started)
            return result

        return maybeDeferred(self._store.insert_events, events, *args, **kwargs).addBoth(observed)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _labelled(
    kind: type, name: str, doc: str, labels: Sequence[str], samples: Sequence[tuple[Sequence[str], float]]
) -> Any:
    family = kind(name, doc, labels=list(labels))
    for values, value in samples:
        family.add_metric(list(values), value)
    return family


def _find_outputs(live: Any) -> dict[str, Any]:
    """The pipeline's outputs by kind (``webhook``, ``syslog``, ``json_log``)."""
    from sentrypeer.eventlog import JSONLogService
    from sentrypeer.syslog import SyslogService
    from sentrypeer.webhook import WebhookService

    found: dict[str, Any] = {}
    pipeline = getattr(live, "pipeline", None)
    for output in getattr(pipeline, "outputs", ()) or ():
        kinds = (("webhook", WebhookService), ("syslog", SyslogService), ("json_log", JSONLogService))
        for kind, cls in kinds:
            if isinstance(output, cls):
                found.setdefault(kind, output)
    return found


class SentryPeerCollector:
    """A ``prometheus_client`` collector reading the running node's counters at each scrape.

    :param live: the root service (:class:`sentrypeer.service.SentryPeerService`) or anything with
        its attributes: ``stats``, ``event_counts``, ``batch_latency``, ``database_service``
        (``.queue``), ``responder`` (``.stats``), ``dht_service``, ``pipeline`` (``.outputs``),
        ``node_id``. Missing or ``None`` ones give no samples.
    """

    def __init__(self, live: Any) -> None:
        self.live = live

    def collect(self) -> Iterator[Any]:
        """Yield the metric families (one failing part is logged and left out, never the scrape)."""
        for part in (
            self._info, self._sip, self._events, self._replies, self._queue, self._dht, self._outputs,
        ):
            try:
                families = list(part())
            except Exception:
                log.failure("metrics: reading {part} failed", part=part.__name__)
                continue
            yield from families

    def _info(self) -> Iterator[Any]:
        family = GaugeMetricFamily("sentrypeer_info", "This SentryPeer's version.", labels=["version"])
        family.add_metric([__version__], 1)
        yield family

    def _sip(self) -> Iterator[Any]:
        s = getattr(self.live, "stats", None)
        if s is None:
            return
        yield _counter("sentrypeer_sip_udp_datagrams", "UDP datagrams read on the SIP ports.", s.datagrams)
        kernel_drops = getattr(s, "kernel_drops", None)
        if kernel_drops is not None:
            yield _counter(
                "sentrypeer_sip_udp_kernel_drops",
                "UDP datagrams the kernel dropped before they were read (receive buffer full).",
                kernel_drops,
            )
        yield _labelled(
            CounterMetricFamily, "sentrypeer_sip_requests_received",
            "SIP requests and non-SIP probes received, retransmissions included.", ["transport"],
            [((t,), s.received.get(t, 0)) for t in TRANSPORTS],
        )
        yield _counter(
            "sentrypeer_sip_retransmissions", "Requests matching a transaction seen within 32 s.",
            s.retransmissions,
        )
        yield _labelled(
            CounterMetricFamily, "sentrypeer_sip_parse_failures",
            "Events recorded with a parse_status other than ok.", ["status"],
            [(("malformed",), s.malformed), (("non_sip",), s.non_sip), (("truncated",), s.truncated)],
        )
        yield _counter("sentrypeer_sip_responses_received", "SIP responses received (ignored).", s.responses)
        yield _counter("sentrypeer_sip_keepalives", "Keep-alives and empty datagrams.", s.keepalives)
        yield _labelled(
            CounterMetricFamily, "sentrypeer_sip_pongs", "Stream pings answered or not.", ["outcome"],
            [(("sent",), s.pongs), (("refused",), s.pongs_refused)],
        )
        yield _counter(
            "sentrypeer_sip_stray_bytes", "Stream bytes discarded after a message with Content-Length.",
            s.stray_bytes,
        )
        yield _labelled(
            CounterMetricFamily, "sentrypeer_sip_connections", "TCP and TLS connections accepted.",
            ["transport"], [((t,), s.connections.get(t, 0)) for t in ("TCP", "TLS")],
        )
        yield _gauge(
            "sentrypeer_sip_connections_open", "TCP and TLS connections open now.", s.connections_open
        )
        yield _labelled(
            CounterMetricFamily, "sentrypeer_sip_connections_closed",
            "Stream connections refused or closed by the honeypot, and silent ones.", ["reason"],
            [
                (("limit",), s.connections_rejected), (("idle",), s.connections_idle),
                (("slow",), s.connections_slow), (("silent",), s.connections_silent),
            ],
        )
        yield _counter(
            "sentrypeer_tls_handshake_failures", "TLS connections that failed the handshake.",
            s.tls_handshake_failures,
        )
        yield _counter(
            "sentrypeer_sip_internal_errors", "Exceptions caught in the receive path.", s.internal_errors
        )

    def _events(self) -> Iterator[Any]:
        counts = getattr(self.live, "event_counts", None)
        if counts is None:
            return
        for name, doc, counter in (
            ("sentrypeer_sip_events_received", "Events handed to the write queue, by transport and method.",
             counts.received),
            ("sentrypeer_sip_events_recorded", "Events the write queue accepted, by transport and method.",
             counts.recorded),
        ):
            yield _labelled(
                CounterMetricFamily, name, doc, ["transport", "method"],
                [((t, m), n) for (t, m), n in sorted(counter.items())],
            )

    def _replies(self) -> Iterator[Any]:
        stats = getattr(getattr(self.live, "responder", None), "stats", None)
        if stats is None:
            # Responsive mode off: the family is still there, at zero, so alerts can be written
            # before the feature is switched on.
            stats = types.SimpleNamespace(sent=0, limited=0, refused=0, oversize=0)
        yield _labelled(
            CounterMetricFamily, "sentrypeer_sip_replies",
            "Replies of responsive mode: sent, or not sent and why.", ["outcome"],
            [
                (("sent",), stats.sent), (("rate_limited",), stats.limited),
                (("refused_destination",), stats.refused), (("oversize",), stats.oversize),
            ],
        )

    def _queue(self) -> Iterator[Any]:
        queue = getattr(getattr(self.live, "database_service", None), "queue", None)
        if queue is not None:
            yield _gauge("sentrypeer_write_queue_depth", "Events waiting for the database.", queue.depth)
            yield _gauge("sentrypeer_write_queue_bytes", "Bytes waiting for the database.", queue.depth_bytes)
            yield _gauge("sentrypeer_write_queue_capacity", "The write queue's size limit.", queue.max_events)
            yield _counter(
                "sentrypeer_events_shed", "Events refused by the full write queue (collected and peers').",
                queue.dropped,
            )
            shed_overflow = getattr(queue, "shed_overflow", None)
            if shed_overflow is not None:
                yield _counter(
                    "sentrypeer_events_shed_uncounted",
                    "Shed events not counted in the per-address and per-number summaries either.",
                    shed_overflow,
                )
            yield _counter(
                "sentrypeer_database_events_written", "Events in committed batches.", queue.written
            )
            yield _counter(
                "sentrypeer_database_rows_inserted", "New rows (written minus known event_uuids).",
                queue.inserted,
            )
            yield _counter(
                "sentrypeer_database_events_rejected", "Events that could never be stored.", queue.rejected
            )
            yield _counter(
                "sentrypeer_database_write_errors", "Failed batch attempts (retried).", queue.write_errors
            )
            yield _counter("sentrypeer_database_batches", "Committed batches.", queue.batches)
        histogram = getattr(self.live, "batch_latency", None)
        if histogram is not None:
            yield HistogramMetricFamily(
                "sentrypeer_database_batch_seconds", "Time to write one batch of events.",
                buckets=histogram.buckets(), sum_value=histogram.sum,
            )

    def _dht(self) -> Iterator[Any]:
        dht = getattr(self.live, "dht_service", None)
        if dht is None:
            # Peer to peer off: the families are still there, at zero.
            dht = types.SimpleNamespace(
                counts=collections.defaultdict(int), rejected={}, restarts=0, ready=False
            )
        counts = dht.counts
        yield _counter(
            "sentrypeer_dht_values_received", "Values received from peers.", counts["values_received"]
        )
        yield _counter(
            "sentrypeer_dht_values_accepted", "Peers' values accepted and queued.", counts["accepted"]
        )
        rejected: collections.Counter[str] = collections.Counter()
        for reason, n in dht.rejected.items():
            rejected[reason_label(reason)] += n
        yield _labelled(
            CounterMetricFamily, "sentrypeer_dht_values_rejected", "Peers' values refused, by reason.",
            ["reason"], [((reason,), n) for reason, n in sorted(rejected.items())],
        )
        yield _labelled(
            CounterMetricFamily, "sentrypeer_dht_puts", "Our events put on the DHT, by outcome.", ["outcome"],
            [
                (("sent",), counts["puts_sent"]), (("confirmed",), counts["puts_ok"]),
                (("unconfirmed",), counts["puts_unconfirmed"]), (("timeout",), counts["put_timeouts"]),
            ],
        )
        yield _counter("sentrypeer_dht_worker_restarts", "Restarts of the DHT worker process.", dht.restarts)
        yield _gauge(
            "sentrypeer_dht_ready", "1 when the DHT worker is running and ready.", int(bool(dht.ready))
        )

    def _outputs(self) -> Iterator[Any]:
        pipeline = getattr(self.live, "pipeline", None)
        if pipeline is not None:
            yield _counter(
                "sentrypeer_output_errors", "Exceptions raised by event outputs.", pipeline.output_errors
            )
        outputs = _find_outputs(self.live)
        webhook = outputs.get("webhook")
        # Webhook off: the families are still there, at zero.
        c = webhook.counters() if webhook is not None else collections.defaultdict(int)
        yield _counter("sentrypeer_webhook_delivered", "Events the collector accepted (2xx).", c["sent"])
        yield _counter(
            "sentrypeer_webhook_failed_attempts", "Failed delivery attempts (retried).", c["errors"]
        )
        yield _labelled(
            CounterMetricFamily, "sentrypeer_webhook_dropped", "Events never delivered, by reason.",
            ["reason"],
            [
                (("queue_full",), c["dropped"]), (("refused",), c["rejected"]),
                (("undelivered_at_stop",), c["undelivered"]),
            ],
        )
        yield _gauge("sentrypeer_webhook_queued", "Events waiting for delivery.", c["pending"])
        syslog = outputs.get("syslog")
        if syslog is not None:
            c = syslog.counters()
            yield _counter("sentrypeer_syslog_sent", "Syslog lines sent.", c["sent"])
            yield _counter("sentrypeer_syslog_dropped", "Syslog lines dropped.", c["dropped"])
        json_log = outputs.get("json_log")
        if json_log is not None:
            c = json_log.counters()
            yield _counter("sentrypeer_json_log_written", "JSON log lines written.", c["written"])
            yield _counter("sentrypeer_json_log_dropped", "JSON log lines dropped.", c["dropped"])


def _error(code: int, message: str) -> bytes:
    return f"{code} {message}\n".encode()


class MetricsResource(Resource):
    """``/metrics``: the registry in Prometheus's text format (``GET``/``HEAD``).

    With ``--api-token`` set it is needed (Bearer, as Prometheus's ``authorization`` /
    ``bearer_token`` settings send, or Basic with the token as password, ``basic_auth``).

    :param registry: what to expose (:func:`build_registry`).
    :param token: ``--api-token``; ``None`` or empty for open metrics.
    """

    isLeaf = True

    def __init__(self, registry: Any, token: str | None = None) -> None:
        super().__init__()
        self.registry = registry
        self.token = token or None

    def render(self, request: Any) -> int:
        from sentrypeer.api.dashboard import TEXT_TYPE, method_allowed, require_token, send_secure

        if not method_allowed(request, _error, TEXT_TYPE):
            return NOT_DONE_YET
        if not require_token(request, self.token, CHALLENGES, _error, TEXT_TYPE):
            return NOT_DONE_YET
        try:
            body = generate_latest(self.registry)
        except Exception:
            log.failure("metrics: building the exposition failed")
            send_secure(request, http.INTERNAL_SERVER_ERROR, _error(500, "Internal error"), TEXT_TYPE)
            return NOT_DONE_YET
        send_secure(request, http.OK, body, EXPOSITION_TYPE)
        return NOT_DONE_YET


def build_registry(live: Any) -> Any:
    """A registry holding only a :class:`SentryPeerCollector` on *live* (no process or platform
    collectors: nothing global).

    :raises ImportError: ``prometheus_client`` is not installed.
    """
    if CollectorRegistry is None:
        raise ImportError("No module named 'prometheus_client'")
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SentryPeerCollector(live))
    return registry


__all__ = [
    "LATENCY_BUCKETS",
    "METHODS",
    "EventCounts",
    "LatencyHistogram",
    "MetricsResource",
    "SentryPeerCollector",
    "TimedEventStore",
    "build_registry",
    "method_label",
    "reason_label",
    "transport_label",
]
