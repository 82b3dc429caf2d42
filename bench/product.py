"""The product as the benchmark runs it: ``python -m bench.product [sentrypeer options]``.

The same command line, configuration and service tree as ``python -m sentrypeer``
(:func:`sentrypeer.service.run`), with two observation hooks that add no work per packet:

- the API site's requests are timed from the moment the request is complete
  (``Request.process``) to ``Request.finish``: the "server time" of issue 7;
- one JSON line on stdout when listening (``{"ready": ..., "udp": port, "tcp": port,
  "api": port, "pid": ...}``), one on SIGUSR1 and one after the stop (``{"final": ...}``) with the
  SIP counters, the write queue's counters, the CPU time and peak memory, and the server times
  recorded since the previous line.

Logs go to stderr as with ``python -m sentrypeer``.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import sys
import time

from twisted.internet import reactor
from twisted.python import usage
from twisted.web.server import Request

from sentrypeer.service import start
from sentrypeer.tap import Options

#: Server times kept between two reports, at most (a longer run keeps the first ones).
MAX_TIMES = 200_000

#: ``route class -> [seconds, ...]`` since the last report.
_times: dict[str, list[float]] = {}


def route_class(path: bytes, args: dict) -> str:
    """The benchmark's name for a request: the route, with ``?limit`` noted."""
    if path.startswith(b"/ip-addresses/"):
        return "/ip-addresses/{ip}"
    if path.startswith(b"/numbers/"):
        return "/numbers/{number}"
    name = path.decode("ascii", "replace")
    if b"limit" in args:
        name += "?limit"
    return name


class TimedRequest(Request):
    """A ``twisted.web`` request that records its server time in :data:`_times`."""

    _bench_started = 0.0

    def process(self) -> None:
        self._bench_started = time.perf_counter()
        super().process()

    def finish(self) -> None:
        super().finish()
        if self._bench_started:
            times = _times.setdefault(route_class(self.path or b"", self.args or {}), [])
            if len(times) < MAX_TIMES:
                times.append(time.perf_counter() - self._bench_started)
            self._bench_started = 0.0


def _report(service, kind: str) -> None:
    for _, port in service.ports:  # kernel drops up to now, not up to the last periodic read
        count = getattr(port, "count_kernel_drops", None)
        if count is not None:
            count()
    usage_ = resource.getrusage(resource.RUSAGE_SELF)
    queue = service.database_service.queue if service.database_service is not None else None
    times = {name: list(values) for name, values in _times.items()}
    _times.clear()
    line = {
        kind: True,
        "stats": service.stats.as_dict(),
        "queue": queue.stats() if queue is not None else {},
        "cpu_seconds": round(usage_.ru_utime + usage_.ru_stime, 3),
        "max_rss_kb": usage_.ru_maxrss,
        "server_times": times,
    }
    sys.stdout.write(json.dumps(line) + "\n")
    sys.stdout.flush()


def _announce(service, api_port: int | None) -> None:
    line: dict = {"ready": True, "pid": os.getpid(), "api": api_port}
    for spec, port in service.ports:
        line[spec.transport] = port.getHost().port
    sys.stdout.write(json.dumps(line) + "\n")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    options = Options()
    try:
        options.parseOptions(sys.argv[1:] if argv is None else argv)
    except usage.UsageError as e:
        sys.stderr.write(f"bench.product: {e}\n")
        return 2
    try:
        service = start(options.config, reactor)
    except SystemExit as e:
        return int(e.code or 1)
    reactor.addSystemEventTrigger("after", "shutdown", lambda: _report(service, "final"))
    signal.signal(signal.SIGUSR1, lambda *_: reactor.callFromThread(_report, service, "snapshot"))
    api = service.api_service
    if api is None:
        _announce(service, None)
    else:
        api.factory.requestFactory = TimedRequest
        # strports.service's service binds in privilegedStartService; the port is in this
        # Deferred (a private attribute, stable since Twisted 10).
        api._waitingForPort.addCallback(lambda port: _announce(service, port.getHost().port) or port)
    reactor.run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
