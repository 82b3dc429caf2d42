"""Peer-to-peer replication of bad actors over OpenDHT (interface.md §6, reference §9).

The DHT node runs in a child process (:mod:`sentrypeer.dht.worker`, the only module that imports
``opendht``), because the Python binding segfaults and deadlocks in reproducible ways
(``guides/opendht-notes.md`` §4). The honeypot talks to it with newline-delimited JSON over the
child's stdin and stdout (:mod:`sentrypeer.dht.protocol`); :mod:`sentrypeer.dht.service` owns the
child, restarts it, publishes our events and stores what peers send, after the pure checks of
:mod:`sentrypeer.dht.validate`. :mod:`sentrypeer.dht.signing` holds the Ed25519 node key used by
``--dht-sign`` and ``--dht-trusted-nodes``.

This module holds the constants both sides of the pipe share. It imports neither Twisted nor
``opendht``, so the worker starts fast and the honeypot can check for the binding without loading it.

Messages (one JSON object per line, UTF-8, at most :data:`MAX_LINE_BYTES` bytes with the newline):

=============  =========  ============================================================================
``op``         direction  other keys
=============  =========  ============================================================================
``put``        to child   ``id`` (int), ``data`` (base64 of the value bytes)
``stats``      to child   none: asks for a ``stats`` message now
``stop``       to child   none: cancel the listen, shut the node down, exit 0
``ready``      to parent  ``port``, ``port6`` (int or null), ``node_id`` (hex routing id), ``version``,
                          ``permanent`` (bool: permanent puts, as far as known before the first put),
                          ``ipv6`` (bool: an IPv6 socket exists, opendht-notes §4.3); without
                          permanent puts, ``reput_interval`` (seconds between re-puts)
``value``      to parent  ``data`` (base64 of the bytes of a value received on the key)
``put_done``   to parent  ``id``, ``ok`` (bool), ``nodes`` (int: nodes that acknowledged)
``stats``      to parent  counters (ints), ``bootstrap_ok`` and ``bootstrap_self`` (bool: the node is
                          its own bootstrap node); also sent every heartbeat, which proves it alive
``log``        to parent  ``level`` (``debug``/``info``/``warn``/``error``), ``message`` (str)
=============  =========  ============================================================================
"""

from __future__ import annotations

import importlib.util
import ipaddress
import socket

#: The DHT key every SentryPeer node puts on and listens to (reference §9).
KEY_NAME = "bad_actors"
#: SHA-1 of :data:`KEY_NAME`, as OpenDHT's ``InfoHash.get`` computes it (reference §9).
KEY_INFOHASH = "14d30143330e2e0e922ed4028a60ff96a59800ad"

#: Longest accepted line on the pipe in either direction, newline included. A value is at most
#: 64 KiB (OpenDHT's ``MAX_VALUE_SIZE``); base64 makes it 4/3 larger, plus the message keys.
MAX_LINE_BYTES = 128 * 1024

#: Exit status of the worker when ``import opendht`` fails: restarting it would not help.
EXIT_NO_OPENDHT = 3
#: Exit status of the worker for bad command-line arguments.
EXIT_USAGE = 2
#: Exit status of the worker when the node cannot start (port in use, bad bind address).
EXIT_START_FAILED = 4

OP_PUT = "put"
OP_STATS = "stats"
OP_STOP = "stop"
OP_READY = "ready"
OP_VALUE = "value"
OP_PUT_DONE = "put_done"
OP_LOG = "log"

#: Operations the parent sends to the child.
TO_CHILD_OPS = frozenset({OP_PUT, OP_STATS, OP_STOP})
#: Operations the child sends to the parent.
TO_PARENT_OPS = frozenset({OP_READY, OP_VALUE, OP_PUT_DONE, OP_STATS, OP_LOG})

#: The name of the worker module, for ``python -m``.
WORKER_MODULE = "sentrypeer.dht.worker"


class DHTStartupError(Exception):
    """Peer-to-peer mode cannot start; the message is one line naming the thing and the cause
    (interface.md §1), for the root service to log before exiting with status 1."""


class DHTUnavailableError(DHTStartupError):
    """Peer-to-peer mode was asked for, but the OpenDHT Python binding is not installed."""


def opendht_available() -> bool:
    """Whether ``import opendht`` would find the binding, without importing it (no OpenDHT code
    runs in the honeypot's process)."""
    try:
        return importlib.util.find_spec("opendht") is not None
    except (ImportError, ValueError):
        return False


def require_opendht() -> None:
    """Raise :class:`DHTUnavailableError` with a one-line message when the binding is missing.

    Call it at start-up when ``-p/--p2p`` is given; nothing else needs the binding.

    :raises DHTUnavailableError: ``opendht`` cannot be found by this interpreter (the worker runs
        under the same one).
    """
    if not opendht_available():
        raise DHTUnavailableError(
            "-p/--p2p needs the OpenDHT Python binding, which is not installed: "
            "pip install 'sentrypeer[dht]' (PyPI opendht) or apt install python3-opendht"
        )


def bind_addresses(bind: str | None) -> tuple[str, str]:
    """``(ipv4, ipv6)`` for ``DhtRunner.run``.

    OpenDHT needs an IPv6 socket for a listen to be cancellable and a stop to be clean
    (opendht-notes §4.3), so a node bound to an IPv4 address also binds ``::1`` (loopback only:
    nothing more is exposed; OpenDHT silently skips it on a host without IPv6), and a node bound
    to an IPv6 address also binds ``127.0.0.1``. ``::`` means both families, like ``--sip``.
    """
    if bind is None:
        return "", ""
    address = ipaddress.ip_address(bind)
    if address.version == 4:
        return str(address), "::1"
    if address == ipaddress.IPv6Address("::"):
        return "0.0.0.0", "::"
    return "127.0.0.1", str(address)


def check_udp_port(ipv4: str, ipv6: str, port: int) -> str | None:
    """Bind throw-away UDP sockets where the node will bind, because OpenDHT aborts the whole
    process (an uncaught C++ exception) when its bind fails.

    :returns: ``None``, or a one-line reason naming the address.
    """
    if port == 0:
        return None
    sockets = []
    try:
        for family, host in ((socket.AF_INET, ipv4 or "0.0.0.0"), (socket.AF_INET6, ipv6 or "::")):
            try:
                s = socket.socket(family, socket.SOCK_DGRAM)
            except OSError:
                continue  # no such family here: OpenDHT skips it too
            sockets.append(s)
            if family == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                s.bind((host, port))
            except OSError as e:
                if family == socket.AF_INET6 and host == "::1" and ipv4:
                    continue  # the extra loopback socket is optional
                shown = f"[{host}]" if ":" in host else host
                return f"cannot bind UDP {shown}:{port}: {e.strerror or e}"
        return None
    finally:
        for s in sockets:
            s.close()
