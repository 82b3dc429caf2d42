"""Tests for :mod:`sentrypeer.sip.message`: parsing hostile bytes (RFC 3261, interface.md §3)."""

from __future__ import annotations

import dataclasses
import time

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from sentrypeer.events import NOT_FOUND, PARSE_MALFORMED, PARSE_NON_SIP, PARSE_OK
from sentrypeer.sip import message as _message
from sentrypeer.sip.message import (
    CL_ABSENT,
    CL_INVALID,
    CL_OVERLARGE,
    CL_VALID,
    MAX_FIELD_BYTES,
    MAX_HEADERS,
    NON_SIP,
    REQUEST,
    RESPONSE,
    SIPMessage,
    SIPParseError,
    StartLineWatcher,
    content_length_info,
    could_start_sip,
    parse_message,
    start_line_kind,
)

from .support import ANY, corpus_bytes, corpus_rows

PROPERTY = settings(deadline=None, max_examples=300, suppress_health_check=[HealthCheck.too_slow])


def request(
    *headers: bytes,
    start: bytes = b"OPTIONS sip:100@192.0.2.1 SIP/2.0",
    body: bytes = b"",
    eol: bytes = b"\r\n",
) -> bytes:
    """A request made of *start*, *headers* and *body*, lines ended with *eol*."""
    return start + eol + b"".join(h + eol for h in headers) + eol + body


BASE = (
    b"Via: SIP/2.0/UDP 192.0.2.9:5060;branch=z9hG4bK-1",
    b"From: <sip:a@192.0.2.9>;tag=1",
    b"To: <sip:100@192.0.2.1>",
    b"Call-ID: c1@192.0.2.9",
    b"CSeq: 1 OPTIONS",
)


def corpus_udp_rows():
    return [row for row in corpus_rows() if row["transport"] == "udp"]


def as_field(value: str | None) -> str:
    return value if value else NOT_FOUND


class CorpusTests(SynchronousTestCase):
    """Every ``udp`` row of the corpus's expected.tsv, parsed as one datagram."""

    def test_udp_rows_match_expected(self):
        """Each corpus file parsed whole gives the sip_method, called_number, sip_user_agent and
        parse_status of expected.tsv; files without events are responses (is_request False) or
        raise SIPParseError (keep-alive, empty); non_sip rows raise SIPParseError."""
        rows = corpus_udp_rows()
        self.assertTrue(len(rows) >= 45)
        for row in rows:
            data = corpus_bytes(row["file"])
            label = row["file"]
            if row["events"] == 0:
                try:
                    message = parse_message(data)
                except SIPParseError:
                    self.assertEqual(data.strip(b"\r\n"), b"", label)
                else:
                    self.assertFalse(message.is_request, label)
                    self.assertIsNone(message.method, label)
                continue
            self.assertEqual(row["events"], 1, label)
            if row["parse_status"] == [PARSE_NON_SIP]:
                self.assertRaises(SIPParseError, parse_message, data)
                for key in ("sip_method", "called_number", "sip_user_agent"):
                    self.assertEqual(row[key], [NOT_FOUND], label)
                continue
            message = parse_message(data)
            self.assertTrue(message.is_request, label)
            got = {
                "sip_method": as_field(message.method),
                "called_number": as_field(message.called_number),
                "sip_user_agent": as_field(message.user_agent),
                "parse_status": message.parse_status,
            }
            for key, value in got.items():
                (want,) = row[key]
                if want != ANY:
                    self.assertEqual(value, want, f"{label}: {key}")

    def test_responses_in_corpus(self):
        """RFC 4475 responses parse as responses: unreason has a UTF-8 reason phrase, noreason an
        empty one, bigcode an overlarge status code (None, malformed)."""
        unreason = parse_message(corpus_bytes("rfc4475/unreason.dat"))
        self.assertEqual(unreason.status_code, 200)
        self.assertTrue(unreason.reason.startswith("= 2**3 * 5**2 \u043d\u043e"))
        self.assertEqual(unreason.parse_status, PARSE_OK)
        noreason = parse_message(corpus_bytes("rfc4475/noreason.dat"))
        self.assertEqual((noreason.status_code, noreason.reason), (100, ""))
        bigcode = parse_message(corpus_bytes("rfc4475/bigcode.dat"))
        self.assertIsNone(bigcode.status_code)
        self.assertEqual(bigcode.parse_status, PARSE_MALFORMED)
        self.assertFalse(bigcode.is_request)

    def test_wsinv_torture(self):
        """RFC 4475 wsinv: white space before colons, folding everywhere, mixed compact names,
        leading zeros; everything is read and the message is ok."""
        m = parse_message(corpus_bytes("rfc4475/wsinv.dat"))
        self.assertEqual(m.parse_status, PARSE_OK)
        self.assertEqual(m.to, "sip:vivekg@chair-dnrc.example.com ;   tag    = 1918181833n")
        self.assertEqual(
            m.from_, '"J Rosenberg \\\\\\""       <sip:jdrosen@example.com> ; tag = 98asjd8'
        )
        self.assertEqual(m.cseq, "0009 INVITE")
        self.assertEqual((m.cseq_number, m.cseq_method), (9, "INVITE"))
        self.assertEqual(m.max_forwards, 68)
        self.assertEqual(m.content_length, 150)
        self.assertEqual(len(m.body), 150)
        self.assertEqual(len(m.vias), 3)
        self.assertEqual(m.top_via_branch, "390skdjuw")
        self.assertEqual(
            m.vias[2], "SIP  /    2.0   / UDP  192.168.255.111   ; branch= z9hG4bK30239"
        )
        self.assertEqual(m.header("subject"), "")
        self.assertEqual(
            m.header("newfangledheader"), "newfangled value continued newfangled value"
        )
        self.assertEqual(m.header_all("m"), [m.contact])

    def test_longreq_many_vias(self):
        """RFC 4475 longreq: 34 Via headers in every letter case are all kept, in order."""
        m = parse_message(corpus_bytes("rfc4475/longreq.dat"))
        self.assertEqual(len(m.vias), 34)
        self.assertEqual(len(m.header_all("VIA")), 34)
        self.assertEqual(m.parse_status, PARSE_OK)

    def test_dblreq_udp_body_cut_to_content_length(self):
        """RFC 4475 dblreq over UDP: Content-Length 0, so the trailing INVITE is not the body."""
        m = parse_message(corpus_bytes("rfc4475/dblreq.dat"))
        self.assertEqual(m.body, b"")
        self.assertEqual(m.method, "REGISTER")

    def test_mpart01_binary_body_kept(self):
        """RFC 4475 mpart01: a multipart body with NUL and bare CR/LF bytes is kept as bytes."""
        data = corpus_bytes("rfc4475/mpart01.dat")
        m = parse_message(data)
        self.assertEqual(len(m.body), 553)
        self.assertTrue(data.endswith(m.body))
        self.assertIn(b"\x00", m.body)


class StartLineTests(SynchronousTestCase):
    """What is SIP (interface.md §3)."""

    def test_start_line_kinds(self):
        """Request lines, status lines and non-SIP lines are told apart; extra spaces and odd
        versions still make a request; HTTP, blank, binary and space-first lines do not."""
        cases = {
            b"INVITE sip:1@x SIP/2.0": REQUEST,
            b"INVITE sip:1@x SIP/2.0\r": REQUEST,
            b"FOO sip:1@x SIP/2.0": REQUEST,
            b"INVITE  sip:1@x  SIP/2.0  ": REQUEST,
            b"INVITE\tsip:1@x\tSIP/2.0": REQUEST,
            b"OPTIONS sip:1@x sip/2.0": REQUEST,
            b"OPTIONS sip:1@x SIP/7.0": REQUEST,
            b"OPTIONS sip:1@x SIP/": REQUEST,
            b"SIP/2.0 200 OK": RESPONSE,
            b"sip/2.0 200 OK": RESPONSE,
            b"SIP/": RESPONSE,
            b"GET / HTTP/1.1": NON_SIP,
            b"INVITE sip:1@x": NON_SIP,
            b"INVITE SIP/2.0": NON_SIP,
            b" INVITE sip:1@x SIP/2.0": NON_SIP,
            b"INV\x00ITE sip:1@x SIP/2.0": NON_SIP,
            b"INVITE": NON_SIP,
            b"": NON_SIP,
            b"\x16\x03\x01\x02\x00": NON_SIP,
            b"SSH-2.0-OpenSSH_9.2": NON_SIP,
            b"SIP": NON_SIP,
        }
        for line, kind in cases.items():
            self.assertEqual(start_line_kind(line), kind, line)

    def test_could_start_sip(self):
        """could_start_sip is False as soon as a prefix cannot become a start line (TLS 0x16,
        NUL, non-token before the first SP, leading SP) and True while it still can."""
        true = [
            b"",
            b"\r\n",
            b"\r\n\r\nOPT",
            b"S",
            b"SI",
            b"SIP",
            b"SIP/2.0 2",
            b"sip/",
            b"INVITE",
            b"INVITE ",
            b"GET / HTTP/1.1",
            b"INVITE sip:\x00",
            b"X" * 5000,
        ]
        false = [
            b"\x16",
            b"\x16\x03\x01",
            b"\x00",
            b" ",
            b"\tINVITE",
            b"GET/",
            b"INV\x00",
            b'{"json"',
            b"\xff\xfe",
            b"SI/",
            b"GET / HTTP/1.1\r\n",
        ]
        for prefix in true:
            self.assertTrue(could_start_sip(prefix), prefix)
        for prefix in false:
            self.assertFalse(could_start_sip(prefix), prefix)

    def test_watcher_pieces(self):
        """StartLineWatcher fed in pieces answers like could_start_sip on the whole prefix."""
        line = b"SIP"
        watcher = StartLineWatcher()
        for i in range(len(line)):
            self.assertTrue(watcher.feed(line[i : i + 1]))
        self.assertFalse(watcher.feed(b"\x00"))
        self.assertFalse(watcher.feed(b" sip:ok SIP/2.0"))
        watcher = StartLineWatcher()
        self.assertTrue(watcher.feed(b"REG"))
        self.assertTrue(watcher.feed(b"ISTER"))
        self.assertTrue(watcher.feed(b" \x00\x01 anything"))
        self.assertTrue(watcher.possible)

    @PROPERTY
    @given(st.binary(max_size=40), st.lists(st.integers(0, 40), max_size=6))
    def test_watcher_matches_could_start_sip(self, line, cuts):
        """For any line without LF, split anywhere, the watcher's answer after each piece equals
        could_start_sip of the prefix so far, and once False a completed line is non-SIP."""
        line = line.replace(b"\n", b"").lstrip(b"\r")
        watcher = StartLineWatcher()
        points = sorted({min(c, len(line)) for c in cuts} | {len(line)})
        start = 0
        for point in points:
            answer = watcher.feed(line[start:point])
            start = point
            self.assertEqual(answer, could_start_sip(line[:point]))
        if not could_start_sip(line):
            self.assertEqual(start_line_kind(line), NON_SIP)
            self.assertEqual(start_line_kind(line + b"x SIP/2.0"), NON_SIP)

    def test_non_sip_raises(self):
        """Empty input, keep-alives, HTTP, TLS and binary raise SIPParseError (a ValueError)."""
        for data in (
            b"",
            b"\r\n",
            b"\r\n\r\n",
            b"\n\n\n",
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
            b"\x16\x03\x01\x00\x05hello",
            b"\x00\x01\x02",
            b"hello world\r\n",
            corpus_bytes("edge/http-get_tcp.bin"),
        ):
            with self.assertRaises(SIPParseError):
                parse_message(data)
        self.assertTrue(issubclass(SIPParseError, ValueError))

    def test_leading_crlf_skipped(self):
        """Line ends before the start line are ignored (RFC 3261 §7.5)."""
        m = parse_message(b"\r\n\n\r\n" + request(*BASE))
        self.assertEqual(m.method, "OPTIONS")
        self.assertEqual(m.parse_status, PARSE_OK)

    def test_extra_spaces_malformed_but_read(self):
        """Double spaces, tabs or trailing spaces in the request line: still the method and
        Request-URI, but malformed."""
        for start in (
            b"INVITE  sip:user@x  SIP/2.0",
            b"INVITE sip:user@x SIP/2.0  ",
            b"INVITE\tsip:user@x SIP/2.0",
        ):
            m = parse_message(request(*BASE, start=start))
            self.assertEqual(
                (m.method, m.request_uri, m.called_number), ("INVITE", "sip:user@x", "user")
            )
            self.assertEqual(m.parse_status, PARSE_MALFORMED)
            self.assertIn("extra white space in the request line", m.problems)

    def test_bad_version(self):
        """A version that is not SIP/d.d, or another version than 2.0, is malformed."""
        m = parse_message(request(*BASE, start=b"OPTIONS sip:1@x SIP/x.y"))
        self.assertIn("bad SIP version", m.problems)
        self.assertEqual(m.version, "SIP/x.y")
        m = parse_message(request(*BASE, start=b"OPTIONS sip:1@x SIP/7.0"))
        self.assertIn("unsupported SIP version", m.problems)

    def test_method_case_preserved(self):
        """Methods keep their case and any token is a method."""
        m = parse_message(request(start=b"fOo sip:1@x SIP/2.0"))
        self.assertEqual(m.method, "fOo")
        self.assertTrue(m.is_request)


class HeaderTests(SynchronousTestCase):
    """Header reading: RFC 3261 §7.3."""

    def test_compact_forms_expanded(self):
        """Every compact form of the IANA list becomes its long lower-case name."""
        pairs = {
            b"a": "accept-contact",
            b"b": "referred-by",
            b"c": "content-type",
            b"d": "request-disposition",
            b"e": "content-encoding",
            b"f": "from",
            b"i": "call-id",
            b"j": "reject-contact",
            b"k": "supported",
            b"m": "contact",
            b"n": "identity-info",
            b"o": "event",
            b"r": "refer-to",
            b"s": "subject",
            b"t": "to",
            b"u": "allow-events",
            b"v": "via",
            b"x": "session-expires",
            b"y": "identity",
        }
        lines = [letter.upper() + b": v-" + letter for letter in pairs]
        m = parse_message(request(*lines, b"L: 0"))
        names = [name for name, _ in m.headers]
        self.assertEqual(names, list(pairs.values()) + ["content-length"])
        self.assertEqual(m.header("t"), "v-t")
        self.assertEqual(m.header("To"), "v-t")
        self.assertEqual(m.header("I"), "v-i")
        self.assertEqual(m.call_id, "v-i")
        self.assertEqual(m.content_length, 0)

    def test_names_case_insensitive_and_repeated(self):
        """Header names match in any case; repeated fields are kept in arrival order."""
        m = parse_message(request(b"X-Foo: 1", b"x-foo: 2", b"X-FOO: 3"))
        self.assertEqual(m.header_all("X-fOO"), ["1", "2", "3"])
        self.assertEqual(m.header("x-foo"), "1")
        self.assertIsNone(m.header("x-bar"))
        self.assertEqual(m.header_all("x-bar"), [])

    def test_folding(self):
        """A line starting with SP or HT continues the previous field: the line end and the white
        space around it become one SP (RFC 3261 §7.3.1), with CRLF or bare LF."""
        m = parse_message(
            request(
                b"User-Agent: friendly  ",
                b"  \t scanner",
                b"Subject:",
                b" hi",
                b"X-A: 1",
                b"\t2",
                b"   ",
                b"X-B:  b  ",
            )
        )
        self.assertEqual(m.user_agent, "friendly scanner")
        self.assertEqual(m.header("subject"), "hi")
        self.assertEqual(m.header("x-a"), "1 2")
        self.assertEqual(m.header("x-b"), "b")
        lf = parse_message(b"OPTIONS sip:1@x SIP/2.0\nUser-Agent: a\n\tb\n\n")
        self.assertEqual(lf.user_agent, "a b")
        self.assertEqual(lf.parse_status, PARSE_OK)

    def test_white_space_before_colon(self):
        """``Name  : value`` is the field Name (RFC 3261 §7.3.1 allows LWS before HCOLON)."""
        m = parse_message(request(b"To   :  <sip:bob@x>"))
        self.assertEqual(m.to, "<sip:bob@x>")

    def test_lf_only(self):
        """Bare LF line ends are accepted throughout, including the empty line."""
        data = request(*BASE, b"Content-Length: 4", body=b"abcd", eol=b"\n")
        m = parse_message(data)
        self.assertEqual(m.parse_status, PARSE_OK)
        self.assertEqual(m.body, b"abcd")
        self.assertEqual(m.call_id, "c1@192.0.2.9")

    def test_no_final_empty_line(self):
        """A message that ends after its last header's line end is fine; a last header line
        without a line end is malformed but still read."""
        m = parse_message(b"OPTIONS sip:1@x SIP/2.0\r\nUser-Agent: ua\r\n")
        self.assertEqual((m.user_agent, m.parse_status, m.body), ("ua", PARSE_OK, b""))
        m = parse_message(b"OPTIONS sip:1@x SIP/2.0\r\nUser-Agent: ua")
        self.assertEqual((m.user_agent, m.parse_status), ("ua", PARSE_MALFORMED))
        m = parse_message(b"OPTIONS sip:1@x SIP/2.0")
        self.assertEqual((m.method, m.parse_status), ("OPTIONS", PARSE_MALFORMED))

    def test_bad_header_lines(self):
        """A line without a colon, an invalid name, or a continuation line with no field before
        it make the message malformed; the other fields are still read."""
        for bad, problem in (
            (b"NoColonHere", "header line without a colon"),
            (b"Bad Name: x", "invalid header name"),
            (b": empty", "invalid header name"),
        ):
            m = parse_message(request(bad, *BASE))
            self.assertIn(problem, m.problems)
            self.assertEqual(m.parse_status, PARSE_MALFORMED)
            self.assertEqual(m.call_id, "c1@192.0.2.9")
        m = parse_message(b"OPTIONS sip:1@x SIP/2.0\r\n folded\r\nCall-ID: x\r\n\r\n")
        self.assertIn("continuation line without a header", m.problems)
        self.assertEqual(m.call_id, "x")

    def test_header_count_bounded(self):
        """At most MAX_HEADERS fields are kept; a Content-Length after them still counts."""
        lines = [b"X-H: %d" % i for i in range(MAX_HEADERS + 50)]
        m = parse_message(request(*lines, b"Content-Length: 2", body=b"abcdef"))
        self.assertEqual(len(m.headers), MAX_HEADERS)
        self.assertIn("too many headers", m.problems)
        self.assertEqual(m.body, b"ab")
        self.assertEqual(m.content_length, 2)

    def test_long_values(self):
        """headers keeps a 60 kB value whole; extracted fields are cut to MAX_FIELD_BYTES."""
        value = b"x" * 60000
        m = parse_message(request(b"User-Agent: " + value, b"X-Pad: " + value))
        self.assertEqual(m.header("x-pad"), value.decode())
        self.assertEqual(len(m.header("user-agent")), 60000)
        self.assertEqual(len(m.user_agent), MAX_FIELD_BYTES)

    def test_readable_text(self):
        """Undecodable bytes become \\xNN and NUL stays a NUL character in every str field."""
        m = parse_message(request(b"User-Agent: a\xffb\x00c", b"X-\xff: 1", b"Call-ID: \xc3\xa9"))
        self.assertEqual(m.user_agent, "a\\xffb\x00c")
        self.assertEqual(m.call_id, "\u00e9")
        self.assertIn("invalid header name", m.problems)

    def test_user_agent(self):
        """The first User-Agent is used; a blank one is None (NOT_FOUND for the event)."""
        m = parse_message(request(b"User-Agent: one", b"User-Agent: two"))
        self.assertEqual(m.user_agent, "one")
        m = parse_message(request(b"User-Agent:   "))
        self.assertIsNone(m.user_agent)
        self.assertIsNone(parse_message(request()).user_agent)

    def test_frozen(self):
        """SIPMessage is immutable."""
        m = parse_message(request(*BASE))
        self.assertIsInstance(m, SIPMessage)
        self.assertRaises(dataclasses.FrozenInstanceError, setattr, m, "method", "X")

    def test_unterminated_quote(self):
        """RFC 4475 quotbal: an unterminated quoted display name in To is malformed; the method
        and Request-URI user are still read; no To user is invented."""
        m = parse_message(
            request(
                b'To: "Mr. J. User <sip:j.user@example.com>',
                start=b"INVITE sip:user@example.com SIP/2.0",
            )
        )
        self.assertEqual((m.method, m.called_number), ("INVITE", "user"))
        self.assertEqual(m.parse_status, PARSE_MALFORMED)
        m = parse_message(
            request(
                b'To: "Mr. J. User <sip:j.user@example.com>',
                start=b"REGISTER sip:example.com SIP/2.0",
            )
        )
        self.assertIsNone(m.called_number)


class CalledNumberTests(SynchronousTestCase):
    """called_number: interface.md §3."""

    def called(self, start: bytes, *headers: bytes) -> str | None:
        return parse_message(request(*headers, start=start)).called_number

    def test_request_uri_user(self):
        """The Request-URI user part wins over the To user (svmap 00972 case)."""
        self.assertEqual(
            self.called(b"INVITE sip:00972599000123@x SIP/2.0", b"To: <sip:100@y>"),
            "00972599000123",
        )
        self.assertEqual(self.called(b"INVITE SIPS:555@x:5061;transport=tls SIP/2.0"), "555")

    def test_password_split_off(self):
        """``user:password@host``: the password is not part of the number."""
        self.assertEqual(self.called(b"INVITE sip:alice:secret@x SIP/2.0"), "alice")
        self.assertEqual(self.called(b"INVITE sip:%2B44:pw@x SIP/2.0"), "+44")

    def test_percent_decoded_once(self):
        """Escapes are decoded once at the byte level: %2B44 is +44, %2541 is %41 (not A), %00 a
        NUL character, invalid UTF-8 a \\xNN escape, a broken escape stays as it is."""
        self.assertEqual(self.called(b"INVITE sip:%2B44@x SIP/2.0"), "+44")
        self.assertEqual(self.called(b"INVITE sip:v%2541@x SIP/2.0"), "v%41")
        self.assertEqual(self.called(b"INVITE sip:a%00b@x SIP/2.0"), "a\x00b")
        self.assertEqual(self.called(b"INVITE sip:a%ffb@x SIP/2.0"), "a\\xffb")
        self.assertEqual(self.called(b"INVITE sip:a%zz@x SIP/2.0"), "a%zz")
        self.assertEqual(
            self.called(b"INVITE sip:sips%3Auser%40example.com@x SIP/2.0"), "sips:user@example.com"
        )

    def test_user_params_kept(self):
        """``;`` parameters inside the user part are kept (RFC 4475 semiuri)."""
        self.assertEqual(
            self.called(b"OPTIONS sip:user;par=u%40example.net@example.com SIP/2.0"),
            "user;par=u@example.net",
        )

    def test_tel_uri(self):
        """A tel: Request-URI gives its number up to the first ``;``; tel: in To too."""
        self.assertEqual(
            self.called(b"INVITE tel:+442079460999;phone-context=x SIP/2.0"), "+442079460999"
        )
        self.assertEqual(self.called(b"INVITE TEL:+1-555 SIP/2.0"), "+1-555")
        self.assertEqual(self.called(b"REGISTER sip:x SIP/2.0", b"To: <tel:+4420;ext=1>"), "+4420")

    def test_to_fallback(self):
        """Without a Request-URI user part, the To URI user part, same rules; name-addr with or
        without display name, addr-spec whose ``;`` starts header parameters."""
        register = b"REGISTER sip:example.com SIP/2.0"
        self.assertEqual(self.called(register, b'To: "100"<sip:100@x>'), "100")
        self.assertEqual(
            self.called(register, b'To: "a, \\"b<\\"" <sip:%75ser:pw@x>;tag=1'), "user"
        )
        self.assertEqual(self.called(register, b"To: sip:j.user@example.com;tag=1"), "j.user")
        self.assertEqual(self.called(register, b"t: <sip:compact@x>"), "compact")
        self.assertEqual(self.called(b"INVITE sip:@x SIP/2.0", b"To: <sip:200@x>"), "200")
        self.assertEqual(self.called(b"INVITE urn:service:sos SIP/2.0", b"To: <sip:911@x>"), "911")

    def test_none(self):
        """No user part anywhere: None (NOT_FOUND in the event)."""
        register = b"REGISTER sip:example.com SIP/2.0"
        self.assertIsNone(self.called(register))
        self.assertIsNone(self.called(register, b"To: <sip:@x>"))
        self.assertIsNone(self.called(register, b"To: <sip:x>"))
        self.assertIsNone(self.called(register, b"To: garbage"))
        self.assertIsNone(self.called(register, b"To: <http://x@y>"))

    def test_angle_bracket_request_uri(self):
        """RFC 4475 ltgtruri: a Request-URI in <> is malformed, its user is still read."""
        m = parse_message(request(start=b"INVITE <sip:user@example.com> SIP/2.0"))
        self.assertEqual(m.called_number, "user")
        self.assertIn("Request-URI in angle brackets", m.problems)


class FieldTests(SynchronousTestCase):
    """Via, CSeq, Max-Forwards, Content-Length and credentials."""

    def test_vias(self):
        """Every Via value, comma-separated ones split outside quotes and <>, in order; the top
        branch comes from the first one."""
        m = parse_message(
            request(
                b'Via: SIP/2.0/UDP a;branch=z9hG4bK-a;x="q,q" , SIP/2.0/TCP b;branch=b2',
                b'v: SIP/2.0/UDP c ;BRANCH = "z9hG4bK-c"',
            )
        )
        self.assertEqual(
            m.vias,
            (
                'SIP/2.0/UDP a;branch=z9hG4bK-a;x="q,q"',
                "SIP/2.0/TCP b;branch=b2",
                'SIP/2.0/UDP c ;BRANCH = "z9hG4bK-c"',
            ),
        )
        self.assertEqual(m.top_via_branch, "z9hG4bK-a")
        m = parse_message(request(b"Via: SIP/2.0/UDP a", b"Via: SIP/2.0/UDP b;branch=x"))
        self.assertIsNone(m.top_via_branch)
        self.assertEqual(parse_message(request()).vias, ())

    def test_empty_via_values(self):
        """RFC 4475 badinv01: empty comma-separated Via values are malformed and dropped."""
        m = parse_message(corpus_bytes("rfc4475/badinv01.dat"))
        self.assertEqual(m.vias, ("SIP/2.0/UDP 192.0.2.15;;", ";"))
        self.assertIn("empty Via value", m.problems)

    def test_cseq(self):
        """CSeq number and method; up to 2**32-1, leading zeros fine, several spaces fine."""
        m = parse_message(request(b"CSeq: 1  OPTIONS"))
        self.assertEqual(
            (m.cseq, m.cseq_number, m.cseq_method, m.parse_status),
            ("1  OPTIONS", 1, "OPTIONS", PARSE_OK),
        )
        m = parse_message(request(b"CSeq: 0004294967295 OPTIONS"))
        self.assertEqual(m.cseq_number, 2**32 - 1)
        self.assertEqual(m.parse_status, PARSE_OK)

    def test_cseq_overflow_and_garbage(self):
        """A CSeq number above 2**32-1 (RFC 4475 scalar02), negative or missing is None and
        the message malformed; a huge digit string costs nothing."""
        for value in (
            b"4294967296 OPTIONS",
            b"36893488147419103232 OPTIONS",
            b"-1 OPTIONS",
            b"OPTIONS",
            b"",
            b"9" * 50000 + b" OPTIONS",
        ):
            m = parse_message(request(b"CSeq: " + value))
            self.assertIsNone(m.cseq_number, value[:30])
            self.assertEqual(m.parse_status, PARSE_MALFORMED)

    def test_cseq_method_mismatch(self):
        """RFC 4475 mismatch01: a CSeq method other than the request method is malformed; the
        method recorded is the request line's."""
        m = parse_message(request(b"CSeq: 8 INVITE"))
        self.assertEqual((m.method, m.cseq_method), ("OPTIONS", "INVITE"))
        self.assertIn("CSeq method differs from the request method", m.problems)

    def test_max_forwards(self):
        """Max-Forwards 0..255 (leading zeros allowed); above, or not a number, is None."""
        self.assertEqual(parse_message(request(b"Max-Forwards: 0068")).max_forwards, 68)
        self.assertEqual(parse_message(request(b"Max-Forwards: 0")).max_forwards, 0)
        for bad in (b"300", b"-1", b"x", b"", b"1" * 5000):
            m = parse_message(request(b"Max-Forwards: " + bad))
            self.assertIsNone(m.max_forwards)
            self.assertEqual(m.parse_status, PARSE_MALFORMED)

    def test_content_length(self):
        """A valid Content-Length cuts a longer body (RFC 3261 §18.3) and is reported; absent,
        the whole remainder is the body."""
        m = parse_message(request(b"Content-Length: 3", body=b"abcdef"))
        self.assertEqual((m.content_length, m.body, m.parse_status), (3, b"abc", PARSE_OK))
        m = parse_message(request(b"l: 003", b"Content-Length: 3", body=b"abc"))
        self.assertEqual((m.content_length, m.body, m.parse_status), (3, b"abc", PARSE_OK))
        m = parse_message(request(body=b"v=0\r\n"))
        self.assertEqual((m.content_length, m.body, m.parse_status), (None, b"v=0\r\n", PARSE_OK))

    def test_content_length_bad(self):
        """Negative (RFC 4475 ncl), non-numeric, conflicting, overlarge or too-large-for-the-body
        Content-Length values are malformed; the body is never sliced with a negative number."""
        body = b"0123456789"
        for value in (b"-999", b"abc", b"1 2", b"+5", b"", b"1" * 40, b"11", b"99999"):
            m = parse_message(request(b"Content-Length: " + value, body=body))
            self.assertEqual(m.body, body, value)
            self.assertEqual(m.parse_status, PARSE_MALFORMED, value)
        m = parse_message(request(b"Content-Length: -999", body=body))
        self.assertIsNone(m.content_length)
        m = parse_message(request(b"Content-Length: 3", b"l: 4", body=body))
        self.assertIsNone(m.content_length)
        self.assertIn("invalid or conflicting Content-Length", m.problems)
        m = parse_message(request(b"Content-Length: 11", body=body))
        self.assertEqual(m.content_length, 11)
        self.assertIn("Content-Length larger than the body", m.problems)

    def test_content_length_info(self):
        """content_length_info reads a header block like parse_message does."""
        self.assertEqual(content_length_info(request(b"l: 12")), (CL_VALID, 12))
        self.assertEqual(content_length_info(request(b"Content-Length:", b" 7")), (CL_VALID, 7))
        self.assertEqual(content_length_info(request()), (CL_ABSENT, None))
        self.assertEqual(content_length_info(b"OPTIONS sip:x SIP/2.0"), (CL_ABSENT, None))
        self.assertEqual(content_length_info(request(b"Content-Length: -1")), (CL_INVALID, None))
        self.assertEqual(content_length_info(request(b"l: 1", b"l: 2")), (CL_INVALID, None))
        self.assertEqual(content_length_info(request(b"l: " + b"9" * 30)), (CL_OVERLARGE, None))

    def test_digest_credentials(self):
        """username and realm from Authorization (svcrack: quoted, comma-separated, no spaces)
        or Proxy-Authorization, quoted or token values, escapes undone; other schemes ignored."""
        m = parse_message(corpus_bytes("scanners/svcrack-0.3.3_register-digest_udp.sip"))
        self.assertEqual((m.auth_username, m.auth_realm), ("101", "127.0.0.1"))
        m = parse_message(
            request(b'Proxy-Authorization: digest realm=asterisk, USERNAME = bob, nonce="a,b"')
        )
        self.assertEqual((m.auth_username, m.auth_realm), ("bob", "asterisk"))
        m = parse_message(request(b'Authorization: Digest username="a\\"b", realm=""'))
        self.assertEqual((m.auth_username, m.auth_realm), ('a"b', None))
        m = parse_message(request(b"Authorization: Basic dXNlcjpwYXNz"))
        self.assertEqual((m.auth_username, m.auth_realm), (None, None))
        m = parse_message(
            request(b"Authorization: Basic x", b'Proxy-Authorization: Digest username="p"')
        )
        self.assertEqual(m.auth_username, "p")
        m = parse_message(request(b'Authorization: Digest username="never closed'))
        self.assertEqual(m.auth_username, "never closed")
        self.assertEqual(m.parse_status, PARSE_MALFORMED)

    def test_other_fields(self):
        """From, To, Call-ID and Contact are the first values; blank ones are None."""
        m = parse_message(
            request(*BASE, b"Contact: <sip:a@b>", b"Contact: <sip:c@d>", b"Call-ID: x")
        )
        self.assertEqual(m.from_, "<sip:a@192.0.2.9>;tag=1")
        self.assertEqual(m.to, "<sip:100@192.0.2.1>")
        self.assertEqual(m.call_id, "c1@192.0.2.9")
        self.assertEqual(m.contact, "<sip:a@b>")
        self.assertEqual(m.request_uri, "sip:100@192.0.2.1")
        self.assertEqual(m.version, "SIP/2.0")
        self.assertIsNone(m.status_code)
        self.assertIsNone(parse_message(request(b"Call-ID: ")).call_id)

    def test_response_fields(self):
        """A status line gives version, code and reason; no method or Request-URI."""
        m = parse_message(b"SIP/2.0 404 Not  Found\r\nCSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual(
            (m.is_request, m.version, m.status_code, m.reason),
            (False, "SIP/2.0", 404, "Not  Found"),
        )
        self.assertIsNone(m.method)
        self.assertIsNone(m.request_uri)
        self.assertEqual(m.cseq_method, "INVITE")
        self.assertEqual(m.parse_status, PARSE_OK)
        for line in (b"SIP/2.0", b"SIP/2.0 99 x", b"SIP/2.0 abc x", b"SIP/3.0 200 OK"):
            self.assertEqual(parse_message(line + b"\r\n\r\n").parse_status, PARSE_MALFORMED, line)
        self.assertIsNone(parse_message(b"SIP/2.0 200\r\n\r\n").reason)


MUTATION_SOURCES = [
    "scanners/svcrack-0.3.3_register-digest_udp.sip",
    "scanners/svmap-0.3.3_compact-options_udp.sip",
    "scanners/sipp-3.6.1_uac-invite_udp.sip",
    "scanners/synth_tel-uri_invite_udp.sip",
    "rfc4475/wsinv.dat",
    "rfc4475/esc01.dat",
    "rfc4475/mpart01.dat",
    "rfc4475/quotbal.dat",
    "rfc4475/unreason.dat",
    "edge/lf-only_invite.sip",
]

STRUCTURE = b'"<>,;\\:@%= \t\r\nSIP/2.0sip:tel:1'


@st.composite
def mutated_corpus(draw):
    """A corpus message with a few bytes flipped, inserted or deleted and lines duplicated."""
    data = bytearray(corpus_bytes(draw(st.sampled_from(MUTATION_SOURCES))))
    for _ in range(draw(st.integers(1, 8))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "dup_line", "structure"]))
        pos = draw(st.integers(0, len(data)))
        if op == "flip" and pos < len(data):
            data[pos] = draw(st.integers(0, 255))
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del data[pos : pos + draw(st.integers(1, 16))]
        elif op == "structure":
            data[pos:pos] = bytes([draw(st.sampled_from(STRUCTURE))])
        else:
            start = data.rfind(b"\n", 0, pos) + 1
            end = data.find(b"\n", pos)
            end = len(data) if end < 0 else end + 1
            data[end:end] = data[start:end] * draw(st.integers(1, 3))
    return bytes(data)


class PropertyTests(SynchronousTestCase):
    """parse_message never fails in any other way than SIPParseError."""

    def check(self, data: bytes) -> None:
        try:
            m = parse_message(data)
        except SIPParseError as e:
            self.assertTrue(e.args and isinstance(e.args[0], str))
            return
        self.assertIsInstance(m, SIPMessage)
        self.assertIn(m.parse_status, (PARSE_OK, PARSE_MALFORMED))
        self.assertEqual(m.parse_status == PARSE_OK, not m.problems)
        self.assertLessEqual(len(m.headers), MAX_HEADERS)
        for value in (m.method, m.called_number, m.user_agent, m.auth_username, m.auth_realm):
            self.assertTrue(value is None or (isinstance(value, str) and value))
        if m.cseq_number is not None:
            self.assertTrue(0 <= m.cseq_number <= 2**32 - 1)
        self.assertTrue(data.endswith(m.body) or data.find(m.body) >= 0)

    @PROPERTY
    @given(st.binary(max_size=600))
    def test_arbitrary_bytes(self, data):
        """Arbitrary bytes give a SIPMessage or SIPParseError, nothing else."""
        self.check(data)

    @PROPERTY
    @given(
        st.sampled_from([b"INVITE sip:1@x SIP/2.0\r\n", b"SIP/2.0 200 OK\n", b"A B SIP/"]),
        st.lists(st.sampled_from(list(STRUCTURE) + [0x00, 0xFF, 0x41, 0x7A, 0x2D]), max_size=400),
    )
    def test_structured_noise(self, start, noise):
        """A valid start line followed by noise made of SIP's structural characters (quotes,
        brackets, separators, line ends) still parses without other exceptions."""
        self.check(start + bytes(noise))

    @PROPERTY
    @given(mutated_corpus())
    def test_mutated_corpus(self, data):
        """Corpus messages with bytes flipped, inserted or deleted and lines duplicated parse or
        raise SIPParseError, nothing else."""
        self.check(data)


class BigInputTests(SynchronousTestCase):
    """Large hostile inputs finish quickly and stay bounded."""

    def timed(self, data: bytes) -> float:
        started = time.perf_counter()
        try:
            m = parse_message(data)
        except SIPParseError:
            m = None
        if m is not None:
            self.assertLessEqual(len(m.headers), MAX_HEADERS)
            self.assertLessEqual(len(m.vias), 256)
        return time.perf_counter() - started

    def test_big_inputs(self):
        """1 MB without a line end, 100,000 header lines, a 1 MB Via of commas, a 1 MB To of
        quotes and escapes, 1 MB of folding: each parses in well under a few seconds."""
        start = b"INVITE sip:1@x SIP/2.0\r\n"
        cases = [
            b"a" * 1_000_000,
            b"INVITE " + b"a" * 1_000_000,
            start + b"X-A: b\r\n" * 100_000 + b"\r\n",
            start + b"l: 1\r\n" * 100_000 + b"\r\n",
            start + b"Via: " + b",;" * 500_000 + b"\r\n\r\n",
            start + b"To: " + b'"\\' * 500_000 + b"\r\n\r\n",
            start + b"To: <" + b"<" * 1_000_000 + b"\r\n\r\n",
            start + b"User-Agent: x\r\n" + b" y\r\n" * 200_000 + b"\r\n",
            start + b"Authorization: Digest " + b'a="\\",' * 200_000 + b"\r\n\r\n",
        ]
        for data in cases:
            self.assertLess(self.timed(data), 5.0, data[:40])


class FastPathTests(SynchronousTestCase):
    """The parser's quick paths give exactly what its general code gives (issue 7)."""

    @PROPERTY
    @given(
        st.lists(
            st.one_of(
                st.sampled_from([b"Via: SIP/2.0/UDP a;branch=z9hG4bK-1", b"To: <sip:1@x>", b"CSeq: 1 A",
                                 b"v: x", b"Content-Length: 0", b"l:7", b"X-Custom:  y ", b"Via : z",
                                 b"User-Agent:\tua\t", b" folded", b"\tfolded", b"no colon", b":empty",
                                 b"Bad Name: x", b"\xff: x", b"Call-ID:"]),
                st.binary(max_size=20).filter(lambda b: b"\r" not in b and b"\n" not in b),
            ),
            max_size=12,
        )
    )
    def test_known_fields_equal_general(self, lines):
        """For any header lines: when the quick reading of known names accepts them, the fields
        and Content-Length values are the general reading's, and the general reading records no
        problem for them."""
        lines = [line for line in lines if line]
        for line in lines:  # the names seen once are cached, as in a running node
            _message._header_name(line.partition(b":")[0].rstrip(b" \t"))
        known = _message._known_fields(lines)
        problems = _message._Problems()
        general = _message._read_fields(lines, problems)
        if known is not None:
            self.assertEqual(known, general)
            self.assertEqual(problems.items, {})

    @PROPERTY
    @given(st.lists(st.sampled_from([b"\r\n", b"\n", b"\r", b" ", b"a", b":", b"Via: x"]), max_size=30))
    def test_header_lines_split(self, pieces):
        """The CRLF-only quick split of a header block gives the general split's lines."""
        data = b"OPTIONS sip:1@x SIP/2.0\r\n" + b"".join(pieces) + b"\r\n\r\n"
        lines, body_start, complete = _message._header_lines(data, 25)
        end = data.find(b"\n\r\n", 24)
        lf = data.find(b"\n\n", 24)
        cut = min(x for x in (end, lf) if x >= 0)
        block = data[25:cut]
        general = [x[:-1] if x.endswith(b"\r") else x for x in block.split(b"\n")] if block else []
        self.assertEqual(lines, general)
        self.assertTrue(complete)

    def test_lazy_fields_decoded_once(self):
        """Text fields that recording does not need are decoded on first read and kept: a second
        read returns the same object, and they are still read-only."""
        m = parse_message(request(*BASE, b"Contact: <sip:a@192.0.2.9>"))
        self.assertNotIn("headers", m.raw)
        headers = m.headers
        self.assertIs(m.headers, headers)
        self.assertEqual(m.contact, "<sip:a@192.0.2.9>")
        self.assertEqual(m.vias, ("SIP/2.0/UDP 192.0.2.9:5060;branch=z9hG4bK-1",))
        self.assertEqual((m.version, m.request_uri, m.cseq, m.cseq_method),
                         ("SIP/2.0", "sip:100@192.0.2.1", "1 OPTIONS", "OPTIONS"))
        for name in ("headers", "to", "method"):
            self.assertRaises(dataclasses.FrozenInstanceError, setattr, m, name, "X")

    def test_name_cache_bounded(self):
        """Header names are cached only when they are tokens of at most 64 bytes, and at most
        2,048 of them: attacker-chosen names cannot grow it without bound."""
        self.assertIsNone(_message._header_name(b"Bad Name"))
        self.assertNotIn(b"Bad Name", _message._NAME_CACHE)
        self.assertEqual(_message._header_name(b"X-" + b"a" * 100), "x-" + "a" * 100)
        self.assertNotIn(b"X-" + b"a" * 100, _message._NAME_CACHE)
        for i in range(5000):
            _message._header_name(b"X-Many-%d" % i)
        self.assertLessEqual(len(_message._NAME_CACHE), _message._NAME_CACHE_MAX)
