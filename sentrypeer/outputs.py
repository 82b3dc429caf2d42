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

from twisted.logger import Logger, LogLevel

from sentrypeer.events import escape_for_log

#: Seconds between two summary lines of a failure episode that goes on (and the quiet time after
#: the end of an episode within which a new one is not announced again, see FailureEpisode).
SUMMARY_INTERVAL = 60.0


class OutputError(Exception):
    """An output cannot start (for instance the JSON log file cannot be opened for writing).

    The message is one line naming the output, the path or URL, and the cause; the root service
    turns it into a start-up failure (exit status 1).
    """


class FailureEpisode:
    """Logs a run of repeated failures with a bounded number of lines, whatever its length.

    Outputs fail in bursts (a full disk, a collector that is down, a queue at its limit): logging
    every failure would flood the program's log, logging none would hide the problem.  So:

    * the first failure of an episode is logged with the caller's message (*level*);
    * the failures that follow are counted; with a *clock*, those not yet reported are summed up
      in at most one line per *interval* seconds while the episode lasts
      (``<what>: 1234 <noun> in the last minute (still failing)``), so every failure is
      eventually reported even when the episode never ends;
    * the caller's :meth:`succeeded` ends the episode with one line giving its total
      (``<what>: back to normal after 1234 <noun>``);
    * a new episode that starts less than *interval* seconds after the end of the previous one
      (a resource that flaps, a queue that hovers at its limit) is not announced again: its
      failures go to the next summary line, and its end is not logged either;
    * :meth:`close` (at stop) reports what is still unreported, or the total of an episode
      still under way.

    Callers decide when an episode ends: for a full queue, only once it has drained well below
    its limit, so that a queue sitting at its limit is one episode, not one per event.

    :param log: the :class:`~twisted.logger.Logger` to write to.
    :param what: a short fixed description used in the summary and end lines, e.g.
        ``"JSON log writes"`` gives ``JSON log writes: back to normal after 3 failure(s)``.
    :param clock: provides ``seconds()`` and ``callLater()`` (the reactor); without it there
        are no summary lines and no flap guard (every episode logs its start and end).
    :param noun: what is counted, plural form with ``(s)``, e.g. ``"event(s) dropped"``.
    :param level: the level of the start and summary lines (the end line is ``info``).
    :param interval: seconds between summary lines, and the flap guard's quiet time.
    :param summaries: ``False`` for failures that are retries of the same thing (reconnection
        attempts): while an announced episode lasts they are only counted, its end or
        :meth:`close` gives the total (the failures of unannounced episodes are still summed up).
    """

    def __init__(
        self,
        log: Logger,
        what: str,
        *,
        clock=None,
        noun: str = "failure(s)",
        level: LogLevel = LogLevel.warn,
        interval: float = SUMMARY_INTERVAL,
        summaries: bool = True,
    ) -> None:
        self._log = log
        self._what = what
        self._clock = clock
        self._noun = noun
        self._level = level
        self._interval = interval
        self._summaries = summaries
        #: Failures in the current episode (0 when none is under way).
        self.count = 0
        #: Failures ever counted.
        self.total = 0
        #: Failures not yet covered by any log line.
        self.unreported = 0
        self._announced = False  # whether the current episode's start was logged
        self._last_line: float | None = None  # clock time of the last line logged
        self._last_end: float | None = None  # clock time the last episode ended
        self._summary_call = None

    @property
    def active(self) -> bool:
        """Whether failures are under way (no success since the last one)."""
        return self.count > 0

    def _now(self) -> float | None:
        return None if self._clock is None else self._clock.seconds()

    def failed(self, fmt: str, **fields) -> bool:
        """Count a failure; log *fmt* (a PEP 3101 log format) only when it starts an episode that
        is announced (see the class description).

        Field values must already be safe for the log (use :func:`escape_for_log` on attacker
        text); this method adds nothing of its own to them.

        :returns: ``True`` when this failure was logged (the first of its episode).
        """
        self.count += 1
        self.total += 1
        now = self._now()
        if self.count == 1:
            flapping = (
                now is not None and self._last_end is not None
                and now - self._last_end < self._interval
            )
            if not flapping:
                if self.unreported:
                    self._summary()  # what an earlier, unannounced episode left
                self._cancel_summary()
                self._announced = True
                self._last_line = now
                self._log.emit(self._level, fmt, **fields)
                return True
            self._announced = False
        if self._summaries or not self._announced:
            self.unreported += 1
            self._schedule_summary(now)
        return False

    def _schedule_summary(self, now: float | None) -> None:
        if now is None or (self._summary_call is not None and self._summary_call.active()):
            return
        delay = self._interval
        if self._last_line is not None and now - self._last_line < self._interval:
            delay = self._interval - (now - self._last_line)
        self._summary_call = self._clock.callLater(delay, self._summary)

    def _summary(self) -> None:
        self._summary_call = None
        if not self.unreported:
            return
        self._log.emit(
            self._level,
            "{what}: {count} {noun} in the last {period} ({state})",
            what=self._what,
            count=self.unreported,
            noun=self._noun,
            period="minute" if self._interval == 60 else f"{self._interval:g} s",
            state="still failing" if self.active else "back to normal now",
        )
        self.unreported = 0
        self._last_line = self._now()

    def _cancel_summary(self) -> None:
        if self._summary_call is not None and self._summary_call.active():
            self._summary_call.cancel()
        self._summary_call = None

    def succeeded(self) -> None:
        """End the episode, if any: one line with its total when its start was logged (the
        failures of an unannounced episode are left to the next summary line)."""
        if not self.count:
            return
        now = self._now()
        if self._announced:
            self._cancel_summary()
            self._log.info(
                "{what}: back to normal after {count} {noun}",
                what=self._what,
                count=self.count,
                noun=self._noun,
            )
            self.unreported = 0
            self._last_line = now
        self.count = 0
        self._announced = False
        self._last_end = now

    def close(self) -> None:
        """At stop: report the failures not reported yet, and the total of an episode still under
        way; cancel the summary timer.  The episode is over afterwards."""
        self._cancel_summary()
        if self.unreported:
            self._summary()
        if self.count:
            self._log.emit(
                self._level,
                "{what}: still failing at stop, after {count} {noun}",
                what=self._what,
                count=self.count,
                noun=self._noun,
            )
        self.count = 0
        self.unreported = 0
        self._announced = False
        self._last_line = self._last_end = self._now()

    def reset(self) -> None:
        """End the episode, if any, without logging (the caller logs its own summary)."""
        self._cancel_summary()
        self.count = 0
        self.unreported = 0
        self._announced = False
        self._last_end = self._now()


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
