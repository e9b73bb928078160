"""The tests' OTLP receiver itself: what OpenTelemetry's exporter sends, plain or gzip, arrives as it was sent."""
import socket
import time

import pytest
from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.trace import Link, SpanKind, StatusCode, set_span_in_context

from tests.support.otlp_receiver import OtlpReceiver, children, roots, tree


@pytest.mark.parametrize("compression", [Compression.NoCompression, Compression.Gzip, Compression.Deflate])
def test_spans_arrive_with_their_kind_ids_attributes_events_links_and_status(compression):
    with OtlpReceiver() as receiver:
        provider = TracerProvider(resource=Resource({"service.name": "t"}), shutdown_on_exit=False)
        provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(
            endpoint=receiver.endpoint + "/v1/traces", compression=compression)))
        tracer = provider.get_tracer("t")
        outside = tracer.start_span("outside")
        outside.end()
        parent = tracer.start_span("GET", kind=SpanKind.SERVER, links=[Link(outside.get_span_context())],
                                   attributes={"a": "x", "n": 3, "f": 0.5, "b": True, "l": ("p", "q")})
        child = tracer.start_span("GET", context=set_span_in_context(parent), kind=SpanKind.CLIENT)
        child.add_event("first", {"k": 1})
        child.set_status(StatusCode.ERROR)
        child.end()
        parent.end()
        provider.shutdown()
        spans = receiver.wait_for(3, timeout=5)
    server = next(s for s in roots(spans) if s.kind == "SERVER")
    assert server.attributes == {"a": "x", "n": 3, "f": 0.5, "b": True, "l": ("p", "q")}
    assert server.resource["service.name"] == "t" and server.parent_id == ""
    ctx = outside.get_span_context()
    assert server.links == [(f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}", {})]
    [client] = children(spans, server)
    assert (client.kind, client.status, client.event("first")) == ("CLIENT", "ERROR", {"k": 1})
    assert "  CLIENT GET" in tree(spans) and "event first" in tree(spans)


def test_a_receiver_that_is_down_refuses_and_a_slow_one_answers_late():
    with OtlpReceiver() as receiver:
        receiver.slow(0.3)
        exporter = OTLPSpanExporter(endpoint=receiver.endpoint + "/v1/traces", timeout=5)
        provider = TracerProvider(shutdown_on_exit=False)
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        began = time.monotonic()
        provider.get_tracer("t").start_span("s").end()
        assert time.monotonic() - began >= 0.3 and len(receiver.spans) == 1
        receiver.down()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", receiver.port), timeout=1)
