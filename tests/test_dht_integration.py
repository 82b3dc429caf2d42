"""Real OpenDHT on loopback: honeypot processes replicating probes to each other (interface.md §6,
reference §9).

Every node binds 127.0.0.1 (plus ::1) on an ephemeral DHT port, bootstraps from a loopback node,
and runs on a random private ``--dht-network`` so that concurrent test runs cannot see each other;
OpenDHT peer discovery stays off. Waits are timeouts (30 s for replication), not speed claims. The
nodes run ``tests/fixtures/dht/run_node.py`` (the honeypot with the DHT attached); the shutdown test
also runs ``twistd -n sentrypeer -p`` once the root service wires the DHT in.

Skipped with a reason when ``import opendht`` fails in this interpreter (CI installs it).
"""

from __future__ import annotations

import importlib.util
import os
import random
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from sentrypeer.dht import signing

from .support import require_tool

ROOT = str(Path(__file__).resolve().parent.parent)
RUN_NODE = str(Path(__file__).resolve().parent / "fixtures" / "dht" / "run_node.py")
REPLICATION_TIMEOUT = 30.0


def require_opendht() -> None:
    if importlib.util.find_spec("opendht") is None:
        raise SkipTest("opendht is not installed in this interpreter (pip install 'sentrypeer[dht]')")


def unused_udp_port() -> int:
    """A loopback UDP port nobody listens on (a bootstrap node that never answers)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def private_network() -> int:
    return random.randrange(1_000_000, 2**31)


def worker_pids(parent: int) -> list[int]:
    """Pids of DHT worker processes whose parent is *parent*."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(b")", 1)[1].split()[1])
        if ppid == parent and b"sentrypeer.dht.worker" in cmdline:
            found.append(int(entry))
    return found


def running(pid: int) -> bool:
    """Whether *pid* exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False


def wait_until(predicate, timeout: float, what: str, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


class Node:
    """One honeypot process on loopback, its stderr collected line by line."""

    def __init__(self, test: SynchronousTestCase, *args: str, directory: str | None = None,
                 command: list[str] | None = None) -> None:
        if directory is None:
            directory = os.path.abspath(test.mktemp())
            os.makedirs(directory)
        self.directory = directory
        self.db_file = os.path.join(directory, "sentrypeer.db")
        env = {k: v for k, v in os.environ.items() if not k.startswith("SENTRYPEER_")}
        env.update(PYTHONPATH=ROOT, HOME=directory)
        base = command or [sys.executable, RUN_NODE]
        self.argv = [*base, "-f", self.db_file, "--sip", "udp:0:interface=127.0.0.1", "-p",
                     "--dht-port", "0", "--dht-bind", "127.0.0.1", *args]
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, env=env, cwd=directory)
        self.lines: list[str] = []
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self._workers_seen: set[int] = set()
        test.addCleanup(self.cleanup)

    def _read(self) -> None:
        for raw in self.proc.stdout:
            with self._lock:
                self.lines.append(raw.decode("utf-8", "replace").rstrip("\n"))

    def output(self) -> str:
        with self._lock:
            return "\n".join(self.lines)

    def find(self, pattern: str) -> list[re.Match]:
        with self._lock:
            return [m for m in (re.search(pattern, line) for line in self.lines) if m]

    def wait_line(self, pattern: str, timeout: float = REPLICATION_TIMEOUT, count: int = 1) -> re.Match:
        def found():
            matches = self.find(pattern)
            if len(matches) >= count:
                return matches[count - 1]
            if self.proc.poll() is not None:
                raise AssertionError(f"node exited ({self.proc.returncode}):\n{self.output()[-3000:]}")
            return None

        try:
            return wait_until(found, timeout, pattern)
        except AssertionError as e:
            raise AssertionError(f"{e}\n--- node log ---\n{self.output()[-3000:]}") from None

    @property
    def sip_port(self) -> int:
        return int(self.wait_line(r"listening for SIP on UDP 127\.0\.0\.1:(\d+)").group(1))

    @property
    def dht_port(self) -> int:
        return int(self.wait_line(r"DHT node running: UDP port (\d+)").group(1))

    @property
    def node_id(self) -> str:
        return self.wait_line(r"node id ([0-9a-f-]{36})").group(1)

    def workers(self) -> list[int]:
        pids = worker_pids(self.proc.pid)
        self._workers_seen.update(pids)
        return pids

    def rows(self, where: str = "1", args: tuple = ()) -> list[sqlite3.Row]:
        if not os.path.exists(self.db_file):
            return []
        conn = sqlite3.connect(self.db_file, timeout=5)
        conn.row_factory = sqlite3.Row
        try:
            return conn.execute(f"SELECT * FROM honey WHERE {where} ORDER BY honey_id", args).fetchall()
        except sqlite3.OperationalError:
            return []
        finally:
            conn.close()

    def wait_event(self, event_uuid: str, timeout: float = REPLICATION_TIMEOUT) -> sqlite3.Row:
        rows = wait_until(lambda: self.rows("event_uuid = ?", (event_uuid,)), timeout,
                          f"event {event_uuid} in {self.db_file}", interval=0.25)
        return rows[0]

    def probe(self) -> sqlite3.Row:
        """One sipsak OPTIONS at this node; returns the row it recorded."""
        before = len(self.rows())
        sipsak = require_tool("sipsak")
        subprocess.run([sipsak, "-D", "2", "-s", f"sip:100@127.0.0.1:{self.sip_port}"],
                       capture_output=True, timeout=60, env={"PATH": os.environ.get("PATH", "/usr/bin")})
        wait_until(lambda: len(self.rows()) > before, 10, "the probe's row")
        return self.rows()[before]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        self.workers()
        self.proc.send_signal(sig)
        code = self.proc.wait(timeout)
        self._reader.join(5)
        return code

    def cleanup(self) -> None:
        if self.proc.poll() is None:
            self.workers()
            self.proc.kill()
            self.proc.wait(10)
        for pid in self._workers_seen:
            if running(pid):
                os.kill(pid, signal.SIGKILL)


class ReplicationTests(SynchronousTestCase):
    """Three (and a half) honeypots on loopback: A, then B and C bootstrapping from A, and D on another
    private network."""

    def setUp(self):
        require_opendht()
        require_tool("sipsak")

    def test_probe_replicates_to_b_and_late_c_and_survives_a_sigkill(self):
        """A sipsak probe at A reaches B's and C's databases with A's node id; C, started after the
        probe, still receives it (values stored before a node joins are delivered); after A is killed
        with SIGKILL (its worker goes too), a probe at B still reaches C; D, on another
        ``--dht-network``, sees nothing."""
        network = private_network()
        a = Node(self, "-b", f"127.0.0.1:{unused_udp_port()}", "--dht-network", str(network))
        b = Node(self, "-b", f"127.0.0.1:{a.dht_port}", "--dht-network", str(network))
        d = Node(self, "-b", f"127.0.0.1:{a.dht_port}", "--dht-network", str(network + 1))
        b.wait_line(r"bootstrap node 127\.0\.0\.1:\d+ answered")

        row = a.probe()
        self.assertEqual(row["created_by_node_id"], a.node_id)
        got = b.wait_event(row["event_uuid"])
        self.assertEqual(got["created_by_node_id"], a.node_id)
        self.assertEqual((got["method"], got["called_number"], got["source_ip"]),
                         (row["method"], row["called_number"], row["source_ip"]))
        self.assertIsNone(got["sip_message_bytes"])

        c = Node(self, "-b", f"127.0.0.1:{a.dht_port}", "--dht-network", str(network))
        self.assertEqual(c.wait_event(row["event_uuid"])["created_by_node_id"], a.node_id)

        a_workers = a.workers()
        self.assertEqual(len(a_workers), 1)
        a.proc.kill()
        a.proc.wait(10)
        wait_until(lambda: not any(running(pid) for pid in a_workers), 10, "A's worker to end")

        row_b = b.probe()
        self.assertEqual(c.wait_event(row_b["event_uuid"])["created_by_node_id"], b.node_id)
        self.assertEqual(b.proc.poll(), None)
        self.assertEqual(c.proc.poll(), None)

        self.assertEqual(d.rows(), [])
        self.assertEqual(d.find(r"refused a peer's value"), [])
        for node in (b, c, d):
            self.assertEqual(node.stop(), 0, node.output()[-2000:])
            self.assertNotIn("Traceback", node.output())

    def test_worker_crash_never_stops_recording(self):
        """A DHT worker killed with SIGKILL is restarted, and the honeypot records probes meanwhile."""
        a = Node(self, "-b", f"127.0.0.1:{unused_udp_port()}", "--dht-network", str(private_network()))
        a.wait_line(r"DHT node running")
        [worker] = a.workers()
        os.kill(worker, signal.SIGKILL)
        a.wait_line(r"DHT worker ended \(signal 9\)")
        row = a.probe()
        self.assertEqual(row["created_by_node_id"], a.node_id)
        a.wait_line(r"DHT node running: UDP port (\d+)", count=2)
        self.assertNotIn(worker, a.workers())
        self.assertEqual(len(a.workers()), 1)
        self.assertEqual(a.stop(), 0)

    def test_events_put_again_after_worker_restart(self):
        """A's event, put before A's worker was killed with SIGKILL, is put again by the restarted
        worker: C, started afterwards and bootstrapping from A's new DHT port, still receives it."""
        network = private_network()
        a = Node(self, "-b", f"127.0.0.1:{unused_udp_port()}", "--dht-network", str(network))
        a.wait_line(r"DHT node running")
        row = a.probe()
        time.sleep(1.0)  # let the put be sent and answered by the first worker
        [worker] = a.workers()
        os.kill(worker, signal.SIGKILL)
        a.wait_line(r"DHT worker ended \(signal 9\)")
        port = int(a.wait_line(r"DHT node running: UDP port (\d+)", count=2).group(1))
        c = Node(self, "-b", f"127.0.0.1:{port}", "--dht-network", str(network))
        self.assertEqual(c.wait_event(row["event_uuid"])["created_by_node_id"], a.node_id)
        for node in (a, c):
            self.assertEqual(node.stop(), 0, node.output()[-2000:])
            self.assertNotIn("Traceback", node.output())


class TrustedModeTests(SynchronousTestCase):
    def setUp(self):
        require_opendht()
        require_tool("sipsak")

    def test_unlisted_signer_refused_and_key_survives_restart(self):
        """T trusts only S1's key: S1's signed event is accepted, S2's (signed by an unlisted key) is
        refused as ``untrusted_signature``; S1 restarted keeps its key, and its next event is still
        accepted."""
        network = private_network()
        s1_dir = os.path.abspath(self.mktemp())
        os.makedirs(s1_dir)
        s1_key = signing.show_node_key(os.path.join(s1_dir, "sentrypeer.db"))
        trusted = os.path.abspath(self.mktemp())
        with open(trusted, "w") as f:
            f.write(f"# S1\n{s1_key}\n")

        s1 = Node(self, "-b", f"127.0.0.1:{unused_udp_port()}", "--dht-network", str(network),
                  "--dht-sign", directory=s1_dir)
        bootstrap = f"127.0.0.1:{s1.dht_port}"
        s2 = Node(self, "-b", bootstrap, "--dht-network", str(network), "--dht-sign")
        t = Node(self, "-b", bootstrap, "--dht-network", str(network), "--dht-trusted-nodes", trusted)
        s2.wait_line(r"bootstrap node .* answered")
        t.wait_line(r"bootstrap node .* answered")
        self.assertEqual(s1.wait_line(r"this node's public key: (\S+)").group(1), s1_key)
        self.assertNotEqual(s2.wait_line(r"this node's public key: (\S+)").group(1), s1_key)

        row2 = s2.probe()
        row1 = s1.probe()
        self.assertEqual(t.wait_event(row1["event_uuid"])["created_by_node_id"], s1.node_id)
        t.wait_line(r"refused a peer's value: untrusted_signature")
        self.assertEqual(t.rows("event_uuid = ?", (row2["event_uuid"],)), [])

        self.assertEqual(s1.stop(), 0)
        # Restarted, S1 joins through T (its own old port is gone) with the same key.
        s1_again = Node(self, "-b", f"127.0.0.1:{t.dht_port}", "--dht-network", str(network),
                        "--dht-sign", directory=s1_dir)
        self.assertEqual(s1_again.wait_line(r"this node's public key: (\S+)").group(1), s1_key)
        s1_again.wait_line(r"bootstrap node .* answered")
        row3 = s1_again.probe()
        self.assertEqual(t.wait_event(row3["event_uuid"])["created_by_node_id"], s1.node_id)
        self.assertEqual(t.rows("event_uuid = ?", (row2["event_uuid"],)), [])


class ShutdownTests(SynchronousTestCase):
    """The DHT on, SIGTERM 50 times in a row: every stop is clean and leaves no worker behind."""

    ROUNDS = 50

    def setUp(self):
        require_opendht()

    def _rounds(self, command: list[str] | None, accepted_codes: tuple[int, ...]) -> None:
        network = private_network()
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        bootstrap = f"127.0.0.1:{unused_udp_port()}"
        for n in range(self.ROUNDS):
            node = Node(self, "-b", bootstrap, "--dht-network", str(network), directory=directory,
                        command=command)
            node.wait_line(r"DHT node running", timeout=30)
            workers = wait_until(node.workers, 10, "the worker process")
            started = time.monotonic()
            code = node.stop(signal.SIGTERM, timeout=15)
            self.assertIn(code, accepted_codes, f"round {n}: {node.output()[-2000:]}")
            self.assertLess(time.monotonic() - started, 15)
            wait_until(lambda w=workers: not any(running(pid) for pid in w), 5, f"round {n}: worker gone")
            self.assertNotIn("Traceback", node.output(), f"round {n}")
            self.assertNotIn("killing it", node.output(), f"round {n}")
            self.assertEqual(len(node.find(r"DHT stopped:")), 1, f"round {n}: {node.output()[-2000:]}")

    def test_sigterm_50_times(self):
        """The honeypot with the DHT stops on SIGTERM within 15 s, 50 times in a row, its worker ended
        by the ``stop`` message (no SIGKILL needed), no traceback."""
        self._rounds(None, (0,))

    def test_twistd_sigterm_50_times(self):
        """``twistd -n sentrypeer -p`` stops on SIGTERM within 15 s, 50 times in a row, leaving no
        worker process (twistd re-raises the signal: status 0 or -SIGTERM)."""
        probe = Node(self, "-b", f"127.0.0.1:{unused_udp_port()}", command=self._twistd())
        try:
            probe.wait_line(r"DHT node running|not available in this version yet", timeout=30)
        finally:
            probe.stop()
        if probe.find(r"p2p.*not available in this version yet"):
            raise SkipTest("the root service does not start the DHT yet (service.py wiring pending)")
        self._rounds(self._twistd(), (0, -signal.SIGTERM))

    @staticmethod
    def _twistd() -> list[str]:
        return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
                "--nodaemon", "--pidfile=", "--logfile=-", "sentrypeer"]


class WorkerProcessTests(SynchronousTestCase):
    """``python -m sentrypeer.dht.worker`` itself, driven through its pipes."""

    def setUp(self):
        require_opendht()

    def test_garbage_commands_and_end_of_input(self):
        """The real worker says ``ready`` with its bound port, counts malformed commands (reporting
        them in ``stats``), and exits with status 0 soon after its stdin closes (the honeypot went
        away)."""
        import json

        env = dict(os.environ, PYTHONPATH=ROOT)
        proc = subprocess.Popen(
            [sys.executable, "-m", "sentrypeer.dht.worker", "--port", "0", "--bind", "127.0.0.1",
             "--network", str(private_network()), "--heartbeat", "0.2"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
        )
        self.addCleanup(lambda: proc.poll() is None and proc.kill())
        ready = json.loads(proc.stdout.readline())
        self.assertEqual(ready["op"], "ready")
        self.assertGreater(ready["port"], 0)
        self.assertEqual(ready["port6"], ready["port"])
        proc.stdin.write(b'not json\n{"op":"explode"}\n{"op":"put","id":"x","data":1}\n{"op":"stats"}\n')
        proc.stdin.flush()
        deadline = time.monotonic() + 10
        stats = {}
        while stats.get("malformed_commands") != 3 and time.monotonic() < deadline:
            message = json.loads(proc.stdout.readline())
            if message["op"] == "stats":
                stats = message
        self.assertEqual(stats.get("malformed_commands"), 3)
        proc.stdin.close()
        self.assertEqual(proc.wait(10), 0)
        self.assertEqual(proc.stderr.read(), b"")
