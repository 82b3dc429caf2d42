"""Unit tests of responsive mode: reply building (pure), personas, the responder's timers, CANCEL,
retransmissions and rate limits on ``task.Clock``, and the controller/protocol reply path."""

from __future__ import annotations

import os
import re
import socket
import struct

from twisted.internet import task
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from sentrypeer.events import PARSE_TRUNCATED
from sentrypeer.sip import responses
from sentrypeer.sip.controller import SIPController
from sentrypeer.sip.message import parse_message
from sentrypeer.sip.persona import (
    DEFAULT,
    SHIPPED,
    PersonaError,
    load_persona,
    resolve_persona,
    shipped_persona,
)
from sentrypeer.sip.protocol import (
    IP_PKTINFO,
    IPV6_PKTINFO,
    PacketInfoUDPPort,
    SIPDatagramProtocol,
    SIPStreamFactory,
    source_address_cmsg,
)
from sentrypeer.sip.responder import ReplyRateLimiter, SIPResponder, build_responder
from sentrypeer.sip.responses import (
    MAX_REPLY_BYTES,
    ReplyContext,
    build_response,
    can_reply_to,
    decide,
    header_param,
    make_nonce,
    make_to_tag,
    rewrite_top_via,
)

from .support import CORPUS, ListSink, corpus_bytes, make_config

NODE = "11111111-2222-4333-8444-555555555555"
SOURCE = ("203.0.113.7", 5071)
LOCAL = ("198.51.100.2", 5060)
SECRET = b"k" * 32
FREEPBX = shipped_persona("freepbx")


def request(method="OPTIONS", ruri="sip:100@198.51.100.2", to="<sip:100@198.51.100.2>",
            extra=b"", call_id=b"c1", cseq=1, branch=b"z9hG4bK-1", via_host=b"203.0.113.7:5071"):
    """A minimal well-formed request."""
    return (
        b"%s %s SIP/2.0\r\n"
        b"Via: SIP/2.0/UDP %s;branch=%s;rport\r\n"
        b"From: <sip:a@example.org>;tag=f1\r\nTo: %s\r\n"
        b"Call-ID: %s\r\nCSeq: %d %s\r\n%sContent-Length: 0\r\n\r\n"
        % (method.encode(), ruri.encode(), via_host, branch, to.encode(), call_id, cseq,
           method.encode(), extra)
    )


def context(**kwargs):
    values = dict(source=SOURCE, local=LOCAL, transport="UDP", to_tag="tt1", now=1700000000.0,
                  entropy=bytes(range(32)))
    values.update(kwargs)
    return ReplyContext(**values)


def status_of(data: bytes) -> int:
    return parse_message(data).status_code


def corpus_requests():
    """(name, bytes, parsed) of every corpus file that parses as a request."""
    out = []
    for folder in ("scanners", "rfc4475", "edge"):
        for path in sorted((CORPUS / folder).iterdir()):
            if path.suffix == ".tsv":
                continue
            data = path.read_bytes()
            try:
                message = parse_message(data)
            except Exception:
                continue
            if message.is_request:
                out.append((f"{folder}/{path.name}", data, message))
    return out


class CorpusReplyTests(SynchronousTestCase):
    def test_reply_for_every_corpus_request_parses_back(self):
        """For every corpus request and every shipped persona, each reply decide() asks for is a
        response our parser reads back: the status, every non-empty Via in order (the top one
        with received/rport; no Via line without a sent-by), From, Call-ID and CSeq equal to the
        request's, To with the request's URI and a tag (except on 100), Content-Length 0,
        CRLFCRLF at the end, within the size cap, and no mention of SentryPeer."""
        checked = 0
        for name in SHIPPED:
            persona = shipped_persona(name)
            for label, _, message in corpus_requests():
                decision = decide(message, persona)
                statuses = {
                    responses.NOTHING: [],
                    responses.REPLY: [decision.status],
                    responses.INVITE: [100] + ([decision.early] if decision.early else [])
                    + [decision.status],
                    responses.CANCEL: [481],
                }[decision.kind]
                if message.method == "ACK" or not responses.replyable(message):
                    self.assertEqual(statuses, [], label)
                for status in statuses:
                    challenge = decision.challenge if status == decision.status else None
                    data = build_response(message, status, persona, context(), challenge=challenge,
                                          unsupported=decision.unsupported)
                    self.assertIsNotNone(data, label)
                    self.assertTrue(data.endswith(b"\r\n\r\n"), label)
                    self.assertNotIn(b"\r\n\r\n", data[:-4], label)
                    self.assertLessEqual(len(data), MAX_REPLY_BYTES, label)
                    self.assertNotIn(b"sentrypeer", data.lower(), label)
                    reply = parse_message(data)
                    self.assertFalse(reply.is_request, label)
                    self.assertEqual(reply.status_code, status, label)
                    if message.parse_status == "ok":
                        self.assertEqual(reply.parse_status, "ok", (label, reply.problems))
                    self.assertEqual(reply.content_length, 0, label)
                    vias = responses.mirrored_vias(message)
                    self.assertEqual(len(reply.vias), len(vias), label)
                    self.assertEqual(list(reply.vias[1:]), vias[1:], label)
                    for via in reply.vias:
                        self.assertTrue(via.split(";")[0].strip(), (label, via))
                    self.assertTrue(reply.vias[0].startswith(message.vias[0].split(";")[0]), label)
                    self.assertIn("received=203.0.113.7", reply.vias[0], label)
                    self.assertEqual(reply.top_via_branch, message.top_via_branch, label)
                    self.assertEqual(reply.header("from"), message.header("from"), label)
                    self.assertEqual(reply.header("call-id"), message.header("call-id"), label)
                    self.assertEqual(reply.header("cseq"), message.header("cseq"), label)
                    self.assertTrue(reply.header("to").startswith(message.header("to")), label)
                    tag = header_param(reply.header("to"), "tag")
                    if status == 100:
                        self.assertEqual(reply.header("to"), message.header("to"), label)
                    elif message.header("to").count('"') % 2 == 0:  # quotbal.dat never closes
                        self.assertIsNotNone(tag, label)
                    self.assertEqual(reply.header(persona.agent_header), persona.agent, label)
                    checked += 1
        self.assertGreater(checked, 100)

    def test_corpus_expected_answers(self):
        """The default persona's answer to the scanner captures: OPTIONS 200, svwar's REGISTER
        for 100 a 401 challenge, svcrack's REGISTER with credentials 403, INVITEs 100 then 401,
        svwar's ACK nothing; RFC 4475's invalid requests 400 and SIP/7.0 505."""
        want = {
            "scanners/svmap-0.3.3_options_udp.sip": (responses.REPLY, 200),
            "scanners/nmap-7.93_sipoptions_udp.sip": (responses.REPLY, 200),
            "scanners/sipsak-0.9.8.1_options_udp.sip": (responses.REPLY, 200),
            "scanners/svwar-0.3.3_register-100_udp.sip": (responses.REPLY, 401),
            "scanners/svcrack-0.3.3_register-digest_udp.sip": (responses.REPLY, 403),
            "scanners/svmap-0.3.3_invite_udp.sip": (responses.INVITE, 401),
            "scanners/sipp-3.6.1_uac-invite_udp.sip": (responses.INVITE, 401),
            "scanners/svwar-0.3.3_ack-after-404_udp.sip": (responses.NOTHING, 0),
            "rfc4475/mpart01.dat": (responses.REPLY, 401),
            "rfc4475/escnull.dat": (responses.REPLY, 404),
            "rfc4475/badinv01.dat": (responses.REPLY, 400),
            "rfc4475/clerr.dat": (responses.REPLY, 400),
            "rfc4475/ncl.dat": (responses.REPLY, 400),
            "rfc4475/scalar02.dat": (responses.REPLY, 400),
            "rfc4475/quotbal.dat": (responses.REPLY, 400),
            "rfc4475/lwsstart.dat": (responses.REPLY, 400),
            "rfc4475/mismatch01.dat": (responses.REPLY, 400),
            "rfc4475/badvers.dat": (responses.REPLY, 505),
        }
        for name, (kind, status) in want.items():
            decision = decide(parse_message(corpus_bytes(name)), FREEPBX)
            self.assertEqual((decision.kind, decision.status), (kind, status), name)

    def test_responses_get_nothing(self):
        """A SIP response is never answered."""
        for name in ("rfc4475/unreason.dat", "rfc4475/noreason.dat"):
            self.assertEqual(decide(parse_message(corpus_bytes(name)), FREEPBX).kind,
                             responses.NOTHING)


class MethodTableTests(SynchronousTestCase):
    def decide(self, data, persona=FREEPBX):
        return decide(parse_message(data), persona)

    def test_options_200_lists_capabilities(self):
        """OPTIONS: 200 with Allow, Accept, Supported, Accept-Encoding, Accept-Language and a
        Contact (RFC 3261 §11.2)."""
        message = parse_message(request())
        self.assertEqual(decide(message, FREEPBX).status, 200)
        reply = parse_message(build_response(message, 200, FREEPBX, context()))
        self.assertEqual(reply.header("allow"), ", ".join(FREEPBX.allow))
        self.assertEqual(reply.header("supported"), ", ".join(FREEPBX.supported))
        self.assertEqual(reply.header("accept"), ", ".join(FREEPBX.accept))
        self.assertEqual(reply.header("accept-encoding"), "text/plain")
        self.assertEqual(reply.header("accept-language"), "en")
        self.assertEqual(reply.header("contact"), "<sip:198.51.100.2:5060>")
        self.assertEqual(reply.header("server"), FREEPBX.agent)

    def test_register_existing_extension_challenged(self):
        """REGISTER for an extension the persona has: 401 with a WWW-Authenticate digest
        challenge (realm, nonce, algorithm MD5, qop auth; RFC 3261 §22.4)."""
        message = parse_message(request("REGISTER", "sip:198.51.100.2"))
        decision = decide(message, FREEPBX)
        self.assertEqual((decision.status, decision.challenge), (401, "WWW-Authenticate"))
        reply = parse_message(build_response(message, 401, FREEPBX, context(),
                                             challenge=decision.challenge))
        value = reply.header("www-authenticate")
        self.assertRegex(value, r'^Digest realm="asterisk", nonce="1700000000/[0-9a-f]{32}", '
                                r'opaque="[0-9a-f]{32}", algorithm=MD5, qop="auth"$')

    def test_register_missing_extension_404(self):
        """REGISTER for an extension the persona lacks: 404 (svwar needs both answers)."""
        data = request("REGISTER", "sip:198.51.100.2", to="<sip:4242@198.51.100.2>")
        self.assertEqual(self.decide(data).status, 404)
        data = request("REGISTER", "sip:198.51.100.2", to="<sip:0100@198.51.100.2>")
        self.assertEqual(self.decide(data).status, 404)

    def test_credentials_answered_403(self):
        """REGISTER or INVITE carrying Authorization or Proxy-Authorization: 403."""
        auth = b'Authorization: Digest username="100",realm="asterisk",nonce="n",response="r"\r\n'
        proxy = b'Proxy-Authorization: Digest username="1000",realm="x",nonce="n",response="r"\r\n'
        self.assertEqual(self.decide(request("REGISTER", extra=auth)).status, 403)
        decision = self.decide(request("INVITE", extra=proxy))
        self.assertEqual((decision.kind, decision.status), (responses.INVITE, 403))

    def test_invite_final_per_persona(self):
        """INVITE: 100 then the persona's final response (401, 407 challenges; 404/486/603;
        183 then 487)."""
        data = request("INVITE")
        for name, kind, status, early, challenge in (
            ("freepbx", responses.INVITE, 401, None, "WWW-Authenticate"),
            ("freeswitch", responses.INVITE, 407, None, "Proxy-Authenticate"),
            ("kamailio", responses.INVITE, 407, None, "Proxy-Authenticate"),
        ):
            d = self.decide(data, shipped_persona(name))
            self.assertEqual((d.kind, d.status, d.early, d.challenge),
                             (kind, status, early, challenge), name)
        for value, status, early in (("404", 404, None), ("486", 486, None), ("603", 603, None),
                                     ("183-487", 487, 183)):
            persona = persona_with(invite_response=value)
            d = self.decide(data, persona)
            self.assertEqual((d.kind, d.status, d.early, d.challenge),
                             (responses.INVITE, status, early, None), value)

    def test_other_methods(self):
        """CANCEL is matched by the responder; BYE/INFO/UPDATE/PRACK/NOTIFY 481; SUBSCRIBE,
        MESSAGE, PUBLISH, REFER challenged; ACK nothing; unknown or lower-case methods 501; a
        known method the persona does not allow 405 with Allow."""
        self.assertEqual(self.decide(request("CANCEL")).kind, responses.CANCEL)
        kamailio = shipped_persona("kamailio")
        for method in ("BYE", "INFO", "UPDATE", "PRACK", "NOTIFY"):
            self.assertEqual(self.decide(request(method), kamailio).status, 481, method)
        for method in ("SUBSCRIBE", "MESSAGE", "PUBLISH", "REFER"):
            d = self.decide(request(method))
            self.assertEqual((d.status, d.challenge), (401, "WWW-Authenticate"), method)
        self.assertEqual(self.decide(request("ACK")).kind, responses.NOTHING)
        self.assertEqual(self.decide(request("FOO")).status, 501)
        self.assertEqual(self.decide(request("invite")).status, 501)
        message = parse_message(request("INFO"))
        self.assertEqual(decide(message, shipped_persona("freepbx")).status, 405)
        reply = parse_message(build_response(message, 405, FREEPBX, context()))
        self.assertEqual(reply.header("allow"), ", ".join(FREEPBX.allow))

    def test_in_dialog_and_require(self):
        """A To tag (no such dialog here) gives 481 (RFC 3261 §12.2.2); a Require of an option
        the persona does not support gives 420 with Unsupported (§8.2.2.3)."""
        self.assertEqual(self.decide(request("INVITE", to="<sip:100@x>;tag=abc")).status, 481)
        self.assertEqual(self.decide(request("OPTIONS", to="<sip:100@x>;tag=abc")).status, 481)
        message = parse_message(request("INVITE", extra=b"Require: 100rel, foo, bar\r\n"))
        decision = decide(message, FREEPBX)
        self.assertEqual((decision.status, decision.unsupported), (420, ("foo", "bar")))
        reply = parse_message(build_response(message, 420, FREEPBX, context(),
                                             unsupported=decision.unsupported))
        self.assertEqual(reply.header("unsupported"), "foo, bar")

    def test_unreplyable_requests_get_nothing(self):
        """Without Via, From, To, Call-ID or CSeq no reply can be matched: nothing is sent."""
        full = request()
        for header in (b"Via:", b"From:", b"To:", b"Call-ID:", b"CSeq:"):
            lines = [line for line in full.split(b"\r\n") if not line.startswith(header)]
            message = parse_message(b"\r\n".join(lines))
            self.assertEqual(decide(message, FREEPBX).kind, responses.NOTHING, header)

    def test_to_tag_stable_per_dialog(self):
        """The To tag depends on the Call-ID and From tag only: the same for every response of a
        call (CANCEL's included), different for another call; the request's own tag is kept."""
        a = parse_message(request("INVITE"))
        b = parse_message(request("CANCEL"))
        c = parse_message(request("INVITE", call_id=b"c2"))
        self.assertEqual(make_to_tag(SECRET, a, "uuid"), make_to_tag(SECRET, b, "uuid"))
        self.assertNotEqual(make_to_tag(SECRET, a, "uuid"), make_to_tag(SECRET, c, "uuid"))
        self.assertNotEqual(make_to_tag(SECRET, a, "uuid"), make_to_tag(b"x" * 32, a, "uuid"))
        self.assertRegex(make_to_tag(SECRET, a, "uuid"),
                         r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
        self.assertRegex(make_to_tag(SECRET, a, "alnum"), r"^[A-Za-z0-9]{13}$")
        self.assertRegex(make_to_tag(SECRET, a, "hex-dot"), r"^[0-9a-f]{32}\.[0-9a-f]{4}$")
        tagged = parse_message(request("BYE", to="<sip:100@x>;tag=mine"))
        reply = parse_message(build_response(tagged, 481, FREEPBX, context()))
        self.assertEqual(reply.header("to"), "<sip:100@x>;tag=mine")

    def test_nonce_styles(self):
        """Nonces look like the persona's product and change with the entropy."""
        entropy = bytes(range(32))
        self.assertEqual(make_nonce("timestamped", entropy, 1700000000.5),
                         "1700000000/000102030405060708090a0b0c0d0e0f")
        self.assertRegex(make_nonce("uuid", entropy, 0), r"^[0-9a-f-]{36}$")
        self.assertEqual(make_nonce("hex", entropy, 0), entropy[:16].hex())
        self.assertRegex(make_nonce("base64", entropy, 0), r"^[A-Za-z0-9+/]{32}$")
        self.assertNotEqual(make_nonce("hex", os.urandom(32), 0), make_nonce("hex", entropy, 0))

    def test_realm_is_probed_address(self):
        """A persona realm of {address} becomes the address the request was sent to."""
        message = parse_message(request("REGISTER"))
        persona = shipped_persona("kamailio")
        reply = parse_message(build_response(message, 401, persona, context(),
                                             challenge="WWW-Authenticate"))
        self.assertIn('realm="198.51.100.2"', reply.header("www-authenticate"))


class ViaTests(SynchronousTestCase):
    def test_received_and_rport(self):
        """RFC 3261 §18.2.1 / RFC 3581 §4: received only when the sent-by differs from the source
        or rport was asked for; rport gets the source port; the client's own received is
        replaced; IPv6 received has no brackets."""
        src = ("203.0.113.7", 40000)
        cases = [
            ("SIP/2.0/UDP 203.0.113.7:5060;branch=z9hG4bK-1",
             "SIP/2.0/UDP 203.0.113.7:5060;branch=z9hG4bK-1"),
            ("SIP/2.0/UDP 203.0.113.7:5060;branch=z9hG4bK-1;rport",
             "SIP/2.0/UDP 203.0.113.7:5060;branch=z9hG4bK-1;rport=40000;received=203.0.113.7"),
            ("SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bK-1",
             "SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bK-1;received=203.0.113.7"),
            ("SIP/2.0/UDP pbx.example.org;branch=z9hG4bK-1",
             "SIP/2.0/UDP pbx.example.org;branch=z9hG4bK-1;received=203.0.113.7"),
            ("SIP/2.0/UDP 10.0.0.1;received=1.2.3.4;branch=z9hG4bK-1",
             "SIP/2.0/UDP 10.0.0.1;branch=z9hG4bK-1;received=203.0.113.7"),
            ("SIP / 2.0 / UDP 203.0.113.7 ; branch=z9hG4bK-1",
             "SIP / 2.0 / UDP 203.0.113.7 ; branch=z9hG4bK-1"),
        ]
        for via, want in cases:
            self.assertEqual(rewrite_top_via(via, src), want, via)
        self.assertEqual(rewrite_top_via("SIP/2.0/UDP [2001:db8::1]:5060;branch=b;rport",
                                         ("2001:db8::9", 5062)),
                         "SIP/2.0/UDP [2001:db8::1]:5060;branch=b;rport=5062;received=2001:db8::9")
        self.assertEqual(rewrite_top_via("SIP/2.0/UDP [2001:db8::1]:5060;branch=b",
                                         ("2001:db8::1", 5060)),
                         "SIP/2.0/UDP [2001:db8::1]:5060;branch=b")

    def test_only_top_via_changed_and_order_kept(self):
        """Only the top Via gets received/rport; all Via values come back in order, each on its
        own line (RFC 3261 §8.2.6.2)."""
        data = corpus_bytes("rfc4475/transports.dat")
        message = parse_message(data)
        reply = parse_message(build_response(message, 200, FREEPBX, context()))
        self.assertEqual(reply.vias[1:], message.vias[1:])
        self.assertEqual(reply.vias[0], rewrite_top_via(message.vias[0], SOURCE))

    def test_header_order_per_persona(self):
        """The mirrored headers follow the persona's order (pjsip: Via, Call-ID, From, To,
        CSeq; sofia and Kamailio: Via, From, To, Call-ID, CSeq)."""
        message = parse_message(request())
        for name in SHIPPED:
            persona = shipped_persona(name)
            data = build_response(message, 200, persona, context()).decode()
            names = [line.split(":")[0].lower() for line in data.split("\r\n")[1:6]]
            self.assertEqual(names, list(persona.header_order), name)

    def test_stray_cr_and_size_cap(self):
        """A bare CR inside a mirrored value is neither copied nor altered: no reply at all; a
        reply over MAX_REPLY_BYTES is not built."""
        message = parse_message(request(extra=b"X: y\r\n").replace(b"From: <sip:a",
                                                                  b"From: \"a\rb\" <sip:a"))
        self.assertEqual(decide(message, FREEPBX).kind, responses.NOTHING)
        self.assertIsNone(build_response(message, 200, FREEPBX, context()))
        big = request().replace(b"Via: ", b"Via: SIP/2.0/UDP h;branch=x%s\r\nVia: " % (b"y" * 9000))
        self.assertIsNone(build_response(parse_message(big), 200, FREEPBX, context()))

    def test_can_reply_to(self):
        """Never to port 0, unspecified, multicast, limited broadcast, 0/8 or 240/4 addresses;
        IPv4-mapped addresses judged as IPv4; ordinary unicast allowed."""
        for host, port in (("203.0.113.7", 0), ("0.0.0.0", 5060), ("::", 5060),
                           ("224.0.0.1", 5060), ("239.255.255.250", 1900), ("ff02::1", 5060),
                           ("255.255.255.255", 5060), ("0.1.2.3", 5060), ("240.0.0.1", 5060),
                           ("::ffff:255.255.255.255", 5060), ("::ffff:224.0.0.5", 5060),
                           ("not an address", 5060), ("203.0.113.7", 70000)):
            self.assertFalse(can_reply_to(host, port), (host, port))
        for host in ("203.0.113.7", "127.0.0.1", "::1", "2001:db8::1", "::ffff:203.0.113.7",
                     "fe80::1%eth0"):
            self.assertTrue(can_reply_to(host, 5060), host)


def with_header(data: bytes, name: bytes, line: bytes) -> bytes:
    """*data* with its header line starting ``name:`` replaced by *line* (no line end)."""
    lines = data.split(b"\r\n")
    index = next(i for i, text in enumerate(lines) if text.startswith(name + b":"))
    lines[index] = line
    return b"\r\n".join(lines)


class MirrorTests(SynchronousTestCase):
    """What a reply copies from the request must be copied exactly, or no reply is sent."""

    def replies(self, data: bytes, persona=None) -> list[bytes]:
        """Every reply the responder sends to the single packet *data* within a minute (through
        the controller, so the responder sees the exact bytes); the request is recorded."""
        _, _, protocol, sink, clock = make_responder(persona or FREEPBX)
        send(protocol, data)
        clock.pump([1] * 60)
        self.assertEqual(len(sink.events), 1)
        return [reply for reply, _ in protocol.transport.written]

    @staticmethod
    def vias(reply: bytes) -> list[bytes]:
        return [line for line in reply.split(b"\r\n") if line.lower().startswith(b"via:")]

    def test_badinv01_400_without_empty_via(self):
        """RFC 4475 badinv01 (``Via: SIP/2.0/UDP 192.0.2.15;;,;,,``) gets a 400 whose only Via
        is the real one with received added: no ``Via: ;`` line, no empty parameters."""
        (reply,) = self.replies(corpus_bytes("rfc4475/badinv01.dat"))
        self.assertEqual(status_of(reply), 400)
        self.assertEqual(self.vias(reply), [b"Via: SIP/2.0/UDP 192.0.2.15;received=203.0.113.7"])
        self.assertEqual(parse_message(reply).vias, ("SIP/2.0/UDP 192.0.2.15;received=203.0.113.7",))

    def test_empty_via_values_skipped_or_nothing(self):
        """Empty comma-separated Via values and values without a sent-by are skipped anywhere in
        the list; when no Via remains, nothing is sent."""
        data = with_header(request(), b"Via",
                           b"Via: ;, SIP/2.0/UDP 203.0.113.7:5071;branch=z9hG4bK-1,,;branch=x")
        data = data.replace(b"Call-ID:", b"Via: , ;rport ,SIP/2.0/TCP 10.0.0.1;branch=z9hG4bK-2\r\n"
                            b"Call-ID:")
        (reply,) = self.replies(data)
        self.assertEqual(self.vias(reply), [b"Via: SIP/2.0/UDP 203.0.113.7:5071;branch=z9hG4bK-1",
                                            b"Via: SIP/2.0/TCP 10.0.0.1;branch=z9hG4bK-2"])
        for only in (b"Via: ;", b"Via: ;;,;,,", b"Via: ;branch=z9hG4bK-1;rport"):
            data = with_header(request(), b"Via", only)
            self.assertEqual(self.replies(data), [], only)
            self.assertEqual(decide(parse_message(data), FREEPBX).kind, responses.NOTHING, only)

    def test_control_characters_in_copied_values_no_reply(self):
        """A raw NUL (or bare CR, ESC, DEL...) in a value a reply must copy (Via, From, To,
        Call-ID, CSeq) is never written back, altered or not: nothing is sent, whatever the
        method, and the request is still recorded."""
        for method in ("OPTIONS", "REGISTER", "INVITE"):
            base = request(method)
            cases = [
                with_header(base, b"Call-ID", b"Call-ID: abc\x00def"),
                with_header(base, b"From", b"From: \"a\x00b\" <sip:a@example.org>;tag=f1"),
                with_header(base, b"To", b"To: <sip:100@198.51.100.2>\x1b[2J"),
                with_header(base, b"CSeq", b"CSeq: 1 %s\x7f" % method.encode()),
                with_header(base, b"Via",
                            b"Via: SIP/2.0/UDP 203.0.113.7:5071;branch=z9hG4bK-1\r;rport"),
                with_header(base, b"Via", b"Via: SIP/2.0/UDP 203.0.113.7:5071;branch=z9\x00;rport"),
                with_header(base, b"Via",
                            b"Via: SIP/2.0/UDP 203.0.113.7:5071;branch=z9hG4bK-1;rp\rort"),
            ]
            for data in cases:
                self.assertEqual(self.replies(data), [], data)
                self.assertIsNone(build_response(parse_message(data), 401, FREEPBX, context()))

    def test_bytes_not_utf8_in_copied_values_no_reply(self):
        """Bytes that are not UTF-8 in a copied value (the parser's readable text shows them as
        \\xNN) cannot be copied back: nothing is sent. Four characters ``\\xNN`` really sent in a
        request whose header block is UTF-8 are copied exactly; printable non-ASCII UTF-8 too."""
        base = request()
        for data in (with_header(base, b"From", b"From: \"Jos\xe9\" <sip:a@example.org>;tag=f1"),
                     with_header(base, b"Call-ID", b"Call-ID: \xff\xfe@host"),
                     with_header(base, b"Via", b"Via: SIP/2.0/UDP 203.0.113.7;branch=\xc3;rport")):
            self.assertEqual(self.replies(data), [], data)
            # without the exact bytes the same text is taken as not copyable either
            self.assertEqual(decide(parse_message(data), FREEPBX).kind, responses.NOTHING)
        literal = with_header(base, b"From",
                              b"From: \"a\\x41 \xc3\xa9 \xe2\x80\xa8\" <sip:a@x>;tag=f1")
        (reply,) = self.replies(literal)
        self.assertEqual(status_of(reply), 200)
        self.assertIn(b"\r\nFrom: \"a\\x41 \xc3\xa9 \xe2\x80\xa8\" <sip:a@x>;tag=f1\r\n", reply)
        # a body that is not UTF-8 does not matter
        (reply,) = self.replies(literal.replace(b"Content-Length: 0\r\n\r\n",
                                                b"Content-Length: 2\r\n\r\n\xff\xfe"))
        self.assertEqual(status_of(reply), 200)

    def test_malformed_but_copyable_gets_400(self):
        """A malformed request whose copied values are clean still gets 400 (RFC 3261 §21.4.1),
        even with control characters or non-UTF-8 bytes in headers a reply does not copy."""
        (reply,) = self.replies(request(extra=b"User-Agent: evil\x00\xff\r\n"
                                              b"Max-Forwards: banana\r\n"))
        self.assertEqual(status_of(reply), 400)
        self.assertNotIn(b"\x00", reply)

    def test_unreadable_top_via_parameters_no_reply(self):
        """A top Via whose parameters cannot be read (a quoted string that never closes hides
        whether rport was asked for, RFC 3581 §4) gets no reply; folded Via lines are unfolded
        and still get rport and received right."""
        data = with_header(request(), b"Via",
                           b'Via: SIP/2.0/UDP 203.0.113.7:5071;branch=z9hG4bK-1;x="a;rport')
        self.assertEqual(self.replies(data), [])
        self.assertIsNone(rewrite_top_via('SIP/2.0/UDP h;x="a;rport', SOURCE))
        folded = with_header(request(), b"Via",
                             b"Via: SIP/2.0/UDP\r\n 203.0.113.7:5071;branch=z9hG4bK-1\r\n\t ;rport")
        (reply,) = self.replies(folded)
        self.assertEqual(parse_message(reply).vias[0],
                         "SIP/2.0/UDP 203.0.113.7:5071;branch=z9hG4bK-1 ;rport=5071;"
                         "received=203.0.113.7")

    def test_optional_copies_left_out_not_altered(self):
        """A Timestamp (copied into a 100) or Record-Route (into a 183) holding a control
        character is left out, not written back; clean ones are copied."""
        persona = persona_with(invite_response="183-487", invite_delay=1, ringing_seconds=1)
        dirty = request("INVITE", extra=b"Timestamp: 54\x00\r\nRecord-Route: <sip:p\x01>\r\n")
        trying, early, final = self.replies(dirty, persona)
        self.assertEqual([status_of(trying), status_of(early), status_of(final)], [100, 183, 487])
        self.assertNotIn(b"Timestamp", trying)
        self.assertNotIn(b"Record-Route", early)
        clean = request("INVITE", extra=b"Timestamp: 54\r\nRecord-Route: <sip:p;lr>\r\n")
        trying, early, _ = self.replies(clean, persona)
        self.assertEqual(parse_message(trying).header("timestamp"), "54")
        self.assertEqual(parse_message(early).header("record-route"), "<sip:p;lr>")

    def test_too_many_vias_no_reply(self):
        """When the parser had to leave Via values out (more than MAX_VIAS), a reply could not
        copy them all: nothing is sent."""
        extra = b"Via: " + b",".join(b"SIP/2.0/UDP h%d" % i for i in range(300)) + b"\r\n"
        data = request().replace(b"From:", extra + b"From:")
        self.assertGreater(len(parse_message(data).vias), 255)
        self.assertEqual(self.replies(data), [])
        self.assertIsNone(build_response(parse_message(data), 400, FREEPBX, context()))


def persona_with(**changes):
    import dataclasses

    return dataclasses.replace(FREEPBX, **changes)


class PersonaTests(SynchronousTestCase):
    def test_shipped_personas(self):
        """Three shipped personas, the first the default, none mentioning SentryPeer, each with
        some extensions (svwar needs both 401s and 404s)."""
        self.assertEqual(SHIPPED[0], DEFAULT)
        self.assertEqual(resolve_persona(None).name, DEFAULT)
        self.assertEqual(resolve_persona("").name, DEFAULT)
        agents = set()
        for name in SHIPPED:
            persona = resolve_persona(name)
            self.assertEqual(persona.name, name)
            agents.add(persona.agent)
            text = repr(persona).lower()
            self.assertNotIn("sentrypeer", text)
            self.assertTrue(persona.extension_ranges or persona.extension_names)
        self.assertEqual(len(agents), 3)

    def test_has_extension(self):
        """Ranges match canonical numbers only; names match exactly."""
        persona = persona_with(extension_names=frozenset({"alice"}))
        for user, want in (("100", True), ("105", True), ("106", False), ("200", True),
                           ("0100", False), ("alice", True), ("Alice", False), ("", False),
                           (None, False), ("１００", False)):
            self.assertEqual(persona.has_extension(user), want, user)

    def test_file_with_base(self):
        """A persona file may start from a shipped one and override keys; its name defaults to
        the file name."""
        path = self.mktemp() + ".toml"
        with open(path, "w") as f:
            f.write('base = "freeswitch"\nagent = "Acme PBX 2.1"\nextensions = ["7000-7009", '
                    '"bob"]\ninvite_response = 486\n')
        persona = resolve_persona(path)
        self.assertEqual(persona.agent, "Acme PBX 2.1")
        self.assertEqual(persona.agent_header, "User-Agent")
        self.assertEqual(persona.invite_final, 486)
        self.assertTrue(persona.has_extension("7005") and persona.has_extension("bob"))
        self.assertEqual(persona.name, os.path.basename(path)[:-5])

    def test_bad_settings_are_one_line_errors(self):
        """Unknown names, missing files, TOML errors, unknown keys, bad values and any mention
        of SentryPeer are PersonaError with a one-line message naming the problem."""
        def bad(text):
            path = self.mktemp() + ".toml"
            with open(path, "w") as f:
                f.write(text)
            return path

        cases = [
            ("asterisk", "neither a shipped persona"),
            (bad("agent = \n"), "line 1"),
            (bad('base = "freepbx"\ncolour = "red"\n'), "unknown key 'colour'"),
            (bad('base = "nope"\n'), "base must be one of"),
            (bad('agent = "x"\n'), "missing key"),
            (bad('base = "freepbx"\nagent = "SentryPeer 4"\n'), "must not name the honeypot"),
            (bad('base = "freepbx"\ninvite_response = 200\n'), "invite_response must be one of"),
            (bad('base = "freepbx"\nextensions = ["9-1"]\n'), "empty range"),
            (bad('base = "freepbx"\nallow = ["IN VITE"]\n'), "not a method token"),
            (bad('base = "freepbx"\nrealm = "a\\"b"\n'), "realm must not contain quotes"),
            (bad('base = "freepbx"\nheader_order = ["via"]\n'), "header_order"),
            (bad('base = "freepbx"\ninvite_delay = 99\n'), "invite_delay must be between"),
            (bad('base = "freepbx"\nagent = "a\\u0007b"\n'), "control character"),
            (bad('base = "freepbx"\nopaque = "yes"\n'), "opaque must be true or false"),
        ]
        for value, fragment in cases:
            with self.assertRaises(PersonaError, msg=value) as caught:
                resolve_persona(value)
            message = str(caught.exception)
            self.assertIn(fragment, message, value)
            self.assertNotIn("\n", message)
            self.assertTrue(message.startswith("--sip-persona: "), message)

    def bad_file(self, text: str) -> str:
        path = self.mktemp() + ".toml"
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        return path

    def assertRefused(self, text: str, fragment: str) -> None:
        """*text* as a persona file is refused with a one-line error containing *fragment*."""
        path = self.bad_file(text)
        with self.assertRaises(PersonaError, msg=text) as caught:
            resolve_persona(path)
        message = str(caught.exception)
        self.assertIn(fragment, message, text)
        self.assertNotIn("\n", message)
        self.assertNotIn("\r", message)
        self.assertTrue(message.startswith("--sip-persona: "), message)

    def test_empty_allow_refused(self):
        """allow = [] is refused with a one-line error: an empty Allow would answer every known
        method 405 and list nothing to OPTIONS."""
        self.assertRefused('base = "freepbx"\nallow = []\n', "allow must not be empty")
        # other lists may be empty
        persona = resolve_persona(self.bad_file('base = "freepbx"\nsupported = []\naccept = []\n'))
        self.assertEqual((persona.supported, persona.accept), ((), ()))

    def test_non_printable_header_text_refused(self):
        """Any character str.isprintable() rejects (U+2028, U+2029, U+0085, NBSP, zero-width
        space, BOM, TAB, DEL, ESC...) is refused in agent and every other header value."""
        for char in ("\u2028", "\u2029", "\u0085", "\u00a0", "\u200b", "\ufeff", "\t",
                     "\u007f", "\u001b", "\u3000"):
            escaped = "\\u%04x" % ord(char)
            for key in ("agent", "realm", "accept_language", "accept_encoding", "name"):
                self.assertRefused(f'base = "freepbx"\n{key} = "a{escaped}b"\n',
                                   "non-printable or control character")
            self.assertRefused(f'base = "freepbx"\nsupported = ["a{escaped}b"]\n',
                               "non-printable or control character")
        persona = resolve_persona(self.bad_file('base = "freepbx"\nagent = "Café PBX 1.0"\n'))
        self.assertEqual(persona.agent, "Café PBX 1.0")

    def test_honeypot_name_variants_refused(self):
        """"sentry", optional spaces, hyphens, underscores or dots, then "peer", in any case (and
        in fullwidth letters) is refused; other words with "sentry" or "peer" are fine."""
        for value in ("Sentry Peer 4", "sentry-peer", "SENTRYPEER", "Sentry_Peer", "sentry.peer",
                      "x SeNtRy - . _PeEr y", "ＳｅｎｔｒｙＰｅｅｒ"):
            self.assertRefused(f'base = "freepbx"\nagent = "{value}"\n',
                               "must not name the honeypot")
        self.assertRefused('base = "freepbx"\nrealm = "Sentry Peer"\n',
                           "must not name the honeypot")
        persona = resolve_persona(self.bad_file('base = "freepbx"\nagent = "Sentry PBX peer 2"\n'))
        self.assertEqual(persona.agent, "Sentry PBX peer 2")

    def test_large_file_refused(self):
        """A persona file over 64 KiB is refused before parsing."""
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("#" * 70000)
        self.assertRaises(PersonaError, load_persona, path)


# -- the responder on a fake clock ---------------------------------------------------------------


class FakeUDP:
    """A UDP transport that records ``write(data, addr)``."""

    def __init__(self):
        self.written = []

    def write(self, data, addr):
        self.written.append((data, addr))

    def getHost(self):
        return IPv4Address("UDP", *LOCAL)


def make_responder(persona=FREEPBX, rate=10.0, **kwargs):
    clock = task.Clock()
    sink = ListSink()
    controller = SIPController(node_id=NODE, sink=sink, clock=clock,
                               max_stored_reply_bytes=kwargs.pop("max_stored", 1 << 20))
    responder = SIPResponder(persona, clock, reply_rate=rate, secret=SECRET, **kwargs)
    responder.install(controller)
    protocol = SIPDatagramProtocol(controller)
    protocol.transport = FakeUDP()
    return responder, controller, protocol, sink, clock


def send(protocol, data, source=SOURCE):
    protocol.packetReceived(data, source, LOCAL)


def sent(protocol):
    return [(status_of(data), addr) for data, addr in protocol.transport.written]


class ResponderTests(SynchronousTestCase):
    def test_options_answered_to_packet_source_and_recorded_responsive(self):
        """OPTIONS gets one 200 sent to the packet's source address and port (the Via says
        another port); the event is recorded once, collected_method responsive."""
        responder, controller, protocol, sink, _ = make_responder()
        send(protocol, corpus_bytes("scanners/svmap-0.3.3_options_udp.sip"))
        self.assertEqual(sent(protocol), [(200, SOURCE)])
        self.assertEqual([e.collected_method for e in sink.events], ["responsive"])
        self.assertEqual(controller.collected_method, "responsive")
        self.assertEqual(responder.stats.sent, 1)

    def test_invite_100_then_final_after_delay(self):
        """INVITE: 100 Trying at once, the persona's final response after invite_delay, both
        with the same To tag on the final; the ACK that follows gets nothing."""
        persona = persona_with(invite_delay=0.5)
        responder, _, protocol, sink, clock = make_responder(persona)
        send(protocol, request("INVITE"))
        self.assertEqual(sent(protocol), [(100, SOURCE)])
        self.assertEqual(responder.pending, 1)
        clock.advance(0.4)
        self.assertEqual(len(protocol.transport.written), 1)
        clock.advance(0.1)
        self.assertEqual(sent(protocol), [(100, SOURCE), (401, SOURCE)])
        self.assertEqual(responder.pending, 0)
        final = parse_message(protocol.transport.written[1][0])
        self.assertIsNotNone(final.header("www-authenticate"))
        send(protocol, request("ACK", to="<sip:100@198.51.100.2>;tag=x"))
        self.assertEqual(len(protocol.transport.written), 2)
        self.assertEqual([e.sip_method for e in sink.events], ["INVITE", "ACK"])

    def test_183_then_487(self):
        """A "183-487" persona: 100 at once, 183 after invite_delay, 487 after ringing_seconds,
        all 18x/final with one To tag and a Contact."""
        persona = persona_with(invite_response="183-487", invite_delay=1, ringing_seconds=4)
        _, _, protocol, _, clock = make_responder(persona)
        send(protocol, request("INVITE"))
        clock.advance(1)
        self.assertEqual([s for s, _ in sent(protocol)], [100, 183])
        clock.advance(3.9)
        self.assertEqual(len(protocol.transport.written), 2)
        clock.advance(0.1)
        self.assertEqual([s for s, _ in sent(protocol)], [100, 183, 487])
        early, final = (parse_message(d) for d, _ in protocol.transport.written[1:])
        self.assertEqual(header_param(early.header("to"), "tag"),
                         header_param(final.header("to"), "tag"))
        self.assertIsNotNone(early.header("contact"))
        self.assertIsNone(final.header("reason"))

    def test_cancel_pending_invite(self):
        """CANCEL of a pending INVITE: 200 to the CANCEL, then 487 to the INVITE with the same
        To tag (RFC 3261 §9.2); no other final response follows."""
        persona = persona_with(invite_response="183-487", invite_delay=0.1, ringing_seconds=10)
        responder, _, protocol, sink, clock = make_responder(persona)
        send(protocol, request("INVITE"))
        clock.advance(0.2)
        send(protocol, request("CANCEL"))
        self.assertEqual([s for s, _ in sent(protocol)], [100, 183, 200, 487])
        cancel_ok, terminated = (parse_message(d) for d, _ in protocol.transport.written[2:])
        self.assertEqual(cancel_ok.cseq_method, "CANCEL")
        self.assertEqual(terminated.cseq_method, "INVITE")
        self.assertEqual(header_param(cancel_ok.header("to"), "tag"),
                         header_param(terminated.header("to"), "tag"))
        clock.advance(20)
        self.assertEqual(len(protocol.transport.written), 4)
        self.assertEqual(responder.stats.cancelled, 1)
        self.assertEqual(clock.getDelayedCalls(), [])
        self.assertEqual([e.sip_method for e in sink.events], ["INVITE", "CANCEL"])

    def test_cancel_without_invite_481(self):
        """A CANCEL matching no INVITE transaction (none at all, or another branch, Call-ID or
        CSeq number) gets 481."""
        _, _, protocol, _, clock = make_responder()
        send(protocol, request("CANCEL"))
        send(protocol, request("INVITE", call_id=b"c9"))
        clock.advance(1)
        send(protocol, request("CANCEL", call_id=b"c9", branch=b"z9hG4bK-other"))
        send(protocol, request("CANCEL", call_id=b"c8"))
        send(protocol, request("CANCEL", call_id=b"c9", cseq=2))
        self.assertEqual([s for s, _ in sent(protocol)], [481, 100, 401, 481, 481, 481])

    def test_cancel_after_final_response_200_without_487(self):
        """A CANCEL for an INVITE whose final response was already sent matches the INVITE server
        transaction, which lives 32 s (64*T1) after that response (RFC 3261 §9.2, §17.2.1): it gets
        200 and no 487 follows; after those 32 s it gets 481."""
        responder, _, protocol, sink, clock = make_responder()
        send(protocol, request("INVITE", call_id=b"late"))
        clock.advance(1)
        self.assertEqual([s for s, _ in sent(protocol)], [100, 401])
        send(protocol, request("CANCEL", call_id=b"late"))
        self.assertEqual([s for s, _ in sent(protocol)], [100, 401, 200])
        ok = parse_message(protocol.transport.written[2][0])
        self.assertEqual(ok.cseq_method, "CANCEL")
        final = parse_message(protocol.transport.written[1][0])
        self.assertEqual(header_param(ok.header("to"), "tag"),
                         header_param(final.header("to"), "tag"))
        clock.advance(60)
        self.assertEqual(len(protocol.transport.written), 3)
        self.assertEqual((responder.stats.cancelled, responder.stats.cancelled_late), (0, 1))
        # the same INVITE transaction 32 s after its final response is gone
        send(protocol, request("INVITE", call_id=b"gone"))
        clock.advance(1)
        clock.advance(31.9)
        self.assertEqual(responder.completed, 1)
        clock.advance(0.2)
        send(protocol, request("CANCEL", call_id=b"gone"))
        self.assertEqual([s for s, _ in sent(protocol)][-1], 481)
        self.assertEqual(len(sink.events), 4)

    def test_cancel_after_immediate_final_response_200(self):
        """An INVITE answered at once with a final response (420 for an unsupported Require, 481
        for an unknown dialog) also leaves a transaction a CANCEL matches: 200."""
        _, _, protocol, _, _ = make_responder()
        send(protocol, request("INVITE", call_id=b"r", extra=b"Require: foo\r\n"))
        send(protocol, request("CANCEL", call_id=b"r"))
        send(protocol, request("INVITE", call_id=b"d", to="<sip:100@x>;tag=t"))
        send(protocol, request("CANCEL", call_id=b"d", to="<sip:100@x>;tag=t"))
        self.assertEqual([s for s, _ in sent(protocol)], [420, 200, 481, 200])

    def test_answered_invites_table_bounded(self):
        """At most max_completed answered INVITE transactions are remembered (oldest forgotten
        first): a CANCEL for a forgotten one gets 481, for a remembered one 200."""
        responder, _, protocol, _, clock = make_responder(max_completed=2)
        for i in range(3):
            send(protocol, request("INVITE", call_id=b"m%d" % i))
            clock.advance(1)
        self.assertEqual(responder.completed, 2)
        send(protocol, request("CANCEL", call_id=b"m0"))
        send(protocol, request("CANCEL", call_id=b"m2"))
        self.assertEqual([s for s, _ in sent(protocol)][-2:], [481, 200])
        clock.advance(40)
        self.assertEqual(responder.completed, 0)

    def test_rate_limit_checked_before_building(self):
        """A request over its destination's budget costs no reply building: no To tag HMAC, no
        nonce entropy, no serialisation. Within budget, the first reply takes exactly one token
        (not one to decide and one to send); retransmissions get the stored reply through the
        same limiter."""
        calls = {"build": 0, "tag": 0, "entropy": 0}

        def counting(name, function):
            def wrapper(*args, **kwargs):
                calls[name] += 1
                return function(*args, **kwargs)
            return wrapper

        self.patch(responses, "build_response", counting("build", responses.build_response))
        self.patch(responses, "make_to_tag", counting("tag", responses.make_to_tag))
        entropy = counting("entropy", os.urandom)
        responder, controller, protocol, sink, clock = make_responder(rate=1, entropy=entropy)
        first = request("REGISTER", call_id=b"r0")
        send(protocol, first)
        for i in range(1, 100):
            send(protocol, request("REGISTER", call_id=b"r%d" % i))
        self.assertEqual(calls, {"build": 2, "tag": 2, "entropy": 2})
        self.assertEqual([s for s, _ in sent(protocol)], [401, 401])
        self.assertEqual((responder.stats.sent, responder.stats.limited), (2, 98))
        self.assertEqual(len(sink.events), 100)
        send(protocol, first)  # retransmission, no token left
        self.assertEqual(len(protocol.transport.written), 2)
        clock.advance(1)
        send(protocol, first)  # one token again: the stored reply, not a new one
        self.assertEqual(len(protocol.transport.written), 3)
        self.assertEqual(protocol.transport.written[2], protocol.transport.written[0])
        self.assertEqual(calls["build"], 2)
        self.assertEqual(controller.stats.retransmissions, 2)
        self.assertEqual(responder.stats.limited, 99)

    def test_forbidden_destination_costs_no_building(self):
        """A request from a forbidden source (broadcast, multicast, port 0) is refused before any
        reply is built."""
        calls = []
        self.patch(responses, "build_response", lambda *a, **k: calls.append(a))
        responder, _, protocol, sink, _ = make_responder()
        send(protocol, request(), ("255.255.255.255", 5060))
        send(protocol, request(call_id=b"m"), ("224.0.0.1", 5060))
        self.assertEqual(calls, [])
        self.assertEqual(responder.stats.refused, 2)
        self.assertEqual(len(sink.events), 2)

    def test_retransmission_gets_same_reply_not_recorded(self):
        """A retransmitted REGISTER gets byte-for-byte the same 401 (same nonce) again and is
        not recorded twice (RFC 3261 §17.2.2)."""
        _, controller, protocol, sink, clock = make_responder()
        data = corpus_bytes("scanners/svwar-0.3.3_register-100_udp.sip")
        send(protocol, data)
        clock.advance(0.5)
        send(protocol, data)
        first, second = protocol.transport.written
        self.assertEqual(first, second)
        self.assertEqual(len(sink.events), 1)
        self.assertEqual(controller.stats.retransmissions, 1)

    def test_invite_retransmission_gets_latest_response(self):
        """A retransmitted INVITE gets the 100 while pending and the final response after it
        was sent (RFC 3261 §17.2.1)."""
        persona = persona_with(invite_delay=1)
        _, _, protocol, sink, clock = make_responder(persona)
        data = request("INVITE")
        send(protocol, data)
        clock.advance(0.5)
        send(protocol, data)
        clock.advance(0.5)
        send(protocol, data)
        self.assertEqual([s for s, _ in sent(protocol)], [100, 100, 401, 401])
        self.assertEqual(protocol.transport.written[2], protocol.transport.written[3])
        self.assertEqual(len(sink.events), 1)

    def test_replayed_replies_are_rate_limited(self):
        """Replays to retransmissions count against the destination's budget like first
        replies: 1,000 copies of one request from one address get at most the burst."""
        responder, controller, protocol, sink, _ = make_responder(rate=5)
        data = request()
        for _ in range(1000):
            send(protocol, data)
        self.assertEqual(len(protocol.transport.written), 10)
        self.assertEqual(responder.stats.limited, 990)
        self.assertEqual(len(sink.events), 1)
        self.assertEqual(controller.stats.retransmissions, 999)

    def test_flood_from_many_sources_all_recorded_budget_per_destination(self):
        """10,000 distinct requests from 100 source addresses on a frozen clock: each address
        gets exactly its burst (2 x rate) of replies, every request is recorded."""
        responder, _, protocol, sink, _ = make_responder(rate=3)
        for i in range(10_000):
            source = (f"198.18.{i % 100}.1", 1024 + i % 7)
            send(protocol, request(call_id=b"f%d" % i), source)
        per_address = {}
        for _, (host, _) in protocol.transport.written:
            per_address[host] = per_address.get(host, 0) + 1
        self.assertEqual(len(per_address), 100)
        self.assertEqual(set(per_address.values()), {6})
        self.assertEqual(len(sink.events), 10_000)
        self.assertEqual(responder.stats.limited, 10_000 - 600)

    def test_never_reply_to_forbidden_sources(self):
        """Requests from broadcast, multicast, unspecified or port-0 sources are recorded but
        never answered."""
        responder, _, protocol, sink, _ = make_responder()
        for i, source in enumerate((("255.255.255.255", 5060), ("224.0.0.1", 5060),
                                    ("0.0.0.0", 5060), ("203.0.113.7", 0), ("ff02::1", 5060),
                                    ("::", 5060))):
            send(protocol, request(call_id=b"b%d" % i), source)
        self.assertEqual(protocol.transport.written, [])
        self.assertEqual(len(sink.events), 6)
        self.assertEqual(responder.stats.refused, 6)

    def test_protocol_drops_forbidden_destination_without_gate(self):
        """The UDP protocol itself refuses forbidden destinations, whatever the caller."""
        protocol = SIPDatagramProtocol(None)
        protocol.transport = FakeUDP()
        protocol._reply(b"x", ("255.255.255.255", 5060))
        protocol._reply(b"x", ("203.0.113.7", 0))
        protocol._reply(b"x", ("203.0.113.7", 5060))
        self.assertEqual(protocol.transport.written, [(b"x", ("203.0.113.7", 5060))])

    def test_pending_table_bounded(self):
        """With max_pending INVITEs waiting, a new one makes the oldest finish at once; the
        table never grows past the bound."""
        persona = persona_with(invite_delay=5)
        responder, _, protocol, _, clock = make_responder(persona, max_pending=2)
        for i in range(3):
            send(protocol, request("INVITE", call_id=b"p%d" % i))
        self.assertEqual(responder.pending, 2)
        self.assertEqual(responder.stats.hurried, 1)
        self.assertEqual([s for s, _ in sent(protocol)], [100, 100, 100, 401])
        clock.advance(5)
        self.assertEqual(responder.pending, 0)
        self.assertEqual([s for s, _ in sent(protocol)].count(401), 3)

    def test_stop_cancels_timers(self):
        """Stopping the responder cancels pending INVITE timers: nothing is sent later."""
        persona = persona_with(invite_delay=5)
        responder, _, protocol, _, clock = make_responder(persona)
        responder.startService()
        send(protocol, request("INVITE"))
        responder.stopService()
        self.assertEqual(clock.getDelayedCalls(), [])
        clock.advance(10)
        self.assertEqual([s for s, _ in sent(protocol)], [100])

    def test_truncated_and_non_sip_not_answered(self):
        """A truncated stream message and a non-SIP probe are recorded, never answered."""
        responder, controller, _, sink, _ = make_responder()
        replies = []
        controller.message_received(request(), "TCP", SOURCE, LOCAL, connection_id=1,
                                    status=PARSE_TRUNCATED, reply=replies.append)
        controller.message_received(b"GET / HTTP/1.0\r\n\r\n", "TCP", SOURCE, LOCAL,
                                    connection_id=1, reply=replies.append)
        self.assertEqual(replies, [])
        self.assertEqual(len(sink.events), 2)

    def test_tcp_reply_written_on_connection(self):
        """Over TCP the reply is written on the same connection."""
        _, controller, _, _, _ = make_responder()
        protocol = SIPStreamFactory(controller, "TCP").buildProtocol(None)
        transport = StringTransport(hostAddress=IPv4Address("TCP", *LOCAL),
                                    peerAddress=IPv4Address("TCP", *SOURCE))
        protocol.makeConnection(transport)
        protocol.dataReceived(corpus_bytes("scanners/sipsak-0.9.8.1_options_tcp.sip"))
        reply = parse_message(transport.value())
        self.assertEqual(reply.status_code, 200)
        self.assertIn("received=203.0.113.7", reply.vias[0])
        self.assertIn("rport=5071", reply.vias[0])
        self.assertEqual(reply.header("contact"), "<sip:198.51.100.2:5060;transport=tcp>")

    def test_stored_replies_bounded(self):
        """Replies kept for retransmissions never exceed max_stored_reply_bytes; the oldest are
        forgotten first, and expire with their transaction after 32 s."""
        _, controller, protocol, _, clock = make_responder(rate=1e6, max_stored=2000)
        for i in range(20):
            send(protocol, request(call_id=b"s%d" % i))
        self.assertLessEqual(controller._reply_bytes, 2000)
        self.assertEqual(controller._reply_bytes, sum(map(len, controller._replies.values())))
        self.assertGreater(len(controller._replies), 0)
        clock.advance(33)
        send(protocol, request(call_id=b"late"))
        self.assertEqual(len(controller._replies), 1)

    def test_build_responder_from_config(self):
        """build_responder reads --sip-persona and --reply-rate from the Config."""
        config = make_config(self.mktemp(), (), sip_persona="kamailio", reply_rate=3.0)
        responder = build_responder(config, task.Clock())
        self.assertEqual(responder.persona.name, "kamailio")
        self.assertEqual(responder.limiter.rate, 3.0)
        self.assertEqual(responder.limiter.burst, 6.0)


class RateLimiterTests(SynchronousTestCase):
    def test_burst_then_rate(self):
        """A fresh destination may burst twice the rate, then gets the rate per second."""
        clock = task.Clock()
        limiter = ReplyRateLimiter(10, clock)
        self.assertEqual(sum(limiter.allow("203.0.113.7") for _ in range(100)), 20)
        clock.advance(0.5)
        self.assertEqual(sum(limiter.allow("203.0.113.7") for _ in range(100)), 5)
        clock.advance(10)
        self.assertEqual(sum(limiter.allow("203.0.113.7") for _ in range(100)), 20)

    def test_per_destination_and_grouping(self):
        """Buckets are per IPv4 address (an IPv4-mapped address is the same destination) and
        per IPv6 /64."""
        clock = task.Clock()
        limiter = ReplyRateLimiter(1, clock)
        self.assertEqual(sum(limiter.allow("192.0.2.1") for _ in range(5)), 2)
        self.assertFalse(limiter.allow("::ffff:192.0.2.1"))
        self.assertTrue(limiter.allow("192.0.2.2"))
        self.assertEqual(sum(limiter.allow(f"2001:db8:0:1::{i:x}") for i in range(50)), 2)
        self.assertTrue(limiter.allow("2001:db8:0:2::1"))

    def test_table_bounded_and_fails_closed(self):
        """At most max_entries destinations are remembered; while all are busy a new one gets
        no reply (a flood cannot evict a victim's bucket); refilled buckets are forgotten."""
        clock = task.Clock()
        limiter = ReplyRateLimiter(1, clock, max_entries=3)
        for host in ("192.0.2.1", "192.0.2.2", "192.0.2.3"):
            self.assertTrue(limiter.allow(host))
        self.assertFalse(limiter.allow("192.0.2.4"))
        self.assertEqual((len(limiter), limiter.full), (3, 1))
        clock.advance(2)
        self.assertTrue(limiter.allow("192.0.2.4"))
        self.assertEqual(len(limiter), 1)

    def test_rejects_non_positive_rate(self):
        """A rate of zero or less is a programming error."""
        self.assertRaises(ValueError, ReplyRateLimiter, 0, task.Clock())

    def test_low_rate_holds_at_least_one_token(self):
        """Below 0.5 replies/s the bucket still holds one token (twice the rate would be less than
        one reply, and nothing would ever be sent): a rate of 0.4 allows one reply at once, then
        one every 2.5 s; from 0.5 up the burst stays twice the rate."""
        clock = task.Clock()
        limiter = ReplyRateLimiter(0.4, clock)
        self.assertEqual(limiter.burst, 1.0)
        self.assertEqual(sum(limiter.allow("192.0.2.1") for _ in range(10)), 1)
        clock.advance(2.4)
        self.assertFalse(limiter.allow("192.0.2.1"))
        clock.advance(0.1)
        self.assertTrue(limiter.allow("192.0.2.1"))
        self.assertFalse(limiter.allow("192.0.2.1"))
        clock.advance(25)
        self.assertEqual(sum(limiter.allow("192.0.2.1") for _ in range(10)), 1)
        for rate in (0.01, 0.1, 0.49):
            limiter = ReplyRateLimiter(rate, task.Clock())
            self.assertEqual(limiter.burst, 1.0, rate)
            self.assertTrue(limiter.allow("192.0.2.1"), rate)
        self.assertEqual(ReplyRateLimiter(0.5, clock).burst, 1.0)
        self.assertEqual(ReplyRateLimiter(0.75, clock).burst, 1.5)
        self.assertEqual(ReplyRateLimiter(3, clock).burst, 6.0)
        self.assertEqual(ReplyRateLimiter(1, clock, burst=0.2).burst, 1.0)

    def test_low_reply_rate_still_answers(self):
        """--reply-rate 0.4 through the responder: the first OPTIONS is answered, the next ones
        within 2.5 s are not, the one after 2.5 s is."""
        responder, _, protocol, sink, clock = make_responder(rate=0.4)
        for i in range(5):
            send(protocol, request(call_id=b"low%d" % i))
        self.assertEqual([s for s, _ in sent(protocol)], [200])
        clock.advance(2.5)
        send(protocol, request(call_id=b"late"))
        self.assertEqual([s for s, _ in sent(protocol)], [200, 200])
        self.assertEqual((responder.stats.sent, responder.stats.limited), (2, 4))
        self.assertEqual(len(sink.events), 6)


class SendmsgTests(SynchronousTestCase):
    def test_source_address_cmsg(self):
        """The packet-info control message carries the probed address: in_pktinfo on IPv4
        sockets, in6_pktinfo (IPv4-mapped for IPv4) on IPv6 sockets; nothing for unspecified,
        broadcast or multicast addresses."""
        ((level, kind, data),) = source_address_cmsg("127.0.0.2", socket.AF_INET)
        self.assertEqual((level, kind), (socket.IPPROTO_IP, IP_PKTINFO))
        self.assertEqual(data, struct.pack("=i4s4s", 0, socket.inet_aton("127.0.0.2"), bytes(4)))
        ((level, kind, data),) = source_address_cmsg("::ffff:127.0.0.2", socket.AF_INET)
        self.assertEqual(data[4:8], socket.inet_aton("127.0.0.2"))
        ((level, kind, data),) = source_address_cmsg("127.0.0.2", socket.AF_INET6)
        self.assertEqual((level, kind), (socket.IPPROTO_IPV6, IPV6_PKTINFO))
        self.assertEqual(data, socket.inet_pton(socket.AF_INET6, "::ffff:127.0.0.2") + bytes(4))
        ((_, _, data),) = source_address_cmsg("2001:db8::5", socket.AF_INET6)
        self.assertEqual(data[:16], socket.inet_pton(socket.AF_INET6, "2001:db8::5"))
        for local, family in (("0.0.0.0", socket.AF_INET), ("::", socket.AF_INET6),
                              ("255.255.255.255", socket.AF_INET), ("224.0.0.1", socket.AF_INET),
                              ("2001:db8::5", socket.AF_INET), ("junk", socket.AF_INET)):
            self.assertEqual(source_address_cmsg(local, family), (), local)

    def test_sendmsg_used_then_plain_write_fallback(self):
        """On a packet-info port the reply goes out with sendmsg from the probed address; when
        the kernel refuses that (EINVAL) it falls back to a plain write; EAGAIN drops it."""
        import errno

        class Socket:
            def __init__(self, error=None):
                self.calls, self.error = [], error

            def sendmsg(self, buffers, ancillary, flags, address):
                self.calls.append((buffers, ancillary, address))
                if self.error:
                    raise OSError(self.error, os.strerror(self.error))

        class Port(PacketInfoUDPPort):
            def __init__(self, skt):
                self.socket = skt
                self.addressFamily = socket.AF_INET
                self.written = []

            def write(self, data, addr=None):
                self.written.append((data, addr))

        for error, want_written in ((None, []), (errno.EINVAL, [(b"r", ("192.0.2.9", 5060))]),
                                    (errno.EAGAIN, [])):
            skt = Socket(error)
            protocol = SIPDatagramProtocol(None)
            protocol.transport = Port(skt)
            protocol._reply(b"r", ("192.0.2.9", 5060), "127.0.0.2")
            self.assertEqual(len(skt.calls), 1)
            self.assertEqual(skt.calls[0][0], [b"r"])
            self.assertEqual(skt.calls[0][2], ("192.0.2.9", 5060))
            self.assertEqual(protocol.transport.written, want_written)


class NoFingerprintTests(SynchronousTestCase):
    def test_no_reply_names_the_honeypot(self):
        """No shipped persona file and no reply built from the corpus contains "SentryPeer"."""
        folder = os.path.join(os.path.dirname(responses.__file__), "personas")
        for name in os.listdir(folder):
            with open(os.path.join(folder, name), encoding="utf-8") as f:
                self.assertNotIn("sentrypeer", f.read().lower(), name)
        for name in SHIPPED:
            persona = shipped_persona(name)
            for _, _, message in corpus_requests():
                if responses.replyable(message):
                    data = build_response(message, 200, persona, context())
                    self.assertFalse(data and re.search(rb"(?i)sentry\s*peer", data))
