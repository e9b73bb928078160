"""Traces end to end: the contract's section "Traces (OpenTelemetry)" through the real gunicorn with gevent workers.

Each gateway exports OTLP over HTTP to a real receiver (``tests/support/otlp_receiver.py``, which decodes the
protobuf with ``opentelemetry-proto``); upstreams are real servers on loopback (plain HTTP, a WebSocket server,
fake OpenAI-style providers). The gateway app is ``tests/apps/traced.py``. A request's spans are found by its
SERVER span's ``url.path``, so the tests of one gateway share one receiver.
"""
from __future__ import annotations

import json
import re
import signal
import time
import urllib.request
import uuid
from contextlib import contextmanager

import pytest
from websockets.sync.client import connect

from tests.support.client import StreamClient, Truncated, request
from tests.support.gunicorn import Gunicorn
from tests.support.openai_upstream import Fault, OpenAIUpstream
from tests.support.otlp_receiver import OtlpReceiver, Span, children, tree
from tests.support.servers import Upstream, event_stream, free_port, reset
from tests.support.websocket import WebSocketUpstream

APP = "tests.apps.traced:app"
TRACEPARENT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
CHAT = {"model": "gpt-4o", "stream": True, "stream_options": {"include_usage": True},
        "messages": [{"role": "user", "content": "count to twelve please"}]}


def exporting_to(receiver: OtlpReceiver, **env: str) -> dict:
    """The environment of a gateway that exports to ``receiver`` about every 50 ms."""
    return {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "50", **env}


@contextmanager
def started(env: dict):
    g = Gunicorn(APP, env=env).start()
    try:
        yield g
    finally:
        g.stop()


# -- the shared gateways --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def receiver():
    with OtlpReceiver() as r:
        yield r


@pytest.fixture(scope="module")
def overloaded():
    """An upstream answering every request with 503."""
    server = Upstream()
    server.route("/", lambda handler, seen: handler.reply(503, b"overloaded"))
    yield server
    server.close()


@pytest.fixture(scope="module")
def fake_openai():
    with OpenAIUpstream("openai-east", tokens=12) as fake:
        yield fake


@pytest.fixture(scope="module")
def gateway(receiver, upstream, overloaded, fake_openai):
    """Traced, with ``before_attempt``; trusts 127.0.0.1's trace context. Pools: ``failover`` (a 503, a closed
    port, a good one, in that order), ``dead`` (two closed ports), ``llm`` (the fake provider)."""
    pools = {"failover": [{"url": overloaded.url, "name": "a"},
                          {"url": f"http://127.0.0.1:{free_port()}", "name": "b", "backup": True},
                          {"url": upstream.url, "name": "c", "backup": True}],
             "dead": [{"url": f"http://127.0.0.1:{free_port()}", "name": f"gone{i}"} for i in (1, 2)],
             "llm": [{"url": fake_openai.url, "name": "openai-east", "meta": {"provider": "openai"}}]}
    with started(exporting_to(receiver, TEST_UPSTREAM=upstream.url, TEST_POOLS=json.dumps(pools),
                              TEST_BEFORE_ATTEMPT="1", FORWARDED_ALLOW_IPS="127.0.0.1")) as g:
        yield g


@pytest.fixture(scope="module")
def plain_gateway(receiver, upstream):
    """Traced, without ``before_attempt`` (one set of headers for every attempt)."""
    with started(exporting_to(receiver, TEST_UPSTREAM=upstream.url)) as g:
        yield g


@pytest.fixture(scope="module")
def untrusting_gateway(receiver, upstream):
    """Traced; trusts only 10.9.9.9, so the tests' client at 127.0.0.1 is an outside client."""
    with started(exporting_to(receiver, TEST_UPSTREAM=upstream.url, FORWARDED_ALLOW_IPS="10.9.9.9")) as g:
        yield g


def trace_of(receiver: OtlpReceiver, path: str, count: int, timeout: float = 5) -> tuple[Span, list[Span]]:
    """The SERVER span of the request to ``path`` and the ``count`` spans of its trace, waited for."""
    deadline = time.monotonic() + timeout
    while True:
        spans = list(receiver.spans)
        server = next((s for s in spans if s.kind == "SERVER" and s.attributes.get("url.path") == path), None)
        mine = [s for s in spans if server is not None and s.trace_id == server.trace_id]
        if len(mine) >= count:
            assert len(mine) == count, tree(mine)
            return server, mine
        if time.monotonic() > deadline:
            raise AssertionError(f"no trace of {count} spans for {path} within {timeout}s:\n{tree(spans)}")
        time.sleep(0.02)


def traceparents(upstream: Upstream, path: str) -> list[tuple[str, str, int]]:
    """(trace id, parent id, flags) of each traceparent ``upstream`` received for ``path``."""
    found = []
    for seen in upstream.seen(path):
        match = TRACEPARENT.fullmatch(seen.header("traceparent") or "")
        assert match, seen.headers
        found.append((match[1], match[2], int(match[3], 16)))
    return found


# -- the span tree ---------------------------------------------------------------------------------------------


def test_a_buffered_request_is_a_server_span_with_http_attributes_and_one_client_span_for_its_attempt(
        gateway, receiver, upstream):
    reply = request(gateway.url, "GET", "/buffered?api_key=secret", headers={"User-Agent": "probe/1.0"})
    assert reply.status == 200
    server, spans = trace_of(receiver, "/buffered", 2)
    assert (server.kind, server.name, server.parent_id, server.status) == ("SERVER", "GET", "", "UNSET")
    assert {k: server.attributes[k] for k in ("http.request.method", "url.path", "url.scheme", "client.address",
                                              "user_agent.original", "http.response.status_code")} == {
        "http.request.method": "GET", "url.path": "/buffered", "url.scheme": "http", "client.address": "127.0.0.1",
        "user_agent.original": "probe/1.0", "http.response.status_code": 200}
    assert server.resource["service.name"] == "forkproxy"
    assert "secret" not in json.dumps([s.attributes for s in spans])  # never the query
    [client] = children(spans, server)
    assert (client.kind, client.name, client.status) == ("CLIENT", "GET", "UNSET")
    assert client.attributes == {"http.request.method": "GET", "server.address": "127.0.0.1",
                                 "server.port": upstream.port, "forkproxy.upstream": f"127.0.0.1:{upstream.port}",
                                 "http.response.status_code": 200}  # no resend_count on a first attempt
    assert server.start_ns <= client.start_ns and client.end_ns <= server.end_ns


def test_retries_and_failover_are_sibling_client_spans_in_order_each_with_its_member_and_error(gateway, receiver):
    reply = request(gateway.url, "GET", "/failover", headers={"X-Test-Pool": "failover", "X-Test-Retry": "3"})
    assert reply.status == 200
    server, spans = trace_of(receiver, "/failover", 4)
    attempts = children(spans, server)
    assert [(s.attributes["forkproxy.upstream"], s.attributes.get("http.response.status_code"),
             s.attributes.get("error.type"), s.status, s.attributes.get("http.request.resend_count"))
            for s in attempts] == [("a", 503, "503", "ERROR", None),
                                   ("b", None, "upstream_unreachable", "ERROR", 1),
                                   ("c", 200, None, "UNSET", 2)]
    assert server.status == "UNSET" and server.attributes["http.response.status_code"] == 200
    assert attempts[0].end_ns <= attempts[1].start_ns and attempts[1].end_ns <= attempts[2].start_ns


def test_a_request_no_member_could_take_is_a_502_server_span_in_error_after_its_failed_attempts(gateway, receiver):
    reply = request(gateway.url, "GET", "/dead", headers={"X-Test-Pool": "dead", "X-Test-Retry": "2"})
    assert reply.status == 502
    server, spans = trace_of(receiver, "/dead", 3)
    assert (server.status, server.attributes["error.type"], server.attributes["http.response.status_code"]) == (
        "ERROR", "upstream_unreachable", 502)
    assert [(s.attributes["forkproxy.upstream"], s.attributes["error.type"]) for s in children(spans, server)] == [
        ("gone1", "upstream_unreachable"), ("gone2", "upstream_unreachable")]


def test_a_stream_span_ends_with_the_stream_marks_its_first_unit_and_counts_units_and_bytes(
        gateway, receiver, upstream):
    upstream.route("/sse", event_stream(5, gap=0.1, before=lambda: time.sleep(0.3)))
    client = StreamClient(gateway.url, "/sse", headers={"X-Test-Stream": "1"})
    assert client.read_head() == 200 and b"".join(client.read_rest()) == b"".join(b"data: %d\n\n" % i for i in range(5))
    client.close()
    server, spans = trace_of(receiver, "/sse", 2)
    took = (server.end_ns - server.start_ns) / 1e9
    first = next(at for name, _, at in server.events if name == "forkproxy.first_unit")
    assert 0.25 <= (first - server.start_ns) / 1e9 < took - 0.35  # at the first event, not at the head or the end
    assert took >= 0.7  # the 0.3 s before the first event and the gaps after it: ended with the stream
    assert {k: v for k, v in server.attributes.items() if k.startswith("forkproxy.stream.")} == {
        "forkproxy.stream.units": 5, "forkproxy.stream.bytes": 5 * len(b"data: 0\n\n"),
        "forkproxy.stream.resumes": 0, "forkproxy.stream.errored": False,
        "forkproxy.stream.client_disconnected": False}
    assert server.status == "UNSET" and server.attributes["http.response.status_code"] == 200
    [client_span] = children(spans, server)
    assert client_span.end_ns < first  # an attempt lasts until its reply head, the body is the request's


def test_a_client_gone_mid_stream_is_marked_so_and_is_not_an_error(gateway, receiver, upstream):
    upstream.route("/gone", event_stream(100, gap=0.05))
    client = StreamClient(gateway.url, "/gone", headers={"X-Test-Stream": "1"})
    assert client.read_head() == 200 and client.next_chunk()
    client.close()
    server, _ = trace_of(receiver, "/gone", 2)
    assert server.attributes["forkproxy.stream.client_disconnected"] is True
    assert server.status == "UNSET" and "error.type" not in server.attributes


def test_an_upstream_reset_mid_stream_ends_the_span_errored_with_the_streams_error_type(
        gateway, receiver, upstream):
    def two_then_reset(handler, seen):
        handler.start_chunked(content_type="text/event-stream")
        handler.chunk(b"data: 0\n\n")
        handler.chunk(b"data: 1\n\n")
        time.sleep(0.1)
        handler.close_connection = True
        reset(handler.connection)
    upstream.route("/reset", two_then_reset)
    client = StreamClient(gateway.url, "/reset", headers={"X-Test-Stream": "1"})
    assert client.read_head() == 200
    with pytest.raises(Truncated):  # the client reads on to the cut: it is not the one gone
        client.read_rest()
    client.close()
    server, _ = trace_of(receiver, "/reset", 2)
    assert server.attributes["forkproxy.stream.errored"] is True
    assert (server.status, server.attributes["error.type"]) == ("ERROR", "bad_upstream_response")


def test_a_tunnel_span_has_its_bytes_and_messages_each_way_and_who_closed_it(gateway, receiver):
    ws_upstream = WebSocketUpstream()
    try:
        url = gateway.url.replace("http://", "ws://") + "/ws-echo"
        with connect(url, additional_headers={"X-Test-Upstream": ws_upstream.url}) as ws:
            for text in ("hello", "world"):
                ws.send(text)
                assert ws.recv(timeout=10) == text
        server, spans = trace_of(receiver, "/ws-echo", 2)
    finally:
        ws_upstream.close()
    tunnel = {k.removeprefix("forkproxy.tunnel."): v for k, v in server.attributes.items()
              if k.startswith("forkproxy.tunnel.")}
    assert (tunnel["messages_from_client"], tunnel["messages_from_upstream"], tunnel["closed_by"]) == (2, 2, "client")
    assert tunnel["bytes_from_client"] > 0 and tunnel["bytes_from_upstream"] > 0
    assert server.attributes["http.response.status_code"] == 101 and server.status == "UNSET"
    [client] = children(spans, server)
    assert client.attributes["http.response.status_code"] == 101 and client.status == "UNSET"


def test_a_limited_request_carries_its_limits_name_and_never_the_key(gateway, receiver):
    headers = {"X-Test-Key": f"secret-{uuid.uuid4().hex}"}  # a new key: the local store outlives the gateway
    assert request(gateway.url, "GET", "/limited-1", headers=headers).status == 200
    assert request(gateway.url, "GET", "/limited-2", headers=headers).status == 429
    passed, _ = trace_of(receiver, "/limited-1", 2)
    refused, spans = trace_of(receiver, "/limited-2", 1)
    assert passed.attributes["forkproxy.rate_limit.names"] == ("team",)
    assert "forkproxy.rate_limit.refused" not in passed.attributes
    assert (refused.attributes["forkproxy.rate_limit.refused"], refused.attributes["error.type"]) == (
        "team", "rate_limited")
    assert "secret" not in json.dumps([passed.attributes, refused.attributes])


# -- W3C trace context -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("hook", ["with before_attempt", "without before_attempt"])
def test_each_attempt_sends_the_traceparent_of_its_own_client_span(hook, gateway, plain_gateway, receiver, upstream):
    g = gateway if hook == "with before_attempt" else plain_gateway
    path = "/twice-" + hook.split()[0]
    answers = iter((503, 200))
    upstream.route(path, lambda handler, seen: handler.reply(next(answers)))
    assert request(g.url, "GET", path, headers={"X-Test-Retry": "2"}).status == 200
    server, spans = trace_of(receiver, path, 3)
    sent = traceparents(upstream, path)
    assert [parent for _, parent, _ in sent] == [s.span_id for s in children(spans, server)]  # two, each its own
    assert {trace for trace, _, _ in sent} == {server.trace_id} and all(flags & 1 for _, _, flags in sent)


INCOMING_TRACE, INCOMING_SPAN = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
INCOMING = {"traceparent": f"00-{INCOMING_TRACE}-{INCOMING_SPAN}-01", "tracestate": "client=abc"}


def test_a_trusted_peers_trace_context_is_continued_and_its_tracestate_passed_on(gateway, receiver, upstream):
    assert request(gateway.url, "GET", "/trusted", headers=INCOMING).status == 200
    server, spans = trace_of(receiver, "/trusted", 2)
    assert (server.trace_id, server.parent_id, server.links) == (INCOMING_TRACE, INCOMING_SPAN, [])
    [client] = children(spans, server)
    [seen] = upstream.seen("/trusted")
    assert seen.header("traceparent").split("-")[1:3] == [INCOMING_TRACE, client.span_id]
    assert seen.header("tracestate") == "client=abc"


def test_an_outside_client_gets_a_new_trace_linked_to_its_own_and_its_tracestate_goes_no_further(
        untrusting_gateway, receiver, upstream):
    assert request(untrusting_gateway.url, "GET", "/untrusted", headers=INCOMING).status == 200
    server, spans = trace_of(receiver, "/untrusted", 2)
    assert server.trace_id != INCOMING_TRACE and server.parent_id == ""
    assert server.links == [(INCOMING_TRACE, INCOMING_SPAN, {})]
    [client] = children(spans, server)
    [seen] = upstream.seen("/untrusted")
    assert seen.header("traceparent").split("-")[1:3] == [server.trace_id, client.span_id]
    assert seen.header("tracestate") is None


# -- hooks -----------------------------------------------------------------------------------------------------


def chat(g, path: str = "/v1/chat/completions", headers: dict | None = None) -> tuple[int, str]:
    """A streamed chat completion through ``g``: its status and the answer's text."""
    client = StreamClient(g.url, path, "POST", {"Content-Type": "application/json", **(headers or {})},
                          json.dumps(CHAT).encode())
    status = client.read_head()
    text = ""
    for chunk in client.read_rest():
        for event in chunk.decode().split("\n\n"):
            if event.startswith('data: {"id"'):
                text += "".join(c["delta"].get("content") or "" for c in json.loads(event[6:])["choices"])
    client.close()
    return status, text


def test_hooks_put_genai_attributes_on_the_server_span_through_req_span(gateway, receiver):
    status, text = chat(gateway, "/v1/chat/completions", {"X-Test-Pool": "llm"})
    assert status == 200 and text == " ".join(f"tok{i}" for i in range(12))
    server, _ = trace_of(receiver, "/v1/chat/completions", 2)
    assert {k: v for k, v in server.attributes.items() if k.startswith("gen_ai.")} == {
        "gen_ai.operation.name": "chat", "gen_ai.request.model": "gpt-4o", "gen_ai.provider.name": "openai",
        "gen_ai.response.model": "gpt-4o", "gen_ai.usage.input_tokens": 4, "gen_ai.usage.output_tokens": 12}


@pytest.mark.parametrize("off", ["tracing=False", "no OTEL_* variable"])
def test_tracing_off_the_same_hooks_run_on_a_span_that_keeps_nothing_and_no_opentelemetry_is_imported(off, gateway):
    with OpenAIUpstream("openai-east", tokens=12) as fake, OtlpReceiver() as unused:
        pools = json.dumps({"llm": [{"url": fake.url, "name": "openai-east", "meta": {"provider": "openai"}}]})
        env = {"TEST_POOLS": pools, "TEST_BEFORE_ATTEMPT": "1"}
        if off == "tracing=False":  # the setting wins over an exporter OpenTelemetry's variables name
            env = exporting_to(unused, TEST_TRACING="false", **env)
        with started(env) as g:
            status, text = chat(g, "/v1/chat/completions", {"X-Test-Pool": "llm"})
            assert status == 200 and text == " ".join(f"tok{i}" for i in range(12))
            assert json.loads(request(g.url, "GET", "/_modules").body) == []
        assert unused.posts == 0
    assert "opentelemetry.sdk.trace" in json.loads(request(gateway.url, "GET", "/_modules").body)  # the probe works


# -- the exporter down or slow ---------------------------------------------------------------------------------


def dropped(metrics_port: int, reason: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    match = re.search(r'forkproxy_traces_dropped_total\{reason="%s"\} ([0-9.e+]+)' % reason, text)
    return float(match[1]) if match else 0.0


def wait_dropped(metrics_port: int, reason: str, timeout: float = 8) -> float:
    deadline = time.monotonic() + timeout
    while (count := dropped(metrics_port, reason)) == 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    return count


def timed_requests(g, n: int) -> list[float]:
    """Seconds each of ``n`` GETs took, each asserted answered 200."""
    took = []
    for i in range(n):
        began = time.monotonic()
        assert request(g.url, "GET", f"/load/{i}").status == 200
        took.append(time.monotonic() - began)
    return took


def test_an_exporter_that_is_down_delays_no_request_and_its_failed_batches_are_counted(upstream):
    metrics_port = free_port()
    with OtlpReceiver() as down:
        down.down()
        with started(exporting_to(down, TEST_UPSTREAM=upstream.url, OTEL_EXPORTER_OTLP_TIMEOUT="1",
                                  FORKPROXY_METRICS_BIND=f"127.0.0.1:{metrics_port}")) as g:
            took = timed_requests(g, 50)
            assert max(took) < 1 and sum(took) < 5, (max(took), sum(took))
            assert wait_dropped(metrics_port, "export_failed") > 0
            assert "spans dropped (export_failed)" in g.log()


def test_a_slow_exporter_delays_no_request_and_what_its_bounded_queue_cannot_take_is_counted(upstream):
    metrics_port = free_port()
    with OtlpReceiver() as slow:
        slow.slow(2)
        with started(exporting_to(slow, TEST_UPSTREAM=upstream.url, OTEL_BSP_MAX_QUEUE_SIZE="16",
                                  FORKPROXY_METRICS_BIND=f"127.0.0.1:{metrics_port}")) as g:
            took = timed_requests(g, 200)
            assert max(took) < 1 and sum(took) < 10, (max(took), sum(took))
            assert dropped(metrics_port, "queue_full") > 0


# -- a graceful stop -------------------------------------------------------------------------------------------


def stopped_gracefully(g) -> float:
    """SIGTERM to the master: seconds until it exited."""
    began = time.monotonic()
    g.proc.send_signal(signal.SIGTERM)
    g.wait_exit(30)
    return time.monotonic() - began


def test_a_graceful_stop_exports_every_span_before_the_worker_exits(upstream):
    with OtlpReceiver() as r:
        with started(exporting_to(r, TEST_UPSTREAM=upstream.url, OTEL_BSP_SCHEDULE_DELAY="60000")) as g:
            timed_requests(g, 10)
            time.sleep(0.2)
            assert r.posts == 0  # nothing exported yet: the schedule is a minute
            stopped_gracefully(g)
            assert len(r.spans) == 20  # arrived before gunicorn exited
            assert "SIGKILL" not in g.log()


def test_a_slow_exporter_never_holds_a_graceful_stop_past_graceful_timeout(upstream):
    with OtlpReceiver() as r:
        r.slow(30)
        with started(exporting_to(r, TEST_UPSTREAM=upstream.url, OTEL_BSP_SCHEDULE_DELAY="60000",
                                  FORKPROXY_GRACEFUL_TIMEOUT="3")) as g:
            timed_requests(g, 10)
            took = stopped_gracefully(g)
            assert took < 3.5, took
            assert "SIGKILL" not in g.log()  # the worker gave up on the flush itself, in time
            assert "spans dropped (shutdown)" in g.log()


# -- the README's example --------------------------------------------------------------------------------------


README_KEYS = ("url.path", "http.response.status_code", "error.type", "forkproxy.upstream", "http.request.resend_count",
               "gen_ai.request.model", "gen_ai.provider.name", "gen_ai.usage.input_tokens",
               "gen_ai.usage.output_tokens", "forkproxy.stream.units", "forkproxy.stream.resumes",
               "forkproxy.stream.errored")


def test_a_failed_over_and_resumed_llm_stream_is_one_server_span_with_an_attempt_per_provider():
    """The README's example tree: a slow first token fails over, a stream cut mid-answer resumes elsewhere."""
    with OpenAIUpstream("openai", tokens=12) as openai, OpenAIUpstream("azure", tokens=12) as azure, \
            OpenAIUpstream("together", tokens=12) as together, OtlpReceiver() as r:
        openai.next(Fault.slow_first_token(3))
        azure.next(Fault.cut(5))
        pool = [{"url": openai.url, "name": "openai", "meta": {"provider": "openai"}},
                {"url": azure.url, "name": "azure", "backup": True, "meta": {"provider": "azure.ai.openai"}},
                {"url": together.url, "name": "together", "backup": True,
                 "meta": {"provider": "together", "resume": True}}]
        with started(exporting_to(r, TEST_POOLS=json.dumps({"llm": pool}), TEST_FIRST_BYTE="0.5", TEST_RESUME="1",
                                  TEST_BEFORE_ATTEMPT="1")) as g:
            status, text = chat(g, "/v1/chat/completions", {"X-Test-Pool": "llm", "X-Test-Retry": "3"})
            assert status == 200 and text == " ".join(f"tok{i}" for i in range(12))
            server, spans = trace_of(r, "/v1/chat/completions", 4)
    print("\n" + tree(spans, README_KEYS))
    attempts = children(spans, server)
    assert [(s.attributes["forkproxy.upstream"], s.attributes.get("error.type"),
             s.attributes.get("http.request.resend_count")) for s in attempts] == [
        ("openai", "upstream_timeout", None), ("azure", None, 1), ("together", None, 2)]
    assert server.event("forkproxy.first_unit") is not None and server.status == "UNSET"
    assert server.attributes["gen_ai.provider.name"] == "together"  # before_attempt ran for each, the last stays
    assert server.attributes["forkproxy.stream.resumes"] == 1  # azure's stream was the one cut
