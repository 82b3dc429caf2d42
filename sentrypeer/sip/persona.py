"""Personas: what kind of PBX the honeypot pretends to be in responsive mode (``-r``).

Pure module (no Twisted import). A :class:`Persona` holds every value a reply takes from "the
product" rather than from the request: the ``Server`` or ``User-Agent`` header (RFC 3261 §20.35,
§20.41), the ``Allow``/``Supported``/``Accept`` lists of an OPTIONS answer (§11.2), the digest
realm and the look of nonces and To tags (§22.4, §19.3), the extensions that "exist" (a REGISTER
for one is challenged, for any other it is answered 404), and the final response to an INVITE.
Answering like a known product, rather than with one fixed string, is what keeps scanners talking
and what keeps the honeypot from being fingerprinted (reference §2.6, §14.8). No persona may
mention SentryPeer: any text matching "sentry", optional spaces, dots, hyphens or underscores, then
"peer" (case-insensitively, after NFKC normalisation) is refused. Every text value must be printable
(:meth:`str.isprintable`: no control, format, separator-other-than-space or unassigned character),
so no header a reply carries can be broken or hide anything; ``allow`` must not be empty.

Shipped personas (package data ``sentrypeer/sip/personas/<name>.toml``; the first is the default):

``freepbx``
    FreePBX 16 on Asterisk 18 with chan_pjsip: ``Server: FPBX-…``, pjsip's header order (Via,
    Call-ID, From, To, CSeq), realm ``asterisk``, ``timestamp/hex`` nonces with an ``opaque``, UUID
    To tags, extensions 100-105 and 200, INVITEs challenged with 401.
``freeswitch``
    FreeSWITCH 1.10 (mod_sofia): ``User-Agent: FreeSWITCH-mod_sofia/…`` on every response together
    with Allow and Supported, realm = the address that was probed, UUID nonces, 13-character To
    tags, the demo directory's extensions 1000-1019, INVITEs challenged with 407.
``kamailio``
    Kamailio 5.7 as a registrar and proxy: ``Server: kamailio (…)``, realm = the address that was
    probed, base64 nonces, ``<32 hex>.<hex>`` To tags (what ``sl_send_reply`` makes), extensions
    101-110 and 2001-2005, INVITEs challenged with 407.

A persona file (``--sip-persona /path/file.toml``) is a small TOML table with the keys below; with
``base = "<shipped name>"`` it only lists what differs. Unknown keys are an error.

============================= =================================================================
key                           meaning
============================= =================================================================
``name``                      label for logs (default: the file name without ``.toml``)
``agent_header``              ``"Server"`` or ``"User-Agent"``
``agent``                     that header's value
``allow``                     methods in ``Allow``, at least one (anything known but missing: 405)
``supported``                 option tags in ``Supported`` (a ``Require`` of anything else: 420)
``accept``                    media types in ``Accept`` (OPTIONS answers)
``accept_encoding``           ``Accept-Encoding`` value, ``""`` for none
``accept_language``           ``Accept-Language`` value, ``""`` for none
``allow_events``              event packages in ``Allow-Events``, ``[]`` for none
``allow_on_every_response``   also put Allow and Supported on every response (FreeSWITCH does)
``realm``                     digest realm; ``{address}`` stands for the address that was probed
``extensions``                ``["100-105", "200", "alice"]``: numeric ranges or exact user names
``invite_response``           ``401``, ``407``, ``404``, ``486``, ``603`` or ``"183-487"``
``invite_delay``              seconds between ``100 Trying`` and the next response (0 to 10)
``ringing_seconds``           seconds between ``183`` and ``487`` (0 to 60)
``nonce``                     ``"timestamped"``, ``"uuid"``, ``"hex"`` or ``"base64"``
``opaque``                    add an ``opaque`` parameter to challenges
``to_tag``                    ``"uuid"``, ``"alnum"`` or ``"hex-dot"``
``header_order``              order of the mirrored ``via``, ``from``, ``to``, ``call-id``, ``cseq``
============================= =================================================================
"""

from __future__ import annotations

import importlib.resources
import os
import re
import tomllib
import unicodedata
from dataclasses import dataclass

#: Shipped persona names, in order; the first one is the default.
SHIPPED = ("freepbx", "freeswitch", "kamailio")
DEFAULT = SHIPPED[0]

#: A persona file larger than this is refused before it is parsed.
MAX_FILE_BYTES = 64 * 1024
#: Bounds on the lists and strings of a persona.
MAX_LIST = 32
MAX_EXTENSIONS = 256
MAX_TEXT = 256

INVITE_RESPONSES = ("401", "407", "404", "486", "603", "183-487")
NONCE_STYLES = ("timestamped", "uuid", "hex", "base64")
TAG_STYLES = ("uuid", "alnum", "hex-dot")
AGENT_HEADERS = ("Server", "User-Agent")
MIRRORED = ("via", "from", "to", "call-id", "cseq")

_TOKEN = re.compile(r"[A-Za-z0-9.!%*_+`'~-]+\Z")
_MEDIA_TYPE = re.compile(r"[A-Za-z0-9.!%*_+`'~-]+/[A-Za-z0-9.!%*_+`'~-]+(\s*;\s*[^,\s;][^,;]*)*\Z")
_RANGE = re.compile(r"([0-9]{1,20})(?:-([0-9]{1,20}))?\Z")
_USER = re.compile(r"[A-Za-z0-9._+~!*'()&=$-]{1,64}\Z")
#: "SentryPeer" however spelt: Sentry Peer, sentry-peer, SENTRY_PEER, sentry.peer...
_HONEYPOT_NAME = re.compile(r"sentry[ ._-]*peer", re.IGNORECASE)


class PersonaError(ValueError):
    """A persona cannot be used; the message is one line naming the setting or file and why."""


@dataclass(frozen=True)
class Persona:
    """One PBX personality for responsive replies (see the module docstring for each field).

    Build with :func:`persona_from_mapping`, :func:`shipped_persona` or :func:`load_persona`,
    which validate every value; instances are immutable.

    :ivar extension_ranges: numeric extensions as inclusive ``(low, high)`` pairs.
    :ivar extension_names: non-numeric (or exact) extension user names.
    """

    name: str
    agent_header: str
    agent: str
    allow: tuple[str, ...]
    supported: tuple[str, ...]
    accept: tuple[str, ...]
    accept_encoding: str
    accept_language: str
    allow_events: tuple[str, ...]
    allow_on_every_response: bool
    realm: str
    extension_ranges: tuple[tuple[int, int], ...]
    extension_names: frozenset[str]
    invite_response: str
    invite_delay: float
    ringing_seconds: float
    nonce: str
    opaque: bool
    to_tag: str
    header_order: tuple[str, ...]

    def has_extension(self, user: str | None) -> bool:
        """Whether extension *user* "exists" on this PBX.

        Numeric users match a range only in their canonical form (``"0100"`` is not ``100``), as
        a dial plan would; other users must be listed exactly (case-sensitive, RFC 3261 §19.1.4).
        """
        if not user:
            return False
        if user in self.extension_names:
            return True
        if user.isascii() and user.isdigit() and len(user) <= 20 and str(int(user)) == user:
            number = int(user)
            return any(low <= number <= high for low, high in self.extension_ranges)
        return False

    def realm_for(self, address: str) -> str:
        """The digest realm (RFC 3261 §22.1) when the request was sent to *address*."""
        return self.realm.replace("{address}", address)

    @property
    def invite_final(self) -> int:
        """Status code of the final response to an unauthenticated INVITE."""
        return 487 if self.invite_response == "183-487" else int(self.invite_response)

    @property
    def invite_early(self) -> int | None:
        """Status code sent between ``100 Trying`` and the final response, or ``None``."""
        return 183 if self.invite_response == "183-487" else None


def _fail(where: str, message: str) -> PersonaError:
    return PersonaError(f"{where}: {message}")


def _text(where: str, key: str, value, *, empty: bool = False, limit: int = MAX_TEXT) -> str:
    if not isinstance(value, str):
        raise _fail(where, f"{key} must be a string")
    if not value and not empty:
        raise _fail(where, f"{key} must not be empty")
    if len(value) > limit:
        raise _fail(where, f"{key} is longer than {limit} characters")
    if not value.isprintable():
        # Control characters (C0, DEL, C1 such as U+0085), line/paragraph separators (U+2028,
        # U+2029), format characters and any space other than U+0020: none belongs in a header.
        raise _fail(where, f"{key} contains a non-printable or control character")
    if _HONEYPOT_NAME.search(unicodedata.normalize("NFKC", value)):
        raise _fail(where, f"{key} must not name the honeypot")
    return value


def _list(
    where: str, key: str, value, pattern: re.Pattern, what: str, *, empty: bool = True
) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise _fail(where, f"{key} must be a list of strings")
    if not value and not empty:
        raise _fail(where, f"{key} must not be empty")
    if len(value) > MAX_LIST:
        raise _fail(where, f"{key} has more than {MAX_LIST} entries")
    out = []
    for item in value:
        item = _text(where, key, item, limit=128)
        if not pattern.match(item):
            raise _fail(where, f"{key}: {item!r} is not {what}")
        out.append(item)
    return tuple(out)


def _number(where: str, key: str, value, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _fail(where, f"{key} must be a number")
    if not low <= value <= high:
        raise _fail(where, f"{key} must be between {low:g} and {high:g}")
    return float(value)


def _choice(where: str, key: str, value, choices: tuple[str, ...]) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if value not in choices:
        raise _fail(where, f"{key} must be one of {', '.join(choices)}")
    return value


def _flag(where: str, key: str, value) -> bool:
    if not isinstance(value, bool):
        raise _fail(where, f"{key} must be true or false")
    return value


def _extensions(where: str, value) -> tuple[tuple[tuple[int, int], ...], frozenset[str]]:
    if not isinstance(value, list):
        raise _fail(where, "extensions must be a list of strings")
    if len(value) > MAX_EXTENSIONS:
        raise _fail(where, f"extensions has more than {MAX_EXTENSIONS} entries")
    ranges, names = [], set()
    for item in value:
        if isinstance(item, int) and not isinstance(item, bool):
            item = str(item)
        if not isinstance(item, str):
            raise _fail(where, "extensions must be a list of strings")
        match = _RANGE.match(item)
        if match:
            low = int(match.group(1))
            high = int(match.group(2)) if match.group(2) is not None else low
            if low > high:
                raise _fail(where, f"extensions: empty range {item!r}")
            ranges.append((low, high))
        elif _USER.match(item):
            names.add(item)
        else:
            raise _fail(where, f"extensions: {item!r} is neither N, N-M nor a user name")
    return tuple(ranges), frozenset(names)


_KEYS = (
    "name", "agent_header", "agent", "allow", "supported", "accept", "accept_encoding",
    "accept_language", "allow_events", "allow_on_every_response", "realm", "extensions",
    "invite_response", "invite_delay", "ringing_seconds", "nonce", "opaque", "to_tag",
    "header_order",
)


def persona_from_mapping(data: dict, where: str = "persona") -> Persona:
    """Validate a complete persona table (every key of the module docstring but ``base``).

    :param data: the decoded TOML table.
    :param where: names the source in error messages (a file path or a shipped name).
    :raises PersonaError: on a missing, unknown or invalid key (one line).
    """
    unknown = sorted(set(data) - set(_KEYS))
    if unknown:
        raise _fail(where, f"unknown key {unknown[0]!r}")
    missing = [key for key in _KEYS if key not in data]
    if missing:
        raise _fail(where, f"missing key {missing[0]!r}")
    realm = _text(where, "realm", data["realm"], limit=128)
    if '"' in realm or "\\" in realm:
        raise _fail(where, "realm must not contain quotes or backslashes")
    order = data["header_order"]
    if not isinstance(order, list) or sorted(order) != sorted(MIRRORED):
        raise _fail(where, "header_order must list via, from, to, call-id and cseq once each")
    ranges, names = _extensions(where, data["extensions"])
    # An empty Allow would make every known method 405 and OPTIONS list nothing (RFC 3261 §20.5).
    allow = _list(where, "allow", data["allow"], _TOKEN, "a method token", empty=False)
    return Persona(
        name=_text(where, "name", data["name"], limit=64),
        agent_header=_choice(where, "agent_header", data["agent_header"], AGENT_HEADERS),
        agent=_text(where, "agent", data["agent"]),
        allow=allow,
        supported=_list(where, "supported", data["supported"], _TOKEN, "an option tag"),
        accept=_list(where, "accept", data["accept"], _MEDIA_TYPE, "a media type"),
        accept_encoding=_text(where, "accept_encoding", data["accept_encoding"], empty=True),
        accept_language=_text(where, "accept_language", data["accept_language"], empty=True),
        allow_events=_list(where, "allow_events", data["allow_events"], _TOKEN, "an event package"),
        allow_on_every_response=_flag(where, "allow_on_every_response",
                                      data["allow_on_every_response"]),
        realm=realm,
        extension_ranges=ranges,
        extension_names=names,
        invite_response=_choice(where, "invite_response", data["invite_response"],
                                INVITE_RESPONSES),
        invite_delay=_number(where, "invite_delay", data["invite_delay"], 0, 10),
        ringing_seconds=_number(where, "ringing_seconds", data["ringing_seconds"], 0, 60),
        nonce=_choice(where, "nonce", data["nonce"], NONCE_STYLES),
        opaque=_flag(where, "opaque", data["opaque"]),
        to_tag=_choice(where, "to_tag", data["to_tag"], TAG_STYLES),
        header_order=tuple(order),
    )


def _shipped_table(name: str) -> dict:
    resource = importlib.resources.files("sentrypeer.sip").joinpath("personas", f"{name}.toml")
    with resource.open("rb") as f:
        return tomllib.load(f)


def shipped_persona(name: str = DEFAULT) -> Persona:
    """One of the :data:`SHIPPED` personas.

    :raises PersonaError: for another name.
    """
    if name not in SHIPPED:
        raise PersonaError(f"unknown persona {name!r} (shipped: {', '.join(SHIPPED)})")
    return persona_from_mapping(_shipped_table(name), name)


def load_persona(path: str) -> Persona:
    """Read a persona TOML file (optionally ``base = "<shipped name>"`` plus overrides).

    :raises PersonaError: when the file cannot be read, is too large, is not TOML or holds an
        invalid value; the message is one line starting with the path.
    """
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_FILE_BYTES + 1)
    except OSError as e:
        raise _fail(path, e.strerror or str(e)) from None
    if len(raw) > MAX_FILE_BYTES:
        raise _fail(path, f"larger than {MAX_FILE_BYTES} bytes")
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise _fail(path, "not UTF-8 text") from None
    except tomllib.TOMLDecodeError as e:
        raise _fail(path, " ".join(str(e).split())) from None
    base = data.pop("base", None)
    data.setdefault("name", os.path.splitext(os.path.basename(path))[0] or "custom")
    if base is not None:
        if base not in SHIPPED:
            raise _fail(path, f"base must be one of {', '.join(SHIPPED)}")
        merged = _shipped_table(base)
        merged.update(data)
        data = merged
    return persona_from_mapping(data, path)


def resolve_persona(value: str | None) -> Persona:
    """The persona ``--sip-persona`` asks for: a shipped name, a TOML file, or the default.

    Meant to be called once at start-up, so that a bad value stops the program with one line.

    :param value: the setting as given (``None`` or empty for the default).
    :raises PersonaError: ``--sip-persona: …`` naming the value and what is wrong.
    """
    if not value:
        return shipped_persona(DEFAULT)
    if value in SHIPPED:
        return shipped_persona(value)
    if not os.path.exists(value):
        raise PersonaError(
            f"--sip-persona: {value!r} is neither a shipped persona ({', '.join(SHIPPED)}) "
            "nor an existing TOML file"
        )
    try:
        return load_persona(value)
    except PersonaError as e:
        raise PersonaError(f"--sip-persona: {e}") from None


__all__ = [
    "DEFAULT",
    "SHIPPED",
    "Persona",
    "PersonaError",
    "load_persona",
    "persona_from_mapping",
    "resolve_persona",
    "shipped_persona",
]
