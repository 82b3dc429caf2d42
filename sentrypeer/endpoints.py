"""SIP listen descriptions and ``host:port`` addresses (interface.md §2).

Pure module: no Twisted import, no DNS, no I/O.

SIP listen descriptions are SentryPeer's own grammar and are parsed only here, never by Twisted's
``serverFromString``/``strports``: Twisted has no UDP endpoint at all, and since Twisted 26.4 its
``tls:`` endpoint means a certificate folder, not "SIP over TLS on this port".  The grammar is::

    TRANSPORT:PORT[:interface=ADDR]

``TRANSPORT`` is ``udp``, ``tcp`` or ``tls``; ``PORT`` is 0-65535 (0 asks the kernel for an
ephemeral port); ``ADDR`` is an IPv4 or IPv6 literal, written plain (``interface=::1``) or with the
colons escaped as Twisted's own descriptions need (``interface=\\:\\:1``).  Without ``interface``
the listener binds ``::``, which on a dual-stack host receives IPv4 and IPv6 alike.

``host:port`` / ``[v6]:port`` is the form of the original's ``-z`` option (reference §1.1, §10).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

#: Transports a SIP listen description may name.
TRANSPORTS = ("udp", "tcp", "tls")

#: The interface a listener binds when its description names none: IPv6 and IPv4 (dual stack).
DEFAULT_INTERFACE = "::"

#: A DNS host name as we accept it in ``host[:port]`` values (letters, digits, ``-``, ``_``, dots).
_HOSTNAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9_]([A-Za-z0-9_-]*[A-Za-z0-9_])?"
                       r"(\.[A-Za-z0-9_]([A-Za-z0-9_-]*[A-Za-z0-9_])?)*\.?$")

#: A backslash escape as Twisted's endpoint descriptions write it (``\\:`` for a literal colon).
_ESCAPE = re.compile(r"\\(.)")

#: Names we resolve ourselves rather than asking a resolver (see :func:`parse_host_port`).
_KNOWN_NAMES = {"localhost": "127.0.0.1"}


@dataclass(frozen=True)
class ListenSpec:
    """One SIP listener: a transport, a port and the local address to bind.

    :ivar transport: ``"udp"``, ``"tcp"`` or ``"tls"``.
    :ivar port: the port, 0-65535; 0 means an ephemeral port chosen at bind time.
    :ivar interface: an IPv4 or IPv6 literal in canonical (compressed) form; ``"::"`` binds every
        address, IPv4 included on a dual-stack host.
    """

    transport: str
    port: int
    interface: str = DEFAULT_INTERFACE


def _unescape(text: str) -> str:
    """Remove Twisted-style backslash escapes: ``\\:`` is ``:``, ``\\\\`` is ``\\``."""
    return _ESCAPE.sub(r"\1", text)


def _parse_port(text: str, what: str) -> int:
    """Return ``text`` as a port number (0-65535).

    :param what: how to name the value in an error message.
    :raises ValueError: when ``text`` is not a decimal number in range.
    """
    if not text.isascii() or not text.isdigit():
        raise ValueError(f"{what}: port {text!r} is not a number (0-65535)")
    port = int(text)
    if port > 65535:
        raise ValueError(f"{what}: port {port} is out of range (0-65535)")
    return port


def _canonical_address(text: str, what: str) -> str:
    """Return the IP literal ``text`` in canonical form (``0:0::0`` becomes ``::``).

    :raises ValueError: when ``text`` is not an IPv4 or IPv6 address.
    """
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise ValueError(f"{what}: {text!r} is not an IPv4 or IPv6 address") from None


def parse_listen(description: str) -> ListenSpec:
    """Parse a SIP listen description ``TRANSPORT:PORT[:interface=ADDR]`` (interface.md §2).

    The transport name is matched case-insensitively.  Everything after the ``interface=`` key is
    the address, so plain IPv6 (``tcp:5060:interface=::1``) needs no escaping; the escaped form
    (``interface=\\:\\:1``) is accepted too.

    :param description: the text given to ``--sip``, ``SENTRYPEER_SIP_LISTEN`` or ``sip_listen``.
    :returns: the listener it describes.
    :raises ValueError: on an unknown transport, a missing or out-of-range port, a parameter other
        than ``interface``, or an interface that is not an IP literal; the message quotes the
        description.
    """
    what = f"SIP listen description {description!r}"
    head, sep, rest = description.partition(":")
    transport = head.strip().lower()
    if transport not in TRANSPORTS:
        raise ValueError(f"{what}: transport {head!r} is not one of udp, tcp, tls")
    if not sep:
        raise ValueError(f"{what}: a port is missing (e.g. {transport}:5060)")
    port_text, sep, params = rest.partition(":")
    port = _parse_port(port_text, what)
    if not sep:
        return ListenSpec(transport, port)
    key, equals, value = params.partition("=")
    if key != "interface" or not equals:
        name = key if equals else params
        raise ValueError(f"{what}: unknown parameter {name!r} (only interface=ADDR is allowed)")
    address = _unescape(value)
    if not address:
        raise ValueError(f"{what}: interface is empty")
    return ListenSpec(transport, port, _canonical_address(address, what))


def format_listen(spec: ListenSpec) -> str:
    """Return the canonical text of ``spec``, e.g. ``udp:5060:interface=::`` (for logs).

    The result parses back to an equal :class:`ListenSpec` with :func:`parse_listen`.
    """
    return f"{spec.transport}:{spec.port}:interface={spec.interface}"


def split_host_port(text: str, default_port: int | None = None) -> tuple[str, int]:
    """Split ``host:port``, ``[v6]:port`` or (with ``default_port``) a bare host.

    The host is returned as written (brackets removed) and is not resolved: it may be an IP literal
    or a DNS name.  A bare IPv6 literal without brackets is taken as a host without a port, since
    its last colon cannot be told from a port separator.

    :param text: the value to split.
    :param default_port: the port to use when ``text`` has none; ``None`` makes the port
        mandatory.
    :returns: ``(host, port)``, port 0-65535.
    :raises ValueError: when the host is empty or malformed, the port is missing (and no
        default was given), not a number, or out of range.
    """
    what = f"address {text!r}"
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket:
            raise ValueError(f"{what}: missing ']' after the IPv6 address")
        _canonical_address(host, what)
        if rest.startswith(":"):
            return host, _parse_port(rest[1:], what)
        if rest:
            raise ValueError(f"{what}: unexpected {rest!r} after ']'")
        port_text = None
    elif text.count(":") > 1:
        host = text
        _canonical_address(host, what + " (write an IPv6 address with a port as [ADDR]:PORT)")
        port_text = None
    else:
        host, colon, port_text = text.partition(":")
        if not colon:
            port_text = None
        if not host:
            raise ValueError(f"{what}: the host is missing")
        if not _HOSTNAME.fullmatch(host):
            raise ValueError(f"{what}: {host!r} is not a host name or IP address")
    if port_text is not None:
        return host, _parse_port(port_text, what)
    if default_port is None:
        raise ValueError(f"{what}: a port is missing (write HOST:PORT, or [ADDR]:PORT for IPv6)")
    return host, default_port


def parse_host_port(text: str) -> tuple[str, int]:
    """Parse the original's ``-z`` form ``host:port`` / ``[v6]:port`` into a bindable address.

    The listener is bound to an IP literal, so the host must be one: ``0.0.0.0:5061``,
    ``127.0.0.1:5061``, ``[::]:5061``.  ``localhost`` (which the original also accepted, reference
    §10) is mapped to ``127.0.0.1``.  Any other name is refused: resolving it would mean a blocking
    DNS lookup while the daemon starts, whose answer may also change between starts.

    :param text: the value of ``-z``/``--tls-listen-address``, ``SENTRYPEER_TLS_LISTEN_ADDRESS`` or
        ``tls_listen_address``.
    :returns: ``(address, port)`` with the address in canonical form and port 0-65535.
    :raises ValueError: when the port is missing or invalid, or the host is a name other than
        ``localhost``.
    """
    host, port = split_host_port(text)
    host = _KNOWN_NAMES.get(host.lower(), host)
    try:
        return str(ipaddress.ip_address(host)), port
    except ValueError:
        raise ValueError(
            f"address {text!r}: {host!r} is not an IP address (only localhost is resolved;"
            " give an address such as 0.0.0.0 or [::])"
        ) from None
