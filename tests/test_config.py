"""Tests for :mod:`sentrypeer.config`: precedence, strict values, the config file (interface.md §2)."""

import dataclasses
import os

from twisted.trial.unittest import SynchronousTestCase

from sentrypeer.config import (
    DEFAULT_CONFIG_PATH,
    DEFAULT_SIP_LISTEN,
    SETTINGS,
    Config,
    ConfigError,
    from_options,
)
from sentrypeer.endpoints import ListenSpec


class ConfigTestMixin:
    """Helpers: write a TOML file, resolve with no home directory unless asked."""

    def write_toml(self, text: str) -> str:
        path = self.mktemp()
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        return path

    def resolve(self, options=None, environ=None, toml=None, home=None) -> Config:
        options = dict(options or {})
        if toml is not None:
            options["config-file"] = self.write_toml(toml)
        return from_options(options, environ or {}, home=home)

    def assertConfigError(self, *fragments, **kwargs) -> str:
        """Resolve with ``kwargs``, expect a one-line ConfigError containing every fragment."""
        e = self.assertRaises(ConfigError, self.resolve, **kwargs)
        message = str(e)
        self.assertNotIn("\n", message)
        for fragment in fragments:
            self.assertIn(fragment, message)
        return message


class DefaultsTests(ConfigTestMixin, SynchronousTestCase):
    """With nothing given, every setting has the built-in default of interface.md §2."""

    def test_defaults(self):
        """The defaults of the interface table, and no config file, no warnings."""
        config = self.resolve()
        self.assertEqual(config.db_file, "sentrypeer.db")
        self.assertIs(config.json_log, False)
        self.assertEqual(config.json_log_file, "sentrypeer_json.log")
        self.assertEqual(config.bootstrap_node, "bootstrap.sentrypeer.org:4222")
        self.assertEqual(config.dht_port, 4222)
        self.assertEqual(config.dht_network, 0)
        self.assertIsNone(config.oauth2_client_id)
        self.assertEqual(config.oauth2_token_url, "https://authz.sentrypeer.com/oauth/token")
        self.assertIsNone(config.webhook_url)
        self.assertEqual(config.api_listen, "tcp:8082:interface=127.0.0.1")
        self.assertEqual(config.sip_listen, DEFAULT_SIP_LISTEN)
        self.assertEqual(
            config.sip_listen,
            (ListenSpec("udp", 5060, "::"), ListenSpec("tcp", 5060, "::"),
             ListenSpec("tls", 5061, "::")),
        )
        self.assertEqual((config.cert, config.key), ("cert.pem", "key.pem"))
        self.assertIsNone(config.tls_listen_address)
        self.assertIsNone(config.manhole)
        self.assertEqual(config.max_tcp_connections, 1024)
        self.assertEqual(config.tcp_idle_timeout, 30.0)
        self.assertEqual(config.write_queue_size, 100000)
        self.assertEqual(config.write_queue_bytes, 32 * 1024 * 1024)
        self.assertEqual(config.reply_rate, 10.0)
        self.assertEqual(config.retention_days, 0)
        self.assertEqual(config.syslog_socket, "/dev/log")
        self.assertIsNone(config.dht_bind)
        self.assertEqual(config.dht_put_rate, 10.0)
        for flag in ("p2p", "api", "sip_responsive", "sip_disable", "syslog", "verbose", "debug",
                     "syslog_peers", "dht_sign", "dht_peer_discovery", "show_node_key"):
            self.assertIs(getattr(config, flag), False, flag)
        self.assertIsNone(config.config_file)
        self.assertEqual(config.warnings, ())

    def test_fieldsMatchTable(self):
        """Config has one field per setting, named as its config key, plus config_file/warnings."""
        names = [f.name for f in dataclasses.fields(Config)]
        self.assertEqual(names, [s.name for s in SETTINGS] + ["config_file", "warnings"])

    def test_frozen(self):
        """A Config cannot be changed after resolution."""
        config = self.resolve()
        self.assertRaises(dataclasses.FrozenInstanceError, setattr, config, "db_file", "x")


class PrecedenceTests(ConfigTestMixin, SynchronousTestCase):
    """Command line > SENTRYPEER_* variable > config file > default, per setting."""

    def check_layers(self, name, option, cli, env_name, env, toml, expected):
        """Check ``name`` through all four layers: default, file, env over file, CLI over env."""
        default = getattr(self.resolve(), name)
        file_only = self.resolve(toml=toml)
        self.assertEqual(getattr(file_only, name), expected["file"])
        self.assertNotEqual(expected["file"], default)
        env_and_file = self.resolve(environ={env_name: env}, toml=toml)
        self.assertEqual(getattr(env_and_file, name), expected["env"])
        everything = self.resolve(options={option: cli}, environ={env_name: env}, toml=toml)
        self.assertEqual(getattr(everything, name), expected["cli"])
        cli_only = self.resolve(options={option: cli})
        self.assertEqual(getattr(cli_only, name), expected["cli"])

    def test_textSetting(self):
        """db_file: -f beats SENTRYPEER_DB_FILE beats db_file in the file beats sentrypeer.db."""
        self.check_layers(
            "db_file", "db-file", "cli.db", "SENTRYPEER_DB_FILE", "env.db",
            'db_file = "file.db"\n', {"file": "file.db", "env": "env.db", "cli": "cli.db"},
        )

    def test_intSetting(self):
        """dht_port: --dht-port beats SENTRYPEER_DHT_PORT beats dht_port beats 4222."""
        self.check_layers(
            "dht_port", "dht-port", "4001", "SENTRYPEER_DHT_PORT", "4002", "dht_port = 4003\n",
            {"file": 4003, "env": 4002, "cli": 4001},
        )

    def test_floatSetting(self):
        """tcp_idle_timeout (seconds): the four layers, with a TOML integer taken as a float."""
        self.check_layers(
            "tcp_idle_timeout", "tcp-idle-timeout", "1.5", "SENTRYPEER_TCP_IDLE_TIMEOUT", "2.5",
            "tcp_idle_timeout = 3\n", {"file": 3.0, "env": 2.5, "cli": 1.5},
        )

    def test_boolSetting(self):
        """verbose: the file enables, the variable disables, the -v flag enables again."""
        toml = "verbose = true\n"
        self.assertIs(self.resolve(toml=toml).verbose, True)
        self.assertIs(self.resolve(toml=toml, environ={"SENTRYPEER_VERBOSE": "off"}).verbose,
                      False)
        self.assertIs(
            self.resolve(options={"verbose": 1}, toml=toml,
                         environ={"SENTRYPEER_VERBOSE": "off"}).verbose,
            True,
        )

    def test_flagNotGivenDoesNotShadow(self):
        """A flag left at usage.Options' 0 or None is "not given": the variable decides."""
        for absent in (0, None, False):
            config = self.resolve(options={"api": absent}, environ={"SENTRYPEER_API": "yes"})
            self.assertIs(config.api, True)

    def test_listenSetting(self):
        """sip_listen: --sip beats SENTRYPEER_SIP_LISTEN beats the sip_listen array."""
        self.check_layers(
            "sip_listen", "sip", ["udp:1"], "SENTRYPEER_SIP_LISTEN", "udp:2",
            'sip_listen = ["udp:3"]\n',
            {"file": (ListenSpec("udp", 3),), "env": (ListenSpec("udp", 2),),
             "cli": (ListenSpec("udp", 1),)},
        )

    def test_p2pVariableName(self):
        """-p's variable is SENTRYPEER_PEER_TO_PEER (the original's name), its key p2p."""
        self.assertIs(self.resolve(environ={"SENTRYPEER_PEER_TO_PEER": "1"}).p2p, True)
        self.assertIs(self.resolve(toml="p2p = true\n").p2p, True)

    def test_tlsTrioFromOriginalConfigFile(self):
        """The original's three config keys (cert, key, tls_listen_address) still work."""
        config = self.resolve(
            toml='cert = "c.pem"\nkey = "k.pem"\ntls_listen_address = "0.0.0.0:5061"\n'
        )
        self.assertEqual((config.cert, config.key), ("c.pem", "k.pem"))
        self.assertEqual(config.sip_listen[-1], ListenSpec("tls", 5061, "0.0.0.0"))

    def test_overriddenLayersStillValidated(self):
        """A bad value is an error even where a higher layer overrides it."""
        self.assertConfigError(
            "SENTRYPEER_DHT_PORT",
            options={"dht-port": "5000"}, environ={"SENTRYPEER_DHT_PORT": "huge"},
        )
        self.assertConfigError("dht_port", options={"dht-port": "5000"}, toml="dht_port = -1\n")


class BooleanVariableTests(ConfigTestMixin, SynchronousTestCase):
    """Boolean variables are strict (interface.md §2; the original took any value as "on")."""

    def test_trueWords(self):
        """1, true, yes, on enable, in any case and with surrounding blanks."""
        for value in ("1", "true", "TRUE", "True", "yes", "YES", "on", "On", " yes "):
            config = self.resolve(environ={"SENTRYPEER_DEBUG": value})
            self.assertIs(config.debug, True, value)

    def test_falseWords(self):
        """0, false, no, off disable, in any case; 0 no longer enables (reference §1.3)."""
        for value in ("0", "false", "FALSE", "no", "No", "off", "OFF"):
            config = self.resolve(environ={"SENTRYPEER_DEBUG": value}, toml="debug = true\n")
            self.assertIs(config.debug, False, value)

    def test_otherValuesRejected(self):
        """Any other value is an error naming the variable and the value."""
        for value in ("2", "enabled", "y", "t", "-1", "yes please"):
            self.assertConfigError(
                "SENTRYPEER_SIP_RESPONSIVE", repr(value),
                environ={"SENTRYPEER_SIP_RESPONSIVE": value},
            )

    def test_emptyIsUnsetWithWarning(self):
        """An empty (or blank) variable counts as unset and adds a warning naming it."""
        for value in ("", "  "):
            config = self.resolve(environ={"SENTRYPEER_API": value}, toml="api = true\n")
            self.assertIs(config.api, True)
            self.assertEqual(len(config.warnings), 1)
            self.assertIn("SENTRYPEER_API", config.warnings[0])
            self.assertIn("empty", config.warnings[0])

    def test_emptyTextVariable(self):
        """An empty text variable is also unset (with a warning), not an empty path."""
        config = self.resolve(environ={"SENTRYPEER_DB_FILE": ""})
        self.assertEqual(config.db_file, "sentrypeer.db")
        self.assertIn("SENTRYPEER_DB_FILE", config.warnings[0])

    def test_unknownVariableWarning(self):
        """A SENTRYPEER_* variable nothing reads (e.g. the original's dead ones) gets a warning."""
        config = self.resolve(environ={"SENTRYPEER_TLS_DISABLE": "1", "HOME": "/nonexistent",
                                       "OTHER": "x"})
        self.assertEqual(len(config.warnings), 1)
        self.assertIn("SENTRYPEER_TLS_DISABLE", config.warnings[0])


class ConfigFileTests(ConfigTestMixin, SynchronousTestCase):
    """The TOML config file: where it is found, and what it may hold."""

    def test_explicitFileRecorded(self):
        """The file named by -g is loaded and recorded in config_file."""
        path = self.write_toml('db_file = "x.db"\n')
        config = self.resolve(options={"config-file": path})
        self.assertEqual(config.config_file, path)
        self.assertEqual(config.db_file, "x.db")

    def test_fileFromVariable(self):
        """Without -g, SENTRYPEER_CONFIG_FILE names the file; -g wins over it."""
        env_path = self.write_toml('db_file = "env.db"\n')
        cli_path = self.write_toml('db_file = "cli.db"\n')
        environ = {"SENTRYPEER_CONFIG_FILE": env_path}
        self.assertEqual(self.resolve(environ=environ).db_file, "env.db")
        config = self.resolve(options={"config-file": cli_path}, environ=environ)
        self.assertEqual(config.db_file, "cli.db")

    def test_defaultFileUsedWhenPresent(self):
        """~/.config/sentrypeer/default-config.toml is read when it exists."""
        home = self.mktemp()
        path = os.path.join(home, DEFAULT_CONFIG_PATH)
        os.makedirs(os.path.dirname(path))
        with open(path, "w") as f:
            f.write("retention_days = 7\n")
        config = self.resolve(home=home)
        self.assertEqual(config.retention_days, 7)
        self.assertEqual(config.config_file, path)
        self.assertEqual(self.resolve(environ={"HOME": home}).retention_days, 7)

    def test_defaultFileMissing(self):
        """A missing default file is no error, and is never created."""
        home = self.mktemp()
        config = self.resolve(home=home)
        self.assertIsNone(config.config_file)
        self.assertFalse(os.path.exists(home))

    def test_explicitFileMissing(self):
        """A file named by -g or the variable that cannot be read is an error naming it."""
        missing = self.mktemp()
        self.assertConfigError("-g/--config-file", missing, options={"config-file": missing})
        self.assertConfigError(
            "SENTRYPEER_CONFIG_FILE", missing, environ={"SENTRYPEER_CONFIG_FILE": missing}
        )

    def test_emptyFileOption(self):
        """``-g ''`` is an error, not "no file"."""
        self.assertConfigError("-g/--config-file", options={"config-file": ""})

    def test_badToml(self):
        """A file that is not valid TOML is an error naming the file."""
        message = self.assertConfigError("not valid TOML", toml="db_file = \n")
        self.assertIn("-g/--config-file", message)

    def test_unknownKey(self):
        """An unknown key is an error naming the key, with a suggestion when one is close."""
        self.assertConfigError("'db_flie'", "did you mean 'db_file'", toml='db_flie = "x"\n')
        self.assertConfigError("'zzz'", toml="zzz = 1\n")

    def test_nonFileKeysRejected(self):
        """Settings without a config key (show_node_key, config_file) are unknown keys."""
        self.assertConfigError("'show_node_key'", toml="show_node_key = true\n")
        self.assertConfigError("'config_file'", toml='config_file = "x"\n')

    def test_tableRejected(self):
        """A TOML table is an unknown key: every setting is top level."""
        self.assertConfigError("'sip'", toml="[sip]\nport = 5060\n")

    def test_wrongTypes(self):
        """A value of the wrong TOML type is an error naming the key."""
        for toml, key in (
            ('dht_port = "4222"\n', "dht_port"),
            ("dht_port = true\n", "dht_port"),
            ('api = "yes"\n', "api"),
            ("api = 1\n", "api"),
            ("db_file = 5\n", "db_file"),
            ('sip_listen = "udp:5060"\n', "sip_listen"),
            ("sip_listen = [5060]\n", "sip_listen"),
            ('tcp_idle_timeout = "30"\n', "tcp_idle_timeout"),
            ("tcp_idle_timeout = nan\n", "tcp_idle_timeout"),
        ):
            self.assertConfigError(key, toml=toml)


class ValueTests(ConfigTestMixin, SynchronousTestCase):
    """Values are checked: ranges, URLs, addresses, descriptions."""

    def test_ranges(self):
        """Ports, counts, timeouts, retention and queue bytes have their documented bounds."""
        bad = {
            "dht-port": ["65536", "-1"],
            "dht-network": ["-1", "4294967296"],
            "max-tcp-connections": ["0"],
            "write-queue-size": ["0"],
            "write-queue-bytes": ["1023"],
            "tcp-idle-timeout": ["0", "-1", "nan", "inf", "soon"],
            "reply-rate": ["0"],
            "dht-put-rate": ["-2"],
            "retention-days": ["-1", "1.5"],
        }
        for option, values in bad.items():
            for value in values:
                self.assertConfigError(f"--{option}", options={option: value})
        good = {"dht-port": "0", "write-queue-bytes": "1024", "retention-days": "0",
                "reply-rate": "0.5", "dht-network": "4294967295"}
        config = self.resolve(options=good)
        self.assertEqual((config.dht_port, config.write_queue_bytes, config.retention_days,
                          config.reply_rate, config.dht_network), (0, 1024, 0, 0.5, 4294967295))

    def test_emptyOptionValue(self):
        """An empty option argument is an error, not an empty path."""
        self.assertConfigError("-f/--db-file", options={"db-file": ""})

    def test_urls(self):
        """-w and --oauth2-token-url must be http(s) URLs."""
        self.assertConfigError("-w/--webhook-url", options={"webhook-url": "localhost:4000"})
        self.assertConfigError("SENTRYPEER_OAUTH2_TOKEN_URL",
                               environ={"SENTRYPEER_OAUTH2_TOKEN_URL": "ftp://x/token"})
        config = self.resolve(options={"webhook-url": "http://localhost:4000/api/events"})
        self.assertEqual(config.webhook_url, "http://localhost:4000/api/events")

    def test_invalidUrls(self):
        """-w and --oauth2-token-url (any layer) reject an invalid or zero port, white space and
        control characters, an unparsable host and a missing host, with a one-line ConfigError
        naming the option; valid URLs (IPv6 literal, user info, IDN host, port) are kept as
        given."""
        bad = [
            "http://127.0.0.1:99999/x",
            "http://127.0.0.1:18190/a b",
            "http://127.0.0.1:0/x",
            "http://127.0.0.1:8o/x",
            "http://h:80:90/",
            "http://[::1/x",
            "http://[::g]/x",
            "http://:80/x",
            "http://a..b/x",
            "http://ex<ample/x",
            "http://h/\tx",
            "http://h/x\n",
            "http://h/\x7f",
            "http://h/\u2028",
        ]
        for value in bad:
            self.assertConfigError("-w/--webhook-url", options={"webhook-url": value})
            self.assertConfigError("--oauth2-token-url", options={"oauth2-token-url": value})
        self.assertConfigError("SENTRYPEER_WEBHOOK_URL",
                               environ={"SENTRYPEER_WEBHOOK_URL": "http://127.0.0.1:99999/x"})
        self.assertConfigError("oauth2_token_url",
                               toml='oauth2_token_url = "https://auth.example/a b"\n')
        good = [
            "http://127.0.0.1:18190/a",
            "https://[::1]:8443/api/events",
            "https://user:pw@collector.example/x?key=1",
            "http://collector_1:8080/",
            "http://b\u00fccher.example/events",
            "http://127.0.0.1:65535/",
        ]
        for value in good:
            config = self.resolve(options={"webhook-url": value, "oauth2-token-url": value})
            self.assertEqual((config.webhook_url, config.oauth2_token_url), (value, value))

    def test_dhtBind(self):
        """--dht-bind must be an IP address."""
        self.assertEqual(self.resolve(options={"dht-bind": "::"}).dht_bind, "::")
        self.assertConfigError("--dht-bind", options={"dht-bind": "eth0"})

    def test_bootstrapNode(self):
        """-b takes host[:port]; the text is kept as given."""
        config = self.resolve(options={"bootstrap-node": "dht.example.org"})
        self.assertEqual(config.bootstrap_node, "dht.example.org")
        self.assertConfigError("-b/--bootstrap-node", options={"bootstrap-node": "x:99999"})

    def test_badListenDescription(self):
        """A bad --sip description is an error naming the option and the description."""
        self.assertConfigError("--sip", "'udp:x'", options={"sip": ["udp:x"]})
        self.assertConfigError("SENTRYPEER_SIP_LISTEN", environ={"SENTRYPEER_SIP_LISTEN":
                                                                  "udp:5060 sctp:5060"})

    def test_emptyListenArray(self):
        """An empty sip_listen array is an error (-R is how SIP is turned off)."""
        self.assertConfigError("sip_listen", "-R", toml="sip_listen = []\n")

    def test_duplicateListener(self):
        """The same listener twice is an error (the second bind would fail)."""
        self.assertConfigError(
            "SENTRYPEER_SIP_LISTEN", "twice",
            environ={"SENTRYPEER_SIP_LISTEN": "udp:5060 udp:5060:interface=::"},
        )


class DerivedSettingsTests(ConfigTestMixin, SynchronousTestCase):
    """Settings that depend on others: -l, -i/-c, --sip, -z, cert/key."""

    def test_jsonLogFileEnablesJsonLog(self):
        """The JSON log file, set by option, variable or file key, enables the JSON log."""
        for kwargs in (
            {"options": {"json-log-file": "/var/log/sp.json"}},
            {"environ": {"SENTRYPEER_JSON_LOG_FILE": "/var/log/sp.json"}},
            {"toml": 'json_log_file = "/var/log/sp.json"\n'},
            {"options": {"json-log-file": "/var/log/sp.json"},
             "environ": {"SENTRYPEER_JSON_LOG": "0"}},
        ):
            config = self.resolve(**kwargs)
            self.assertIs(config.json_log, True, kwargs)
            self.assertEqual(config.json_log_file, "/var/log/sp.json")

    def test_jsonLogOff(self):
        """Without -j or -l the JSON log stays off."""
        self.assertIs(self.resolve().json_log, False)
        self.assertIs(self.resolve(options={"json-log": 1}).json_log, True)

    def test_clientIdWithoutSecret(self):
        """-i without -c is an error naming both options and where -i came from."""
        self.assertConfigError(
            "-i/--oauth2-client-id", "-c/--oauth2-client-secret",
            options={"oauth2-client-id": "id"},
        )
        self.assertConfigError(
            "SENTRYPEER_OAUTH2_CLIENT_ID", "-c/--oauth2-client-secret",
            environ={"SENTRYPEER_OAUTH2_CLIENT_ID": "id"},
        )

    def test_secretWithoutClientId(self):
        """-c without -i is an error too."""
        self.assertConfigError(
            "oauth2_client_secret in", "-i/--oauth2-client-id",
            toml='oauth2_client_secret = "s"\n',
        )

    def test_clientIdAndSecret(self):
        """-i and -c together, from any layers, are accepted."""
        config = self.resolve(options={"oauth2-client-id": "id"},
                              environ={"SENTRYPEER_OAUTH2_CLIENT_SECRET": "s"})
        self.assertEqual((config.oauth2_client_id, config.oauth2_client_secret), ("id", "s"))

    def test_noOtherPairings(self):
        """-b without -p, -l without -j, -t without -k/-z are fine (the original's clap refused)."""
        config = self.resolve(options={"bootstrap-node": "h:1", "json-log-file": "x",
                                       "tls-cert": "c.pem"})
        self.assertEqual((config.cert, config.key), ("c.pem", "key.pem"))

    def test_sipReplacesDefaults(self):
        """The --sip list replaces the default listeners, in the order given."""
        config = self.resolve(options={"sip": ["tcp:5070:interface=127.0.0.1", "udp:5070"]})
        self.assertEqual(config.sip_listen, (ListenSpec("tcp", 5070, "127.0.0.1"),
                                             ListenSpec("udp", 5070, "::")))

    def test_sipListenVariable(self):
        """SENTRYPEER_SIP_LISTEN is a space-separated list."""
        config = self.resolve(environ={"SENTRYPEER_SIP_LISTEN":
                                       "udp:5060  tcp:5060:interface=\\:\\:1\ttls:0"})
        self.assertEqual(config.sip_listen, (ListenSpec("udp", 5060), ListenSpec("tcp", 5060, "::1"),
                                             ListenSpec("tls", 0)))

    def test_tlsListenAddressIPv4(self):
        """-z ADDR:PORT replaces the tls: entry in place."""
        config = self.resolve(options={"tls-listen-address": "0.0.0.0:5062"})
        self.assertEqual(config.sip_listen, (ListenSpec("udp", 5060), ListenSpec("tcp", 5060),
                                             ListenSpec("tls", 5062, "0.0.0.0")))
        self.assertEqual(config.tls_listen_address, "0.0.0.0:5062")

    def test_tlsListenAddressIPv6(self):
        """-z [ADDR]:PORT replaces the tls: entry with an IPv6 interface."""
        config = self.resolve(environ={"SENTRYPEER_TLS_LISTEN_ADDRESS": "[::1]:5063"},
                              options={"sip": ["tls:5061", "udp:5060"]})
        self.assertEqual(config.sip_listen, (ListenSpec("tls", 5063, "::1"),
                                             ListenSpec("udp", 5060)))

    def test_tlsListenAddressAdded(self):
        """With no tls: entry in the list, -z adds one."""
        config = self.resolve(options={"sip": ["udp:5060"]},
                              toml='tls_listen_address = "localhost:5061"\n')
        self.assertEqual(config.sip_listen, (ListenSpec("udp", 5060),
                                             ListenSpec("tls", 5061, "127.0.0.1")))

    def test_tlsListenAddressOneTls(self):
        """Several tls: entries collapse into the one -z names, at the first one's place."""
        config = self.resolve(options={"sip": ["tls:1", "udp:2", "tls:3"],
                                       "tls-listen-address": "127.0.0.1:4"})
        self.assertEqual(config.sip_listen, (ListenSpec("tls", 4, "127.0.0.1"),
                                             ListenSpec("udp", 2)))

    def test_tlsListenAddressBad(self):
        """A -z host name other than localhost, or a missing port, is an error naming -z."""
        self.assertConfigError("-z/--tls-listen-address", "'sip.example.com'",
                               options={"tls-listen-address": "sip.example.com:5061"})
        self.assertConfigError("-z/--tls-listen-address",
                               options={"tls-listen-address": "0.0.0.0"})

    def test_certKeyNextToDatabase(self):
        """cert.pem and key.pem default to the database file's directory."""
        config = self.resolve(options={"db-file": "/var/lib/sentrypeer/sentrypeer.db"})
        self.assertEqual(config.cert, "/var/lib/sentrypeer/cert.pem")
        self.assertEqual(config.key, "/var/lib/sentrypeer/key.pem")
        config = self.resolve(environ={"SENTRYPEER_DB_FILE": "data/sp.db",
                                       "SENTRYPEER_KEY": "/etc/sp/key.pem"})
        self.assertEqual((config.cert, config.key), ("data/cert.pem", "/etc/sp/key.pem"))
