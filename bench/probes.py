"""The SIP probes the benchmark sends: distinct OPTIONS and INVITE requests like a scanner's.

Every probe has its own Call-ID, Via branch and CSeq, so none is a retransmission of another
(RFC 3261 §17.2.3) and every one is an event. Called numbers cycle through a pool, user agents
through a few scanners' names.
"""

from __future__ import annotations

#: User agents seen from real scanners.
USER_AGENTS = (b"friendly-scanner", b"sipvicious", b"pplsip", b"sipcli/v1.8", b"VaxSIPUserAgent/3.1")

_OPTIONS = (
    b"OPTIONS sip:%(number)s@%(host)s SIP/2.0\r\n"
    b"Via: SIP/2.0/%(transport)s %(source)s:5061;branch=z9hG4bK-%(tag)s;rport\r\n"
    b"Max-Forwards: 70\r\n"
    b'To: "sipvicious"<sip:%(number)s@%(host)s>\r\n'
    b'From: "sipvicious"<sip:%(number)s@%(host)s>;tag=%(tag)s\r\n'
    b"User-Agent: %(agent)s\r\n"
    b"Call-ID: %(tag)s@bench\r\n"
    b"Contact: sip:%(number)s@%(source)s:5061\r\n"
    b"CSeq: 1 OPTIONS\r\n"
    b"Accept: application/sdp\r\n"
    b"Content-Length: 0\r\n\r\n"
)

_SDP = (
    b"v=0\r\no=- 1 1 IN IP4 %(source)s\r\ns=-\r\nc=IN IP4 %(source)s\r\nt=0 0\r\n"
    b"m=audio 4000 RTP/AVP 0 8 101\r\na=rtpmap:0 PCMU/8000\r\na=rtpmap:8 PCMA/8000\r\n"
)

_INVITE = (
    b"INVITE sip:%(number)s@%(host)s SIP/2.0\r\n"
    b"Via: SIP/2.0/%(transport)s %(source)s:5061;branch=z9hG4bK-%(tag)s;rport\r\n"
    b"Max-Forwards: 70\r\n"
    b'To: "%(number)s"<sip:%(number)s@%(host)s>\r\n'
    b'From: "%(number)s"<sip:100@%(source)s>;tag=%(tag)s\r\n'
    b"User-Agent: %(agent)s\r\n"
    b"Call-ID: %(tag)s@bench\r\n"
    b"Contact: sip:100@%(source)s:5061\r\n"
    b"CSeq: 1 INVITE\r\n"
    b"Content-Type: application/sdp\r\n"
    b"Content-Length: %(length)d\r\n\r\n"
)


def number_for(seq: int, numbers: int) -> bytes:
    """The called number of probe *seq*: one of *numbers* E.164-looking numbers."""
    return b"+4420%07d" % (seq * 7919 % numbers)


def probe(
    seq: int,
    *,
    tag: bytes,
    source: bytes,
    host: bytes = b"127.0.0.1",
    numbers: int = 5000,
    transport: bytes = b"UDP",
) -> bytes:
    """Probe number *seq*: an OPTIONS, or every third one an INVITE with SDP.

    :param tag: makes the Call-ID, branch and From tag unique (e.g. ``b"w1-12345"``).
    :param source: the sender's address as written in Via and Contact.
    :param host: the honeypot's address in the Request-URI.
    :param numbers: size of the pool of called numbers.
    :param transport: ``UDP`` or ``TCP`` (the Via transport).
    """
    values = {
        b"number": number_for(seq, numbers),
        b"host": host,
        b"source": source,
        b"tag": tag,
        b"agent": USER_AGENTS[seq % len(USER_AGENTS)],
        b"transport": transport,
    }
    if seq % 3:
        return _OPTIONS % values
    body = _SDP % values
    values[b"length"] = len(body)
    return _INVITE % values + body
