"""What a request holds when tracing is off, or not sampled: shared objects whose methods do nothing.

Apart from ``forkproxy.tracing``'s switch so that ``otel`` (tracing on) can
hand out the same no-op attempt without importing the switch that imports it.
"""
from __future__ import annotations

from typing import Any, Container, Mapping, Sequence


class TracingUnavailable(RuntimeError):
    """Tracing was asked for (``tracing=True``) but cannot run here; the message is one line."""


class NoSpan:
    """``req.span`` when tracing is off or the request is not sampled: takes what a Span takes, keeps nothing.

    It has the methods of OpenTelemetry's ``Span`` that a hook uses, so a
    hook written for tracing runs unchanged without it.
    """

    __slots__ = ()

    def set_attribute(self, key: str, value: Any) -> None:
        pass

    def set_attributes(self, attributes: Mapping[str, Any]) -> None:
        pass

    def add_event(self, name: str, attributes: Mapping[str, Any] | None = None,
                  timestamp: int | None = None) -> None:
        pass

    def record_exception(self, exception: BaseException, attributes: Mapping[str, Any] | None = None,
                         timestamp: int | None = None, escaped: bool = False) -> None:
        pass

    def set_status(self, status: Any, description: str | None = None) -> None:
        pass

    def update_name(self, name: str) -> None:
        pass

    def is_recording(self) -> bool:
        return False

    def __repr__(self) -> str:
        return "NO_SPAN"


NO_SPAN = NoSpan()


class NoAttempt:
    """An attempt's trace when nothing is recorded."""

    __slots__ = ()

    def end(self, status: int = 0, error_type: str | None = None, verdict: str | None = None) -> None:
        pass


NO_ATTEMPT = NoAttempt()


class NoTrace:
    """A request's trace when tracing is off: the same calls as ``otel.RequestTrace``, each doing nothing."""

    __slots__ = ()
    span = NO_SPAN

    def attempt(self, member: Any, method: str, resend_count: int, headers: Any) -> NoAttempt:
        return NO_ATTEMPT

    def limited(self, limits: Sequence[Any], refused: str | None = None) -> None:
        pass

    def status(self, status: int) -> None:
        pass

    def first_unit(self) -> None:
        pass

    def answered(self, status: int, error_type: str | None = None) -> None:
        pass

    def stream_ended(self, stats: Any, error_type: str | None = None) -> None:
        pass

    def tunnel_ended(self, stats: Any) -> None:
        pass


NO_TRACE = NoTrace()


class Off:
    """A worker's tracing when it is off."""

    __slots__ = ()
    enabled = False

    def request(self, environ: dict, trusted: Container[str]) -> NoTrace:
        return NO_TRACE

    def shutdown(self, timeout: float) -> bool:
        return True


OFF = Off()
