"""Tests for :mod:`sentrypeer.tap` (Options, makeService), :mod:`sentrypeer.cli` and ``-m``."""

import io
import os
import runpy
import sys
import types

from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

import sentrypeer.cli
from sentrypeer import __version__
from sentrypeer.config import SETTINGS, from_options
from sentrypeer.endpoints import ListenSpec
from sentrypeer.tap import Options, makeService


def parse(argv, environ=None):
    """Parse ``argv`` with ``environ`` (default: empty, so the test's environment is ignored)."""
    options = Options()
    options.environ = environ or {}
    options.parseOptions(argv)
    return options


class ServiceStubMixin:
    """Replace ``sentrypeer.service`` attributes for one test.

    The real module is patched when it imports; otherwise (it is written in parallel and may be
    missing or half-done) a stand-in module is installed in ``sys.modules`` for the test.
    """

    def stub_service(self, **attributes):
        try:
            import sentrypeer.service as module
        except ImportError:
            module = types.ModuleType("sentrypeer.service")
            module.__dict__.update(attributes)
            sys.modules["sentrypeer.service"] = module
            self.addCleanup(sys.modules.pop, "sentrypeer.service", None)
            return
        for name, value in attributes.items():
            self.patch(module, name, value)


class OptionsTests(SynchronousTestCase):
    """The command line: the original's letters, our long names, nothing recorded by default."""

    def test_nothingGiven(self):
        """Unused options stay None, so they never shadow a variable or a config key."""
        options = parse([])
        for setting in SETTINGS:
            self.assertIsNone(options[setting.option], setting.option)
        self.assertIsNone(options["config-file"])
        self.assertEqual(options.config, from_options({}, {}))

    def test_shortLetters(self):
        """Each of the original's short options maps to its long option (reference §1.1)."""
        expected = {
            "f": "db-file", "j": "json-log", "l": "json-log-file", "p": "p2p",
            "b": "bootstrap-node", "i": "oauth2-client-id", "c": "oauth2-client-secret",
            "w": "webhook-url", "a": "api", "r": "sip-responsive", "R": "sip-disable",
            "t": "tls-cert", "k": "tls-key", "z": "tls-listen-address", "g": "config-file",
            "s": "syslog", "v": "verbose", "d": "debug", "V": "version", "h": "help",
        }
        options = Options()
        for short, long in expected.items():
            self.assertEqual(options.synonyms[short], long, short)
        letters = {key for key in options.synonyms if len(key) == 1}
        self.assertEqual(letters, set(expected))

    def test_configKeysAsDocumented(self):
        """Config keys are the long option names with underscores, except as --help says."""
        exceptions = {"cert": "tls-cert", "key": "tls-key", "sip_listen": "sip"}
        for setting in SETTINGS:
            if setting.in_file:
                expected = exceptions.get(setting.name, setting.name.replace("_", "-"))
                self.assertEqual(setting.option, expected)
        self.assertIn("sip_listen", Options().longdesc)

    def test_everyOption(self):
        """Every long option of interface.md §2 reaches its Config field."""
        argv = [
            "--db-file", "a.db", "--json-log", "--json-log-file", "j.log", "--p2p",
            "--bootstrap-node", "h:1", "--dht-port", "4300", "--dht-network", "7",
            "--oauth2-client-id", "id", "--oauth2-client-secret", "secret",
            "--oauth2-token-url", "https://t/", "--webhook-url", "https://w/", "--api",
            "--api-listen", "tcp:9000", "--sip-responsive", "--sip-disable",
            "--sip", "udp:5070", "--tls-cert", "c.pem", "--tls-key", "k.pem",
            "--tls-listen-address", "127.0.0.1:5071", "--syslog", "--verbose", "--debug",
            "--manhole", "tcp:2222:interface=127.0.0.1", "--manhole-keys", "keys",
            "--api-token", "tok", "--syslog-peers", "--sip-persona", "asterisk",
            "--dht-trusted-nodes", "trusted", "--dht-sign", "--blocklist-exclude", "excl",
            "--max-tcp-connections", "5", "--tcp-idle-timeout", "2.5",
            "--write-queue-size", "6", "--write-queue-bytes", "2048", "--reply-rate", "3",
            "--retention-days", "9", "--syslog-socket", "/run/log", "--dht-bind", "127.0.0.1",
            "--dht-peer-discovery", "--dht-put-rate", "4",
        ]  # --show-node-key is an action (prints and exits): see test_showNodeKey
        config = parse(argv).config
        self.assertEqual(
            dict(
                db_file="a.db", json_log=True, json_log_file="j.log", p2p=True,
                bootstrap_node="h:1", dht_port=4300, dht_network=7, oauth2_client_id="id",
                oauth2_client_secret="secret", oauth2_token_url="https://t/",
                webhook_url="https://w/", api=True, api_listen="tcp:9000", sip_responsive=True,
                sip_disable=True,
                sip_listen=(ListenSpec("udp", 5070), ListenSpec("tls", 5071, "127.0.0.1")),
                cert="c.pem", key="k.pem", tls_listen_address="127.0.0.1:5071", syslog=True,
                verbose=True, debug=True, manhole="tcp:2222:interface=127.0.0.1",
                manhole_keys="keys", api_token="tok", syslog_peers=True, sip_persona="asterisk",
                dht_trusted_nodes="trusted", dht_sign=True, blocklist_exclude="excl",
                max_tcp_connections=5, tcp_idle_timeout=2.5, write_queue_size=6,
                write_queue_bytes=2048, reply_rate=3.0, retention_days=9,
                syslog_socket="/run/log", dht_bind="127.0.0.1", dht_peer_discovery=True,
                dht_put_rate=4.0, show_node_key=False, config_file=None, warnings=(),
            ),
            vars(config),
        )

    def test_bundledFlags(self):
        """``-draps`` sets debug, responsive, API, P2P and syslog, as in the original."""
        config = parse(["-draps"]).config
        for name in ("debug", "sip_responsive", "api", "p2p", "syslog"):
            self.assertIs(getattr(config, name), True, name)
        self.assertIs(config.verbose, False)

    def test_bundledWithArguments(self):
        """``-jar -f DB -l FILE`` (the README's Docker example) parses."""
        config = parse(["-jar", "-f", "/var/log/sp/sp.db", "-l", "/var/log/sp/sp.json"]).config
        self.assertEqual((config.json_log, config.api, config.sip_responsive), (True, True, True))
        self.assertEqual(config.db_file, "/var/log/sp/sp.db")
        self.assertEqual(config.json_log_file, "/var/log/sp/sp.json")
        self.assertEqual(config.cert, "/var/log/sp/cert.pem")

    def test_sipRepeatable(self):
        """``--sip`` may be repeated; the list replaces the default listeners."""
        options = parse(["--sip", "udp:5070", "--sip=tcp:5070:interface=::1"])
        self.assertEqual(options["sip"], ["udp:5070", "tcp:5070:interface=::1"])
        self.assertEqual(options.config.sip_listen,
                         (ListenSpec("udp", 5070), ListenSpec("tcp", 5070, "::1")))

    def test_environmentUsed(self):
        """The ``environ`` attribute supplies variables for options not given."""
        options = parse(["-d"], environ={"SENTRYPEER_DB_FILE": "env.db",
                                         "SENTRYPEER_API": "true"})
        self.assertEqual(options.config.db_file, "env.db")
        self.assertIs(options.config.api, True)
        self.assertEqual(parse(["-f", "cli.db"], environ={"SENTRYPEER_DB_FILE": "env.db"})
                         .config.db_file, "cli.db")

    def test_configErrorIsUsageError(self):
        """A configuration problem surfaces as usage.UsageError with the same one-line message."""
        e = self.assertRaises(usage.UsageError, parse, ["-i", "id"])
        self.assertIn("-c/--oauth2-client-secret", str(e))
        e = self.assertRaises(usage.UsageError, parse, [], {"SENTRYPEER_DEBUG": "maybe"})
        self.assertIn("SENTRYPEER_DEBUG", str(e))

    def test_unknownOption(self):
        """An unknown option, or a stray argument, is a usage error."""
        self.assertRaises(usage.UsageError, parse, ["-N"])
        self.assertRaises(usage.UsageError, parse, ["extra"])

    def test_version(self):
        """``-V`` and ``--version`` print ``sentrypeer 5.0.0`` to stdout and exit 0."""
        for flag in ("-V", "--version"):
            stdout = io.StringIO()
            self.patch(sys, "stdout", stdout)
            e = self.assertRaises(SystemExit, parse, [flag])
            self.assertEqual(e.code, 0)
            self.assertEqual(stdout.getvalue(), f"sentrypeer {__version__}\n")
        self.assertEqual(__version__, "5.0.0")

    def test_help(self):
        """``-h`` and ``--help`` print the usage, the about line first, to stdout and exit 0."""
        for flag in ("-h", "--help"):
            stdout = io.StringIO()
            self.patch(sys, "stdout", stdout)
            e = self.assertRaises(SystemExit, parse, [flag])
            self.assertEqual(e.code, 0)
            self.assertTrue(stdout.getvalue().startswith("Protect your SIP Servers"))
            self.assertIn("--db-file", stdout.getvalue())
            self.assertIn("SENTRYPEER_SIP_LISTEN", stdout.getvalue())


class MakeServiceTests(ServiceStubMixin, SynchronousTestCase):
    """``makeService`` hands the resolved Config to ``sentrypeer.service.build_service``."""

    def test_delegates(self):
        """build_service gets options.config and the given reactor; its service is returned."""
        calls = []
        root = object()

        def build_service(config, reactor):
            calls.append((config, reactor))
            return root

        self.stub_service(build_service=build_service)
        options = parse(["-R"])
        reactor = object()
        self.assertIs(makeService(options, reactor), root)
        self.assertEqual(calls, [(options.config, reactor)])


class CommandLineTests(ServiceStubMixin, SynchronousTestCase):
    """``sentrypeer.cli.main``: the console script's streams and exit statuses."""

    def setUp(self):
        self.stdout = io.StringIO()
        self.stderr = io.StringIO()
        self.patch(sys, "stdout", self.stdout)
        self.patch(sys, "stderr", self.stderr)
        self.patch(Options, "environ", {})
        self.runs = []

        def run(config):
            self.runs.append(config)
            return 0

        self.stub_service(run=run)

    def test_help(self):
        """``-h`` prints the usage to stdout, nothing to stderr, returns 0 and runs nothing."""
        self.assertEqual(sentrypeer.cli.main(["-h"]), 0)
        self.assertTrue(self.stdout.getvalue().startswith("Protect your SIP Servers"))
        self.assertIn("Usage: sentrypeer [options]", self.stdout.getvalue())
        self.assertEqual(self.stderr.getvalue(), "")
        self.assertEqual(self.runs, [])

    def test_version(self):
        """``-V`` prints ``sentrypeer 5.0.0`` to stdout and returns 0."""
        self.assertEqual(sentrypeer.cli.main(["-V"]), 0)
        self.assertEqual(self.stdout.getvalue(), "sentrypeer 5.0.0\n")
        self.assertEqual(self.runs, [])

    def test_showNodeKey(self):
        """``--show-node-key`` prints this node's Ed25519 public key (base64 of 32 raw bytes),
        creating the pair next to the database once, returns 0 and starts nothing."""
        import base64

        directory = self.mktemp()
        os.makedirs(directory)
        db = os.path.join(directory, "sentrypeer.db")
        self.assertEqual(sentrypeer.cli.main(["--show-node-key", "-f", db]), 0)
        first = self.stdout.getvalue().strip()
        self.assertEqual(len(base64.b64decode(first, validate=True)), 32)
        self.assertEqual(sentrypeer.cli.main(["--show-node-key", "-f", db]), 0)
        self.assertEqual(self.stdout.getvalue().split(), [first, first])
        self.assertEqual(self.runs, [])

    def test_usageError(self):
        """An unknown option: ``sentrypeer: <problem>`` then the usage on stderr, status 2."""
        self.assertEqual(sentrypeer.cli.main(["--bogus"]), 2)
        first, rest = self.stderr.getvalue().split("\n", 1)
        self.assertTrue(first.startswith("sentrypeer: "), first)
        self.assertIn("bogus", first)
        self.assertIn("--db-file", rest)
        self.assertNotIn("Traceback", self.stderr.getvalue())
        self.assertEqual(self.stdout.getvalue(), "")
        self.assertEqual(self.runs, [])

    def test_configError(self):
        """A bad variable is a usage error too: one line naming it, status 2, no traceback."""
        self.patch(Options, "environ", {"SENTRYPEER_API": "sometimes"})
        self.assertEqual(sentrypeer.cli.main([]), 2)
        first = self.stderr.getvalue().split("\n", 1)[0]
        self.assertTrue(first.startswith("sentrypeer: SENTRYPEER_API: "), first)
        self.assertNotIn("Traceback", self.stderr.getvalue())

    def test_runs(self):
        """Valid options run the service with the resolved Config and return its status."""
        self.stub_service(run=lambda config: self.runs.append(config) or 3)
        self.assertEqual(sentrypeer.cli.main(["-d", "-f", "x.db"]), 3)
        [config] = self.runs
        self.assertEqual((config.debug, config.db_file), (True, "x.db"))

    def test_argvDefault(self):
        """Without an argument, main parses ``sys.argv[1:]``."""
        self.patch(sys, "argv", ["sentrypeer", "-V"])
        self.assertEqual(sentrypeer.cli.main(), 0)
        self.assertEqual(self.stdout.getvalue(), "sentrypeer 5.0.0\n")

    def test_moduleMain(self):
        """``python3 -m sentrypeer`` exits with main()'s status."""
        self.patch(sentrypeer.cli, "main", lambda: 7)
        e = self.assertRaises(SystemExit, runpy.run_module, "sentrypeer", run_name="__main__")
        self.assertEqual(e.code, 7)
