"""One UDP sender process of the benchmark: ``python -m bench.sender --port P --rate R ...``.

Sends distinct probes (:mod:`bench.probes`) to ``127.0.0.1:P`` from *sources* sockets bound to
distinct loopback addresses (127.W.x.y, W from ``--worker``), round robin, so the honeypot sees many
source addresses. Paced at ``--rate`` datagrams per second (0: as fast as it can), for at most
``--duration`` seconds and ``--count`` datagrams. Prints one JSON line: what it sent, in how long,
the rate achieved, and whether it fell behind its target (then the run is the sender's limit, not
the product's).
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time

from bench.probes import probe

#: Most datagrams sent in one go before looking at the clock again.
BURST = 256


def source_address(worker: int, index: int) -> str:
    """The loopback address of source socket *index* of sender *worker*."""
    return "127.%d.%d.%d" % (100 + worker, index // 250, index % 250 + 1)


def run(
    port: int,
    rate: float,
    duration: float,
    count: int,
    sources: int,
    worker: int,
    numbers: int,
    host: str = "127.0.0.1",
) -> dict:
    """Send, and return the report (see the module docstring)."""
    sockets = []
    for i in range(sources):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((source_address(worker, i), 0))
        sockets.append((s.sendto, source_address(worker, i).encode()))
    target = (host, port)
    prefix = b"w%d-" % worker
    sent = errors = 0
    started = time.monotonic()
    deadline = started + duration
    while sent < count:
        now = time.monotonic()
        if now >= deadline:
            break
        if rate > 0:
            due = int((now - started) * rate) + 1
            if due <= sent:
                time.sleep(min(0.002, (sent + 1 - due) / rate + 0.0002))
                continue
            burst = min(due - sent, BURST, count - sent)
        else:
            burst = min(BURST, count - sent)
        for _ in range(burst):
            sendto, source = sockets[sent % sources]
            try:
                sendto(probe(sent, tag=prefix + b"%d" % sent, source=source, numbers=numbers), target)
            except OSError:
                errors += 1  # ENOBUFS and the like: not sent, so not counted
            else:
                sent += 1
    elapsed = time.monotonic() - started
    for s, _ in sockets:
        s.__self__.close()
    achieved = sent / elapsed if elapsed > 0 else 0.0
    return {
        "worker": worker,
        "sent": sent,
        "send_errors": errors,
        "elapsed": round(elapsed, 3),
        "rate": round(achieved, 1),
        "target_rate": rate,
        "behind": bool(rate > 0 and achieved < 0.98 * rate and sent < count),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sender", description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--rate", type=float, default=0.0, help="datagrams/s; 0 = unpaced")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds, at most")
    parser.add_argument("--count", type=int, default=10_000_000, help="datagrams, at most")
    parser.add_argument("--sources", type=int, default=250, help="source addresses")
    parser.add_argument("--worker", type=int, default=0, help="this sender's number (0-99)")
    parser.add_argument("--numbers", type=int, default=5000, help="distinct called numbers")
    args = parser.parse_args(argv)
    if not 0 <= args.worker < 100 or not 1 <= args.sources <= 60000:
        parser.error("--worker must be 0-99 and --sources 1-60000")
    if not args.host.startswith("127.") and args.host != "::1":
        parser.error("loopback only")
    report = run(args.port, args.rate, args.duration, args.count, args.sources, args.worker,
                 args.numbers, args.host)
    sys.stdout.write(json.dumps(report) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
