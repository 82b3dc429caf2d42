"""The service tree: database, SIP listeners, and (later) DHT, API, manhole.

``build_service(config, reactor)`` returns the root :class:`SentryPeerService`; ``run(config)`` runs
it in the foreground for the ``sentrypeer`` console script. Start-up failures (a port that cannot be
bound, an unreadable TLS key, an unwritable database) are one logged line and exit status 1, never a
traceback (interface.md §1). Shutdown is ordered: listeners first, then buffered stream messages are
recorded, then the other services, and the database last, after its write queue is flushed.
"""

from __future__ import annotations

import errno
import os
import sys

from twisted.application import strports
from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.internet.error import CannotListenError
from twisted.internet.posixbase import PosixReactorBase
from twisted.logger import (
    FilteringLogObserver,
    Logger,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogBeginner,
    textFileLogObserver,
)

from sentrypeer import __version__, metrics
from sentrypeer.config import Config
from sentrypeer.endpoints import ListenSpec, format_listen
from sentrypeer.outputs import OutputError, build_outputs
from sentrypeer.pipeline import EventPipeline
from sentrypeer.sip.controller import SIPController
from sentrypeer.sip.protocol import MAX_DATAGRAM, PacketInfoUDPPort, SIPDatagramProtocol
from sentrypeer.stats import SIPStats
from sentrypeer.storage.database import Database, DatabaseService, StorageError, prepare_database
from sentrypeer.tls import TLSSetupError, context_factory, ensure_certificate

log = Logger(namespace="sentrypeer")


class StartupError(Exception):
    """Start-up cannot go on; the message is one line naming the thing and the cause."""


def _describe(transport: str, host: str, port: int) -> str:
    host = f"[{host}]" if ":" in host else host
    return f"{transport} {host}:{port}"


class SentryPeerService(MultiService):
    """The root service.

    Children: :class:`~sentrypeer.storage.database.DatabaseService` (first, so it stops last).
    The SIP listening ports are held directly so they can be closed before anything else.

    Live objects for the manhole and later issues: ``config``, ``node_id``, ``stats``
    (:class:`~sentrypeer.stats.SIPStats`), ``controller``, ``pipeline``, ``database_service``,
    ``ports`` (list of ``(ListenSpec, IListeningPort)``).

    :param config: the resolved :class:`~sentrypeer.config.Config`.
    :param reactor: the reactor to listen with.
    """

    def __init__(self, config: Config, reactor) -> None:
        super().__init__()
        self.config = config
        self.reactor = reactor
        self.stats = SIPStats()
        self.node_id: str | None = None
        self.controller: SIPController | None = None
        self.pipeline: EventPipeline | None = None
        self.database_service: DatabaseService | None = None
        self.ports: list = []
        self.api_service = None
        self.dht_service = None
        self.responder = None
        self.manhole_service = None
        self._prepared = False

    # -- start --------------------------------------------------------------------------------

    def privilegedStartService(self) -> None:
        """Open the database and bind every listener (before privileges could be dropped).

        :raises SystemExit: with status 1 after logging one line, on any start-up failure.
        """
        try:
            self.prepare()
        except StartupError as e:
            log.critical("sentrypeer: {error}", error=str(e))
            raise SystemExit(1) from None
        try:
            super().privilegedStartService()  # binds the API (strports raises synchronously)
        except CannotListenError as e:
            self._close_ports()
            reason = getattr(e.socketError, "strerror", None) or str(e.socketError)
            log.critical(
                "sentrypeer: cannot listen on {address}: {reason}",
                address=_describe("TCP", e.interface or "0.0.0.0", e.port),
                reason=reason,
            )
            raise SystemExit(1) from None

    def prepare(self) -> None:
        """Build the tree and bind the listeners.

        :raises StartupError: with a one-line message; anything already bound is closed again.
        """
        if self._prepared:
            return
        config = self.config
        for warning in config.warnings:
            log.warn("{warning}", warning=warning)
        if config.p2p:
            from sentrypeer.dht import DHTStartupError, require_opendht

            try:
                require_opendht()  # before anything is created on disk
            except DHTStartupError as e:
                raise StartupError(str(e)) from None
        try:
            self.node_id = prepare_database(config.db_file)
        except StorageError as e:
            raise StartupError(str(e)) from None
        # Database batch latency for /metrics: the store is wrapped so every insert is timed.
        self.batch_latency = metrics.LatencyHistogram()
        self.database_service = DatabaseService(
            config.db_file,
            reactor=self.reactor,
            database=metrics.TimedEventStore(
                Database(config.db_file, self.reactor), self.batch_latency, self.reactor
            ),
            max_events=config.write_queue_size,
            max_bytes=config.write_queue_bytes,
            retention_days=config.retention_days,
        )
        self.database_service.node_id = self.node_id
        self.database_service.setServiceParent(self)
        self.pipeline = EventPipeline(self.database_service.queue)
        # Per-method counts (bounded labels) for /metrics, counted on the way into the pipeline.
        self.event_counts = metrics.EventCounts(self.pipeline.submit_collected)
        for output in build_outputs(config, self.reactor):
            try:
                output.prepare()  # the JSON log opens its file here: a failure is a start-up error
            except OutputError as e:
                raise StartupError(str(e)) from None
            output.setServiceParent(self)
            self.pipeline.add_output(output)
        if config.p2p:
            from sentrypeer.dht import DHTStartupError
            from sentrypeer.dht.service import build_dht_service

            try:
                self.dht_service = build_dht_service(
                    config, self.reactor, self.pipeline, self.node_id, self.database_service.database
                )
            except DHTStartupError as e:  # missing opendht, port in use, bad key or trusted file
                raise StartupError(str(e)) from None
            self.dht_service.setServiceParent(self)  # after the database, so it stops before it
            self.pipeline.add_output(self.dht_service)
        if config.api:
            from sentrypeer.api import make_site
            from sentrypeer.api.blocklist import (
                BlocklistExcludeError,
                load_exclude_file,
                own_listen_addresses,
            )

            exclude = ()
            if config.blocklist_exclude:
                try:
                    exclude = load_exclude_file(config.blocklist_exclude)
                except BlocklistExcludeError as e:
                    raise StartupError(str(e)) from None
            site = make_site(
                self.database_service.database,
                token=config.api_token,
                clock=self.reactor,
                live=self,
                blocklist_exclude=exclude,
                own_addresses=own_listen_addresses(config.sip_listen),
            )
            try:
                self.api_service = strports.service(config.api_listen, site, reactor=self.reactor)
            except (ValueError, KeyError, TypeError) as e:
                hint = ""
                if "::" in config.api_listen:
                    hint = " (write IPv6 addresses escaped, e.g. interface=\\:\\:1)"
                raise StartupError(f"invalid --api-listen {config.api_listen!r}: {e}{hint}") from None
            self.api_service.setServiceParent(self)
        self.controller = SIPController(
            node_id=self.node_id,
            sink=self.event_counts,
            clock=self.reactor,
            collected_method="responsive" if config.sip_responsive else "passive",
            verbose=config.verbose or config.debug,
            max_connections=config.max_tcp_connections,
            idle_timeout=config.tcp_idle_timeout,
            stats=self.stats,
        )
        if not config.sip_responsive:
            from sentrypeer.config import SETTINGS_BY_NAME

            for name in ("sip_persona", "reply_rate"):
                if getattr(config, name) != SETTINGS_BY_NAME[name].default:
                    log.warn(
                        "--{option} has no effect without -r/--sip-responsive",
                        option=SETTINGS_BY_NAME[name].option,
                    )
        if config.sip_responsive:
            from sentrypeer.sip.persona import PersonaError
            from sentrypeer.sip.responder import build_responder

            try:
                self.responder = build_responder(config, self.reactor)
            except PersonaError as e:  # one line starting "--sip-persona: "
                raise StartupError(str(e)) from None
            self.responder.install(self.controller)  # responder, reply gate, collected_method
            self.responder.setServiceParent(self)  # stopping it cancels pending INVITE timers
            log.info(
                "responsive mode: persona {persona}, {rate:g} replies/s per destination",
                persona=self.responder.persona.name,
                rate=config.reply_rate,
            )
        if config.manhole:
            from sentrypeer.manhole import ManholeError, build_manhole_service

            namespace = {
                "root": self,
                "sip": self.controller,
                "stats": self.stats,
                "database": self.database_service,
                "pipeline": self.pipeline,
                "dht": self.dht_service,
                "responder": self.responder,
                "event_counts": self.event_counts,
                "batch_latency": self.batch_latency,
            }
            try:
                self.manhole_service = build_manhole_service(
                    config.manhole,
                    config.manhole_keys,
                    os.path.dirname(os.path.abspath(config.db_file)),
                    namespace,
                    self.reactor,
                )
            except ManholeError as e:
                raise StartupError(str(e)) from None
            self.manhole_service.setServiceParent(self)
        log.info(
            "SentryPeer {version} starting: node id {node_id}, database {db}",
            version=__version__,
            node_id=self.node_id,
            db=os.path.abspath(config.db_file),
        )
        if config.sip_disable:
            log.info("SIP listeners disabled (-R)")
        else:
            try:
                self._listen_all(config.sip_listen)
            except StartupError:
                self._close_ports()
                raise
        self._prepared = True

    def _listen_all(self, specs: tuple[ListenSpec, ...]) -> None:
        tls_options = None
        if any(spec.transport == "tls" for spec in specs):
            try:
                if ensure_certificate(self.config.cert, self.config.key):
                    log.info(
                        "generated a self-signed TLS certificate {cert} and key {key}",
                        cert=self.config.cert,
                        key=self.config.key,
                    )
                tls_options = context_factory(self.config.cert, self.config.key)
            except TLSSetupError as e:
                raise StartupError(str(e)) from None
        for spec in specs:
            port = self._listen(spec, tls_options)
            host = port.getHost()
            self.ports.append((spec, port))
            log.info(
                "listening for SIP on {address}",
                address=_describe(spec.transport.upper(), host.host, host.port),
            )

    def _listen(self, spec: ListenSpec, tls_options):
        try:
            return self._listen_on(spec, spec.interface, tls_options)
        except CannotListenError as e:
            cause = e.socketError
            # A host without IPv6: the default dual-stack "::" falls back to IPv4 only.
            if spec.interface == "::" and getattr(cause, "errno", None) in (
                errno.EAFNOSUPPORT,
                errno.EADDRNOTAVAIL,
            ):
                log.warn("IPv6 unavailable; {spec} listens on IPv4 only", spec=format_listen(spec))
                try:
                    return self._listen_on(spec, "0.0.0.0", tls_options)
                except CannotListenError as e2:
                    cause = e2.socketError
            reason = getattr(cause, "strerror", None) or str(cause)
            raise StartupError(
                f"cannot listen on {_describe(spec.transport.upper(), spec.interface, spec.port)}"
                f": {reason}"
            ) from None

    def _listen_on(self, spec: ListenSpec, interface: str, tls_options):
        reactor, controller = self.reactor, self.controller
        if spec.transport == "udp":
            protocol = SIPDatagramProtocol(controller)
            # Packet info needs a real socket; other reactors (test fakes) get plain listenUDP.
            if isinstance(reactor, PosixReactorBase):
                port = PacketInfoUDPPort(spec.port, protocol, interface, MAX_DATAGRAM, reactor)
                port.startListening()
                return port
            return reactor.listenUDP(
                spec.port, protocol, interface=interface, maxPacketSize=MAX_DATAGRAM
            )
        if spec.transport == "tcp":
            return reactor.listenTCP(
                spec.port, controller.stream_factory("TCP"), backlog=511, interface=interface
            )
        return reactor.listenSSL(
            spec.port, controller.stream_factory("TLS"), tls_options, backlog=511,
            interface=interface,
        )

    def _close_ports(self) -> defer.Deferred:
        ports, self.ports = self.ports, []
        return defer.DeferredList(
            [defer.maybeDeferred(port.stopListening) for _, port in ports], consumeErrors=True
        )

    # -- stop ---------------------------------------------------------------------------------

    @defer.inlineCallbacks
    def stopService(self):
        """Stop in order: listeners, open stream connections (their buffered bytes are recorded),
        the other children in reverse order of start, the database last (its queue flushed)."""
        if not self.running:
            return
        self.running = 0
        yield self._close_ports()
        if self.controller is not None:
            for protocol in list(self.controller.connections):
                protocol.drain()
                protocol.transport.abortConnection()
        for child in reversed(list(self)):
            try:
                yield defer.maybeDeferred(child.stopService)
            except Exception:
                log.failure("error stopping {service}", service=child)
        stats = self.stats
        queue = self.database_service.queue if self.database_service else None
        log.info(
            "SentryPeer stopped: received={received} recorded={recorded} written={written} "
            "dropped={dropped} retransmissions={retrans}",
            received=stats.total("received"),
            recorded=stats.total("recorded"),
            written=getattr(queue, "written", 0),
            dropped=stats.dropped,
            retrans=stats.retransmissions,
        )


def build_service(config: Config, reactor=None) -> SentryPeerService:
    """Build (not start) the service tree for *config*.

    :param reactor: defaults to the global reactor.
    """
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    return SentryPeerService(config, reactor)


def start(config: Config, reactor) -> SentryPeerService:
    """Log to stderr (debug level with ``-d``), build and start the service tree, and have it
    stopped when the reactor shuts down; the caller then runs the reactor.

    :raises SystemExit: start-up failed (already logged; the code is the exit status).
    """
    level = LogLevel.debug if config.debug else LogLevel.info
    observer = FilteringLogObserver(
        textFileLogObserver(sys.stderr),
        [LogLevelFilterPredicate(defaultLogLevel=level)],
    )
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)
    service = build_service(config, reactor)
    service.privilegedStartService()
    service.startService()
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    return service


def run(config: Config, reactor=None) -> int:
    """Run SentryPeer in the foreground, logging to stderr, until SIGINT/SIGTERM.

    Used by the ``sentrypeer`` console script and ``python3 -m sentrypeer``.

    :returns: the process exit status (0 after a clean stop, 1 on a start-up failure).
    """
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    try:
        start(config, reactor)
    except SystemExit as e:
        return int(e.code or 1)
    reactor.run()
    return 0
