"""The SSH manhole (``--manhole``): a Python prompt inside the running daemon, for live debugging.

An operator who sees something odd in production opens the manhole instead of restarting the
daemon with debug flags::

    ssh -p 2222 admin@127.0.0.1
    >>> sip.stats.total("received")

or asks for one value from a script (the expression's ``repr``, no colours, exit status 0, or 1
with the traceback on stderr when it raises)::

    ssh -p 2222 admin@127.0.0.1 'sip.stats.total("received")'

It is a ``twisted.conch`` SSH server whose sessions run :class:`twisted.conch.manhole.ColoredManhole`
over a namespace of live objects (the service tree, the SIP controller and its counters, the
database, the DHT service).  ``manhole_tap.makeService`` only knows passwd files and telnet, so the
pieces are put together here:

* **public-key login only**: the keys are those of an ``authorized_keys`` file (``--manhole-keys``),
  read again at every login so that adding or removing a key needs no restart.  The user name is not
  checked: every listed key may log in under any name.  Lines with ``authorized_keys`` options
  (``from=``, ``command=``...) are ignored with a warning, because the manhole could not honour the
  restriction they express.  As OpenSSH's ``StrictModes`` does, the file must be owned by root or
  the daemon's user and not be writable by group or others, and so must every directory above it
  (a directory writable by others is accepted when it has the sticky bit, as ``/tmp``); otherwise
  the manhole refuses to start, and refuses logins when the file becomes unsafe later;
* **a host key generated once** (Ed25519, OpenSSH format, mode 0600) into the state directory, next
  to the database, and reused at every start so that clients' ``known_hosts`` entries stay valid.
  A key file of another type that conch serves (an RSA key of an earlier version) is kept;
* **sessions end as ssh expects**: Ctrl-D, end of input, ``exit()``, ``quit()`` or ``sys.exit()``
  end the session with an ``exit-status`` (0, or the code given to ``exit``), never a traceback in
  the daemon's log; ``ssh host 'expression'`` evaluates one expression (see above);
* **a quiet log**: one line per login (user, key fingerprint, peer address) and, at most once a
  minute per peer address, one per refused login; conch's per-connection chatter is dropped and its
  warnings and errors are kept;
* **loopback by default**: a ``tcp:PORT`` description without ``interface=`` listens on 127.0.0.1
  (``tcp6:`` on ::1); another interface is used only when the operator names it (and a warning is
  logged).  An IPv6 interface may be written plainly (``interface=::1``).  Never telnet.

Nothing here runs at import time and ``twisted.conch`` is imported only when a manhole is built:
on Debian 12 it needs ``python3-pyasn1``, and a missing module becomes a one-line
:class:`ManholeError` instead of an ``ImportError`` for everyone.  The code runs on Twisted 22.4
(Debian 12) and the newest releases.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import inspect
import io
import ipaddress
import os
import pwd
import re
import stat
import struct
import time
import traceback
import types
import warnings
from collections.abc import Callable, Iterable

from twisted.application.internet import StreamServerEndpointService
from twisted.logger import Logger, LogLevel

log = Logger(namespace="sentrypeer.manhole")

#: File name of the host key in the state directory.
HOST_KEY_NAME = "manhole_host_key"
#: The package's default keys file (documented in ``/etc/default/sentrypeer``).
PACKAGE_KEYS_FILE = "/etc/sentrypeer/manhole_authorized_keys"
#: Seconds between two log lines about refused logins from one address (or about one keys file
#: problem).
LOG_INTERVAL = 60.0

# An authorized_keys line starts with the key type unless it starts with options.
_KEY_TYPE = re.compile(rb"^(ssh-|ecdsa-sha2-|sk-ssh-|sk-ecdsa-sha2-)[A-Za-z0-9@.-]+$")
# A ":" that is not escaped with a backslash separates the fields of an endpoint description.
_FIELD_SEPARATOR = re.compile(r"(?<!\\):")
_INTERFACE = "interface="
# Endpoint types whose interface= is an address.
_ADDRESS_KINDS = ("tcp", "tcp6", "ssl")


class ManholeError(Exception):
    """The manhole cannot be set up; the message is one line naming the file or setting and the
    cause, meant to become a start-up failure."""


class _Throttle:
    """Lets one event per key through per ``interval`` seconds, and counts those held back.

    :param clock: an object with ``seconds()`` (a reactor); without one, the monotonic clock.
    """

    #: Above this many keys, expired ones are forgotten (with their held-back counts).
    max_keys = 1024

    def __init__(self, clock=None, interval: float = LOG_INTERVAL) -> None:
        self._seconds = getattr(clock, "seconds", None) or time.monotonic
        self.interval = interval
        self._keys: dict[object, list] = {}  # key -> [time let through, held back since]

    def allow(self, key) -> int | None:
        """Return ``None`` to hold this event back, else how many were held back since the last
        one let through for ``key``."""
        now = self._seconds()
        entry = self._keys.get(key)
        if entry is not None and now - entry[0] < self.interval:
            entry[1] += 1
            return None
        held = entry[1] if entry is not None else 0
        if entry is None and len(self._keys) >= self.max_keys:
            self._keys = {k: e for k, e in self._keys.items() if now - e[0] < self.interval}
        self._keys[key] = [now, 0]
        return held


# -- endpoint description ----------------------------------------------------------------------


def _interface_span(fields: list[str]) -> tuple[int, int, str] | None:
    """Find ``interface=`` in description fields split on unescaped colons.

    An IPv6 address written plainly (``interface=::1``) spans several fields: the ones after
    ``interface=`` that have no ``=`` belong to it.

    :returns: ``(first, end, address)`` (fields ``first:end`` hold it; the address unescaped and
        without brackets), or ``None``.
    """
    for first, field in enumerate(fields[1:], 1):
        if field.startswith(_INTERFACE):
            end = first + 1
            while end < len(fields) and "=" not in fields[end]:
                end += 1
            address = ":".join([field[len(_INTERFACE):], *fields[first + 1:end]])
            address = address.replace("\\:", ":")
            if address.startswith("[") and address.endswith("]"):
                address = address[1:-1]
            return first, end, address
    return None


def loopback_description(description: str) -> str:
    """Return ``description`` listening on loopback unless it names an interface.

    ``tcp:2222`` becomes ``tcp:2222:interface=127.0.0.1``, ``tcp6:2222`` becomes
    ``tcp6:2222:interface=\\:\\:1`` and a bare port ``2222`` is taken as ``tcp:2222``.  A named
    interface is kept; an IPv6 one written plainly (``interface=::`` or ``interface=[::1]``) is
    escaped as Twisted's parser wants it (``interface=\\:\\:``).  Other endpoint types
    (``unix:``, ``systemd:``...) are kept as they are.

    :raises ManholeError: when the description or its interface is empty.
    """
    text = description.strip()
    if not text:
        raise ManholeError("--manhole: the endpoint description is empty")
    fields = _FIELD_SEPARATOR.split(text)
    if fields[0].isdigit():
        fields = ["tcp", *fields]
    kind = fields[0].lower()
    if kind not in _ADDRESS_KINDS:
        return ":".join(fields)
    span = _interface_span(fields)
    if span is None:
        fields.append(_INTERFACE + ("\\:\\:1" if kind == "tcp6" else "127.0.0.1"))
        return ":".join(fields)
    first, end, address = span
    if not address:
        raise ManholeError(
            f"--manhole {description}: interface= is empty; name an address (127.0.0.1, ::1...)"
        )
    fields[first:end] = [_INTERFACE + address.replace(":", "\\:")]
    return ":".join(fields)


def named_interface(description: str) -> str | None:
    """Return the ``interface=`` address of an endpoint description (unescaped), or ``None``."""
    span = _interface_span(_FIELD_SEPARATOR.split(description))
    return None if span is None else span[2]


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and the loopback addresses (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _host_port(address) -> str:
    """``127.0.0.1:2222``, ``[::1]:2222``, or ``str(address)`` for an address without a host."""
    host = getattr(address, "host", None)
    if host is None:
        return str(address)
    return f"[{host}]:{address.port}" if ":" in host else f"{host}:{address.port}"


# -- authorized keys ---------------------------------------------------------------------------


def _conch() -> types.SimpleNamespace:
    """Import the ``twisted.conch`` modules the manhole needs.

    :raises ManholeError: naming the missing module (Debian 12's conch needs python3-pyasn1).
    """
    try:
        with warnings.catch_warnings():
            # Conch < 23 names ciphers (Blowfish, CAST5) that cryptography >= 37 deprecates: noise
            # in the daemon's log about algorithms a modern client never negotiates.
            warnings.filterwarnings("ignore", r".*(Blowfish|CAST5)", category=Warning)
            from twisted.conch import checkers, interfaces, manhole, manhole_ssh
            from twisted.conch.insults import insults
            from twisted.conch.ssh import (
                channel,
                common,
                connection,
                keys,
                session,
                transport,
                userauth,
            )
    except ImportError as e:
        raise ManholeError(
            f"--manhole needs twisted.conch, which cannot be imported ({e}); install "
            "twisted[conch] (Debian: python3-pyasn1 and python3-bcrypt)"
        ) from None
    return types.SimpleNamespace(
        checkers=checkers, interfaces=interfaces, manhole=manhole, manhole_ssh=manhole_ssh,
        insults=insults, channel=channel, common=common, connection=connection, keys=keys,
        session=session, transport=transport, userauth=userauth,
    )


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def check_keys_file(path: str, uid: int | None = None) -> None:
    """Check ``path`` as OpenSSH's ``StrictModes`` checks an ``authorized_keys`` file.

    The file must be a regular file owned by root or ``uid``, not writable by group or others; every
    directory above it, up to ``/`` (those of the path as given and of the file it resolves to), must
    be owned by root or ``uid`` and not writable by group or others unless it has the sticky bit
    (``/tmp``): whoever can write the file, or replace it, can run code in the daemon.

    :param uid: the daemon's user (default: the effective uid of this process).
    :raises ManholeError: naming the file, the offending file or directory and the cause.
    """
    if uid is None:
        uid = os.geteuid()
    trusted = {0, uid}
    owners = "root" if uid == 0 else f"root or {_user_name(uid)}"
    try:
        info = os.stat(path)
    except OSError as e:
        raise ManholeError(f"--manhole-keys {path}: {e.strerror or e}") from None
    if not stat.S_ISREG(info.st_mode):
        raise ManholeError(f"--manhole-keys {path}: not a regular file")
    if info.st_uid not in trusted:
        raise ManholeError(
            f"--manhole-keys {path}: owned by {_user_name(info.st_uid)}, not {owners}; anyone who"
            f" can write it can run code in the daemon: chown it to {owners}"
        )
    if info.st_mode & 0o022:
        raise ManholeError(
            f"--manhole-keys {path}: writable by group or others (mode {stat.S_IMODE(info.st_mode):04o});"
            " anyone who can write it can run code in the daemon: chmod go-w it"
        )
    directories: list[str] = []
    for start in (os.path.abspath(path), os.path.realpath(path)):
        directory = os.path.dirname(start)
        while directory not in directories:
            directories.append(directory)
            parent = os.path.dirname(directory)
            if parent == directory:
                break
            directory = parent
    for directory in directories:
        try:
            info = os.stat(directory)
        except OSError as e:
            raise ManholeError(f"--manhole-keys {path}: {directory}: {e.strerror or e}") from None
        if info.st_uid not in trusted:
            raise ManholeError(
                f"--manhole-keys {path}: its directory {directory} is owned by"
                f" {_user_name(info.st_uid)}, not {owners}, who could replace the file"
            )
        if info.st_mode & 0o022 and not info.st_mode & stat.S_ISVTX:
            raise ManholeError(
                f"--manhole-keys {path}: its directory {directory} is writable by group or others"
                f" (mode {stat.S_IMODE(info.st_mode):04o}) without the sticky bit, who could"
                " replace the file: chmod go-w it"
            )


def parse_authorized_keys(lines: Iterable[bytes], parse_key: Callable, source: str = "",
                          warn: Callable | None = None) -> list:
    """Return the public keys of ``authorized_keys`` lines, skipping (with a warning) lines that
    have options or that are not keys.

    :param lines: the lines of the file, as bytes.
    :param parse_key: ``twisted.conch.ssh.keys.Key.fromString``.
    :param source: the file name, for warnings.
    :param warn: called as ``Logger.warn`` is for each warning (default: ``log.warn``).
    :returns: a list of :class:`twisted.conch.ssh.keys.Key`.
    """
    if warn is None:
        warn = log.warn
    found = []
    for number, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line or line.startswith(b"#"):
            continue
        fields = line.split()
        if not _KEY_TYPE.match(fields[0]):
            warn("{source} line {number}: authorized_keys options are not supported by the manhole;"
                 " line ignored", source=source, number=number)
            continue
        try:
            key = parse_key(b" ".join(fields[:2]))
        except Exception as e:  # BadKeyError, binascii.Error, ValueError...: one bad line only
            warn("{source} line {number}: not a public key ({error}); line ignored",
                 source=source, number=number, error=str(e) or type(e).__name__)
            continue
        if not key.isPublic():
            warn("{source} line {number}: not a public key; line ignored", source=source, number=number)
            continue
        found.append(key)
    return found


def read_authorized_keys(path: str, parse_key: Callable, warn: Callable | None = None) -> list:
    """Check and read the keys file.

    :raises ManholeError: when the file is unusable (see :func:`check_keys_file`) or unreadable.
    """
    check_keys_file(path)
    try:
        with open(path, "rb") as f:
            return parse_authorized_keys(f, parse_key, path, warn)
    except OSError as e:
        raise ManholeError(f"--manhole-keys {path}: {e.strerror or e}") from None


class AuthorizedKeysFile:
    """The keys allowed to log in: an ``authorized_keys`` file, read again at every login.

    Provides ``twisted.conch.checkers.IAuthorizedKeysDB`` (declared by :func:`build_portal`, so that
    importing this module does not import conch).  The user name is ignored.  A file that has become
    unusable gives no keys (and a logged warning) rather than an error to the client.  Each warning
    about the file is logged at most once a minute.

    :param path: the file.
    :param parse_key: ``twisted.conch.ssh.keys.Key.fromString``.
    :param clock: for the warnings' rate limit (a reactor; default the monotonic clock).
    """

    def __init__(self, path: str, parse_key: Callable, clock=None) -> None:
        self.path = path
        self._parse_key = parse_key
        self._throttle = _Throttle(clock)

    def _warn(self, format: str, **kwargs) -> None:
        if self._throttle.allow((format, tuple(sorted(kwargs.items())))) is not None:
            log.warn(format, **kwargs)

    def read(self) -> list:
        """Check and read the file now.

        :raises ManholeError: when it is unusable.
        """
        return read_authorized_keys(self.path, self._parse_key, self._warn)

    def getAuthorizedKeys(self, username):
        """Return the keys of the file as it is now (any user name)."""
        try:
            return self.read()
        except ManholeError as e:
            self._warn("manhole login refused: {error}", error=str(e))
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


def new_host_key() -> bytes:
    """Return a new private host key in OpenSSH format: Ed25519 (fast to make, fast handshakes),
    or ECDSA P-256 where the OpenSSL build has no Ed25519."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519

    try:
        private = ed25519.Ed25519PrivateKey.generate()
    except UnsupportedAlgorithm:
        private = ec.generate_private_key(ec.SECP256R1())
    return private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )


def host_key_fingerprint(key, keys_module) -> str:
    """The key's SHA256 fingerprint as ``ssh`` and ``ssh-keygen -l`` show it."""
    return "SHA256:" + key.fingerprint(keys_module.FingerprintFormats.SHA256_BASE64).rstrip("=")


def ensure_host_key(state_dir: str, keys_module=None):
    """Load the manhole's host key from ``state_dir``, generating it the first time.

    A new key is Ed25519 (see :func:`new_host_key`), written in OpenSSH format with mode 0600.  An
    existing key is used as it is, whatever its type, so that clients' ``known_hosts`` entries stay
    valid (an RSA key of an earlier version is kept, with a line saying how to replace it); a
    warning is logged when others may read it.

    :returns: the private :class:`twisted.conch.ssh.keys.Key`.
    :raises ManholeError: when the key cannot be created or read, or is of a type OpenSSH clients
        no longer accept (DSA).
    """
    if keys_module is None:
        keys_module = _conch().keys
    path = os.path.join(state_dir, HOST_KEY_NAME)
    if not os.path.lexists(path):
        try:
            created = _write_new_file(path, new_host_key(), 0o600)
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
    if key.type() == "DSA":
        raise ManholeError(f"manhole host key {path}: a DSA key, which OpenSSH clients refuse;"
                           " remove it and a new Ed25519 key is generated at the next start")
    if key.type() == "RSA":
        log.info("manhole host key {path} is RSA, kept so that known_hosts entries stay valid;"
                 " remove it and restart for an Ed25519 key (faster handshakes)", path=path)
    if mode & 0o077:
        log.warn("manhole host key {path} may be read by others (mode {mode:04o}); chmod 600 it",
                 path=path, mode=mode)
    return key


# -- running what the operator types -----------------------------------------------------------


class _Quitter:
    """``exit`` and ``quit`` in a session: they end the session (the builtins would also close the
    daemon's ``sys.stdin``)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"Use {self.name}() or Ctrl-D to end the session"

    def __call__(self, code=None):
        raise SystemExit(code)


def session_namespace(namespace: dict) -> dict:
    """A session's own copy of ``namespace``, with ``exit`` and ``quit`` that end the session."""
    names = {"exit": _Quitter("exit"), "quit": _Quitter("quit")}
    names.update(namespace)
    return names


def exit_status(code) -> tuple[int, str]:
    """The exit status and message of ``SystemExit(code)``, as Python's own exit computes them:
    ``None`` is 0, an integer is itself (modulo 256), anything else is printed and gives 1."""
    if code is None:
        return 0, ""
    if isinstance(code, int):
        return code & 0xFF, ""
    return 1, f"{code}\n"


def _traceback_text(error: BaseException) -> str:
    """The traceback of ``error`` without the frames of this module."""
    tb = error.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename == __file__:
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(error), error, tb))


def run_command(source: str, namespace: dict):
    """Run ``source`` (an expression, or statements ending with one) in ``namespace``.

    What ``print`` writes is collected; the value of a final expression is shown as its ``repr``
    (nothing for ``None``).  For a Deferred or coroutine value, a Deferred is returned for the
    caller to wait on; it fires with the value's result, which a Deferred of the daemon's keeps.

    :returns: ``(output, errors, status, pending)``: the text for stdout and stderr, the exit
        status (0; 1 with the traceback in ``errors`` when it raises; the code of ``SystemExit``)
        and ``None`` or the Deferred whose result is the value to show.
    """
    from twisted.internet import defer
    from twisted.python.failure import Failure

    output = io.StringIO()
    status, errors, pending = 0, "", None
    try:
        tree = ast.parse(source, "<manhole>", "exec")
        last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
        with contextlib.redirect_stdout(output):
            exec(compile(tree, "<manhole>", "exec"), namespace)
            value = None
            if last is not None:
                value = eval(compile(ast.Expression(last.value), "<manhole>", "eval"), namespace)
        if inspect.iscoroutine(value):
            pending = defer.ensureDeferred(value)
        elif isinstance(value, defer.Deferred):
            pending = defer.Deferred()

            def relay(result):
                (pending.errback if isinstance(result, Failure) else pending.callback)(result)
                return result  # unchanged for the daemon's own callbacks

            value.addBoth(relay)
        elif value is not None:
            output.write(repr(value) + "\n")
    except SystemExit as e:
        status, errors = exit_status(e.code)
    except BaseException as e:  # what the operator's code raises is theirs to see, not ours
        status, errors = 1, _traceback_text(e)
    return output.getvalue(), errors, status, pending


# -- the SSH side ------------------------------------------------------------------------------


class _QuietLogger(Logger):
    """The logger of the manhole's conch classes: their warnings and errors only, not their
    per-connection debug and info chatter (kex algorithms, "channel open", "connection lost"...)."""

    def emit(self, level, format=None, **kwargs):
        if level in (LogLevel.debug, LogLevel.info):
            return
        super().emit(level, format, **kwargs)


class _Pipe:
    """A transport that writes to a callable: the two ends of a shell session."""

    def __init__(self, write: Callable, lose: Callable, channel) -> None:
        self.write = write
        self._lose = lose
        self._channel = channel

    def writeSequence(self, data) -> None:
        self.write(b"".join(data))

    def loseConnection(self) -> None:
        self._lose()

    def getPeer(self):
        return self._channel.conn.transport.transport.getPeer()

    def getHost(self):
        return self._channel.conn.transport.transport.getHost()


def _fingerprint_of(blob: bytes, keys_module) -> str:
    try:
        key = keys_module.Key.fromString(blob)
        return f"{key.type()} {host_key_fingerprint(key, keys_module)}"
    except Exception:
        return "an unreadable key"


def _printable(name: bytes) -> str:
    """A client-chosen name, safe for a log line."""
    return repr(name.decode("utf-8", "backslashreplace"))


@functools.cache
def _classes() -> types.SimpleNamespace:
    """The conch subclasses the manhole is made of (built once, on first use)."""
    conch = _conch()
    from twisted.cred.error import UnauthorizedLogin
    from twisted.internet import reactor as default_reactor

    class ManholeInterpreter(conch.manhole.ManholeInterpreter):
        """Ends the session on ``SystemExit`` (``exit()``, ``sys.exit()``...) instead of letting it
        escape into the reactor."""

        def runcode(self, *args, **kwargs):
            try:
                super().runcode(*args, **kwargs)
            except SystemExit as e:
                self.handler.request_exit(e.code)

    class ManholeShell(conch.manhole.ColoredManhole):
        """The interactive prompt; ``exit_status`` is set once the code asked to exit."""

        exit_status = None

        def connectionMade(self):
            super().connectionMade()
            self.interpreter = ManholeInterpreter(self, self.namespace)

        def request_exit(self, code) -> None:
            self.exit_status, message = exit_status(code)
            if message:
                self.addOutput(message.encode("utf-8", "backslashreplace"))

        def handle_QUIT(self):
            # Ctrl-D, Ctrl-backslash, end of input, exit(). Conch resets the whole terminal, which
            # clears the operator's screen: only the insert mode set at the start is undone here.
            if self._needsNewline():
                self.terminal.nextLine()
            self.terminal.resetModes([conch.insults.modes.IRM])
            self.terminal.transport.loseConnection()

        def lineReceived(self, line):
            more = self.interpreter.push(line)
            if self.exit_status is not None:
                self.handle_QUIT()
                return
            self.pn = bool(more)
            if self._needsNewline():
                self.terminal.nextLine()
            self.terminal.write(self.ps[self.pn])

    class TerminalBridge:
        """What conch's ``TerminalSessionTransport`` does (joins the SSH session and the terminal
        protocol), except that the end of the terminal ends the session with an exit status."""

        def __init__(self, proto, chainedProtocol, avatar, width, height):
            self.proto = proto
            self.chainedProtocol = chainedProtocol
            channel = proto.session
            chainedProtocol.makeConnection(_Pipe(proto.write, self.end, channel))
            chainedProtocol.terminalProtocol.terminalSize(width, height)
            proto.makeConnection(_Pipe(chainedProtocol.dataReceived, lambda: None, channel))

        @property
        def shell(self):
            return getattr(self.chainedProtocol, "terminalProtocol", None)

        def end(self) -> None:
            self.proto.session.end(getattr(self.shell, "exit_status", None) or 0)

    class ManholeSession(conch.manhole_ssh.TerminalSession):
        """A session's terminal side: a window resize reaches the terminal (conch's drops the
        connection) and end-of-file (as ``ssh`` sends once piped input is read) ends the session
        like Ctrl-D, after the output."""

        width, height = 80, 25  # until a pty request says otherwise (``ssh -T`` sends none)
        _bridge = None

        def openShell(self, proto):
            self._bridge = self.transportFactory(
                proto, self.chainedProtocolFactory(), conch.interfaces.IConchUser(self.original),
                self.width, self.height,
            )

        def windowChanged(self, newWindowSize):
            self.height, self.width = newWindowSize[:2]
            shell = self._bridge.shell if self._bridge is not None else None
            if shell is not None:
                shell.terminalSize(self.width, self.height)

        def eofReceived(self):
            shell = self._bridge.shell if self._bridge is not None else None
            if shell is not None:
                shell.handle_QUIT()
            elif self._bridge is not None:
                self._bridge.end()

    class ManholeChannel(conch.session.SSHSession):
        """A session channel: a shell or one command (``exec``), ended with an ``exit-status``;
        environment variables are accepted and ignored; quiet in the log."""

        _log = _QuietLogger()
        _status = None
        _status_sent = False
        _command = None
        _gone = False
        pty = False

        def _isession(self):
            if self.session is None:
                self.session = conch.interfaces.ISession(self.avatar)
            return self.session

        def request_pty_req(self, data):
            term, size, modes = conch.session.parseRequest_pty_req(data)
            try:
                self._isession().getPty(term, size, modes)
            except Exception:
                log.failure("manhole: cannot handle a pty request")
                return 0
            self.pty = True
            return 1

        def request_env(self, data):
            return 1  # LANG, LC_*... mean nothing to the daemon

        def request_shell(self, data):
            if self.client is not None or self._command is not None:
                return 0
            proto = conch.session.SSHSessionProcessProtocol(self)
            try:
                self._isession().openShell(proto)
            except Exception:
                log.failure("manhole: cannot open a shell")
                return 0
            self.client = proto
            return 1

        def request_exec(self, data):
            if self.client is not None or self._command is not None:
                return 0
            self._command = conch.common.getNS(data)[0]
            # After this request's reply, which conch sends when this method returns.
            self.conn.transport.factory.reactor.callLater(0, self._run)
            return 1

        def request_subsystem(self, data):
            return 0

        def _run(self) -> None:
            if self._gone:
                return
            try:
                source = self._command.decode("utf-8")
            except UnicodeDecodeError as e:
                self._show("", f"the command is not UTF-8: {e}\n")
                self.end(1)
                return
            output, errors, status, pending = run_command(source, session_namespace(self.avatar.namespace))
            self._show(output, errors)
            if pending is None:
                self.end(status)
                return

            def shown(value):
                self._show("" if value is None else repr(value) + "\n", "")
                self.end(status)

            def failed(reason):
                self._show("", _traceback_text(reason.value))
                self.end(1)

            pending.addCallback(shown).addErrback(failed)

        def _show(self, output: str, errors: str) -> None:
            if self._gone:
                return
            for text, extended in ((output, False), (errors, True)):
                if not text:
                    continue
                if self.pty:
                    text = text.replace("\n", "\r\n")
                data = text.encode("utf-8", "backslashreplace")
                if extended:
                    self.writeExtended(conch.connection.EXTENDED_DATA_STDERR, data)
                else:
                    self.write(data)

        def dataReceived(self, data):
            if self.client is not None:  # conch would buffer a command's input into our output
                super().dataReceived(data)

        def end(self, status: int = 0) -> None:
            """End the session: ``exit-status`` then close, once the output is sent."""
            if self._status is None:
                self._status = status
            self.loseConnection()

        def loseConnection(self):
            if self._status is not None and not self._status_sent and not self.buf and not self.extBuf:
                self._status_sent = True
                self.conn.sendRequest(self, b"exit-status", struct.pack(">L", self._status))
            conch.channel.SSHChannel.loseConnection(self)

        def closed(self):
            self._gone = True
            super().closed()

    class ManholeUser(conch.manhole_ssh.TerminalUser):
        namespace: dict = {}

        def __init__(self, original, avatarId):
            super().__init__(original, avatarId)
            self.channelLookup[b"session"] = ManholeChannel

    class ManholeRealm(conch.manhole_ssh.TerminalRealm):
        userFactory = ManholeUser
        sessionFactory = ManholeSession
        transportFactory = TerminalBridge

        def __init__(self, namespace: dict) -> None:
            super().__init__()
            self.namespace = namespace

            def shell():
                return conch.insults.ServerProtocol(ManholeShell, session_namespace(namespace))

            self.chainedProtocolFactory = shell

        def requestAvatar(self, avatarId, mind, *interfaces):
            interface, user, logout = super().requestAvatar(avatarId, mind, *interfaces)
            user.namespace = self.namespace
            return interface, user, logout

    class ManholeUserAuth(conch.userauth.SSHUserAuthServer):
        """Public-key login that logs each login, and each refused one (at most once a minute
        per peer address), in one line."""

        _log = _QuietLogger()

        def serviceStarted(self):
            super().serviceStarted()
            self._refused: list[str] = []
            self._accepted = False

        def _peer(self):
            return self.transport.transport.getPeer()

        def auth_publickey(self, packet):
            d = super().auth_publickey(packet)
            blob = conch.common.getNS(packet[1:], 2)[1]
            key = _fingerprint_of(blob, conch.keys)

            def accepted(result):
                self._accepted = True
                log.info("manhole login: user {user} from {peer}, key {key}",
                         user=_printable(self.user), peer=_host_port(self._peer()), key=key)
                return result

            def refused(reason):
                if reason.check(UnauthorizedLogin) and key not in self._refused:
                    self._refused.append(key)
                return reason

            return d.addCallbacks(accepted, refused)

        def serviceStopped(self):
            super().serviceStopped()
            if self._accepted or not self._refused:
                return
            peer = self._peer()
            held = self.transport.factory.refusals.allow(getattr(peer, "host", str(peer)))
            if held is None:
                return
            log.info("manhole login refused: user {user} from {peer}, key {keys} not authorized{more}",
                     user=_printable(self.user or b""), peer=_host_port(peer),
                     keys=", ".join(self._refused),
                     more=f" ({held} more refused from this address not logged)" if held else "")

    class ManholeConnection(conch.connection.SSHConnection):
        _log = _QuietLogger()

    # How clients say goodbye: by user (ssh's exit), connection closed (conch's), auth cancelled
    # or given up (a refused key, already logged).
    goodbyes = {
        conch.transport.DISCONNECT_BY_APPLICATION,
        conch.transport.DISCONNECT_CONNECTION_LOST,
        conch.transport.DISCONNECT_AUTH_CANCELLED_BY_USER,
        conch.transport.DISCONNECT_NO_MORE_AUTH_METHODS_AVAILABLE,
    }

    class ManholeServerTransport(conch.transport.SSHServerTransport):
        _log = _QuietLogger()

        def receiveError(self, reasonCode, description):
            if reasonCode not in goodbyes:
                log.warn("manhole client {peer} disconnected with error {code}: {description}",
                         peer=_host_port(self.transport.getPeer()), code=reasonCode,
                         description=description.decode("utf-8", "backslashreplace"))

    class ManholeFactory(conch.manhole_ssh.ConchFactory):
        """The SSH server factory: our transport and services, quiet, one host key."""

        _log = _QuietLogger()
        noisy = False
        protocol = ManholeServerTransport
        services = {b"ssh-userauth": ManholeUserAuth, b"ssh-connection": ManholeConnection}

        def __init__(self, portal, host_key, reactor=None) -> None:
            super().__init__(portal)
            self.reactor = reactor if reactor is not None else default_reactor
            # ConchFactory's key dicts are class attributes, shared by every instance: ours.
            self.publicKeys = {host_key.sshType(): host_key.public()}
            self.privateKeys = {host_key.sshType(): host_key}
            self.refusals = _Throttle(self.reactor)

        def logPrefix(self):
            return "SSH manhole"

    return types.SimpleNamespace(
        conch=conch, Realm=ManholeRealm, Factory=ManholeFactory, Shell=ManholeShell,
        Channel=ManholeChannel,
    )


def build_portal(keydb: AuthorizedKeysFile, namespace: dict):
    """Return a :class:`twisted.cred.portal.Portal` of manhole sessions over ``namespace`` that
    admits the keys of ``keydb`` (public-key login only).

    Each session gets its own copy of ``namespace`` (as taken when it starts), so names an operator
    defines stay in their session; the objects themselves are the live ones.
    """
    from twisted.cred import portal
    from zope.interface import declarations

    classes = _classes()
    checkers = classes.conch.checkers
    if not checkers.IAuthorizedKeysDB.providedBy(keydb):
        declarations.directlyProvides(keydb, checkers.IAuthorizedKeysDB)
    return portal.Portal(classes.Realm(namespace), [checkers.SSHPublicKeyChecker(keydb)])


# -- the service -------------------------------------------------------------------------------


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
        log.info("SSH manhole listening on {where} (host key {fingerprint})",
                 where=_host_port(port.getHost()), fingerprint=self.fingerprint)
        return port

    def stopService(self):
        self.port = None
        return super().stopService()


def build_manhole_service(description: str, keys_file: str | None, state_dir: str, namespace: dict,
                          reactor) -> ManholeService:
    """Build (not start) the SSH manhole service.

    :param description: a Twisted stream server endpoint description (``tcp:2222``); without an
        ``interface=`` it listens on loopback (:func:`loopback_description`).
    :param keys_file: the ``authorized_keys`` file; ``None`` refuses.
    :param state_dir: where the host key is kept (generated there the first time).
    :param namespace: the names a session starts with (live objects, not copies).
    :param reactor: the reactor to listen with (and the clock of the log's rate limits).
    :returns: a :class:`ManholeService` to add to the service tree.
    :raises ManholeError: with a one-line message: no keys file, an unusable or unsafe keys file or
        one without usable keys, a host key that cannot be created or read, a bad description, or
        ``twisted.conch`` missing.
    """
    from twisted.internet import endpoints

    description = loopback_description(description)
    if not keys_file:
        raise ManholeError(
            "--manhole needs --manhole-keys FILE, an authorized_keys file (public-key login only)"
        )
    classes = _classes()
    keydb = AuthorizedKeysFile(keys_file, classes.conch.keys.Key.fromString, reactor)
    if not keydb.read():
        raise ManholeError(f"--manhole-keys {keys_file}: no usable public key in it")
    interface = named_interface(description)
    if interface is not None and not is_loopback(interface):
        log.warn("the manhole listens on {interface}, not loopback: anyone who can reach it may try"
                 " to log in", interface=interface)
    try:
        endpoint = endpoints.serverFromString(reactor, description)
    except (ValueError, KeyError, TypeError) as e:
        raise ManholeError(f"--manhole: invalid endpoint description {description!r}: {e}") from None
    host_key = ensure_host_key(state_dir, classes.conch.keys)
    factory = classes.Factory(build_portal(keydb, namespace), host_key, reactor)
    fingerprint = host_key_fingerprint(host_key, classes.conch.keys)
    return ManholeService(endpoint, factory, description, fingerprint)
