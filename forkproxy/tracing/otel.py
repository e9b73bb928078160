"""Tracing on: OpenTelemetry's SDK, one tracer provider per worker, spans out through a bounded batch processor.

Imported only by ``forkproxy.tracing.start``, in a worker that traces. Made
after the fork (a provider's batch thread, a greenlet under gevent, lives in
the process that made it), configured by OpenTelemetry's own environment
variables: ``OTEL_SERVICE_NAME`` (default ``forkproxy``) and
``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_TRACES_SAMPLER`` and its argument,
``OTEL_EXPORTER_OTLP_*`` (endpoint, headers, timeout, compression, protocol),
``OTEL_BSP_*`` (queue, batch, delay).

W3C trace context (``traceparent``, ``tracestate``) with OpenTelemetry's own
``TraceContextTextMapPropagator``, not the global propagator that
``OTEL_PROPAGATORS`` configures: the contract is W3C trace context, and a
composite with baggage would also forward an untrusted client's ``baggage``.
An incoming context is continued only from a trusted peer; from any other
peer the request starts a new trace that links to it.

The queue is bounded (``OTEL_BSP_MAX_QUEUE_SIZE``, default 2048): a down or
slow exporter fills it, and spans beyond it are dropped, never waited for.
What is dropped is counted in ``forkproxy_traces_dropped_total`` by reason.
The SDK's ``BatchSpanProcessor`` drops silently when its queue is full: its
only count is its own OpenTelemetry metric, kept when
``OTEL_PYTHON_SDK_INTERNAL_METRICS_ENABLED`` is set and a meter provider is
given, which a Prometheus counter cannot read. Hence ``BoundedBatch``, a
``SpanProcessor`` in front of it, which keeps the bound itself: it counts
the spans it handed on less those its exporter was handed (``Counted``, a
delegate around the real exporter), and drops a span, counted, when that is
the whole queue. The batch processor's own queue so never overflows.
"""
from __future__ import annotations

import logging
import os
import threading
from importlib import metadata
from typing import Any, Callable, Container, Sequence

from opentelemetry.propagators.textmap import Getter
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.trace import Link, SpanKind, Status, StatusCode, get_current_span, set_span_in_context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from forkproxy.tracing.off import NO_ATTEMPT, NoAttempt, TracingUnavailable

log = logging.getLogger("forkproxy")

DEFAULT_SERVICE_NAME = "forkproxy"
DEFAULT_MAX_QUEUE_SIZE = 2048  # OpenTelemetry's default for OTEL_BSP_MAX_QUEUE_SIZE
DEFAULT_MAX_EXPORT_BATCH_SIZE = 512  # and for OTEL_BSP_MAX_EXPORT_BATCH_SIZE
FIRST_UNIT = "forkproxy.first_unit"  # the event at a stream's first unit: time to first byte (or token)
# OpenTelemetry's HTTP conventions: any other method is "_OTHER", its span named "HTTP".
_METHODS = frozenset(("CONNECT", "DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT", "TRACE"))
_PROPAGATOR = TraceContextTextMapPropagator()
_FIELDS = tuple(_PROPAGATOR.fields)  # traceparent, tracestate

DropCounter = Callable[[str, int], None]
"""``count(reason, spans)``: spans dropped, for ``forkproxy_traces_dropped_total`` (``queue_full``,
``export_failed``, ``shutdown``)."""


def count_dropped(reason: str, spans: int) -> None:
    """Dropped spans into the Prometheus counter, when metrics are collected."""
    from forkproxy.metrics import metrics

    counters = metrics()
    if counters.enabled:
        counters.traces_dropped.labels(reason).inc(spans)


# -- the worker's tracing --------------------------------------------------------------

class Tracing:
    """One worker's tracer provider, batch processor and exporter; ``request`` starts each request's trace."""

    enabled = True

    def __init__(self, exporter: SpanExporter, *, max_queue_size: int = DEFAULT_MAX_QUEUE_SIZE,
                 count: DropCounter = count_dropped, resource: Resource | None = None, sampler: Any = None,
                 **batch: Any) -> None:
        """``sampler`` None: OpenTelemetry's from ``OTEL_TRACES_SAMPLER`` (default parent-based, always on).
        ``batch``: ``BatchSpanProcessor``'s other keywords (else its ``OTEL_BSP_*`` variables)."""
        self.provider = TracerProvider(sampler=sampler, resource=resource or service_resource(),
                                       shutdown_on_exit=False)  # a worker's exit flushes in ``shutdown``, bounded
        self.processor = BoundedBatch(exporter, max_queue_size, count, **batch)
        self.provider.add_span_processor(self.processor)
        self.tracer = self.provider.get_tracer("forkproxy", _version())

    @classmethod
    def from_env(cls) -> "Tracing":
        """As OpenTelemetry's environment variables say; ``TracingUnavailable`` (one line) for what cannot be had.

        A queue set below the default batch size (``OTEL_BSP_MAX_QUEUE_SIZE=16`` alone) exports batches of
        the queue's size, where the SDK would raise. A batch size set above the queue, or another
        ``OTEL_BSP_*`` value the SDK refuses, is ``TracingUnavailable``: never a ValueError out of a request.
        """
        env = os.environ
        queue = _positive(env, "OTEL_BSP_MAX_QUEUE_SIZE", DEFAULT_MAX_QUEUE_SIZE)
        batch = _positive(env, "OTEL_BSP_MAX_EXPORT_BATCH_SIZE", min(DEFAULT_MAX_EXPORT_BATCH_SIZE, queue))
        if batch > queue:
            raise TracingUnavailable(f"OTEL_BSP_MAX_EXPORT_BATCH_SIZE ({batch}) must not exceed "
                                     f"OTEL_BSP_MAX_QUEUE_SIZE ({queue})")
        try:
            return cls(exporter_from_env(), max_queue_size=queue, max_export_batch_size=batch)
        except ValueError as exc:  # the SDK's checks of the other OTEL_BSP_* variables
            raise TracingUnavailable(f"OpenTelemetry's batch processor: {exc}") from None

    def request(self, environ: dict, trusted: Container[str]) -> "RequestTrace":
        """A request's SERVER span, from its WSGI environ; ``trusted``: the peers whose trace context is continued."""
        parent, links = incoming(environ, trusted)
        method = environ.get("REQUEST_METHOD", "")
        attributes = server_attributes(environ, method)
        span = self.tracer.start_span(method if method in _METHODS else "HTTP", context=parent,
                                      kind=SpanKind.SERVER, attributes=attributes, links=links)
        return RequestTrace(self.tracer, span)

    def shutdown(self, timeout: float) -> bool:
        """Export what is queued and stop, within ``timeout`` seconds; False when cut short (the rest dropped).

        The SDK's shutdown waits up to 30 s and its flush takes no timeout,
        so it runs in its own thread (a greenlet under gevent), waited for
        ``timeout``; past it the exporter is shut, which ends its retry waits.
        """
        done = threading.Thread(target=self.provider.shutdown, name="forkproxy-tracing-shutdown", daemon=True)
        done.start()
        done.join(max(timeout, 0.0))
        if not done.is_alive():
            return True
        self.processor.abandon()
        return False


class RequestTrace:
    """One request's trace: its SERVER span (``span``, which hooks see as ``req.span``), and its attempts'.

    Not sampled, ``span`` records nothing: the calls return at once, but
    each attempt still sends the request's trace context (not sampled), so
    the services behind keep to the same decision.
    """

    __slots__ = ("span", "recording", "_tracer", "_context", "_status")

    def __init__(self, tracer: Any, span: Any) -> None:
        self.span = span
        self.recording = span.is_recording()
        self._tracer = tracer
        self._context = set_span_in_context(span)
        self._status = 0

    def attempt(self, member: Any, method: str, resend_count: int, headers: Any) -> "AttemptTrace | NoAttempt":
        """An attempt's CLIENT span, child of the request's; its ``traceparent`` set in ``headers``.

        ``member``: the ``Upstream`` it goes to; ``resend_count``: attempts
        before it (0 for the first); ``headers``: the ``HTTPHeaderDict`` it
        sends (set just before its head is encoded: each attempt sends its own).
        """
        if not self.recording:
            inject(self._context, headers)
            return NO_ATTEMPT
        span = self._tracer.start_span(method if method in _METHODS else "HTTP", context=self._context,
                                       kind=SpanKind.CLIENT, attributes=attempt_attributes(member, method,
                                                                                           resend_count))
        inject(set_span_in_context(span), headers)
        return AttemptTrace(span)

    def limited(self, limits: Sequence[Any], refused: str | None = None) -> None:
        """The request's rate limits (``Limit``) by their names, a key's prefix, never the key; and the name of
        the one that refused it (429)."""
        if not self.recording:
            return
        self.span.set_attribute("forkproxy.rate_limit.names", tuple(limit.name for limit in limits))
        if refused is not None:
            self.span.set_attribute("forkproxy.rate_limit.refused", refused)

    def status(self, status: int) -> None:
        """The status of the reply head sent to the client."""
        self._status = status
        if self.recording:
            self.span.set_attribute("http.response.status_code", status)

    def first_unit(self) -> None:
        """A stream's first unit went out: its time to first byte (or token)."""
        if self.recording:
            self.span.add_event(FIRST_UNIT)

    def _end(self, error_type: str | None = None) -> None:
        """The request is over. ``error_type``: the proxy error's type; else a 5xx relayed counts as an error."""
        if not self.recording:
            return
        if error_type is None and self._status >= 500:
            error_type = str(self._status)
        if error_type is not None:
            self.span.set_attribute("error.type", error_type)
            self.span.set_status(Status(StatusCode.ERROR))
        self.span.end()
        self.recording = False  # once: later calls do nothing

    def answered(self, status: int, error_type: str | None = None) -> None:
        """A reply sent whole (every request neither streamed nor tunnelled): its status, then the end."""
        self.status(status)
        self._end(error_type)

    def stream_ended(self, stats: Any, error_type: str | None = None) -> None:
        """A stream's end (``StreamStats``): bytes, units, resumes, errored, client_disconnected; then the span's end."""
        if not self.recording:
            return
        self.span.set_attributes({
            "forkproxy.stream.bytes": stats.byte_count,
            "forkproxy.stream.units": stats.chunk_count,
            "forkproxy.stream.resumes": stats.resumes,
            "forkproxy.stream.errored": stats.errored,
            "forkproxy.stream.client_disconnected": stats.client_disconnected,
        })
        self._end(error_type if error_type is not None or not stats.errored else "stream_cut")

    def tunnel_ended(self, stats: Any) -> None:
        """A tunnel's end (``TunnelStats``): bytes and messages each way, who closed it; then the span's end."""
        if not self.recording:
            return
        self.span.set_attributes({
            "forkproxy.tunnel.bytes_from_client": stats.bytes_from_client,
            "forkproxy.tunnel.bytes_from_upstream": stats.bytes_from_upstream,
            "forkproxy.tunnel.messages_from_client": stats.messages_from_client,
            "forkproxy.tunnel.messages_from_upstream": stats.messages_from_upstream,
            "forkproxy.tunnel.closed_by": stats.closed_by,
        })
        self._end("tunnel_cut" if stats.errored else None)


class AttemptTrace:
    """One attempt's CLIENT span, ended once its outcome is known."""

    __slots__ = ("span",)

    def __init__(self, span: Any) -> None:
        self.span = span

    def end(self, status: int = 0, error_type: str | None = None, verdict: str | None = None) -> None:
        """``status``: the reply head's (0: none came); ``error_type``: the failure's ``ProxyError.type``;
        ``verdict``: ``judge_reply``'s, when it gave one. A 4xx/5xx is an error of the attempt."""
        span = self.span
        if status:
            span.set_attribute("http.response.status_code", status)
            if error_type is None and status >= 400:
                error_type = str(status)
        if verdict is not None:
            span.set_attribute("forkproxy.verdict", verdict)
        if error_type is not None:
            span.set_attribute("error.type", error_type)
            span.set_status(Status(StatusCode.ERROR))
        span.end()


# -- the parts -------------------------------------------------------------------------

def _version() -> str:
    """forkproxy's version as installed, for the tracer's scope (none when run from a checkout that is not).

    From the installed metadata, not ``forkproxy.__version__``: importing the
    package's top here would close an import circle through the request path.
    """
    try:
        return metadata.version("forkproxy")
    except metadata.PackageNotFoundError:
        return ""


class _EnvironGetter(Getter):
    """Trace context fields out of a WSGI environ (``traceparent`` is ``HTTP_TRACEPARENT``)."""

    def get(self, carrier: dict, key: str) -> list[str] | None:
        value = carrier.get("HTTP_" + key.upper().replace("-", "_"))
        return [value] if value else None

    def keys(self, carrier: dict) -> list[str]:
        return [key[5:].lower().replace("_", "-") for key in carrier if key.startswith("HTTP_")]


_ENVIRON = _EnvironGetter()


def incoming(environ: dict, trusted: Container[str]) -> tuple[Any, tuple[Link, ...]]:
    """The parent of a request's SERVER span and its links, from the trace context it came with.

    From a trusted peer a valid ``traceparent`` is the parent (its
    ``tracestate`` kept). From any other, a new trace starts, linked to the
    one given: an outside client can neither join an internal trace nor
    choose its id or sampling.
    """
    if "HTTP_TRACEPARENT" not in environ:
        return None, ()
    context = _PROPAGATOR.extract(environ, getter=_ENVIRON)
    given = get_current_span(context).get_span_context()
    if not given.is_valid:
        return None, ()
    if environ.get("REMOTE_ADDR", "") in trusted:
        return context, ()
    return None, (Link(given),)


def inject(context: Any, headers: Any) -> None:
    """The span of ``context`` as ``traceparent`` (and ``tracestate``) in ``headers``, replacing what came in."""
    for name in _FIELDS:
        headers.discard(name)
    _PROPAGATOR.inject(headers, context=context)


def server_attributes(environ: dict, method: str) -> dict[str, Any]:
    """A SERVER span's attributes at its start, after OpenTelemetry's HTTP server conventions."""
    target = environ.get("RAW_URI") or environ.get("PATH_INFO", "")
    attributes: dict[str, Any] = {
        "http.request.method": method if method in _METHODS else "_OTHER",
        "url.path": target.partition("?")[0],  # never the query: it may hold a key
        "url.scheme": environ.get("wsgi.url_scheme", "http"),
        "client.address": environ.get("REMOTE_ADDR", ""),
    }
    if method not in _METHODS:
        attributes["http.request.method_original"] = method
    agent = environ.get("HTTP_USER_AGENT")
    if agent:
        attributes["user_agent.original"] = agent
    protocol = environ.get("SERVER_PROTOCOL", "")
    if protocol.startswith("HTTP/"):
        attributes["network.protocol.version"] = protocol[5:]
    return attributes


def attempt_attributes(member: Any, method: str, resend_count: int) -> dict[str, Any]:
    """A CLIENT span's attributes at its start; ``http.request.resend_count`` only on a resend (the conventions')."""
    base = member.base
    attributes: dict[str, Any] = {
        "http.request.method": method if method in _METHODS else "_OTHER",
        "server.address": base.host,
        "server.port": base.port,
        "forkproxy.upstream": member.name,
    }
    if resend_count:
        attributes["http.request.resend_count"] = resend_count
    return attributes


def service_resource() -> Resource:
    """OpenTelemetry's resource from the environment, named ``forkproxy`` unless it names the service."""
    resource = Resource.create()
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: DEFAULT_SERVICE_NAME}))
    return resource


def exporter_from_env() -> SpanExporter:
    """The exporter ``OTEL_TRACES_EXPORTER`` names (``otlp``, the default, or ``console``), OTLP over the
    protocol ``OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL`` names (``http/protobuf``, or ``grpc`` with its package)."""
    env = os.environ
    name = env.get("OTEL_TRACES_EXPORTER", "").strip().lower() or "otlp"
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter(service_name=DEFAULT_SERVICE_NAME)
    if name != "otlp":
        raise TracingUnavailable(f"OTEL_TRACES_EXPORTER={name!r}: forkproxy exports with otlp or console")
    protocol = (env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
                or "http/protobuf").strip().lower()
    if protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    elif protocol == "grpc":
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter  # type: ignore
        except ImportError:
            raise TracingUnavailable("OTLP over grpc needs opentelemetry-exporter-otlp-proto-grpc") from None
    else:
        raise TracingUnavailable(f"OTLP protocol {protocol!r}: forkproxy exports http/protobuf or grpc")
    return OTLPSpanExporter()


def _positive(env: Any, name: str, default: int) -> int:
    try:
        value = int(env.get(name) or default)
    except ValueError:
        raise TracingUnavailable(f"{name}: not a whole number: {env.get(name)!r}") from None
    if value < 1:
        raise TracingUnavailable(f"{name}: must be at least 1: {value}")
    return value


# -- the bounded batch ---------------------------------------------------------------

class BoundedBatch(SpanProcessor):
    """OpenTelemetry's ``BatchSpanProcessor``, its queue bound kept here so that what is dropped is counted.

    ``pending``: spans handed on and not yet handed to the exporter. The
    worker's greenlets add, the batch thread takes away; under gevent
    neither is interrupted in between, and under OS threads a lost update
    errs by a span, once.
    """

    def __init__(self, exporter: SpanExporter, max_queue_size: int, count: DropCounter, **batch: Any) -> None:
        self.max_queue_size = max_queue_size
        self.count = count
        self.pending = 0
        self._warned = False
        self.exporter = Counted(exporter, self)
        self.batch = BatchSpanProcessor(self.exporter, max_queue_size=max_queue_size, **batch)

    def on_start(self, span: Any, parent_context: Any = None) -> None:
        self.batch.on_start(span, parent_context)

    def on_end(self, span: ReadableSpan) -> None:
        if not span.context.trace_flags.sampled:
            return
        if self.pending >= self.max_queue_size:
            self.dropped("queue_full", 1)
            return
        self.pending += 1
        self.batch.on_end(span)

    def exported(self, spans: int) -> None:
        self.pending = max(self.pending - spans, 0)

    def dropped(self, reason: str, spans: int) -> None:
        """Counted; logged the first time. Called from a span's end: whatever fails here, the request goes on."""
        try:
            if not self._warned:
                self._warned = True
                log.warning("traces: spans dropped (%s); forkproxy_traces_dropped_total counts them", reason)
            self.count(reason, spans)
        except Exception:
            log.exception("traces: counting %d dropped spans failed", spans)

    def abandon(self) -> None:
        """Shutdown ran out of time: what is still queued is dropped, and the exporter stops retrying.

        So is the batch whose export is under way: the worker exits before its answer, so nothing
        says it arrived, and nothing else would count it.
        """
        left, self.pending = self.pending + self.exporter.in_flight, 0
        self.exporter.in_flight = 0
        if left:
            self.dropped("shutdown", left)
        self.exporter.shutdown()

    def shutdown(self) -> None:
        self.batch.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.batch.force_flush(timeout_millis)


class Counted(SpanExporter):
    """The real exporter, told to ``BoundedBatch``: what leaves the queue, and what failed to go out."""

    def __init__(self, exporter: SpanExporter, batch: BoundedBatch) -> None:
        self.exporter = exporter
        self.batch = batch
        self.in_flight = 0  # spans of the export under way
        self._shut = False

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.batch.exported(len(spans))
        self.in_flight = len(spans)
        try:
            result = self.exporter.export(spans)
        except Exception:
            self._failed()
            raise
        if result is not SpanExportResult.SUCCESS:
            self._failed()
        self.in_flight = 0
        return result

    def _failed(self) -> None:
        """The export under way failed: counted, unless a shutdown that ran out of time counted it already."""
        spans, self.in_flight = self.in_flight, 0
        if spans:
            self.batch.dropped("export_failed", spans)

    def shutdown(self) -> None:
        if not self._shut:  # by the SDK's shutdown, or by ``abandon`` when that ran out of time: once
            self._shut = True
            self.exporter.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.exporter.force_flush(timeout_millis)
