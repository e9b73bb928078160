"""Traces (OpenTelemetry): the switch, and what a request holds when tracing is off.

Nothing of OpenTelemetry is imported here. ``start`` decides from the setting
``tracing`` and OpenTelemetry's own environment variables whether this worker
traces; only then does it import ``forkproxy.tracing.otel`` (the SDK, the OTLP
exporter), in the worker, after the fork. Off, every request holds ``NO_TRACE``
and hooks see ``NO_SPAN``: shared objects whose methods do nothing, so the
lifecycle calls them without asking whether tracing is on, and a request
costs a few no-op method calls.

What a request's trace is made of when on (``otel.Tracing``):

    SERVER  GET                      the request, received to reply (a stream: to its end)
      CLIENT  POST   attempt 1       one per attempt, until its reply head was judged
      CLIENT  POST   attempt 2       (retries, failover, resumes: siblings)
"""
from __future__ import annotations

import logging
import os
from typing import Any, Mapping

log = logging.getLogger("forkproxy")

# Any of these set (and the extra installed) turns tracing on when the setting is None.
ENV_SWITCHES = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_TRACES_EXPORTER")


from forkproxy.tracing.off import (NO_ATTEMPT, NO_SPAN, NO_TRACE, OFF, NoAttempt, NoSpan, NoTrace, Off,
                                   TracingUnavailable)

__all__ = ["NO_ATTEMPT", "NO_SPAN", "NO_TRACE", "OFF", "NoAttempt", "NoSpan", "NoTrace", "Off", "TracingUnavailable",
           "for_worker", "shutdown_worker", "start", "switched_on"]


def switched_on(setting: bool | None, env: Mapping[str, str] = os.environ) -> bool:
    """Whether the setting ``tracing`` and the environment ask for tracing (the extra may still be missing).

    ``None`` follows OpenTelemetry's variables: on when an exporter is named
    (``ENV_SWITCHES``), unless ``OTEL_SDK_DISABLED`` is true. Either way
    ``OTEL_TRACES_EXPORTER=none`` means no traces.
    """
    if setting is False or env.get("OTEL_TRACES_EXPORTER", "").strip().lower() == "none":
        return False
    if setting is True:
        return True
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    return any(env.get(name, "").strip() for name in ENV_SWITCHES)


def start(setting: bool | None, env: Mapping[str, str] = os.environ) -> Any:
    """This worker's tracing, ``OFF`` or an ``otel.Tracing``: call it in the worker, after the fork.

    With ``tracing=True`` a missing extra is ``TracingUnavailable``; with
    ``None`` it is a warning, and tracing stays off.
    """
    if not switched_on(setting, env):
        return OFF
    try:
        from forkproxy.tracing.otel import Tracing
    except ImportError as exc:
        why = f"tracing needs the extra forkproxy[otel] ({exc})"
        if setting is True:
            raise TracingUnavailable(why) from None
        log.warning("%s: traces are off", why)
        return OFF
    return Tracing.from_env()  # OpenTelemetry reads its variables from os.environ itself


# -- the worker's one tracing -----------------------------------------------------------

_worker: Any = None  # this process's tracing, once something asked for it


def for_worker(setting: bool | None) -> Any:
    """This process's tracing, made on first use: in a gunicorn worker, after the fork.

    One per process (one tracer provider, one batch thread, one exporter),
    shared by every ``Proxy`` in it that does not turn tracing off; the
    first to ask decides with its ``setting``.
    """
    global _worker
    if setting is False:
        return OFF
    if _worker is None:
        _worker = start(setting)
    return _worker


def shutdown_worker(timeout: float) -> bool:
    """Flush and stop this process's tracing within ``timeout`` seconds (gunicorn's ``worker_exit``)."""
    return True if _worker is None else _worker.shutdown(timeout)


def _forget() -> None:
    """A forked child makes its own: the parent's batch thread did not come along."""
    global _worker
    _worker = None


os.register_at_fork(after_in_child=_forget)
