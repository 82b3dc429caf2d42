"""Tests for the SSH manhole: keys file checks, the host key, loopback, and a real login."""

from __future__ import annotations

import os
import stat

from cryptography.hazmat.primitives.asymmetric import ed25519
from twisted.application.service import IService
from twisted.conch.ssh import channel, connection, keys, session, transport, userauth
from twisted.internet import defer, protocol, reactor
from twisted.internet.testing import EventLoggingObserver, MemoryReactor
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from sentrypeer import manhole
from sentrypeer.manhole import ManholeError, build_manhole_service

#: A small host key keeps the tests fast (the default, 4096 bits, takes a second or more).
SMALL_KEY = 1024


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
        for text in ("tcp:2222:interface=0.0.0.0", "tcp:2222:interface=\\:\\:1", "unix:/run/x.sock"):
            self.assertEqual(manhole.loopback_description(text), text)
        self.assertEqual(manhole.named_interface("tcp:2222:interface=\\:\\:1"), "::1")
        self.assertIsNone(manhole.named_interface("unix:/run/x.sock"))

    def test_is_loopback(self):
        """127.0.0.0/8, ::1 and localhost are loopback; 0.0.0.0, :: and names are not."""
        for host in ("127.0.0.1", "127.3.4.5", "::1", "localhost"):
            self.assertTrue(manhole.is_loopback(host), host)
        for host in ("0.0.0.0", "::", "192.0.2.1", "example.org"):
            self.assertFalse(manhole.is_loopback(host), host)

    def test_empty_description(self):
        """An empty --manhole description is refused."""
        self.assertRaises(ManholeError, manhole.loopback_description, " ")


class AuthorizedKeysTests(SynchronousTestCase):
    def setUp(self):
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)

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

    def test_no_keys_file(self):
        """Without --manhole-keys the manhole refuses to start, with one line naming the option."""
        e = self.assertRaises(ManholeError, build_manhole_service, "tcp:0", None, self.directory, {},
                              MemoryReactor(), host_key_size=SMALL_KEY)
        self.assertIn("--manhole-keys", str(e))
        self.assertNotIn("\n", str(e))

    def test_missing_keys_file(self):
        """A keys file that does not exist is a one-line error naming it and the cause."""
        path = os.path.join(self.directory, "nope")
        e = self.assertRaises(ManholeError, build_manhole_service, "tcp:0", path, self.directory, {},
                              MemoryReactor(), host_key_size=SMALL_KEY)
        self.assertEqual(str(e), f"--manhole-keys {path}: No such file or directory")

    def test_keys_file_without_keys(self):
        """A keys file with no usable key is refused: nobody could log in."""
        path = write_keys_file(os.path.join(self.directory, "keys"), b"# nobody yet\n")
        e = self.assertRaises(ManholeError, build_manhole_service, "tcp:0", path, self.directory, {},
                              MemoryReactor(), host_key_size=SMALL_KEY)
        self.assertIn("no usable public key", str(e))

    def test_writable_keys_file(self):
        """A group- or world-writable keys file is refused, as OpenSSH's StrictModes does."""
        path = write_keys_file(os.path.join(self.directory, "keys"), authorized_line(new_user_key()),
                               mode=0o620)
        e = self.assertRaises(ManholeError, build_manhole_service, "tcp:0", path, self.directory, {},
                              MemoryReactor(), host_key_size=SMALL_KEY)
        self.assertIn("writable by group or others", str(e))

    def test_keys_file_is_directory(self):
        """A directory given as the keys file is refused."""
        e = self.assertRaises(ManholeError, build_manhole_service, "tcp:0", self.directory,
                              self.directory, {}, MemoryReactor(), host_key_size=SMALL_KEY)
        self.assertIn("not a regular file", str(e))


class HostKeyTests(SynchronousTestCase):
    def setUp(self):
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)

    def test_generated_once(self):
        """The host key is generated into the state directory with mode 0600 the first time and
        the same key is used afterwards."""
        first = manhole.ensure_host_key(self.directory, SMALL_KEY)
        path = os.path.join(self.directory, manhole.HOST_KEY_NAME)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        self.assertFalse(first.isPublic())
        self.assertEqual(first.size(), SMALL_KEY)
        second = manhole.ensure_host_key(self.directory, SMALL_KEY)
        self.assertEqual(first, second)
        self.assertEqual(os.listdir(self.directory), [manhole.HOST_KEY_NAME])

    def test_first_key_wins(self):
        """A key file that appears while ours is being written is kept, and no temporary file is
        left behind."""
        path = os.path.join(self.directory, manhole.HOST_KEY_NAME)
        write_keys_file(path, b"theirs")
        self.assertFalse(manhole._write_new_file(path, b"ours", 0o600))
        with open(path, "rb") as f:
            self.assertEqual(f.read(), b"theirs")
        self.assertEqual(os.listdir(self.directory), [manhole.HOST_KEY_NAME])

    def test_unusable_host_key(self):
        """A host key file that is not a private key is a one-line error naming it."""
        path = os.path.join(self.directory, manhole.HOST_KEY_NAME)
        write_keys_file(path, b"garbage\n")
        e = self.assertRaises(ManholeError, manhole.ensure_host_key, self.directory, SMALL_KEY)
        self.assertIn(path, str(e))
        self.assertNotIn("\n", str(e))

    def test_unwritable_state_dir(self):
        """A state directory where the key cannot be created is a one-line error."""
        missing = os.path.join(self.directory, "missing")
        e = self.assertRaises(ManholeError, manhole.ensure_host_key, missing, SMALL_KEY)
        self.assertIn("cannot create it", str(e))


class ServiceTests(SynchronousTestCase):
    def setUp(self):
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        self.keys_file = write_keys_file(os.path.join(self.directory, "keys"),
                                         authorized_line(new_user_key()))

    def test_listens_on_loopback(self):
        """The service listens on the described TCP port, on 127.0.0.1 when no interface is
        named, and advertises the persistent RSA host key."""
        memory = MemoryReactor()
        service = build_manhole_service("tcp:2222", self.keys_file, self.directory, {}, memory,
                                        host_key_size=SMALL_KEY)
        self.assertTrue(IService.providedBy(service))
        service.privilegedStartService()
        service.startService()
        [(port, factory, _backlog, interface)] = memory.tcpServers
        self.assertEqual((port, interface), (2222, "127.0.0.1"))
        host_key = manhole.ensure_host_key(self.directory, SMALL_KEY)
        self.assertEqual(factory.privateKeys, {b"ssh-rsa": host_key})
        self.assertEqual(factory.publicKeys, {b"ssh-rsa": host_key.public()})
        self.assertTrue(service.fingerprint.startswith("SHA256:"))
        # The class-level dicts of ConchFactory are left untouched.
        self.assertEqual(type(factory).publicKeys, {})

    def test_named_interface(self):
        """An interface the operator names is used."""
        memory = MemoryReactor()
        service = build_manhole_service("tcp:2222:interface=0.0.0.0", self.keys_file, self.directory,
                                        {}, memory, host_key_size=SMALL_KEY)
        service.privilegedStartService()
        self.assertEqual(memory.tcpServers[0][3], "0.0.0.0")

    def test_bad_description(self):
        """An endpoint description Twisted cannot parse is a one-line error."""
        e = self.assertRaises(ManholeError, build_manhole_service, "bogus:1", self.keys_file,
                              self.directory, {}, MemoryReactor(), host_key_size=SMALL_KEY)
        self.assertIn("invalid endpoint description", str(e))


# -- a real SSH client (twisted.conch) ---------------------------------------------------------


class _Session(channel.SSHChannel):
    """A shell session with a pty; sends one line and collects output until ``marker``."""

    name = b"session"

    def __init__(self, client: _ClientFactory, **kw) -> None:
        super().__init__(**kw)
        self.client = client
        self.output = b""

    @defer.inlineCallbacks
    def channelOpen(self, data):
        pty = session.packRequest_pty_req(b"xterm", (25, 80, 0, 0), b"")
        yield self.conn.sendRequest(self, b"pty-req", pty, wantReply=True)
        yield self.conn.sendRequest(self, b"shell", b"", wantReply=True)
        if self.client.resize:
            self.conn.sendRequest(self, b"window-change",
                                  session.packRequest_window_change((50, 132, 0, 0)))
        self.write(self.client.line + b"\r")
        if self.client.eof:
            self.conn.sendEOF(self)

    def dataReceived(self, data):
        self.output += data
        done = self.client.output
        if self.client.marker in self.output and not done.called:
            done.callback(self.output)
            if not self.client.eof:
                self.conn.transport.loseConnection()

    def closed(self):
        self.client.closed_by_server = True
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
    protocol = _ClientTransport

    def __init__(self, key: keys.Key, line: bytes, marker: bytes, resize=False, eof=False) -> None:
        self.key, self.line, self.marker = key, line, marker
        self.resize, self.eof = resize, eof
        self.authenticated = self.closed_by_server = False
        self.host_key = None
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
        self.service = build_manhole_service(
            "tcp:0", self.keys_file, self.directory, {"stats": self.stats}, reactor,
            host_key_size=SMALL_KEY,
        )
        self.server_lost: list[defer.Deferred] = []
        build = self.service.factory.buildProtocol

        def tracked(addr):
            proto = build(addr)
            lost = defer.Deferred()
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

    @defer.inlineCallbacks
    def login(self, key: keys.Key, line: bytes, marker: bytes, **kw) -> defer.Deferred:
        """Connect, log in with ``key``, send ``line``; return the client factory when both ends
        have closed the connection."""
        port = self.service.port
        self.assertIsNotNone(port)
        self.assertEqual(port.getHost().host, "127.0.0.1")
        client = _ClientFactory(key, line, marker, **kw)
        connector = reactor.connectTCP("127.0.0.1", port.getHost().port, client)
        self.addCleanup(connector.disconnect)
        yield client.lost
        yield defer.DeferredList(self.server_lost)
        return client

    @defer.inlineCallbacks
    def test_read_live_counter(self):
        """An operator whose key is listed logs in and evaluates an expression that reads a live
        counter (changed after the manhole started); the server shows its persistent host key."""
        self.stats.received = 41
        self.stats.received += 1
        client = yield self.login(self.operator, b"'counter=%d' % (stats.received * 1000)",
                                  b"'counter=42000'")
        self.assertTrue(client.authenticated)
        output = yield client.output
        self.assertIn(b"'counter=42000'", output)
        self.assertEqual(client.host_key, manhole.ensure_host_key(self.directory, SMALL_KEY).public())

    @defer.inlineCallbacks
    def test_resize_and_end_of_input(self):
        """A window resize keeps the session (conch's own session drops the connection), and
        end-of-file after piped input ends the session once the output is written, as Ctrl-D."""
        self.stats.received = 5
        client = yield self.login(self.operator, b"stats.received + 1", b"\r\n6\r\n", resize=True, eof=True)
        output = yield client.output
        self.assertIn(b"\r\n6\r\n", output)
        self.assertTrue(client.closed_by_server)

    @defer.inlineCallbacks
    def test_wrong_key_refused(self):
        """A key that is not in the keys file is refused: no session is opened."""
        client = yield self.login(new_user_key(), b"1 + 1", b"2")
        self.assertFalse(client.authenticated)
        self.assertFalse(client.output.called)
        client.output.addErrback(lambda f: None)

    @defer.inlineCallbacks
    def test_key_added_without_restart(self):
        """A key appended to the keys file while the manhole runs may log in at once."""
        newcomer = new_user_key()
        with open(self.keys_file, "ab") as f:
            f.write(authorized_line(newcomer))
        client = yield self.login(newcomer, b"'x' * 3", b"'xxx'")
        self.assertTrue(client.authenticated)


