"""Tests for the Debian packaging files: the unit, /etc/default/sentrypeer and the interface agree.

The end-to-end check (build, lintian, install, run under a read-only root, purge) is
``make deb-check``; these tests pin down the files themselves, fast and without root.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

from twisted.trial.unittest import SynchronousTestCase

from sentrypeer import __version__, config
from sentrypeer.tap import Options

from .support import require_tool

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEBIAN = os.path.join(ROOT, "debian")
#: The interface contract, beside the checkout (as laid out for developers and CI).
INTERFACE = os.path.join(os.path.dirname(ROOT), "shared", "spec", "interface.md")

STATE_DIR = "/var/lib/sentrypeer"
LOGS_DIR = "/var/log/sentrypeer"
#: The variables the package's default file sets; every other one is documented commented out.
SET_IN_DEFAULT = {
    "SENTRYPEER_DB_FILE": f"{STATE_DIR}/sentrypeer.db",
    "SENTRYPEER_JSON_LOG_FILE": f"{LOGS_DIR}/sentrypeer.json",
    "SENTRYPEER_MANHOLE_KEYS": "/etc/sentrypeer/manhole_authorized_keys",
}
#: A line systemd's EnvironmentFile= and sh's "." read alike: NAME=word or NAME="words", nothing
#: that either would expand or unescape.
_ASSIGNMENT = re.compile(r'([A-Z][A-Z0-9_]*)=("[^"$`\\]*"|[^\s"\'$`\\]*)')


def read(*parts: str) -> str:
    with open(os.path.join(DEBIAN, *parts), encoding="utf-8") as f:
        return f.read()


def parse_default(text: str) -> tuple[dict[str, str], dict[str, str]]:
    """Return (set variables, commented-out example variables) of an environment file.

    :raises ValueError: on a line that is neither a comment nor a simple assignment.
    """
    active: dict[str, str] = {}
    examples: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        target = active
        if line.startswith("#"):
            target, line = examples, line[1:]
            if not _ASSIGNMENT.fullmatch(line):
                continue  # prose
        match = _ASSIGNMENT.fullmatch(line)
        if match is None:
            raise ValueError(f"line {number} is not NAME=value: {line!r}")
        name, value = match.groups()
        if name in target:
            raise ValueError(f"line {number}: {name} given twice")
        target[name] = value[1:-1] if value.startswith('"') else value
    return active, examples


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """Return ``{section: {key: [values...]}}`` of a systemd unit file."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key, []).append(value)
    return sections


def interface_variables() -> list[str]:
    """The SENTRYPEER_* variables of interface.md §2, or [] when the spec is not beside the tree."""
    try:
        with open(INTERFACE, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        return []
    section = text.split("## 2.", 1)[1].split("\n## 3.", 1)[0]
    return sorted(set(re.findall(r"SENTRYPEER_[A-Z0-9_]+", section)))


class DefaultFileTests(SynchronousTestCase):
    def setUp(self):
        self.active, self.examples = parse_default(read("sentrypeer.default"))

    def test_syntax(self):
        """Every line is a comment or a plain NAME=value that systemd and sh read alike, and the
        original's OPTIONS line for extra flags is kept."""
        self.assertIn("OPTIONS", self.active)
        self.assertRegex(read("sentrypeer.default"), re.compile(r"^OPTIONS=", re.MULTILINE))

    def test_paths(self):
        """The database goes to the state directory and the JSON log to the logs directory; the
        manhole keys file is the package's default; nothing else is set."""
        self.assertEqual({k: v for k, v in self.active.items() if k != "OPTIONS"}, SET_IN_DEFAULT)

    def test_every_variable_documented(self):
        """Every SENTRYPEER_* variable of interface.md §2 and of the code is in the file: the ones
        set above, every other one commented out."""
        wanted = set(interface_variables()) | set(config.ENV_NAMES)
        self.assertGreater(len(wanted), 40)
        self.assertEqual(sorted(wanted - set(self.active) - set(self.examples)), [])
        self.assertEqual(sorted(set(self.examples) - wanted), [])
        self.assertEqual(sorted(set(self.examples) & set(self.active)), [])

    def test_interface_and_code_agree(self):
        """The variables read by the code are those of interface.md §2 (when the spec is beside
        the checkout)."""
        documented = interface_variables()
        if documented:
            self.assertEqual(sorted(config.ENV_NAMES), documented)

    def test_defaults_resolve(self):
        """As the service's environment, the file and its OPTIONS give a valid configuration: the
        database, TLS pair and JSON log where the unit lets the service write, no warnings."""
        options = Options()
        options.environ = self.active
        options.home = self.mktemp()
        options.parseOptions(self.active["OPTIONS"].split())
        resolved = options.config
        self.assertEqual(resolved.db_file, f"{STATE_DIR}/sentrypeer.db")
        self.assertEqual((resolved.cert, resolved.key),
                         (f"{STATE_DIR}/cert.pem", f"{STATE_DIR}/key.pem"))
        self.assertTrue(resolved.json_log)
        self.assertEqual(resolved.json_log_file, f"{LOGS_DIR}/sentrypeer.json")
        self.assertEqual(resolved.api_listen, "tcp:8082:interface=127.0.0.1")
        self.assertTrue(resolved.api)
        self.assertEqual(resolved.warnings, ())

    def test_examples_are_valid(self):
        """Each commented example, uncommented, is a valid value (the config file one aside: it
        names a file to read)."""
        environ = {k: v for k, v in self.examples.items() if k != config.CONFIG_FILE_ENV}
        environ.update(self.active)
        resolved = config.from_options({}, environ, home=self.mktemp())
        self.assertEqual(resolved.warnings, ())
        self.assertEqual(resolved.manhole, "tcp:2222:interface=127.0.0.1")


class UnitTests(SynchronousTestCase):
    def setUp(self):
        self.unit = parse_unit(read("sentrypeer.service"))
        self.service = self.unit["Service"]

    def value(self, key: str) -> str:
        values = self.service.get(key)
        self.assertIsNotNone(values, f"{key}= missing")
        self.assertEqual(len(values), 1, f"{key}= given {len(values)} times")
        return values[0]

    def test_exec_start(self):
        """twistd3 in the foreground, no pid file, log to stdout (the journal), the sentrypeer
        plugin with the default file's OPTIONS (interface.md §1)."""
        self.assertEqual(self.value("ExecStart"),
                         "/usr/bin/twistd3 --nodaemon --pidfile= --logfile=- sentrypeer $OPTIONS")
        self.assertEqual(self.value("Type"), "simple")

    def test_user_and_directories(self):
        """Runs as sentrypeer in its state directory; systemd creates the state and log
        directories, which hold the default file's database and JSON log."""
        self.assertEqual(self.value("User"), "sentrypeer")
        self.assertEqual(self.value("Group"), "sentrypeer")
        self.assertEqual(self.value("WorkingDirectory"), STATE_DIR)
        self.assertEqual(self.value("StateDirectory"), "sentrypeer")
        self.assertEqual(self.value("LogsDirectory"), "sentrypeer")
        self.assertEqual(self.value("EnvironmentFile"), "-/etc/default/sentrypeer")
        active, _ = parse_default(read("sentrypeer.default"))
        self.assertEqual(os.path.dirname(active["SENTRYPEER_DB_FILE"]),
                         "/var/lib/" + self.value("StateDirectory"))
        self.assertEqual(os.path.dirname(active["SENTRYPEER_JSON_LOG_FILE"]),
                         "/var/log/" + self.value("LogsDirectory"))

    def test_restart_and_limits(self):
        """Restarted on failure, but not on exit status 1 or 2 (a start-up failure a restart would
        repeat every 5 s forever); crashes (signals) still restart; a file limit above
        --max-tcp-connections' default."""
        self.assertEqual(self.value("Restart"), "on-failure")
        prevented = self.value("RestartPreventExitStatus").split()
        self.assertEqual(sorted(prevented), ["1", "2"])
        self.assertTrue(all(status.isdigit() for status in prevented), "no signal may be listed")
        self.assertEqual(self.value("LimitNOFILE"), "65536")
        self.assertGreater(int(self.value("LimitNOFILE")),
                           config.SETTINGS_BY_NAME["max_tcp_connections"].default)
        self.assertEqual(self.unit["Install"]["WantedBy"], ["multi-user.target"])

    def test_hardening(self):
        """The hardening settings the issue asks for are all there, with those values."""
        for key in ("NoNewPrivileges", "ProtectHome", "PrivateTmp", "PrivateDevices",
                    "ProtectKernelTunables", "ProtectKernelModules", "ProtectKernelLogs",
                    "ProtectControlGroups", "RestrictNamespaces", "LockPersonality"):
            self.assertEqual(self.value(key), "yes", key)
        self.assertEqual(self.value("ProtectSystem"), "strict")
        self.assertEqual(self.value("CapabilityBoundingSet"), "")
        self.assertEqual(set(self.value("RestrictAddressFamilies").split()),
                         {"AF_INET", "AF_INET6", "AF_UNIX", "AF_NETLINK"})
        self.assertEqual(self.service["SystemCallFilter"][0], "@system-service")
        for later in self.service["SystemCallFilter"][1:]:
            self.assertTrue(later.startswith("~"), "later filters may only take calls away")

    def test_start_up_failure_not_restarted(self):
        """A permanent configuration error (an unusable manhole keys file) makes the service's
        command exit with a status the unit does not restart on, after one line saying why."""
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        environment = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": ROOT,
                       "HOME": directory, "LANG": "C.UTF-8"}
        command = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
                   "--nodaemon", "--pidfile=", "--logfile=-", "sentrypeer", "-R",
                   "-f", os.path.join(directory, "sentrypeer.db"),
                   "--manhole", "tcp:0", "--manhole-keys", os.path.join(directory, "missing")]
        result = subprocess.run(command, cwd=directory, env=environment, capture_output=True,
                                text=True, timeout=120)
        self.assertIn(str(result.returncode), self.value("RestartPreventExitStatus").split(),
                      result.stdout[-600:] + result.stderr[-600:])
        self.assertIn("--manhole-keys", result.stdout)
        self.assertNotIn("Traceback", result.stdout + result.stderr)

    def test_security_rating(self):
        """systemd-analyze security --offline rates the unit's exposure at most 3.0, and the unit's
        comment and README.Debian state the rating it measures (run where systemd-analyze is
        installed; make deb-check runs it too)."""
        tool = require_tool("systemd-analyze")
        directory = self.mktemp()
        os.makedirs(directory)
        unit = os.path.join(directory, "sentrypeer.service")
        shutil.copy(os.path.join(DEBIAN, "sentrypeer.service"), unit)
        result = subprocess.run([tool, "security", "--offline=true", "--threshold=30", unit],
                                capture_output=True, text=True, timeout=60)
        self.assertEqual(result.returncode, 0, result.stdout[-400:] + result.stderr)
        rating = re.search(r"Overall exposure level for \S+: (\d+\.\d)", result.stdout)
        self.assertIsNotNone(rating, result.stdout[-400:])
        self.assertLessEqual(float(rating.group(1)), 3.0)
        for name in ("sentrypeer.service", "README.Debian"):
            stated = re.findall(r"rates its\s+exposure (\d\.\d)", read(name))
            self.assertEqual(stated, [rating.group(1)], name)


class PackageTests(SynchronousTestCase):
    def control(self) -> dict[str, str]:
        fields: dict[str, str] = {}
        for paragraph in read("control").split("\n\n"):
            for match in re.finditer(r"^([A-Za-z-]+):(.*(?:\n[ \t].*)*)", paragraph, re.MULTILINE):
                fields.setdefault(match.group(1), " ".join(match.group(2).split()))
        return fields

    def relations(self, field: str) -> set[str]:
        value = self.control()[field]
        return {re.sub(r"\s*\(.*\)", "", r).strip() for r in value.split(",") if r.strip()}

    def test_control(self):
        """debhelper 13 with pybuild; Debian's own Twisted stack as dependencies; OpenDHT
        recommended, Fail2ban suggested."""
        fields = self.control()
        self.assertIn("debhelper-compat (= 13)", fields["Build-Depends"])
        self.assertLessEqual({"dh-python", "pybuild-plugin-pyproject", "python3-setuptools"},
                             self.relations("Build-Depends"))
        self.assertLessEqual({"python3-twisted", "python3-openssl", "python3-service-identity",
                              "python3-cryptography", "python3-treq", "adduser"},
                             self.relations("Depends"))
        self.assertIn("python3-opendht", self.relations("Recommends"))
        self.assertIn("fail2ban", self.relations("Suggests"))
        self.assertEqual(fields["Architecture"], "all")

    def test_rules_triggers_format(self):
        """dh with python3 and pybuild; the plugin cache trigger; quilt source format."""
        self.assertIn("dh $@ --with python3 --buildsystem=pybuild", read("rules"))
        self.assertTrue(os.access(os.path.join(DEBIAN, "rules"), os.X_OK))
        self.assertEqual(read("sentrypeer.triggers").split(), ["activate-noawait", "twisted-plugins-cache"])
        self.assertEqual(read("source", "format").strip(), "3.0 (quilt)")

    def test_changelog_version(self):
        """The package version is the program's, revision 1, above the original's 4.x."""
        first = read("changelog").splitlines()[0]
        self.assertRegex(first, r"^sentrypeer \([^)]+\) \S+; urgency=\w+$")
        version = first.split("(")[1].split(")")[0]
        self.assertEqual(version, f"{__version__}-1")
        self.assertEqual(version, "5.0.0-1")

    def test_maintainer_scripts(self):
        """postinst creates the system user; postrm removes state, logs and user on purge only;
        both are valid sh and keep the #DEBHELPER# token."""
        for name in ("sentrypeer.postinst", "sentrypeer.postrm"):
            subprocess.run(["sh", "-n", os.path.join(DEBIAN, name)], check=True)
            self.assertIn("#DEBHELPER#", read(name))
        postinst = read("sentrypeer.postinst")
        self.assertIn("adduser --system --group", postinst)
        postrm = read("sentrypeer.postrm")
        purge = postrm.split("    purge)", 1)[1].split(";;", 1)[0]
        self.assertIn(f"rm -rf {STATE_DIR} {LOGS_DIR}", purge)
        self.assertIn("deluser", purge)
        # Nothing is removed outside purge.
        self.assertNotRegex(postrm.split(";;", 1)[1], r"\b(rm|deluser|delgroup|userdel)\s")

    def test_logrotate_and_examples(self):
        """logrotate rotates the default file's JSON log as the service user; the Fail2ban filter
        and jail are shipped as examples."""
        active, _ = parse_default(read("sentrypeer.default"))
        logrotate = read("sentrypeer.logrotate")
        self.assertIn(active["SENTRYPEER_JSON_LOG_FILE"] + " {", logrotate)
        self.assertIn("su sentrypeer sentrypeer", logrotate)
        self.assertEqual(read("sentrypeer.examples").split(), ["contrib/fail2ban"])
        for part in ("filter.d", "jail.d"):
            path = os.path.join(ROOT, "contrib", "fail2ban", part, "sentrypeer.conf")
            self.assertTrue(os.path.isfile(path), path)
