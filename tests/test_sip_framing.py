"""Tests for :mod:`sentrypeer.sip.framing`: RFC 3261 §18.3 stream framing of hostile bytes."""

from __future__ import annotations

import time
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from sentrypeer.events import NOT_FOUND, PARSE_NON_SIP, PARSE_OK, PARSE_TRUNCATED
from sentrypeer.sip.framing import (
    MESSAGE,
    NON_SIP,
    PING,
    RESPONSE,
    STRAY,
    TRUNCATED,
    Frame,
    StreamFramer,
)
from sentrypeer.sip.message import SIPParseError, parse_message

from .support import ANY, CORPUS, corpus_bytes, corpus_rows

PROPERTY = settings(deadline=None, max_examples=300, suppress_health_check=[HealthCheck.too_slow])
EVENT_KINDS = (MESSAGE, TRUNCATED, NON_SIP)

OPTIONS = (
    b"OPTIONS sip:100@192.0.2.1 SIP/2.0\r\n"
    b"Via: SIP/2.0/TCP 192.0.2.9:5060;branch=z9hG4bK-1\r\n"
    b"From: <sip:a@192.0.2.9>;tag=1\r\nTo: <sip:100@192.0.2.1>\r\n"
    b"Call-ID: c1\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n"
)
NO_CL = b"INVITE sip:200@192.0.2.1 SIP/2.0\r\nCall-ID: n1\r\nCSeq: 1 INVITE\r\n\r\n"
SDP = b"v=0\r\no=- 1 1 IN IP4 192.0.2.9\r\ns=-\r\n"
RESPONSE_200 = b"SIP/2.0 200 OK\r\nCSeq: 1 OPTIONS\r\nContent-Length: 2\r\n\r\nhi"


def with_body(body: bytes, start: bytes = b"MESSAGE sip:1@x SIP/2.0") -> bytes:
    return start + b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body


def run(data: bytes, chunks=None, framer: StreamFramer | None = None, end: str = "close"):
    """Feed *data* (whole, or cut at the sizes of *chunks*, cycling), then close or flush."""
    framer = framer or StreamFramer()
    frames: list[Frame] = []
    if chunks is None:
        frames += framer.feed(data)
    else:
        i = 0
        k = 0
        while i < len(data):
            size = max(1, chunks[k % len(chunks)])
            frames += framer.feed(data[i : i + size])
            i += size
            k += 1
    if end == "close":
        frames += framer.close()
    elif end == "flush":
        frames += framer.flush()
    return frames


def corpus_files() -> list[str]:
    return sorted(
        str(p.relative_to(CORPUS))
        for p in Path(CORPUS).rglob("*")
        if p.is_file() and p.suffix in (".sip", ".dat", ".bin")
    )


class FrameAssertions:
    def assertSameFrames(self, a: list[Frame], b: list[Frame], label: str = "") -> None:
        """Identical frames, except that a NON_SIP frame's data may stop at a different point
        (it includes the rest of the feed() call that revealed the probe): one is a prefix of
        the other."""
        self.assertEqual([f.kind for f in a], [f.kind for f in b], label)
        for x, y in zip(a, b, strict=True):
            if x.kind == NON_SIP:
                self.assertEqual((x.close, x.reason), (y.close, y.reason), label)
                short, long = sorted((x.data, y.data), key=len)
                self.assertTrue(long.startswith(short), label)
            else:
                self.assertEqual(x, y, label)

    def assertFramesFromInput(self, frames: list[Frame], data: bytes) -> None:
        """Each frame's data is a piece of the input, in order (pings and line ends aside)."""
        pos = 0
        for frame in frames:
            if frame.kind == PING or not frame.data:
                continue
            found = data.find(frame.data, pos)
            self.assertTrue(found >= 0, frame)
            self.assertEqual(data[pos:found].strip(b"\r\n"), b"", frame)
            pos = found + len(frame.data)


class CorpusTests(SynchronousTestCase, FrameAssertions):
    """The corpus through the framer (expected.tsv, transport ``tcp``)."""

    def events(self, frames: list[Frame]) -> list[dict[str, str]]:
        out = []
        for frame in frames:
            if frame.kind not in EVENT_KINDS:
                continue
            try:
                m = parse_message(frame.data)
            except SIPParseError:
                fields = dict.fromkeys(("sip_method", "called_number", "sip_user_agent"), NOT_FOUND)
                fields["parse_status"] = PARSE_NON_SIP
            else:
                fields = {
                    "sip_method": m.method or NOT_FOUND,
                    "called_number": m.called_number or NOT_FOUND,
                    "sip_user_agent": m.user_agent or NOT_FOUND,
                    "parse_status": m.parse_status,
                }
            if frame.kind == TRUNCATED:
                fields["parse_status"] = PARSE_TRUNCATED
            elif frame.kind == NON_SIP:
                fields["parse_status"] = PARSE_NON_SIP
            out.append(fields)
        return out

    def test_tcp_rows(self):
        """Every tcp row of expected.tsv, fed whole and one byte at a time then closed, gives
        exactly the expected events and field values."""
        rows = [row for row in corpus_rows() if row["transport"] == "tcp"]
        self.assertTrue(len(rows) >= 45)
        for row in rows:
            data = corpus_bytes(row["file"])
            for chunks in (None, [1]):
                label = "%s %s" % (row["file"], "whole" if chunks is None else "1-byte")
                frames = run(data, chunks)
                events = self.events(frames)
                self.assertEqual(len(events), row["events"], label)
                for i, event in enumerate(events):
                    for key, value in event.items():
                        values = row[key]
                        want = ANY if values == [ANY] else values[i]
                        if want != ANY:
                            self.assertEqual(value, want, f"{label}: event {i} {key}")

    def test_keepalive_files(self):
        """The keep-alive file is one PING; a leading CRLFCRLF is a PING before the request;
        an empty connection gives nothing."""
        self.assertEqual(
            run(corpus_bytes("edge/keepalive_crlfcrlf.bin")), [Frame(PING, b"\r\n\r\n")]
        )
        data = corpus_bytes("edge/leading-crlf_options.sip")
        frames = run(data, [1])
        self.assertEqual([f.kind for f in frames], [PING, MESSAGE])
        self.assertEqual(frames[1].data, data[4:])
        self.assertEqual(run(b""), [])

    def test_special_files(self):
        """HTTP is one closing NON_SIP frame with the whole probe; max-udp_invite is cut at the
        header limit; ncl closes after its header block; no-content-length keeps its SDP;
        responses are RESPONSE frames."""
        http = corpus_bytes("edge/http-get_tcp.bin")
        self.assertEqual(run(http), [Frame(NON_SIP, http, True, "not SIP")])
        big = corpus_bytes("edge/max-udp_invite.sip")
        (frame,) = run(big)
        self.assertEqual((frame.kind, frame.close, frame.data), (TRUNCATED, True, big[:16384]))
        ncl = corpus_bytes("rfc4475/ncl.dat")
        (frame,) = run(ncl)
        self.assertEqual((frame.kind, frame.close), (MESSAGE, True))
        self.assertTrue(frame.data.endswith(b"Content-Length: -999\r\n\r\n"))
        nocl = corpus_bytes("edge/no-content-length-body_tcp.sip")
        self.assertEqual(run(nocl), [Frame(MESSAGE, nocl)])
        for name in ("rfc4475/unreason.dat", "rfc4475/noreason.dat", "rfc4475/bigcode.dat"):
            self.assertEqual(run(corpus_bytes(name)), [Frame(RESPONSE, corpus_bytes(name))])

    def test_chunking_independence(self):
        """Every corpus file gives the same frames fed whole, one byte at a time, or in pieces
        of other sizes, with small and default limits."""
        for name in corpus_files():
            data = corpus_bytes(name)
            for limits in ((16384, 65536), (200, 300)):
                whole = run(data, framer=StreamFramer(*limits))
                self.assertFramesFromInput(whole, data)
                for chunks in ([1], [2], [3, 7], [64], [1000, 1]):
                    self.assertSameFrames(
                        whole, run(data, chunks, StreamFramer(*limits)), f"{name} {limits} {chunks}"
                    )

    def test_all_corpus_concatenated(self):
        """Every request file of the corpus written back to back on one connection (after one
        valid request) frames the same whole and byte by byte, and never buffers more than the
        limits allow."""
        data = OPTIONS + b"".join(corpus_bytes(n) for n in corpus_files() if "http" not in n)
        framer = StreamFramer()
        frames = []
        for i in range(0, len(data), 97):
            frames += framer.feed(data[i : i + 97])
            self.assertLessEqual(framer.buffered, 16384 + 65536)
        frames += framer.close()
        self.assertSameFrames(frames, run(data))


class KeepAliveTests(SynchronousTestCase):
    """RFC 5626 §3.5.1 pings between messages."""

    def test_pings(self):
        """CRLFCRLF is one PING, a lone CRLF nothing, two pings two PINGs, also split."""
        self.assertEqual(run(b"\r\n"), [])
        self.assertEqual(run(b"\r\n\r\n\r\n"), [Frame(PING, b"\r\n\r\n")])
        self.assertEqual([f.kind for f in run(b"\r\n" * 4)], [PING, PING])
        self.assertEqual([f.kind for f in run(b"\r\n" * 4, [1])], [PING, PING])
        self.assertEqual([f.kind for f in run(b"\r\n" * 4, [3])], [PING, PING])
        self.assertEqual(run(b"\n\n\n\n"), [])
        self.assertEqual([f.kind for f in run(b"\r\r\n\r\n")], [PING])
        self.assertEqual([f.kind for f in run(b"\r\n\r\r\n\r\n")], [PING])

    def test_pings_between_messages(self):
        """Pings before, between and after messages are reported in stream order."""
        data = b"\r\n\r\n" + OPTIONS + b"\r\n\r\n" + OPTIONS + b"\r\n" + OPTIONS + b"\r\n\r\n"
        for chunks in (None, [1], [5]):
            kinds = [f.kind for f in run(data, chunks)]
            self.assertEqual(kinds, [PING, MESSAGE, PING, MESSAGE, MESSAGE, PING])

    def test_lone_crlf_then_ping_no_state_leak(self):
        """A lone CRLF before a message does not combine with a CRLF after it into a ping."""
        kinds = [f.kind for f in run(b"\r\n" + OPTIONS + b"\r\n")]
        self.assertEqual(kinds, [MESSAGE])


class MessageFramingTests(SynchronousTestCase, FrameAssertions):
    """Header block, Content-Length and pipelining."""

    def test_pipelined_2000(self):
        """2,000 OPTIONS in one feed() are 2,000 MESSAGE frames, in order, exact bytes."""
        msgs = [OPTIONS.replace(b"Call-ID: c1", b"Call-ID: p%d" % i) for i in range(2000)]
        started = time.perf_counter()
        frames = StreamFramer().feed(b"".join(msgs))
        self.assertLess(time.perf_counter() - started, 5.0)
        self.assertEqual(frames, [Frame(MESSAGE, m) for m in msgs])

    def test_split_anywhere(self):
        """A message with a body split at any point into two feeds is one MESSAGE."""
        data = with_body(SDP)
        for cut in range(len(data) + 1):
            framer = StreamFramer()
            frames = framer.feed(data[:cut]) + framer.feed(data[cut:])
            self.assertEqual(frames, [Frame(MESSAGE, data)], cut)
            self.assertFalse(framer.pending)

    def test_body_by_content_length(self):
        """The body is exactly Content-Length bytes (compact ``l`` too), even when it holds a
        request line or an empty line."""
        body = b"INVITE sip:x@y SIP/2.0\r\n\r\nmore"
        data = b"MESSAGE sip:1@x SIP/2.0\r\nl: %d\r\n\r\n" % len(body) + body
        self.assertEqual(run(data + OPTIONS), [Frame(MESSAGE, data), Frame(MESSAGE, OPTIONS)])

    def test_lf_only(self):
        """LF-only senders: the header block ends at LFLF."""
        data = OPTIONS.replace(b"\r\n", b"\n")
        self.assertEqual(run(data + data, [1]), [Frame(MESSAGE, data), Frame(MESSAGE, data)])

    def test_partial_body_pending(self):
        """A body shorter than Content-Length stays pending through flush() and is TRUNCATED at
        close() (RFC 4475 clerr)."""
        data = corpus_bytes("rfc4475/clerr.dat")
        framer = StreamFramer()
        self.assertEqual(framer.feed(data), [])
        self.assertTrue(framer.pending)
        self.assertEqual(framer.flush(), [])
        self.assertEqual(
            framer.close(), [Frame(TRUNCATED, data, True, "incomplete message at connection end")]
        )
        self.assertTrue(framer.closed)
        self.assertFalse(framer.pending)

    def test_partial_header_block(self):
        """An incomplete header block (even an incomplete first line) is TRUNCATED at close()
        and untouched by flush()."""
        for cut in (3, 40, len(OPTIONS) - 2):
            framer = StreamFramer()
            self.assertEqual(framer.feed(OPTIONS[:cut]), [])
            self.assertEqual(framer.flush(), [])
            (frame,) = framer.close()
            self.assertEqual(
                (frame.kind, frame.data, frame.close), (TRUNCATED, OPTIONS[:cut], True)
            )

    def test_invalid_content_length_closes(self):
        """Negative, non-numeric or conflicting Content-Length: a MESSAGE of the header block,
        then the connection closes; later bytes are ignored."""
        for header in (
            b"Content-Length: -5",
            b"Content-Length: five",
            b"l: 1\r\nContent-Length: 2",
        ):
            head = b"INVITE sip:1@x SIP/2.0\r\n" + header + b"\r\n\r\n"
            framer = StreamFramer()
            frames = framer.feed(head + b"abcdef" + OPTIONS)
            self.assertEqual(frames, [Frame(MESSAGE, head, True, "invalid Content-Length")])
            self.assertTrue(framer.closed)
            self.assertEqual(framer.feed(OPTIONS), [])
            self.assertEqual(framer.close(), [])
            self.assertEqual(framer.flush(), [])

    def test_parse_agrees(self):
        """A framed message parses with the same Content-Length the framer used."""
        data = with_body(SDP)
        (frame,) = run(data)
        m = parse_message(frame.data)
        self.assertEqual((m.body, m.parse_status), (SDP, PARSE_OK))


class NoContentLengthTests(SynchronousTestCase):
    """interface.md §3: bytes after a message without Content-Length are its body."""

    def test_body_until_next_request(self):
        """Lines that do not start a request or status line join the body; a request line ends
        the message (checked per complete line, also one byte at a time)."""
        data = NO_CL + SDP + b"\r\n\r\n" + OPTIONS
        for chunks in (None, [1], [4]):
            frames = run(data, chunks, end="none")
            self.assertEqual(
                frames, [Frame(MESSAGE, NO_CL + SDP + b"\r\n\r\n"), Frame(MESSAGE, OPTIONS)]
            )

    def test_response_line_ends_body(self):
        """A status line also starts a new unit after a message without Content-Length."""
        frames = run(NO_CL + SDP + RESPONSE_200)
        self.assertEqual(frames, [Frame(MESSAGE, NO_CL + SDP), Frame(RESPONSE, RESPONSE_200)])

    def test_flush_and_close(self):
        """flush() completes the pending message with its body (an incomplete last line too);
        close() does the same; both leave nothing pending."""
        framer = StreamFramer()
        self.assertEqual(framer.feed(NO_CL + SDP + b"a=partial"), [])
        self.assertTrue(framer.pending)
        self.assertEqual(framer.flush(), [Frame(MESSAGE, NO_CL + SDP + b"a=partial")])
        self.assertFalse(framer.pending)
        self.assertEqual(framer.flush(), [])
        self.assertEqual(framer.feed(NO_CL), [])
        self.assertEqual(framer.close(), [Frame(MESSAGE, NO_CL)])

    def test_bytes_after_flush_are_stray(self):
        """After a flushed message, a non-SIP line is STRAY, not a new probe."""
        framer = StreamFramer()
        framer.feed(NO_CL)
        framer.flush()
        self.assertEqual(framer.feed(b"junk\r\n"), [Frame(STRAY, b"junk\r\n", reason="stray line")])

    def test_body_limit(self):
        """A body without Content-Length beyond max_body_bytes is TRUNCATED at the limit."""
        framer = StreamFramer(max_header_bytes=1000, max_body_bytes=50)
        data = NO_CL + b"a=" + b"x" * 100 + b"\r\n"
        frames = run(data, [1], framer)
        self.assertEqual(
            frames, [Frame(TRUNCATED, data[: len(NO_CL) + 50], True, "body too large")]
        )


class StrayAndNonSIPTests(SynchronousTestCase):
    """Garbage on a fresh connection versus after a message."""

    def test_non_sip_immediately(self):
        """A TLS ClientHello's first byte is enough: one closing NON_SIP frame with everything
        of that feed() call; later input is ignored."""
        hello = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40
        framer = StreamFramer()
        self.assertEqual(framer.feed(hello), [Frame(NON_SIP, hello, True, "not SIP")])
        self.assertTrue(framer.closed)
        self.assertEqual(framer.feed(OPTIONS), [])
        framer = StreamFramer()
        self.assertEqual(framer.feed(b"\x16"), [Frame(NON_SIP, b"\x16", True, "not SIP")])

    def test_non_sip_after_ping(self):
        """A ping does not make a connection SIP: garbage after it is still NON_SIP."""
        frames = run(b"\r\n\r\nGET / HTTP/1.0\r\n\r\n")
        self.assertEqual([f.kind for f in frames], [PING, NON_SIP])
        self.assertEqual(frames[1].data, b"GET / HTTP/1.0\r\n\r\n")

    def test_non_sip_line_on_complete_line(self):
        """``GET / HTTP/1.1`` is only known non-SIP at its line end; byte by byte the frame
        holds the first line."""
        frames = run(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", [1])
        self.assertEqual(frames, [Frame(NON_SIP, b"GET / HTTP/1.1\r\n", True, "not SIP")])

    def test_non_sip_capped(self):
        """A huge garbage write is kept only up to max_header_bytes + max_body_bytes."""
        (frame,) = StreamFramer(100, 50).feed(b"\x00" * 10000)
        self.assertEqual(len(frame.data), 150)

    def test_stray_lines(self):
        """After a message with Content-Length, each non-SIP line is one STRAY frame; a request
        line starts a message again; a partial stray line at close is STRAY."""
        data = OPTIONS + b"v=0\r\n\x00\xff\r\n" + OPTIONS + b"{trailing"
        for chunks in (None, [1]):
            frames = run(data, chunks)
            self.assertEqual(
                frames,
                [
                    Frame(MESSAGE, OPTIONS),
                    Frame(STRAY, b"v=0\r\n", reason="stray line"),
                    Frame(STRAY, b"\x00\xff\r\n", reason="stray line"),
                    Frame(MESSAGE, OPTIONS),
                    Frame(STRAY, b"{trailing", reason="stray bytes at connection end"),
                ],
            )

    def test_stray_line_too_long(self):
        """A stray line longer than max_header_bytes closes the connection."""
        framer = StreamFramer(max_header_bytes=64)
        frames = run(b"OPTIONS sip:1@x SIP/2.0\r\nl: 0\r\n\r\n" + b"{" * 100, None, framer)
        self.assertEqual([f.kind for f in frames], [MESSAGE, STRAY])
        self.assertEqual((frames[1].data, frames[1].close), (b"{" * 64, True))

    def test_partial_sip_after_message(self):
        """After a message, an incomplete line that may still be a request is TRUNCATED at
        close, not STRAY."""
        frames = run(OPTIONS + b"OPTIONS sip:1@x")
        self.assertEqual([f.kind for f in frames], [MESSAGE, TRUNCATED])


class ResponseTests(SynchronousTestCase):
    """Status lines are framed but are never events."""

    def test_responses(self):
        """Responses with a body, without Content-Length, or cut at close are RESPONSE frames."""
        self.assertEqual(
            run(RESPONSE_200 + OPTIONS), [Frame(RESPONSE, RESPONSE_200), Frame(MESSAGE, OPTIONS)]
        )
        nocl = b"SIP/2.0 100 Trying\r\nCSeq: 1 INVITE\r\n\r\n"
        self.assertEqual(run(nocl), [Frame(RESPONSE, nocl)])
        (frame,) = run(RESPONSE_200[:-1])
        self.assertEqual(
            (frame.kind, frame.data, frame.close), (RESPONSE, RESPONSE_200[:-1], False)
        )
        (frame,) = run(b"SIP/2")
        self.assertEqual(frame.kind, RESPONSE)

    def test_response_limits(self):
        """An over-long or badly delimited response closes the connection as a RESPONSE."""
        (frame,) = run(b"SIP/2.0 200 OK\r\nX: " + b"a" * 20000)
        self.assertEqual((frame.kind, frame.close, len(frame.data)), (RESPONSE, True, 16384))
        (frame,) = run(b"SIP/2.0 200 OK\r\nContent-Length: -1\r\n\r\n")
        self.assertEqual((frame.kind, frame.close), (RESPONSE, True))


class LimitTests(SynchronousTestCase):
    """Size limits: max_header_bytes and max_body_bytes."""

    def test_header_limit_exact(self):
        """A header block of exactly max_header_bytes passes; one byte more is TRUNCATED with
        exactly max_header_bytes bytes, whatever the chunking."""
        head = b"OPTIONS sip:1@x SIP/2.0\r\nX: "
        fits = head + b"a" * (100 - len(head) - 4) + b"\r\n\r\n"
        self.assertEqual(len(fits), 100)
        self.assertEqual(run(fits, framer=StreamFramer(100, 10)), [Frame(MESSAGE, fits)])
        over = head + b"a" * (101 - len(head) - 4) + b"\r\n\r\n"
        for chunks in (None, [1], [7]):
            frames = run(over, chunks, StreamFramer(100, 10))
            self.assertEqual(frames, [Frame(TRUNCATED, over[:100], True, "header block too large")])

    def test_header_limit_counts_from_first_byte(self):
        """Leading line ends do not count towards the header limit."""
        data = b"\r\n" * 30 + OPTIONS
        framer = StreamFramer(max_header_bytes=len(OPTIONS))
        self.assertEqual([f.kind for f in run(data, framer=framer)], [PING] * 15 + [MESSAGE])

    def test_body_limit(self):
        """A Content-Length over max_body_bytes: the message is cut after max_body_bytes of body
        (TRUNCATED, close), or at close() if fewer arrive."""
        data = with_body(b"x" * 100)
        frames = run(data, framer=StreamFramer(1000, 60))
        head = len(data) - 100
        self.assertEqual(frames, [Frame(TRUNCATED, data[: head + 60], True, "body too large")])
        frames = run(data[: head + 10], framer=StreamFramer(1000, 60))
        self.assertEqual((frames[0].kind, frames[0].data), (TRUNCATED, data[: head + 10]))
        huge = b"INVITE sip:1@x SIP/2.0\r\nContent-Length: " + b"9" * 40 + b"\r\n\r\nabc"
        self.assertEqual([f.kind for f in run(huge)], [TRUNCATED])

    def test_big_inputs_bounded(self):
        """1 MB without a line end, 100k header lines and 1 MB of body lines without
        Content-Length finish quickly and never buffer more than the limits."""
        cases = [
            b"a" * 1_000_000,
            b"OPTIONS sip:1@x SIP/2.0\r\n" + b"X: y\r\n" * 100_000,
            NO_CL + b"a=b\r\n" * 250_000,
            b"\r\n" * 500_000,
        ]
        for data in cases:
            for step in (len(data), 65536, 1000):
                framer = StreamFramer()
                started = time.perf_counter()
                for i in range(0, len(data), step):
                    framer.feed(data[i : i + step])
                    self.assertLessEqual(framer.buffered, 16384 + 65536)
                framer.close()
                self.assertLess(time.perf_counter() - started, 5.0)

    def test_slow_first_line(self):
        """A first line of 16 KiB of token characters fed one byte at a time stays linear."""
        framer = StreamFramer()
        started = time.perf_counter()
        frames = []
        for _ in range(16384):
            frames += framer.feed(b"A")
        self.assertLess(time.perf_counter() - started, 5.0)
        self.assertEqual([f.kind for f in frames], [TRUNCATED])

    def test_bad_limits(self):
        """Non-positive limits are refused."""
        self.assertRaises(ValueError, StreamFramer, 0, 10)
        self.assertRaises(ValueError, StreamFramer, 10, -1)


# -- property tests -----------------------------------------------------------------------------


def make_message(method: bytes, user: bytes, mode: str, body: bytes, lf: bool) -> bytes:
    start = b"%s sip:%s@192.0.2.1 SIP/2.0" % (method, user)
    if method == b"SIP/2.0":
        start = b"SIP/2.0 200 OK"
    headers = [b"Via: SIP/2.0/TCP h;branch=z9hG4bK-" + user, b"CSeq: 1 " + method]
    if mode == "cl":
        headers.append(b"Content-Length: %d" % len(body))
    elif mode == "compact":
        headers.append(b"l:%d" % len(body))
    elif mode == "bad":
        headers.append(b"Content-Length: -%d" % len(body))
    elif mode == "short":
        headers.append(b"Content-Length: %d" % (len(body) + 3))
    eol = b"\n" if lf else b"\r\n"
    return start + eol + b"".join(h + eol for h in headers) + eol + body


messages = st.builds(
    make_message,
    st.sampled_from([b"OPTIONS", b"INVITE", b"REGISTER", b"ACK", b"SIP/2.0"]),
    st.from_regex(rb"\A[0-9a-z]{0,6}\Z"),
    st.sampled_from(["cl", "cl", "compact", "none", "bad", "short"]),
    st.one_of(st.just(b""), st.just(SDP), st.binary(max_size=30)),
    st.booleans(),
)
cl_messages = st.builds(
    make_message,
    st.sampled_from([b"OPTIONS", b"INVITE", b"SIP/2.0"]),
    st.from_regex(rb"\A[0-9]{1,6}\Z"),
    st.sampled_from(["cl", "compact"]),
    st.binary(max_size=40),
    st.booleans(),
)
pieces = st.one_of(
    messages,
    messages,
    st.sampled_from(
        [
            b"\r\n",
            b"\r\n\r\n",
            b"\n",
            b"v=0\r\n",
            b"GET / HTTP/1.1\r\n",
            b"\x16\x03\x01",
            b"INVITE sip:x",
            b" SIP/2.0\r\n",
            b"\r\n\r\n\r\n",
        ]
    ),
    st.binary(max_size=20),
)
streams = st.lists(pieces, max_size=8).map(b"".join)
chunkings = st.lists(st.integers(1, 40), min_size=1, max_size=10)
limits = st.sampled_from([(16384, 65536), (80, 40), (40, 0), (200, 20)])


class PropertyTests(SynchronousTestCase, FrameAssertions):
    """Hypothesis: any bytes, any chunking."""

    def check(self, data: bytes, chunks: list[int], limit: tuple[int, int], end: str) -> None:
        framer = StreamFramer(*limit)
        frames: list[Frame] = []
        i = k = 0
        while i < len(data):
            size = chunks[k % len(chunks)]
            frames += framer.feed(data[i : i + size])
            self.assertLessEqual(framer.buffered, limit[0] + limit[1])
            i += size
            k += 1
        frames += framer.flush() if end == "flush" else framer.close()
        for frame in frames:
            self.assertIsInstance(frame, Frame)
            self.assertIn(frame.kind, (MESSAGE, TRUNCATED, NON_SIP, PING, RESPONSE, STRAY))
            self.assertIsInstance(frame.data, bytes)
        self.assertLessEqual(sum(1 for f in frames if f.close), 1)
        if any(f.close for f in frames):
            self.assertTrue(frames[-1].close)
        self.assertFramesFromInput(frames, data)
        whole = StreamFramer(*limit)
        reference = whole.feed(data) + (whole.flush() if end == "flush" else whole.close())
        self.assertSameFrames(frames, reference, repr(chunks))

    @PROPERTY
    @given(st.binary(max_size=400), chunkings, limits, st.sampled_from(["close", "flush"]))
    def test_arbitrary_bytes(self, data, chunks, limit, end):
        """Arbitrary bytes in arbitrary pieces give only Frames, at most one closing frame
        (last), bounded buffering, and the frames of the whole write."""
        self.check(data, chunks, limit, end)

    @PROPERTY
    @given(streams, chunkings, limits, st.sampled_from(["close", "flush"]))
    def test_generated_streams(self, data, chunks, limit, end):
        """Streams of generated messages (with, without, compact, negative or too-large
        Content-Length, LF-only, responses), pings and garbage frame the same in any pieces."""
        self.check(data, chunks, limit, end)

    @PROPERTY
    @given(st.lists(cl_messages, min_size=1, max_size=6), chunkings)
    def test_messages_back_to_back(self, msgs, chunks):
        """Messages with a correct Content-Length back to back: one frame each with its exact
        bytes, one byte at a time or in any pieces, nothing left pending."""
        data = b"".join(msgs)
        expected = [Frame(RESPONSE if m.startswith(b"SIP/") else MESSAGE, m) for m in msgs]
        for pieces_ in ([1], chunks):
            framer = StreamFramer()
            frames = run(data, pieces_, framer, end="none")
            self.assertEqual(frames, expected)
            self.assertFalse(framer.pending)
