"""Ending open streams and tunnels before a stopping worker is killed, so each is still billed.

On SIGTERM (or SIGHUP) gunicorn's master gives its workers ``graceful_timeout``
seconds and then SIGKILLs those still running; the gevent worker's own kill
of its leftover greenlets is due at the same moment or up to a second later
(gunicorn 27), so it loses that race. A stream ended by SIGKILL never reaches
``on_stream_end``: the usage it carried is never billed (a tunnel likewise
never reaches ``on_tunnel_end``). So each worker watches for its own stop
and, shortly before the master's deadline, cuts the streams and tunnels still
open itself, leaving the rest of the time for their end hooks. A stream or
tunnel is registered here from its start until its ``finish``.

gunicorn has no worker-side hook for SIGTERM, hence the watcher polls the
worker's ``alive`` flag, which gunicorn's handler clears.
"""
from __future__ import annotations

import time
from typing import Any, Protocol

import gevent
from gevent import GreenletExit

_POLL = 0.25
_open: set["Stoppable"] = set()
_stopped_at: float | None = None  # when this worker saw its stop (monotonic)


class Stoppable(Protocol):
    greenlet: Any  # runs the item, and its end hooks: what stop_all waits for

    def stop(self) -> None:
        """End now, as ended by the worker's stop (a stream raises ``WorkerStopping`` in its greenlet)."""


class WorkerStopping(GreenletExit):
    """Raised in a stream's greenlet when the worker stops before the stream ended.

    A GreenletExit, so that wherever it lands (in the relay or in the
    server's write to a slow client) gevent treats it as a plain kill.
    """


def opened(item: Stoppable) -> None:
    _open.add(item)


def closed(item: Stoppable) -> None:
    _open.discard(item)


def watch(worker: Any) -> None:
    """From ``post_worker_init``: end this worker's streams before its graceful time runs out."""
    gevent.spawn(_watch, worker, float(worker.cfg.graceful_timeout))


def _watch(worker: Any, graceful_timeout: float) -> None:
    global _stopped_at
    while worker.alive:
        gevent.sleep(_POLL)
    _stopped_at = time.monotonic() - _POLL  # the stop came up to one poll before
    spare = min(2.0, graceful_timeout / 2)  # for the hooks of the streams cut (billing, logs)
    deadline = time.monotonic() + graceful_timeout - spare - _POLL
    while _open and time.monotonic() < deadline:
        gevent.sleep(0.1)
    stop_all(spare)


def time_left(graceful_timeout: float) -> float:
    """Seconds until the master kills this stopping worker, less a margin: what a last flush may take.

    A stop this worker did not see (SIGQUIT, an error) gets a short flush.
    """
    if _stopped_at is None:
        return min(2.0, graceful_timeout / 2)
    return max(_stopped_at + graceful_timeout - time.monotonic() - 0.25, 0.1)


def stop_all(timeout: float) -> None:
    """Stop everything still open and wait up to ``timeout`` for its hooks to finish."""
    items = list(_open)
    for item in items:
        item.stop()
    gevent.joinall([item.greenlet for item in items], timeout=timeout)
