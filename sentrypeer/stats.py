"""Counters of the SIP side, kept in one place for logs, the manhole and (later) Prometheus metrics.

Pure module. Every counter is a plain integer attribute so the manhole can read it live
(``sip.stats.as_dict()``); per-transport counts are dicts keyed by ``"UDP"``, ``"TCP"``, ``"TLS"``.
"""

from __future__ import annotations

import dataclasses


def _per_transport() -> dict[str, int]:
    return {"UDP": 0, "TCP": 0, "TLS": 0}


@dataclasses.dataclass
class SIPStats:
    """What the SIP listeners saw, and what became of it.

    ``received`` counts requests and non-SIP probes handed to the event pipeline (before
    retransmission filtering), per transport; ``recorded`` the events accepted by the write queue;
    ``dropped`` the events the bounded write queue refused.
    """

    datagrams: int = 0  #: UDP datagrams read (all of them, keep-alives and responses included)
    #: UDP datagrams the kernel dropped before we could read them (receive buffer full; Linux
    #: ``SO_MEMINFO``, read every second by each UDP port)
    kernel_drops: int = 0
    received: dict[str, int] = dataclasses.field(default_factory=_per_transport)
    recorded: dict[str, int] = dataclasses.field(default_factory=_per_transport)
    retransmissions: int = 0  #: requests matching a transaction seen within 32 s (RFC 3261 §17.2)
    dropped: int = 0  #: events refused by the full write queue
    truncated: int = 0  #: events cut at a size limit or connection end
    non_sip: int = 0  #: non-SIP probes recorded
    malformed: int = 0  #: requests recorded with parse_status ``malformed``
    responses: int = 0  #: SIP responses received (never recorded, never answered)
    keepalives: int = 0  #: CRLF / CRLFCRLF keep-alives and empty datagrams
    pongs: int = 0  #: CRLF pongs written to stream pings (RFC 5626 §3.5.1)
    pongs_refused: int = 0  #: pings beyond the per-connection pong rate (no pong written)
    stray_bytes: int = 0  #: stream bytes discarded after a message that had a Content-Length
    connections: dict[str, int] = dataclasses.field(default_factory=_per_transport)
    connections_open: int = 0
    connections_rejected: int = 0  #: refused at --max-tcp-connections
    connections_idle: int = 0  #: closed by --tcp-idle-timeout
    connections_slow: int = 0  #: closed because a message took longer than its deadline
    connections_silent: int = 0  #: TCP/TLS connections that closed without sending a byte
    tls_handshake_failures: int = 0
    internal_errors: int = 0  #: exceptions caught in the receive path (each logged once)

    def as_dict(self) -> dict[str, object]:
        """A JSON-friendly copy of every counter."""
        return dataclasses.asdict(self)

    def total(self, name: str) -> int:
        """Sum of a per-transport counter (``received``, ``recorded``, ``connections``)."""
        return sum(getattr(self, name).values())
