"""twistd plugin: ``twistd -n sentrypeer [OPTIONS]``.

Kept import-light on purpose: twistd imports every plugin file whenever anyone runs ``twistd --help``.
"""

from twisted.application.service import ServiceMaker

SentryPeer = ServiceMaker(
    "SentryPeer",
    "sentrypeer.tap",
    "SIP honeypot that records every probe (UDP, TCP, TLS) to SQLite",
    "sentrypeer",
)
