"""The REST API's ``twisted.web`` site (``-a``/``--api``, interface.md §5), with the dashboard,
the blocklists and the metrics (issue 8).

Routes: ``/dashboard`` and everything under ``/dashboard/`` go to
:class:`~sentrypeer.api.dashboard.DashboardResource`; ``/blocklist.txt``, ``/blocklist.ipset`` and
``/blocklist.nft`` to :class:`~sentrypeer.api.blocklist.BlocklistResource`; ``/metrics`` to
:class:`~sentrypeer.metrics.MetricsResource` (when ``prometheus_client`` is installed and there is
something to expose); every other path to :class:`~sentrypeer.api.resources.APIResource`, unchanged.
Matching is on the raw path, exactly (``/dashboardx`` and ``/metrics/`` are the API's 404).

Wiring (in ``sentrypeer/service.py``)::

    site = make_site(
        database, token=config.api_token, clock=reactor, live=root,
        blocklist_exclude=exclude_networks, own_addresses=listen_addresses,
    )
    strports.service(config.api_listen, site, reactor=reactor)

where ``database`` is the started :class:`sentrypeer.storage.database.Database`
(``root.database_service.database``) and ``root`` the root service (its counters are read at each
scrape of ``/metrics``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from twisted.logger import Logger
from twisted.web.server import Site

from sentrypeer.api.blocklist import PATHS as BLOCKLIST_PATHS
from sentrypeer.api.blocklist import BlocklistResource
from sentrypeer.api.dashboard import PREFIX as DASHBOARD_PREFIX
from sentrypeer.api.dashboard import DashboardResource
from sentrypeer.api.resources import APIResource

log = Logger(namespace="sentrypeer.api")

#: Seconds an HTTP connection may stay idle before it is closed. ``twisted.web``'s default is
#: 12 hours, which lets idle clients pile up; the original had no limit at all (reference §5.1).
IDLE_TIMEOUT = 60


class PrivateSite(Site):
    """A :class:`~twisted.web.server.Site` that keeps no access log.

    Honeypot data and the addresses of those who query it are sensitive, so no request is logged
    (issue 3: "no request logging of clients by default"); the original printed every client's IP
    (reference §5.2). Server errors are still logged, one line each, without the client address
    (:func:`sentrypeer.api.resources.log_server_error`). ``noisy`` is off, so connections do not
    log factory start and stop either.
    """

    noisy = False
    displayTracebacks = False

    def log(self, request: Any) -> None:
        """Log nothing (the access-log hook of ``HTTPFactory``)."""


class SiteResource(APIResource):
    """The site's root: the API (what :class:`APIResource` answers) plus the routes of issue 8.

    It is an :class:`APIResource` so that everything the API answers stays exactly as it was; the
    other routes are handed to their own leaf resources by :meth:`render`.

    :param database: see :func:`make_site`.
    :param token: see :func:`make_site`.
    :param dashboard: serves ``/dashboard`` and ``/dashboard/…``.
    :param blocklist: serves the ``/blocklist.*`` paths.
    :param metrics: serves ``/metrics``, or ``None`` (then it is the API's 404).
    """

    def __init__(
        self,
        database: Any,
        token: str | None = None,
        *,
        dashboard: Any = None,
        blocklist: Any = None,
        metrics: Any = None,
    ) -> None:
        super().__init__(database, token=token)
        self.dashboard = dashboard
        self.blocklist = blocklist
        self.metrics = metrics

    def route(self, path: bytes) -> Any:
        """The resource answering the raw request *path* (``self`` for the API's paths)."""
        if self.dashboard is not None and (
            path == DASHBOARD_PREFIX or path.startswith(DASHBOARD_PREFIX + b"/")
        ):
            return self.dashboard
        if self.blocklist is not None and path in BLOCKLIST_PATHS:
            return self.blocklist
        if self.metrics is not None and path == b"/metrics":
            return self.metrics
        return self

    def render(self, request: Any) -> Any:
        """Hand *request* to :meth:`route`'s resource (the API's own ``render`` for its paths)."""
        target = self.route(request.path)
        if target is self:
            return super().render(request)
        return target.render(request)


def _metrics_resource(live: Any, registry: Any, token: str | None) -> Any:
    if registry is None and live is None:
        return None
    from sentrypeer.metrics import MetricsResource, build_registry

    if registry is None:
        try:
            registry = build_registry(live)
        except ImportError as e:
            log.warn("/metrics is off: {error} (install prometheus_client)", error=str(e))
            return None
    return MetricsResource(registry, token=token)


def make_site(
    database: Any,
    *,
    token: str | None = None,
    clock: Any = None,
    live: Any = None,
    metrics_registry: Any = None,
    blocklist_exclude: Iterable[Any] = (),
    own_addresses: Iterable[str] = (),
) -> Site:
    """Build the API site.

    :param database: anything with ``run_query(fn, *args) -> Deferred`` that runs
        ``fn(cursor, *args)`` away from the reactor thread and fires with its result
        (:class:`sentrypeer.storage.database.Database`). It is used per request only, so it may be
        started after the site is built.
    :param token: ``--api-token``. When set (non-empty), every API route but ``/health-check``
        needs ``Authorization: Bearer <token>`` and answers ``401`` otherwise; the dashboard, the
        blocklists and ``/metrics`` need it too, as Bearer or as the HTTP Basic password.
        ``None`` or empty: open.
    :param clock: the ``IReactorTime`` for the idle-connection timeout
        (:data:`IDLE_TIMEOUT`) and for "now" in the dashboard and blocklists; defaults to the
        global reactor (and the system clock).
    :param live: the root service, whose counters ``/metrics`` reads at each scrape
        (:class:`sentrypeer.metrics.SentryPeerCollector`); ``None``: no ``/metrics`` unless
        *metrics_registry* is given.
    :param metrics_registry: a ``prometheus_client`` ``CollectorRegistry`` to expose instead of
        one built on *live*.
    :param blocklist_exclude: the ``--blocklist-exclude`` networks
        (:func:`sentrypeer.api.blocklist.load_exclude_file`), never put on a blocklist.
    :param own_addresses: this node's addresses (e.g. its listen addresses), never put on a
        blocklist (the addresses its own events were sent to are excluded anyway).
    :returns: a :class:`PrivateSite` serving a :class:`SiteResource` (an
        :class:`~sentrypeer.api.resources.APIResource`).
    """
    resource = SiteResource(
        database,
        token=token,
        dashboard=DashboardResource(database, token=token, clock=clock),
        blocklist=BlocklistResource(
            database, token=token, clock=clock, exclude=blocklist_exclude, own_addresses=own_addresses
        ),
        metrics=_metrics_resource(live, metrics_registry, token),
    )
    if clock is None:
        return PrivateSite(resource, timeout=IDLE_TIMEOUT)
    return PrivateSite(resource, timeout=IDLE_TIMEOUT, reactor=clock)


__all__ = ["IDLE_TIMEOUT", "PrivateSite", "SiteResource", "make_site"]
