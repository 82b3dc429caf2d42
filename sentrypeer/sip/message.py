"""Parse one SIP request or response from attacker-controlled bytes.

Pure module: no Twisted import, no I/O. Every input is treated as hostile: sizes and counts are
bounded, scanning is linear in the input length (no backtracking regular expressions), and the only
exception :func:`parse_message` raises is :class:`SIPParseError`.

What counts as SIP, how ``called_number`` is chosen and what ``parse_status`` means come from
``interface.md`` §3; the message grammar from RFC 3261 §7 (messages), §7.3.1 (header folding),
§7.3.3 (compact forms), §20 (header fields) and §25.1 (the ABNF). The parser is lenient where the
honeypot must still learn something (it always extracts what it can) and records every deviation
from the grammar in :attr:`SIPMessage.problems`, which makes the message ``malformed``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import FrozenInstanceError
from typing import Any, NamedTuple
from urllib.parse import unquote_to_bytes

from sentrypeer.events import PARSE_MALFORMED, PARSE_OK

#: At most this many header fields are kept in :attr:`SIPMessage.headers`; later ones are ignored
#: (except ``Content-Length``, which is always checked) and the message is ``malformed``.
MAX_HEADERS = 256
#: Extracted single-value fields (``user_agent``, ``to``, ``called_number``...) are cut to this
#: many bytes of the raw value before decoding. :attr:`SIPMessage.headers` is never cut.
MAX_FIELD_BYTES = 8192
#: At most this many Via values are kept in :attr:`SIPMessage.vias`.
MAX_VIAS = 256
#: At most this many distinct problem strings are kept.
MAX_PROBLEMS = 16
#: A Content-Length with more significant digits than this is "overlarge" (never a real body).
MAX_CONTENT_LENGTH_DIGITS = 18

#: Results of :func:`start_line_kind`.
REQUEST = "request"
RESPONSE = "response"
NON_SIP = "non_sip"

#: Results of :func:`content_length_info`.
CL_ABSENT = "absent"
CL_VALID = "valid"
CL_INVALID = "invalid"
CL_OVERLARGE = "overlarge"

#: IANA "Header Field Parameters and Parameter Values" compact forms (RFC 3261 §7.3.3 and later
#: RFCs), lower-case compact letter to lower-case long name.
COMPACT_FORMS = {
    "a": "accept-contact",
    "b": "referred-by",
    "c": "content-type",
    "d": "request-disposition",
    "e": "content-encoding",
    "f": "from",
    "i": "call-id",
    "j": "reject-contact",
    "k": "supported",
    "l": "content-length",
    "m": "contact",
    "n": "identity-info",
    "o": "event",
    "r": "refer-to",
    "s": "subject",
    "t": "to",
    "u": "allow-events",
    "v": "via",
    "x": "session-expires",
    "y": "identity",
}

# Bytes are searched with find() rather than "in": CPython's bytes.__contains__ first tries the
# operand as an integer and raises and discards a TypeError when it is bytes, which costs more
# than the search itself.

# RFC 3261 §25.1: token = 1*(alphanum / "-" / "." / "!" / "%" / "*" / "_" / "+" / "`" / "'" / "~")
_TOKEN_CHARS = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz" + b"-.!%*_+`'~"
_WSP = b" \t"
_CRLF = b"\r\n"
_SP, _HT, _CR, _LF = 0x20, 0x09, 0x0D, 0x0A
_DQUOTE, _BACKSLASH, _LT, _GT = 0x22, 0x5C, 0x3C, 0x3E
_COMMA, _SEMI = 0x2C, 0x3B
_SIP_SLASH = b"SIP/"
_CL_INITIALS = frozenset(b"cClL")

# Characters that change the state of a structured-header scan. A single character class: matching
# is linear, there is nothing to backtrack over.
_SPECIALS = re.compile(rb'[\\"<>,;]')
# One backslash escape inside a quoted string (RFC 3261 §25.1 quoted-pair).
_QUOTED_PAIR = re.compile(rb"\\(.)", re.DOTALL)
# Leading line ends (RFC 3261 §7.5: CRLFs before the start line are ignored).
_LEADING_LINE_ENDS = re.compile(rb"[\r\n]*")
_LINE_END_BYTES = (b"\r", b"\n")


class SIPParseError(ValueError):
    """The input is not a SIP message at all (the only exception :func:`parse_message` raises).

    Raised for empty input, input made only of line ends (keep-alives) and a first line that is
    neither a request line nor a status line (HTTP, TLS, binary: a non-SIP probe). Its single
    argument is a short human-readable reason.
    """


def _is_token(data: bytes) -> bool:
    """True when *data* is a non-empty RFC 3261 §25.1 ``token``."""
    return bool(data) and not data.translate(None, _TOKEN_CHARS)


def _first_wsp(data: bytes) -> int:
    """Index of the first SP or HT in *data*, or -1."""
    sp = data.find(b" ")
    ht = data.find(b"\t")
    if sp < 0:
        return ht
    if ht < 0:
        return sp
    return min(sp, ht)


def _last_wsp(data: bytes) -> int:
    """Index of the last SP or HT in *data*, or -1."""
    return max(data.rfind(b" "), data.rfind(b"\t"))


def start_line_kind(line: bytes) -> str:
    """Classify one first line: ``"request"``, ``"response"`` or ``"non_sip"``.

    interface.md §3: ``token 1*SP Request-URI 1*SP SIP/d.d *WSP`` is a request (extra spaces or
    tabs between the parts, odd version digits, a Request-URI in angle brackets only make it
    ``malformed`` later, they do not make it non-SIP); a line starting with ``SIP/`` is a response
    (RFC 3261 §7.2 Status-Line); anything else is a non-SIP probe. Protocol names are compared
    case-insensitively (RFC 3261 §7.1).

    :param line: the first line as bytes, without its LF (a trailing CR is ignored).
    :returns: one of :data:`REQUEST`, :data:`RESPONSE`, :data:`NON_SIP`.
    """
    if line.endswith(b"\r"):
        line = line[:-1]
    if line[:4].upper() == _SIP_SLASH:
        return RESPONSE
    sep = _first_wsp(line)
    if sep <= 0 or not _is_token(line[:sep]):
        return NON_SIP
    rest = line[sep:].strip(_WSP)
    last = _last_wsp(rest)
    if last < 0:
        return NON_SIP
    if rest[last + 1 :][:4].upper() != _SIP_SLASH:
        return NON_SIP
    return REQUEST


class StartLineWatcher:
    """Incremental form of :func:`could_start_sip` for a first line that arrives in pieces.

    Feed it the bytes of an incomplete first line (leading line ends already removed, no LF), in
    order and in any pieces; it answers whether the line can still become a request or status
    line. Each byte is examined once, so a stream framer stays linear however the line is split.

    The rule, consistent with :func:`start_line_kind`: a line that starts with ``SIP/`` (any case)
    is a possible status line; otherwise everything before the first SP or HT must be token
    characters (RFC 3261 §25.1), and at least one of them; once that separator has been seen, the
    line stays possible until it ends. Once impossible, always impossible.
    """

    __slots__ = ("_head", "_phase", "_token_len")

    # phases: 0 = fewer than 4 bytes, all a prefix of "SIP/"; 1 = inside the method token;
    # 2 = decided possible; 3 = decided impossible.
    def __init__(self) -> None:
        self._head = b""
        self._phase = 0
        self._token_len = 0

    @property
    def possible(self) -> bool:
        """False once the bytes seen so far cannot start a SIP start line."""
        return self._phase != 3

    def feed(self, segment: bytes) -> bool:
        """Examine the next piece of the first line.

        :param segment: following bytes of the line (no LF).
        :returns: :attr:`possible` after these bytes.
        """
        if self._phase >= 2 or not segment:
            return self.possible
        if self._phase == 0:
            head = self._head + segment
            if len(head) < 4 and _SIP_SLASH.startswith(head.upper()):
                self._head = head
                return True
            if head[:4].upper() == _SIP_SLASH:
                self._phase = 2
                return True
            self._head = b""
            self._phase = 1
            segment = head
        sep = _first_wsp(segment)
        token_part = segment if sep < 0 else segment[:sep]
        if token_part.translate(None, _TOKEN_CHARS):
            self._phase = 3
        elif sep >= 0:
            self._phase = 2 if self._token_len + sep > 0 else 3
        else:
            self._token_len += len(segment)
        return self.possible


def could_start_sip(prefix: bytes) -> bool:
    """Whether the start of a stream can still become a SIP request or status line.

    Used by the stream framer to reject garbage (a TLS ClientHello's first byte 0x16, a NUL, a
    non-token character before the first SP) without waiting for a line end. Leading CR/LF bytes
    are ignored (RFC 3261 §7.5). When *prefix* already holds a whole first line, the answer is
    ``start_line_kind(line) != "non_sip"``.

    :param prefix: the first bytes received (any length, possibly empty).
    :returns: ``False`` as soon as no continuation can be a request or status line.
    """
    rest = prefix[_LEADING_LINE_ENDS.match(prefix).end() :]
    lf = rest.find(b"\n")
    if lf >= 0:
        return start_line_kind(rest[:lf]) != NON_SIP
    return StartLineWatcher().feed(rest)


class _Unquoted:
    """Iterate over the special bytes (``< > , ;``) of a header value that stand outside
    quoted strings (RFC 3261 §25.1 quoted-string, with quoted-pair escapes). Linear time.

    Yields ``(index, byte value)``; after the loop :attr:`in_quote` tells whether a quoted string
    was left open.
    """

    __slots__ = ("value", "in_quote")

    def __init__(self, value: bytes) -> None:
        self.value = value
        self.in_quote = False

    def __iter__(self):
        value = self.value
        skip = -1
        for match in _SPECIALS.finditer(value):
            i = match.start()
            if i == skip:
                continue
            c = value[i]
            if self.in_quote:
                if c == _BACKSLASH:
                    skip = i + 1
                elif c == _DQUOTE:
                    self.in_quote = False
            elif c == _DQUOTE:
                self.in_quote = True
            elif c != _BACKSLASH:
                yield i, c


def _split_top(value: bytes, sep: int) -> tuple[list[bytes], bool]:
    """Split *value* on *sep* outside quoted strings and ``<...>``.

    RFC 3261 §7.3.1 (header values holding several comma-separated values) and §25.1
    (quoted-string with quoted-pair escapes). Linear time.

    :param value: one raw header value (bytes).
    :param sep: the separator byte value (``ord(",")`` or ``ord(";")``).
    :returns: the pieces (not stripped) and whether quotes and angle brackets were balanced.
    """
    if value.find(b'"') < 0 and value.find(b"<") < 0 and value.find(b">") < 0:
        return value.split(bytes((sep,))), True
    pieces: list[bytes] = []
    start = 0
    in_angle = False
    scan = _Unquoted(value)
    for i, c in scan:
        if c == _LT:
            in_angle = True
        elif c == _GT:
            in_angle = False
        elif c == sep and not in_angle:
            pieces.append(value[start:i])
            start = i + 1
    pieces.append(value[start:])
    return pieces, not scan.in_quote and not in_angle


def _balanced(value: bytes) -> bool:
    """Whether the quoted strings and ``<...>`` of *value* are closed, as :func:`_split_top`
    judges it (a quoted string never closed, or a last ``<`` outside quotes never followed by a
    ``>``, is unbalanced), with a few C-level calls for values without backslash escapes."""
    if value.find(b"\\") >= 0:
        return _split_top(value, _COMMA)[1]
    quotes = value.count(b'"')
    if quotes == 2:
        # The usual display name: check what follows the quoted string, then what precedes it.
        opening = value.find(b'"')
        closing = value.find(b'"', opening + 1)
        lt = value.rfind(b"<", closing)
        gt = value.rfind(b">", closing)
        if lt == gt:
            lt = value.rfind(b"<", 0, opening)
            gt = value.rfind(b">", 0, opening)
        return lt <= gt
    if quotes:
        segments = value.split(b'"')
        if not len(segments) % 2:
            return False  # an odd number of quotes: the last quoted string never closes
        outside = segments[::2]
    else:
        outside = [value]
    for segment in reversed(outside):
        lt = segment.rfind(b"<")
        gt = segment.rfind(b">")
        if lt != gt:
            return gt > lt
    return True


def _name_addr_uri(value: bytes) -> tuple[bytes | None, bool]:
    """The URI of a ``name-addr`` or ``addr-spec`` value (To, From; RFC 3261 §20.10, §25.1).

    With angle brackets the URI is what they enclose; without, it is the value up to the first
    ``;`` (those are header parameters, RFC 3261 §20).

    :param value: raw header value (bytes), already unfolded.
    :returns: ``(uri, well_formed)``; *uri* is ``None`` when a quoted display name never closes.
    """
    first_semi = -1
    scan = _Unquoted(value)
    for i, c in scan:
        if c == _LT:
            end = value.find(b">", i + 1)
            if end < 0:
                return value[i + 1 :], False
            return value[i + 1 : end], True
        elif c == _SEMI and first_semi < 0:
            first_semi = i
    if scan.in_quote:
        return None, False
    return (value if first_semi < 0 else value[:first_semi]), True


def _uri_user(uri: bytes) -> bytes | None:
    """The raw user part of a ``sip:``/``sips:`` URI, or the number of a ``tel:`` URI.

    interface.md §3: the user part with any ``:password`` split off (RFC 3261 §19.1.1; the
    ``;`` parameters a user part may hold are kept); for ``tel:`` (RFC 3966) the number up to the
    first ``;``. Enclosing ``<>`` (RFC 4475 §3.1.2.7) are tolerated. Not yet percent-decoded.

    :param uri: raw URI bytes.
    :returns: the raw bytes, or ``None`` when there is no user part (or another scheme).
    """
    u = uri.strip(_WSP)
    if u[:1] == b"<":
        u = u[1:]
        end = u.find(b">")
        if end >= 0:
            u = u[:end]
    colon = u.find(b":")
    if colon <= 0:
        return None
    scheme = u[:colon].lower()
    rest = u[colon + 1 :]
    if scheme in (b"sip", b"sips"):
        at = rest.find(b"@")
        if at < 0:
            return None
        user = rest[:at]
        password = user.find(b":")
        return user if password < 0 else user[:password]
    if scheme == b"tel":
        semi = rest.find(b";")
        return (rest if semi < 0 else rest[:semi]).strip(_WSP)
    return None


def _decode_user(raw: bytes | None) -> str | None:
    """Percent-decode a raw user part once (bytes level), then make it readable text.

    RFC 3261 §19.1.2 escaping; interface.md §3 (decoded once, never twice; a ``%00`` becomes a NUL
    character, never a truncation; undecodable bytes become ``\\xNN``).

    :returns: the text, or ``None`` when empty.
    """
    if not raw:
        return None
    raw = raw[:MAX_FIELD_BYTES]
    if raw.find(b"%") >= 0:
        raw = unquote_to_bytes(raw)
    return raw.decode("utf-8", "backslashreplace") or None


def _unquote(value: bytes) -> bytes:
    """Strip one quoted-string's quotes and quoted-pair escapes (RFC 3261 §25.1); tokens pass."""
    if len(value) >= 2 and value[:1] == b'"' and value[-1:] == b'"':
        return _QUOTED_PAIR.sub(rb"\1", value[1:-1])
    if value[:1] == b'"':
        return _QUOTED_PAIR.sub(rb"\1", value[1:])
    return value


def _params(value: bytes) -> list[tuple[bytes, bytes]]:
    """``name=value`` pairs of a ``;`` list, names lower-cased, values stripped and unquoted."""
    out = []
    pieces, _ = _split_top(value, _SEMI)
    for piece in pieces[1:]:
        name, _, val = piece.partition(b"=")
        out.append((name.strip(_WSP).lower(), _unquote(val.strip(_WSP))))
    return out


def _via_branch(via: bytes) -> bytes | None:
    """The first ``branch`` parameter of a Via value (RFC 3261 §20.42), as :func:`_params`
    gives it (stripped, unquoted), or ``None``."""
    if via.find(b'"') >= 0 or via.find(b"<") >= 0 or via.find(b">") >= 0:
        for name, val in _params(via):
            if name == b"branch":
                return val
        return None
    for piece in via.split(b";")[1:]:
        name, _, val = piece.partition(b"=")
        if name.strip(_WSP).lower() == b"branch":
            return _unquote(val.strip(_WSP))
    return None


def _digest_credentials(value: bytes) -> tuple[bytes | None, bytes | None, bool]:
    """``username`` and ``realm`` of an Authorization/Proxy-Authorization value.

    RFC 3261 §20.7 and §22.4, RFC 2617 §3.2.2: ``Digest`` followed by comma-separated
    ``name=value`` parameters whose values are tokens or quoted strings (svcrack sends
    ``username="101",realm="127.0.0.1"``).

    :returns: ``(username, realm, well_formed)``; both ``None`` for another scheme.
    """
    value = value.strip(_WSP)
    sep = _first_wsp(value)
    scheme = value if sep < 0 else value[:sep]
    if scheme.lower() != b"digest":
        return None, None, True
    pieces, balanced = _split_top(value[len(scheme) :], _COMMA)
    username = realm = None
    for piece in pieces:
        name, eq, val = piece.partition(b"=")
        if not eq:
            continue
        name = name.strip(_WSP).lower()
        if name == b"username" and username is None:
            username = _unquote(val.strip(_WSP))
        elif name == b"realm" and realm is None:
            realm = _unquote(val.strip(_WSP))
    return username, realm, balanced


def _field(value: bytes | None) -> str | None:
    """An extracted single value as readable text, cut to :data:`MAX_FIELD_BYTES`; blank is None."""
    if not value:
        return None
    return value[:MAX_FIELD_BYTES].decode("utf-8", "backslashreplace")


def _header_texts(fields: list[tuple[str, bytes]]) -> tuple[tuple[str, str], ...]:
    """:attr:`SIPMessage.headers`: the fields with their values made readable text.

    Values never hold a LF (lines were split on it), so an all-ASCII set of values is decoded
    in one call on the values joined by LF, then split again.
    """
    if not fields:
        return ()
    names, values = zip(*fields, strict=True)
    joined = b"\n".join(values)
    if joined.isascii() and joined.count(b"\n") == len(values) - 1:
        return tuple(zip(names, joined.decode("ascii").split("\n"), strict=True))
    return tuple([(key, value.decode("utf-8", "backslashreplace")) for key, value in fields])


def _long_name(name: str) -> str:
    """Lower-case long header name for *name* (a compact letter is expanded, RFC 3261 §7.3.3)."""
    lname = name.strip().lower()
    return COMPACT_FORMS.get(lname, lname)


class _Problems:
    """An ordered, bounded set of short problem descriptions."""

    __slots__ = ("items",)

    def __init__(self) -> None:
        self.items: dict[str, None] = {}

    def add(self, reason: str) -> None:
        if len(self.items) < MAX_PROBLEMS:
            self.items[reason] = None


#: Raw header names seen before (exact bytes, as they arrive) mapped to their long lower-case
#: name: most messages repeat the same dozen spellings, so a hit skips the token check, decoding
#: and lower-casing. Bounded in entries and in name length, since names come from attackers.
_NAME_CACHE: dict[bytes, str] = {}
_NAME_CACHE_MAX = 2048
_NAME_CACHE_MAX_LEN = 64


def _header_name(raw: bytes) -> str | None:
    """Lower-case long name of the raw header name *raw*, or ``None`` when it is not a token."""
    name = _NAME_CACHE.get(raw)
    if name is not None:
        return name
    if not _is_token(raw):
        return None
    name = _long_name(raw.decode("ascii"))
    if len(_NAME_CACHE) < _NAME_CACHE_MAX and len(raw) <= _NAME_CACHE_MAX_LEN:
        _NAME_CACHE[raw] = name
    return name


def _header_lines(data: bytes, pos: int) -> tuple[list[bytes | None], int, bool]:
    """The header lines from *pos* up to the first empty line, without their line ends.

    ``data[pos - 1]`` is the start line's LF, so the empty line is the first LF followed by LF or
    CR LF at or after ``pos - 1``. When the last header line has no line end (no empty line and
    no final LF), a ``None`` is put before it: the problem is recorded when the scan reaches it.

    :returns: ``(lines, body_start, complete)``; *complete* is false when there is that ``None``.
    """
    n = len(data)
    crlf = data.find(b"\n\r\n", pos - 1)
    if crlf >= 0:
        lf = data.find(b"\n\n", pos - 1, crlf + 2)
        end, body_start = (crlf, crlf + 3) if lf < 0 else (lf, lf + 2)
    else:
        end = data.find(b"\n\n", pos - 1)
        body_start = n if end < 0 else end + 2
    if end >= 0:
        block = data[pos:end]
        if not block:
            return [], body_start, True
        if block[-1] == _CR:
            # The usual case: every line ends with CR LF and holds no other CR or LF.
            lines = block[:-1].split(b"\r\n")
            if block.count(b"\r") == len(lines) and block.count(b"\n") == len(lines) - 1:
                return lines, body_start, True
        raw_lines = block.split(b"\n")
        last: bytes | None = None
    else:
        raw_lines = data[pos:].split(b"\n")
        last = raw_lines.pop()
        if last == b"\r":
            last = None
    lines: list[bytes | None] = [line[:-1] if line[-1:] == b"\r" else line for line in raw_lines]
    if last:
        # RFC 3261 §7.3: every header line ends with CRLF; the last one was cut.
        lines.append(None)
        lines.append(last[:-1] if last[-1:] == b"\r" else last)
        return lines, body_start, False
    return lines, body_start, True


def _scan_headers(
    data: bytes, pos: int, problems: _Problems
) -> tuple[list[tuple[str, bytes]], list[bytes], int]:
    """Read header fields from *pos* up to the first empty line.

    RFC 3261 §7.3 (``name HCOLON value``; white space is allowed before the colon, §7.3.1),
    §7.3.1 (a line starting with SP or HT continues the previous field: the line end and the
    surrounding white space become one SP), §7.5 (CRLF or bare LF line ends are both accepted).
    Header names are matched case-insensitively and compact forms expanded (§7.3.3).

    :param data: the whole message (bytes).
    :param pos: offset of the line after the start line (``data[pos - 1]`` is its LF).
    :param problems: collects grammar deviations.
    :returns: ``(fields, content_length_values, body_start)``: at most :data:`MAX_HEADERS`
        ``(long_name, raw_value)`` pairs in arrival order, every Content-Length value (even past
        the header limit), and the offset of the first body byte (``len(data)`` when the message
        has no empty line).
    """
    if pos >= len(data):
        return [], [], len(data)
    lines, body_start, complete = _header_lines(data, pos)
    if complete and len(lines) <= MAX_HEADERS:
        known = _known_fields(lines)
        if known is not None:
            return known[0], known[1], body_start
    fields, cl_values = _read_fields(lines, problems)
    return fields, cl_values, body_start


def _known_fields(lines: list[bytes]) -> tuple[list[tuple[str, bytes]], list[bytes]] | None:
    """The fields of the usual header block, where every line is ``known-name: value``.

    :returns: what :func:`_read_fields` returns for *lines* (which then records no problem), or
        ``None`` when a line has no colon, is a continuation line, or has a name not seen before,
        not a token, or with white space before the colon (none of those is a cached name).
    """
    fields: list[tuple[str, bytes]] = []
    cl_values: list[bytes] = []
    cache_get = _NAME_CACHE.get
    wsp = _WSP
    append = fields.append
    for line in lines:
        raw_name, colon, value = line.partition(b":")
        name = cache_get(raw_name)
        if name is None or not colon:
            return None
        value = value.strip(wsp)
        append((name, value))
        if name == "content-length" and len(cl_values) < 8:
            cl_values.append(value)
    return fields, cl_values


def _read_fields(
    lines: list[bytes | None], problems: _Problems
) -> tuple[list[tuple[str, bytes]], list[bytes]]:
    """The general reading of header lines (see :func:`_scan_headers`): folding, bad lines and
    the header limit, each deviation recorded in *problems*.

    :param lines: from :func:`_header_lines` (a ``None`` marks a last line without line end).
    :returns: ``(fields, content_length_values)``.
    """
    fields: list[tuple[str, bytes]] = []
    cl_values: list[bytes] = []
    cache_get = _NAME_CACHE.get
    wsp = _WSP
    # The field that continuation lines extend: its name (None when there is none), value so
    # far, its index in fields and in cl_values (-1 when not stored there).
    cur_name: str | None = None
    cur_value = b""
    cur_parts: list[bytes] | None = None
    cur_index = cur_cl = -1
    too_many = skipping = False
    for line in lines:
        if line is None:
            problems.add("last header line has no line end")
            continue
        first = line[0]
        if first == _SP or first == _HT:
            if cur_name is not None:
                if cur_parts is None:
                    cur_parts = [cur_value]
                cur_parts.append(line.strip(wsp))
            elif not skipping:
                problems.add("continuation line without a header")
            continue
        if cur_parts is not None:
            _unfold(fields, cl_values, cur_name, cur_parts, cur_index, cur_cl)
        cur_name = cur_parts = None
        if len(fields) >= MAX_HEADERS and first not in _CL_INITIALS:
            # Past the limit only Content-Length still matters: skip other fields cheaply.
            too_many = skipping = True
            continue
        skipping = False
        colon = line.find(b":")
        if colon < 0:
            problems.add("header line without a colon")
            continue
        name = cache_get(line[:colon])
        if name is None:
            name = _header_name(line[:colon].rstrip(wsp))
            if name is None:
                problems.add("invalid header name")
                continue
        cur_name = name
        cur_value = line[colon + 1 :].strip(wsp)
        cur_cl = -1
        if name == "content-length" and len(cl_values) < 8:
            cur_cl = len(cl_values)
            cl_values.append(cur_value)
        if len(fields) < MAX_HEADERS:
            cur_index = len(fields)
            fields.append((name, cur_value))
        else:
            cur_index = -1
            too_many = True
    if cur_parts is not None:
        _unfold(fields, cl_values, cur_name, cur_parts, cur_index, cur_cl)
    if too_many:
        problems.add("too many headers")
    return fields, cl_values


def _unfold(
    fields: list[tuple[str, bytes]],
    cl_values: list[bytes],
    name: str,
    parts: list[bytes],
    index: int,
    cl_index: int,
) -> None:
    """Replace the value of a folded field by its unfolded form (RFC 3261 §7.3.1: the stripped
    pieces joined by one SP) where it was stored: ``fields[index]``, ``cl_values[cl_index]``."""
    value = b" ".join([p for p in parts if p])
    if index >= 0:
        fields[index] = (name, value)
    if cl_index >= 0:
        cl_values[cl_index] = value


def _content_length(values: list[bytes]) -> tuple[str, int | None]:
    """Judge the Content-Length values of one message (RFC 3261 §20.14: ``1*DIGIT``)."""
    if not values:
        return CL_ABSENT, None
    if len(values) == 1 and len(values[0]) <= MAX_CONTENT_LENGTH_DIGITS and values[0].isdigit():
        return CL_VALID, int(values[0])
    seen = set()
    for value in values:
        if not value.isdigit():
            return CL_INVALID, None
        seen.add(value.lstrip(b"0") or b"0")
    if len(seen) > 1:
        return CL_INVALID, None
    digits = seen.pop()
    if len(digits) > MAX_CONTENT_LENGTH_DIGITS:
        return CL_OVERLARGE, None
    return CL_VALID, int(digits)


def content_length_info(header_block: bytes) -> tuple[str, int | None]:
    """The declared Content-Length of a header block, as a stream framer needs it.

    Same header reading as :func:`parse_message` (compact ``l``, folding, repeated fields).
    RFC 3261 §18.3 and §20.14.

    :param header_block: start line and header fields (bytes), usually up to the empty line.
    :returns: ``("absent", None)``; ``("valid", n)`` with *n* in bytes; ``("invalid", None)`` for
        a negative, non-numeric or conflicting value; ``("overlarge", None)`` for a decimal
        number of more than :data:`MAX_CONTENT_LENGTH_DIGITS` significant digits.
    """
    start = _LEADING_LINE_ENDS.match(header_block).end()
    lf = header_block.find(b"\n", start)
    if lf < 0:
        return CL_ABSENT, None
    _, values, _ = _scan_headers(header_block, lf + 1, _Problems())
    return _content_length(values)


class SIPMessage(NamedTuple):
    """One parsed SIP request or response (RFC 3261 §7); immutable.

    A named tuple rather than a frozen dataclass: :func:`parse_message` builds one per packet, and
    a tuple is built in one C call where a frozen dataclass sets its fields one by one. Assigning
    to a field raises :class:`dataclasses.FrozenInstanceError`, as before.

    Every ``str`` field is readable text made from the received bytes with
    :func:`sentrypeer.events.readable` (UTF-8, undecodable bytes as ``\\xNN``, NUL kept). Single
    extracted fields are cut to :data:`MAX_FIELD_BYTES` bytes; :attr:`headers` keeps whole values.
    A field is ``None`` when absent (and, for the single-value header fields, when blank).

    The fields recording an event needs are decoded by :func:`parse_message`; the others
    (:attr:`request_uri`, :attr:`version`, :attr:`reason`, :attr:`headers`, :attr:`from_`,
    :attr:`to`, :attr:`contact`, :attr:`cseq`, :attr:`cseq_method`, :attr:`vias`) are properties
    decoded from the received bytes when first read (responsive mode reads them; passive mode never
    does), kept in :attr:`raw` with those bytes.

    :ivar headers: ``(lower-case long name, value)`` pairs in arrival order, at most
        :data:`MAX_HEADERS`; compact forms expanded, folding undone, values stripped.
    :ivar body: the bytes after the empty line, cut to a valid Content-Length when fewer bytes
        were declared than received (RFC 3261 §18.3: extra datagram bytes are not the message's).
    :ivar content_length: declared length in bytes, or ``None`` when absent, invalid,
        conflicting or overlarge.
    :ivar parse_status: :data:`sentrypeer.events.PARSE_OK` or ``PARSE_MALFORMED`` (when
        :attr:`problems` is not empty).
    :ivar called_number: interface.md §3 (Request-URI user, else ``tel:`` number, else the To
        URI's user part).
    :ivar cseq_number: CSeq sequence number, ``None`` when unparsable or above 2**32-1
        (RFC 3261 §8.1.1.5).
    :ivar max_forwards: Max-Forwards, ``None`` when unparsable or above 255 (RFC 3261 §20.22).
    :ivar vias: every Via value split on top-level commas, in order (at most :data:`MAX_VIAS`).
    :ivar raw: internal: the raw bytes of the lazily decoded fields, and those decoded so far.
    """

    is_request: bool
    method: str | None
    status_code: int | None
    body: bytes
    content_length: int | None
    parse_status: str
    problems: tuple[str, ...]
    called_number: str | None
    user_agent: str | None
    call_id: str | None
    cseq_number: int | None
    top_via_branch: str | None
    max_forwards: int | None
    auth_username: str | None
    auth_realm: str | None
    raw: dict

    def __setattr__(self, name: str, value: object) -> None:
        raise FrozenInstanceError(f"cannot assign to field {name!r}")

    def _decoded(self, name: str, decode: Callable[[Any], Any]) -> Any:
        raw = self.raw
        try:
            return raw[name]
        except KeyError:
            value = raw[name] = decode(raw)
            return value

    @property
    def request_uri(self) -> str | None:
        """The Request-URI (requests), cut to :data:`MAX_FIELD_BYTES`."""
        return self._decoded("request_uri", lambda raw: _text(raw["b_uri"], MAX_FIELD_BYTES))

    @property
    def version(self) -> str:
        """The SIP-Version of the start line, as received."""
        return self._decoded("version", lambda raw: _text(raw["b_version"], MAX_FIELD_BYTES))

    @property
    def reason(self) -> str | None:
        """The Reason-Phrase (responses)."""
        return self._decoded("reason", lambda raw: _text(raw["b_reason"], MAX_FIELD_BYTES))

    @property
    def headers(self) -> tuple[tuple[str, str], ...]:
        """``(lower-case long name, value)`` pairs in arrival order (see the class docstring)."""
        return self._decoded("headers", lambda raw: _header_texts(raw["fields"]))

    @property
    def from_(self) -> str | None:
        """The first From value."""
        return self._decoded("from_", lambda raw: _field(raw["first"].get("from")))

    @property
    def to(self) -> str | None:
        """The first To value."""
        return self._decoded("to", lambda raw: _field(raw["first"].get("to")))

    @property
    def contact(self) -> str | None:
        """The first Contact value."""
        return self._decoded("contact", lambda raw: _field(raw["first"].get("contact")))

    @property
    def cseq(self) -> str | None:
        """The first CSeq value, whole."""
        return self._decoded("cseq", lambda raw: _field(raw["first"].get("cseq")))

    @property
    def cseq_method(self) -> str | None:
        """The method of the CSeq (its second word)."""
        return self._decoded("cseq_method", lambda raw: _text(raw["b_cseq_method"]))

    @property
    def vias(self) -> tuple[str, ...]:
        """Every Via value (see the class docstring)."""
        return self._decoded(
            "vias", lambda raw: tuple([v.decode("utf-8", "backslashreplace") for v in raw["b_vias"]])
        )

    def header(self, name: str) -> str | None:
        """First value of header *name* (case-insensitive; compact forms accepted), or ``None``."""
        wanted = _long_name(name)
        for key, value in self.headers:
            if key == wanted:
                return value
        return None

    def header_all(self, name: str) -> list[str]:
        """Every value of header *name* (case-insensitive; compact forms accepted), in order."""
        wanted = _long_name(name)
        return [value for key, value in self.headers if key == wanted]


def _text(value: bytes | None, limit: int | None = None) -> str | None:
    """*value* (cut to *limit* bytes) as readable text, ``None`` staying ``None``."""
    if value is None:
        return None
    return value[:limit].decode("utf-8", "backslashreplace")


def _valid_version(version: bytes) -> bool:
    """RFC 3261 §25.1: ``SIP-Version = "SIP" "/" 1*DIGIT "." 1*DIGIT`` (case-insensitive)."""
    if version[:4].upper() != _SIP_SLASH:
        return False
    major, dot, minor = version[4:].partition(b".")
    return bool(dot) and major.isdigit() and minor.isdigit()


def _parse_request_line(line: bytes, problems: _Problems) -> tuple[bytes, bytes, bytes]:
    """Split a request line (RFC 3261 §7.1) already known to be a request.

    :returns: ``(method, request_uri, version)`` as raw bytes.
    """
    sep = _first_wsp(line)
    method = line[:sep]
    rest = line[sep:].strip(_WSP)
    last = _last_wsp(rest)
    version = rest[last + 1 :]
    uri = rest[:last].strip(_WSP)
    if method + b" " + uri + b" " + version != line:
        problems.add("extra white space in the request line")
    if uri.find(b" ") >= 0 or uri.find(b"\t") >= 0:
        problems.add("white space inside the Request-URI")
    if not _valid_version(version):
        problems.add("bad SIP version")
    elif version.upper() != b"SIP/2.0":
        problems.add("unsupported SIP version")
    if uri[:1] == b"<":
        problems.add("Request-URI in angle brackets")
    elif uri.find(b":") < 0:
        problems.add("Request-URI without a scheme")
    return method, uri, version


def _parse_status_line(line: bytes, problems: _Problems) -> tuple[bytes, int | None, bytes | None]:
    """Split a status line (RFC 3261 §7.2: ``SIP-Version SP Status-Code SP Reason-Phrase``).

    :returns: ``(version, status_code, reason)``; the code is ``None`` unless it is 3 digits.
    """
    version, sp, rest = line.partition(b" ")
    if not _valid_version(version):
        problems.add("bad SIP version")
    elif version.upper() != b"SIP/2.0":
        problems.add("unsupported SIP version")
    code_bytes, sp2, reason = rest.partition(b" ")
    code = None
    if len(code_bytes) == 3 and code_bytes.isdigit() and code_bytes[:1] != b"0":
        code = int(code_bytes)
    else:
        problems.add("bad status code")
    if not sp:
        problems.add("status line without a status code")
    return version, code, (reason if sp2 else None)


_new_message = tuple.__new__

#: Fields :func:`parse_message` looks at beyond the first value: name-addr fields whose quotes
#: and angle brackets must balance, Via, and the digest credentials.
_KIND_STRUCTURED, _KIND_VIA, _KIND_AUTH = 1, 2, 3
_FIELD_KINDS = {
    **dict.fromkeys(
        ("to", "from", "contact", "route", "record-route", "reply-to", "refer-to", "referred-by"),
        _KIND_STRUCTURED,
    ),
    "via": _KIND_VIA,
    "authorization": _KIND_AUTH,
    "proxy-authorization": _KIND_AUTH,
}


def parse_message(data: bytes) -> SIPMessage:
    """Parse one SIP request or response from the start of *data*.

    Leading CRLF/LF are skipped (RFC 3261 §7.5). The header block ends at the first empty line;
    a message without one is accepted when its last header line has a line end. Everything after
    the empty line is the body (cut to a valid, smaller Content-Length). Deviations from the
    grammar make the message ``malformed`` (:attr:`SIPMessage.problems` says why) but every
    field that can be read is still extracted (interface.md §3).

    :param data: the received bytes (a datagram, or one framed stream message).
    :returns: the parsed message.
    :raises SIPParseError: when the first line is neither a request line nor a status line
        (empty input, only line ends, HTTP, TLS, binary): a non-SIP probe.
    """
    data = bytes(data)
    start = _LEADING_LINE_ENDS.match(data).end() if data[:1] in _LINE_END_BYTES else 0
    if start >= len(data):
        raise SIPParseError("empty" if not data else "only line ends (keep-alive)")
    problems = _Problems()
    lf = data.find(b"\n", start)
    if lf < 0:
        line, after = data[start:], len(data)
        problems.add("start line has no line end")
    else:
        line, after = data[start:lf], lf + 1
    if line.endswith(b"\r"):
        line = line[:-1]
    method = uri = None
    code = None
    reason = None
    parts = line.split(b" ")
    if (
        len(parts) == 3
        and parts[2] == b"SIP/2.0"
        and parts[0]
        and not parts[0].translate(None, _TOKEN_CHARS)
        and line.find(b"\t") < 0
        and parts[1].find(b":") >= 0
        and parts[1][:1] != b"<"
    ):
        # The usual request line, "token SP scheme:... SP SIP/2.0": nothing for
        # _parse_request_line to object to.
        kind = REQUEST
        method, uri, version = parts
    else:
        kind = start_line_kind(line)
        if kind == NON_SIP:
            raise SIPParseError("first line is not a SIP request or status line")
        if kind == REQUEST:
            method, uri, version = _parse_request_line(line, problems)
        else:
            version, code, reason = _parse_status_line(line, problems)

    fields, cl_values, body_start = _scan_headers(data, after, problems)

    cl_kind, content_length = _content_length(cl_values)
    if cl_kind == CL_INVALID:
        problems.add("invalid or conflicting Content-Length")
    elif cl_kind == CL_OVERLARGE:
        problems.add("Content-Length too large")
    body = data[body_start:]
    if cl_kind == CL_VALID:
        if content_length < len(body):
            body = body[:content_length]
        elif content_length > len(body):
            problems.add("Content-Length larger than the body")
    elif cl_kind == CL_OVERLARGE:
        problems.add("Content-Length larger than the body")

    # One pass over the fields for what the checks below need, in arrival order; then the
    # problems are recorded in the same order as ever: structure, Via, CSeq, Max-Forwards, auth.
    unbalanced: list[str] = []
    via_values: list[bytes] = []
    auth_values: list[tuple[str, bytes]] = []
    kinds = _FIELD_KINDS
    for key, value in fields:
        field_kind = kinds.get(key)
        if field_kind is None:
            continue
        if field_kind == _KIND_STRUCTURED:
            if not _balanced(value[:MAX_FIELD_BYTES]):
                unbalanced.append(key)
        elif field_kind == _KIND_VIA:
            via_values.append(value)
        else:
            auth_values.append((key, value))
    # The first value of each field: later duplicates are overwritten by earlier ones.
    first = dict(reversed(fields))
    for key in unbalanced:
        problems.add("unterminated quoted string or <> in %s" % key)

    # Via (RFC 3261 §20.42, §7.3.1: several values per line allowed).
    vias: list[bytes] = []
    for value in via_values:
        pieces, balanced = _split_top(value[:MAX_FIELD_BYTES], _COMMA)
        if not balanced:
            problems.add("unterminated quoted string or <> in via")
        for piece in pieces:
            piece = piece.strip(_WSP)
            if not piece:
                problems.add("empty Via value")
            elif len(vias) < MAX_VIAS:
                vias.append(piece)
            else:
                problems.add("too many Via values")
    branch = _via_branch(vias[0]) if vias else None

    # CSeq (RFC 3261 §20.16, §8.1.1.5).
    cseq_raw = first.get("cseq")
    cseq_number = cseq_method = None
    if cseq_raw is not None:
        parts = cseq_raw[:MAX_FIELD_BYTES].split()
        if parts and parts[0].isdigit():
            digits = parts[0].lstrip(b"0") or b"0"
            if len(digits) <= 10 and int(digits) <= 2**32 - 1:
                cseq_number = int(digits)
            else:
                problems.add("CSeq number too large")
        else:
            problems.add("CSeq number missing or not a number")
        if len(parts) >= 2:
            cseq_method = parts[1]
            if method is not None and cseq_method != method:
                problems.add("CSeq method differs from the request method")
        else:
            problems.add("CSeq method missing")
        if len(parts) > 2:
            problems.add("CSeq has extra values")

    # Max-Forwards (RFC 3261 §20.22: 1*DIGIT; RFC 4475 §3.1.2.4 treats values above 255 as bad).
    max_forwards = None
    mf_raw = first.get("max-forwards")
    if mf_raw is not None:
        digits = (mf_raw.lstrip(b"0") or b"0") if mf_raw.isdigit() else b""
        if digits and len(digits) <= 3 and int(digits) <= 255:
            max_forwards = int(digits)
        else:
            problems.add("bad Max-Forwards")

    # Authorization / Proxy-Authorization digest credentials (RFC 3261 §22.4).
    auth_username = auth_realm = None
    for key, value in auth_values:
        user_b, realm_b, balanced = _digest_credentials(value[:MAX_FIELD_BYTES])
        if not balanced:
            problems.add("unterminated quoted string in %s" % key)
        if user_b is not None or realm_b is not None:
            auth_username = _field(user_b)
            auth_realm = _field(realm_b)
            break

    # called_number (interface.md §3).
    to_raw = first.get("to")
    called = None
    if uri is not None:
        called = _decode_user(_uri_user(uri[:MAX_FIELD_BYTES]))
    if called is None and to_raw is not None:
        to_uri, _ = _name_addr_uri(to_raw[:MAX_FIELD_BYTES])
        if to_uri is not None:
            called = _decode_user(_uri_user(to_uri))

    return _new_message(
        SIPMessage,
        (
            kind == REQUEST,  # is_request
            None if method is None else method.decode("utf-8", "backslashreplace"),  # method
            code,  # status_code
            body,  # body
            content_length,  # content_length
            PARSE_MALFORMED if problems.items else PARSE_OK,  # parse_status
            tuple(problems.items),  # problems
            called,  # called_number
            _field(first.get("user-agent")),  # user_agent
            _field(first.get("call-id")),  # call_id
            cseq_number,  # cseq_number
            _field(branch),  # top_via_branch
            max_forwards,  # max_forwards
            auth_username,  # auth_username
            auth_realm,  # auth_realm
            {  # raw
                "b_uri": uri,
                "b_version": version,
                "b_reason": reason,
                "fields": fields,
                "first": first,
                "b_cseq_method": cseq_method,
                "b_vias": vias,
            },
        ),
    )
