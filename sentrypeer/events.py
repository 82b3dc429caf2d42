"""The bad-actor event: SentryPeer's unit of data (interface.md §3).

Pure module (no Twisted import). One :class:`BadActorEvent` is made per SIP request transaction and per
non-SIP probe; it is what the database stores, the JSON log writes, the webhook posts and the DHT shares.
"""

from __future__ import annotations

import dataclasses
import os
import time
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


#: ``(seconds, "YYYY-MM-DD HH:MM:SS")`` of the last :func:`format_timestamp` call: events come in
#: bursts within one second, and ``strftime`` is most of the cost. Replaced, never mutated, so
#: threads only ever read a consistent pair.
_last_second: tuple[int, str] = (-1, "")


def format_timestamp(epoch_ns: int) -> str:
    """Format nanoseconds since the epoch as ``YYYY-MM-DD HH:MM:SS.NNNNNNNNN`` in UTC.

    Always nine fraction digits (the original printed six for values below 100 ms, reference §3/§14.11).

    :param epoch_ns: integer nanoseconds since 1970-01-01 UTC (``time.time_ns()``).
    """
    global _last_second
    seconds, nanos = divmod(epoch_ns, 1_000_000_000)
    last = _last_second
    if last[0] != seconds:
        last = _last_second = (seconds, time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(seconds)))
    return "%s.%09d" % (last[1], nanos)


#: UUIDs made ahead of time by :func:`new_event_uuid` (a few hundred at a time from one
#: ``os.urandom`` call), emptied in a forked child so parent and child never share one.
_uuid_pool: list[str] = []
_UUID_BATCH = 256
#: The UUID variant digit (RFC 4122 §4.1.1: bits 10xx) for any random hex digit.
_VARIANT = {digit: "89ab"[int(digit, 16) & 3] for digit in "0123456789abcdef"}


def _make_uuids() -> list[str]:
    """:data:`_UUID_BATCH` random version-4 UUID strings (RFC 4122 §4.4: 122 random bits from
    ``os.urandom``, like :func:`uuid.uuid4`, with the version and variant bits set)."""
    h = os.urandom(16 * _UUID_BATCH).hex()
    variant = _VARIANT
    return [
        f"{h[i:i + 8]}-{h[i + 8:i + 12]}-4{h[i + 13:i + 16]}-{variant[h[i + 16]]}{h[i + 17:i + 20]}"
        f"-{h[i + 20:i + 32]}"
        for i in range(0, 32 * _UUID_BATCH, 32)
    ]


def new_event_uuid() -> str:
    """A fresh lower-case UUID version 4 string (36 characters)."""
    try:
        return _uuid_pool.pop()
    except IndexError:
        _uuid_pool.extend(_make_uuids())
        return _uuid_pool.pop()


os.register_at_fork(after_in_child=_uuid_pool.clear)


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
        """Approximate memory cost in bytes, used to bound the write queue: the texts and bytes
        of the message, plus some 800 bytes for the event object and its dozen short strings
        (measured with :mod:`tracemalloc` on scanner probes)."""
        n = 800 + len(self.sip_message) + len(self.sip_user_agent) + len(self.called_number)
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
