"""SIP for SentryPeer: pure message parsing and stream framing, plus the Twisted protocols."""
