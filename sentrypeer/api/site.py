"""The REST API's ``twisted.web`` site (``-a``/``--api``, interface.md §5).

Wiring (in ``sentrypeer/service.py``)::

    strports.service(config.api_listen, make_site(database, token=config.api_token), reactor=reactor)

where ``database`` is the started :class:`sentrypeer.storage.database.Database`
(``root.database_service.database``).
"""

from __future__ import annotations

from typing import Any

from twisted.web.server import Site

from sentrypeer.api.resources import APIResource

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


def make_site(database: Any, *, token: str | None = None, clock: Any = None) -> Site:
    """Build the API site.

    :param database: anything with ``run_query(fn, *args) -> Deferred`` that runs
        ``fn(cursor, *args)`` away from the reactor thread and fires with its result
        (:class:`sentrypeer.storage.database.Database`). It is used per request only, so it may be
        started after the site is built.
    :param token: ``--api-token``. When set (non-empty), every route but ``/health-check`` needs
        ``Authorization: Bearer <token>`` and answers ``401`` otherwise. ``None`` or empty: open.
    :param clock: the ``IReactorTime`` for the idle-connection timeout
        (:data:`IDLE_TIMEOUT`); defaults to the global reactor.
    :returns: a :class:`PrivateSite` serving :class:`~sentrypeer.api.resources.APIResource`.
    """
    resource = APIResource(database, token=token)
    if clock is None:
        return PrivateSite(resource, timeout=IDLE_TIMEOUT)
    return PrivateSite(resource, timeout=IDLE_TIMEOUT, reactor=clock)


__all__ = ["IDLE_TIMEOUT", "PrivateSite", "make_site"]
