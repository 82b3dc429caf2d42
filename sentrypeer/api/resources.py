"""The REST API's one resource: routing, validation, authentication and the JSON bodies.

Behaviour is the original's (reference §5) with the corrections of interface.md §5; the comments
name the section each rule comes from. One leaf resource, :class:`APIResource`, answers every path:
it matches the raw request path exactly itself (no unanchored regex, bug §14.13), so ``/x/numbers/1``,
``/health-check/`` and ``/ip-addresses/`` are 404, and the query string never affects routing.

Every response, errors included, is written by :func:`send` and carries ``Content-Type``
(``application/json`` or ``text/html``, no charset, reference §5.4), ``X-Powered-By: SentryPeer``,
``X-SentryPeer-Version``, ``Access-Control-Allow-Origin: *`` and ``Content-Length``. ``HEAD`` gets
the headers of ``GET`` without the body.

Database reads go through ``database.run_read`` (the database's reader connection and thread; the
reactor never waits for SQLite), or ``database.run_query`` for a database without a reader. The list
bodies are read from the summary tables and written as JSON by SQLite itself in that thread
(:func:`sentrypeer.storage.api_queries.list_body`), so a list of 100,000 numbers costs the reactor
nothing but sending the bytes. Nothing is cached.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
import json
import re
import socket
from collections.abc import Callable
from json.encoder import encode_basestring_ascii
from typing import Any
from urllib.parse import unquote_to_bytes

from twisted.internet.defer import maybeDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from sentrypeer import __version__
from sentrypeer.events import NOT_FOUND, escape_for_log, readable
from sentrypeer.storage import api_queries

log = Logger(namespace="sentrypeer.api")

JSON_TYPE = b"application/json"
HTML_TYPE = b"text/html"
#: The methods every route answers (interface.md §5: HEAD like GET, others 405).
ALLOWED_METHODS = (b"GET", b"HEAD")
ALLOW = b", ".join(ALLOWED_METHODS)

#: Bodies of the original (reference §5.3, §5.5); the static ones are one line, as it sent them.
HEALTH_HTML = b"<html><body><h1>Hello from SentryPeer!</h1><h2>All is well!</h2></body></html>"
NOT_FOUND_MESSAGE = "The requested resource could not be found."
INVALID_MESSAGE = "The request data was invalid"
NO_BAD_ACTOR = "No bad actor found"
NO_PHONE_NUMBER = "No phone number found"

#: Route names, for :func:`resolve`.
HEALTH, ROOT, IP_LIST, IP, NUMBER_LIST, NUMBER = (
    "health-check",
    "root",
    "ip-addresses",
    "ip-address",
    "numbers",
    "number",
)
_EXACT_ROUTES = {
    b"/health-check": HEALTH,
    b"/": ROOT,
    b"/ip-addresses": IP_LIST,
    b"/numbers": NUMBER_LIST,
}
_PARAMETER_ROUTES = {b"ip-addresses": IP, b"numbers": NUMBER}

#: The longest path segment decoded for validation; anything longer is invalid anyway.
_MAX_SEGMENT = 256
_PAGE_PARAMETER_RE = re.compile(rb"[0-9]{1,30}")


class BadRequest(ValueError):
    """The request cannot be answered as it is: a ``400 {"error": message}``."""


# ---------------------------------------------------------------------------------------------
# Pure helpers (no request needed)


def resolve(path: bytes) -> tuple[str, bytes | None] | None:
    """Match a raw request path (no query string) to a route, exactly.

    :param path: ``request.path``: the bytes of the request target before any ``?``, still
        percent-encoded.
    :returns: ``(route name, raw parameter segment or None)``, or ``None`` for no route (404). The
        segment of ``/ip-addresses/{ip}`` and ``/numbers/{number}`` is one non-empty segment: a
        further ``/`` makes it no route.
    """
    route = _EXACT_ROUTES.get(path)
    if route is not None:
        return route, None
    if not path.startswith(b"/"):
        return None
    parts = path[1:].split(b"/")
    if len(parts) == 2 and parts[1]:
        route = _PARAMETER_ROUTES.get(parts[0])
        if route is not None:
            return route, parts[1]
    return None


def decode_segment(segment: bytes) -> str | None:
    """Percent-decode one raw path segment, once (``%2B44`` -> ``+44``; ``+`` stays ``+``).

    :returns: the text, or ``None`` when it is too long or not ASCII once decoded (never a valid
        address or number).
    """
    if len(segment) > _MAX_SEGMENT:
        return None
    decoded = unquote_to_bytes(segment)
    try:
        return decoded.decode("ascii")
    except UnicodeDecodeError:
        return None


def normalise_ip(text: str) -> str | None:
    """The canonical text of an IPv4 or IPv6 address literal, or ``None`` if *text* is not one.

    Validity is glibc ``inet_pton``'s, as in the original (reference §5.3): ``08.8.8.8``, ``1.2.3``,
    ``1.2.3.4:5060``, ``[::1]``, ``fe80::1%eth0`` and surrounding spaces are invalid. The canonical
    form is what the database stores (:mod:`ipaddress` text, interface.md §3): IPv6 compressed and
    lower-case (``2001:0db8::1`` -> ``2001:db8::1``), IPv4-mapped IPv6 as IPv4
    (``::ffff:1.2.3.4`` -> ``1.2.3.4``).
    """
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            packed = socket.inet_pton(family, text)
        except (OSError, ValueError, UnicodeError):
            continue
        address = ipaddress.ip_address(packed)
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return str(address)
    return None


def ip_lookup_forms(text: str) -> tuple[str, ...] | None:
    """The spellings under which the address *text* may be stored, canonical first.

    The canonical form (:func:`normalise_ip`) is what this program stores; the others cover rows
    written by others: ``::ffff:a.b.c.d`` for an IPv4 address (an original's dual-stack socket),
    and *text* itself as given.

    :returns: the candidates, or ``None`` when *text* is not an address literal.
    """
    canonical = normalise_ip(text)
    if canonical is None:
        return None
    forms = [canonical]
    if "." in canonical:
        forms.append("::ffff:" + canonical)
    if text not in forms:
        forms.append(text)
    return tuple(forms)


def parse_page(args: dict[bytes, list[bytes]]) -> tuple[int | None, int]:
    """``limit`` and ``offset`` of a list route (interface.md §5).

    Both are optional non-negative decimal integers (ASCII digits only, no sign, no spaces);
    absent means everything from the start. Values beyond what SQLite counts are clamped.

    :param args: ``request.args`` (query parameters; other keys are ignored).
    :returns: ``(limit or None, offset)``.
    :raises BadRequest: a value is empty, not such an integer, or given more than once.
    """
    values: list[int | None] = []
    for name in (b"limit", b"offset"):
        given = args.get(name)
        if not given:
            values.append(None)
            continue
        if len(given) > 1:
            raise BadRequest(f"{name.decode()} given more than once")
        raw = given[0]
        if not _PAGE_PARAMETER_RE.fullmatch(raw):
            raise BadRequest(f"{name.decode()} must be a non-negative integer")
        values.append(min(int(raw), api_queries.MAX_ROWS))
    limit, offset = values
    return limit, offset or 0


def wants_json(content_type: bytes | None, accept: bytes | None) -> bool:
    """Whether ``/health-check`` answers JSON rather than HTML.

    The original's rule (reference §5.5): the *request's* ``Content-Type`` starts with
    ``application/json``, case-insensitive. Added (bug §14.13): ``Accept`` lists
    ``application/json`` with a non-zero quality. ``*/*`` alone (curl, browsers) still gets HTML.
    """
    if content_type is not None and content_type.strip().lower().startswith(JSON_TYPE):
        return True
    if accept is None:
        return False
    for media_range in accept.split(b","):
        media_type, *params = (part.strip() for part in media_range.split(b";"))
        if media_type.lower() != JSON_TYPE:
            continue
        quality = 1.0
        for param in params:
            key, _, value = param.partition(b"=")
            if key.strip().lower() == b"q":
                try:
                    quality = float(value.strip())
                except ValueError:
                    quality = 0.0
        if quality > 0:
            return True
    return False


def credentials_match(authorization: bytes | None, token: str | None, *, allow_basic: bool) -> bool:
    """Whether an ``Authorization`` header value carries *token*.

    Accepted: ``Bearer <token>`` (scheme case-insensitive, RFC 6750 §2.1) and, when *allow_basic*,
    ``Basic base64(<any user>:<token>)`` (RFC 7617). The token is compared with
    :func:`hmac.compare_digest` (constant time).

    :param authorization: the header value, ``None`` when absent.
    :param token: the configured token; ``None`` or empty means no token is required (``True``).
    """
    if not token:
        return True
    if not authorization:
        return False
    expected = token.encode("utf-8")
    scheme, _, credentials = authorization.strip().partition(b" ")
    scheme, credentials = scheme.lower(), credentials.strip()
    if scheme == b"bearer":
        presented = credentials
    elif scheme == b"basic" and allow_basic:
        try:
            decoded = base64.b64decode(credentials, validate=True)
        except (binascii.Error, ValueError):
            return False
        _user, colon, presented = decoded.partition(b":")
        if not colon:
            return False
    else:
        return False
    return hmac.compare_digest(presented, expected)


def _authorization(request: Any) -> bytes | None:
    values = request.requestHeaders.getRawHeaders(b"authorization")
    if not values or len(values) != 1:
        return None  # absent, or ambiguous: several Authorization headers
    return values[0]


def check_token(request: Any, token: str | None) -> bool:
    """Whether *request* may see the data when the API token is *token*.

    For the dashboard (a later issue): accepts ``Authorization: Bearer <token>`` and HTTP Basic
    with the token as password (any user name), compared in constant time. The API routes take
    Bearer only (interface.md §2 ``--api-token``).

    :param request: a :class:`twisted.web.server.Request` (anything with ``requestHeaders``).
    :param token: the configured token; ``None`` or empty means the API is open (``True``).
    :returns: ``False`` as well when the request carries several ``Authorization`` headers.
    """
    return credentials_match(_authorization(request), token, allow_basic=True)


# ---------------------------------------------------------------------------------------------
# Bodies


def json_line(value: dict[str, Any]) -> bytes:
    """A static one-line body such as ``{"error": "..."}`` (reference §5.6)."""
    return json.dumps(value).encode("ascii")


def json_pretty(value: dict[str, Any]) -> bytes:
    """A dynamic body indented by two spaces like the original's jansson ``JSON_INDENT(2)``
    (keys in insertion order, ``": "`` separator, no trailing newline)."""
    return json.dumps(value, indent=2).encode("ascii")


def encode_listing(listing: api_queries.Listing, total_key: str, list_key: str, item_key: str) -> bytes:
    """The body of a list route (reference §5.6), byte for byte what ``json_pretty`` would give.

    ``seen_count`` stays a JSON string (interface.md §5); a missing ``seen_last`` is
    ``NOT_FOUND`` (interface.md §3). Written by hand with the C string escaper because the list
    may hold millions of entries and :mod:`json`'s indenting encoder is pure Python.
    """
    esc = encode_basestring_ascii
    head = '{\n  %s: %d,\n  %s: ' % (esc(total_key), listing.total, esc(list_key))
    if not listing.entries:
        return (head + "[]\n}").encode("ascii")
    item, last, count = esc(item_key), esc("seen_last"), esc("seen_count")
    items = [
        '    {\n      %s: %s,\n      %s: %s,\n      %s: %s\n    }'
        % (item, esc(entry.value), last, esc(entry.seen_last or NOT_FOUND), count, esc(str(entry.seen_count)))
        for entry in listing.entries
    ]
    return (head + "[\n" + ",\n".join(items) + "\n  ]\n}").encode("ascii")


def _ip_list_body(cursor: Any, limit: int | None, offset: int) -> bytes:
    """``run_query`` function: the ``/ip-addresses`` body, queried and encoded in the DB thread."""
    body = api_queries.list_body(cursor, "ip", limit, offset)
    if body is None:  # a value that JSON must escape: encode the page here
        listing = api_queries.list_ip_addresses(cursor, limit, offset)
        body = encode_listing(listing, *api_queries.LIST_KEYS["ip"])
    return body


def _number_list_body(cursor: Any, limit: int | None, offset: int) -> bytes:
    """``run_query`` function: the ``/numbers`` body, queried and encoded in the DB thread."""
    body = api_queries.list_body(cursor, "number", limit, offset)
    if body is None:
        listing = api_queries.list_called_numbers(cursor, limit, offset)
        body = encode_listing(listing, *api_queries.LIST_KEYS["number"])
    return body


# ---------------------------------------------------------------------------------------------
# Responses


def send(request: Any, code: int, body: bytes, content_type: bytes = JSON_TYPE) -> None:
    """Write a whole response with the API's headers (reference §5.4) and finish *request*.

    For ``HEAD`` the headers (``Content-Length`` of the ``GET`` body included) go out without the
    body (``twisted.web`` drops what is written after the headers of a HEAD response).
    """
    request.setResponseCode(code)
    headers = request.responseHeaders
    headers.setRawHeaders(b"Content-Type", [content_type])
    headers.setRawHeaders(b"X-Powered-By", [b"SentryPeer"])
    headers.setRawHeaders(b"X-SentryPeer-Version", [__version__.encode("ascii")])
    headers.setRawHeaders(b"Access-Control-Allow-Origin", [b"*"])
    headers.setRawHeaders(b"X-Content-Type-Options", [b"nosniff"])
    headers.setRawHeaders(b"Cache-Control", [b"no-store"])
    headers.setRawHeaders(b"Content-Length", [b"%d" % len(body)])
    request.write(body)
    request.finish()


def send_error(request: Any, code: int, message: str) -> None:
    """``code`` with the one-line body ``{"error": message}``."""
    send(request, code, json_line({"error": message}))


def _describe(request: Any) -> tuple[str, str]:
    """Method and path of *request* made safe for one log line (attacker-controlled text)."""
    method = escape_for_log(readable(bytes(request.method or b"")), 20)
    path = escape_for_log(readable(bytes(request.path or b"")), 200)
    return method, path


def log_server_error(request: Any, failure: Failure) -> None:
    """The one log line of a server error: method, path, error type and message, all escaped.

    No client address (privacy, issue 3) and no multi-line traceback.
    """
    method, path = _describe(request)
    log.error(
        "API {method} {path} failed: {error_type}: {error}",
        method=method,
        path=path,
        error_type=failure.type.__name__ if failure.type else "error",
        error=escape_for_log(failure.getErrorMessage(), 300),
    )


class APIResource(Resource):
    """The whole API as one leaf resource (routing in :func:`resolve`).

    Order of checks: route (404), method (405 with ``Allow``), token (401 with
    ``WWW-Authenticate: Bearer``; not for ``/health-check``), parameters (400), then the answer.

    :param database: anything with ``run_query(fn, *args) -> Deferred`` running ``fn(cursor,
        *args)`` off the reactor thread (:class:`sentrypeer.storage.database.Database`).
    :param token: the ``--api-token``; ``None`` or empty for an open API.
    """

    isLeaf = True

    def __init__(self, database: Any, token: str | None = None) -> None:
        super().__init__()
        self.database = database
        self.token = token or None

    def render(self, request: Any) -> int:
        """Answer *request* (always asynchronously: returns ``NOT_DONE_YET``).

        Any exception becomes a ``500 {"error": ...}`` and one log line, never Twisted's HTML
        error page.
        """
        try:
            self._dispatch(request)
        except Exception:
            self._server_error(request, Failure())
        return NOT_DONE_YET

    def _dispatch(self, request: Any) -> None:
        match = resolve(request.path)
        if match is None:
            send_error(request, http.NOT_FOUND, NOT_FOUND_MESSAGE)
            return
        route, segment = match
        if request.method not in ALLOWED_METHODS:
            request.responseHeaders.setRawHeaders(b"Allow", [ALLOW])
            send_error(request, http.NOT_ALLOWED, "Method not allowed")
            return
        if route == HEALTH:
            self._health_check(request)
            return
        if not credentials_match(_authorization(request), self.token, allow_basic=False):
            request.responseHeaders.setRawHeaders(b"WWW-Authenticate", [b"Bearer"])
            send_error(request, http.UNAUTHORIZED, "A valid API token is required")
            return
        try:
            if route == ROOT:
                send(request, http.OK, json_line({"status": "OK"}))
            elif route == IP_LIST:
                self._query(request, None, _ip_list_body, *parse_page(request.args))
            elif route == NUMBER_LIST:
                self._query(request, None, _number_list_body, *parse_page(request.args))
            elif route == IP:
                self._ip_address(request, segment)
            else:
                self._number(request, segment)
        except BadRequest as e:
            send_error(request, http.BAD_REQUEST, str(e))

    def _health_check(self, request: Any) -> None:
        request.responseHeaders.setRawHeaders(b"Vary", [b"Accept, Content-Type"])
        headers = request.requestHeaders
        content_type = (headers.getRawHeaders(b"content-type") or [None])[0]
        accept = b", ".join(headers.getRawHeaders(b"accept") or []) or None
        if wants_json(content_type, accept):
            body = {"status": "OK", "message": "Hello from SentryPeer!", "version": __version__}
            send(request, http.OK, json_pretty(body))
        else:
            send(request, http.OK, HEALTH_HTML, HTML_TYPE)

    def _ip_address(self, request: Any, segment: bytes) -> None:
        text = decode_segment(segment)
        forms = None if text is None else ip_lookup_forms(text)
        if forms is None:
            raise BadRequest(INVALID_MESSAGE)

        def answer(found: str | None) -> tuple[int, bytes]:
            if found is None:
                return http.NOT_FOUND, json_line({"message": NO_BAD_ACTOR})
            return http.OK, json_pretty({"bad_actor_found": found})

        self._query(request, answer, api_queries.find_ip_address, forms)

    def _number(self, request: Any, segment: bytes) -> None:
        text = decode_segment(segment)
        if text is None or not api_queries.is_number(text):
            raise BadRequest(INVALID_MESSAGE)

        def answer(found: str | None) -> tuple[int, bytes]:
            if found is None:
                return http.NOT_FOUND, json_line({"message": NO_PHONE_NUMBER})
            return http.OK, json_pretty({"phone_number_found": found})

        self._query(request, answer, api_queries.find_called_number, text)

    def _query(
        self,
        request: Any,
        answer: Callable[[Any], tuple[int, bytes]] | None,
        fn: Callable[..., Any],
        *args: Any,
    ) -> None:
        """Run ``fn(cursor, *args)`` through the database and send its answer.

        :param answer: turns the query's result into ``(status, body)``; ``None`` when the result
            already is the 200 body.
        """
        finished: list[bool] = []
        request.notifyFinish().addBoth(finished.append)  # the client may go away meanwhile

        def respond(result: Any) -> None:
            if finished:
                return
            code, body = (http.OK, result) if answer is None else answer(result)
            send(request, code, body)

        def failed(failure: Failure) -> None:
            if finished:
                log_server_error(request, failure)
                return
            self._server_error(request, failure)

        # Reads go to the database's reader connection when it has one, so they never wait for
        # (nor hold up) a batch of inserts.
        run = getattr(self.database, "run_read", None) or self.database.run_query
        d = maybeDeferred(run, fn, *args)
        d.addCallback(respond)
        d.addErrback(failed)
        d.addErrback(lambda f: log.failure("API: answering a request failed", f))

    def _server_error(self, request: Any, failure: Failure) -> None:
        log_server_error(request, failure)
        if getattr(request, "startedWriting", False):
            request.loseConnection()  # headers already out: all we can do is cut the response
            return
        send_error(request, http.INTERNAL_SERVER_ERROR, "Internal server error")


__all__ = [
    "ALLOW",
    "ALLOWED_METHODS",
    "APIResource",
    "BadRequest",
    "check_token",
    "credentials_match",
    "decode_segment",
    "encode_listing",
    "ip_lookup_forms",
    "normalise_ip",
    "parse_page",
    "resolve",
    "send",
    "wants_json",
]
