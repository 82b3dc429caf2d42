"""Tests of the Prometheus metrics: ``sentrypeer.metrics`` and ``/metrics`` (issue 8 item 4).

The behaviour pinned: labels stay bounded whatever attackers send, the collector reads the live
counters (the manhole's) without counting anything twice, and the text exposition, parsed back
with ``prometheus_client``'s own parser, matches what was sent to a running node.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import DatagramProtocol, Protocol
from twisted.trial.unittest import SynchronousTestCase

from sentrypeer import __version__, metrics
from sentrypeer.eventlog import JSONLogService
from sentrypeer.pipeline import EventPipeline
from sentrypeer.service import build_service
from sentrypeer.sip.responder import ResponderStats
from sentrypeer.stats import SIPStats
from sentrypeer.storage import queries
from sentrypeer.storage.database import Database, DatabaseService, prepare_database
from sentrypeer.syslog import SyslogService
from sentrypeer.webhook import WebhookService

from .support import make_config
from .test_dashboard import LiveSiteCase, basic, make_event


def scrape(registry) -> dict[str, dict[tuple, float]]:
    """The registry's text exposition parsed back: ``{sample name: {sorted label items: value}}``."""
    from prometheus_client import generate_latest

    return parse(generate_latest(registry).decode())


def parse(text: str) -> dict[str, dict[tuple, float]]:
    out: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def request(method: str, n: int, transport: str = "UDP") -> bytes:
    """A SIP request with its own transaction (branch, Call-ID) number *n*."""
    return (
        f"{method} sip:100@127.0.0.1 SIP/2.0\r\n"
        f"Via: SIP/2.0/{transport} 127.0.0.1:5999;branch=z9hG4bK-m{n}\r\n"
        f"From: <sip:a@127.0.0.1>;tag=t{n}\r\nTo: <sip:100@127.0.0.1>\r\n"
        f"Call-ID: metrics-{n}\r\nCSeq: 1 {method}\r\nUser-Agent: metrics-test\r\n"
        "Content-Length: 0\r\n\r\n"
    ).encode()


@dataclasses.dataclass
class FakeDHT:
    """The attributes of DHTService the collector reads."""

    counts: Any = dataclasses.field(default_factory=lambda: __import__("collections").Counter())
    rejected: Any = dataclasses.field(default_factory=lambda: __import__("collections").Counter())
    restarts: int = 0
    ready: bool = True


class Live:
    """A stand-in root service: only the attributes given."""

    def __init__(self, **attributes: Any) -> None:
        self.__dict__.update(attributes)


class LabelTests(SynchronousTestCase):
    """Labels never carry attacker text."""

    def test_methods(self):
        """The 14 methods of RFC 3261/3262/3265/3311/3428/3515/3903/6086 keep their name, exactly;
        everything else (lower case, unknown, NOT_FOUND, markup, None) is "other"."""
        self.assertEqual(
            set(metrics.METHODS),
            {"INVITE", "ACK", "OPTIONS", "BYE", "CANCEL", "REGISTER", "PRACK", "SUBSCRIBE", "NOTIFY",
             "UPDATE", "MESSAGE", "REFER", "PUBLISH", "INFO"},
        )
        for method in metrics.METHODS:
            self.assertEqual(metrics.method_label(method), method)
        for other in ("invite", "FOO", "NOT_FOUND", "<script>", "", None, "INVITE "):
            self.assertEqual(metrics.method_label(other), "other")

    def test_transports_and_reasons(self):
        """Transports are UDP/TCP/TLS or other; DHT reasons are the validator's and the
        service's names or other."""
        self.assertEqual([metrics.transport_label(t) for t in ("UDP", "TCP", "TLS", "udp", "SCTP", None)],
                         ["UDP", "TCP", "TLS", "other", "other", "other"])
        for reason in ("bad_json", "own_node_id", "duplicate", "backlog", "untrusted_signature"):
            self.assertEqual(metrics.reason_label(reason), reason)
        self.assertEqual(metrics.reason_label("made_up"), "other")


class EventCountsTests(SynchronousTestCase):
    """The counting sink."""

    def test_counts_and_verdict(self):
        """Each event is counted once as received and, when the sink accepts it, as recorded, under
        bounded labels; the sink's verdict is returned unchanged."""
        verdicts = [True, False, True, True]
        seen = []

        def sink(event):
            seen.append(event)
            return verdicts[len(seen) - 1]

        counts = metrics.EventCounts(sink)
        events = [
            make_event(1, sip_method="INVITE"),
            make_event(2, sip_method="INVITE"),
            make_event(3, sip_method="<svg onload=x>", transport_type="TCP"),
            make_event(4, sip_method="OPTIONS", transport_type="bogus"),
        ]
        self.assertEqual([counts(e) for e in events], verdicts)
        self.assertEqual(seen, events)
        self.assertEqual(
            dict(counts.received), {("UDP", "INVITE"): 2, ("TCP", "other"): 1, ("other", "OPTIONS"): 1}
        )
        self.assertEqual(
            dict(counts.recorded), {("UDP", "INVITE"): 1, ("TCP", "other"): 1, ("other", "OPTIONS"): 1}
        )
        self.assertEqual(counts.as_dict()["received"]["UDP INVITE"], 2)

    def test_bounded(self):
        """Thousands of distinct attacker methods make at most 15 method labels."""
        counts = metrics.EventCounts(lambda event: True)
        for i in range(2000):
            counts(make_event(i, sip_method=f"M{i}"))
        for method in metrics.METHODS:
            counts(make_event(0, sip_method=method))
        self.assertEqual(len(counts.received), 15)


class HistogramTests(SynchronousTestCase):
    """The batch latency histogram and the timed store."""

    def test_buckets(self):
        """Observations land in the first bucket whose bound is at least the value; buckets are
        cumulative with +Inf last; sum and count follow."""
        histogram = metrics.LatencyHistogram((0.1, 1.0))
        for seconds in (0.05, 0.1, 0.5, 3.0, -1.0):
            histogram.observe(seconds)
        self.assertEqual(histogram.buckets(), [("0.1", 3.0), ("1.0", 4.0), ("+Inf", 5.0)])
        self.assertEqual((histogram.count, histogram.sum), (5, 3.65))
        self.assertRaises(ValueError, metrics.LatencyHistogram, (1.0, 0.1))

    def test_timed_store(self):
        """TimedEventStore observes the time each insert_events takes on the clock, failed ones
        too, passes results and failures through, and delegates everything else."""
        clock = task.Clock()
        pending: list[defer.Deferred] = []
        calls: list = []

        class Store:
            path = "/x.db"

            def insert_events(self, events, shed=None):
                calls.append((events, shed))
                pending.append(defer.Deferred())
                return pending[-1]

        histogram = metrics.LatencyHistogram()
        store = metrics.TimedEventStore(Store(), histogram, clock)
        self.assertEqual(store.path, "/x.db")
        d = store.insert_events([1, 2])
        clock.advance(0.3)
        pending[-1].callback(2)
        self.assertEqual(self.successResultOf(d), 2)
        d = store.insert_events([3], "shed counts")
        self.assertEqual(calls, [([1, 2], None), ([3], "shed counts")])
        clock.advance(2)
        pending[-1].errback(RuntimeError("locked"))
        self.failureResultOf(d, RuntimeError)
        self.assertEqual(histogram.count, 2)
        self.assertAlmostEqual(histogram.sum, 2.3)


class CollectorTests(SynchronousTestCase):
    """The collector on stand-in live objects."""

    def test_everything(self):
        """Every counter of the live objects appears under its metric and labels, with its value:
        SIP stats, event counts, replies, write queue, batch latency, DHT, webhook, syslog, JSON log."""
        stats = SIPStats()
        stats.datagrams = 11
        stats.received["UDP"] = 9
        stats.received["TCP"] = 2
        stats.retransmissions = 1
        stats.malformed, stats.non_sip, stats.truncated = 3, 4, 5
        stats.connections["TCP"] = 7
        stats.connections_open = 2
        stats.connections_idle = 1
        counts = metrics.EventCounts(lambda event: event.sip_method != "BYE")
        for i, method in enumerate(("INVITE", "INVITE", "BYE", "FOO")):
            counts(make_event(i, sip_method=method))
        responder = Live(stats=ResponderStats(sent=6, limited=2, refused=1, oversize=0))
        queue = Live(depth=4, depth_bytes=1000, max_events=100, dropped=3, written=20, inserted=19,
                     rejected=1, write_errors=2, batches=5)
        histogram = metrics.LatencyHistogram((0.01, 0.1))
        histogram.observe(0.005)
        histogram.observe(0.05)
        dht = FakeDHT()
        dht.counts.update(values_received=10, accepted=6, puts_sent=4, puts_ok=3, put_timeouts=1)
        dht.rejected.update(bad_json=2, duplicate=1, something_new=5)
        dht.restarts = 1
        clock = task.Clock()
        webhook = WebhookService("http://127.0.0.1:9/hook", reactor=clock)
        webhook.sent, webhook.errors, webhook.dropped, webhook.rejected = 8, 2, 1, 1
        syslog = SyslogService(self.mktemp(), reactor=clock)
        syslog.sent = 5
        json_log = JSONLogService(self.mktemp(), reactor=clock, handle_sighup=False)
        pipeline = EventPipeline(queue)
        for output in (json_log, syslog, webhook):
            pipeline.add_output(output)
        live = Live(
            stats=stats, event_counts=counts, responder=responder, database_service=Live(queue=queue),
            batch_latency=histogram, dht_service=dht, pipeline=pipeline,
        )
        got = scrape(metrics.build_registry(live))
        self.assertEqual(got["sentrypeer_info"], {(("version", __version__),): 1.0})
        self.assertEqual(got["sentrypeer_sip_udp_datagrams_total"], {(): 11.0})
        self.assertEqual(got["sentrypeer_sip_requests_received_total"][(("transport", "TCP"),)], 2.0)
        self.assertEqual(got["sentrypeer_sip_parse_failures_total"][(("status", "non_sip"),)], 4.0)
        self.assertEqual(got["sentrypeer_sip_connections_total"], {(("transport", "TCP"),): 7.0,
                                                                   (("transport", "TLS"),): 0.0})
        self.assertEqual(got["sentrypeer_sip_connections_open"], {(): 2.0})
        self.assertEqual(got["sentrypeer_sip_connections_closed_total"][(("reason", "idle"),)], 1.0)
        self.assertEqual(
            got["sentrypeer_sip_events_received_total"],
            {
                (("method", "INVITE"), ("transport", "UDP")): 2.0,
                (("method", "BYE"), ("transport", "UDP")): 1.0,
                (("method", "other"), ("transport", "UDP")): 1.0,
            },
        )
        recorded = got["sentrypeer_sip_events_recorded_total"]
        self.assertNotIn((("method", "BYE"), ("transport", "UDP")), recorded)
        self.assertEqual(got["sentrypeer_sip_replies_total"][(("outcome", "rate_limited"),)], 2.0)
        self.assertEqual(got["sentrypeer_sip_replies_total"][(("outcome", "sent"),)], 6.0)
        self.assertEqual(got["sentrypeer_write_queue_depth"], {(): 4.0})
        self.assertEqual(got["sentrypeer_events_shed_total"], {(): 3.0})
        self.assertEqual(got["sentrypeer_database_batches_total"], {(): 5.0})
        self.assertEqual(got["sentrypeer_database_batch_seconds_bucket"][(("le", "0.01"),)], 1.0)
        self.assertEqual(got["sentrypeer_database_batch_seconds_bucket"][(("le", "+Inf"),)], 2.0)
        self.assertEqual(got["sentrypeer_database_batch_seconds_count"], {(): 2.0})
        self.assertEqual(got["sentrypeer_dht_values_received_total"], {(): 10.0})
        self.assertEqual(got["sentrypeer_dht_values_accepted_total"], {(): 6.0})
        self.assertEqual(
            got["sentrypeer_dht_values_rejected_total"],
            {(("reason", "bad_json"),): 2.0, (("reason", "duplicate"),): 1.0, (("reason", "other"),): 5.0},
        )
        self.assertEqual(got["sentrypeer_dht_puts_total"][(("outcome", "confirmed"),)], 3.0)
        self.assertEqual(got["sentrypeer_dht_ready"], {(): 1.0})
        self.assertEqual(got["sentrypeer_webhook_delivered_total"], {(): 8.0})
        self.assertEqual(got["sentrypeer_webhook_failed_attempts_total"], {(): 2.0})
        self.assertEqual(got["sentrypeer_webhook_dropped_total"][(("reason", "queue_full"),)], 1.0)
        self.assertEqual(got["sentrypeer_webhook_queued"], {(): 0.0})
        self.assertEqual(got["sentrypeer_syslog_sent_total"], {(): 5.0})
        self.assertEqual(got["sentrypeer_json_log_written_total"], {(): 0.0})

    def test_missing_parts(self):
        """A node without responder, DHT, outputs or wiring still scrapes. The replies, DHT and
        webhook families the issue lists are present at zero while their feature is off (so alerts
        can be written beforehand); parts that are not wired (no write queue) have no samples; a
        part that raises is logged and left out, never the scrape."""
        got = scrape(metrics.build_registry(Live(stats=SIPStats())))
        self.assertIn("sentrypeer_sip_requests_received_total", got)
        for zero in ("sentrypeer_sip_replies_total", "sentrypeer_dht_values_received_total",
                     "sentrypeer_dht_values_accepted_total", "sentrypeer_webhook_delivered_total",
                     "sentrypeer_webhook_queued"):
            self.assertIn(zero, got)
            self.assertEqual(set(got[zero].values()), {0.0}, zero)
        for absent in ("sentrypeer_sip_events_received_total", "sentrypeer_write_queue_depth"):
            self.assertNotIn(absent, got)
        broken = Live(stats=SIPStats(), responder=Live(stats=None), dht_service=Live(counts=None))
        got = scrape(metrics.build_registry(broken))
        self.assertIn("sentrypeer_sip_requests_received_total", got)
        self.assertEqual(len(self.flushLoggedErrors()), 1)
        self.assertIn("sentrypeer_info", scrape(metrics.build_registry(object())))

    def test_reads_live_values(self):
        """Each scrape reads the counters as they are then (nothing is copied at build time)."""
        stats = SIPStats()
        registry = metrics.build_registry(Live(stats=stats))
        self.assertEqual(scrape(registry)["sentrypeer_sip_retransmissions_total"], {(): 0.0})
        stats.retransmissions = 42
        self.assertEqual(scrape(registry)["sentrypeer_sip_retransmissions_total"], {(): 42.0})


class MetricsHTTPTests(LiveSiteCase):
    """/metrics over HTTP, against a running node fed real SIP traffic."""

    timeout = 120

    @defer.inlineCallbacks
    def test_scrape_matches_traffic(self):
        """A node receiving UDP and TCP requests (known and unknown methods, a retransmission)
        exposes, parsed back with prometheus_client's parser, exactly the counts sent, and the
        batch latency histogram counts every committed batch."""
        directory = os.path.abspath(self.mktemp())
        config = make_config(directory, ["udp:0:interface=127.0.0.1", "tcp:0:interface=127.0.0.1"])
        service = build_service(config, reactor)
        service.privilegedStartService()
        # The wiring the root service gets (see sentrypeer.metrics): the counting sink and the
        # timed database.
        service.event_counts = metrics.EventCounts(service.pipeline.submit_collected)
        service.controller.sink = service.event_counts
        service.batch_latency = metrics.LatencyHistogram()
        queue = service.database_service.queue
        queue._store = metrics.TimedEventStore(queue._store, service.batch_latency, reactor)
        service.startService()
        self.addCleanup(service.stopService)
        ports = {spec.transport: port.getHost().port for spec, port in service.ports}
        yield self.start_site(live=service, token="m")

        sender = reactor.listenUDP(0, DatagramProtocol(), interface="127.0.0.1")
        self.addCleanup(sender.stopListening)
        sent = {"INVITE": 5, "OPTIONS": 3, "REGISTER": 2, "FOO": 2, "invite": 1}
        n = 0
        for method, count in sent.items():
            for _ in range(count):
                sender.write(request(method, n), ("127.0.0.1", ports["udp"]))
                n += 1
        sender.write(request("INVITE", 0), ("127.0.0.1", ports["udp"]))  # a retransmission
        protocol = yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", ports["tcp"]), Protocol())
        protocol.transport.write(request("BYE", 100, "TCP") + request("MESSAGE", 101, "TCP"))
        udp_total = sum(sent.values()) + 1
        for _ in range(400):
            if service.stats.received["UDP"] >= udp_total and service.stats.received["TCP"] >= 2:
                break
            yield task.deferLater(reactor, 0.01, lambda: None)
        protocol.transport.loseConnection()
        yield queue.flush()

        response, body = yield self.fetch("/metrics")
        self.assertEqual(response.code, 401)
        self.assertSecurityHeaders(response)
        response, body = yield self.fetch("/metrics", headers={"Authorization": ["Bearer m"]})
        self.assertEqual(response.code, 200)
        self.assertEqual(self.header(response, "Content-Type"), "text/plain; version=0.0.4; charset=utf-8")
        self.assertSecurityHeaders(response)
        got = parse(body.decode())
        received = got["sentrypeer_sip_events_received_total"]
        expected = {("UDP", "INVITE"): 5, ("UDP", "OPTIONS"): 3, ("UDP", "REGISTER"): 2, ("UDP", "other"): 3,
                    ("TCP", "BYE"): 1, ("TCP", "MESSAGE"): 1}
        self.assertEqual(
            received, {(("method", m), ("transport", t)): float(v) for (t, m), v in expected.items()}
        )
        self.assertEqual(got["sentrypeer_sip_events_recorded_total"], received)
        self.assertEqual(
            got["sentrypeer_sip_requests_received_total"],
            {
                (("transport", "UDP"),): float(udp_total),
                (("transport", "TCP"),): 2.0,
                (("transport", "TLS"),): 0.0,
            },
        )
        self.assertEqual(got["sentrypeer_sip_retransmissions_total"], {(): 1.0})
        self.assertEqual(got["sentrypeer_database_events_written_total"], {(): float(sum(expected.values()))})
        self.assertEqual(got["sentrypeer_write_queue_depth"], {(): 0.0})
        self.assertEqual(got["sentrypeer_events_shed_total"], {(): 0.0})
        self.assertEqual(got["sentrypeer_sip_connections_total"][(("transport", "TCP"),)], 1.0)
        batches = got["sentrypeer_database_batches_total"][()]
        self.assertGreaterEqual(batches, 1.0)
        self.assertEqual(got["sentrypeer_database_batch_seconds_count"], {(): batches})
        stored = yield service.database_service.database.run_query(queries.count_events)
        self.assertEqual(stored, sum(expected.values()))

        response, body = yield self.fetch("/metrics", method=b"HEAD", headers=basic("m"))
        self.assertEqual((response.code, body), (200, b""))
        response, _ = yield self.fetch("/metrics", method=b"POST", headers=basic("m"))
        self.assertEqual(response.code, 405)

    @defer.inlineCallbacks
    def test_no_metrics_without_live_objects(self):
        """Without live objects or a registry, /metrics is the API's JSON 404."""
        yield self.start_site()
        response, body = yield self.fetch("/metrics")
        self.assertEqual(response.code, 404)
        self.assertEqual(self.header(response, "Content-Type"), "application/json")

    @defer.inlineCallbacks
    def test_histogram_with_database_service(self):
        """A DatabaseService given a TimedEventStore records one observation per batch written."""
        path = os.path.abspath(self.mktemp())
        os.makedirs(os.path.dirname(path), exist_ok=True)
        prepare_database(path)
        histogram = metrics.LatencyHistogram()
        store = metrics.TimedEventStore(Database(path, reactor), histogram, reactor)
        service = DatabaseService(path, reactor=reactor, database=store, batch_size=10)
        service.startService()
        self.addCleanup(service.stopService)
        started = time.monotonic()
        for i in range(35):
            service.put(make_event(i))
        yield service.queue.flush()
        self.assertEqual(service.queue.written, 35)
        self.assertEqual(histogram.count, service.queue.batches)
        self.assertGreaterEqual(histogram.count, 4)
        self.assertLessEqual(histogram.sum, time.monotonic() - started + 1)
