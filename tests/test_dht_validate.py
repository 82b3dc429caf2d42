"""Tests for :mod:`sentrypeer.dht.validate`: values from the original's C and Rust nodes, our own
values, and a table of poisoned values (interface.md §6, reference §9 and §14.22)."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from twisted.trial.unittest import SynchronousTestCase

from sentrypeer.dht import signing, validate
from sentrypeer.eventlog import event_json
from sentrypeer.events import JSON_KEYS, NOT_FOUND, ORIGINAL_KEYS, BadActorEvent
from sentrypeer.storage import queries

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "dht"
OUR_NODE = "5d41402a-bc4b-4a76-b971-9d911017c592"
C_VALUE = (FIXTURES / "c_node_value.json").read_bytes()
RUST_VALUE = (FIXTURES / "rust_node_value.json").read_bytes()


def c_dict() -> dict:
    return json.loads(C_VALUE)


def encode(value: dict) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8", "surrogatepass")


def with_(**changes) -> bytes:
    value = c_dict()
    value.update(changes)
    return encode(value)


def without(key: str) -> bytes:
    value = c_dict()
    del value[key]
    return encode(value)


def our_event(**changes) -> BadActorEvent:
    fields = dict(
        event_timestamp="2026-01-02 03:04:05.000000042",
        event_uuid="0b6b7ef8-5c8a-4b8e-9c8e-1f2a3b4c5d6e",
        created_by_node_id="1c6b7ef8-5c8a-4b8e-9c8e-1f2a3b4c5d6e",
        collected_method="responsive",
        transport_type="TLS",
        source_ip="2001:db8::7",
        destination_ip="2001:db8::1",
        called_number="+441234",
        sip_method="REGISTER",
        sip_user_agent="Zoiper r\u00e9",
        sip_message="REGISTER sip:example.com SIP/2.0\r\n\r\n",
        source_port=5071,
        destination_port=5061,
        parse_status="ok",
        auth_username="100",
        auth_realm="example.com",
        sip_message_bytes=b"REGISTER sip:example.com SIP/2.0\r\n\r\n",
    )
    fields.update(changes)
    return BadActorEvent(**fields)


class OriginalNodeValueTests(SynchronousTestCase):
    def check(self, data: bytes, **kw):
        result = validate.check_value(data, OUR_NODE, **kw)
        self.assertIsInstance(result, validate.Accepted, result)
        return result.event

    def test_c_node_value(self):
        """A value exactly as a C-built original node puts it (13 string keys, C key order, bare
        addresses, 6 fraction digits) is accepted and stored as sent, with the sender's node id;
        ports unknown, no raw bytes (reference §9)."""
        event = self.check(C_VALUE)
        sent = c_dict()
        for key in ORIGINAL_KEYS[2:]:
            self.assertEqual(getattr(event, key), sent[key], key)
        self.assertEqual(event.created_by_node_id, "a3f1c2d4-5b6e-4f70-8a91-b2c3d4e5f607")
        self.assertEqual(event.event_timestamp, "2024-03-05 21:07:44.349557")
        self.assertIsNone(event.source_port)
        self.assertIsNone(event.destination_port)
        self.assertIsNone(event.sip_message_bytes)
        self.assertIsNone(event.signature)
        self.assertEqual(event.parse_status, "ok")
        self.assertEqual((event.auth_username, event.auth_realm), (NOT_FOUND, NOT_FOUND))

    def test_c_node_value_with_terminating_nul(self):
        """The value may carry the C string's terminating NUL: the JSON ends there (the original reads
        the value as a C string)."""
        self.assertEqual(self.check(C_VALUE + b"\0").event_uuid, self.check(C_VALUE).event_uuid)
        self.assertEqual(self.check(C_VALUE + b"\0garbage").event_uuid, c_dict()["event_uuid"])

    def test_rust_node_value(self):
        """A value as a Rust-built original node puts it: ``ip:port`` addresses are split into address
        and port (the listening ``0.0.0.0:5060`` included), 9 fraction digits, U+FFFD kept
        (reference §2.5, interface.md §6)."""
        event = self.check(RUST_VALUE)
        self.assertEqual((event.source_ip, event.source_port), ("203.0.113.9", 40123))
        self.assertEqual((event.destination_ip, event.destination_port), ("0.0.0.0", 5060))
        self.assertEqual(event.event_timestamp, "2024-03-05 21:09:01.123456789")
        self.assertEqual(event.collected_method, "responsive")
        self.assertEqual(event.transport_type, "TCP")
        self.assertEqual(event.sip_user_agent, "sipvicious \ufffd")

    def test_rust_alphabetical_key_order(self):
        """Key order does not matter (the Rust build's JSON log order is alphabetical)."""
        value = json.loads(RUST_VALUE)
        data = encode(dict(sorted(value.items())))
        self.assertEqual(self.check(data).event_uuid, value["event_uuid"])

    def test_zero_byte_packet_value(self):
        """The original's event for a 0-byte packet has empty method, number, user agent and message:
        they become ``NOT_FOUND``."""
        event = self.check(with_(called_number="", sip_method="", sip_user_agent="", sip_message=""))
        self.assertEqual(
            (event.called_number, event.sip_method, event.sip_user_agent, event.sip_message),
            (NOT_FOUND,) * 4,
        )

    def test_fraction_digits_6_to_9(self):
        """Timestamps with 6, 7, 8 and 9 fraction digits are accepted and kept as sent."""
        for fraction in ("123456", "1234567", "12345678", "123456789"):
            stamp = f"2024-03-05 21:07:44.{fraction}"
            self.assertEqual(self.check(with_(event_timestamp=stamp)).event_timestamp, stamp)

    def test_uuid_case_and_nil(self):
        """Upper-case UUIDs are accepted (as ``uuid_parse``) and stored lower-case; the nil UUID is a
        UUID."""
        event = self.check(with_(event_uuid="4E0B1C0A-7F5E-4C1A-9D55-2B8F7E6A1C3D",
                                 created_by_node_id="00000000-0000-0000-0000-000000000000"))
        self.assertEqual(event.event_uuid, "4e0b1c0a-7f5e-4c1a-9d55-2b8f7e6a1c3d")
        self.assertEqual(event.created_by_node_id, "00000000-0000-0000-0000-000000000000")

    def test_extra_unknown_keys_ignored(self):
        """Keys this version does not know (a newer node) are allowed and ignored."""
        self.check(with_(future_key={"nested": [1, 2, 3]}, another=1.5))

    def test_address_normalisation(self):
        """IPv4-mapped IPv6 becomes IPv4, IPv6 is compressed, ``[v6]:port`` is split."""
        event = self.check(with_(source_ip="::ffff:192.0.2.5", destination_ip="[2001:0db8::0001]:5060"))
        self.assertEqual(event.source_ip, "192.0.2.5")
        self.assertEqual((event.destination_ip, event.destination_port), ("2001:db8::1", 5060))

    def test_explicit_port_wins_over_split(self):
        """When a value has both ``ip:port`` and an explicit port key, the key is used."""
        event = self.check(with_(source_ip="192.0.2.5:1111", source_port=2222))
        self.assertEqual((event.source_ip, event.source_port), ("192.0.2.5", 2222))


class OurValueTests(SynchronousTestCase):
    def test_round_trip(self):
        """An event we encode comes back equal from another node's check (all added keys included),
        except the raw bytes, which are never shared."""
        event = our_event()
        data = validate.encode_value(event)
        self.assertEqual(data, event_json(event))
        result = validate.check_value(data, OUR_NODE)
        self.assertIsInstance(result, validate.Accepted)
        self.assertEqual(result.event, our_event(sip_message_bytes=None))

    def test_keys_in_interface_order(self):
        """The value's keys are interface.md §3's, in that order; with signing, ``signature`` last."""
        key = Ed25519PrivateKey.generate()
        self.assertEqual(list(json.loads(validate.encode_value(our_event()))), list(JSON_KEYS))
        signed = json.loads(validate.encode_value(our_event(), key))
        self.assertEqual(list(signed), [*JSON_KEYS, "signature"])
        self.assertTrue(signing.verify([key.public_key()], signed))

    def test_original_node_can_read_signed_value(self):
        """A signed value still has the original's 13 keys, all strings, which is all an original node
        checks (reference §9 step 7): signed values stay readable by them."""
        value = json.loads(validate.encode_value(our_event(), Ed25519PrivateKey.generate()))
        for key in ORIGINAL_KEYS:
            self.assertIsInstance(value[key], str, key)

    def test_large_message_cut_to_cap(self):
        """An event whose value would exceed 60 KiB has ``sip_message`` cut and ``parse_status``
        ``truncated`` in the value, which is at most 60 KiB; the event itself is unchanged."""
        event = our_event(sip_message="A" * 100_000)
        data = validate.encode_value(event)
        self.assertLessEqual(len(data), validate.PUT_VALUE_CAP)
        self.assertGreater(len(data), validate.PUT_VALUE_CAP - 16)
        value = json.loads(data)
        self.assertEqual(value["parse_status"], "truncated")
        self.assertTrue(event.sip_message.startswith(value["sip_message"]))
        self.assertEqual(event.parse_status, "ok")

    def test_cut_with_escapes_and_signature(self):
        """Characters that JSON escapes (6 bytes each) and multi-byte UTF-8 are cut correctly too, and
        a signed value still fits and verifies after the cut."""
        key = Ed25519PrivateKey.generate()
        event = our_event(sip_message="\x01\u4e2d" * 30_000)
        data = validate.encode_value(event, key)
        self.assertLessEqual(len(data), validate.PUT_VALUE_CAP)
        value = json.loads(data)
        self.assertEqual(value["parse_status"], "truncated")
        self.assertTrue(signing.verify([key.public_key()], value))
        result = validate.check_value(data, OUR_NODE, [key.public_key()])
        self.assertIsInstance(result, validate.Accepted)

    def test_own_value_refused(self):
        """Our own values come back through the listen: refused as :data:`OWN_NODE_ID`, with the
        event id so the service can tell our echo from a forgery."""
        event = our_event(created_by_node_id=OUR_NODE)
        result = validate.check_value(validate.encode_value(event), OUR_NODE)
        self.assertEqual(result, validate.Rejected(validate.OWN_NODE_ID, OUR_NODE, event.event_uuid))


#: (name, value bytes, expected reason, detail fragment or None)
def _poisoned():
    big = with_(sip_message="A" * 1_000_000)
    rows = [
        ("not JSON", b"{not json", validate.BAD_JSON),
        ("empty", b"", validate.BAD_JSON),
        ("only NUL", b"\0" + C_VALUE, validate.BAD_JSON),
        ("not UTF-8", C_VALUE.replace(b"friendly-scanner", b"friendly\xff"), validate.BAD_JSON),
        ("JSON array", b"[" + C_VALUE + b"]", validate.NOT_OBJECT),
        ("JSON string", b'"sentrypeer"', validate.NOT_OBJECT),
        ("JSON number", b"42", validate.NOT_OBJECT),
        ("JSON null", b"null", validate.NOT_OBJECT),
        ("repeated key", C_VALUE[:-1] + b',"source_ip":"1.1.1.1"}', validate.BAD_JSON),
        ("NaN", with_(x=0)[:-1].replace(b'"x":0', b'"x":NaN') + b"}", validate.BAD_JSON),
        ("deep nesting", with_(x=0).replace(b'"x":0', b'"x":' + b"[" * 5000 + b"]" * 5000),
         validate.BAD_JSON),
        ("1 MB sip_message", big, validate.TOO_LARGE),
        ("just over 64 KiB", with_(sip_message="A" * 65_536), validate.TOO_LARGE),
        ("forged node id equal to ours", with_(created_by_node_id=OUR_NODE), validate.OWN_NODE_ID),
        ("our node id upper-case", with_(created_by_node_id=OUR_NODE.upper()), validate.OWN_NODE_ID),
        ("node id not a UUID", with_(created_by_node_id="' OR 1=1 --"), validate.BAD_NODE_ID),
        ("node id in braces", with_(created_by_node_id="{a3f1c2d4-5b6e-4f70-8a91-b2c3d4e5f607}"),
         validate.BAD_NODE_ID),
        ("event uuid without hyphens", with_(event_uuid="4e0b1c0a7f5e4c1a9d552b8f7e6a1c3d"),
         validate.BAD_EVENT_UUID),
        ("event uuid urn", with_(event_uuid="urn:uuid:4e0b1c0a-7f5e-4c1a-9d55-2b8f7e6a1c3d"),
         validate.BAD_EVENT_UUID),
        ("event uuid trailing newline", with_(event_uuid="4e0b1c0a-7f5e-4c1a-9d55-2b8f7e6a1c3d\n"),
         validate.BAD_EVENT_UUID),
        ("event uuid non-ASCII digits", with_(event_uuid="\u0664e0b1c0a-7f5e-4c1a-9d55-2b8f7e6a1c3"),
         validate.BAD_EVENT_UUID),
        ("event uuid SQL", with_(event_uuid="x'); DROP TABLE honey; --"), validate.BAD_EVENT_UUID),
        ("timestamp 5 digits", with_(event_timestamp="2024-03-05 21:07:44.12345"), validate.BAD_TIMESTAMP),
        ("timestamp 10 digits", with_(event_timestamp="2024-03-05 21:07:44.1234567890"),
         validate.BAD_TIMESTAMP),
        ("timestamp month 13", with_(event_timestamp="2024-13-05 21:07:44.123456"), validate.BAD_TIMESTAMP),
        ("timestamp ISO T", with_(event_timestamp="2024-03-05T21:07:44.123456"), validate.BAD_TIMESTAMP),
        ("timestamp HTML", with_(event_timestamp="<script>alert(1)</script>"), validate.BAD_TIMESTAMP),
        ("source_ip name", with_(source_ip="evil.example.com"), validate.BAD_ADDRESS),
        ("source_ip 999", with_(source_ip="999.1.1.1"), validate.BAD_ADDRESS),
        ("source_ip empty", with_(source_ip=""), validate.BAD_ADDRESS),
        ("source_ip trailing space", with_(source_ip="192.0.2.1 "), validate.BAD_ADDRESS),
        ("source_ip zone", with_(source_ip="fe80::1%eth0"), validate.BAD_ADDRESS),
        ("source_ip port too big", with_(source_ip="192.0.2.1:99999"), validate.BAD_ADDRESS),
        ("source_ip leading zeros", with_(source_ip="192.000.002.001"), validate.BAD_ADDRESS),
        ("source_ip syslog injection", with_(source_ip="1.2.3.4, Method: x\nSource IP: 5.6.7.8"),
         validate.BAD_ADDRESS),
        ("destination_ip SQL", with_(destination_ip="1.1.1.1' --"), validate.BAD_ADDRESS),
        ("transport SCTP", with_(transport_type="SCTP"), validate.BAD_FIELD),
        ("collected_method peer", with_(collected_method="peer"), validate.BAD_FIELD),
        ("sip_method SQL", with_(sip_method="INVITE'; DROP TABLE honey; --"), validate.BAD_FIELD),
        ("sip_method too long", with_(sip_method="A" * 300), validate.TOO_LONG),
        ("called_number too long", with_(called_number="1" * 9000), validate.TOO_LONG),
        ("user agent too long", with_(sip_user_agent="U" * 9000), validate.TOO_LONG),
        ("source_port string", with_(source_port="5060"), validate.WRONG_TYPE),
        ("source_port bool", with_(source_port=True), validate.WRONG_TYPE),
        ("source_port float", with_(source_port=5060.0), validate.WRONG_TYPE),
        ("destination_port out of range", with_(destination_port=70000), validate.BAD_FIELD),
        ("parse_status unknown", with_(parse_status="evil"), validate.BAD_FIELD),
        ("parse_status number", with_(parse_status=1), validate.WRONG_TYPE),
        ("auth_username object", with_(auth_username={"a": 1}), validate.WRONG_TYPE),
        ("signature malformed", with_(signature="not base64!"), validate.BAD_SIGNATURE),
        ("signature number", with_(signature=12), validate.BAD_SIGNATURE),
    ]
    for key in ORIGINAL_KEYS:
        rows.append((f"missing {key}", without(key), validate.MISSING_KEY))
        for bad in (1, None, ["x"], {"x": 1}, True):
            rows.append((f"{key} as {type(bad).__name__}", with_(**{key: bad}), validate.WRONG_TYPE))
    return rows


POISONED = _poisoned()


class PoisonedValueTests(SynchronousTestCase):
    def test_table(self):
        """Every poisoned value of the table is refused with its reason, and never raises: bad JSON,
        non-objects, missing keys, wrong types, forged own node id, oversized values, bad UUIDs,
        timestamps, addresses and fields, malformed signatures (interface.md §6)."""
        self.assertGreater(len(POISONED), 100)
        for name, data, reason in POISONED:
            result = validate.check_value(data, OUR_NODE)
            self.assertIsInstance(result, validate.Rejected, name)
            self.assertEqual(result.reason, reason, name)
            self.assertIn(result.reason, validate.REASONS, name)

    def test_missing_key_names_key(self):
        """The detail of a missing or wrongly typed key names it (for the log)."""
        self.assertEqual(validate.check_value(without("sip_message"), OUR_NODE).detail, "sip_message")
        self.assertEqual(validate.check_value(with_(source_ip=3), OUR_NODE).detail, "source_ip")

    def test_injection_strings_stored_inert(self):
        """SQL, HTML and JSON injection text in free-text fields is accepted as data and stored
        verbatim through the parameterised insert: the table survives and the text reads back
        byte for byte."""
        sql = "x'); DROP TABLE honey; --"
        html = "<script>alert(document.cookie)</script>"
        json_text = '","source_ip":"6.6.6.6","x":"'
        data = with_(sip_user_agent=sql, called_number=html, sip_message=json_text + "\u202e\x00\x1b[31m",
                     auth_username='"; rm -rf / #', auth_realm="{{7*7}}")
        result = validate.check_value(data, OUR_NODE)
        self.assertIsInstance(result, validate.Accepted)
        conn = sqlite3.connect(":memory:")
        self.addCleanup(conn.close)
        queries.migrate(conn)
        with conn:
            self.assertEqual(queries.insert_events(conn.cursor(), [result.event]), 1)
        stored = queries.fetch_event(conn.cursor(), result.event.event_uuid)
        self.assertEqual(stored.sip_user_agent, sql)
        self.assertEqual(stored.called_number, html)
        self.assertEqual(stored.sip_message, json_text + "\u202e\x00\x1b[31m")
        self.assertEqual(stored.source_ip, "203.0.113.7")
        self.assertEqual(stored.auth_username, '"; rm -rf / #')
        self.assertEqual(queries.count_events(conn.cursor()), 1)
        # The JSON written for the log and webhook keeps the injection inside its string.
        self.assertEqual(json.loads(event_json(result.event))["source_ip"], "203.0.113.7")

    def test_lone_surrogate_escape_accepted(self):
        """A JSON ``\\ud800`` escape (a lone surrogate once parsed) is accepted, and the event can be
        stored and logged."""
        data = C_VALUE.replace(b"friendly-scanner", b"friendly\\ud800")
        result = validate.check_value(data, OUR_NODE)
        self.assertIsInstance(result, validate.Accepted)
        self.assertIn(b"\\ud800", event_json(result.event))

    def test_value_of_exactly_64_kib_accepted(self):
        """OpenDHT's own limit is 64 KiB: a value just under it is accepted."""
        base = len(with_(sip_message=""))
        data = with_(sip_message="A" * (validate.MAX_VALUE_BYTES - base))
        self.assertEqual(len(data), validate.MAX_VALUE_BYTES)
        self.assertIsInstance(validate.check_value(data, OUR_NODE), validate.Accepted)

    def test_non_bytes_never_raise(self):
        """Random binary garbage is refused, not raised."""
        import random

        rng = random.Random(4)
        for _ in range(200):
            data = bytes(rng.randrange(256) for _ in range(rng.randrange(64)))
            self.assertIsInstance(validate.check_value(data, OUR_NODE), validate.Rejected)


class TrustedModeTests(SynchronousTestCase):
    def setUp(self):
        self.listed = Ed25519PrivateKey.generate()
        self.unlisted = Ed25519PrivateKey.generate()
        self.trusted = [self.listed.public_key()]

    def signed(self, key, **changes) -> bytes:
        value = c_dict()
        value.update(changes)
        value["signature"] = signing.sign(key, value)
        return encode(value)

    def test_listed_key_accepted(self):
        """In trusted mode a value signed by a listed key is accepted and keeps its signature."""
        result = validate.check_value(self.signed(self.listed), OUR_NODE, self.trusted)
        self.assertIsInstance(result, validate.Accepted)
        self.assertTrue(signing.is_signature_text(result.event.signature))

    def test_unsigned_refused(self):
        """In trusted mode an unsigned value (every original node's) is refused as :data:`UNSIGNED`."""
        self.assertEqual(validate.check_value(C_VALUE, OUR_NODE, self.trusted).reason, validate.UNSIGNED)

    def test_unlisted_key_refused(self):
        """A value signed by a key that is not listed is refused as :data:`UNTRUSTED_SIGNATURE`."""
        result = validate.check_value(self.signed(self.unlisted), OUR_NODE, self.trusted)
        self.assertEqual(result.reason, validate.UNTRUSTED_SIGNATURE)

    def test_tampered_value_refused(self):
        """A value signed by a listed key, then changed (say the source address), is refused."""
        value = json.loads(self.signed(self.listed))
        value["source_ip"] = "192.0.2.99"
        result = validate.check_value(encode(value), OUR_NODE, self.trusted)
        self.assertEqual(result.reason, validate.UNTRUSTED_SIGNATURE)

    def test_bad_signature_refused(self):
        """A signature that is well-formed but wrong (64 zero bytes) is refused in trusted mode; in
        public mode it is accepted (it cannot be checked without keys) and kept."""
        data = with_(signature="A" * 86 + "==")
        self.assertEqual(validate.check_value(data, OUR_NODE, self.trusted).reason,
                         validate.UNTRUSTED_SIGNATURE)
        self.assertIsInstance(validate.check_value(data, OUR_NODE), validate.Accepted)
