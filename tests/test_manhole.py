"""Tests for the SSH manhole: keys file checks, the host key, loopback, the log, and real logins
(with twisted.conch's client and with OpenSSH's)."""

from __future__ import annotations

import os
import stat
import struct

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ed25519, rsa
from twisted.application.service import IService
from twisted.conch.ssh import channel, common, connection, keys, session, transport, userauth
from twisted.internet import defer, protocol, reactor, task
from twisted.internet.testing import EventLoggingObserver, MemoryReactor
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from sentrypeer import manhole
from sentrypeer.manhole import ManholeError, build_manhole_service

from .support import in_ci, require_tool

#: A uid no test file belongs to (for ownership checks).
STRANGER_UID = 54321


def new_user_key() -> keys.Key:
    """A fresh Ed25519 key pair, as an operator's ssh key."""
    return keys.Key(ed25519.Ed25519PrivateKey.generate())


def authorized_line(key: keys.Key, comment: str = "operator@test") -> bytes:
    return key.public().toString("openssh") + b" " + comment.encode() + b"\n"


def write_keys_file(path: str, content: bytes, mode: int = 0o600) -> str:
    with open(path, "wb") as f:
        f.write(content)
    os.chmod(path, mode)
    return path


def fingerprint(key: keys.Key) -> str:
    """As ssh-keygen -l shows it."""
    return "SHA256:" + key.fingerprint(keys.FingerprintFormats.SHA256_BASE64).rstrip("=")


def require_root() -> None:
    """Changing a file's owner needs root (CI runs as root: a skip there is a failure)."""
    if os.geteuid() != 0:
        message = "giving a file to another user needs root (CI runs as root)"
        if in_ci():
            raise AssertionError(message)
        raise SkipTest(message)


def messages(observer, namespace: str = "sentrypeer.manhole") -> list[str]:
    """The formatted events of ``namespace`` (exactly) that an observer saw."""
    return [formatEvent(e) for e in observer if e.get("log_namespace") == namespace]


class Counter:
    """A stand-in for a live counter object in the namespace."""

    def __init__(self) -> None:
        self.received = 0


class DescriptionTests(SynchronousTestCase):
    def test_loopback_added(self):
        """A description without an interface listens on loopback: tcp on 127.0.0.1, tcp6 on ::1,
        a bare port is tcp."""
        self.assertEqual(manhole.loopback_description("tcp:2222"), "tcp:2222:interface=127.0.0.1")
        self.assertEqual(manhole.loopback_description("2222"), "tcp:2222:interface=127.0.0.1")
        self.assertEqual(manhole.loopback_description("tcp6:2222"), "tcp6:2222:interface=\\:\\:1")

    def test_named_interface_kept(self):
        """An interface the operator names is kept, escaped IPv6 included; other endpoint types
        are left alone."""
        for text in ("tcp:2222:interface=0.0.0.0", "tcp:2222:interface=\\:\\:1", "unix:/run/x.sock",
                     "tcp:2222:interface=\\:\\::backlog=5"):
            self.assertEqual(manhole.loopback_description(text), text)
        self.assertEqual(manhole.named_interface("tcp:2222:interface=\\:\\:1"), "::1")
        self.assertIsNone(manhole.named_interface("unix:/run/x.sock"))

    def test_plain_ipv6_interface(self):
        """A plain IPv6 interface (``::``, ``::1``, ``[::1]``, with or without options after it) is
        escaped for Twisted's parser, and named_interface gives the address itself."""
        cases = {
            "tcp:2222:interface=::": "tcp:2222:interface=\\:\\:",
            "tcp:2222:interface=::1": "tcp:2222:interface=\\:\\:1",
            "tcp6:2222:interface=[::1]": "tcp6:2222:interface=\\:\\:1",
            "tcp:2222:interface=2001:db8::7:backlog=5": "tcp:2222:interface=2001\\:db8\\:\\:7:backlog=5",
        }
        for plain, escaped in cases.items():
            self.assertEqual(manhole.loopback_description(plain), escaped, plain)
        self.assertEqual(manhole.named_interface("tcp:2222:interface=::"), "::")
        self.assertEqual(manhole.named_interface("tcp:2222:interface=::1:backlog=5"), "::1")
        self.assertEqual(manhole.named_interface("tcp:2222:interface=[::1]"), "::1")

    def test_is_loopback(self):
        """127.0.0.0/8, ::1 and localhost are loopback; 0.0.0.0, :: and names are not."""
        for host in ("127.0.0.1", "127.3.4.5", "::1", "localhost"):
            self.assertTrue(manhole.is_loopback(host), host)
        for host in ("0.0.0.0", "::", "192.0.2.1", "example.org"):
            self.assertFalse(manhole.is_loopback(host), host)

    def test_empty_description(self):
        """An empty --manhole description is refused."""
        self.assertRaises(ManholeError, manhole.loopback_description, " ")

    def test_empty_interface(self):
        """An empty interface= (which Twisted would take as every IPv4 address) is refused with a
        one-line error."""
        e = self.assertRaises(ManholeError, manhole.loopback_description, "tcp:2222:interface=")
        self.assertIn("interface= is empty", str(e))


class ThrottleTests(SynchronousTestCase):
    def test_once_per_interval_per_key(self):
        """One event per key goes through per interval; the next one through reports how many
        were held back meanwhile; keys are independent."""
        clock = task.Clock()
        throttle = manhole._Throttle(clock, interval=60)
        self.assertEqual(throttle.allow("a"), 0)
        self.assertIsNone(throttle.allow("a"))
        self.assertIsNone(throttle.allow("a"))
        self.assertEqual(throttle.allow("b"), 0)
        clock.advance(59.9)
        self.assertIsNone(throttle.allow("a"))
        clock.advance(0.1)
        self.assertEqual(throttle.allow("a"), 3)
        self.assertIsNone(throttle.allow("a"))

    def test_bounded(self):
        """Expired keys are forgotten once there are many: the table does not grow without end."""
        clock = task.Clock()
        throttle = manhole._Throttle(clock, interval=60)
        throttle.max_keys = 10
        for n in range(10):
            throttle.allow(n)
        clock.advance(60)
        throttle.allow("new")
        self.assertEqual(len(throttle._keys), 1)


class KeysFileTests(SynchronousTestCase):
    """The keys file and the directories above it must be as safe as OpenSSH's StrictModes wants."""

    def setUp(self):
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)

    def keys_file(self, directory: str | None = None) -> str:
        return write_keys_file(os.path.join(directory or self.directory, "keys"),
                               authorized_line(new_user_key()))

    def test_parse(self):
        """Keys are read from key lines; comments, blank lines, lines with options and garbage are
        skipped, garbage and options with a warning naming the line."""
        one, two = new_user_key(), new_user_key()
        content = b"".join([
            b"# the operators\n", b"\n", authorized_line(one),
            b'from="192.0.2.1" ' + authorized_line(two),
            b"ssh-ed25519 not-base64!\n",
            two.public().toString("openssh") + b"\n",
        ])
        observer = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        found = manhole.parse_authorized_keys(content.splitlines(True), keys.Key.fromString, "f")
        self.assertEqual(found, [one.public(), two.public()])
        warnings = [formatEvent(e) for e in observer]
        self.assertEqual(len(warnings), 2, warnings)
        self.assertIn("f line 4: authorized_keys options are not supported", warnings[0])
        self.assertIn("f line 5: not a public key", warnings[1])

    def test_reread_at_login(self):
        """The keys database reads the file at every lookup, whatever the user name: a key added
        later is accepted without a restart, a file that became unusable gives no keys."""
        one, two = new_user_key(), new_user_key()
        path = write_keys_file(os.path.join(self.directory, "keys"), authorized_line(one))
        db = manhole.AuthorizedKeysFile(path, keys.Key.fromString)
        self.assertEqual(db.getAuthorizedKeys(b"anyone"), [one.public()])
        with open(path, "ab") as f:
            f.write(authorized_line(two))
        self.assertEqual(db.getAuthorizedKeys(b"root"), [one.public(), two.public()])
        os.chmod(path, 0o666)
        self.assertEqual(db.getAuthorizedKeys(b"root"), [])

    def test_login_warnings_once_a_minute(self):
        """A file that became unsafe refuses every login, with one warning a minute (not one per
        key offered); so are the warnings about its bad lines."""
        clock = task.Clock()
        path = write_keys_file(os.path.join(self.directory, "keys"),
                               b"garbage\n" + authorized_line(new_user_key()))
        db = manhole.AuthorizedKeysFile(path, keys.Key.fromString, clock)
        observer = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        for _ in range(3):
            self.assertEqual(len(db.getAuthorizedKeys(b"x")), 1)
        os.chmod(self.directory, 0o777)
        self.addCleanup(os.chmod, self.directory, 0o755)
        for _ in range(3):
            self.assertEqual(db.getAuthorizedKeys(b"x"), [])
        clock.advance(60)
        self.assertEqual(db.getAuthorizedKeys(b"x"), [])
        logged = messages(observer)
        self.assertEqual(len(logged), 3, logged)
        self.assertIn("line 1: authorized_keys options are not supported", logged[0])
        for line in logged[1:]:
            self.assertIn(f"manhole login refused: --manhole-keys {path}: its directory", line)

    def test_no_keys_file(self):
        """Without --manhole-keys the manhole refuses to start, with one line naming the option."""
        e = self.assertRaises(ManholeError, build_manhole_service, "tcp:0", None, self.directory, {},
                              MemoryReactor())
        self.assertIn("--manhole-keys", str(e))
        self.assertNotIn("\n", str(e))

    def test_missing_keys_file(self):
        """A keys file that does not exist is a one-line error naming it and the cause."""
        path = os.path.join(self.directory, "nope")
        e = self.assertRaises(ManholeError, build_manhole_service, "tcp:0", path, self.directory, {},
                              MemoryReactor())
        self.assertEqual(str(e), f"--manhole-keys {path}: No such file or directory")

    def test_keys_file_without_keys(self):
        """A keys file with no usable key is refused: nobody could log in."""
        path = write_keys_file(os.path.join(self.directory, "keys"), b"# nobody yet\n")
        e = self.assertRaises(ManholeError, build_manhole_service, "tcp:0", path, self.directory, {},
                              MemoryReactor())
        self.assertIn("no usable public key", str(e))

    def test_writable_keys_file(self):
        """A group- or world-writable keys file is refused, as OpenSSH's StrictModes does."""
        for mode in (0o620, 0o602):
            path = self.keys_file()
            os.chmod(path, mode)
            e = self.assertRaises(ManholeError, build_manhole_service, "tcp:0", path, self.directory,
                                  {}, MemoryReactor())
            self.assertIn("writable by group or others", str(e))
            self.assertNotIn("\n", str(e))

    def test_keys_file_is_directory(self):
        """A directory given as the keys file is refused."""
        e = self.assertRaises(ManholeError, build_manhole_service, "tcp:0", self.directory,
                              self.directory, {}, MemoryReactor())
        self.assertIn("not a regular file", str(e))

    def test_keys_file_owner(self):
        """A keys file owned by someone other than root or the daemon's user is refused (a
        one-line error naming the file); one owned by the daemon's user is accepted."""
        path = self.keys_file()
        if os.geteuid() == 0:
            os.chown(path, STRANGER_UID, -1)
            e = self.assertRaises(ManholeError, manhole.check_keys_file, path)
            manhole.check_keys_file(path, uid=STRANGER_UID)  # the daemon's own user
        else:
            e = self.assertRaises(ManholeError, manhole.check_keys_file, path, os.geteuid() + 1)
            manhole.check_keys_file(path)
        self.assertIn(f"--manhole-keys {path}: owned by ", str(e))
        self.assertNotIn("\n", str(e))

    def test_directory_writable_by_others(self):
        """A keys file in a directory that group or others may write is refused, naming the
        directory: they could replace the file.  With the sticky bit (as /tmp) it is accepted."""
        unsafe = os.path.join(self.directory, "unsafe")
        os.mkdir(unsafe)
        path = self.keys_file(unsafe)
        self.addCleanup(os.chmod, unsafe, 0o755)
        for mode in (0o777, 0o775, 0o757):
            os.chmod(unsafe, mode)
            e = self.assertRaises(ManholeError, manhole.check_keys_file, path)
            self.assertIn(f"its directory {unsafe} is writable by group or others", str(e))
            self.assertIn(f"mode {mode:04o}", str(e))
        os.chmod(unsafe, 0o1777)
        manhole.check_keys_file(path)
        os.chmod(unsafe, 0o755)
        manhole.check_keys_file(path)

    def test_directory_above_writable(self):
        """Every directory up to / is checked, not only the file's own."""
        inner = os.path.join(self.directory, "a", "b")
        os.makedirs(inner)
        path = self.keys_file(inner)
        os.chmod(self.directory, 0o777)
        self.addCleanup(os.chmod, self.directory, 0o755)
        e = self.assertRaises(ManholeError, manhole.check_keys_file, path)
        self.assertIn(f"its directory {self.directory} is writable", str(e))

    def test_directory_owner(self):
        """A keys file in a directory owned by someone other than root or the daemon's user is
        refused at start and at login."""
        require_root()
        theirs = os.path.join(self.directory, "theirs")
        os.mkdir(theirs)
        path = self.keys_file(theirs)
        os.chown(theirs, STRANGER_UID, -1)
        e = self.assertRaises(ManholeError, build_manhole_service, "tcp:0", path, self.directory, {},
                              MemoryReactor())
        self.assertIn(f"its directory {theirs} is owned by {STRANGER_UID}, not root", str(e))
        self.assertNotIn("\n", str(e))
        self.assertEqual(manhole.AuthorizedKeysFile(path, keys.Key.fromString).getAuthorizedKeys(b"x"), [])
        manhole.check_keys_file(path, uid=STRANGER_UID)  # the daemon's own user may own it

    def test_symlink_target_checked(self):
        """A keys file that is a symlink is judged by the file it points to and that file's
        directories too."""
        unsafe = os.path.join(self.directory, "unsafe")
        os.mkdir(unsafe)
        target = self.keys_file(unsafe)
        link = os.path.join(self.directory, "link")
        os.symlink(target, link)
        manhole.check_keys_file(link)
        os.chmod(unsafe, 0o777)
        self.addCleanup(os.chmod, unsafe, 0o755)
        e = self.assertRaises(ManholeError, manhole.check_keys_file, link)
        self.assertIn(f"its directory {unsafe} is writable", str(e))


class HostKeyTests(SynchronousTestCase):
    def setUp(self):
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        self.path = os.path.join(self.directory, manhole.HOST_KEY_NAME)

    def write_private(self, private) -> None:
        pem = private.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.TraditionalOpenSSL,
                                    serialization.NoEncryption())
        write_keys_file(self.path, pem)

    def test_generated_once(self):
        """The host key is an Ed25519 key generated into the state directory in OpenSSH format
        with mode 0600 the first time (with a log line); the same key is used afterwards."""
        observer = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        first = manhole.ensure_host_key(self.directory)
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)
        self.assertFalse(first.isPublic())
        self.assertEqual((first.type(), first.sshType()), ("Ed25519", b"ssh-ed25519"))
        with open(self.path, "rb") as f:
            self.assertTrue(f.read().startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----\n"))
        second = manhole.ensure_host_key(self.directory)
        self.assertEqual(first, second)
        self.assertEqual(os.listdir(self.directory), [manhole.HOST_KEY_NAME])
        self.assertEqual(messages(observer), [f"generated the manhole host key {self.path}"])

    def test_ecdsa_without_ed25519(self):
        """Where OpenSSL has no Ed25519 the new host key is ECDSA P-256, which conch serves."""

        def unsupported():
            raise UnsupportedAlgorithm("no ed25519 here")

        self.patch(ed25519.Ed25519PrivateKey, "generate", staticmethod(unsupported))
        key = manhole.ensure_host_key(self.directory)
        self.assertEqual(key.sshType(), b"ecdsa-sha2-nistp256")

    def test_existing_rsa_key_kept(self):
        """An RSA host key left by an earlier version is kept (known_hosts entries stay valid),
        with one log line saying how to get an Ed25519 key."""
        private = rsa.generate_private_key(public_exponent=65537, key_size=1024)
        self.write_private(private)
        observer = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        key = manhole.ensure_host_key(self.directory)
        self.assertEqual(key, keys.Key(private))
        [line] = messages(observer)
        self.assertIn("is RSA, kept", line)
        self.assertIn("remove it and restart for an Ed25519 key", line)

    def test_dsa_key_refused(self):
        """A DSA host key, which OpenSSH clients refuse, is a one-line error saying to remove it."""
        self.write_private(dsa.generate_private_key(key_size=1024))
        e = self.assertRaises(ManholeError, manhole.ensure_host_key, self.directory)
        self.assertIn("a DSA key", str(e))
        self.assertNotIn("\n", str(e))

    def test_first_key_wins(self):
        """A key file that appears while ours is being written is kept, and no temporary file is
        left behind."""
        write_keys_file(self.path, b"theirs")
        self.assertFalse(manhole._write_new_file(self.path, b"ours", 0o600))
        with open(self.path, "rb") as f:
            self.assertEqual(f.read(), b"theirs")
        self.assertEqual(os.listdir(self.directory), [manhole.HOST_KEY_NAME])

    def test_unusable_host_key(self):
        """A host key file that is not a private key is a one-line error naming it."""
        write_keys_file(self.path, b"garbage\n")
        e = self.assertRaises(ManholeError, manhole.ensure_host_key, self.directory)
        self.assertIn(self.path, str(e))
        self.assertNotIn("\n", str(e))

    def test_unwritable_state_dir(self):
        """A state directory where the key cannot be created is a one-line error."""
        missing = os.path.join(self.directory, "missing")
        e = self.assertRaises(ManholeError, manhole.ensure_host_key, missing)
        self.assertIn("cannot create it", str(e))


class RunCommandTests(SynchronousTestCase):
    """What ``ssh host 'command'`` runs."""

    def test_expression(self):
        """An expression's repr is the output, status 0; None shows nothing."""
        self.assertEqual(manhole.run_command("stats['n'] * 2", {"stats": {"n": 21}}),
                         ("42\n", "", 0, None))
        self.assertEqual(manhole.run_command("None", {}), ("", "", 0, None))

    def test_statements_then_expression(self):
        """Statements run, print() output is collected, and a final expression is shown."""
        namespace: dict = {}
        output, errors, status, pending = manhole.run_command("x = 5\nprint('x is', x); x + 1", namespace)
        self.assertEqual((output, errors, status, pending), ("x is 5\n6\n", "", 0, None))
        self.assertEqual(namespace["x"], 5)

    def test_exception(self):
        """An exception gives status 1 and its traceback (without the manhole's own frames) on
        stderr; the output printed before it is kept."""
        output, errors, status, pending = manhole.run_command("print('before'); 1 / 0", {})
        self.assertEqual((output, status, pending), ("before\n", 1, None))
        self.assertTrue(errors.startswith("Traceback (most recent call last):\n"), errors)
        self.assertIn("ZeroDivisionError: division by zero", errors)
        self.assertNotIn("manhole.py", errors)
        output, errors, status, _ = manhole.run_command("1 +", {})
        self.assertEqual((output, status), ("", 1))
        self.assertIn("SyntaxError", errors)

    def test_exit(self):
        """exit(), quit(), sys.exit() and SystemExit give their status as Python does; exit() of
        the session namespace does not close the daemon's stdin."""
        namespace = manhole.session_namespace({})
        cases = {"exit()": (0, ""), "quit(3)": (3, ""), "import sys; sys.exit(2)": (2, ""),
                 "raise SystemExit": (0, ""), "exit('bye')": (1, "bye\n")}
        for source, (status, errors) in cases.items():
            self.assertEqual(manhole.run_command(source, dict(namespace)), ("", errors, status, None),
                             source)
        self.assertEqual(repr(namespace["exit"]), "Use exit() or Ctrl-D to end the session")

    def test_deferred_and_coroutine(self):
        """For a Deferred or coroutine value a Deferred is handed back to wait on (nothing is
        shown yet) that fires with its result; the daemon's Deferred keeps its result, a failure
        included, for its own callbacks."""
        d: defer.Deferred = defer.Deferred()
        output, errors, status, pending = manhole.run_command("d", {"d": d})
        self.assertEqual((output, errors, status), ("", "", 0))
        self.assertNoResult(pending)
        d.callback(7)
        self.assertEqual(self.successResultOf(pending), 7)
        self.assertEqual(self.successResultOf(d), 7)

        async def value():
            return await task.deferLater(clock, 1, lambda: 8)

        clock = task.Clock()
        output, errors, status, awaited = manhole.run_command("value()", {"value": value})
        self.assertEqual((output, errors, status), ("", "", 0))
        clock.advance(1)
        self.assertEqual(self.successResultOf(awaited), 8)
        failing: defer.Deferred = defer.Deferred()
        pending = manhole.run_command("failing", {"failing": failing})[3]
        failing.errback(ZeroDivisionError())
        self.failureResultOf(pending, ZeroDivisionError)
        self.failureResultOf(failing, ZeroDivisionError)

    def test_session_namespace(self):
        """A session's namespace is a copy with exit and quit, where the daemon's own names win."""
        live = {"stats": Counter(), "quit": "mine"}
        names = manhole.session_namespace(live)
        self.assertIsNot(names, live)
        self.assertIs(names["stats"], live["stats"])
        self.assertEqual(names["quit"], "mine")
        self.assertRaises(SystemExit, names["exit"])

    def test_exit_status(self):
        """SystemExit codes become exit statuses as Python's own exit does."""
        self.assertEqual(manhole.exit_status(None), (0, ""))
        self.assertEqual(manhole.exit_status(5), (5, ""))
        self.assertEqual(manhole.exit_status(256 + 7), (7, ""))
        self.assertEqual(manhole.exit_status("no"), (1, "no\n"))


class ServiceTests(SynchronousTestCase):
    def setUp(self):
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        self.keys_file = write_keys_file(os.path.join(self.directory, "keys"),
                                         authorized_line(new_user_key()))

    def start(self, description: str) -> MemoryReactor:
        memory = MemoryReactor()
        service = build_manhole_service(description, self.keys_file, self.directory, {}, memory)
        self.assertTrue(IService.providedBy(service))
        service.privilegedStartService()
        service.startService()
        self.service = service
        return memory

    def test_listens_on_loopback(self):
        """The service listens on the described TCP port, on 127.0.0.1 when no interface is
        named, and serves the persistent Ed25519 host key."""
        memory = self.start("tcp:2222")
        [(port, factory, _backlog, interface)] = memory.tcpServers
        self.assertEqual((port, interface), (2222, "127.0.0.1"))
        host_key = manhole.ensure_host_key(self.directory)
        self.assertEqual(factory.privateKeys, {b"ssh-ed25519": host_key})
        self.assertEqual(factory.publicKeys, {b"ssh-ed25519": host_key.public()})
        self.assertEqual(self.service.fingerprint, fingerprint(host_key))
        # The class-level dicts of ConchFactory are left untouched.
        self.assertEqual(factory.__class__.__mro__[1].publicKeys, {})

    def test_rsa_host_key_served(self):
        """An RSA host key of an earlier version is served as ssh-rsa."""
        private = rsa.generate_private_key(public_exponent=65537, key_size=1024)
        write_keys_file(os.path.join(self.directory, manhole.HOST_KEY_NAME), private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption()))
        factory = self.start("tcp:2222").tcpServers[0][1]
        self.assertEqual(factory.privateKeys, {b"ssh-rsa": keys.Key(private)})

    def test_named_interface(self):
        """An interface the operator names is used, with a warning naming it."""
        observer = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        memory = self.start("tcp:2222:interface=0.0.0.0")
        self.assertEqual(memory.tcpServers[0][3], "0.0.0.0")
        self.assertIn("the manhole listens on 0.0.0.0, not loopback", "\n".join(messages(observer)))

    def test_plain_ipv6_interface(self):
        """interface=:: listens on :: with a warning naming ::; interface=::1 listens on ::1
        without a warning; neither is an error."""
        observer = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        memory = self.start("tcp:2222:interface=::")
        self.assertEqual(memory.tcpServers[0][3], "::")
        warnings = [formatEvent(e) for e in observer if e["log_level"] == LogLevel.warn]
        self.assertEqual(warnings, ["the manhole listens on ::, not loopback: anyone who can reach it"
                                    " may try to log in"])
        memory = self.start("tcp:2222:interface=::1")
        self.assertEqual(memory.tcpServers[0][3], "::1")
        self.assertEqual(len([e for e in observer if e["log_level"] == LogLevel.warn]), 1)

    def test_bad_description(self):
        """An endpoint description Twisted cannot parse is a one-line error."""
        e = self.assertRaises(ManholeError, build_manhole_service, "bogus:1", self.keys_file,
                              self.directory, {}, MemoryReactor())
        self.assertIn("invalid endpoint description", str(e))


# -- a real SSH client (twisted.conch) ---------------------------------------------------------


class _Session(channel.SSHChannel):
    """A session: a shell with a pty sent lines, or a command; collects what comes back."""

    name = b"session"

    def __init__(self, client: _ClientFactory, **kw) -> None:
        super().__init__(**kw)
        self.client = client

    @defer.inlineCallbacks
    def channelOpen(self, data):
        client = self.client
        for name, value in client.env:
            try:
                yield self.conn.sendRequest(self, b"env", common.NS(name) + common.NS(value),
                                            wantReply=True)
                client.env_accepted.append(name)
            except Exception:
                pass
        if client.command is not None:
            yield self.conn.sendRequest(self, b"exec", common.NS(client.command), wantReply=True)
            return
        pty = session.packRequest_pty_req(b"xterm", (25, 80, 0, 0), b"")
        yield self.conn.sendRequest(self, b"pty-req", pty, wantReply=True)
        yield self.conn.sendRequest(self, b"shell", b"", wantReply=True)
        if client.resize:
            self.conn.sendRequest(self, b"window-change",
                                  session.packRequest_window_change((50, 132, 0, 0)))
        for line in client.lines:
            self.write(line + b"\r")
        if client.eof:
            self.conn.sendEOF(self)

    def dataReceived(self, data):
        self.client.stdout += data
        done = self.client.output
        if self.client.marker is not None and self.client.marker in self.client.stdout and not done.called:
            done.callback(self.client.stdout)
            if not self.client.eof:
                self.conn.transport.loseConnection()

    def extReceived(self, dataType, data):
        self.client.stderr += data

    def request_exit_status(self, data):
        (self.client.exit_status,) = struct.unpack(">L", data)
        return 1

    def closed(self):
        self.client.closed_by_server = True
        if not self.client.output.called:
            self.client.output.callback(self.client.stdout)
        self.conn.transport.loseConnection()


class _Connection(connection.SSHConnection):
    def __init__(self, client: _ClientFactory) -> None:
        super().__init__()
        self.client = client

    def serviceStarted(self):
        super().serviceStarted()
        self.client.authenticated = True
        self.openChannel(_Session(self.client, conn=self))


class _UserAuth(userauth.SSHUserAuthClient):
    def __init__(self, user: bytes, instance, key: keys.Key) -> None:
        super().__init__(user, instance)
        self.key, self.offered = key, False

    def getPublicKey(self):
        if self.offered:
            return None
        self.offered = True
        return self.key.public()

    def getPrivateKey(self):
        return defer.succeed(self.key)

    def getPassword(self, prompt=None):
        return None  # public key only


class _ClientTransport(transport.SSHClientTransport):
    def verifyHostKey(self, hostKey, fingerprint):
        self.factory.host_key = keys.Key.fromString(hostKey)
        return defer.succeed(True)

    def connectionSecure(self):
        self.requestService(_UserAuth(b"operator", _Connection(self.factory), self.factory.key))

    def connectionLost(self, reason):
        super().connectionLost(reason)
        self.factory.lost.callback(None)


class _ClientFactory(protocol.ClientFactory):
    """One login: a shell sent ``lines`` (then end-of-file when ``eof``), or one ``command``."""

    protocol = _ClientTransport
    noisy = False

    def __init__(self, key: keys.Key, lines=(), marker: bytes | None = None, resize=False, eof=False,
                 command: bytes | None = None, env=()) -> None:
        self.key, self.lines, self.marker = key, list(lines), marker
        self.resize, self.eof, self.command, self.env = resize, eof, command, list(env)
        self.authenticated = self.closed_by_server = False
        self.host_key = self.exit_status = None
        self.stdout = self.stderr = b""
        self.env_accepted: list[bytes] = []
        self.output: defer.Deferred = defer.Deferred()
        self.lost: defer.Deferred = defer.Deferred()


class LoginTests(TestCase):
    """A real manhole on 127.0.0.1, logged into with twisted.conch's client."""

    timeout = 30

    def setUp(self):
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        self.operator = new_user_key()
        self.keys_file = write_keys_file(os.path.join(self.directory, "authorized_keys"),
                                         authorized_line(self.operator))
        self.stats = Counter()

        def later(value):
            d: defer.Deferred = defer.Deferred()
            reactor.callLater(0.01, d.callback, value)
            return d

        self.failing: list[defer.Deferred] = []

        def fails():
            # The manhole passes the failure on: the test, as its owner, handles it.
            d = task.deferLater(reactor, 0.01, lambda: 1 / 0)
            self.failing.append(d)
            return d

        self.service = build_manhole_service(
            "tcp:0", self.keys_file, self.directory,
            {"stats": self.stats, "later": later, "fails": fails}, reactor,
        )
        self.server_lost: list[defer.Deferred] = []
        build = self.service.factory.buildProtocol

        def tracked(addr):
            proto = build(addr)
            lost: defer.Deferred = defer.Deferred()
            self.server_lost.append(lost)
            original = proto.connectionLost

            def connectionLost(reason):
                original(reason)
                lost.callback(None)

            proto.connectionLost = connectionLost
            return proto

        self.service.factory.buildProtocol = tracked
        self.service.privilegedStartService()
        self.service.startService()
        self.addCleanup(self.service.stopService)
        self.observer = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)

    @defer.inlineCallbacks
    def login(self, key: keys.Key, **kw) -> defer.Deferred:
        """Connect, log in with ``key``, run the session (see :class:`_ClientFactory`); return the
        client factory when both ends have closed the connection."""
        port = self.service.port
        self.assertIsNotNone(port)
        self.assertEqual(port.getHost().host, "127.0.0.1")
        client = _ClientFactory(key, **kw)
        connector = reactor.connectTCP("127.0.0.1", port.getHost().port, client)
        self.addCleanup(connector.disconnect)
        yield client.lost
        yield defer.DeferredList(self.server_lost)
        return client

    def assertQuietLog(self) -> None:
        """On the server's side (the test client's events aside): nothing at warning level or
        above, no traceback, no conch chatter: only our lines."""
        for event in self.observer:
            if event.get("log_namespace", "").startswith("tests."):
                continue
            text = formatEvent(event)
            self.assertNotIn(event["log_level"], (LogLevel.warn, LogLevel.error, LogLevel.critical), text)
            self.assertNotIn("log_failure", event, text)
            self.assertEqual(event.get("log_namespace"), "sentrypeer.manhole", text)

    @defer.inlineCallbacks
    def test_read_live_counter(self):
        """An operator whose key is listed logs in and evaluates an expression that reads a live
        counter (changed after the manhole started); the server shows its persistent host key."""
        self.stats.received = 41
        self.stats.received += 1
        client = yield self.login(self.operator, lines=[b"'counter=%d' % (stats.received * 1000)"],
                                  marker=b"'counter=42000'")
        self.assertTrue(client.authenticated)
        output = yield client.output
        self.assertIn(b"'counter=42000'", output)
        self.assertEqual(client.host_key, manhole.ensure_host_key(self.directory).public())

    @defer.inlineCallbacks
    def test_resize_and_end_of_input(self):
        """A window resize keeps the session (conch's own session drops the connection), and
        end-of-file after piped input ends the session once the output is written, as Ctrl-D,
        with exit status 0."""
        self.stats.received = 5
        client = yield self.login(self.operator, lines=[b"stats.received + 1"], resize=True, eof=True)
        self.assertIn(b"\r\n6\r\n", client.stdout)
        self.assertTrue(client.closed_by_server)
        self.assertEqual(client.exit_status, 0)
        self.assertQuietLog()

    @defer.inlineCallbacks
    def test_exit_ends_session(self):
        """exit(), quit(), raise SystemExit and sys.exit() end the session as Ctrl-D does: exit
        status 0, no traceback or error in the daemon's log, the lines before them run."""
        for line in (b"exit()", b"quit()", b"raise SystemExit", b"import sys; sys.exit()"):
            client = yield self.login(self.operator, lines=[b"stats.received = 9", line])
            self.assertTrue(client.closed_by_server, line)
            self.assertEqual(client.exit_status, 0, line)
        self.assertEqual(self.stats.received, 9)
        self.assertFalse(os.sys.stdin.closed)
        self.assertQuietLog()

    @defer.inlineCallbacks
    def test_exit_status_given(self):
        """exit(3) ends the session with exit status 3; exit('message') shows the message and
        gives 1, as Python does; the end undoes the terminal's insert mode without clearing the
        operator's screen (conch's full reset would)."""
        client = yield self.login(self.operator, lines=[b"exit(3)"])
        self.assertEqual(client.exit_status, 3)
        client = yield self.login(self.operator, lines=[b"exit('bye now')"])
        self.assertEqual(client.exit_status, 1)
        self.assertTrue(client.stdout.endswith(b"\r\nbye now\r\n\x1b[4l"), client.stdout[-60:])

    @defer.inlineCallbacks
    def test_command(self):
        """ssh host 'expression' (an exec request) prints the expression's repr, without colours
        or prompt, and ends with exit status 0."""
        self.stats.received = 21
        client = yield self.login(self.operator, command=b"stats.received * 2")
        self.assertEqual((client.stdout, client.stderr, client.exit_status), (b"42\n", b"", 0))
        self.assertQuietLog()

    @defer.inlineCallbacks
    def test_command_exception(self):
        """A command that raises gives its traceback on stderr and exit status 1."""
        client = yield self.login(self.operator, command=b"stats.missing")
        self.assertEqual((client.stdout, client.exit_status), (b"", 1))
        self.assertIn(b"AttributeError: 'Counter' object has no attribute 'missing'", client.stderr)
        self.assertQuietLog()

    @defer.inlineCallbacks
    def test_command_deferred(self):
        """A command whose value is a Deferred shows its result once it fires (status 0), or the
        failure (status 1)."""
        client = yield self.login(self.operator, command=b"later({'n': 1})")
        self.assertEqual((client.stdout, client.exit_status), (b"{'n': 1}\n", 0))
        client = yield self.login(self.operator, command=b"fails()")
        self.assertEqual((client.stdout, client.exit_status), (b"", 1))
        self.assertIn(b"ZeroDivisionError", client.stderr)
        [failing] = self.failing
        self.failureResultOf(failing, ZeroDivisionError)

    @defer.inlineCallbacks
    def test_environment_accepted(self):
        """Environment variables (ssh's SendEnv LANG LC_*) are accepted and ignored, without a
        warning in the log, for a shell and for a command."""
        env = [(b"LANG", b"C.UTF-8"), (b"LC_ALL", b"C")]
        client = yield self.login(self.operator, lines=[b"1 + 1"], eof=True, env=env)
        self.assertEqual(client.env_accepted, [b"LANG", b"LC_ALL"])
        self.assertEqual(client.exit_status, 0)
        client = yield self.login(self.operator, command=b"1 + 1", env=env)
        self.assertEqual((client.env_accepted, client.stdout), ([b"LANG", b"LC_ALL"], b"2\n"))
        self.assertQuietLog()

    @defer.inlineCallbacks
    def test_login_logged(self):
        """Each login is one info line naming the user, the key's fingerprint and the peer; the
        rest of conch's chatter (kex, channels, moduli, disconnection) stays out of the log."""
        client = yield self.login(self.operator, lines=[b"1"], eof=True)
        self.assertEqual(client.exit_status, 0)
        logged = messages(self.observer)
        self.assertEqual(len(logged), 1, logged)
        self.assertRegex(logged[0], r"^manhole login: user 'operator' from 127\.0\.0\.1:\d+, key Ed25519 "
                         + fingerprint(self.operator).replace("+", r"\+") + "$")
        self.assertQuietLog()

    @defer.inlineCallbacks
    def test_wrong_key_refused(self):
        """A key that is not in the keys file is refused: no session is opened."""
        client = yield self.login(new_user_key(), lines=[b"1 + 1"], marker=b"2")
        self.assertFalse(client.authenticated)
        self.assertFalse(client.output.called)
        client.output.addErrback(lambda f: None)

    @defer.inlineCallbacks
    def test_refusals_logged_once_a_minute(self):
        """A refused login is one info line naming the user, the peer and the key; further ones
        from that address within a minute are counted and reported with the next line."""
        clock = task.Clock()
        self.service.factory.refusals = manhole._Throttle(clock)
        stranger = new_user_key()
        for _ in range(3):
            client = yield self.login(stranger, lines=[b"1"])
            self.assertFalse(client.authenticated)
            client.output.addErrback(lambda f: None)
        clock.advance(60)
        client = yield self.login(stranger, lines=[b"1"])
        client.output.addErrback(lambda f: None)
        logged = messages(self.observer)
        self.assertEqual(len(logged), 2, logged)
        expected = (r"^manhole login refused: user 'operator' from 127\.0\.0\.1:\d+, key Ed25519 "
                    + fingerprint(stranger).replace("+", r"\+") + " not authorized")
        self.assertRegex(logged[0], expected + "$")
        self.assertRegex(logged[1], expected + r" \(2 more refused from this address not logged\)$")
        self.assertQuietLog()

    @defer.inlineCallbacks
    def test_key_added_without_restart(self):
        """A key appended to the keys file while the manhole runs may log in at once."""
        newcomer = new_user_key()
        with open(self.keys_file, "ab") as f:
            f.write(authorized_line(newcomer))
        client = yield self.login(newcomer, lines=[b"'x' * 3"], marker=b"'xxx'")
        self.assertTrue(client.authenticated)


# -- OpenSSH's client --------------------------------------------------------------------------


class _Process(protocol.ProcessProtocol):
    def __init__(self, stdin: bytes) -> None:
        self.stdin, self.out, self.err = stdin, b"", b""
        self.ended: defer.Deferred = defer.Deferred()

    def connectionMade(self):
        self.transport.write(self.stdin)
        self.transport.closeStdin()

    def outReceived(self, data):
        self.out += data

    def errReceived(self, data):
        self.err += data

    def processEnded(self, reason):
        self.ended.callback(reason.value.exitCode)


class OpenSSHTests(TestCase):
    """The manhole as operators and scripts use it: with OpenSSH's ssh."""

    timeout = 60

    def setUp(self):
        self.ssh = require_tool("ssh")
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        operator = new_user_key()
        self.identity = write_keys_file(os.path.join(self.directory, "id_ed25519"),
                                        operator.toString("openssh", subtype="v1"))
        self.keys_file = write_keys_file(os.path.join(self.directory, "authorized_keys"),
                                         authorized_line(operator))
        self.known_hosts = os.path.join(self.directory, "known_hosts")
        self.stats = Counter()
        self.service = build_manhole_service("tcp:0", self.keys_file, self.directory,
                                             {"stats": self.stats}, reactor)
        self.service.privilegedStartService()
        self.service.startService()
        self.addCleanup(self.service.stopService)
        self.observer = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)

    def run_ssh(self, *args: str, stdin: bytes = b"") -> defer.Deferred:
        """Run ssh against the manhole; fires with (exit status, stdout, stderr)."""
        process = _Process(stdin)
        argv = [self.ssh, "-F", "/dev/null", "-p", str(self.service.port.getHost().port),
                "-i", self.identity, "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes",
                "-o", "StrictHostKeyChecking=accept-new", "-o", f"UserKnownHostsFile={self.known_hosts}",
                "-o", "GlobalKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR",
                "-o", "SetEnv=LANG=C.UTF-8 LC_ALL=C", *args]
        reactor.spawnProcess(process, self.ssh, argv, env={"PATH": "/usr/bin:/bin", "HOME": self.directory})
        return process.ended.addCallback(lambda status: (status, process.out, process.err))

    @defer.inlineCallbacks
    def test_command_and_scripted_shell(self):
        """ssh host 'expression' prints the plain repr with exit status 0 (1 on an exception);
        printf '...\\r' | ssh -tt host (the scripted shell) ends with exit status 0; the host key
        is Ed25519; the log has one line per login and no warning (ssh sends environment
        variables)."""
        self.stats.received = 7
        status, out, err = yield self.run_ssh("admin@127.0.0.1", "stats.received * 6")
        self.assertEqual((status, out), (0, b"42\n"), err)
        status, out, err = yield self.run_ssh("admin@127.0.0.1", "stats.nothing")
        self.assertEqual((status, out), (1, b""))
        self.assertIn(b"AttributeError", err)
        status, out, err = yield self.run_ssh("-tt", "admin@127.0.0.1", stdin=b"stats.received + 1\r")
        self.assertEqual(status, 0, out + err)
        self.assertIn(b"\r\n8\r\n", out)
        status, out, err = yield self.run_ssh("-tt", "admin@127.0.0.1", stdin=b"exit(5)\r")
        self.assertEqual(status, 5, out + err)
        with open(self.known_hosts, "rb") as f:
            self.assertIn(b" ssh-ed25519 ", f.read())
        logged = messages(self.observer)
        self.assertEqual(len(logged), 4, logged)
        self.assertTrue(all(line.startswith("manhole login: user 'admin' from 127.0.0.1:")
                            for line in logged), logged)
        self.assertEqual([formatEvent(e) for e in self.observer], logged)
