"""A real OTLP/HTTP trace receiver for the tests, on 127.0.0.1 at an ephemeral port.

It takes ``POST /v1/traces`` (protobuf, plain, gzip or deflate), decodes it
with ``opentelemetry-proto``, and keeps each span as a plain ``Span``. Tests
wait for spans (bounded), and read them as a tree. For the exporter-down
tests it can answer late (``slow``) or stop listening (``down``: connections
are refused).
"""
from __future__ import annotations

import gzip
import threading
import time
import zlib
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterable

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (ExportTraceServiceRequest,
                                                                       ExportTraceServiceResponse)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span as ProtoSpan, Status as ProtoStatus

_KINDS = {value: name.removeprefix("SPAN_KIND_") for name, value in ProtoSpan.SpanKind.items()}
_STATUS = {value: name.removeprefix("STATUS_CODE_") for name, value in ProtoStatus.StatusCode.items()}


@dataclass
class Span:
    """One span as it arrived: ids in hex (``parent_id`` "" for a root), attributes as a plain dict."""

    name: str
    kind: str  # SERVER, CLIENT, INTERNAL, ...
    trace_id: str
    span_id: str
    parent_id: str
    attributes: dict[str, Any]
    events: list[tuple[str, dict[str, Any], int]]  # (name, attributes, time_unix_nano)
    links: list[tuple[str, str, dict[str, Any]]]  # (trace_id, span_id, attributes)
    status: str  # UNSET, OK or ERROR
    start_ns: int
    end_ns: int
    resource: dict[str, Any] = field(default_factory=dict)

    def event(self, name: str) -> dict[str, Any] | None:
        return next((attrs for got, attrs, _ in self.events if got == name), None)


def value(any_value: AnyValue) -> Any:
    """An OTLP ``AnyValue`` as the Python value it holds (an array as a tuple)."""
    kind = any_value.WhichOneof("value")
    if kind == "array_value":
        return tuple(value(v) for v in any_value.array_value.values)
    if kind == "kvlist_value":
        return attributes(any_value.kvlist_value.values)
    return None if kind is None else getattr(any_value, kind)


def attributes(pairs: Iterable[Any]) -> dict[str, Any]:
    return {pair.key: value(pair.value) for pair in pairs}


def decode(body: bytes) -> list[Span]:
    """The spans of one ``ExportTraceServiceRequest``."""
    request = ExportTraceServiceRequest()
    request.ParseFromString(body)
    spans = []
    for resource_spans in request.resource_spans:
        resource = attributes(resource_spans.resource.attributes)
        for scope_spans in resource_spans.scope_spans:
            for s in scope_spans.spans:
                spans.append(Span(
                    name=s.name, kind=_KINDS.get(s.kind, str(s.kind)), trace_id=s.trace_id.hex(),
                    span_id=s.span_id.hex(), parent_id=s.parent_span_id.hex(), attributes=attributes(s.attributes),
                    events=[(e.name, attributes(e.attributes), e.time_unix_nano) for e in s.events],
                    links=[(link.trace_id.hex(), link.span_id.hex(), attributes(link.attributes)) for link in s.links],
                    status=_STATUS.get(s.status.code, str(s.status.code)), start_ns=s.start_time_unix_nano,
                    end_ns=s.end_time_unix_nano, resource=resource))
    return spans


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "_Server"

    def log_message(self, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        receiver = self.server.receiver
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if receiver.delay:
            time.sleep(receiver.delay)
        if self.path != "/v1/traces":
            self._answer(404, b"")
            return
        encoding = (self.headers.get("Content-Encoding") or "").lower()
        if encoding == "gzip":
            body = gzip.decompress(body)
        elif encoding == "deflate":
            body = zlib.decompress(body)
        receiver.add(decode(body))
        self._answer(200, ExportTraceServiceResponse().SerializeToString())

    def _answer(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    receiver: "OtlpReceiver"


class OtlpReceiver:
    """The receiver: ``endpoint`` for ``OTEL_EXPORTER_OTLP_ENDPOINT``; ``spans`` as they came. Use it as a
    context manager, or ``close`` it."""

    def __init__(self) -> None:
        self.delay = 0.0
        self.posts = 0
        self.spans: list[Span] = []
        self._changed = threading.Condition()
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.receiver = self
        self.port = self._server.server_address[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()

    def __enter__(self) -> "OtlpReceiver":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def add(self, spans: list[Span]) -> None:
        with self._changed:
            self.posts += 1
            self.spans.extend(spans)
            self._changed.notify_all()

    def slow(self, seconds: float) -> None:
        """Answer each export ``seconds`` late (the spans are kept when it does answer)."""
        self.delay = seconds

    def down(self) -> None:
        """Stop listening: from now on connections to ``endpoint`` are refused."""
        self.close()

    def close(self) -> None:
        if self._thread.is_alive():
            self._server.shutdown()
        self._server.server_close()

    def wait_for(self, count: int, timeout: float = 10.0) -> list[Span]:
        """At least ``count`` spans, waited for up to ``timeout`` seconds; AssertionError naming what came."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while len(self.spans) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"{len(self.spans)} spans within {timeout}s, not {count}:\n"
                                         f"{tree(self.spans)}")
                self._changed.wait(left)
            return list(self.spans)

    def trace(self, trace_id: str) -> list[Span]:
        return [s for s in self.spans if s.trace_id == trace_id]


def children(spans: list[Span], parent: Span) -> list[Span]:
    """The spans whose parent is ``parent``, in the order they started."""
    return sorted((s for s in spans if s.parent_id == parent.span_id and s.trace_id == parent.trace_id),
                  key=lambda s: s.start_ns)


def roots(spans: list[Span]) -> list[Span]:
    """Spans whose parent is not among ``spans`` (a root, or a continued trace's first span here)."""
    ids = {(s.trace_id, s.span_id) for s in spans}
    return sorted((s for s in spans if (s.trace_id, s.parent_id) not in ids), key=lambda s: s.start_ns)


def tree(spans: list[Span], keys: Iterable[str] = ()) -> str:
    """The spans as an indented tree, each with its kind, duration, status and the attributes ``keys`` name
    (all of them when none are named): what a test prints, and the README's example is copied from."""
    keys = tuple(keys)
    lines: list[str] = []

    def show(span: Span, depth: int) -> None:
        shown = {k: v for k, v in span.attributes.items() if not keys or k in keys}
        ms = (span.end_ns - span.start_ns) / 1e6
        status = "" if span.status == "UNSET" else f" {span.status}"
        lines.append(f"{'  ' * depth}{span.kind} {span.name} {ms:.1f}ms{status} "
                     + " ".join(f"{k}={v}" for k, v in shown.items()))
        for name, attrs, at in span.events:
            lines.append(f"{'  ' * (depth + 1)}event {name} +{(at - span.start_ns) / 1e6:.1f}ms "
                         + " ".join(f"{k}={v}" for k, v in attrs.items()))
        for child in children(spans, span):
            show(child, depth + 1)

    for root in roots(spans):
        show(root, 0)
    return "\n".join(line.rstrip() for line in lines)
