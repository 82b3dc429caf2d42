"""DHT values: encoding our events, and checking the values peers send (interface.md §3, §6).

Pure module: no Twisted, no ``opendht``, no I/O. The honeypot's DHT service calls
:func:`encode_value` for every event it publishes and :func:`check_value` for every value the
worker hands it; the database duplicate check (``event_uuid`` already stored) is the service's,
since it needs the database.

What is accepted (interface.md §6, reference §9 plus the checks the original lacks, §14.22):

* the value bytes, cut at the first NUL (the original reads them as a C string), at most
  :data:`MAX_VALUE_BYTES`, valid UTF-8, one JSON object without repeated keys, NaN or Infinity;
* the original's 13 keys (:data:`~sentrypeer.events.ORIGINAL_KEYS`), all strings; other keys are
  allowed (newer nodes) and ignored unless listed here;
* ``created_by_node_id`` and ``event_uuid``: strict UUID text (36 characters, hyphens at 8, 13, 18
  and 23, hexadecimal digits of either case, any version, as the original's ``uuid_parse``); stored
  lower-case; ``created_by_node_id`` must not be this node's id;
* ``event_timestamp``: ``YYYY-MM-DD HH:MM:SS.F`` with 6 to 9 fraction digits (the original pads to
  six, reference §3) and a real date and time; stored as sent;
* ``source_ip`` and ``destination_ip``: an IPv4 or IPv6 address, or the Rust-built original's
  ``a.b.c.d:port``/``[v6]:port`` (reference §2.5), which is split into address and port; IPv4-mapped
  IPv6 becomes IPv4, IPv6 is written compressed; no zone (``%eth0``);
* ``transport_type`` ``UDP``/``TCP``/``TLS``; ``collected_method`` ``passive``/``responsive``;
  ``sip_method`` an RFC 3261 token or ``NOT_FOUND``/empty;
* sizes: see the ``MAX_*`` constants;
* our added keys when present: ``source_port``/``destination_port`` an integer 0-65535 or null,
  ``parse_status`` one of :data:`~sentrypeer.events.PARSE_STATUSES`, ``auth_username``/
  ``auth_realm`` strings, ``signature`` base64 of 64 bytes;
* with trusted keys (``--dht-trusted-nodes``): a ``signature`` that verifies against one of them
  (:func:`sentrypeer.dht.signing.verify`).

Empty ``called_number``, ``sip_method``, ``sip_user_agent``, ``sip_message`` (what the original sends
for a 0-byte packet) become ``NOT_FOUND``. Text is otherwise stored exactly as sent: SQL, HTML or JSON
in a User-Agent is data, made inert by the database's parameters and each output's own escaping.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from sentrypeer.dht import signing
from sentrypeer.eventlog import event_json
from sentrypeer.events import (
    COLLECTED_METHODS,
    NOT_FOUND,
    ORIGINAL_KEYS,
    PARSE_OK,
    PARSE_STATUSES,
    PARSE_TRUNCATED,
    TRANSPORTS,
    BadActorEvent,
    or_not_found,
)

#: Largest value accepted from a peer, in bytes: OpenDHT's own ``MAX_VALUE_SIZE`` (64 KiB).
MAX_VALUE_BYTES = 64 * 1024
#: Largest value we put, in bytes (opendht-notes §4.5: values near 64 KiB fail slowly or never
#: call back). A longer event has its ``sip_message`` cut and ``parse_status`` ``truncated``.
PUT_VALUE_CAP = 60 * 1024
#: Longest ``app_name``, ``app_version`` and ``sip_method``, in characters.
MAX_SHORT_CHARS = 256
#: Longest ``called_number``, ``sip_user_agent``, ``auth_username``, ``auth_realm``, in characters.
MAX_FIELD_CHARS = 8192
#: Deepest JSON nesting accepted (the keys we read are flat; this only bounds the parser's work).
MAX_DEPTH = 32

# Rejection reasons (counted and logged by the service under these names).
TOO_LARGE = "too_large"
BAD_JSON = "bad_json"
NOT_OBJECT = "not_object"
MISSING_KEY = "missing_key"
WRONG_TYPE = "wrong_type"
BAD_NODE_ID = "bad_node_id"
OWN_NODE_ID = "own_node_id"
BAD_EVENT_UUID = "bad_event_uuid"
BAD_TIMESTAMP = "bad_timestamp"
BAD_ADDRESS = "bad_address"
BAD_FIELD = "bad_field"
TOO_LONG = "too_long"
BAD_SIGNATURE = "bad_signature"
UNSIGNED = "unsigned"
UNTRUSTED_SIGNATURE = "untrusted_signature"

REASONS = (
    TOO_LARGE, BAD_JSON, NOT_OBJECT, MISSING_KEY, WRONG_TYPE, BAD_NODE_ID, OWN_NODE_ID,
    BAD_EVENT_UUID, BAD_TIMESTAMP, BAD_ADDRESS, BAD_FIELD, TOO_LONG, BAD_SIGNATURE, UNSIGNED,
    UNTRUSTED_SIGNATURE,
)

_UUID = re.compile(r"[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}")
_TIMESTAMP = re.compile(r"(\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2})\.\d{6,9}")
_TOKEN = re.compile(r"[A-Za-z0-9.!%*_+`'~-]+")
_ADDED_TEXT_KEYS = ("auth_username", "auth_realm")
_LONG_KEYS = ("called_number", "sip_user_agent")
_SHORT_KEYS = ("app_name", "app_version", "sip_method")


@dataclass(frozen=True, slots=True)
class Accepted:
    """A value that passed every check.

    :ivar event: the event to store (``sip_message_bytes`` is ``None``; ``signature`` as sent).
    """

    event: BadActorEvent


@dataclass(frozen=True, slots=True)
class Rejected:
    """A value refused, with why.

    :ivar reason: one of :data:`REASONS`.
    :ivar detail: the key concerned, or a short description; it may contain attacker text, so
        escape it (:func:`sentrypeer.events.escape_for_log`) before logging.
    :ivar event_uuid: the value's ``event_uuid`` when it was read and valid, else ``None``.
    """

    reason: str
    detail: str = ""
    event_uuid: str | None = None


class _Invalid(Exception):
    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.detail = detail


def is_uuid(text: Any) -> bool:
    """Whether *text* is UUID text as the original's ``uuid_parse`` accepts it (36 characters,
    hyphens at 8, 13, 18, 23, hexadecimal digits of either case; any version; nil included)."""
    return isinstance(text, str) and _UUID.fullmatch(text) is not None


def _no_repeats(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise _Invalid(BAD_JSON, "repeated key")
    return obj


def _no_constant(name: str) -> Any:
    raise _Invalid(BAD_JSON, f"{name} is not JSON")


def _depth_ok(text: str) -> bool:
    # Bracket depth outside strings, counted without recursion, so a deeply nested value cannot
    # exhaust the parser's stack.
    depth = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > MAX_DEPTH:
                return False
        elif ch in "]}":
            depth -= 1
    return True


def parse_json_object(data: bytes) -> dict[str, Any]:
    """The JSON object in value bytes *data* (cut at the first NUL), strictly.

    :raises _Invalid: with :data:`TOO_LARGE`, :data:`BAD_JSON` or :data:`NOT_OBJECT`.
    """
    if len(data) > MAX_VALUE_BYTES:
        raise _Invalid(TOO_LARGE, f"{len(data)} bytes")
    data = data.split(b"\0", 1)[0]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise _Invalid(BAD_JSON, "not UTF-8") from None
    if text.count("[") + text.count("{") > MAX_DEPTH and not _depth_ok(text):
        raise _Invalid(BAD_JSON, "nested too deeply")
    try:
        value = json.loads(text, object_pairs_hook=_no_repeats, parse_constant=_no_constant)
    except _Invalid:
        raise
    except (ValueError, RecursionError) as e:
        raise _Invalid(BAD_JSON, str(e)[:100]) from None
    if not isinstance(value, dict):
        raise _Invalid(NOT_OBJECT, type(value).__name__)
    return value


def _text(value: dict[str, Any], key: str) -> str:
    if key not in value:
        raise _Invalid(MISSING_KEY, key)
    item = value[key]
    if not isinstance(item, str):
        raise _Invalid(WRONG_TYPE, key)
    return item


def _uuid(value: dict[str, Any], key: str, reason: str) -> str:
    text = _text(value, key)
    if not is_uuid(text):
        raise _Invalid(reason, text[:40])
    return text.lower()


def _timestamp(text: str) -> str:
    match = _TIMESTAMP.fullmatch(text)
    if match is None:
        raise _Invalid(BAD_TIMESTAMP, text[:40])
    try:
        datetime.datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S")
    except ValueError:
        raise _Invalid(BAD_TIMESTAMP, text[:40]) from None
    return text


def normalise_address(text: str) -> tuple[str, int | None]:
    """An address as sent by a peer, checked and normalised.

    :param text: ``a.b.c.d``, an IPv6 address, ``a.b.c.d:port`` or ``[v6]:port``.
    :returns: ``(address, port or None)``: IPv4-mapped IPv6 as IPv4, IPv6 compressed.
    :raises ValueError: anything else (names, zones, bad ports, empty).
    """
    if len(text) > 64 or "%" in text:
        raise ValueError("not an address")
    port: int | None = None
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]:")
        if not bracket or not (rest.isascii() and rest.isdigit() and len(rest) <= 5):
            raise ValueError("not an address")
        address = ipaddress.IPv6Address(host)
        port = int(rest)
    elif text.count(":") == 1:
        host, _, rest = text.partition(":")
        if not (rest.isascii() and rest.isdigit() and len(rest) <= 5):
            raise ValueError("not an address")
        address = ipaddress.IPv4Address(host)
        port = int(rest)
    else:
        address = ipaddress.ip_address(text)
    if port is not None and port > 65535:
        raise ValueError("port out of range")
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return str(address), port


def _address(value: dict[str, Any], key: str) -> tuple[str, int | None]:
    text = _text(value, key)
    try:
        return normalise_address(text)
    except ValueError:
        raise _Invalid(BAD_ADDRESS, f"{key} {text[:64]}") from None


def _port(value: dict[str, Any], key: str) -> int | None:
    item = value.get(key)
    if item is None:
        return None
    if isinstance(item, bool) or not isinstance(item, int):
        raise _Invalid(WRONG_TYPE, key)
    if not 0 <= item <= 65535:
        raise _Invalid(BAD_FIELD, key)
    return item


def _bounded(text: str, key: str, limit: int) -> str:
    if len(text) > limit:
        raise _Invalid(TOO_LONG, f"{key} ({len(text)} characters)")
    return text


def check_value(
    data: bytes,
    node_id: str,
    trusted_keys: Sequence[Any] = (),
) -> Accepted | Rejected:
    """Check a value received on the ``bad_actors`` key and turn it into an event.

    :param data: the value's bytes, as the worker received them.
    :param node_id: this node's id; values claiming it are refused (:data:`OWN_NODE_ID`): they are
        our own puts coming back, or forgeries.
    :param trusted_keys: Ed25519 public keys (``--dht-trusted-nodes``); when not empty, only values
        signed by one of them are accepted.
    :returns: :class:`Accepted` or :class:`Rejected`; never raises.
    """
    event_uuid: str | None = None
    try:
        value = parse_json_object(data)
        node = _uuid(value, "created_by_node_id", BAD_NODE_ID)
        if node == node_id.lower():
            event_uuid = value.get("event_uuid") if is_uuid(value.get("event_uuid")) else None
            raise _Invalid(OWN_NODE_ID, node)
        event_uuid = _uuid(value, "event_uuid", BAD_EVENT_UUID)
        text = {key: _text(value, key) for key in ORIGINAL_KEYS}
        for key in _ADDED_TEXT_KEYS:
            if value.get(key) is not None and not isinstance(value[key], str):
                raise _Invalid(WRONG_TYPE, key)
        source_port = _port(value, "source_port")
        destination_port = _port(value, "destination_port")
        parse_status = value.get("parse_status", PARSE_OK)
        if parse_status is None:
            parse_status = PARSE_OK
        if not isinstance(parse_status, str):
            raise _Invalid(WRONG_TYPE, "parse_status")
        if parse_status not in PARSE_STATUSES:
            raise _Invalid(BAD_FIELD, f"parse_status {parse_status[:40]}")
        signature = value.get(signing.SIGNATURE_KEY)
        if signature is not None and not signing.is_signature_text(signature):
            raise _Invalid(BAD_SIGNATURE, "malformed")

        for key in _SHORT_KEYS:
            _bounded(text[key], key, MAX_SHORT_CHARS)
        for key in _LONG_KEYS:
            _bounded(text[key], key, MAX_FIELD_CHARS)
        auth = {}
        for key in _ADDED_TEXT_KEYS:
            auth[key] = or_not_found(_bounded(value.get(key) or "", key, MAX_FIELD_CHARS))
        timestamp = _timestamp(text["event_timestamp"])
        source_ip, split_source_port = _address(value, "source_ip")
        destination_ip, split_destination_port = _address(value, "destination_ip")
        if text["transport_type"] not in TRANSPORTS:
            raise _Invalid(BAD_FIELD, f"transport_type {text['transport_type'][:40]}")
        if text["collected_method"] not in COLLECTED_METHODS:
            raise _Invalid(BAD_FIELD, f"collected_method {text['collected_method'][:40]}")
        method = text["sip_method"]
        if method and method != NOT_FOUND and not _TOKEN.fullmatch(method):
            raise _Invalid(BAD_FIELD, f"sip_method {method[:40]}")

        if trusted_keys:
            if signature is None:
                raise _Invalid(UNSIGNED)
            if not signing.verify(trusted_keys, value):
                raise _Invalid(UNTRUSTED_SIGNATURE)
    except _Invalid as e:
        return Rejected(e.reason, e.detail, event_uuid)

    event = BadActorEvent(
        event_timestamp=timestamp,
        event_uuid=event_uuid,
        created_by_node_id=node,
        collected_method=text["collected_method"],
        transport_type=text["transport_type"],
        source_ip=source_ip,
        destination_ip=destination_ip,
        called_number=or_not_found(text["called_number"]),
        sip_method=or_not_found(method),
        sip_user_agent=or_not_found(text["sip_user_agent"]),
        sip_message=or_not_found(text["sip_message"]),
        source_port=source_port if source_port is not None else split_source_port,
        destination_port=destination_port if destination_port is not None else split_destination_port,
        parse_status=parse_status,
        auth_username=auth["auth_username"],
        auth_realm=auth["auth_realm"],
        sip_message_bytes=None,
        signature=signature,
    )
    return Accepted(event)


# ---------------------------------------------------------------------------------------------
# Encoding our own events


def encode_value(event: BadActorEvent, private_key: Any = None, cap: int = PUT_VALUE_CAP) -> bytes:
    """The bytes this node puts for *event*: its JSON (interface.md §3, the keys in that order,
    compact, UTF-8, as :func:`sentrypeer.eventlog.event_json`), plus ``signature`` when signing.

    A value that would be longer than *cap* bytes has its ``sip_message`` cut (at a character
    boundary, as short as needed) and ``parse_status`` set to ``truncated``; the signature covers
    the value as sent. The event itself is not changed.

    :param event: a collected event.
    :param private_key: an :class:`~cryptography.hazmat.primitives.asymmetric.ed25519.Ed25519PrivateKey`
        to sign with (``--dht-sign``), or ``None``.
    :param cap: the most bytes the value may have.
    :returns: the value bytes, at most *cap* long.
    :raises ValueError: *cap* is too small even for an empty ``sip_message``.
    """
    event = replace(event, signature=None)
    data = _encode(event, private_key)
    if len(data) <= cap:
        return data
    message = event.sip_message
    cut = replace(event, parse_status=PARSE_TRUNCATED)
    if len(_encode(replace(cut, sip_message=""), private_key)) > cap:
        raise ValueError(f"event does not fit in {cap} bytes even without its sip_message")
    # Binary search for the longest prefix that fits (each character takes 1 to 12 bytes in the
    # JSON, so the length alone does not tell); about 17 rounds for a 64 KiB message.
    low, high = 0, len(message)
    while low < high:
        middle = (low + high + 1) // 2
        if len(_encode(replace(cut, sip_message=message[:middle]), None, sign_size=private_key)) <= cap:
            low = middle
        else:
            high = middle - 1
    return _encode(replace(cut, sip_message=message[:low]), private_key)


def _encode(event: BadActorEvent, private_key: Any, sign_size: Any = None) -> bytes:
    if private_key is not None:
        body = event.to_json_dict()
        event = replace(event, signature=signing.sign(private_key, body))
    elif sign_size is not None:
        # Size estimate while searching: a signature always has the same length.
        event = replace(event, signature="A" * signing.SIGNATURE_B64_CHARS)
    return event_json(event)
