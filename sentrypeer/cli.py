"""The ``sentrypeer`` console script: the original's command line, run in the foreground.

Exit statuses (interface.md §1): 0 after ``-h``/``--help`` (usage on stdout) and
``-V``/``--version`` (``sentrypeer 5.0.0`` on stdout); 2 on a usage or configuration error
(``sentrypeer: <problem>`` and the usage on stderr, no traceback, as the original's clap parser
did); otherwise whatever :func:`sentrypeer.service.run` returns.
"""

from __future__ import annotations

import sys

from twisted.python import usage

from sentrypeer.tap import Options

#: Exit status of a usage or configuration error (the original's, from clap).
USAGE_ERROR = 2


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv``, then run SentryPeer until it stops.

    :param argv: the arguments after the program name; ``None`` means ``sys.argv[1:]``.
    :returns: the exit status.
    """
    if argv is None:
        argv = sys.argv[1:]
    options = Options()
    options.synopsis = "Usage: sentrypeer [options]"
    try:
        options.parseOptions(argv)
    except usage.UsageError as e:
        sys.stderr.write(f"sentrypeer: {e}\n\n{options}\n")
        return USAGE_ERROR
    except SystemExit as e:
        # --help and --version print and exit inside parseOptions, as twistd expects of them.
        return e.code if isinstance(e.code, int) else 0

    from sentrypeer.service import run

    return run(options.config)
