"""The DHT child process: ``python -m sentrypeer.dht.worker [options]``.

This is the only module that imports ``opendht``. It runs one OpenDHT node (``DhtRunner``) on the
``bad_actors`` key and speaks newline-delimited JSON with the honeypot over stdin and stdout (the
messages are listed in :mod:`sentrypeer.dht`). The honeypot starts it with ``reactor.spawnProcess``
and owns its life: a crash or a hang here costs a restart of this process, never the honeypot.

Threads, and why (``guides/opendht-notes.md`` §4):

* the **main thread** reads commands from stdin and calls ``put``; it never calls a method that takes
  the runner mutex after the node started (``getBound`` is called once, before the first listen or
  put, §4.2), never ``join()`` (§4.2, §4.3: the process ends with ``os._exit`` after the shutdown
  callback instead), never the blocking ``put``/``get`` (every ``put`` has a ``done_cb``, without which
  ``permanent`` is dropped, §API facts);
* the **DHT thread** (OpenDHT's own) runs our callbacks while it holds the runner mutex, so they
  only append to a queue and always return ``True`` (§4.4), catching everything;
* the **writer thread** turns queued items into lines on stdout, and sends a ``stats`` heartbeat
  every ``--heartbeat`` seconds. A child stuck in the binding stops sending heartbeats, and the
  honeypot kills it;
* the **maintenance thread** resolves the bootstrap host (DNS never blocks the DHT or the honeypot),
  bootstraps, pings the bootstrap node to log whether it answers, and retries with backoff forever
  (an unreachable bootstrap node is never fatal); with a binding lacking permanent puts (Debian 12's
  2.4.12) it also re-puts this node's recent values before they expire.

The process ends on a ``stop`` command or when stdin closes (the honeypot went away); on Linux it is
also sent SIGTERM when its parent dies (``PR_SET_PDEATHSIG``). SIGINT is ignored: a Ctrl-C in a
terminal reaches the whole process group, and the honeypot decides when its child stops.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import collections
import ctypes
import json
import os
import queue
import signal
import socket
import sys
import threading
import time
from typing import Any, BinaryIO

from sentrypeer.dht import (
    EXIT_NO_OPENDHT,
    EXIT_START_FAILED,
    EXIT_USAGE,
    KEY_NAME,
    MAX_LINE_BYTES,
    OP_LOG,
    OP_PUT,
    OP_PUT_DONE,
    OP_READY,
    OP_STATS,
    OP_STOP,
    OP_VALUE,
    bind_addresses,
    check_udp_port,
)

#: Most items waiting for the writer thread; values beyond are dropped and counted.
MAX_QUEUE = 10_000
#: Largest value put, in bytes (OpenDHT refuses more than 64 KiB with its metadata).
MAX_PUT_BYTES = 64 * 1024
#: Seconds to wait for OpenDHT's shutdown callback before exiting anyway.
SHUTDOWN_TIMEOUT = 3.0
#: Bootstrap retry delays in seconds: first, then doubled up to the last.
BOOTSTRAP_FIRST_RETRY = 5.0
BOOTSTRAP_MAX_RETRY = 300.0
#: Without permanent puts (OpenDHT < 3): values expire 10 minutes after their put; this node's
#: values younger than :data:`REPUT_WINDOW` seconds are put again :data:`REPUT_AGE` seconds after
#: their last put, and at most :data:`MAX_REPUT` values are remembered.
REPUT_WINDOW = 600.0
REPUT_AGE = 540.0
MAX_REPUT = 10_000


def _parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m sentrypeer.dht.worker", add_help=True)
    parser.add_argument("--port", type=int, default=4222, help="UDP port (0: ephemeral)")
    parser.add_argument("--bind", default=None, help="address to bind (default: all, IPv4 and IPv6)")
    parser.add_argument("--network", type=int, default=0, help="OpenDHT network id")
    parser.add_argument("--bootstrap-host", default=None)
    parser.add_argument("--bootstrap-port", type=int, default=4222)
    parser.add_argument("--peer-discovery", action="store_true")
    parser.add_argument("--heartbeat", type=float, default=5.0, help="seconds between stats lines")
    parser.add_argument("--verbose", action="store_true", help="OpenDHT's own log on stderr")
    args = parser.parse_args(argv)
    if not 0 <= args.port <= 65535 or not 0 <= args.bootstrap_port <= 65535:
        parser.error("port out of range")
    if not 0 <= args.network <= 0xFFFFFFFF:
        parser.error("network id out of range")
    if args.heartbeat <= 0:
        parser.error("--heartbeat must be positive")
    return args


class Counters:
    """Thread-safe integer counters (incremented from the DHT thread and ours)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[str, int] = collections.defaultdict(int)

    def add(self, name: str, amount: int = 1) -> None:
        with self._lock:
            self._values[name] += amount

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._values)


class Output:
    """Lines to the honeypot, written by one thread so messages never interleave.

    :param stream: the binary stdout.
    :param heartbeat: seconds between ``stats`` lines.
    :param stats: returns the counters sent in each ``stats`` line.
    """

    def __init__(self, stream: BinaryIO, heartbeat: float, stats, counters: Counters) -> None:
        self._stream = stream
        self._heartbeat = heartbeat
        self._stats = stats
        self._counters = counters
        self._queue: queue.Queue = queue.Queue(MAX_QUEUE)
        self._thread = threading.Thread(target=self._run, name="sentrypeer-dht-writer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def offer(self, item: Any) -> bool:
        """Queue a message (a dict) or ``("value", bytes)``; never blocks (safe on the DHT thread).

        :returns: ``False`` when the queue was full and the item was dropped (counted).
        """
        try:
            self._queue.put_nowait(item)
            return True
        except queue.Full:
            self._counters.add("dropped_queue_full")
            return False

    def send_now(self, message: dict) -> None:
        """Write *message* from the calling thread (before the writer thread starts)."""
        self._write(message)

    def log(self, level: str, message: str) -> None:
        self.offer({"op": OP_LOG, "level": level, "message": message})

    def close(self, timeout: float) -> None:
        """Write what is queued (a final ``stats`` included), then stop the thread."""
        self.offer(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        next_beat = time.monotonic()
        while True:
            now = time.monotonic()
            if now >= next_beat:
                self._write(self._stats())
                next_beat = now + self._heartbeat
            try:
                item = self._queue.get(timeout=max(0.0, next_beat - time.monotonic()))
            except queue.Empty:
                continue
            if item is None:
                self._write(self._stats())
                return
            if isinstance(item, tuple):
                item = {"op": OP_VALUE, "data": base64.b64encode(item[1]).decode("ascii")}
            self._write(item)

    def _write(self, message: dict) -> None:
        line = json.dumps(message, separators=(",", ":")).encode("utf-8") + b"\n"
        try:
            self._stream.write(line)
            self._stream.flush()
        except (BrokenPipeError, OSError, ValueError):
            # The honeypot is gone: nobody is left to serve.
            os._exit(0)


def _die_with_parent() -> None:
    """Ask Linux to send SIGTERM when the parent dies; elsewhere, stdin EOF does the job."""
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(0)


class Node:
    """One OpenDHT node on the ``bad_actors`` key.

    :param dht: the ``opendht`` module.
    :param args: the parsed command line.
    :param out: where messages go.
    :param counters: shared counters.
    """

    def __init__(self, dht: Any, args: argparse.Namespace, out: Output, counters: Counters) -> None:
        self.dht = dht
        self.args = args
        self.out = out
        self.counters = counters
        self.runner: Any = None
        self.key = dht.InfoHash.get(KEY_NAME)
        self.token: Any = None
        self.has_ipv6 = False
        self.permanent = True
        self.started = time.monotonic()
        self._stop = threading.Event()
        self._reput_lock = threading.Lock()
        self._reput: collections.deque = collections.deque()  # (first put, last put, bytes)
        self._bootstrap_ok = False
        self._bootstrap_warned = False
        self._bootstrap_self = False
        self.ports: set[int] = set()

    # -- start ------------------------------------------------------------------------------

    def start(self) -> dict:
        """Run the node, listen on the key, start bootstrapping.

        :returns: the ``ready`` message.
        :raises RuntimeError: the node cannot start (message for the honeypot's log).
        """
        dht, args = self.dht, self.args
        ipv4, ipv6 = bind_addresses(args.bind)
        problem = check_udp_port(ipv4, ipv6, args.port)
        if problem:
            raise RuntimeError(problem)
        config = dht.DhtConfig()  # always a fresh one: the default argument is shared (§API facts)
        config.setNetwork(args.network)
        if hasattr(config, "setPeerDiscovery"):
            config.setPeerDiscovery(args.peer_discovery, args.peer_discovery)
        elif args.peer_discovery:
            self.out.log("warn", "--dht-peer-discovery: this OpenDHT binding has no peer discovery; ignored")
        self.runner = dht.DhtRunner()
        if args.verbose and hasattr(self.runner, "enableLogging"):
            self.runner.enableLogging()
        self.runner.run(port=args.port, ipv4=ipv4, ipv6=ipv6, config=config)
        # getBound takes the runner mutex: only now, before the first listen or put (§4.2).
        bound4 = self.runner.getBound(socket.AF_INET)
        bound6 = self.runner.getBound(socket.AF_INET6)
        port4, port6 = _bound_port(bound4), _bound_port(bound6)
        self.has_ipv6 = port6 is not None
        self.ports = {port for port in (port4, port6) if port is not None}
        if port4 is None and port6 is None:
            raise RuntimeError(f"OpenDHT bound no socket (port {args.port}, bind {args.bind or 'all'})")
        self.permanent = self._supports_permanent()
        self.token = self.runner.listen(self.key, self._on_value)
        threading.Thread(target=self._maintain, name="sentrypeer-dht-maintenance", daemon=True).start()
        ready = {
            "op": OP_READY,
            "port": port4 if port4 is not None else port6,
            "port6": port6,
            "node_id": _hex(self.runner.getNodeId()),
            "version": _version(dht),
            "permanent": self.permanent,
            "ipv6": self.has_ipv6,
        }
        if not self.permanent:
            ready["reput_interval"] = REPUT_AGE
        return ready

    def _supports_permanent(self) -> bool:
        import inspect

        try:
            return "permanent" in inspect.signature(self.runner.put).parameters
        except (TypeError, ValueError):
            return True  # unknown: try it, and fall back on the first TypeError

    # -- callbacks on the DHT thread: tiny, never raise, always True (§4.2, §4.4) --------------

    def _on_value(self, value: Any, expired: bool) -> bool:
        try:
            if expired:
                self.counters.add("expired")
            else:
                self.counters.add("values_received")
                self.out.offer(("value", value.data))
        except BaseException:  # noqa: B036 - an exception here would end the listen (§4.4)
            pass
        return True

    def _put_done(self, put_id: int) -> Any:
        def done(ok: bool, nodes: Any) -> None:
            try:
                self.counters.add("puts_ok" if ok else "puts_failed")
                self.out.offer({"op": OP_PUT_DONE, "id": put_id, "ok": bool(ok), "nodes": len(nodes)})
            except BaseException:  # noqa: B036
                pass

        return done

    # -- commands (main thread) ---------------------------------------------------------------

    def serve(self, stream: BinaryIO) -> None:
        """Read commands until ``stop`` or end of input; bad lines are counted and ignored."""
        while True:
            line = stream.readline(MAX_LINE_BYTES + 1)
            if not line:
                return
            if len(line) > MAX_LINE_BYTES or not line.endswith(b"\n"):
                self.counters.add("malformed_commands")
                while line and not line.endswith(b"\n"):  # skip the rest of an over-long line
                    line = stream.readline(MAX_LINE_BYTES)
                continue
            try:
                message = json.loads(line)
                op = message["op"]
            except (ValueError, TypeError, KeyError):
                self.counters.add("malformed_commands")
                continue
            if op == OP_STOP:
                return
            if op == OP_STATS:
                self.out.offer(self.stats())
            elif op == OP_PUT:
                self._put(message)
            else:
                self.counters.add("malformed_commands")

    def _put(self, message: dict) -> None:
        put_id = message.get("id")
        data = message.get("data")
        if not isinstance(put_id, int) or not isinstance(data, str):
            self.counters.add("malformed_commands")
            return
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raw = None
        if raw is None or not raw or len(raw) > MAX_PUT_BYTES:
            self.counters.add("malformed_commands")
            self.out.offer({"op": OP_PUT_DONE, "id": put_id, "ok": False, "nodes": 0})
            return
        self._do_put(raw, self._put_done(put_id))
        if not self.permanent:
            now = time.monotonic()
            with self._reput_lock:
                self._reput.append((now, now, raw))
                while len(self._reput) > MAX_REPUT:
                    self._reput.popleft()

    def _do_put(self, raw: bytes, done: Any) -> None:
        value = self.dht.Value(raw)
        try:
            value.user_type = "text/plain"  # as the original's dht_value_new_from_string
        except (AttributeError, TypeError):
            pass
        self.counters.add("puts")
        if self.permanent:
            try:
                self.runner.put(self.key, value, done_cb=done, permanent=True)
                return
            except TypeError:
                self.permanent = False
                self.out.log("info", "this OpenDHT binding has no permanent puts: re-putting values every "
                             f"{REPUT_AGE / 60:g} min for {REPUT_WINDOW / 60:g} min")
        self.runner.put(self.key, value, done_cb=done)

    # -- maintenance thread -------------------------------------------------------------------

    def _maintain(self) -> None:
        delay = BOOTSTRAP_FIRST_RETRY
        next_bootstrap = time.monotonic()
        while not self._stop.wait(timeout=1.0):
            if self.args.bootstrap_host and not self._bootstrap_self and time.monotonic() >= next_bootstrap:
                if self._bootstrap():
                    delay = BOOTSTRAP_FIRST_RETRY
                    next_bootstrap = time.monotonic() + BOOTSTRAP_MAX_RETRY  # refresh now and then
                else:
                    next_bootstrap = time.monotonic() + delay
                    delay = min(delay * 2, BOOTSTRAP_MAX_RETRY)
            if not self.permanent:
                self._reput_due(time.monotonic())

    def _bootstrap(self) -> bool:
        """Resolve and bootstrap, then ping to learn whether the node answers. Never raises."""
        host, port = self.args.bootstrap_host, self.args.bootstrap_port
        self.counters.add("bootstrap_attempts")
        shown = f"{host}:{port}"
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
        except (OSError, UnicodeError) as e:
            level = "debug" if self._bootstrap_warned and not self._bootstrap_ok else "warn"
            self.out.log(level, f"bootstrap node {shown}: cannot resolve ({e}); retrying")
            self._bootstrap_warned = True
            self._bootstrap_ok = False
            return False
        addresses = []
        for family, _type, _proto, _name, sockaddr in infos:
            if family == socket.AF_INET6 and not self.has_ipv6:
                continue
            if sockaddr[0] not in addresses:
                addresses.append(sockaddr[0])
        others = [address for address in addresses if not self._is_self(address, port)]
        if addresses and not others:
            # A seed node told to bootstrap from itself: nothing to retry, peers come to it.
            self.out.log("info", f"bootstrap node {shown} is this node's own address and port: "
                                 "this node is the bootstrap node")
            self._bootstrap_self = True
            return True
        addresses = others
        can_ping = hasattr(self.runner, "ping") and hasattr(self.dht.SockAddr, "resolve")
        if not can_ping:
            # Older bindings (2.4.12) cannot build an address to ping: bootstrap, and trust it.
            for address in addresses[:4]:
                try:
                    self.runner.bootstrap(address, str(port))
                except Exception as e:
                    self.out.log("warn", f"bootstrap node {shown} ({address}): {e}")
            if not self._bootstrap_ok:
                self.out.log("info", f"bootstrapping from {shown} (this binding cannot check it answers)")
            self._bootstrap_ok = True
            return True
        answered = threading.Event()
        for address in addresses[:4]:
            try:
                self.runner.bootstrap(address, str(port))
                for sock_addr in self.dht.SockAddr.resolve(address, str(port)):
                    self.runner.ping(sock_addr, lambda ok: ok and answered.set())
            except Exception as e:  # a binding error must not end the thread
                self.out.log("warn", f"bootstrap node {shown} ({address}): {e}")
        if answered.wait(timeout=10.0):
            if not self._bootstrap_ok:
                self.out.log("info", f"bootstrap node {shown} answered")
            self._bootstrap_ok = True
            self.counters.add("bootstrap_ok")
            return True
        # Warn when it starts failing; later failures of the same run only at debug level.
        level = "debug" if self._bootstrap_warned and not self._bootstrap_ok else "warn"
        self.out.log(level, f"bootstrap node {shown} did not answer; retrying")
        self._bootstrap_warned = True
        self._bootstrap_ok = False
        return False

    def _is_self(self, address: str, port: int) -> bool:
        """Whether *address*:*port* is this node's own DHT socket: our bound port, on an address
        we bound (a specific one, or any local address when bound to all)."""
        if port not in self.ports:
            return False
        host = address.split("%", 1)[0]
        ipv4, ipv6 = bind_addresses(self.args.bind)
        bound = ipv6 if ":" in host else ipv4
        if bound and bound not in ("0.0.0.0", "::"):
            try:
                return socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host) == \
                    socket.inet_pton(socket.AF_INET6 if ":" in bound else socket.AF_INET, bound)
            except OSError:
                return False
        # Bound to all addresses: ours when the address is local (it can be bound here).
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            with socket.socket(family, socket.SOCK_DGRAM) as s:
                s.bind((address, 0))
        except OSError:
            return False
        return True

    def _reput_due(self, now: float) -> None:
        due = []
        with self._reput_lock:
            while self._reput and now - self._reput[0][0] >= REPUT_WINDOW:
                self._reput.popleft()
            kept = collections.deque()
            for first, last, raw in self._reput:
                if now - last >= REPUT_AGE:
                    due.append(raw)
                    kept.append((first, now, raw))
                else:
                    kept.append((first, last, raw))
            self._reput = kept
        for raw in due:
            self.counters.add("reputs")
            self._do_put(raw, lambda ok, nodes: None)

    # -- stop ---------------------------------------------------------------------------------

    def stop(self) -> None:
        """Cancel the listen and shut the node down; give up after :data:`SHUTDOWN_TIMEOUT`.

        ``join()`` is never called (§4.2, §4.3): the process exits right after.
        """
        self._stop.set()
        if self.runner is None:
            return
        if self.token is not None and self.has_ipv6:
            # cancelListen releases the callback of the most recent listen in the process (§4.1):
            # give that reference back first. There is one listen here, so it is ours; it leaks.
            try:
                shared = self.dht.ListenToken._cb.get("cb")
                if shared is not None:
                    ctypes.pythonapi.Py_IncRef(ctypes.py_object(shared))
                self.runner.cancelListen(self.token)
            except Exception:
                pass
        done = threading.Event()
        try:
            self.runner.shutdown(lambda: done.set())
        except Exception:
            return
        done.wait(SHUTDOWN_TIMEOUT)

    def stats(self) -> dict:
        message: dict[str, Any] = {"op": OP_STATS}
        message.update(self.counters.snapshot())
        message["uptime"] = int(time.monotonic() - self.started)
        message["permanent"] = self.permanent
        message["bootstrap_ok"] = self._bootstrap_ok
        message["bootstrap_self"] = self._bootstrap_self
        return message


def _bound_port(address: Any) -> int | None:
    """The port of a ``getBound`` result, ``None`` for "[invalid address]" (no such socket). An
    unspecified address (``0.0.0.0``, ``::``: bound to all) is a socket too."""
    if address.getFamily() == 0 or address.getPort() == 0:
        return None
    return address.getPort()


def _hex(infohash: Any) -> str:
    """A node id as hex text (an InfoHash in 4.x; 2.4.12's ``getNodeId`` returns bytes)."""
    if isinstance(infohash, bytes):
        return infohash.decode("ascii", "replace")
    try:
        text = infohash.toString()
    except AttributeError:
        return str(infohash)
    return text.decode("ascii", "replace") if isinstance(text, bytes) else str(text)


def _version(dht: Any) -> str:
    """The binding's version: ``__version__``, ``version()``, the installed distribution's
    metadata, else ``"unknown"`` (Debian 12's 2.4.12 has none of the first two)."""
    for name in ("__version__", "version"):
        version = getattr(dht, name, "")
        try:
            text = str(version() if callable(version) else version)
        except Exception:
            text = ""
        if text.strip():
            return text.strip()
    try:
        from importlib import metadata

        return metadata.version("opendht")
    except Exception:
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    """Run the worker; returns only on start-up errors (otherwise the process ends in ``os._exit``)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent()
    try:
        args = _parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as e:
        return EXIT_USAGE if e.code else 0
    counters = Counters()
    stdout = sys.stdout.buffer
    node: Node | None = None
    out = Output(stdout, args.heartbeat, lambda: node.stats() if node else {"op": OP_STATS}, counters)
    try:
        import opendht
    except ImportError as e:
        out.send_now({"op": OP_LOG, "level": "error", "message": f"cannot import opendht: {e}"})
        return EXIT_NO_OPENDHT
    node = Node(opendht, args, out, counters)
    try:
        ready = node.start()
    except Exception as e:
        out.send_now({"op": OP_LOG, "level": "error", "message": f"DHT node did not start: {e}"})
        return EXIT_START_FAILED
    out.send_now(ready)
    out.start()
    try:
        node.serve(sys.stdin.buffer)
    except Exception as e:
        out.log("error", f"command loop failed: {e!r}")
    node.stop()
    out.close(timeout=2.0)
    sys.stderr.flush()
    # No interpreter teardown: destroying the runner from Python has crashed at exit (§4.3).
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
