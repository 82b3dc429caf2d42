"""The bad-actor event: SentryPeer's unit of data (interface.md §3).

Pure module (no Twisted import). One :class:`BadActorEvent` is made per SIP request transaction and per
non-SIP probe; it is what the database stores, the JSON log writes, the webhook posts and the DHT shares.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from typing import Any

from sentrypeer import __version__

APP_NAME = "sentrypeer"

#: The original's sentinel for a missing or empty string field (``BAD_ACTOR_NOT_FOUND``).
NOT_FOUND = "NOT_FOUND"

#: ``parse_status`` values (interface.md §3).
PARSE_OK = "ok"
PARSE_MALFORMED = "malformed"
PARSE_NON_SIP = "non_sip"
PARSE_TRUNCATED = "truncated"
PARSE_STATUSES = (PARSE_OK, PARSE_MALFORMED, PARSE_NON_SIP, PARSE_TRUNCATED)

TRANSPORTS = ("UDP", "TCP", "TLS")
COLLECTED_METHODS = ("passive", "responsive")

#: The original's 13 keys, in the order of its C (jansson) encoder; all strings.
ORIGINAL_KEYS = (
    "app_name",
    "app_version",
    "event_timestamp",
    "event_uuid",
    "created_by_node_id",
    "collected_method",
    "transport_type",
    "source_ip",
    "destination_ip",
    "called_number",
    "sip_method",
    "sip_user_agent",
    "sip_message",
)
#: Our additions, after the original keys (``signature`` only on signed DHT values).
ADDED_KEYS = (
    "source_port",
    "destination_port",
    "parse_status",
    "auth_username",
    "auth_realm",
)
JSON_KEYS = ORIGINAL_KEYS + ADDED_KEYS


def readable(data: bytes) -> str:
    """Decode attacker bytes for display and JSON: UTF-8, undecodable bytes written as ``\\xNN``.

    :param data: raw bytes from the network.
    :returns: a ``str`` that round-trips every valid UTF-8 sequence and escapes the rest; never raises.
    """
    return data.decode("utf-8", errors="backslashreplace")


def or_not_found(value: str | None) -> str:
    """Return *value*, or :data:`NOT_FOUND` when it is ``None`` or empty (the original's rule)."""
    return value if value else NOT_FOUND


def format_timestamp(epoch_ns: int) -> str:
    """Format nanoseconds since the epoch as ``YYYY-MM-DD HH:MM:SS.NNNNNNNNN`` in UTC.

    Always nine fraction digits (the original printed six for values below 100 ms, reference §3/§14.11).

    :param epoch_ns: integer nanoseconds since 1970-01-01 UTC (``time.time_ns()``).
    """
    seconds, nanos = divmod(epoch_ns, 1_000_000_000)
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(seconds)) + ".%09d" % nanos


def new_event_uuid() -> str:
    """A fresh lower-case UUID version 4 string (36 characters)."""
    return str(uuid.uuid4())


@dataclasses.dataclass(slots=True)
class BadActorEvent:
    """One recorded probe.

    String fields hold readable text (see :func:`readable`); a missing value is :data:`NOT_FOUND`.
    ``sip_message_bytes`` holds the exact bytes received (``None`` for events replicated from peers).
    Ports are integers or ``None`` when unknown (events from the original's nodes).
    """

    event_timestamp: str
    event_uuid: str
    created_by_node_id: str
    collected_method: str
    transport_type: str
    source_ip: str
    destination_ip: str
    called_number: str = NOT_FOUND
    sip_method: str = NOT_FOUND
    sip_user_agent: str = NOT_FOUND
    sip_message: str = NOT_FOUND
    source_port: int | None = None
    destination_port: int | None = None
    parse_status: str = PARSE_OK
    auth_username: str = NOT_FOUND
    auth_realm: str = NOT_FOUND
    sip_message_bytes: bytes | None = None
    #: Base64 Ed25519 signature, only on signed values received from or sent to the DHT.
    signature: str | None = None

    def to_json_dict(self) -> dict[str, Any]:
        """The event as an ordered ``dict`` with the keys of interface.md §3, in that order.

        ``app_name``/``app_version`` are this program's; ``signature`` is added only when set.
        """
        out: dict[str, Any] = {"app_name": APP_NAME, "app_version": __version__}
        for key in JSON_KEYS[2:]:
            out[key] = getattr(self, key)
        if self.signature is not None:
            out["signature"] = self.signature
        return out

    def size_hint(self) -> int:
        """Approximate memory cost in bytes, used to bound the write queue."""
        n = 256 + len(self.sip_message) + len(self.sip_user_agent) + len(self.called_number)
        if self.sip_message_bytes is not None:
            n += len(self.sip_message_bytes)
        return n


def escape_for_log(text: str | None, limit: int = 200) -> str:
    """Make attacker text safe for one log line: control and non-ASCII characters escaped
    (``\\n``, ``\\x1b``, ``\\u202e``), quotes kept, cut to *limit* characters with ``...``.

    :param text: any string (``None`` gives ``NOT_FOUND``).
    :param limit: maximum characters of *text* shown.
    """
    if text is None:
        return NOT_FOUND
    cut = text[:limit]
    shown = cut.encode("unicode_escape").decode("ascii")
    return shown + ("..." if len(text) > limit else "")
