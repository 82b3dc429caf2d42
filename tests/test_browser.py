"""The dashboard in a real browser: headless Chromium driven by selenium (issue 8, "Real browser").

A running node (real UDP and TCP SIP listeners, real database, the real site) is fed every corpus
probe plus probes carrying the injection strings of :data:`tests.test_dashboard.INJECTIONS` in
their User-Agent and called number. Chromium (Debian ``chromium``, driven through the system
``chromedriver`` of ``chromium-driver``, never a downloaded one) then loads every page: no script
runs (no dialog, no script or image element, nothing logged to the console), the strings are
visible as text, and a screenshot of each page is saved under the test's temporary directory
(``_trial_temp/…/screenshots``; the path is printed). Locally a missing browser, driver or
``selenium`` skips; under CI it fails.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from urllib.parse import quote

from twisted.internet import defer, reactor, task, threads
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import DatagramProtocol, Protocol
from twisted.trial.unittest import SkipTest

from sentrypeer.api import dashboard
from sentrypeer.service import build_service

from .support import corpus_bytes, corpus_rows, in_ci, make_config, require_tool
from .test_dashboard import INJECTIONS, LiveSiteCase

#: The injection strings a SIP request can carry in a header line (no CR, LF or NUL).
HEADER_INJECTIONS = tuple(text for text in INJECTIONS if not any(c in text for c in "\r\n\x00"))
CHROMIUM_ARGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-dev-shm-usage",
    "--window-size=1280,2400",
)


def injection_request(i: int, text: str) -> bytes:
    """An INVITE whose called number (percent-encoded in the Request-URI) and User-Agent are
    *text*."""
    user = quote(text.encode("utf-8"), safe="")
    return (
        f"INVITE sip:{user}@127.0.0.1 SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP 127.0.0.1:5999;branch=z9hG4bK-browser{i}\r\n"
        f"From: <sip:x@127.0.0.1>;tag=b{i}\r\nTo: <sip:{user}@127.0.0.1>\r\n"
        f"Call-ID: browser-{i}\r\nCSeq: 1 INVITE\r\nUser-Agent: {text}\r\nContent-Length: 0\r\n\r\n"
    ).encode()


def require_selenium():
    """The selenium package; skips locally and fails under CI when it is missing."""
    try:
        import selenium  # noqa: F401
        from selenium import webdriver
    except ImportError:
        message = "selenium is not installed (pip install selenium)"
        if in_ci():
            raise AssertionError(message) from None
        raise SkipTest(message) from None
    return webdriver


class BrowserTests(LiveSiteCase):
    """Headless Chromium against a node filled with corpus probes and injection strings."""

    timeout = 240

    @defer.inlineCallbacks
    def fill_product(self):
        """Start a node, send it the corpus (UDP and TCP as the manifest says) and the injection
        probes, and wait until all of it is written."""
        directory = os.path.abspath(self.mktemp())
        config = make_config(directory, ["udp:0:interface=127.0.0.1", "tcp:0:interface=127.0.0.1"])
        service = build_service(config, reactor)
        service.privilegedStartService()
        service.startService()
        self.addCleanup(service.stopService)
        ports = {spec.transport: port.getHost().port for spec, port in service.ports}
        yield self.start_site(database=service.database_service.database)

        sender = reactor.listenUDP(0, DatagramProtocol(), interface="127.0.0.1")
        self.addCleanup(sender.stopListening)
        rows = corpus_rows()
        udp = [corpus_bytes(row["file"]) for row in rows if row["transport"] == "udp"]
        tcp = [corpus_bytes(row["file"]) for row in rows if row["transport"] == "tcp" and row["events"]]
        udp += [injection_request(i, text) for i, text in enumerate(HEADER_INJECTIONS)]
        for i, data in enumerate(udp):
            sender.write(data, ("127.0.0.1", ports["udp"]))
            if i % 20 == 19:
                yield task.deferLater(reactor, 0.01, lambda: None)
        for data in tcp[:10]:
            endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", ports["tcp"])
            protocol = yield connectProtocol(endpoint, Protocol())
            protocol.transport.write(data)
            yield task.deferLater(reactor, 0.05, lambda: None)
            protocol.transport.loseConnection()
        for _ in range(500):
            if service.stats.datagrams >= len(udp):  # every datagram read, keep-alives too
                break
            yield task.deferLater(reactor, 0.01, lambda: None)
        yield task.deferLater(reactor, 0.2, lambda: None)
        yield service.database_service.queue.flush()
        self.assertGreater(service.database_service.queue.written, len(HEADER_INJECTIONS))

    @defer.inlineCallbacks
    def test_pages_in_chromium(self):
        """Every dashboard page, loaded in headless Chromium, runs no script (no dialog, no script
        or img element in the DOM, no console message), shows the injection strings as text, and
        is saved as a screenshot."""
        webdriver = require_selenium()
        chromedriver = require_tool("chromedriver")
        chromium = shutil.which("chromium") or require_tool("chromium")
        yield self.fill_product()
        base = self.base.decode()
        pages = [
            ("overview", "/dashboard/", HEADER_INJECTIONS[:4]),
            ("events", "/dashboard/events", HEADER_INJECTIONS),
        ]
        for i, text in enumerate(HEADER_INJECTIONS):
            pages.append((f"number-{i}", dashboard.number_href(text), [text]))
            filtered = "/dashboard/events?" + dashboard.urlencode({"number": text})
            pages.append((f"events-number-{i}", filtered, [text]))
        pages.append(("ip", "/dashboard/ip/127.0.0.1", HEADER_INJECTIONS[:3]))
        shots = os.path.abspath(os.path.join(self.mktemp(), "screenshots"))
        os.makedirs(shots)
        results = yield threads.deferToThread(browse, webdriver, chromium, chromedriver, base, pages, shots)
        sys.stdout.write(f"\nbrowser screenshots: {shots}\n")
        for name, problems in results:
            self.assertEqual(problems, [], name)
        self.assertEqual(len(results), len(pages))
        self.assertEqual(len(os.listdir(shots)), len(pages))


def browse(webdriver, chromium, chromedriver, base, pages, shots):
    """Load each page in one headless Chromium (in a thread: the reactor keeps serving).

    :returns: ``[(name, [problem, ...]), ...]``, one entry per page.
    """
    from selenium.common.exceptions import NoAlertPresentException, UnexpectedAlertPresentException
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    profile = tempfile.mkdtemp(prefix="sentrypeer-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in CHROMIUM_ARGS:
        options.add_argument(argument)
    options.add_argument(f"--user-data-dir={profile}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=chromedriver), options=options)
    results = []
    try:
        driver.set_page_load_timeout(30)
        for name, path, texts in pages:
            problems = []
            try:
                driver.get(base + path)
                try:
                    alert = driver.switch_to.alert
                    problems.append(f"dialog opened: {alert.text!r}")
                    alert.dismiss()
                except NoAlertPresentException:
                    pass
                body = driver.find_element(By.TAG_NAME, "body").text
                for text in texts:
                    if dashboard.display(text, dashboard.CELL_CHARS) not in body:
                        problems.append(f"not shown as text: {text!r}")
                for tag in ("script", "img", "iframe", "object", "embed"):
                    found = driver.find_elements(By.TAG_NAME, tag)
                    if found:
                        problems.append(f"{len(found)} <{tag}> elements in the DOM")
                handlers = driver.execute_script(
                    "return Array.from(document.querySelectorAll('*')).flatMap("
                    "e => Array.from(e.attributes).map(a => a.name)).filter(n => n.startsWith('on'))"
                )
                if handlers:
                    problems.append(f"event handler attributes: {handlers}")
                if driver.title == "" or "SentryPeer" not in driver.title:
                    problems.append(f"unexpected title {driver.title!r}")
                for entry in driver.get_log("browser"):
                    problems.append(f"console: {entry.get('level')} {entry.get('message')}")
                driver.save_screenshot(os.path.join(shots, f"{name}.png"))
            except UnexpectedAlertPresentException as e:
                problems.append(f"dialog opened: {e.alert_text!r}")
            results.append((name, problems))
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)
    return results
