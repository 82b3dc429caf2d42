"""The command line of ``twistd sentrypeer`` and ``sentrypeer``, and the service maker.

:class:`Options` accepts every option of interface.md §2 with the original's short letters
(reference §1.1), bundled as getopt allows (``-draps``).  It only records what the command line
says; :func:`sentrypeer.config.from_options` then applies the environment, the config file and the
defaults, so an option's absence never hides a ``SENTRYPEER_*`` variable or a config key.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

from twisted.python import usage

from sentrypeer import __version__
from sentrypeer.config import (
    BOOL,
    FLOAT,
    LISTEN,
    SETTINGS,
    SETTINGS_BY_NAME,
    ConfigError,
    Setting,
    from_options,
)

#: The first line of ``--help``; the original's "about" line starts the same way (reference §1.1).
ABOUT = "Protect your SIP Servers from bad actors: a SIP honeypot that records every probe."


def _help(setting: Setting) -> str:
    """Return the ``--help`` text of ``setting``: its description, default and variable."""
    text = setting.help
    if setting.kind == FLOAT:
        text += f" [default: {setting.default:g}]"
    elif setting.kind not in (BOOL, LISTEN) and setting.default is not None:
        text += f" [default: {setting.default}]"
    if setting.kind == LISTEN:
        text += f" [env: {setting.env}, space-separated]"
    elif setting.env:
        text += f" [env: {setting.env}]"
    return text


_FLAGS = [s for s in SETTINGS if s.kind == BOOL]
_PARAMETERS = [s for s in SETTINGS if s.kind not in (BOOL, LISTEN)]


class Options(usage.Options):
    """Options of ``twistd sentrypeer`` and of the ``sentrypeer`` console script.

    Every value stays ``None`` unless given on the command line.  After parsing,
    :attr:`config` holds the resolved :class:`sentrypeer.config.Config`.

    :ivar environ: where ``SENTRYPEER_*`` variables are read; ``os.environ`` unless a test sets
        another mapping before :meth:`parseOptions`.
    :ivar home: the home directory for the default config file; ``None`` means ``$HOME``.
    """

    longdesc = (
        "Options can also be set by the SENTRYPEER_* environment variable shown with them, or by"
        " a key of the TOML config file: the long option name with underscores (db_file,"
        " json_log...), except cert and key for --tls-cert and --tls-key, and sip_listen (an"
        " array) for --sip. The command line wins over the environment, the environment over the"
        " config file, the file over the built-in default. Boolean variables take 1/true/yes/on"
        " or 0/false/no/off."
    )

    optFlags = [[s.option, s.short, _help(s)] for s in _FLAGS]
    optParameters = [[s.option, s.short, None, _help(s)] for s in _PARAMETERS] + [
        ["config-file", "g", None,
         "TOML config file [default: ~/.config/sentrypeer/default-config.toml if it exists]"
         " [env: SENTRYPEER_CONFIG_FILE]"],
    ]

    environ: Mapping[str, str] = os.environ
    home: str | None = None

    def __init__(self) -> None:
        super().__init__()
        # usage.Options starts flags at 0; None says "not given" for every kind of option alike.
        for setting in _FLAGS:
            self[setting.option] = None
        self["sip"] = None
        self.docs["sip"] = _help(SETTINGS_BY_NAME["sip_listen"])

    def __str__(self) -> str:
        """Return the ``--help`` text, :data:`ABOUT` first."""
        return f"{ABOUT}\n\n{super().__str__()}"

    def opt_sip(self, description: str) -> None:
        """Add a SIP listener (repeatable); ``--help`` shows the settings table's text."""
        if self["sip"] is None:
            self["sip"] = []
        self["sip"].append(description)

    def opt_version(self) -> None:
        """Print the version and exit."""
        print(f"sentrypeer {__version__}")
        sys.exit(0)

    opt_V = opt_version
    opt_h = usage.Options.opt_help

    def postOptions(self) -> None:
        """Resolve the settings into :attr:`config`.

        :raises usage.UsageError: carrying the one-line :class:`ConfigError` message.
        """
        try:
            self.config = from_options(self, self.environ, self.home)
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None
        if self.config.show_node_key:
            self._show_node_key()

    def _show_node_key(self) -> None:
        """``--show-node-key``: print this node's Ed25519 public key (standard base64 of the raw 32
        bytes, interface.md §6), creating the key pair next to the database on first use, and exit
        0 — an action like ``--version``, so it ends inside option parsing for twistd too.

        :raises SystemExit: 0 after printing; 1 with a one-line message when the key cannot be
            read or created.
        """
        from sentrypeer.dht.signing import NodeKeyError, show_node_key

        try:
            key = show_node_key(self.config.db_file)
        except NodeKeyError as e:
            sys.stderr.write(f"sentrypeer: {e}\n")
            sys.exit(1)
        sys.stdout.write(key + "\n")
        sys.exit(0)


def makeService(options: Options, reactor=None):
    """Build the SentryPeer service tree from parsed ``options``.

    :param options: parsed :class:`Options` (their :attr:`Options.config` is used).
    :param reactor: the reactor to build listeners with; ``None`` means the global reactor
        (``twistd`` calls this with the options alone).
    :returns: :func:`sentrypeer.service.build_service`'s root service.
    """
    from sentrypeer.service import build_service

    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    return build_service(options.config, reactor)
