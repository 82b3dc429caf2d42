"""SentryPeer's settings: one frozen :class:`Config` resolved from four layers (interface.md §2).

Pure module: no reactor, no Twisted import; its only I/O is reading the TOML config file.

Precedence is resolved once, here, per setting: command line > ``SENTRYPEER_*`` environment variable
> TOML config file > built-in default.  Every layer that is present is validated, even where a
higher layer overrides it, so a bad value is reported wherever it sits instead of surfacing the
day the overriding option is dropped.

Differences from the original (reference §1, §14 item 14), all on purpose:

* boolean variables are strict (``1 true yes on`` / ``0 false no off``); the original enabled a
  feature on *any* value, ``0`` included, and its Rust build silently ignored six of them;
* an empty variable counts as unset, with a warning, instead of being taken as set;
* every setting may live in the config file, not just the TLS trio; unknown keys are an error;
* a config file is read only when it exists (it is never created), and an unreadable or invalid
  explicitly named file is an error instead of a panic in the SIP thread (§14 item 18);
* the only option pairing kept is ``-i`` with ``-c``; ``-l`` alone enables the JSON log.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import os
import re
import tomllib
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from sentrypeer import endpoints
from sentrypeer.endpoints import ListenSpec

#: Where the config file is looked for when neither ``-g`` nor ``SENTRYPEER_CONFIG_FILE`` names
#: one, relative to the home directory (the original's confy location on Linux, reference §1.4).
DEFAULT_CONFIG_PATH = os.path.join(".config", "sentrypeer", "default-config.toml")

#: The option and variable naming the config file (it has no config-file key of its own).
CONFIG_FILE_OPTION = "config-file"
CONFIG_FILE_ENV = "SENTRYPEER_CONFIG_FILE"

ENV_PREFIX = "SENTRYPEER_"

#: Boolean words accepted in environment variables, case-insensitive (interface.md §2).
TRUE_WORDS = frozenset({"1", "true", "yes", "on"})
FALSE_WORDS = frozenset({"0", "false", "no", "off"})

#: The SIP listeners used when no ``--sip``, ``SENTRYPEER_SIP_LISTEN`` or ``sip_listen`` is given.
DEFAULT_SIP_LISTEN = (
    ListenSpec("udp", 5060, "::"),
    ListenSpec("tcp", 5060, "::"),
    ListenSpec("tls", 5061, "::"),
)

#: Value kinds of :class:`Setting`.
BOOL, TEXT, INT, FLOAT, LISTEN = "bool", "text", "int", "float", "listen"


class ConfigError(Exception):
    """A setting has a bad value, or the config file cannot be used.

    The message is one line: the option, variable, key or file at fault, then the problem.  The
    command line turns it into a usage error (exit status 2).
    """


# Normalisers: take a value of the setting's kind and return the value to keep, or raise
# ValueError whose message says what is wrong (the caller prefixes where the value came from).


def _port(value: int) -> int:
    """Accept a port number, 0-65535 (0: ephemeral)."""
    if not 0 <= value <= 65535:
        raise ValueError(f"{value} is not a port number (0-65535)")
    return value


def _at_least(low: int) -> Callable[[Any], Any]:
    """Return a normaliser accepting numbers of at least ``low``."""

    def check(value: Any) -> Any:
        if value < low:
            raise ValueError(f"{value} is too small (at least {low})")
        return value

    return check


def _positive(value: float) -> float:
    """Accept a number greater than 0 (timeouts, rates)."""
    if value <= 0:
        raise ValueError(f"{value} must be greater than 0")
    return value


def _network_id(value: int) -> int:
    """Accept an OpenDHT network id, an unsigned 32-bit integer."""
    if not 0 <= value <= 0xFFFFFFFF:
        raise ValueError(f"{value} is not a network id (0-4294967295)")
    return value


_HOST_NAME = re.compile(r"[a-z0-9_-]+(\.[a-z0-9_-]+)*\.?", re.ASCII)


def _http_url(value: str) -> str:
    """Accept an ``http://`` or ``https://`` URL with a valid host and port (1-65535) and no
    white space or control character: what the HTTP client would otherwise refuse or mangle only
    at the first event, long after start."""
    bad = next((c for c in value if c.isspace() or not c.isprintable()), None)
    if bad is not None:
        raise ValueError(f"{value!r} is not a valid URL: it contains {bad!r}")
    try:
        parts = urllib.parse.urlsplit(value)
        port = parts.port
    except ValueError as e:
        raise ValueError(f"{value!r} is not a valid URL: {e}") from None
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"{value!r} is not an http:// or https:// URL")
    host = parts.hostname
    if not host:
        raise ValueError(f"{value!r} is not a valid URL: it has no host")
    host_port = parts.netloc.rpartition("@")[2]
    if host_port.startswith("["):
        try:
            ipaddress.IPv6Address(host.partition("%")[0])
        except ValueError:
            raise ValueError(f"{value!r} is not a valid URL: bad IPv6 address {host!r}") from None
        port_text = host_port.partition("]")[2]
    else:
        try:
            ascii_host = host.encode("idna").decode("ascii")
        except UnicodeError:
            ascii_host = ""
        if not _HOST_NAME.fullmatch(ascii_host):
            raise ValueError(f"{value!r} is not a valid URL: bad host name {host!r}")
        port_text = host_port.partition(":")[1] + host_port.partition(":")[2]
    if port_text not in ("", ":") and not (port_text[1:].isdigit() and port_text[1:].isascii()):
        raise ValueError(f"{value!r} is not a valid URL: bad port {port_text[1:]!r}")
    if port == 0:
        raise ValueError(f"{value!r} is not a valid URL: port 0")
    return value


def _ip_address(value: str) -> str:
    """Accept an IPv4 or IPv6 literal, returned in canonical form."""
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise ValueError(f"{value!r} is not an IPv4 or IPv6 address") from None


def _bootstrap_node(value: str) -> str:
    """Accept ``host[:port]`` (a name is fine: the DHT resolves it); keep the text as given."""
    endpoints.split_host_port(value, default_port=4222)
    return value


def _tls_listen_address(value: str) -> str:
    """Accept the ``-z`` form (:func:`sentrypeer.endpoints.parse_host_port`); keep the text."""
    endpoints.parse_host_port(value)
    return value


@dataclass(frozen=True)
class Setting:
    """One row of :data:`SETTINGS`: a setting, its names in every layer, its default.

    :ivar name: the :class:`Config` field and the config-file key.
    :ivar option: the long command-line option, which is also its key in the options mapping.
    :ivar short: the original's one-letter option, or ``None``.
    :ivar env: the environment variable, or ``None`` when there is none.
    :ivar kind: :data:`BOOL`, :data:`TEXT`, :data:`INT`, :data:`FLOAT` or :data:`LISTEN`.
    :ivar default: the built-in default (``None``: not set; for cert/key: derived from db_file).
    :ivar help: the text of ``--help`` for the option.
    :ivar normalise: validates (and may canonicalise) a value of the right kind; raises
        ``ValueError`` naming the problem.
    :ivar in_file: whether the config file may set it.
    """

    name: str
    option: str
    short: str | None
    env: str | None
    kind: str
    default: Any
    help: str
    normalise: Callable[[Any], Any] | None = None
    in_file: bool = True


def _setting(name, option, short, kind, default, help, normalise=None, env="", in_file=True):
    """Build a :class:`Setting`; the variable defaults to ``SENTRYPEER_`` + the upper-cased name."""
    if env == "":
        env = ENV_PREFIX + name.upper()
    return Setting(name, option, short, env, kind, default, help, normalise, in_file)


#: Every setting of interface.md §2, in the order of its table.
SETTINGS: tuple[Setting, ...] = (
    _setting("db_file", "db-file", "f", TEXT, "sentrypeer.db", "SQLite database file"),
    _setting("json_log", "json-log", "j", BOOL, False, "Write every event to the JSON log"),
    _setting("json_log_file", "json-log-file", "l", TEXT, "sentrypeer_json.log",
             "JSON log file; setting it (by any means) enables the JSON log"),
    _setting("p2p", "p2p", "p", BOOL, False, "Share events with other nodes (OpenDHT)",
             env="SENTRYPEER_PEER_TO_PEER"),
    _setting("bootstrap_node", "bootstrap-node", "b", TEXT, "bootstrap.sentrypeer.org:4222",
             "DHT bootstrap node, host[:port]", _bootstrap_node),
    _setting("dht_port", "dht-port", None, INT, 4222, "UDP port of the DHT node", _port),
    _setting("dht_network", "dht-network", None, INT, 0,
             "DHT network id (0 = the public SentryPeer network)", _network_id),
    _setting("oauth2_client_id", "oauth2-client-id", "i", TEXT, None,
             "OAuth2 client id for the webhook (goes with -c)"),
    _setting("oauth2_client_secret", "oauth2-client-secret", "c", TEXT, None,
             "OAuth2 client secret for the webhook (goes with -i)"),
    _setting("oauth2_token_url", "oauth2-token-url", None, TEXT,
             "https://authz.sentrypeer.com/oauth/token", "OAuth2 token URL", _http_url),
    _setting("webhook_url", "webhook-url", "w", TEXT, None, "POST every event to this URL",
             _http_url),
    _setting("api", "api", "a", BOOL, False, "Serve the REST API"),
    _setting("api_listen", "api-listen", None, TEXT, "tcp:8082:interface=127.0.0.1",
             "Stream endpoint description the REST API listens on"),
    _setting("sip_responsive", "sip-responsive", "r", BOOL, False, "Answer SIP requests"),
    _setting("sip_disable", "sip-disable", "R", BOOL, False, "Do not listen for SIP at all"),
    _setting("sip_listen", "sip", None, LISTEN, DEFAULT_SIP_LISTEN,
             "SIP listener udp|tcp|tls:PORT[:interface=ADDR], repeatable; the first --sip"
             " replaces the default list (udp:5060, tcp:5060, tls:5061, all on ::)"),
    _setting("cert", "tls-cert", "t", TEXT, None,
             "TLS certificate, PEM (default: cert.pem next to the database file)"),
    _setting("key", "tls-key", "k", TEXT, None,
             "TLS private key, PEM (default: key.pem next to the database file)"),
    _setting("tls_listen_address", "tls-listen-address", "z", TEXT, None,
             "TLS listen address HOST:PORT or [IPv6]:PORT; replaces the tls: listener",
             _tls_listen_address),
    _setting("syslog", "syslog", "s", BOOL, False, "Send events to syslog"),
    _setting("verbose", "verbose", "v", BOOL, False, "Verbose output"),
    _setting("debug", "debug", "d", BOOL, False, "Debug output"),
    _setting("manhole", "manhole", None, TEXT, None,
             "Stream endpoint description of an SSH manhole (off by default)"),
    _setting("manhole_keys", "manhole-keys", None, TEXT, None,
             "authorized_keys file for the manhole"),
    _setting("api_token", "api-token", None, TEXT, None,
             "Bearer token required by the REST API (default: open)"),
    _setting("syslog_peers", "syslog-peers", None, BOOL, False,
             "Also send peers' events to syslog"),
    _setting("sip_persona", "sip-persona", None, TEXT, None,
             "Persona name or TOML file for responsive replies (default: the first shipped one)"),
    _setting("dht_trusted_nodes", "dht-trusted-nodes", None, TEXT, None,
             "File of trusted Ed25519 public keys, base64, one a line (default: accept unsigned)"),
    _setting("dht_sign", "dht-sign", None, BOOL, False, "Sign our DHT events with this node's key"),
    _setting("blocklist_exclude", "blocklist-exclude", None, TEXT, None,
             "File of CIDRs never listed in blocklists"),
    _setting("max_tcp_connections", "max-tcp-connections", None, INT, 1024,
             "Most TCP and TLS connections open at once", _at_least(1)),
    _setting("tcp_idle_timeout", "tcp-idle-timeout", None, FLOAT, 30.0,
             "Seconds before an idle TCP or TLS connection is closed", _positive),
    _setting("write_queue_size", "write-queue-size", None, INT, 100000,
             "Most events waiting for the database", _at_least(1)),
    _setting("write_queue_bytes", "write-queue-bytes", None, INT, 33554432,
             "Most bytes of events waiting for the database", _at_least(1024)),
    _setting("reply_rate", "reply-rate", None, FLOAT, 10.0,
             "SIP replies per second per destination address (burst twice that, at least 1)", _positive),
    _setting("retention_days", "retention-days", None, INT, 0,
             "Delete events older than this many days (0 = keep forever)", _at_least(0)),
    _setting("syslog_socket", "syslog-socket", None, TEXT, "/dev/log", "Syslog Unix socket"),
    _setting("dht_bind", "dht-bind", None, TEXT, None,
             "Address the DHT node binds (default: all, IPv4 and IPv6)", _ip_address),
    _setting("dht_peer_discovery", "dht-peer-discovery", None, BOOL, False,
             "OpenDHT LAN multicast peer discovery"),
    _setting("dht_put_rate", "dht-put-rate", None, FLOAT, 10.0,
             "Most DHT puts per second; events beyond are not published", _positive),
    _setting("show_node_key", "show-node-key", None, BOOL, False,
             "Print this node's Ed25519 public key (base64) and exit", env=None, in_file=False),
)

SETTINGS_BY_NAME: dict[str, Setting] = {s.name: s for s in SETTINGS}

#: Config-file keys, for the unknown-key check.
FILE_KEYS = frozenset(s.name for s in SETTINGS if s.in_file)

#: Environment variables we read, for the empty and unknown variable warnings.
ENV_NAMES = frozenset({CONFIG_FILE_ENV} | {s.env for s in SETTINGS if s.env})


@dataclass(frozen=True)
class Config:
    """Every setting of interface.md §2 after precedence, validation and defaults.

    Fields are named as the config-file keys and described by :data:`SETTINGS`.  Paths are kept
    as given (relative paths are relative to the working directory).  ``None`` means "not set"
    for optional settings.  Built by :func:`from_options`, never changed afterwards.

    :ivar json_log: true when ``-j`` asked for the JSON log or ``json_log_file`` was set by any
        means (the latter overrides a variable or key that says false).
    :ivar sip_listen: the SIP listeners, in order, after ``tls_listen_address`` was applied.
    :ivar cert: PEM certificate path; default ``cert.pem`` in ``db_file``'s directory.
    :ivar key: PEM private key path; default ``key.pem`` in ``db_file``'s directory.
    :ivar tls_listen_address: the ``-z`` text as given (already folded into ``sip_listen``).
    :ivar tcp_idle_timeout: seconds.
    :ivar write_queue_bytes: bytes, at least 1024.
    :ivar reply_rate: replies per second per destination address.
    :ivar retention_days: days; 0 keeps events forever.
    :ivar dht_put_rate: DHT puts per second.
    :ivar config_file: the config file actually read, or ``None``.
    :ivar warnings: non-fatal notices to log at start-up (empty or unknown ``SENTRYPEER_*``
        variables).
    """

    db_file: str
    json_log: bool
    json_log_file: str
    p2p: bool
    bootstrap_node: str
    dht_port: int
    dht_network: int
    oauth2_client_id: str | None
    oauth2_client_secret: str | None
    oauth2_token_url: str
    webhook_url: str | None
    api: bool
    api_listen: str
    sip_responsive: bool
    sip_disable: bool
    sip_listen: tuple[ListenSpec, ...]
    cert: str
    key: str
    tls_listen_address: str | None
    syslog: bool
    verbose: bool
    debug: bool
    manhole: str | None
    manhole_keys: str | None
    api_token: str | None
    syslog_peers: bool
    sip_persona: str | None
    dht_trusted_nodes: str | None
    dht_sign: bool
    blocklist_exclude: str | None
    max_tcp_connections: int
    tcp_idle_timeout: float
    write_queue_size: int
    write_queue_bytes: int
    reply_rate: float
    retention_days: int
    syslog_socket: str
    dht_bind: str | None
    dht_peer_discovery: bool
    dht_put_rate: float
    show_node_key: bool
    config_file: str | None
    warnings: tuple[str, ...] = ()


def option_label(setting: Setting) -> str:
    """Return how a command-line option is named in messages, e.g. ``-f/--db-file``."""
    if setting.short:
        return f"-{setting.short}/--{setting.option}"
    return f"--{setting.option}"


# Converters: from the text of an option argument or variable, and from a typed (TOML) value.
_INTEGER = re.compile(r"[+-]?[0-9]+")


def _from_text(kind: str, text: str) -> Any:
    """Convert ``text`` (an option argument or variable value) to a value of ``kind``.

    :raises ValueError: when the text does not spell a value of that kind.
    """
    if kind == BOOL:
        word = text.strip().lower()
        if word in TRUE_WORDS:
            return True
        if word in FALSE_WORDS:
            return False
        raise ValueError(f"{text!r} is not a boolean (use 1, true, yes, on or 0, false, no, off)")
    if kind == INT:
        if not _INTEGER.fullmatch(text.strip()):
            raise ValueError(f"{text!r} is not a whole number")
        return int(text)
    if kind == FLOAT:
        try:
            number = float(text)
        except ValueError:
            number = math.nan
        if not math.isfinite(number):
            raise ValueError(f"{text!r} is not a number")
        return number
    if kind == LISTEN:
        return _listen_list(text.split())
    if not text:
        raise ValueError("the value is empty")
    return text


def _from_typed(kind: str, value: Any) -> Any:
    """Check ``value`` (from TOML, or a non-text option value) has the type of ``kind``.

    :raises ValueError: naming the expected type.
    """
    if kind == BOOL:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{value!r} is not a boolean (true or false)")
    if kind == INT:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ValueError(f"{value!r} is not an integer")
    if kind == FLOAT:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if math.isfinite(value):
                return float(value)
        raise ValueError(f"{value!r} is not a number")
    if kind == LISTEN:
        if isinstance(value, (list, tuple)) and all(isinstance(item, str) for item in value):
            return _listen_list(value)
        raise ValueError(f"{value!r} is not an array of listen description strings")
    if isinstance(value, str):
        return _from_text(kind, value)
    raise ValueError(f"{value!r} is not a string")


def _listen_list(descriptions: list[str] | tuple[str, ...]) -> tuple[ListenSpec, ...]:
    """Parse SIP listen descriptions.

    :raises ValueError: on an invalid description, an empty list (``-R`` is the way to turn SIP
        off) or a listener given twice (the second bind would fail).
    """
    if not descriptions:
        raise ValueError("no SIP listen description given (use -R/--sip-disable to turn SIP off)")
    specs: list[ListenSpec] = []
    for description in descriptions:
        spec = endpoints.parse_listen(description)
        if spec in specs:
            raise ValueError(f"SIP listener {endpoints.format_listen(spec)} is given twice")
        specs.append(spec)
    return tuple(specs)


def _layer_values(setting: Setting, options: Mapping, env: Mapping[str, str],
                  file: Mapping[str, Any], file_path: str | None) -> list[tuple[Any, str]]:
    """Return ``(value, origin)`` for every layer that sets ``setting``, highest first.

    Every layer present is converted and validated, even those a higher layer overrides.

    :raises ConfigError: when a layer holds a value that is not valid for the setting.
    """
    found = []
    raw = options.get(setting.option)
    if setting.kind == BOOL:
        raw = True if raw else None  # a flag is given (usage.Options stores 1) or not
    if raw is not None:
        convert = _from_text if isinstance(raw, str) else _from_typed
        found.append(_convert(setting, convert, raw, option_label(setting)))
    if setting.env in env:
        found.append(_convert(setting, _from_text, env[setting.env], setting.env))
    if setting.in_file and setting.name in file:
        origin = f"{setting.name} in {file_path}"
        found.append(_convert(setting, _from_typed, file[setting.name], origin))
    return found


def _convert(setting: Setting, convert: Callable[[str, Any], Any], raw: Any, origin: str
             ) -> tuple[Any, str]:
    """Convert and normalise one layer's value of ``setting``.

    :raises ConfigError: prefixed with ``origin`` (the option, variable or file key).
    """
    try:
        value = convert(setting.kind, raw)
        if setting.normalise is not None:
            value = setting.normalise(value)
    except ValueError as e:
        raise ConfigError(_one_line(f"{origin}: {e}")) from None
    return value, origin


def _one_line(message: str) -> str:
    """Collapse white space so that an error is one line whatever the value quoted in it."""
    return " ".join(message.split())


def _read_environment(environ: Mapping[str, str], warnings: list[str]) -> dict[str, str]:
    """Return our variables that are set to something, warning about empty and unknown ones."""
    env = {}
    for name in sorted(environ):
        if not name.startswith(ENV_PREFIX):
            continue
        if name not in ENV_NAMES:
            warnings.append(f"environment variable {name} is not used by SentryPeer; ignored")
        elif not environ[name].strip():
            warnings.append(f"environment variable {name} is empty; treated as unset")
        else:
            env[name] = environ[name]
    return env


def _locate_config_file(options: Mapping, env: Mapping[str, str], environ: Mapping[str, str],
                        home: str | None) -> tuple[str | None, str]:
    """Return the config file to read (or ``None``) and how to name it in errors.

    ``-g`` wins over ``SENTRYPEER_CONFIG_FILE``; without either, the default path under ``home``
    (or ``$HOME``) is used only if it exists.
    """
    path = options.get(CONFIG_FILE_OPTION)
    if path is not None:
        if not path:
            raise ConfigError("-g/--config-file: the value is empty")
        return path, "-g/--config-file"
    if CONFIG_FILE_ENV in env:
        return env[CONFIG_FILE_ENV], CONFIG_FILE_ENV
    if home is None:
        home = environ.get("HOME")
    if home:
        default = os.path.join(home, DEFAULT_CONFIG_PATH)
        if os.path.exists(default):
            return default, "config file"
    return None, ""


def _load_config_file(path: str, label: str) -> dict[str, Any]:
    """Read and check the TOML config file at ``path``.

    :raises ConfigError: when it cannot be read, is not valid TOML, or has a key that is not a
        setting.
    """
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"{label}: cannot read {path!r}: {e.strerror or e}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(_one_line(f"{label}: {path!r} is not valid TOML: {e}")) from None
    for key in data:
        if key not in FILE_KEYS:
            close = difflib.get_close_matches(key, FILE_KEYS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{path}: unknown key {key!r}{hint}")
    return data


def _apply_tls_listen_address(listen: tuple[ListenSpec, ...], address: str
                              ) -> tuple[ListenSpec, ...]:
    """Put the ``-z`` address in place of the first ``tls:`` listener, dropping any other.

    The original had exactly one TLS listener, set by ``-z``; with no ``tls:`` entry in the list,
    the TLS listener is added at the end.
    """
    host, port = endpoints.parse_host_port(address)
    tls = ListenSpec("tls", port, host)
    result: list[ListenSpec] = []
    for spec in listen:
        if spec.transport != "tls":
            result.append(spec)
        elif tls not in result:
            result.append(tls)
    if tls not in result:
        result.append(tls)
    return tuple(result)


def from_options(options: Mapping, environ: Mapping[str, str], home: str | None = None) -> Config:
    """Resolve every setting: command line > ``SENTRYPEER_*`` variable > config file > default.

    :param options: the parsed command line, keyed by long option name (``"db-file"``, ``"sip"``,
        ``"config-file"``...), as :class:`sentrypeer.tap.Options` holds it.  A key that is absent
        or ``None`` (or a false flag) was not given.  Values are option argument strings; ``sip``
        is a list of strings; flags are true when given.
    :param environ: the environment, e.g. ``os.environ``; only ``SENTRYPEER_*`` names are read.
    :param home: the home directory holding ``.config/sentrypeer/default-config.toml``;
        ``None`` uses ``environ["HOME"]`` (no default file when that is unset too).
    :returns: the settings, with non-fatal notices in :attr:`Config.warnings`.
    :raises ConfigError: on an invalid value in any layer, an unreadable or invalid config file,
        an unknown config key, or ``-i`` without ``-c`` (or the reverse).
    """
    warnings: list[str] = []
    env = _read_environment(environ, warnings)
    config_file, label = _locate_config_file(options, env, environ, home)
    file = _load_config_file(config_file, label) if config_file else {}

    values: dict[str, Any] = {}
    origins: dict[str, str | None] = {}  # where each value came from; None: the default
    for setting in SETTINGS:
        found = _layer_values(setting, options, env, file, config_file)
        if found:
            values[setting.name], origins[setting.name] = found[0]
        else:
            values[setting.name], origins[setting.name] = setting.default, None

    # Set by any means, the JSON log file enables the JSON log (interface.md §2; the original's
    # C-only build did the same, its Rust build required -j as well).
    if origins["json_log_file"] is not None:
        values["json_log"] = True

    client_id, secret = values["oauth2_client_id"], values["oauth2_client_secret"]
    if (client_id is None) != (secret is None):
        given, missing = ("oauth2_client_id", "oauth2_client_secret") if secret is None else (
            "oauth2_client_secret", "oauth2_client_id")
        raise ConfigError(
            f"{origins[given]} is set but {option_label(SETTINGS_BY_NAME[missing])} is not:"
            " -i/--oauth2-client-id and -c/--oauth2-client-secret go together"
        )

    directory = os.path.dirname(values["db_file"])
    for name, filename in (("cert", "cert.pem"), ("key", "key.pem")):
        if values[name] is None:
            values[name] = os.path.join(directory, filename)

    if values["tls_listen_address"] is not None:
        values["sip_listen"] = _apply_tls_listen_address(values["sip_listen"],
                                                         values["tls_listen_address"])

    return Config(**values, config_file=config_file, warnings=tuple(warnings))
