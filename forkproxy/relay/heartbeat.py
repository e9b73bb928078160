"""Heartbeats for an idle event stream: an SSE comment whenever no read finished for a while."""
from __future__ import annotations

from typing import Callable

import gevent
import gevent.queue

Units = Callable[[], "list[bytes] | None"]
"""The units of one read; None at the end of the body."""

# An SSE comment line: ignored by every client, but it crosses the network,
# so intermediaries keep an idle stream open and a gone client shows.
HEARTBEAT = b": keep-alive\n\n"


def paced(next_units: Units, interval: float) -> tuple[Units, Callable[[], None]]:
    """(next_units, stop): ``next_units`` that gives [HEARTBEAT] whenever no read finished for ``interval`` seconds.

    A blocked socket read cannot be given up and resumed, so the reads move
    to a greenlet of their own and the relay waits on a queue with a timeout;
    ``stop`` ends that greenlet.
    """
    queue: gevent.queue.Queue = gevent.queue.Queue(maxsize=1)

    def pump() -> None:
        try:
            while True:
                units = next_units()
                queue.put(units)
                if units is None:
                    return
        except Exception as exc:
            queue.put(exc)

    reader = gevent.spawn(pump)

    def with_heartbeats() -> list[bytes] | None:
        try:
            item = queue.get(timeout=interval)
        except gevent.queue.Empty:
            return [HEARTBEAT]
        if isinstance(item, Exception):
            raise item
        return item
    return with_heartbeats, lambda: reader.kill(block=False)
