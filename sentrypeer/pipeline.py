"""The event pipeline: the one entry point through which every event reaches storage and the outputs.

Collected events come from the SIP controller; replicated events (received from peers over the DHT,
a later issue) enter through :meth:`EventPipeline.submit_replicated`. Outputs (JSON log, syslog,
webhook, DHT publishing: later issues) are independent of each other and of the database: one failing
output never stops another (the original's sink coupling, reference §14.16).
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.logger import Logger

from sentrypeer.events import BadActorEvent

#: An output is called with the event and ``replicated`` (``True`` for events from peers).
Output = Callable[[BadActorEvent, bool], None]


class EventPipeline:
    """Hands each event to the write queue and to every registered output.

    :param queue: an object with ``put(event) -> bool`` (the bounded write queue).
    """

    _log = Logger(namespace="sentrypeer.pipeline")

    def __init__(self, queue) -> None:
        self.queue = queue
        self.outputs: list[Output] = []
        self.output_errors = 0

    def add_output(self, output: Output) -> None:
        """Register *output*; it must not block (queue its own work)."""
        self.outputs.append(output)

    def submit_collected(self, event: BadActorEvent) -> bool:
        """Record an event collected by this node.

        :returns: ``False`` when the write queue was full and the event was dropped (counted there).
        """
        return self._submit(event, False)

    def submit_replicated(self, event: BadActorEvent) -> bool:
        """Record an event received from a peer (already validated by the caller)."""
        return self._submit(event, True)

    def _submit(self, event: BadActorEvent, replicated: bool) -> bool:
        accepted = self.queue.put(event)
        for output in self.outputs:
            try:
                output(event, replicated)
            except Exception:
                self.output_errors += 1
                self._log.failure("event output {output!r} failed", output=output)
        return accepted
