"""Blocklist exports for firewalls (issue 8): ``/blocklist.txt``, ``/blocklist.ipset``, ``/blocklist.nft``.

The addresses are the ``source_ip`` values of events seen within the last ``days`` days (default
7, as APIBAN's lists), each with at least ``min_count`` events (default 1), from this node's own
events only unless ``peers=1`` (peer events: ``created_by_node_id`` set and not this node's id).
Never listed, whatever the data:

- loopback, link-local, unspecified and multicast addresses, and the limited broadcast
  (:data:`ALWAYS_EXCLUDED`): no real attacker sends from them, and blocking them breaks the host;
- the node's own addresses: those given to :class:`BlocklistResource` (the listen addresses) and
  every ``destination_ip`` of this node's events in the same time range (an address probes were
  sent to is one of ours);
- the operator's allowlist (``--blocklist-exclude FILE``: one address or CIDR per line, ``#``
  comments; :func:`load_exclude_file`), so a node never blocks its own SIP trunks.

Stored spellings are normalised (``::ffff:a.b.c.d`` is ``a.b.c.d``; an ``a.b.c.d:port`` or
``[v6]:port`` of an old database loses its port) and their counts merged before ``min_count``
applies; anything that is not an address is left out. Lists are sorted numerically, IPv4 first.

Formats (:func:`format_text`, :func:`format_ipset`, :func:`format_nft`):

- ``.txt``: one address per line, after ``#`` comment lines saying what the list holds;
- ``.ipset``: input for ``ipset restore`` defining two ``hash:ip`` sets, ``sentrypeer-v4``
  (``family inet``) and ``sentrypeer-v6`` (``family inet6``). Each is filled as a temporary
  ``…-new`` set that is then swapped in and destroyed, so loading it again replaces the contents
  atomically while firewall rules keep referencing the set;
- ``.nft``: input for ``nft -f`` (one atomic transaction): ``table inet sentrypeer`` with the named
  sets ``blocklist_v4`` (``ipv4_addr``) and ``blocklist_v6`` (``ipv6_addr``), flushed and refilled;
  the comment at its top shows a rule that uses them.

With ``--api-token`` set the lists need it, as the dashboard does (Bearer, or Basic with the token
as password: ``curl -u :TOKEN``).
"""

from __future__ import annotations

import bisect
import ipaddress
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from sentrypeer.api.dashboard import (
    TEXT_TYPE,
    answer_later,
    method_allowed,
    reader,
    require_token,
    send_secure,
)
from sentrypeer.api.resources import log_server_error
from sentrypeer.storage import dashboard_queries as dq
from sentrypeer.storage.queries import split_address_port

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

#: Paths served, and the format of each.
PATHS = {b"/blocklist.txt": "txt", b"/blocklist.ipset": "ipset", b"/blocklist.nft": "nft"}

DEFAULT_DAYS = 7
MAX_DAYS = 3650
DEFAULT_MIN_COUNT = 1
MAX_MIN_COUNT = 1_000_000_000

#: ``ipset`` set names (at most 31 characters; the temporary sets add ``-new``).
IPSET_V4 = "sentrypeer-v4"
IPSET_V6 = "sentrypeer-v6"
#: ``maxelem`` of both sets. It is fixed: ``ipset restore`` refuses to "create" a set that exists
#: with another ``maxelem``, so a value depending on the list would break the second load.
IPSET_MAXELEM = dq.MAX_BLOCKLIST_ROWS
#: The nftables table (family ``inet``) and its sets.
NFT_TABLE = "sentrypeer"
NFT_SET_V4 = "blocklist_v4"
NFT_SET_V6 = "blocklist_v6"
#: Elements per ``add element`` statement of the ``.nft`` output.
NFT_CHUNK = 1000

#: Never listed: loopback, link-local, "this network"/unspecified, multicast, limited broadcast.
ALWAYS_EXCLUDED: tuple[Network, ...] = tuple(
    ipaddress.ip_network(text)
    for text in (
        "127.0.0.0/8", "169.254.0.0/16", "0.0.0.0/8", "224.0.0.0/4", "255.255.255.255/32",
        "::1/128", "fe80::/10", "::/128", "ff00::/8",
    )
)

CHALLENGES = (b'Basic realm="SentryPeer", charset="UTF-8"', b'Bearer realm="SentryPeer"')


class BlocklistExcludeError(ValueError):
    """``--blocklist-exclude`` cannot be used; the message is one line naming the file and, for a
    bad entry, its line number."""


class BadParameter(ValueError):
    """A query parameter is invalid: ``400`` with the message."""


# ---------------------------------------------------------------------------------------------
# Pure: allowlist, normalisation, the list, the formats


def parse_exclude(text: str, source: str = "--blocklist-exclude") -> tuple[Network, ...]:
    """The networks of an allowlist file's text.

    One entry per line: an IPv4 or IPv6 address or CIDR (host bits may be set: ``192.0.2.7/24``
    means ``192.0.2.0/24``); blank lines and everything from a ``#`` on are ignored. An
    IPv4-mapped IPv6 entry also excludes the IPv4 addresses it maps.

    :param source: names the file in error messages.
    :raises BlocklistExcludeError: a line holds anything else.
    """
    networks: list[Network] = []
    for number, line in enumerate(text.splitlines(), 1):
        entry = line.split("#", 1)[0].strip()
        if not entry:
            continue
        try:
            network = ipaddress.ip_network(entry, strict=False)
        except ValueError:
            shown = entry if len(entry) <= 60 else entry[:60] + "..."
            raise BlocklistExcludeError(
                f"{source}: line {number}: {shown!r} is not an IP address or CIDR"
            ) from None
        networks.append(network)
        if isinstance(network, ipaddress.IPv6Network) and network.prefixlen >= 96:
            mapped = network.network_address.ipv4_mapped
            if mapped is not None:
                networks.append(ipaddress.ip_network(f"{mapped}/{network.prefixlen - 96}", strict=False))
    return tuple(networks)


def load_exclude_file(path: str) -> tuple[Network, ...]:
    """Read and parse the ``--blocklist-exclude`` file (at start-up: blocking I/O).

    :raises BlocklistExcludeError: unreadable, not UTF-8, or a bad entry (one-line message
        ``--blocklist-exclude PATH: …``).
    """
    source = f"--blocklist-exclude {path}"
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read(16 * 1024 * 1024)
    except OSError as e:
        raise BlocklistExcludeError(f"{source}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise BlocklistExcludeError(f"{source}: not UTF-8 text") from None
    return parse_exclude(text, source)


def own_listen_addresses(specs: Iterable[Any]) -> tuple[str, ...]:
    """The addresses this node listens on, for ``own_addresses``: the ``interface`` of each SIP
    listen spec (:class:`sentrypeer.endpoints.ListenSpec`) that is one address, not a wildcard
    (``0.0.0.0``, ``::``)."""
    out: list[str] = []
    for spec in specs:
        address = normalise_address(getattr(spec, "interface", "") or "")
        if address is not None and not address.is_unspecified and str(address) not in out:
            out.append(str(address))
    return tuple(out)


class NetworkSet:
    """Membership of addresses in a set of networks, in O(log n) per address.

    The networks are merged into disjoint integer ranges per IP version and searched with
    :mod:`bisect` (an allowlist of thousands of ranges stays cheap for a list of a million
    addresses).
    """

    def __init__(self, networks: Iterable[Network]) -> None:
        self._ranges: dict[int, tuple[list[int], list[int]]] = {}
        by_version: dict[int, list[Network]] = {4: [], 6: []}
        for network in networks:
            by_version[network.version].append(network)
        for version, members in by_version.items():
            starts: list[int] = []
            ends: list[int] = []
            for network in ipaddress.collapse_addresses(members):  # type: ignore[type-var]
                starts.append(int(network.network_address))
                ends.append(int(network.broadcast_address))
            self._ranges[version] = (starts, ends)

    def __contains__(self, address: Address) -> bool:
        starts, ends = self._ranges[address.version]
        i = bisect.bisect_right(starts, int(address)) - 1
        return i >= 0 and int(address) <= ends[i]


def normalise_address(text: str) -> Address | None:
    """A stored ``source_ip``/``destination_ip`` as an address, or ``None`` when it is none.

    IPv4-mapped IPv6 becomes IPv4; ``a.b.c.d:port`` and ``[v6]:port`` lose the port; a scoped IPv6
    address (``fe80::1%eth0``) and anything else give ``None``.
    """
    if not text or len(text) > 64:
        return None
    split = split_address_port(text)
    if split is not None:
        text = split[0]
    if "%" in text:
        return None
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


class Blocklist(NamedTuple):
    """The addresses to block, sorted numerically.

    :ivar v4: IPv4 addresses.
    :ivar v6: IPv6 addresses.
    :ivar days: the time range, in days.
    :ivar min_count: the least events an address needed.
    :ivar peers: whether peers' events counted.
    :ivar generated: when the list was made (seconds since the epoch).
    """

    v4: list[ipaddress.IPv4Address]
    v6: list[ipaddress.IPv6Address]
    days: int
    min_count: int
    peers: bool
    generated: float


def build_blocklist(
    sources: Iterable[tuple[str, int]],
    *,
    min_count: int,
    excluded: NetworkSet,
    own: Iterable[str],
) -> tuple[list[ipaddress.IPv4Address], list[ipaddress.IPv6Address]]:
    """Normalise, merge, filter and sort the stored sources of the time range.

    :param sources: ``(stored source_ip, events)`` pairs
        (:func:`~sentrypeer.storage.dashboard_queries.blocklist_sources`).
    :param min_count: the least events (summed over an address's spellings) to be listed.
    :param excluded: the allowlist; :data:`ALWAYS_EXCLUDED` applies on top of it.
    :param own: the node's own addresses (any spelling; those that are not addresses are ignored).
    :returns: ``(IPv4 addresses, IPv6 addresses)``, each sorted.
    """
    counts: dict[Address, int] = {}
    for text, count in sources:
        address = normalise_address(text)
        if address is not None:
            counts[address] = counts.get(address, 0) + count
    own_addresses = {a for a in (normalise_address(text) for text in own) if a is not None}
    v4: list[ipaddress.IPv4Address] = []
    v6: list[ipaddress.IPv6Address] = []
    for address, count in counts.items():
        if count < min_count or address in own_addresses or address in _ALWAYS or address in excluded:
            continue
        (v4 if address.version == 4 else v6).append(address)  # type: ignore[arg-type]
    v4.sort()
    v6.sort()
    return v4, v6


_ALWAYS = NetworkSet(ALWAYS_EXCLUDED)


def _header(blocklist: Blocklist, what: str) -> list[str]:
    generated = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(blocklist.generated))
    origin = "this node's and its peers' events" if blocklist.peers else "this node's own events"
    return [
        f"# SentryPeer blocklist ({what}), generated {generated} UTC",
        f"# {len(blocklist.v4)} IPv4 and {len(blocklist.v6)} IPv6 source addresses seen within"
        f" {blocklist.days} days, at least {blocklist.min_count} events each, from {origin}",
    ]


def format_text(blocklist: Blocklist) -> bytes:
    """One address per line, IPv4 first, after two ``#`` comment lines."""
    lines = _header(blocklist, "one address per line")
    lines.extend(str(address) for address in blocklist.v4)
    lines.extend(str(address) for address in blocklist.v6)
    return ("\n".join(lines) + "\n").encode("ascii")


def _ipset_set(lines: list[str], name: str, family: str, addresses: Sequence[Address]) -> None:
    params = f"hash:ip family {family} hashsize 1024 maxelem {IPSET_MAXELEM}"
    temporary = name + "-new"
    lines.append(f"create {name} {params} -exist")
    lines.append(f"create {temporary} {params} -exist")
    lines.append(f"flush {temporary}")
    lines.extend(f"add {temporary} {address}" for address in addresses)
    lines.append(f"swap {temporary} {name}")
    lines.append(f"destroy {temporary}")


def format_ipset(blocklist: Blocklist) -> bytes:
    """``ipset restore`` input: the sets :data:`IPSET_V4` and :data:`IPSET_V6`, replaced atomically.

    Use: ``curl -s URL | ipset restore``, then e.g.
    ``iptables -I INPUT -m set --match-set sentrypeer-v4 src -j DROP``.
    """
    lines = _header(blocklist, "ipset restore input")
    _ipset_set(lines, IPSET_V4, "inet", blocklist.v4)
    _ipset_set(lines, IPSET_V6, "inet6", blocklist.v6)
    return ("\n".join(lines) + "\n").encode("ascii")


def format_nft(blocklist: Blocklist) -> bytes:
    """``nft -f`` input: ``table inet sentrypeer`` with the sets :data:`NFT_SET_V4` and
    :data:`NFT_SET_V6`, flushed and refilled in one transaction."""
    lines = _header(blocklist, "nft -f input")
    lines += [
        "# Use it from a chain of the same table, e.g.:",
        f"#   nft add chain inet {NFT_TABLE} input '{{ type filter hook input priority -10; }}'",
        f"#   nft add rule inet {NFT_TABLE} input ip saddr @{NFT_SET_V4} drop",
        f"#   nft add rule inet {NFT_TABLE} input ip6 saddr @{NFT_SET_V6} drop",
        f"table inet {NFT_TABLE} {{",
        f"\tset {NFT_SET_V4} {{",
        "\t\ttype ipv4_addr",
        "\t}",
        f"\tset {NFT_SET_V6} {{",
        "\t\ttype ipv6_addr",
        "\t}",
        "}",
        f"flush set inet {NFT_TABLE} {NFT_SET_V4}",
        f"flush set inet {NFT_TABLE} {NFT_SET_V6}",
    ]
    for name, addresses in ((NFT_SET_V4, blocklist.v4), (NFT_SET_V6, blocklist.v6)):
        for start in range(0, len(addresses), NFT_CHUNK):
            chunk = ", ".join(str(a) for a in addresses[start:start + NFT_CHUNK])
            lines.append(f"add element inet {NFT_TABLE} {name} {{ {chunk} }}")
    return ("\n".join(lines) + "\n").encode("ascii")


FORMATTERS: dict[str, Callable[[Blocklist], bytes]] = {
    "txt": format_text,
    "ipset": format_ipset,
    "nft": format_nft,
}


def _integer(args: dict[bytes, list[bytes]], name: str, default: int, low: int, high: int) -> int:
    values = args.get(name.encode("ascii")) or []
    if not values:
        return default
    if len(values) > 1:
        raise BadParameter(f"{name} given more than once")
    raw = values[0]
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 12) or not low <= int(raw) <= high:
        raise BadParameter(f"{name} must be a whole number from {low} to {high}")
    return int(raw)


class Parameters(NamedTuple):
    """The query parameters of a blocklist request."""

    days: int
    min_count: int
    peers: bool


def parse_parameters(args: dict[bytes, list[bytes]]) -> Parameters:
    """``days`` (1 to :data:`MAX_DAYS`, default 7), ``min_count`` (default 1), ``peers`` (0 or 1,
    default 0); other parameters are ignored.

    :raises BadParameter: a value out of range, not a decimal integer, or given twice.
    """
    return Parameters(
        _integer(args, "days", DEFAULT_DAYS, 1, MAX_DAYS),
        _integer(args, "min_count", DEFAULT_MIN_COUNT, 1, MAX_MIN_COUNT),
        bool(_integer(args, "peers", 0, 0, 1)),
    )


def blocklist_data(cursor: Any, since: str, peers: bool) -> tuple[list[tuple[str, int]], list[str]]:
    """``run_query`` function: the sources of the time range and this node's destinations."""
    return dq.blocklist_sources(cursor, since, peers), dq.own_destinations(cursor, since)


# ---------------------------------------------------------------------------------------------
# The resource


def _error(code: int, message: str) -> bytes:
    return f"{code} {message}\n".encode()


class BlocklistResource(Resource):
    """``/blocklist.txt``, ``/blocklist.ipset`` and ``/blocklist.nft`` (one leaf resource).

    :param database: anything with ``run_read`` or ``run_query(fn, *args) -> Deferred``.
    :param token: ``--api-token``; ``None`` or empty for open lists.
    :param clock: gives "now" (``seconds()``); ``None`` for the system clock.
    :param exclude: the operator's allowlist (:func:`load_exclude_file`).
    :param own_addresses: the node's own addresses (listen addresses), never listed.
    """

    isLeaf = True

    def __init__(
        self,
        database: Any,
        token: str | None = None,
        clock: Any = None,
        exclude: Iterable[Network] = (),
        own_addresses: Iterable[str] = (),
    ) -> None:
        super().__init__()
        self.database = database
        self.token = token or None
        self._now: Callable[[], float] = clock.seconds if clock is not None else time.time
        self.exclude = NetworkSet(exclude)
        self.own_addresses = tuple(own_addresses)

    def render(self, request: Any) -> int:
        """Answer *request* (``NOT_DONE_YET``)."""
        try:
            self._dispatch(request)
        except Exception:
            log_server_error(request, Failure())
            if not getattr(request, "startedWriting", False):
                send_secure(request, http.INTERNAL_SERVER_ERROR, _error(500, "Internal error"), TEXT_TYPE)
        return NOT_DONE_YET

    def _dispatch(self, request: Any) -> None:
        if not method_allowed(request, _error, TEXT_TYPE):
            return
        if not require_token(request, self.token, CHALLENGES, _error, TEXT_TYPE):
            return
        kind = PATHS.get(request.path)
        if kind is None:
            send_secure(request, http.NOT_FOUND, _error(404, "Not found"), TEXT_TYPE)
            return
        try:
            params = parse_parameters(request.args)
        except BadParameter as e:
            send_secure(request, http.BAD_REQUEST, _error(400, str(e)), TEXT_TYPE)
            return
        now = self._now()
        since = dq.cutoff(now, params.days * 86400)

        def respond(result: tuple[list[tuple[str, int]], list[str]]) -> None:
            sources, destinations = result
            v4, v6 = build_blocklist(
                sources,
                min_count=params.min_count,
                excluded=self.exclude,
                own=(*self.own_addresses, *destinations),
            )
            blocklist = Blocklist(v4, v6, params.days, params.min_count, params.peers, now)
            send_secure(request, http.OK, FORMATTERS[kind](blocklist), TEXT_TYPE)

        answer_later(
            request, lambda: reader(self.database)(blocklist_data, since, params.peers), respond, _error,
            TEXT_TYPE,
        )


__all__ = [
    "ALWAYS_EXCLUDED",
    "IPSET_V4",
    "IPSET_V6",
    "NFT_SET_V4",
    "NFT_SET_V6",
    "NFT_TABLE",
    "Blocklist",
    "BlocklistExcludeError",
    "BlocklistResource",
    "NetworkSet",
    "build_blocklist",
    "format_ipset",
    "format_nft",
    "format_text",
    "load_exclude_file",
    "normalise_address",
    "own_listen_addresses",
    "parse_exclude",
    "parse_parameters",
]
