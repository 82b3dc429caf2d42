"""SentryPeer: a SIP honeypot and fraud-detection node built on Twisted."""

__version__ = "5.0.0"
