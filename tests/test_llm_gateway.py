"""The LLM-gateway shape end to end: key check, credential swap, routing by model,
token counting from the SSE stream, one usage record per request."""
import json
import time
import uuid

import pytest

from tests.support.client import StreamClient, request
from tests.support.gunicorn import Gunicorn


def openai_route(upstream, prefix):
    def route(h, s):
        body = json.loads(s.body)
        if not body.get("stream"):
            return h.reply(200, json.dumps({"model": body["model"], "choices": [{"message": {"content": "hi"}}],
                                            "usage": {"total_tokens": 7}}).encode(), content_type="application/json")
        h.start_chunked(content_type="text/event-stream")
        base = {"model": body["model"], "object": "chat.completion.chunk"}
        for word in ("a", "b", "c"):
            h.chunk(b"data: " + json.dumps({**base, "choices": [{"delta": {"content": word}}]}).encode() + b"\n\n")
            if h.headers.get("X-Slow"):
                time.sleep(0.2)
        h.chunk(b"data: " + json.dumps({**base, "choices": [{"delta": {}, "finish_reason": "stop"}]}).encode()
                + b"\n\n")
        if body.get("stream_options", {}).get("include_usage"):
            h.chunk(b"data: " + json.dumps({**base, "choices": [], "usage": {"total_tokens": 42}}).encode() + b"\n\n")
        h.chunk(b"data: [DONE]\n\n")
        h.end_chunked()
    upstream.route(prefix, route)


@pytest.fixture(scope="module")
def llm(upstream, tmp_path_factory):
    usage_log = tmp_path_factory.mktemp("llm") / "usage.jsonl"
    openai_route(upstream, "/small/")
    openai_route(upstream, "/big/")
    g = Gunicorn("examples.llm_gateway:app", env={
        "LLM_UPSTREAM": upstream.url + "/small",
        "LLM_ROUTES": f"big-={upstream.url}/big,flaky-={upstream.url}/flaky-{uuid.uuid4().hex}",
        "LLM_UPSTREAM_KEY": "real-secret", "LLM_CLIENT_KEYS": "client-1,client-2", "LLM_USAGE_LOG": str(usage_log),
        "LLM_LIMITS_STORE": f"local:{usage_log.parent / 'limits.lmdb'}",
    }).start()
    g.usage = usage_log
    yield g
    g.stop()


def records(g, model):
    if not g.usage.exists():
        return []
    return [r for r in map(json.loads, g.usage.read_text().splitlines()) if r["model"] == model]


def wait_record(g, model, timeout=10):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = records(g, model)
        if found:
            time.sleep(0.05)
            assert len(records(g, model)) == 1
            return found[0]
        time.sleep(0.02)
    raise AssertionError(f"no usage record for {model}")


def chat(g, model, stream, key="client-1", **headers):
    body = json.dumps({"model": model, "stream": stream, "messages": [{"role": "user", "content": "x"}]}).encode()
    return request(g.url, "POST", "/v1/chat/completions", body=body,
                   headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json", **headers})


def test_unknown_client_key_gets_401_in_the_error_shape(llm, upstream):
    model = f"m-{uuid.uuid4().hex}"
    reply = chat(llm, model, False, key="stolen")
    assert reply.status == 401 and reply.error_type() == "unauthorized"
    assert not [s for s in upstream.seen("/small/") if model.encode() in s.body]


def test_streamed_completion_swaps_the_key_counts_events_and_records_usage(llm, upstream):
    model = f"m-{uuid.uuid4().hex}"
    reply = chat(llm, model, True)
    events = [e for e in reply.body.split(b"\n\n") if e]
    assert events[-1] == b"data: [DONE]" and len(events) == 6
    (seen,) = [s for s in upstream.seen("/small/") if model.encode() in s.body]
    assert seen.all("Authorization") == ["Bearer real-secret"]
    assert json.loads(seen.body)["stream_options"] == {"include_usage": True}
    record = wait_record(llm, model)
    assert (record["streamed"], record["events"], record["usage"]) == (True, 3, {"total_tokens": 42})
    assert record["client"] and "client-1" not in json.dumps(record)


def test_requests_are_routed_by_model(llm, upstream):
    model = f"big-{uuid.uuid4().hex}"
    reply = chat(llm, model, False)
    assert reply.json()["model"] == model
    assert [s for s in upstream.seen("/big/v1/chat/completions") if model.encode() in s.body]
    assert wait_record(llm, model)["usage"] == {"total_tokens": 7}


def test_a_stream_is_billed_even_when_the_client_hangs_up(llm):
    model = f"m-{uuid.uuid4().hex}"
    body = json.dumps({"model": model, "stream": True, "messages": []}).encode()
    client = StreamClient(llm.url, "/v1/chat/completions", method="POST", body=body,
                          headers={"Authorization": "Bearer client-2", "X-Slow": "1"})
    client.read_head()
    client.next_chunk()
    client.close()
    record = wait_record(llm, model)
    assert record["client_disconnected"] and record["events"] >= 1


def flaky_route(upstream, llm, first):
    """The flaky- models' route: ``first(handler)`` answers the first completion, then all is well."""
    prefix = dict(part.split("=", 1) for part in llm.env["LLM_ROUTES"].split(","))["flaky-"].removeprefix(upstream.url)
    calls = []

    def route(h, s):
        calls.append(s)
        if len(calls) == 1:
            return first(h)
        h.reply(200, json.dumps({"choices": [], "usage": {"total_tokens": 3}}).encode(), content_type="application/json")
    upstream.route(prefix + "/", route)
    return calls


def test_each_client_key_gets_its_requests_a_minute_and_its_tokens_a_minute(upstream, tmp_path):
    g = Gunicorn("examples.llm_gateway:app", env={
        "LLM_UPSTREAM": upstream.url + "/small", "LLM_UPSTREAM_KEY": "real-secret",
        "LLM_CLIENT_KEYS": "client-1,client-2", "LLM_USAGE_LOG": str(tmp_path / "usage.jsonl"),
        "LLM_RPM": "4", "LLM_TPM": "50", "LLM_LIMITS_STORE": f"local:{tmp_path / 'limits.lmdb'}"}).start()
    try:
        model = f"m-{uuid.uuid4().hex}"
        assert chat(g, model, True).status == 200  # 42 tokens of 50, charged from the usage chunk
        assert chat(g, model, True).status == 200  # still within the budget when it started: now 84
        spent = chat(g, model, True)
        assert spent.status == 429 and spent.error_type() == "rate_limited"
        assert "'tpm'" in spent.json()["error"]["message"] and int(spent.header("Retry-After")) >= 30
        assert "client" not in spent.json()["error"]["message"]
        other = [chat(g, model, False, key="client-2").status for _ in range(5)]  # 7 tokens each, 4 a minute
        assert other == [200] * 4 + [429]
        assert chat(g, model, False, key="client-2").header("RateLimit-Policy") == '"rpm";q=4;w=60'
    finally:
        g.stop()


def test_a_completion_that_may_have_been_generated_is_never_sent_twice(llm, upstream):
    # The upstream read the request, then the connection broke before an answer: it may have
    # generated (and billed) the completion, so a POST is not retried.
    model = f"flaky-{uuid.uuid4().hex[:8]}"
    calls = flaky_route(upstream, llm, lambda h: setattr(h, "close_connection", True))
    reply = chat(llm, model, stream=False)
    assert reply.status == 502 and reply.error_type() == "upstream_unreachable"
    assert len(calls) == 1


def test_a_completion_the_upstream_refused_with_503_is_retried(llm, upstream):
    model = f"flaky-{uuid.uuid4().hex[:8]}"
    calls = flaky_route(upstream, llm, lambda h: h.reply(503, b"overloaded"))
    reply = chat(llm, model, stream=False)
    assert reply.status == 200
    assert len(calls) == 2



def test_the_usage_object_is_read_alone_and_only_as_the_value_of_usage(monkeypatch):
    import importlib

    monkeypatch.setenv("LLM_UPSTREAM", "http://127.0.0.1:9")
    monkeypatch.setenv("LLM_CLIENT_KEYS", "k")
    example = importlib.import_module("examples.llm_gateway")
    assert example.usage_of(b'{"id": "c", "choices": [], "usage": {"total_tokens": 9, "d": {"x": 1}}}') == {
        "total_tokens": 9, "d": {"x": 1}}
    assert example.usage_of(b'{"usage": null, "choices": [{"delta": {"content": "a"}}]}') is None  # not the delta
    assert example.usage_of(b'{"choices": []}') is None and example.usage_of(b'"usage" but not JSON') is None
    counted = [bool(example.CONTENT.search(e)) for e in (b'{"choices":[{"delta":{"content":"Hi"}}]}',
                                                          b'{"choices":[{"delta":{"role":"assistant","content":""}}]}',
                                                          b'{"choices": [{"delta": {"content": "x"}}]}')]
    assert counted == [True, False, True]
