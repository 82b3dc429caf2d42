"""The SSH manhole (``--manhole``): a Python prompt inside the running daemon, for live debugging.

An operator who sees something odd in production opens the manhole instead of restarting the
daemon with debug flags::

    ssh -p 2222 admin@127.0.0.1
    >>> sip.stats.total("received")

It is a ``twisted.conch`` SSH server whose sessions run :class:`twisted.conch.manhole.ColoredManhole`
over a namespace of live objects (the service tree, the SIP controller and its counters, the
database, the DHT service).  ``manhole_tap.makeService`` only knows passwd files and telnet, so the
pieces are put together here:

* **public-key login only**: the keys are those of an ``authorized_keys`` file (``--manhole-keys``),
  read again at every login so that adding or removing a key needs no restart.  The user name is not
  checked: every listed key may log in under any name.  Lines with ``authorized_keys`` options
  (``from=``, ``command=``...) are ignored with a warning, because the manhole could not honour the
  restriction they express.  The manhole refuses to start without a keys file, with an unreadable or
  group/world-writable one (as OpenSSH's ``StrictModes`` does), or with one that has no usable key;
* **a host key generated once** (RSA, PEM, mode 0600) into the state directory, next to the
  database, and reused at every start so that clients' ``known_hosts`` entries stay valid;
* **loopback by default**: a ``tcp:PORT`` description without ``interface=`` listens on 127.0.0.1
  (``tcp6:`` on ::1); another interface is used only when the operator names it (and a warning is
  logged).  Never telnet.

Nothing here runs at import time and ``twisted.conch`` is imported only when a manhole is built:
on Debian 12 it needs ``python3-pyasn1``, and a missing module becomes a one-line
:class:`ManholeError` instead of an ``ImportError`` for everyone.
"""

from __future__ import annotations

import ipaddress
import os
import re
import stat
import warnings
from collections.abc import Callable, Iterable

from twisted.application.internet import StreamServerEndpointService
from twisted.logger import Logger

log = Logger(namespace="sentrypeer.manhole")

#: File name of the host key in the state directory.
HOST_KEY_NAME = "manhole_host_key"
#: Size in bits of a generated RSA host key (tests pass a small one: 4096 bits takes a while).
DEFAULT_HOST_KEY_SIZE = 4096
#: The package's default keys file (documented in ``/etc/default/sentrypeer``).
PACKAGE_KEYS_FILE = "/etc/sentrypeer/manhole_authorized_keys"

# An authorized_keys line starts with the key type unless it starts with options.
_KEY_TYPE = re.compile(rb"^(ssh-|ecdsa-sha2-|sk-ssh-|sk-ecdsa-sha2-)[A-Za-z0-9@.-]+$")
# A ":" that is not escaped with a backslash separates the fields of an endpoint description.
_FIELD_SEPARATOR = re.compile(r"(?<!\\):")


class ManholeError(Exception):
    """The manhole cannot be set up; the message is one line naming the file or setting and the
    cause, meant to become a start-up failure."""


# -- endpoint description ----------------------------------------------------------------------


def loopback_description(description: str) -> str:
    """Return ``description`` listening on loopback unless it names an interface.

    ``tcp:2222`` becomes ``tcp:2222:interface=127.0.0.1``, ``tcp6:2222`` becomes
    ``tcp6:2222:interface=\\:\\:1`` and a bare port ``2222`` is taken as ``tcp:2222``.  A description
    that names an interface, or of another endpoint type (``unix:``, ``systemd:``...), is kept as is.

    :raises ManholeError: when the description is empty.
    """
    text = description.strip()
    if not text:
        raise ManholeError("--manhole: the endpoint description is empty")
    fields = _FIELD_SEPARATOR.split(text)
    if fields[0].isdigit():
        fields = ["tcp", *fields]
    kind = fields[0].lower()
    if kind in ("tcp", "tcp6", "ssl") and not any(f.startswith("interface=") for f in fields[1:]):
        fields.append("interface=\\:\\:1" if kind == "tcp6" else "interface=127.0.0.1")
    return ":".join(fields)


def named_interface(description: str) -> str | None:
    """Return the ``interface=`` value of an endpoint description (unescaped), or ``None``."""
    for field in _FIELD_SEPARATOR.split(description)[1:]:
        if field.startswith("interface="):
            return field[len("interface="):].replace("\\:", ":")
    return None


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and the loopback addresses (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


# -- authorized keys ---------------------------------------------------------------------------


def _conch():
    """Import the ``twisted.conch`` modules the manhole needs.

    :raises ManholeError: naming the missing module (Debian 12's conch needs python3-pyasn1).
    """
    try:
        with warnings.catch_warnings():
            # Conch < 23 names ciphers (Blowfish, CAST5) that cryptography >= 37 deprecates: noise
            # in the daemon's log about algorithms a modern client never negotiates.
            warnings.filterwarnings("ignore", r".*(Blowfish|CAST5)", category=Warning)
            from twisted.conch import checkers, manhole, manhole_ssh
            from twisted.conch.insults import insults
            from twisted.conch.ssh import keys
    except ImportError as e:
        raise ManholeError(
            f"--manhole needs twisted.conch, which cannot be imported ({e}); install "
            "twisted[conch] (Debian: python3-pyasn1 and python3-bcrypt)"
        ) from None
    return checkers, manhole, manhole_ssh, insults, keys


def check_keys_file(path: str) -> None:
    """Check that ``path`` is a regular file that only its owner can write.

    :raises ManholeError: when it is missing, not a regular file, or group/world-writable.
    """
    try:
        info = os.stat(path)
    except OSError as e:
        raise ManholeError(f"--manhole-keys {path}: {e.strerror or e}") from None
    if not stat.S_ISREG(info.st_mode):
        raise ManholeError(f"--manhole-keys {path}: not a regular file")
    if info.st_mode & 0o022:
        raise ManholeError(
            f"--manhole-keys {path}: writable by group or others (mode {stat.S_IMODE(info.st_mode):04o});"
            " anyone who can write it can run code in the daemon: chmod go-w it"
        )


def parse_authorized_keys(lines: Iterable[bytes], parse_key: Callable, source: str = "") -> list:
    """Return the public keys of ``authorized_keys`` lines, skipping (with a warning) lines that
    have options or that are not keys.

    :param lines: the lines of the file, as bytes.
    :param parse_key: ``twisted.conch.ssh.keys.Key.fromString``.
    :param source: the file name, for warnings.
    :returns: a list of :class:`twisted.conch.ssh.keys.Key`.
    """
    found = []
    for number, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line or line.startswith(b"#"):
            continue
        fields = line.split()
        if not _KEY_TYPE.match(fields[0]):
            log.warn(
                "{source} line {number}: authorized_keys options are not supported by the manhole;"
                " line ignored",
                source=source, number=number,
            )
            continue
        try:
            key = parse_key(b" ".join(fields[:2]))
        except Exception as e:  # BadKeyError, binascii.Error, ValueError...: one bad line only
            log.warn("{source} line {number}: not a public key ({error}); line ignored",
                     source=source, number=number, error=str(e) or type(e).__name__)
            continue
        if not key.isPublic():
            log.warn("{source} line {number}: not a public key; line ignored",
                     source=source, number=number)
            continue
        found.append(key)
    return found


def read_authorized_keys(path: str, parse_key: Callable) -> list:
    """Check and read the keys file.

    :raises ManholeError: when the file is unusable (see :func:`check_keys_file`) or unreadable.
    """
    check_keys_file(path)
    try:
        with open(path, "rb") as f:
            return parse_authorized_keys(f, parse_key, path)
    except OSError as e:
        raise ManholeError(f"--manhole-keys {path}: {e.strerror or e}") from None


class AuthorizedKeysFile:
    """The keys allowed to log in: an ``authorized_keys`` file, read again at every login.

    Provides ``twisted.conch.checkers.IAuthorizedKeysDB`` (declared by :func:`build_portal`, so that
    importing this module does not import conch).  The user name is ignored.  A file that has become
    unusable gives no keys (and a logged warning) rather than an error to the client.

    :param path: the file.
    :param parse_key: ``twisted.conch.ssh.keys.Key.fromString``.
    """

    def __init__(self, path: str, parse_key: Callable) -> None:
        self.path = path
        self._parse_key = parse_key

    def getAuthorizedKeys(self, username):
        """Return the keys of the file as it is now (any user name)."""
        try:
            return read_authorized_keys(self.path, self._parse_key)
        except ManholeError as e:
            log.warn("manhole login refused: {error}", error=str(e))
            return []


# -- host key ----------------------------------------------------------------------------------


def _write_new_file(path: str, data: bytes, mode: int) -> bool:
    """Create ``path`` with ``data`` and ``mode``, never as a partial file.

    :returns: ``False`` when ``path`` exists already (left as it is).
    """
    temporary = f"{path}.{os.getpid()}.tmp"
    try:
        os.unlink(temporary)  # left by a crash of a process that had our pid
    except FileNotFoundError:
        pass
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.link(temporary, path)
    except FileExistsError:
        return False
    finally:
        os.unlink(temporary)
    return True


def ensure_host_key(state_dir: str, key_size: int = DEFAULT_HOST_KEY_SIZE, keys_module=None):
    """Load the manhole's host key from ``state_dir``, generating it the first time.

    A new key is RSA of ``key_size`` bits, written as PEM with mode 0600; an existing key is used
    as it is (a warning is logged when others may read it).

    :returns: the private :class:`twisted.conch.ssh.keys.Key`.
    :raises ManholeError: when the key cannot be created or read.
    """
    if keys_module is None:
        keys_module = _conch()[4]
    path = os.path.join(state_dir, HOST_KEY_NAME)
    if not os.path.lexists(path):
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import rsa

        private = rsa.generate_private_key(public_exponent=65537, key_size=key_size)
        pem = private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
        try:
            created = _write_new_file(path, pem, 0o600)
        except OSError as e:
            raise ManholeError(f"manhole host key {path}: cannot create it: {e.strerror or e}") from None
        if created:  # else another process made it first: theirs is used
            log.info("generated the manhole host key {path}", path=path)
    try:
        with open(path, "rb") as f:
            data = f.read()
            mode = stat.S_IMODE(os.fstat(f.fileno()).st_mode)
    except OSError as e:
        raise ManholeError(f"manhole host key {path}: {e.strerror or e}") from None
    try:
        key = keys_module.Key.fromString(data)
    except Exception as e:
        raise ManholeError(f"manhole host key {path}: not a usable private key ({e})") from None
    if key.isPublic():
        raise ManholeError(f"manhole host key {path}: a public key, not a private key")
    if mode & 0o077:
        log.warn("manhole host key {path} may be read by others (mode {mode:04o}); chmod 600 it",
                 path=path, mode=mode)
    return key


# -- the service -------------------------------------------------------------------------------


def _session_classes(manhole_ssh):
    """Return a ``TerminalRealm`` subclass whose sessions survive what conch's do not.

    Conch's ``TerminalSession`` raises ``NotImplementedError`` when the client resizes its window
    (the connection drops) or sends end-of-file (as ``ssh`` does once piped input is read). Here a
    resize reaches the terminal and end-of-file ends the session like Ctrl-D, after the output.
    """

    class ManholeSession(manhole_ssh.TerminalSession):
        width, height = 80, 25  # until a pty request says otherwise (``ssh -T`` sends none)
        _proto = _terminal = None

        def openShell(self, proto):
            from twisted.conch.interfaces import IConchUser

            self._proto = proto
            self._terminal = self.transportFactory(
                proto, self.chainedProtocolFactory(), IConchUser(self.original), self.width, self.height
            )

        def windowChanged(self, newWindowSize):
            self.height, self.width = newWindowSize[:2]
            if self._terminal is not None:
                self._terminal.chainedProtocol.terminalProtocol.terminalSize(self.width, self.height)

        def eofReceived(self):
            if self._proto is not None:
                self._proto.loseConnection()

    class ManholeRealm(manhole_ssh.TerminalRealm):
        sessionFactory = ManholeSession

    return ManholeRealm


def build_portal(keys_file: str, namespace: dict):
    """Return a :class:`twisted.cred.portal.Portal` of manhole sessions over ``namespace`` that
    admits the keys of ``keys_file`` (public-key login only).

    Each session gets its own copy of ``namespace`` (as taken when it starts), so names an operator
    defines stay in their session; the objects themselves are the live ones.
    """
    from twisted.cred import portal
    from zope.interface import declarations

    checkers, manhole, manhole_ssh, insults, keys = _conch()
    keydb = AuthorizedKeysFile(keys_file, keys.Key.fromString)
    declarations.directlyProvides(keydb, checkers.IAuthorizedKeysDB)

    def session_protocol():
        return insults.ServerProtocol(manhole.ColoredManhole, namespace)

    realm = _session_classes(manhole_ssh)()
    realm.chainedProtocolFactory = session_protocol
    return portal.Portal(realm, [checkers.SSHPublicKeyChecker(keydb)])


class ManholeService(StreamServerEndpointService):
    """The manhole's listening service; a bind failure raises from :meth:`privilegedStartService`
    (``CannotListenError``), as ``strports.service`` does.

    :ivar description: the endpoint description, loopback applied.
    :ivar fingerprint: the host key's SHA256 fingerprint, as ``ssh`` shows it.
    :ivar port: the listening port once listening, else ``None``.
    """

    _raiseSynchronously = True

    def __init__(self, endpoint, factory, description: str, fingerprint: str) -> None:
        super().__init__(endpoint, factory)
        self.description = description
        self.fingerprint = fingerprint
        self.port = None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self._waitingForPort.addCallback(self._listening)

    def _listening(self, port):
        self.port = port
        address = port.getHost()
        host = getattr(address, "host", None)
        where = f"{host}:{address.port}" if host is not None else str(address)
        log.info("SSH manhole listening on {where} (host key {fingerprint})",
                 where=where, fingerprint=self.fingerprint)
        return port

    def stopService(self):
        self.port = None
        return super().stopService()


def build_manhole_service(description: str, keys_file: str | None, state_dir: str, namespace: dict,
                          reactor, host_key_size: int = DEFAULT_HOST_KEY_SIZE) -> ManholeService:
    """Build (not start) the SSH manhole service.

    :param description: a Twisted stream server endpoint description (``tcp:2222``); without an
        ``interface=`` it listens on loopback (:func:`loopback_description`).
    :param keys_file: the ``authorized_keys`` file; ``None`` refuses.
    :param state_dir: where the host key is kept (generated there the first time).
    :param namespace: the names a session starts with (live objects, not copies).
    :param reactor: the reactor to listen with.
    :param host_key_size: bits of a newly generated RSA host key.
    :returns: a :class:`ManholeService` to add to the service tree.
    :raises ManholeError: with a one-line message: no keys file, an unusable keys file or one
        without usable keys, a host key that cannot be created or read, a bad description, or
        ``twisted.conch`` missing.
    """
    from twisted.internet import endpoints

    description = loopback_description(description)
    if not keys_file:
        raise ManholeError(
            "--manhole needs --manhole-keys FILE, an authorized_keys file (public-key login only)"
        )
    checkers, manhole, manhole_ssh, insults, keys = _conch()
    if not read_authorized_keys(keys_file, keys.Key.fromString):
        raise ManholeError(f"--manhole-keys {keys_file}: no usable public key in it")
    interface = named_interface(description)
    if interface is not None and not is_loopback(interface):
        log.warn("the manhole listens on {interface}, not loopback: anyone who can reach it may try"
                 " to log in", interface=interface)
    try:
        endpoint = endpoints.serverFromString(reactor, description)
    except (ValueError, KeyError, TypeError) as e:
        raise ManholeError(f"--manhole: invalid endpoint description {description!r}: {e}") from None
    host_key = ensure_host_key(state_dir, host_key_size, keys)

    factory = manhole_ssh.ConchFactory(build_portal(keys_file, namespace))
    # ConchFactory's key dicts are class attributes, shared by every instance: give this one its own.
    factory.publicKeys = {b"ssh-rsa": host_key.public()}
    factory.privateKeys = {b"ssh-rsa": host_key}
    # As ssh and ssh-keygen -l show it, so that an operator can compare.
    fingerprint = "SHA256:" + host_key.fingerprint(keys.FingerprintFormats.SHA256_BASE64).rstrip("=")
    return ManholeService(endpoint, factory, description, fingerprint)
