"""Build the replies of responsive mode (``-r``): a stateless RFC 3261 UAS that looks like a PBX.

Pure module: no Twisted import, no I/O, no clock and no randomness of its own (time, entropy and the
To-tag secret are passed in). The Twisted side, :mod:`sentrypeer.sip.responder`, decides when to send
(timers, CANCEL, rate limits); this module decides *what*.

Every reply (RFC 3261 §8.2.6) copies the request's Via values in order, with ``received`` and
``rport`` added to the top one (§18.2.1, RFC 3581 §4), and its From, To, Call-ID and CSeq; adds a To
tag when the request had none (§8.2.6.2; stable per dialog, so the reply to a CANCEL carries the
INVITE's tag, §9.2); names the product in ``Server`` or ``User-Agent`` (§20.35, §20.41); ends with
``Content-Length: 0`` and an empty line (§7.5, §20.14). The reply goes to the packet's source
address and port, never to the Via sent-by (§18.2.2 with RFC 3581 §4), which is the caller's job.

What is answered (:func:`decide`, in the order of RFC 3261 §8.2):

=================================== ==============================================================
request                             reply
=================================== ==============================================================
any response, any ACK               nothing (§17.1.1.3: ACK has no response)
missing Via/From/To/Call-ID/CSeq    nothing (no reply can be matched by the client, §8.1.1)
one that cannot be copied exactly   nothing (see "Mirrored values" below)
malformed                           400 Bad Request (§21.4.1); another SIP version: 505 (§21.5.6)
unknown method                      501 Not Implemented (§8.2.1, §21.5.2)
known method the persona lacks      405 Method Not Allowed with Allow (§8.2.1, §21.4.6)
CANCEL                              200, then 487 for the pending INVITE; 200 alone when the
                                    INVITE was answered already (its transaction lives 32 s more,
                                    §17.2.1); 481 when no INVITE transaction matches (§9.2)
To tag (no such dialog)             481 Call/Transaction Does Not Exist (§12.2.2)
Require of an unsupported option    420 Bad Extension with Unsupported (§8.2.2.3, §21.4.15)
OPTIONS                             200 with Allow, Accept, Supported... (§11.2)
REGISTER                            401 + WWW-Authenticate for an extension the persona has,
                                    404 for any other (§10.3, §22.4); with credentials: 403
INVITE                              100 Trying (§17.2.1), then the persona's final response: 401 or
                                    407 challenge, 404, 486, 603, or 183 then 487 (§21.4.25);
                                    with credentials: 403 (§21.4.4)
SUBSCRIBE, PUBLISH, MESSAGE, REFER  401 challenge (§22.1); with credentials: 403
BYE, INFO, UPDATE, PRACK, NOTIFY    481 (§15.1.2, §12.2.2: they only exist inside a dialog)
=================================== ==============================================================

Digest challenges follow RFC 3261 §22.4 and RFC 2617 §3.2.1 (realm, a fresh nonce, ``algorithm=MD5``,
``qop="auth"``). No 487 carries a ``Reason`` header: RFC 3326 §2 allows it only in responses whose
status code says so. A reply larger than :data:`MAX_REPLY_BYTES` is never built.

Mirrored values. RFC 3261 §8.2.6.2 wants the Via, From, Call-ID and CSeq of a response (and To,
but for its tag) *equal* to the request's: that is how the client matches the response to its
transaction (§17.1.3, §8.1.3.3). Header values reach this module as the parser's readable text
(:func:`sentrypeer.events.readable`): valid UTF-8 round-trips exactly, but bytes that are not UTF-8
come back as ``\\xNN`` text. So a request qualifies for a reply (:func:`replyable`) only when every
value a reply must copy can be written back unchanged and safely:

- no control character but HTAB (a NUL, a bare CR or LF, ESC, DEL...): §25.1 allows none of them
  in those headers (outside a quoted-pair), so such a request is malformed and would earn a 400
  (§21.4.1), but that 400 would have to carry them. Writing them back makes a reply that can break
  or inject lines in the client's parser; replacing them makes a reply the client cannot match. So
  nothing is sent (like a request without Via, which §8.1.1 makes unanswerable). Printable
  non-ASCII UTF-8 (even U+0085 or U+2028, allowed by ``UTF8-NONASCII`` in quoted strings) is copied
  byte for byte;
- no text that stood for bytes that are not UTF-8: with the request's exact bytes at hand
  (``raw``) a ``\\xNN`` is copied only when the header block was valid UTF-8 (so the request
  really held those four characters); otherwise nothing is sent, for the same reason;
- at least one non-empty Via value: empty comma-separated values (``Via: a;;,;,,`` gives ``a;;``
  and ``;``) and values without a sent-protocol and sent-by are skipped, never mirrored as an
  invalid ``Via: ;`` line; the first remaining one is the top Via;
- a top Via whose parameters can be read (a quote that never closes hides whether ``rport`` was
  asked for, RFC 3581 §4, so nothing is sent); folded lines arrive unfolded and are fine;
- no Via or header past the parser's bounds (:data:`~sentrypeer.sip.message.MAX_VIAS`,
  :data:`~sentrypeer.sip.message.MAX_HEADERS`), which would silently drop Via values.

Optional copies (Record-Route on a 183, Timestamp on a 100, the option tags of Unsupported) that
fail the same test are left out rather than altered. A request whose copied values pass but which
is otherwise malformed still gets its 400.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import ipaddress
import re
import uuid
from dataclasses import dataclass
from urllib.parse import unquote

from sentrypeer.events import PARSE_MALFORMED
from sentrypeer.sip.message import MAX_HEADERS, MAX_VIAS, SIPMessage
from sentrypeer.sip.persona import Persona

#: No reply is ever longer than this many bytes (a datagram that needs no fragmentation on most
#: paths is ~1,400 bytes; mirrored Via headers can make a legitimate reply a few KiB).
MAX_REPLY_BYTES = 8192
#: Bytes of fresh randomness a :class:`ReplyContext` needs for a challenge (nonce and opaque).
ENTROPY_BYTES = 32

#: Methods of RFC 3261 §27.4 and the RFCs that registered the others (3262, 3265, 3311, 3428, 3515,
#: 3903, 6086). Method names are case-sensitive (§7.1).
KNOWN_METHODS = frozenset(
    ("INVITE", "ACK", "BYE", "CANCEL", "REGISTER", "OPTIONS", "PRACK", "SUBSCRIBE", "NOTIFY",
     "PUBLISH", "INFO", "REFER", "MESSAGE", "UPDATE")
)
#: Requests that only make sense inside a dialog: without one they get 481 (§12.2.2).
IN_DIALOG_ONLY = frozenset(("BYE", "INFO", "UPDATE", "PRACK", "NOTIFY"))
#: Out-of-dialog requests a PBX authenticates like REGISTER (§22.1).
CHALLENGED = frozenset(("SUBSCRIBE", "PUBLISH", "MESSAGE", "REFER"))

#: Reason phrases (RFC 3261 §21; 183 from §21.1.5; the phrases real PBXs send).
REASONS = {
    100: "Trying",
    183: "Session Progress",
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    407: "Proxy Authentication Required",
    420: "Bad Extension",
    481: "Call/Transaction Does Not Exist",
    486: "Busy Here",
    487: "Request Terminated",
    501: "Not Implemented",
    505: "Version Not Supported",
    603: "Decline",
}

WWW_AUTHENTICATE = "WWW-Authenticate"
PROXY_AUTHENTICATE = "Proxy-Authenticate"

#: :attr:`Decision.kind` values.
NOTHING = "nothing"
REPLY = "reply"
INVITE = "invite"
CANCEL = "cancel"

_ALNUM = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
_SENT_BY = re.compile(r"\s*SIP\s*/\s*[^/\s]+\s*/\s*\S+\s+(.*)\Z", re.DOTALL | re.IGNORECASE)
_VERSION = re.compile(r"SIP/[0-9]+\.[0-9]+\Z", re.IGNORECASE)
_THIS_NETWORK = ipaddress.ip_network("0.0.0.0/8")
#: Characters never written into a reply: the C0 controls but HTAB, and DEL.
_UNSAFE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
#: What :func:`sentrypeer.events.readable` writes for a byte that is not UTF-8.
_ESCAPED = re.compile(r"\\x[0-9a-f]{2}")


@dataclass(frozen=True, slots=True)
class Decision:
    """What to answer to one request (the result of :func:`decide`).

    :ivar kind: :data:`NOTHING`, :data:`REPLY` (one response, *status*), :data:`INVITE` (100
        Trying now, then *early* if set, then *status*) or :data:`CANCEL` (*status* 200 to the
        CANCEL and 487 to its INVITE if still pending, or 481 when no INVITE transaction
        matches; the responder knows which).
    :ivar challenge: :data:`WWW_AUTHENTICATE` or :data:`PROXY_AUTHENTICATE` when *status* is a
        digest challenge.
    :ivar unsupported: option tags for the ``Unsupported`` header of a 420.
    """

    kind: str
    status: int = 0
    early: int | None = None
    challenge: str | None = None
    unsupported: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ReplyContext:
    """Where a request came from and went to, and the per-request values a reply needs.

    :ivar source: ``(address, port)`` of the packet's sender, the address in canonical form.
    :ivar local: ``(address, port)`` the request was received on (Contact, ``{address}`` realm).
    :ivar transport: ``UDP``, ``TCP`` or ``TLS``.
    :ivar to_tag: the To tag of this dialog (:func:`make_to_tag`).
    :ivar now: seconds since the epoch (timestamped nonces).
    :ivar entropy: at least :data:`ENTROPY_BYTES` random bytes (nonce and opaque).
    :ivar raw: the request's exact bytes when known (see :func:`copyable`).
    """

    source: tuple[str, int]
    local: tuple[str, int]
    transport: str
    to_tag: str
    now: float = 0.0
    entropy: bytes = bytes(ENTROPY_BYTES)
    raw: bytes | None = None


@functools.lru_cache(maxsize=4096)
def can_reply_to(host: str, port: int) -> bool:
    """Whether a reply may be sent to ``(host, port)`` at all.

    Never to port 0, an unspecified, multicast or broadcast address, or IPv4's "this network"
    (0.0.0.0/8) and reserved 240.0.0.0/4 blocks (RFC 1122 §3.2.1.3: such sources are invalid;
    answering them would only reflect traffic). Subnet-directed broadcasts are refused by the
    kernel itself (no ``SO_BROADCAST``). IPv4-mapped IPv6 addresses are judged as IPv4.

    :param host: address text as the socket layer reports it (scope id allowed).
    :param port: UDP or TCP port.
    """
    if not 0 < port < 65536:
        return False
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_unspecified or ip.is_multicast:
        return False
    if isinstance(ip, ipaddress.IPv4Address) and (ip in _THIS_NETWORK or ip.is_reserved):
        return False
    return True


def _header_block_is_utf8(raw: bytes) -> bool:
    """Whether the start line and header fields of *raw* are valid UTF-8 (the body may not be)."""
    ends = [i for i in (raw.find(b"\r\n\r\n"), raw.find(b"\n\n")) if i >= 0]
    try:
        raw[: min(ends)].decode("utf-8") if ends else raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def copyable(value: str, raw: bytes | None = None) -> bool:
    """Whether the received header value *value* (readable text) can be written into a reply
    exactly as it was received (see "Mirrored values" in the module docstring).

    :param raw: the request's exact bytes; without them a ``\\xNN`` in *value* is assumed to
        stand for a byte that was not UTF-8.
    """
    if _UNSAFE.search(value):
        return False
    if "\\x" in value and _ESCAPED.search(value):
        return raw is not None and _header_block_is_utf8(raw)
    return True


def _split_params(value: str) -> list[str] | None:
    """Split a Via value on ``;`` outside quoted strings; ``None`` when a quote never closes."""
    if '"' not in value:
        return value.split(";")
    pieces, start, quoted, escaped = [], 0, False, False
    for i, c in enumerate(value):
        if escaped:
            escaped = False
        elif quoted and c == "\\":
            escaped = True
        elif c == '"':
            quoted = not quoted
        elif c == ";" and not quoted:
            pieces.append(value[start:i])
            start = i + 1
    if quoted:
        return None
    pieces.append(value[start:])
    return pieces


def _empty_via(value: str) -> bool:
    """A Via value with nothing before its parameters (``;``, ``;branch=x``): not a via-parm."""
    return not value.partition(";")[0].strip()


def mirrored_vias(message: SIPMessage, raw: bytes | None = None) -> list[str] | None:
    """The Via values a reply copies, in order, the first being the top one (RFC 3261 §8.2.6.2):
    the request's, without empty ones; ``None`` when none remains or they cannot be copied
    exactly (module docstring, "Mirrored values").

    :param raw: the request's exact bytes (see :func:`copyable`).
    """
    if len(message.vias) >= MAX_VIAS or len(message.headers) >= MAX_HEADERS:
        return None  # the parser may have left some Via values out
    vias = [v for v in message.vias if not _empty_via(v)]
    if not vias or _split_params(vias[0]) is None:
        return None
    for value in vias:
        if not copyable(value, raw):
            return None
    return vias


def _split_outside_quotes(value: str, sep: str) -> list[str]:
    """Split *value* on *sep* outside double-quoted strings (RFC 3261 §25.1 quoted-pair aware)."""
    if '"' not in value:
        return value.split(sep)
    pieces, start, quoted, escaped = [], 0, False, False
    for i, c in enumerate(value):
        if escaped:
            escaped = False
        elif quoted and c == "\\":
            escaped = True
        elif c == '"':
            quoted = not quoted
        elif c == sep and not quoted:
            pieces.append(value[start:i])
            start = i + 1
    pieces.append(value[start:])
    return pieces


def _address_parts(value: str) -> tuple[str | None, str]:
    """Split a To/From/Contact value into its URI and its header parameters (RFC 3261 §20.10).

    :returns: ``(uri, params)`` where *params* is the text from the first header-parameter ``;``
        (empty when none); *uri* is ``None`` when a quoted display name never closes.
    """
    i, n = 0, len(value)
    while i < n and value[i] in " \t":
        i += 1
    if i < n and value[i] == '"':
        i += 1
        while i < n and value[i] != '"':
            i += 2 if value[i] == "\\" else 1
        if i >= n:
            return None, ""
        i += 1
    lt = value.find("<", i)
    if lt >= 0:
        gt = value.find(">", lt + 1)
        if gt < 0:
            return value[lt + 1 :], ""
        return value[lt + 1 : gt], value[gt + 1 :]
    semi = value.find(";", i)
    if semi < 0:
        return value[i:].strip(), ""
    return value[i:semi].strip(), value[semi:]


def header_param(value: str | None, name: str) -> str | None:
    """Value of header parameter *name* (``tag``...) of a To/From value, or ``None``.

    A parameter without ``=`` gives ``""``; names compare case-insensitively (RFC 3261 §7.3.1).
    """
    if not value:
        return None
    _, params = _address_parts(value)
    for piece in _split_outside_quotes(params, ";")[1:]:
        key, eq, val = piece.partition("=")
        if key.strip().lower() == name:
            return val.strip() if eq else ""
    return None


def to_user(message: SIPMessage) -> str | None:
    """The user part of the To URI (a REGISTER's address of record, RFC 3261 §10.2.1),
    percent-decoded (§19.1.2), password removed; the number of a ``tel:`` URI (RFC 3966)."""
    uri, _ = _address_parts(message.header("to") or "")
    if not uri:
        return None
    scheme, colon, rest = uri.strip().partition(":")
    if not colon:
        return None
    scheme = scheme.lower()
    if scheme in ("sip", "sips"):
        user, at, _ = rest.partition("@")
        if not at:
            return None
        return unquote(user.partition(":")[0]) or None
    if scheme == "tel":
        return unquote(rest.partition(";")[0].strip()) or None
    return None


_COPIED = ("from", "to", "call-id", "cseq")


def replyable(message: SIPMessage, raw: bytes | None = None) -> bool:
    """Whether a response the client can match can be built: a request with a Via, From, To,
    Call-ID and CSeq (RFC 3261 §8.1.1 mandatory header fields, §8.2.6.2 copied ones), all of
    which can be copied exactly (module docstring, "Mirrored values").

    :param raw: the request's exact bytes (see :func:`copyable`).
    """
    if not message.is_request:
        return False
    for name in _COPIED:
        value = message.header(name)
        if not value or not copyable(value, raw):
            return False
    return mirrored_vias(message, raw) is not None


def _has_credentials(message: SIPMessage) -> bool:
    return bool(message.header("authorization") or message.header("proxy-authorization"))


def _required(message: SIPMessage) -> list[str]:
    tags = []
    for value in message.header_all("require"):
        for tag in value.split(","):
            tag = tag.strip()
            if tag and tag not in tags:
                tags.append(tag)
    return tags[:32]


def decide(message: SIPMessage, persona: Persona, *, raw: bytes | None = None) -> Decision:
    """Choose the answer to *message* (the table of the module docstring).

    :param message: a parsed message (responses get :data:`NOTHING`).
    :param persona: the PBX being imitated.
    :param raw: the exact bytes received, if known (see :func:`copyable`).
    """
    if not message.is_request or message.method == "ACK" or not replyable(message, raw):
        return Decision(NOTHING)
    if message.parse_status == PARSE_MALFORMED:
        if _VERSION.match(message.version) and message.version.upper() != "SIP/2.0":
            return Decision(REPLY, 505)
        return Decision(REPLY, 400)
    method = message.method
    if method not in KNOWN_METHODS:
        return Decision(REPLY, 501)
    if method not in persona.allow:
        return Decision(REPLY, 405)
    if method == "CANCEL":
        return Decision(CANCEL, 200)
    if header_param(message.header("to"), "tag") is not None:
        return Decision(REPLY, 481)
    unsupported = tuple(tag for tag in _required(message) if tag not in persona.supported)
    if unsupported:
        return Decision(REPLY, 420, unsupported=unsupported)
    if method == "OPTIONS":
        return Decision(REPLY, 200)
    credentials = _has_credentials(message)
    if method == "REGISTER":
        if credentials:
            return Decision(REPLY, 403)
        if persona.has_extension(to_user(message)):
            return Decision(REPLY, 401, challenge=WWW_AUTHENTICATE)
        return Decision(REPLY, 404)
    if method == "INVITE":
        if credentials:
            return Decision(INVITE, 403)
        final = persona.invite_final
        challenge = {401: WWW_AUTHENTICATE, 407: PROXY_AUTHENTICATE}.get(final)
        return Decision(INVITE, final, early=persona.invite_early, challenge=challenge)
    if method in CHALLENGED:
        if credentials:
            return Decision(REPLY, 403)
        return Decision(REPLY, 401, challenge=WWW_AUTHENTICATE)
    return Decision(REPLY, 481)


def make_to_tag(secret: bytes, message: SIPMessage, style: str) -> str:
    """A To tag (RFC 3261 §19.3) that is the same for every response in one dialog.

    Derived with HMAC-SHA-256 from the Call-ID and the From tag (what identifies the dialog on the
    caller's side, §12), so retransmissions, the 100/183/final responses of one INVITE and the
    answer to its CANCEL all carry the same tag, while no two calls share one and nothing about
    the secret leaks.

    :param secret: per-process random key.
    :param style: ``uuid`` (pjsip), ``alnum`` (13 characters, sofia-sip) or ``hex-dot``
        (``<32 hex>.<4 hex>``, Kamailio's stateless replies).
    """
    from_tag = header_param(message.header("from"), "tag") or ""
    call_id = message.header("call-id") or ""
    digest = hmac.new(secret, f"{call_id}\x00{from_tag}".encode("utf-8", "replace"),
                      hashlib.sha256).digest()
    if style == "alnum":
        return "".join(_ALNUM[b % len(_ALNUM)] for b in digest[:13])
    if style == "hex-dot":
        return digest[:16].hex() + "." + digest[16:18].hex()
    return str(uuid.UUID(bytes=digest[:16], version=4))


def make_nonce(style: str, entropy: bytes, now: float) -> str:
    """A fresh digest nonce (RFC 2617 §3.2.1) in the persona's style.

    :param style: ``timestamped`` (``<seconds>/<32 hex>``, Asterisk), ``uuid`` (FreeSWITCH),
        ``hex`` or ``base64`` (Kamailio-like).
    :param entropy: at least 16 random bytes (only the first 24 are used).
    :param now: seconds since the epoch.
    """
    if style == "timestamped":
        return "%d/%s" % (int(now), entropy[:16].hex())
    if style == "uuid":
        return str(uuid.UUID(bytes=entropy[:16], version=4))
    if style == "base64":
        return base64.b64encode(entropy[:24]).decode("ascii")
    return entropy[:16].hex()


def digest_challenge(realm: str, nonce: str, opaque: str | None = None) -> str:
    """The value of a ``WWW-Authenticate``/``Proxy-Authenticate`` header (RFC 3261 §22.4,
    §20.44, §20.27; RFC 2617 §3.2.1): ``Digest realm=..., nonce=..., algorithm=MD5, qop="auth"``."""
    parts = [f'realm="{realm}"', f'nonce="{nonce}"']
    if opaque:
        parts.append(f'opaque="{opaque}"')
    parts += ["algorithm=MD5", 'qop="auth"']
    return "Digest " + ", ".join(parts)


def _same_address(host: str, address: str) -> bool:
    try:
        a = ipaddress.ip_address(host.strip("[]").split("%", 1)[0])
        b = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(a, ipaddress.IPv6Address) and a.ipv4_mapped is not None:
        a = a.ipv4_mapped
    if isinstance(b, ipaddress.IPv6Address) and b.ipv4_mapped is not None:
        b = b.ipv4_mapped
    return a == b


def _sent_by_host(sent: str) -> str | None:
    match = _SENT_BY.match(sent)
    if not match:
        return None
    sent_by = match.group(1).strip()
    if sent_by.startswith("["):
        end = sent_by.find("]")
        return sent_by[: end + 1] if end > 0 else sent_by
    return sent_by.partition(":")[0].strip()


def rewrite_top_via(via: str, source: tuple[str, int]) -> str | None:
    """The top Via value of a response (RFC 3261 §18.2.1, RFC 3581 §4).

    ``received`` is added when the sent-by host is not the packet's source address (a domain
    name counts as different) or when the client asked for ``rport``; an ``rport`` parameter gets
    the source port as its value. Any ``received`` the client wrote itself is replaced, and empty
    parameters (``;;``) are dropped.

    :param via: the request's top Via value.
    :param source: the packet's ``(address, port)``.
    :returns: the new value, or ``None`` when the parameters cannot be read (a quoted string
        never closes, so whether ``rport`` was asked for is unknown).
    """
    host, port = source
    pieces = _split_params(via)
    if pieces is None:
        return None
    out = [pieces[0]]
    rport = False
    for piece in pieces[1:]:
        name = piece.partition("=")[0].strip().lower()
        if not piece.strip() or name == "received":
            continue
        if name == "rport":
            rport = True
            out.append(f"rport={port}")
        else:
            out.append(piece)
    sent_host = _sent_by_host(pieces[0])
    if rport or sent_host is None or not _same_address(sent_host, host):
        out.append(f"received={host}")
    return ";".join(out)


def _uri_host(address: str) -> str:
    return f"[{address}]" if ":" in address else address


def _contact(context: ReplyContext) -> str:
    host, port = context.local
    transport = context.transport.lower()
    suffix = "" if transport == "udp" else f";transport={transport}"
    return f"<sip:{_uri_host(host)}:{port}{suffix}>"


def build_response(
    message: SIPMessage,
    status: int,
    persona: Persona,
    context: ReplyContext,
    *,
    challenge: str | None = None,
    unsupported: tuple[str, ...] = (),
) -> bytes | None:
    """Serialise the response *status* to *message* (RFC 3261 §8.2.6, §7.2).

    Header order: the mirrored headers in the persona's order (all Via values, each on its own
    line; From; To with our tag unless the request had one or this is a 100, §8.2.6.2; Call-ID;
    CSeq), then Record-Route for a 18x/2xx to INVITE (§12.1.1), Timestamp for a 100 (§8.2.6.1),
    Contact for a 18x/2xx (§12.1.1, §11.2), the digest challenge, Unsupported, the product's
    Server/User-Agent, Allow (405 and OPTIONS, §21.4.6, §11.2), Supported/Accept/Accept-Encoding/
    Accept-Language/Allow-Events (OPTIONS), Content-Length: 0, the empty line.

    :param message: the request (must satisfy :func:`replyable`).
    :param status: a code of :data:`REASONS`.
    :param challenge: :data:`WWW_AUTHENTICATE` or :data:`PROXY_AUTHENTICATE` to add a challenge
        with a nonce made from ``context.entropy``.
    :param unsupported: option tags for a 420's ``Unsupported`` header.
    :returns: the bytes, or ``None`` when they would exceed :data:`MAX_REPLY_BYTES` or the values
        to copy cannot be copied exactly (module docstring, "Mirrored values").
    """
    raw = context.raw
    invite = message.method == "INVITE"
    dialog_response = invite and 101 <= status < 300
    options_ok = message.method == "OPTIONS" and status == 200
    copied = {}
    for name in _COPIED:
        value = message.header(name)
        if not value or not copyable(value, raw):
            return None
        copied[name] = value
    to = copied["to"]
    if status != 100 and header_param(to, "tag") is None:
        to = f"{to};tag={context.to_tag}"
    vias = mirrored_vias(message, raw)
    if vias is None:
        return None
    top = rewrite_top_via(vias[0], context.source)
    if top is None:
        return None
    vias[0] = top
    mirrored = {
        "via": [("Via", v) for v in vias],
        "from": [("From", copied["from"])],
        "to": [("To", to)],
        "call-id": [("Call-ID", copied["call-id"])],
        "cseq": [("CSeq", copied["cseq"])],
    }
    headers: list[tuple[str, str]] = []
    for name in persona.header_order:
        headers.extend(mirrored[name])
    if dialog_response:
        headers.extend(("Record-Route", v) for v in message.header_all("record-route")
                       if copyable(v, raw))
    if status == 100:
        timestamp = message.header("timestamp")
        if timestamp and copyable(timestamp, raw):
            headers.append(("Timestamp", timestamp))
    if dialog_response or options_ok:
        headers.append(("Contact", _contact(context)))
    if challenge:
        realm = persona.realm_for(context.local[0])
        nonce = make_nonce(persona.nonce, context.entropy, context.now)
        opaque = context.entropy[16:32].hex() if persona.opaque else None
        headers.append((challenge, digest_challenge(realm, nonce, opaque)))
    unsupported = tuple(t for t in unsupported if copyable(t, raw))
    if unsupported:
        headers.append(("Unsupported", ", ".join(unsupported)))
    headers.append((persona.agent_header, persona.agent))
    if status == 405 or options_ok or persona.allow_on_every_response:
        headers.append(("Allow", ", ".join(persona.allow)))
    if (options_ok or persona.allow_on_every_response) and persona.supported:
        headers.append(("Supported", ", ".join(persona.supported)))
    if options_ok:
        if persona.accept:
            headers.append(("Accept", ", ".join(persona.accept)))
        if persona.accept_encoding:
            headers.append(("Accept-Encoding", persona.accept_encoding))
        if persona.accept_language:
            headers.append(("Accept-Language", persona.accept_language))
        if persona.allow_events:
            headers.append(("Allow-Events", ", ".join(persona.allow_events)))
    headers.append(("Content-Length", "0"))
    lines = [f"SIP/2.0 {status} {REASONS[status]}"]
    lines.extend(f"{name}: {value}" for name, value in headers)
    data = ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "replace")
    if len(data) > MAX_REPLY_BYTES:
        return None
    return data
