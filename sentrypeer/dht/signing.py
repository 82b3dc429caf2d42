"""Ed25519 node keys and value signatures for private sharing (interface.md §6).

``--dht-sign`` adds a ``signature`` key to every value this node puts: an Ed25519 signature by the
node's key over the canonical JSON of all the other keys (:func:`canonical_bytes`), written as
standard base64 of the 64 signature bytes. ``--dht-trusted-nodes FILE`` accepts only values whose
signature verifies against one of the public keys listed in FILE (standard base64 of the raw 32 key
bytes, one a line). The original's nodes ignore the extra key, so signed values stay readable by them.

The key pair lives next to the database (:func:`key_paths`), is created on first use and survives
restarts; the private key file is PKCS#8 PEM with mode 0600, the public key file holds the base64 line
that ``sentrypeer --show-node-key`` prints and other operators put in their trusted-nodes file.

The signing and verifying functions are pure; only :func:`load_or_create_key`,
:func:`show_node_key` and :func:`load_trusted_keys` touch files (synchronously: call them at start-up,
before the reactor runs).
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import stat
from collections.abc import Iterable, Mapping
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

#: The key of the signature in a value (interface.md §3, §6).
SIGNATURE_KEY = "signature"
#: File names of the key pair, in the database's directory.
PRIVATE_KEY_FILE = "sentrypeer_node_ed25519.key"
PUBLIC_KEY_FILE = "sentrypeer_node_ed25519.pub"
#: Length of an Ed25519 signature and public key, in bytes.
SIGNATURE_BYTES = 64
PUBLIC_KEY_BYTES = 32
#: Length of the base64 text of a signature (64 bytes -> 88 characters with padding).
SIGNATURE_B64_CHARS = 88
#: Most lines read from a trusted-nodes file (a bound on start-up work).
MAX_TRUSTED_KEYS = 10_000

_SURROGATE = re.compile("[\ud800-\udfff]")
_B64 = re.compile(r"[A-Za-z0-9+/]+={0,2}")


class NodeKeyError(Exception):
    """A key file cannot be used; the message is one line naming the file and the cause."""


def _escape_surrogate(match: re.Match) -> str:
    return "\\u%04x" % ord(match.group())


def canonical_bytes(value: Mapping[str, Any]) -> bytes:
    """The bytes a signature covers: every key of *value* except ``signature``, as JSON with the
    keys sorted, separators ``,`` and ``:``, non-ASCII characters not escaped, UTF-8
    (interface.md §6).

    Strings are escaped as Python's :func:`json.dumps` does (``\\"``, ``\\\\``, ``\\n``,
    ``\\u001b`` for other control characters); a lone surrogate, which UTF-8 cannot encode, is
    written as its ``\\udXXX`` escape (lower-case hex), the form :func:`sentrypeer.eventlog.event_json`
    puts on the wire, so a receiver that parsed the value gets back the same bytes.

    :param value: a JSON object as a mapping of ``str`` keys to JSON values.
    :returns: UTF-8 bytes.
    :raises TypeError: a value that JSON cannot represent.
    :raises ValueError: a float that is NaN or infinite.
    """
    body = {key: item for key, item in value.items() if key != SIGNATURE_KEY}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return _SURROGATE.sub(_escape_surrogate, text).encode("utf-8")


def sign(private_key: Ed25519PrivateKey, value: Mapping[str, Any]) -> str:
    """The ``signature`` text for *value*: standard base64 of the Ed25519 signature of
    :func:`canonical_bytes` (any ``signature`` already in *value* is not covered)."""
    return base64.b64encode(private_key.sign(canonical_bytes(value))).decode("ascii")


def decode_b64(text: str, size: int) -> bytes | None:
    """Strictly decode standard base64 *text* of exactly *size* bytes, or return ``None``.

    Padding is required, no white space or URL-safe alphabet is accepted.
    """
    if not isinstance(text, str) or len(text) > 4 * ((size + 2) // 3) or not _B64.fullmatch(text):
        return None
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw if len(raw) == size else None


def is_signature_text(text: Any) -> bool:
    """Whether *text* has the form of a signature (base64 of 64 bytes); nothing is verified."""
    return isinstance(text, str) and decode_b64(text, SIGNATURE_BYTES) is not None


def verify(public_keys: Iterable[Ed25519PublicKey], value: Mapping[str, Any]) -> bool:
    """Whether ``value["signature"]`` is a valid signature of *value* by one of *public_keys*.

    :param public_keys: the trusted keys (:func:`load_trusted_keys`).
    :param value: the received JSON object; its ``signature`` must be base64 of 64 bytes.
    :returns: ``False`` when the signature is missing, malformed, or made by no listed key, or when
        *value* cannot be canonicalised; never raises.
    """
    raw = decode_b64(value.get(SIGNATURE_KEY), SIGNATURE_BYTES)
    if raw is None:
        return False
    try:
        message = canonical_bytes(value)
    except (TypeError, ValueError):
        return False
    for key in public_keys:
        try:
            key.verify(raw, message)
            return True
        except InvalidSignature:
            continue
    return False


def public_key_text(key: Ed25519PublicKey | Ed25519PrivateKey) -> str:
    """Standard base64 of the raw 32 bytes of the public key (of a private key: its public half)."""
    if isinstance(key, Ed25519PrivateKey):
        key = key.public_key()
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode("ascii")


def parse_public_key(text: str) -> Ed25519PublicKey | None:
    """An Ed25519 public key from its base64 text, or ``None`` when *text* is not one."""
    raw = decode_b64(text.strip(), PUBLIC_KEY_BYTES)
    if raw is None:
        return None
    try:
        return Ed25519PublicKey.from_public_bytes(raw)
    except ValueError:
        return None


def key_paths(db_file: str) -> tuple[str, str]:
    """``(private key path, public key path)`` in the directory of the database *db_file*."""
    directory = os.path.dirname(os.path.abspath(db_file))
    return os.path.join(directory, PRIVATE_KEY_FILE), os.path.join(directory, PUBLIC_KEY_FILE)


def _write_new(path: str, data: bytes, mode: int) -> None:
    """Write *data* to a new file *path* with *mode* (whatever the umask), atomically: a
    temporary file in the same directory, then a hard link, so two processes starting at once
    cannot both create a key; :class:`FileExistsError` when *path* already exists."""
    tmp = f"{path}.tmp{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)
    finally:
        os.unlink(tmp)


def _describe(error: OSError) -> str:
    return error.strerror or str(error)


def load_or_create_key(db_file: str) -> Ed25519PrivateKey:
    """This node's signing key, created on first use next to the database *db_file*.

    A new key is written with mode 0600 (the public key file with 0644). An existing private key
    file must not be readable or writable by group or others (like ssh, a key others may have read
    is refused, not silently used). The public key file is rewritten when it is missing or does not
    match the private key.

    :param db_file: the ``--db-file`` path; its directory must exist.
    :returns: the private key.
    :raises NodeKeyError: one line naming the file and the cause (unreadable, not an Ed25519 PEM
        key, too open, directory not writable).
    """
    private_path, public_path = key_paths(db_file)
    key: Ed25519PrivateKey | None = None
    try:
        st = os.stat(private_path)
    except FileNotFoundError:
        st = None
    except OSError as e:
        raise NodeKeyError(f"node key {private_path}: {_describe(e)}") from None
    if st is None:
        candidate = Ed25519PrivateKey.generate()
        pem = candidate.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        try:
            _write_new(private_path, pem, 0o600)
            key = candidate
        except FileExistsError:
            pass  # created meanwhile by another process: read theirs below
        except OSError as e:
            raise NodeKeyError(f"cannot create node key {private_path}: {_describe(e)}") from None
    if key is None:
        key = _read_private_key(private_path)
    _ensure_public_file(public_path, public_key_text(key))
    return key


def _read_private_key(path: str) -> Ed25519PrivateKey:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError as e:
        raise NodeKeyError(f"node key {path}: {_describe(e)}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NodeKeyError(f"node key {path}: not a regular file")
        if st.st_mode & 0o077:
            raise NodeKeyError(
                f"node key {path}: permissions {stat.S_IMODE(st.st_mode):04o} are too open"
                " (others may have read it); chmod 600 it or remove it to create a new key"
            )
        data = os.read(fd, 64 * 1024)
    except OSError as e:
        raise NodeKeyError(f"node key {path}: {_describe(e)}") from None
    finally:
        os.close(fd)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise NodeKeyError(f"node key {path}: not a usable PEM private key ({e})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise NodeKeyError(f"node key {path}: not an Ed25519 key")
    return key


def _ensure_public_file(path: str, text: str) -> None:
    try:
        with open(path, encoding="ascii") as f:
            if f.read(200).strip() == text:
                return
    except (OSError, UnicodeDecodeError):
        pass
    data = (text + "\n").encode("ascii")
    try:
        tmp = f"{path}.tmp{os.getpid()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as e:
        raise NodeKeyError(f"cannot write node public key {path}: {_describe(e)}") from None


def show_node_key(db_file: str) -> str:
    """The text ``sentrypeer --show-node-key`` prints: this node's public key, base64.

    Creates the key pair when there is none yet, so an operator can hand the key to other nodes
    before the first start with ``--dht-sign``.

    :raises NodeKeyError: see :func:`load_or_create_key`.
    """
    return public_key_text(load_or_create_key(db_file))


def load_trusted_keys(path: str) -> list[Ed25519PublicKey]:
    """Read a ``--dht-trusted-nodes`` file: one base64 Ed25519 public key per line.

    Blank lines and lines starting with ``#`` are skipped; text after the key, separated by white
    space, is a comment (``KEY node-a.example``).

    :returns: the keys, in file order, without repeats.
    :raises NodeKeyError: one line naming the file: unreadable, a line that is not a key (with its
        number), more than :data:`MAX_TRUSTED_KEYS` keys, or no key at all (which would refuse
        every value).
    """
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = f.read(4 * 1024 * 1024).splitlines()
    except OSError as e:
        raise NodeKeyError(f"trusted nodes file {path}: {_describe(e)}") from None
    keys: list[Ed25519PublicKey] = []
    seen: set[str] = set()
    for number, line in enumerate(lines, 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        word = text.split()[0]
        key = parse_public_key(word)
        if key is None:
            raise NodeKeyError(
                f"trusted nodes file {path}, line {number}: not a base64 Ed25519 public key"
            )
        if word not in seen:
            seen.add(word)
            keys.append(key)
            if len(keys) > MAX_TRUSTED_KEYS:
                raise NodeKeyError(f"trusted nodes file {path}: more than {MAX_TRUSTED_KEYS} keys")
    if not keys:
        raise NodeKeyError(f"trusted nodes file {path}: no keys (every value would be refused)")
    return keys
