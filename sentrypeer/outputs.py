"""Event outputs: the JSON log, syslog and the webhook, built from the configuration.

Each output is a :class:`twisted.application.service.Service` that is also an event-pipeline output
(:data:`sentrypeer.pipeline.Output`): calling it with ``(event, replicated)`` queues or sends the
event without blocking and never raises.  Outputs are independent of each other and of the
database (reference §14 item 16): one failing output loses nothing in another.

Wiring (done by the root service)::

    for output in build_outputs(config, reactor):
        output.prepare()              # OutputError -> one-line start-up failure
        output.setServiceParent(root)
        pipeline.add_output(output)

Every output exposes its counters as integer attributes and through :meth:`counters`, for metrics.
"""

from __future__ import annotations

from twisted.logger import Logger

from sentrypeer.events import escape_for_log


class OutputError(Exception):
    """An output cannot start (for instance the JSON log file cannot be opened for writing).

    The message is one line naming the output, the path or URL, and the cause; the root service
    turns it into a start-up failure (exit status 1).
    """


class FailureEpisode:
    """Logs a run of repeated failures once, and its end once.

    Outputs fail in bursts (a full disk, a collector that is down): logging every failure would
    flood the program's log, logging none would hide the problem.  The first failure of an episode
    is logged at *level*; the failures that follow are only counted; the first success after them
    logs one line saying how many failures there were.

    :param log: the :class:`~twisted.logger.Logger` to write to.
    :param what: a short fixed description used in the recovery line, e.g. ``"JSON log writes"``
        gives ``JSON log writes: back to normal after 3 failure(s)``.
    """

    def __init__(self, log: Logger, what: str) -> None:
        self._log = log
        self._what = what
        #: Failures in the current episode (0 when none is under way).
        self.count = 0

    @property
    def active(self) -> bool:
        """Whether failures are under way (no success since the last one)."""
        return self.count > 0

    def failed(self, fmt: str, **fields) -> bool:
        """Count a failure; log *fmt* (a PEP 3101 log format) only when it starts an episode.

        Field values must already be safe for the log (use :func:`escape_for_log` on attacker
        text); this method adds nothing of its own to them.

        :returns: ``True`` when this failure was logged (the first of its episode).
        """
        self.count += 1
        if self.count == 1:
            self._log.warn(fmt, **fields)
            return True
        return False

    def succeeded(self) -> None:
        """End the episode, if any, with one line saying how many failures it had."""
        if self.count:
            self._log.info(
                "{what}: back to normal after {count} failure(s)", what=self._what, count=self.count
            )
            self.count = 0

    def reset(self) -> None:
        """End the episode, if any, without logging (the caller logs its own summary)."""
        self.count = 0


def describe_error(error: BaseException, limit: int = 160) -> str:
    """One safe, short line about *error* for the program's log: its type and escaped message.

    :param error: any exception.
    :param limit: the most characters of the message shown.
    """
    text = getattr(error, "strerror", None) or str(error)
    name = type(error).__name__
    return f"{name}: {escape_for_log(text, limit)}" if text else name


def build_outputs(config, reactor) -> list:
    """Build (not start) the output services the configuration enables, in a fixed order:
    JSON log (``-j``/``-l``), syslog (``-s``), webhook (``-w``).

    :param config: a :class:`sentrypeer.config.Config`.
    :param reactor: the reactor the outputs schedule, connect and listen for signals with.
    :returns: a list of services, each also an event-pipeline output; empty when none is enabled.
    """
    # Imported here: each output module imports OutputError/FailureEpisode from this one.
    from sentrypeer.eventlog import JSONLogService
    from sentrypeer.syslog import SyslogService
    from sentrypeer.webhook import WebhookService

    outputs: list = []
    if config.json_log:
        outputs.append(JSONLogService(config.json_log_file, reactor=reactor))
    if config.syslog:
        outputs.append(
            SyslogService(config.syslog_socket, reactor=reactor, include_peers=config.syslog_peers)
        )
    if config.webhook_url:
        outputs.append(
            WebhookService(
                config.webhook_url,
                reactor=reactor,
                client_id=config.oauth2_client_id,
                client_secret=config.oauth2_client_secret,
                token_url=config.oauth2_token_url,
            )
        )
    return outputs
