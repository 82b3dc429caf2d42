"""Tests for :mod:`sentrypeer.dht.signing`: canonical JSON, Ed25519 signatures, node key files and the
trusted-nodes file (interface.md §6)."""

from __future__ import annotations

import base64
import json
import os
import stat

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from twisted.trial.unittest import SynchronousTestCase

from sentrypeer.dht import signing


def _value() -> dict:
    return {
        "app_name": "sentrypeer",
        "event_uuid": "4e0b1c0a-7f5e-4c1a-9d55-2b8f7e6a1c3d",
        "sip_user_agent": "Zoiper \u00e9\u4e2d",
        "source_port": 5060,
        "destination_port": None,
    }


class CanonicalTests(SynchronousTestCase):
    def test_sorted_compact_utf8(self):
        """Keys sorted, separators ``,`` and ``:`` without spaces, non-ASCII kept as UTF-8, numbers and
        null as JSON writes them (interface.md §6)."""
        self.assertEqual(
            signing.canonical_bytes(_value()),
            '{"app_name":"sentrypeer","destination_port":null,"event_uuid":'
            '"4e0b1c0a-7f5e-4c1a-9d55-2b8f7e6a1c3d","sip_user_agent":"Zoiper \u00e9\u4e2d",'
            '"source_port":5060}'.encode(),
        )

    def test_signature_key_left_out(self):
        """The ``signature`` key is not covered by the signature: the canonical bytes are the same with
        and without it."""
        signed = dict(_value(), signature="x" * 88)
        self.assertEqual(signing.canonical_bytes(signed), signing.canonical_bytes(_value()))

    def test_key_order_irrelevant(self):
        """The bytes do not depend on the order the keys arrived in (C order, Rust alphabetical order)."""
        value = _value()
        reversed_value = dict(reversed(list(value.items())))
        self.assertEqual(signing.canonical_bytes(value), signing.canonical_bytes(reversed_value))

    def test_lone_surrogate_escaped(self):
        """A lone surrogate (possible after parsing a peer's ``\\ud800``) is written as its JSON escape,
        so the bytes are still UTF-8 and round-trip through a parse."""
        value = {"sip_user_agent": "a\ud800b"}
        data = signing.canonical_bytes(value)
        self.assertEqual(data, b'{"sip_user_agent":"a\\ud800b"}')
        self.assertEqual(signing.canonical_bytes(json.loads(data)), data)

    def test_control_characters_escaped(self):
        """Control characters are escaped as JSON requires (``\\n``, ``\\u001b``)."""
        self.assertEqual(signing.canonical_bytes({"k": "a\nb\x1b"}), b'{"k":"a\\nb\\u001b"}')


class SignVerifyTests(SynchronousTestCase):
    def setUp(self):
        self.key = Ed25519PrivateKey.generate()
        self.public = self.key.public_key()

    def test_round_trip(self):
        """A value signed with a key verifies against that key's public half; the signature is standard
        base64 of 64 bytes (88 characters)."""
        value = _value()
        value["signature"] = signing.sign(self.key, value)
        self.assertEqual(len(value["signature"]), signing.SIGNATURE_B64_CHARS)
        self.assertEqual(len(base64.b64decode(value["signature"])), 64)
        self.assertTrue(signing.verify([self.public], value))

    def test_signature_is_ed25519_over_canonical_bytes(self):
        """The signature is a plain Ed25519 signature of :func:`canonical_bytes`, checkable by any
        Ed25519 implementation given the two."""
        value = _value()
        raw = base64.b64decode(signing.sign(self.key, value))
        self.public.verify(raw, signing.canonical_bytes(value))  # raises when wrong

    def test_tampered_value_fails(self):
        """Changing any covered field after signing makes verification fail."""
        value = _value()
        value["signature"] = signing.sign(self.key, value)
        value["source_port"] = 5061
        self.assertFalse(signing.verify([self.public], value))

    def test_other_key_fails(self):
        """A value signed by a key not in the list fails; one of several listed keys is enough."""
        value = _value()
        value["signature"] = signing.sign(self.key, value)
        other = Ed25519PrivateKey.generate().public_key()
        self.assertFalse(signing.verify([other], value))
        self.assertTrue(signing.verify([other, self.public], value))

    def test_malformed_signatures_fail(self):
        """Missing, non-string, URL-safe, unpadded, wrong-length or white-space signatures are refused
        without an exception."""
        value = _value()
        good = signing.sign(self.key, value)
        raw = base64.b64decode(good)
        for bad in (None, 5, "", good[:-2], good + "AAAA", " " + good,
                    base64.urlsafe_b64encode(raw).decode().replace("=", ""),
                    base64.b64encode(raw[:63]).decode(), "!" * 88):
            value["signature"] = bad
            self.assertFalse(signing.verify([self.public], value), bad)
        self.assertFalse(signing.is_signature_text(None))
        self.assertTrue(signing.is_signature_text(good))

    def test_public_key_text(self):
        """A public key is shown as standard base64 of its raw 32 bytes, and parses back."""
        text = signing.public_key_text(self.key)
        self.assertEqual(len(base64.b64decode(text)), 32)
        self.assertEqual(signing.public_key_text(signing.parse_public_key(text)), text)
        self.assertIsNone(signing.parse_public_key("not a key"))
        self.assertIsNone(signing.parse_public_key(base64.b64encode(b"x" * 31).decode()))


class KeyFileTests(SynchronousTestCase):
    def setUp(self):
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        self.db_file = os.path.join(self.directory, "sentrypeer.db")

    def test_created_on_first_use_mode_0600(self):
        """The first use creates the private key next to the database with mode 0600, whatever the
        umask, and a public key file holding the base64 key."""
        old = os.umask(0)
        try:
            key = signing.load_or_create_key(self.db_file)
        finally:
            os.umask(old)
        private_path, public_path = signing.key_paths(self.db_file)
        self.assertEqual(os.path.dirname(private_path), self.directory)
        self.assertEqual(stat.S_IMODE(os.stat(private_path).st_mode), 0o600)
        with open(public_path) as f:
            self.assertEqual(f.read().strip(), signing.public_key_text(key))
        self.assertEqual(sorted(os.listdir(self.directory)),
                         sorted([signing.PRIVATE_KEY_FILE, signing.PUBLIC_KEY_FILE]))

    def test_same_key_after_restart(self):
        """A second load (a restart) returns the same key; the public key file is rewritten when lost."""
        first = signing.show_node_key(self.db_file)
        os.unlink(signing.key_paths(self.db_file)[1])
        self.assertEqual(signing.show_node_key(self.db_file), first)
        self.assertEqual(signing.public_key_text(signing.load_or_create_key(self.db_file)), first)
        with open(signing.key_paths(self.db_file)[1]) as f:
            self.assertEqual(f.read().strip(), first)

    def test_too_open_refused(self):
        """A private key readable by others is refused with a one-line error naming the file and the
        mode, not used."""
        signing.load_or_create_key(self.db_file)
        private_path = signing.key_paths(self.db_file)[0]
        os.chmod(private_path, 0o644)
        e = self.assertRaises(signing.NodeKeyError, signing.load_or_create_key, self.db_file)
        self.assertIn(private_path, str(e))
        self.assertIn("0644", str(e))
        self.assertNotIn("\n", str(e))

    def test_garbage_and_wrong_key_type_refused(self):
        """A file that is not a PEM key, or a PEM key of another type, is a one-line error."""
        private_path = signing.key_paths(self.db_file)[0]
        fd = os.open(private_path, os.O_WRONLY | os.O_CREAT, 0o600)
        os.write(fd, b"garbage\n")
        os.close(fd)
        e = self.assertRaises(signing.NodeKeyError, signing.load_or_create_key, self.db_file)
        self.assertIn("not a usable PEM private key", str(e))
        pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        with open(private_path, "wb") as f:
            f.write(pem)
        e = self.assertRaises(signing.NodeKeyError, signing.load_or_create_key, self.db_file)
        self.assertIn("not an Ed25519 key", str(e))

    def test_cannot_create(self):
        """When the key cannot be created (here its directory does not exist), the error is one line
        naming the key file and the cause."""
        db_file = os.path.join(self.directory, "missing", "sentrypeer.db")
        e = self.assertRaises(signing.NodeKeyError, signing.load_or_create_key, db_file)
        self.assertIn(os.path.join(self.directory, "missing", signing.PRIVATE_KEY_FILE), str(e))
        self.assertIn("No such file or directory", str(e))
        self.assertNotIn("\n", str(e))


class TrustedKeysTests(SynchronousTestCase):
    def write(self, text: str) -> str:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(text)
        return path

    def test_keys_comments_and_repeats(self):
        """One key a line; blank lines, ``#`` lines and text after the key are ignored; a repeated key
        counts once; file order is kept."""
        a = signing.public_key_text(Ed25519PrivateKey.generate())
        b = signing.public_key_text(Ed25519PrivateKey.generate())
        path = self.write(f"# our nodes\n\n{a} node-a.example\n  {b}\n{a}\n")
        keys = signing.load_trusted_keys(path)
        self.assertEqual([signing.public_key_text(k) for k in keys], [a, b])

    def test_bad_line_names_line(self):
        """A line that is not a base64 Ed25519 key is an error naming the file and the line number."""
        a = signing.public_key_text(Ed25519PrivateKey.generate())
        path = self.write(f"{a}\nnot-a-key\n")
        e = self.assertRaises(signing.NodeKeyError, signing.load_trusted_keys, path)
        self.assertIn("line 2", str(e))
        self.assertIn(path, str(e))

    def test_empty_or_missing_file(self):
        """A file with no key (which would refuse every value) or a missing file is an error."""
        e = self.assertRaises(signing.NodeKeyError, signing.load_trusted_keys, self.write("# none\n"))
        self.assertIn("no keys", str(e))
        missing = os.path.abspath(self.mktemp())
        e = self.assertRaises(signing.NodeKeyError, signing.load_trusted_keys, missing)
        self.assertIn(missing, str(e))
