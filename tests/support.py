"""Shared helpers for the trial suite: the corpus, tool discovery, fake reactors, event sinks."""

from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path
from urllib.parse import unquote

from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SkipTest

HERE = Path(__file__).resolve().parent
CORPUS = HERE / "fixtures" / "corpus"
ANY = "*"


def in_ci() -> bool:
    """True under CI (``CI=true``), where a missing tool is a failure, not a skip."""
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require_tool(name: str) -> str:
    """Path of the command *name*; skips the test locally (with the Debian package to install)
    and fails it under CI when the command is missing."""
    path = shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/sbin/{name}") if os.access(p, os.X_OK)), None
    )
    if path:
        return path
    message = f"{name} not installed (make check installs it: sipvicious sipsak sip-tester)"
    if in_ci():
        raise AssertionError(message)
    raise SkipTest(message)


def corpus_rows() -> list[dict[str, str]]:
    """Rows of ``expected.tsv``; the per-event columns are lists (split on ``|``), decoded."""
    with open(CORPUS / "expected.tsv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    for row in rows:
        row["events"] = int(row["events"])
        for key in ("sip_method", "called_number", "sip_user_agent", "parse_status"):
            values = row[key].split("|") if row["events"] else []
            row[key] = [v if v == ANY else unquote(v) for v in values]
    return rows


def corpus_bytes(name: str) -> bytes:
    """The exact bytes of corpus file *name* (``scanners/…``, ``rfc4475/…``, ``edge/…``)."""
    return (CORPUS / name).read_bytes()


class ListSink:
    """An event sink for the controller that keeps everything (``accept=False`` drops)."""

    def __init__(self, accept: bool = True) -> None:
        self.events = []
        self.accept = accept

    def __call__(self, event) -> bool:
        if self.accept:
            self.events.append(event)
        return self.accept


class MemoryReactorWithUDP(MemoryReactorClock):
    """``MemoryReactorClock`` that also records ``listenUDP`` calls in ``udpPorts``."""

    def __init__(self) -> None:
        super().__init__()
        self.udpPorts: dict[int, tuple] = {}

    def listenUDP(self, port, protocol, interface="", maxPacketSize=8192):
        from twisted.internet.address import IPv4Address, IPv6Address
        from twisted.internet.testing import _FakePort

        self.udpPorts[port] = (protocol, interface, maxPacketSize)
        cls = IPv6Address if ":" in interface else IPv4Address
        return _FakePort(cls("UDP", interface or "0.0.0.0", port or 40000 + len(self.udpPorts)))


def make_config(directory: str, listen=(), **overrides):
    """A :class:`~sentrypeer.config.Config` on built-in defaults with the database (and TLS pair)
    in *directory*, SIP listening on *listen* descriptions, and *overrides* applied."""
    import dataclasses

    from sentrypeer.config import from_options
    from sentrypeer.endpoints import parse_listen

    os.makedirs(directory, exist_ok=True)
    config = from_options({"db-file": os.path.join(directory, "sentrypeer.db")}, {}, home=directory)
    if listen:
        overrides["sip_listen"] = tuple(parse_listen(text) for text in listen)
    return dataclasses.replace(config, **overrides)
