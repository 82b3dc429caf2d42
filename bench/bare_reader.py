"""The reference reader: ``python -m bench.bare_reader``.

A Twisted UDP port on 127.0.0.1 (ephemeral port, the product's receive buffer size and maximum
datagram size) whose protocol only counts datagrams: what Python and Twisted on this machine can
receive at all. Prints ``{"port": N}`` when listening and, after SIGTERM, one JSON line with the
count and the CPU time used.
"""

from __future__ import annotations

import json
import resource
import socket
import sys

from twisted.internet import reactor
from twisted.internet.protocol import DatagramProtocol

from sentrypeer.sip.protocol import MAX_DATAGRAM, UDP_RECEIVE_BUFFER


class CountingProtocol(DatagramProtocol):
    """Counts datagrams and bytes; nothing else."""

    noisy = False
    datagrams = 0
    octets = 0

    def datagramReceived(self, data: bytes, addr: tuple[str, int]) -> None:
        self.datagrams += 1
        self.octets += len(data)


def main() -> int:
    protocol = CountingProtocol()
    port = reactor.listenUDP(0, protocol, interface="127.0.0.1", maxPacketSize=MAX_DATAGRAM)
    for option in (getattr(socket, "SO_RCVBUFFORCE", 33), socket.SO_RCVBUF):
        try:
            port.socket.setsockopt(socket.SOL_SOCKET, option, UDP_RECEIVE_BUFFER)
            break
        except OSError:
            continue

    def report() -> None:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        line = {
            "datagrams": protocol.datagrams,
            "bytes": protocol.octets,
            "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 3),
            "max_rss_kb": usage.ru_maxrss,
        }
        sys.stdout.write(json.dumps(line) + "\n")
        sys.stdout.flush()

    reactor.addSystemEventTrigger("after", "shutdown", report)
    sys.stdout.write(json.dumps({"port": port.getHost().port}) + "\n")
    sys.stdout.flush()
    reactor.run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
