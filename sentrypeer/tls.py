"""TLS for SIP over TLS (``tls:`` listen descriptions): the certificate pair and the context factory.

The original generated a pair into the working directory whatever paths were configured, asked on
stdin, and failed under systemd (reference §10, §14.19). Here the pair is generated at the configured
paths, only when both files are missing, with the key file created mode 0600.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import socket

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import SSL, crypto
from twisted.internet import ssl

_PEM_CERT = re.compile(
    rb"-----BEGIN CERTIFICATE-----\r?\n.+?\r?\n-----END CERTIFICATE-----", re.DOTALL
)

#: Lifetime of a generated self-signed certificate, in days.
SELF_SIGNED_DAYS = 3650


class TLSSetupError(Exception):
    """The certificate or key cannot be used; the message is one line naming the file and cause."""


def _dns_names(hostname: str) -> list[str]:
    names = ["localhost"]
    host = hostname.strip().rstrip(".")
    if host and host != "localhost" and all(
        part and len(part) <= 63 and part.replace("-", "").isalnum() and part.isascii()
        for part in host.split(".")
    ):
        names.append(host)
    return names


def generate_self_signed(cert_path: str, key_path: str, hostname: str | None = None) -> None:
    """Write a new self-signed ECDSA P-256 certificate and key.

    Subject alternative names: ``localhost``, the host name (when it is a valid DNS name) and
    ``127.0.0.1``/``::1``. The key file is created with mode 0600 and never overwritten.

    :param cert_path: where the PEM certificate goes (mode 0644).
    :param key_path: where the PEM PKCS#8 private key goes (mode 0600).
    :param hostname: defaults to :func:`socket.gethostname`.
    :raises TLSSetupError: a file cannot be created (exists, directory missing, permission).
    """
    hostname = socket.gethostname() if hostname is None else hostname
    key = ec.generate_private_key(ec.SECP256R1())
    names = _dns_names(hostname)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[-1])])
    now = datetime.datetime.now(datetime.UTC)
    san = [x509.DNSName(n) for n in names] + [
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1")),
    ]
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=SELF_SIGNED_DAYS))
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _write_new(key_path, key_pem, 0o600)
    _write_new(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)


def _write_new(path: str, data: bytes, mode: int) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except OSError as e:
        raise TLSSetupError(f"cannot create {path}: {e.strerror}") from None
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def ensure_certificate(cert_path: str, key_path: str) -> bool:
    """Make sure a certificate pair exists: generate one when *both* files are missing.

    :returns: ``True`` when a pair was generated.
    :raises TLSSetupError: only one of the two files exists, or generation failed.
    """
    cert_exists, key_exists = os.path.exists(cert_path), os.path.exists(key_path)
    if cert_exists and key_exists:
        return False
    if cert_exists != key_exists:
        present, missing = (cert_path, key_path) if cert_exists else (key_path, cert_path)
        raise TLSSetupError(
            f"TLS file {missing} is missing but {present} exists (remove it to generate a new pair)"
        )
    generate_self_signed(cert_path, key_path)
    return True


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(1024 * 1024)
    except OSError as e:
        raise TLSSetupError(f"cannot read TLS {what} {path}: {e.strerror}") from None


def context_factory(cert_path: str, key_path: str) -> ssl.CertificateOptions:
    """Build the server context from PEM files: the first certificate is the leaf, any further
    certificates in the file are sent as the chain. TLS 1.2 is the minimum version.

    :raises TLSSetupError: unreadable or invalid files, or a key that does not match.
    """
    cert_pem, key_pem = _read(cert_path, "certificate"), _read(key_path, "key")
    try:
        key = crypto.load_privatekey(crypto.FILETYPE_PEM, key_pem)
    except crypto.Error:
        raise TLSSetupError(f"invalid TLS key {key_path}: not a PEM private key") from None
    # One block at a time: load_pem_x509_certificates needs cryptography 39, Debian 12 has 38.
    try:
        certs = [x509.load_pem_x509_certificate(block) for block in _PEM_CERT.findall(cert_pem)]
    except ValueError:
        certs = []
    if not certs:
        raise TLSSetupError(f"invalid TLS certificate {cert_path}: not a PEM certificate")
    leaf, *chain = [crypto.X509.from_cryptography(c) for c in certs]
    options = ssl.CertificateOptions(
        privateKey=key,
        certificate=leaf,
        extraCertChain=chain,
        raiseMinimumTo=ssl.TLSVersion.TLSv1_2,
    )
    try:
        options.getContext()
    except SSL.Error:
        raise TLSSetupError(f"TLS key {key_path} does not match certificate {cert_path}") from None
    return options
