"""Tests for :mod:`sentrypeer.outputs` (build_outputs, OutputError) and shared helpers for the output
tests (test_eventlog, test_syslog, test_webhook): event factories, a local HTTP collector, a Unix
datagram receiver, and a poller for real-reactor tests."""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import time

from twisted.internet import defer, reactor, task
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import LogLevel, formatEvent
from twisted.protocols.policies import WrappingFactory
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web import resource, server

from sentrypeer.eventlog import JSONLogService
from sentrypeer.events import BadActorEvent, format_timestamp, new_event_uuid
from sentrypeer.outputs import FailureEpisode, OutputError, build_outputs, describe_error
from sentrypeer.pipeline import EventPipeline
from sentrypeer.sip.controller import SIPController
from sentrypeer.syslog import SyslogService
from sentrypeer.webhook import DEFAULT_TOKEN_URL, WebhookService

from .support import ListSink, corpus_bytes, corpus_rows, make_config

NODE = "11111111-2222-4333-8444-555555555555"


# -- helpers shared by the output tests -------------------------------------------------------


def make_event(**fields) -> BadActorEvent:
    """A collected-looking event; *fields* override the defaults."""
    values = dict(
        event_timestamp=format_timestamp(time.time_ns()),
        event_uuid=new_event_uuid(),
        created_by_node_id=NODE,
        collected_method="passive",
        transport_type="UDP",
        source_ip="203.0.113.7",
        destination_ip="198.51.100.2",
        called_number="100",
        sip_method="OPTIONS",
        sip_user_agent="friendly-scanner",
        sip_message="OPTIONS sip:100@198.51.100.2 SIP/2.0\r\nContent-Length: 0\r\n\r\n",
        source_port=5071,
        destination_port=5060,
        sip_message_bytes=b"OPTIONS sip:100@198.51.100.2 SIP/2.0\r\nContent-Length: 0\r\n\r\n",
    )
    values.update(fields)
    return BadActorEvent(**values)


def corpus_events() -> list[tuple[str, list[BadActorEvent]]]:
    """``(file, events)`` for every corpus file, each fed as one UDP datagram to a fresh
    controller (so no retransmission is absorbed across files)."""
    out = []
    for name in dict.fromkeys(row["file"] for row in corpus_rows()):
        sink = ListSink()
        controller = SIPController(node_id=NODE, sink=sink, clock=task.Clock())
        controller.message_received(
            corpus_bytes(name), "UDP", ("192.0.2.1", 5060), ("192.0.2.2", 5060)
        )
        out.append((name, sink.events))
    return out


def options_datagram(n: int) -> bytes:
    """An OPTIONS request with a Call-ID of its own (never a retransmission of another)."""
    return (
        b"OPTIONS sip:100@192.0.2.2 SIP/2.0\r\n"
        b"Via: SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bK-%d\r\n"
        b"From: <sip:a@192.0.2.1>;tag=%d\r\nTo: <sip:100@192.0.2.2>\r\n"
        b"Call-ID: call-%d\r\nCSeq: 1 OPTIONS\r\nUser-Agent: friendly-scanner\r\n"
        b"Content-Length: 0\r\n\r\n" % (n, n, n)
    )


def log_text(observer, level: LogLevel | None = None) -> list[str]:
    """The formatted log lines an EventLoggingObserver saw (at *level* only, when given)."""
    return [formatEvent(e) for e in observer if level is None or e["log_level"] == level]


def short_tempdir(testcase) -> str:
    """A short temporary directory (Unix socket paths are limited to 107 bytes), removed after
    the test."""
    path = tempfile.mkdtemp(prefix="sp-", dir="/tmp")
    testcase.addCleanup(shutil.rmtree, path, True)
    return path


async def wait_for(predicate, timeout: float = 10.0, interval: float = 0.01) -> None:
    """Let the real reactor run until *predicate()* is true.

    :raises AssertionError: after *timeout* seconds.
    """
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {predicate}")
        await task.deferLater(reactor, interval)


class DatagramReceiver(DatagramProtocol):
    """Collects the datagrams sent to a Unix datagram socket (a stand-in for /dev/log)."""

    def __init__(self) -> None:
        self.datagrams: list[bytes] = []

    def datagramReceived(self, datagram, address) -> None:
        self.datagrams.append(datagram)


def listen_datagram(testcase, path: str) -> DatagramReceiver:
    """Bind a :class:`DatagramReceiver` on *path* with the real reactor, closed after the test."""
    receiver = DatagramReceiver()
    port = reactor.listenUNIXDatagram(path, receiver)
    testcase.addCleanup(port.stopListening)
    receiver.port = port
    return receiver


class Collector(resource.Resource):
    """A twisted.web resource playing the OAuth2 token endpoint (``/oauth/token``) and the webhook
    collector (any other path).

    :ivar mode: ``ok`` (answer *ok_code*), ``down`` (503), ``status`` (answer *status_code*,
        the event not kept) or ``hang`` (never answer).
    :ivar require_token: collector answers 401 unless ``Authorization: Bearer <valid_token>``.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.mode = "ok"
        self.ok_code = 201
        self.status_code = 400
        self.require_token = False
        self.valid_token: str | None = None
        self.tokens_issued = 0
        self.expires_in = 86400
        self.token_requests: list[tuple[dict, bytes]] = []
        self.posts: list[tuple[str, dict, bytes, int | None]] = []
        self.delivered: list[bytes] = []
        self.hanging: list = []

    def render_POST(self, request):
        body = request.content.read()
        headers = {
            k.decode("latin-1").lower(): b", ".join(v).decode("latin-1")
            for k, v in request.requestHeaders.getAllRawHeaders()
        }
        if request.path == b"/oauth/token":
            self.token_requests.append((headers, body))
            self.tokens_issued += 1
            self.valid_token = f"token-{self.tokens_issued}-not-for-logs"
            request.setHeader(b"content-type", b"application/json")
            return json.dumps(
                {"access_token": self.valid_token, "expires_in": self.expires_in,
                 "token_type": "Bearer"}
            ).encode()
        path = request.path.decode()
        if self.mode == "hang":
            self.posts.append((path, headers, body, None))
            self.hanging.append(request)
            return server.NOT_DONE_YET
        if self.mode == "down":
            code = 503
        elif self.mode == "status":
            code = self.status_code
        elif self.require_token and headers.get("authorization") != f"Bearer {self.valid_token}":
            code = 401
        else:
            code = self.ok_code
            self.delivered.append(body)
        self.posts.append((path, headers, body, code))
        request.setResponseCode(code)
        return b"{}"


class HTTPServer:
    """A twisted.web site on 127.0.0.1 (real reactor) whose connections are all closed, and
    waited for, after the test (so the reactor is left clean)."""

    def __init__(self, testcase, root: resource.Resource) -> None:
        self.testcase = testcase
        self.site = server.Site(root)
        self.site.noisy = False
        self.factory = WrappingFactory(self.site)
        self.port = None
        self.port_number = 0
        testcase.addCleanup(self.close)

    def listen(self, port_number: int = 0) -> None:
        self.port = reactor.listenTCP(port_number, self.factory, interface="127.0.0.1")
        self.port_number = self.port.getHost().port

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port_number}{path}"

    async def stop_listening(self) -> None:
        if self.port is not None:
            port, self.port = self.port, None
            await port.stopListening()

    async def close(self) -> None:
        await self.stop_listening()
        for wrapper in list(self.factory.protocols):
            wrapper.transport.abortConnection()
        await wait_for(lambda: not self.factory.protocols)


# -- tests ------------------------------------------------------------------------------------


class BuildOutputsTests(SynchronousTestCase):
    def setUp(self):
        self.directory = os.path.abspath(self.mktemp())

    def test_nothing_enabled(self):
        """On the defaults no output is built (JSON log, syslog and webhook are all off)."""
        self.assertEqual(build_outputs(make_config(self.directory), task.Clock()), [])

    def test_all_enabled(self):
        """json_log, syslog and webhook_url build JSONLogService(json_log_file),
        SyslogService(syslog_socket, include_peers=syslog_peers) and WebhookService(webhook_url,
        OAuth2 settings), in that order, without touching the file system or the network."""
        log_path = os.path.join(self.directory, "events.json")
        config = make_config(
            self.directory,
            json_log=True,
            json_log_file=log_path,
            syslog=True,
            syslog_socket="/nonexistent/log",
            syslog_peers=True,
            webhook_url="https://collector.example/api/events",
            oauth2_client_id="client",
            oauth2_client_secret="secret",
        )
        clock = task.Clock()
        json_log, syslog, webhook = build_outputs(config, clock)
        self.assertIsInstance(json_log, JSONLogService)
        self.assertEqual(json_log.path, log_path)
        self.assertFalse(os.path.exists(log_path))
        self.assertIsInstance(syslog, SyslogService)
        self.assertEqual(syslog.socket_path, "/nonexistent/log")
        self.assertTrue(syslog.include_peers)
        self.assertIsInstance(webhook, WebhookService)
        self.assertEqual(webhook.url, "https://collector.example/api/events")
        self.assertEqual(webhook.token_url, DEFAULT_TOKEN_URL)
        self.assertTrue(webhook.oauth2)
        self.assertEqual(clock.getDelayedCalls(), [])
        for output in (json_log, syslog, webhook):
            self.assertTrue(callable(output))
            self.assertEqual(set(output.counters()) >= {"dropped", "errors"}, True)
        self.assertEqual(len({o.name for o in (json_log, syslog, webhook)}), 3)

    def test_webhook_without_oauth2(self):
        """``-w`` alone builds a webhook without OAuth2, and the syslog output defaults to
        collected events only."""
        config = make_config(self.directory, webhook_url="http://127.0.0.1:1/x", syslog=True)
        syslog, webhook = build_outputs(config, task.Clock())
        self.assertFalse(webhook.oauth2)
        self.assertFalse(syslog.include_peers)

    def test_unwritable_json_log_is_output_error(self):
        """prepare() of a JSON log in a missing directory raises OutputError, one line naming the
        file and the cause (the root service makes it a start-up failure)."""
        path = os.path.join(self.directory, "missing", "events.json")
        config = make_config(self.directory, json_log=True, json_log_file=path)
        (json_log,) = build_outputs(config, task.Clock())
        error = self.assertRaises(OutputError, json_log.prepare)
        self.assertIn(path, str(error))
        self.assertIn("No such file or directory", str(error))
        self.assertNotIn("\n", str(error))

    def test_describe_error_escapes(self):
        """describe_error() gives the type and the escaped message of an exception, one line."""
        self.assertEqual(
            describe_error(ValueError("bad\nthing\x1b")), "ValueError: bad\\nthing\\x1b"
        )
        self.assertEqual(describe_error(OSError(2, "No such file")), "FileNotFoundError: No such file")

    def test_failure_episode(self):
        """FailureEpisode logs the first failure of a run, counts the others, and logs one
        recovery line with the count."""
        from twisted.internet.testing import EventLoggingObserver
        from twisted.logger import Logger, globalLogPublisher

        observer = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        episode = FailureEpisode(Logger(namespace="test"), "things")
        self.assertTrue(episode.failed("broke {n}", n=1))
        self.assertFalse(episode.failed("broke {n}", n=2))
        self.assertTrue(episode.active)
        episode.succeeded()
        episode.succeeded()
        self.assertFalse(episode.active)
        self.assertEqual(log_text(observer), ["broke 1", "things: back to normal after 2 failure(s)"])


class FailureEpisodeTests(SynchronousTestCase):
    """FailureEpisode with a clock: bounded logging that still reports every failure."""

    def setUp(self):
        from twisted.internet.testing import EventLoggingObserver
        from twisted.logger import Logger, globalLogPublisher

        self.clock = task.Clock()
        self.observer = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self.logger = Logger(namespace="test")

    def episode(self, **kwargs) -> FailureEpisode:
        return FailureEpisode(self.logger, "things", clock=self.clock, noun="event(s) dropped",
                              **kwargs)

    def test_summary_a_minute_then_total(self):
        """A long episode: its first failure is logged, the others are summed up at most once a
        minute (``N ... in the last minute``), and its end gives the total; no timer remains."""
        episode = self.episode()
        for _ in range(150):
            episode.failed("first drop")
            self.clock.advance(1)
        episode.succeeded()
        self.assertEqual(log_text(self.observer), [
            "first drop",
            "things: 59 event(s) dropped in the last minute (still failing)",
            "things: 60 event(s) dropped in the last minute (still failing)",
            "things: back to normal after 150 event(s) dropped",
        ])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_drops_reported_without_end(self):
        """Failures after the first are reported within a minute even when nothing else
        happens (no later success, no later failure)."""
        episode = self.episode()
        for _ in range(3):
            episode.failed("first drop")
        self.clock.advance(59.9)
        self.assertEqual(log_text(self.observer), ["first drop"])
        self.clock.advance(0.1)
        self.assertEqual(log_text(self.observer)[1],
                         "things: 2 event(s) dropped in the last minute (still failing)")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_flapping_is_bounded(self):
        """Failure and success alternating every second for 10 minutes (a queue at its limit,
        a flaky receiver): one start line, one end line, then at most one summary a minute;
        the lines account for every failure."""
        episode = self.episode()
        for _ in range(600):
            episode.failed("first drop")
            self.clock.advance(0.5)
            episode.succeeded()
            self.clock.advance(0.5)
        self.clock.advance(60)
        lines = log_text(self.observer)
        self.assertLessEqual(len(lines), 2 + 10)
        self.assertEqual(lines[:2], ["first drop", "things: back to normal after 1 event(s) dropped"])
        counted = 1 + sum(int(line.split(": ")[1].split()[0]) for line in lines[2:])
        self.assertEqual(counted, 600)
        self.assertEqual(episode.total, 600)

    def test_close_reports_at_stop(self):
        """close() (at stop) logs what is unreported and the total of an episode under way, and
        cancels the summary timer."""
        episode = self.episode()
        for _ in range(4):
            episode.failed("first drop")
        episode.close()
        self.assertEqual(log_text(self.observer), [
            "first drop",
            "things: 3 event(s) dropped in the last minute (still failing)",
            "things: still failing at stop, after 4 event(s) dropped",
        ])
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertFalse(episode.active)

    def test_without_summaries(self):
        """summaries=False (retries of the same thing): an announced episode logs its start and
        its end with the total, nothing in between."""
        episode = self.episode(summaries=False)
        for _ in range(200):
            episode.failed("first")
            self.clock.advance(1)
        episode.succeeded()
        self.assertEqual(log_text(self.observer),
                         ["first", "things: back to normal after 200 event(s) dropped"])


class PipelineWiringTests(TestCase):
    async def test_every_output_gets_the_event(self):
        """Wired as the root service does it (prepare, start, pipeline.add_output), one collected
        event reaches the JSON log, syslog and the webhook; a replicated one reaches the JSON
        log and the webhook but not syslog (no --syslog-peers)."""
        directory = short_tempdir(self)
        collector = Collector()
        http = HTTPServer(self, collector)
        http.listen()
        receiver = listen_datagram(self, os.path.join(directory, "log"))
        log_path = os.path.join(directory, "events.json")
        config = make_config(
            os.path.join(directory, "db"),
            json_log_file=log_path,
            json_log=True,
            syslog=True,
            syslog_socket=os.path.join(directory, "log"),
            webhook_url=http.url("/api/events"),
        )
        outputs = build_outputs(config, reactor)
        queue = ListSink()
        queue.put = queue
        pipeline = EventPipeline(queue)
        for output in outputs:
            output.prepare()
            output.startService()
            self.addCleanup(lambda o=output: o.stopService() if o.running else None)
            pipeline.add_output(output)
        collected = make_event(source_ip="203.0.113.50")
        replicated = make_event(source_ip="203.0.113.51", sip_message_bytes=None)
        pipeline.submit_collected(collected)
        pipeline.submit_replicated(replicated)
        await wait_for(lambda: len(collector.delivered) == 2 and receiver.datagrams)
        for output in outputs:
            await defer.maybeDeferred(output.stopService)
        with open(log_path, "rb") as f:
            lines = f.read().splitlines()
        self.assertEqual(
            [json.loads(line)["source_ip"] for line in lines], ["203.0.113.50", "203.0.113.51"]
        )
        self.assertEqual(collector.delivered, lines)
        self.assertEqual(len(receiver.datagrams), 1)
        self.assertIn(b"Source IP: 203.0.113.50,", receiver.datagrams[0])
        self.assertEqual(pipeline.output_errors, 0)


class ShortPathTests(SynchronousTestCase):
    def test_short_tempdir_fits_a_socket(self):
        """The helper's directory leaves room for a Unix socket name (sun_path is 108 bytes)."""
        path = os.path.join(short_tempdir(self), "log")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.addCleanup(sock.close)
        sock.bind(path)
        self.assertTrue(os.path.exists(path))
