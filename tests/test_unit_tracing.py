"""Tracing's parts without gunicorn: the switch, the off path, trust in incoming trace context, the spans'
attributes and ids, W3C trace context on attempts, the bounded queue and its drop count, the bounded flush.

Spans go to a real OTLP/HTTP receiver (tests/support/otlp_receiver.py) through OpenTelemetry's own exporter.
The lifecycle's spans through gunicorn are the end-to-end tests' (they come with the wiring).
"""
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from urllib3 import HTTPHeaderDict

from forkproxy.limits.gcra import Limit
from forkproxy.server.trust import TrustedProxies
from forkproxy.tracing import NO_SPAN, NO_TRACE, OFF, switched_on
from forkproxy.tracing import otel
from forkproxy.upstream.members import Upstream
from tests.support.otlp_receiver import OtlpReceiver, children, roots, tree

from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

ROOT = Path(__file__).resolve().parents[1]
INCOMING_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
INCOMING_SPAN = "00f067aa0ba902b7"
TRACEPARENT = f"00-{INCOMING_TRACE}-{INCOMING_SPAN}-01"
TRUSTED = TrustedProxies("10.0.0.1")


def environ(peer="10.0.0.1", **headers):
    env = {"REQUEST_METHOD": "POST", "RAW_URI": "/v1/chat/completions?key=secret", "wsgi.url_scheme": "http",
           "REMOTE_ADDR": peer, "SERVER_PROTOCOL": "HTTP/1.1", "HTTP_USER_AGENT": "tests/1"}
    env.update({"HTTP_" + name.upper(): value for name, value in headers.items()})
    return env


def ids(traceparent: str) -> tuple[str, str, bool]:
    """A traceparent's trace id, parent span id, and its sampled flag (other flags, W3C's random, aside)."""
    _, trace_id, span_id, flags = traceparent.split("-")
    return trace_id, span_id, bool(int(flags, 16) & 1)


def python(script: str, env: dict | None = None) -> str:
    """``script`` run by the venv's Python in a fresh process from the repo; its stdout."""
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, env={**os.environ, **(env or {})})
    assert done.returncode == 0, done.stderr
    return done.stdout


class Drops:
    """What the tracing counted as dropped, by reason (what forkproxy_traces_dropped_total gets)."""

    def __init__(self):
        self.by_reason = {}

    def __call__(self, reason, spans):
        self.by_reason[reason] = self.by_reason.get(reason, 0) + spans

    def total(self):
        return sum(self.by_reason.values())


@pytest.fixture
def receiver():
    with OtlpReceiver() as r:
        yield r


def tracing_to(receiver, drops=None, timeout=5.0, **kw):
    exporter = OTLPSpanExporter(endpoint=receiver.endpoint + "/v1/traces", timeout=timeout)
    return otel.Tracing(exporter, count=drops or Drops(), schedule_delay_millis=50, **kw)


# -- the switch and the off path ------------------------------------------------------------

@pytest.mark.parametrize("setting, env, on", [
    (None, {}, False),
    (None, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}, True),
    (None, {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:4318/v1/traces"}, True),
    (None, {"OTEL_TRACES_EXPORTER": "otlp"}, True),
    (None, {"OTEL_TRACES_EXPORTER": "none"}, False),
    (None, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x:1", "OTEL_SDK_DISABLED": "true"}, False),
    (True, {}, True),
    (True, {"OTEL_TRACES_EXPORTER": "none"}, False),
    (False, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}, False),
])
def test_the_setting_and_opentelemetrys_variables_decide_whether_a_worker_traces(setting, env, on):
    assert switched_on(setting, env) is on


def test_tracing_off_imports_nothing_of_opentelemetry_even_while_proxying_a_request():
    out = python("""
        import sys
        import forkproxy
        from forkproxy import Proxy
        from forkproxy.tracing import OFF, start
        proxy = Proxy("http://127.0.0.1:1", timeout=2)
        assert start(None, {}) is OFF and start(False, {"OTEL_TRACES_EXPORTER": "otlp"}) is OFF
        env = {"REQUEST_METHOD": "GET", "RAW_URI": "/", "PATH_INFO": "/", "REMOTE_ADDR": "127.0.0.1",
               "wsgi.url_scheme": "http", "wsgi.input": __import__("io").BytesIO(), "SERVER_NAME": "x"}
        status = []
        b"".join(proxy(env, lambda s, h, *a: status.append(s)))
        print(status[0], sorted(m for m in sys.modules if m.startswith("opentelemetry")))
    """, env={"OTEL_EXPORTER_OTLP_ENDPOINT": "", "OTEL_TRACES_EXPORTER": ""})
    assert out.split()[0] == "502" and out.strip().endswith("[]"), out


def test_tracing_asked_for_without_the_extra_refuses_and_left_to_the_environment_stays_off():
    out = python("""
        import sys
        sys.modules["opentelemetry"] = None  # as if forkproxy[otel] were not installed
        from forkproxy.tracing import OFF, TracingUnavailable, start
        assert start(None, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}) is OFF
        try:
            start(True, {})
        except TracingUnavailable as exc:
            print("refused:", exc)
    """)
    assert out.startswith("refused: tracing needs the extra forkproxy[otel]"), out


def test_off_a_request_holds_shared_no_op_objects_a_hook_can_use_as_a_span():
    trace = OFF.request(environ(), TRUSTED)
    assert trace is NO_TRACE and trace.span is NO_SPAN
    headers = HTTPHeaderDict({"traceparent": TRACEPARENT})
    trace.attempt(Upstream("http://127.0.0.1:9"), "GET", 0, headers).end(200)
    assert headers["traceparent"] == TRACEPARENT  # off, forkproxy passes it on untouched, as before
    span = trace.span
    span.set_attribute("gen_ai.request.model", "m")
    span.set_attributes({"gen_ai.usage.input_tokens": 3})
    span.add_event("x", {"a": 1})
    span.record_exception(ValueError("x"))
    span.set_status(None)
    span.update_name("x")
    assert not span.is_recording()
    assert OFF.shutdown(1.0) is True


# -- spans, ids and trust --------------------------------------------------------------------------

def one_request(tracing, env, attempts=((503, None), (200, None)), pool=("http://127.0.0.1:9001",
                                                                       "http://127.0.0.1:9002")):
    """A request as the lifecycle will trace it: attempts on ``pool``'s members in turn, then its answer."""
    trace = tracing.request(env, TRUSTED)
    trace.span.set_attribute("gen_ai.request.model", "gpt-4o")  # what a hook does
    sent = []
    headers = HTTPHeaderDict({"traceparent": TRACEPARENT, "tracestate": "client=1"})  # as the client sent them
    for number, (status, error) in enumerate(attempts):
        member = Upstream(pool[number % len(pool)], name=f"m{number % len(pool)}")
        attempt = trace.attempt(member, "POST", number, headers)  # the same headers every attempt
        sent.append(dict(headers))
        attempt.end(status, error)
    trace.answered(attempts[-1][0])
    return trace, sent


def test_a_request_is_a_server_span_with_one_client_span_per_attempt_each_sending_its_own_traceparent(receiver):
    tracing = tracing_to(receiver)
    _, sent = one_request(tracing, environ(peer="192.0.2.9"), attempts=((None, "upstream_unreachable"),
                                                                        (503, None), (200, None)))
    assert tracing.shutdown(5)
    spans = receiver.wait_for(4)
    print(tree(spans))
    [server] = roots(spans)
    assert (server.kind, server.name, server.parent_id) == ("SERVER", "POST", "")
    assert server.attributes == {
        "http.request.method": "POST", "url.path": "/v1/chat/completions", "url.scheme": "http",
        "client.address": "192.0.2.9", "user_agent.original": "tests/1", "network.protocol.version": "1.1",
        "gen_ai.request.model": "gpt-4o", "http.response.status_code": 200}
    assert server.status == "UNSET" and server.resource["service.name"] == "forkproxy"
    attempts = children(spans, server)
    assert [a.kind for a in attempts] == ["CLIENT"] * 3
    assert [a.attributes.get("http.request.resend_count") for a in attempts] == [None, 1, 2]
    assert [a.attributes["forkproxy.upstream"] for a in attempts] == ["m0", "m1", "m0"]
    assert [(a.attributes["server.address"], a.attributes["server.port"]) for a in attempts] == [
        ("127.0.0.1", 9001), ("127.0.0.1", 9002), ("127.0.0.1", 9001)]
    assert [a.attributes.get("error.type") for a in attempts] == ["upstream_unreachable", "503", None]
    assert [a.attributes.get("http.response.status_code") for a in attempts] == [None, 503, 200]
    assert [a.status for a in attempts] == ["ERROR", "ERROR", "UNSET"]
    # Each attempt sent the traceparent of its own span; the untrusted client's trace context was replaced.
    assert [ids(h["traceparent"]) for h in sent] == [(server.trace_id, a.span_id, True) for a in attempts]
    assert all("tracestate" not in h for h in sent)


def test_a_trusted_peers_trace_context_is_continued(receiver):
    tracing = tracing_to(receiver)
    _, sent = one_request(tracing, environ(peer="10.0.0.1", traceparent=TRACEPARENT, tracestate="vendor=x"))
    tracing.shutdown(5)
    spans = receiver.wait_for(3)
    [server] = roots(spans)
    assert (server.trace_id, server.parent_id, server.links) == (INCOMING_TRACE, INCOMING_SPAN, [])
    assert all(h["tracestate"] == "vendor=x" for h in sent)  # the trusted tracestate goes on


def test_an_untrusted_peer_gets_a_new_trace_linked_to_the_one_it_sent(receiver):
    tracing = tracing_to(receiver)
    _, sent = one_request(tracing, environ(peer="203.0.113.5", traceparent=TRACEPARENT, tracestate="evil=1"))
    tracing.shutdown(5)
    spans = receiver.wait_for(3)
    [server] = roots(spans)
    assert server.trace_id != INCOMING_TRACE and server.parent_id == ""
    assert server.links == [(INCOMING_TRACE, INCOMING_SPAN, {})]
    assert all(h["traceparent"].split("-")[1] == server.trace_id and "tracestate" not in h for h in sent)


def test_a_malformed_traceparent_starts_a_trace_with_no_link(receiver):
    tracing = tracing_to(receiver)
    one_request(tracing, environ(peer="10.0.0.1", traceparent="00-zz-00-01"), attempts=((200, None),))
    tracing.shutdown(5)
    [server] = roots(receiver.wait_for(2))
    assert server.parent_id == "" and server.links == []


def test_an_unsampled_request_records_nothing_yet_passes_its_trace_context_on_unsampled(receiver):
    tracing = tracing_to(receiver, sampler=ALWAYS_OFF)
    trace, sent = one_request(tracing, environ(peer="203.0.113.5"))
    assert not trace.span.is_recording()
    tracing.shutdown(5)
    assert receiver.spans == [] and receiver.posts == 0
    trace_id = trace.span.get_span_context().trace_id
    assert [ids(h["traceparent"])[::2] for h in sent] == [(f"{trace_id:032x}", False)] * 2


def test_a_stream_span_ends_at_the_streams_end_with_its_first_unit_event_and_counts(receiver):
    from forkproxy.messages import StreamStats, TunnelStats

    tracing = tracing_to(receiver)
    stream = tracing.request(environ(), TRUSTED)
    stream.limited([Limit("tenant:sk-secret", 10, 1), Limit("model:gpt-4o", 10, 1)])
    stream.status(200)
    stream.first_unit()
    stats = StreamStats()
    stats.byte_count, stats.chunk_count, stats.errored = 120, 3, True
    stream.stream_ended(stats)
    tunnel = tracing.request({**environ(), "REQUEST_METHOD": "GET"}, TRUSTED)
    tunnel.status(101)
    ts = TunnelStats()
    ts.bytes_from_client, ts.bytes_from_upstream, ts.messages_from_client, ts.closed_by = 10, 20, 2, "client"
    tunnel.tunnel_ended(ts)
    refused = tracing.request(environ(), TRUSTED)
    refused.limited([Limit("tenant:sk-secret", 10, 1)], refused="tenant")
    refused.answered(429, "rate_limited")
    tracing.shutdown(5)
    s, t, r = sorted(receiver.wait_for(3), key=lambda span: span.start_ns)
    assert s.event("forkproxy.first_unit") == {}
    assert "sk-secret" not in repr([s.attributes, r.attributes])  # a limit's name, never its key
    assert {k: v for k, v in s.attributes.items() if k.startswith(("forkproxy", "error"))} == {
        "forkproxy.rate_limit.names": ("tenant", "model"), "forkproxy.stream.bytes": 120,
        "forkproxy.stream.units": 3, "forkproxy.stream.resumes": 0, "forkproxy.stream.errored": True,
        "forkproxy.stream.client_disconnected": False, "error.type": "stream_cut"}
    assert {k: v for k, v in t.attributes.items() if k.startswith("forkproxy")} == {
        "forkproxy.tunnel.bytes_from_client": 10, "forkproxy.tunnel.bytes_from_upstream": 20,
        "forkproxy.tunnel.messages_from_client": 2, "forkproxy.tunnel.messages_from_upstream": 0,
        "forkproxy.tunnel.closed_by": "client"}
    assert t.attributes["http.response.status_code"] == 101 and t.status == "UNSET"
    assert (r.attributes["forkproxy.rate_limit.refused"], r.attributes["error.type"], r.status) == (
        "tenant", "rate_limited", "ERROR")


def test_a_relayed_5xx_is_the_server_spans_error_and_a_second_end_changes_nothing(receiver):
    tracing = tracing_to(receiver)
    trace = tracing.request(environ(), TRUSTED)
    trace.answered(502)
    trace.answered(200, "x")  # an end after the end (a last-resort path): ignored
    tracing.shutdown(5)
    [span] = receiver.wait_for(1)
    assert (span.attributes["error.type"], span.attributes["http.response.status_code"], span.status) == (
        "502", 502, "ERROR")


# -- a worker's tracing, made after the fork --------------------------------------------------------

def test_a_forked_worker_exports_its_trace_with_the_right_parent_ids_and_the_master_never_loads_opentelemetry(
        receiver):
    out = python("""
        import json, os, sys
        from urllib3 import HTTPHeaderDict
        from forkproxy.server.trust import TrustedProxies
        from forkproxy.tracing import start
        from forkproxy.upstream.members import Upstream
        pid = os.fork()
        if pid == 0:  # the worker
            tracing = start(None)
            env = {"REQUEST_METHOD": "GET", "RAW_URI": "/a", "REMOTE_ADDR": "127.0.0.1",
                   "HTTP_TRACEPARENT": "%s"}
            trace = tracing.request(env, TrustedProxies("127.0.0.1"))
            headers = HTTPHeaderDict()
            trace.attempt(Upstream("http://127.0.0.1:9"), "GET", 0, headers).end(0, "upstream_unreachable")
            first = headers["traceparent"]
            trace.attempt(Upstream("http://127.0.0.1:9"), "GET", 1, headers).end(200)
            trace.answered(200)
            ok = tracing.shutdown(5)
            print(json.dumps([first, headers["traceparent"], ok]), flush=True)
            os._exit(0)
        assert os.waitpid(pid, 0)[1] == 0, "the worker failed"
        print(json.dumps(sorted(m for m in sys.modules if m.startswith("opentelemetry"))))
    """ % TRACEPARENT, env={"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "50"})
    worker, master = map(json.loads, out.splitlines())
    assert master == []
    spans = receiver.wait_for(3)
    [server] = roots(spans)
    assert (server.trace_id, server.parent_id) == (INCOMING_TRACE, INCOMING_SPAN)
    attempts = children(spans, server)
    assert len(attempts) == 2 and len(spans) == 3
    assert [ids(t) for t in worker[:2]] == [(INCOMING_TRACE, a.span_id, True) for a in attempts]
    assert worker[2] is True


# -- the bounded queue, drops, and the flush -----------------------------------------------------------

def end_spans(tracing, count):
    """``count`` one-span requests ended as fast as they can be; the seconds that took."""
    began = time.monotonic()
    for _ in range(count):
        tracing.request(environ(), TRUSTED).answered(200)
    return time.monotonic() - began


def test_a_slow_exporter_never_holds_a_request_up_and_what_the_bounded_queue_cannot_take_is_counted(receiver):
    receiver.slow(1.0)
    drops = Drops()
    tracing = tracing_to(receiver, drops, max_queue_size=8, max_export_batch_size=4)
    took = end_spans(tracing, 200)
    assert took < 1.0, took  # never waited for the exporter
    assert drops.by_reason.get("queue_full", 0) >= 200 - 8 - 4 * 2  # at most a queue and two batches got out
    assert tracing.shutdown(10)
    time.sleep(0.2)
    assert len(receiver.spans) + drops.total() == 200, (len(receiver.spans), drops.by_reason)


def test_an_exporter_that_is_down_fails_its_batches_counted_and_holds_nothing_up(receiver):
    receiver.down()
    drops = Drops()
    tracing = tracing_to(receiver, drops, timeout=0.5, max_queue_size=16, max_export_batch_size=8)
    assert end_spans(tracing, 50) < 1.0
    tracing.shutdown(3)
    assert drops.total() == 50 and drops.by_reason.get("export_failed", 0) >= 8, drops.by_reason


def test_a_flush_bounded_by_its_timeout_gives_up_on_a_slow_exporter_and_counts_what_it_left(receiver):
    receiver.slow(5.0)
    drops = Drops()
    tracing = tracing_to(receiver, drops, timeout=10, max_queue_size=64, max_export_batch_size=8)
    end_spans(tracing, 40)
    began = time.monotonic()
    assert tracing.shutdown(0.5) is False
    assert time.monotonic() - began < 1.5
    assert drops.by_reason.get("shutdown", 0) > 0, drops.by_reason


def test_a_flush_within_its_timeout_delivers_every_span_ended_before_it(receiver):
    tracing = tracing_to(receiver, max_queue_size=2048)
    end_spans(tracing, 300)
    assert tracing.shutdown(5) is True
    assert len(receiver.wait_for(300, timeout=2)) == 300


def test_a_process_has_one_tracing_made_on_first_use_and_a_forked_child_makes_its_own():
    out = python("""
        import os
        from forkproxy import tracing
        first = tracing.for_worker(None)
        assert tracing.for_worker(True) is first and tracing.for_worker(False) is tracing.OFF
        pid = os.fork()
        if pid == 0:
            os._exit(0 if tracing._worker is None and tracing.for_worker(None) is not first else 1)
        print(os.waitpid(pid, 0)[1], type(first).__name__, tracing.shutdown_worker(2))
    """, env={"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9", "OTEL_EXPORTER_OTLP_TIMEOUT": "1"})
    assert out.split() == ["0", "Tracing", "True"], out
