"""The fake OpenAI-compatible provider (tests/support/openai_upstream.py) does what each command says.

Against the real server over loopback, with a plain http.client client, so the
failover tests can trust what the fake did when the proxy is in between.
"""
from __future__ import annotations

import http.client
import json
import socket
import time
from contextlib import contextmanager
from typing import Iterator

import pytest

from tests.support.openai_upstream import Fault, OpenAIUpstream

CHAT = "/v1/chat/completions"
PROMPT = [{"role": "user", "content": "say five tokens"}]
ANSWER = "tok0 tok1 tok2 tok3 tok4"


@pytest.fixture
def fake() -> Iterator[OpenAIUpstream]:
    with OpenAIUpstream(tokens=5) as server:
        yield server


@contextmanager
def opened(fake: OpenAIUpstream, body: dict | None = None, method: str = "POST", path: str = CHAT,
           key: str = "sk-test", timeout: float = 2) -> Iterator[http.client.HTTPResponse]:
    conn = http.client.HTTPConnection("127.0.0.1", fake.port, timeout=timeout)
    try:
        conn.request(method, path, None if body is None else json.dumps(body),
                     {"Content-Type": "application/json", "Authorization": f"Bearer {key}"})
        yield conn.getresponse()
    finally:
        conn.close()


def ask(fake: OpenAIUpstream, stream: bool = False, messages: list = PROMPT, **fields):
    """One chat completion, read to its end: (status, headers, JSON body or the stream's events)."""
    with opened(fake, {"model": "fake-model", "messages": messages, "stream": stream, **fields}) as resp:
        data = resp.read()
        return resp.status, resp.headers, events(data) if stream and resp.status == 200 else json.loads(data)


def events(data: bytes) -> list[str]:
    return [e for e in data.decode().split("\n\n") if e]


def timed_events(resp: http.client.HTTPResponse) -> list[tuple[float, str]]:
    """Each SSE event with the time it arrived, until the stream ends."""
    got, lines = [], []
    while line := resp.readline():
        if line == b"\n":
            got.append((time.monotonic(), b"".join(lines).decode().rstrip("\n")))
            lines = []
        else:
            lines.append(line)
    return got


def text(stream: list[str]) -> str:
    """The answer a stream's events spell."""
    chunks = [json.loads(e.removeprefix("data: ")) for e in stream if e != "data: [DONE]"]
    return "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])


def test_buffered_completion_answers_the_tokens_with_usage(fake):
    status, headers, body = ask(fake)
    assert status == 200 and headers["Content-Type"] == "application/json"
    assert body["object"] == "chat.completion" and body["system_fingerprint"] == "fake"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": ANSWER}
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}


def test_stream_sends_a_delta_per_token_then_finish_usage_and_done(fake):
    status, headers, stream = ask(fake, stream=True, stream_options={"include_usage": True})
    assert status == 200 and headers["Content-Type"] == "text/event-stream"
    assert headers["Transfer-Encoding"] == "chunked"
    chunks = [json.loads(e.removeprefix("data: ")) for e in stream[:-1]]
    assert [c["choices"][0]["delta"]["content"] for c in chunks[:5]] == ["tok0", " tok1", " tok2", " tok3", " tok4"]
    assert chunks[5]["choices"][0]["finish_reason"] == "stop"
    assert chunks[6]["choices"] == [] and chunks[6]["usage"]["completion_tokens"] == 5
    assert stream[-1] == "data: [DONE]" and len(stream) == 8


def test_stream_has_no_usage_chunk_unless_asked(fake):
    stream = ask(fake, stream=True)[2]
    assert text(stream) == ANSWER and len(stream) == 7
    assert not any("usage" in e for e in stream)


def test_models_are_listed(fake):
    with opened(fake, method="GET", path="/v1/models") as resp:
        assert resp.status == 200
        assert [m["id"] for m in json.loads(resp.read())["data"]] == ["fake-model"]


def test_every_request_is_recorded_with_its_path_key_model_and_body(fake):
    body = {"model": "deployment-7", "messages": PROMPT}
    with opened(fake, body, path="/openai/deployments/d7/chat/completions?api-version=2024-10-21", key="k2") as resp:
        assert resp.status == 200
        resp.read()
    [call] = fake.calls
    assert (call.method, call.path) == ("POST", "/openai/deployments/d7/chat/completions?api-version=2024-10-21")
    assert (call.key, call.header("authorization"), call.model) == ("k2", "Bearer k2", "deployment-7")
    assert (call.body, call.messages, call.stream, call.prefill, call.fault) == (body, PROMPT, False, None, "ok")


@pytest.mark.parametrize("stream", [False, True])
def test_a_trailing_assistant_message_is_continued_where_it_ended(fake, stream):
    prefill = [*PROMPT, {"role": "assistant", "content": "tok0 tok1"}]
    _, _, got = ask(fake, stream=stream, messages=prefill, stream_options={"include_usage": True})
    reply = text(got) if stream else got["choices"][0]["message"]["content"]
    assert "tok0 tok1" + reply == ANSWER
    usage = json.loads(got[-2].removeprefix("data: "))["usage"] if stream else got["usage"]
    assert usage["completion_tokens"] == 3
    assert fake.calls[0].prefill == "tok0 tok1"


def test_a_prefill_that_does_not_start_the_answer_gets_the_whole_answer(fake):
    wrong = [*PROMPT, {"role": "assistant", "content": "tok0 tok7"}]
    assert text(ask(fake, stream=True, messages=wrong)[2]) == ANSWER


def test_a_wrong_key_gets_invalid_api_key_and_leaves_the_faults_queued():
    with OpenAIUpstream(key="sk-right", tokens=5) as fake:
        fake.next(Fault.status(500))
        with opened(fake, {"model": "m", "messages": PROMPT}, key="sk-wrong") as resp:
            assert (resp.status, json.loads(resp.read())["error"]["code"]) == (401, "invalid_api_key")
        with opened(fake, {"model": "m", "messages": PROMPT}, key="sk-right") as resp:
            assert resp.status == 500
        assert [c.fault for c in fake.calls] == ["invalid_api_key", "status 500"]


@pytest.mark.parametrize("retry_after", [1, None])
def test_status_429_comes_with_retry_after_only_when_given(fake, retry_after):
    fake.next(Fault.status(429, retry_after=retry_after))
    status, headers, body = ask(fake)
    assert status == 429 and headers["Retry-After"] == (None if retry_after is None else "1")
    assert body["error"]["code"] == "rate_limit_exceeded" and body["error"]["type"] == "requests"


def test_status_500_once_then_normal_answers(fake):
    fake.next(Fault.status(500))
    status, _, body = ask(fake)
    assert (status, body["error"]["type"]) == (500, "server_error")
    assert ask(fake)[0] == 200
    assert [c.fault for c in fake.calls] == ["status 500", "ok"]


def test_status_503_for_good_until_told_otherwise(fake):
    fake.always(Fault.status(503))
    assert [ask(fake, stream=s)[0] for s in (False, True, False)] == [503, 503, 503]
    fake.always(None)
    assert ask(fake)[0] == 200


def test_context_length_exceeded_is_openais_400(fake):
    fake.next(Fault.context_length_exceeded())
    status, _, body = ask(fake, stream=True)
    assert status == 400
    assert body["error"]["message"].startswith("This model's maximum context length is")
    assert {k: v for k, v in body["error"].items() if k != "message"} == {
        "type": "invalid_request_error", "param": "messages", "code": "context_length_exceeded"}


def test_content_filter_is_a_400_with_code_content_filter(fake):
    fake.next(Fault.content_filter())
    status, _, body = ask(fake)
    assert (status, body["error"]["code"], body["error"]["param"]) == (400, "content_filter", "prompt")
    assert body["error"]["innererror"]["code"] == "ResponsibleAIPolicyViolation"


def test_reset_resets_the_connection_before_the_head(fake):
    fake.next(Fault.reset())
    with pytest.raises(ConnectionResetError):
        ask(fake)
    assert [c.fault for c in fake.calls] == ["reset"]


def test_silence_takes_the_request_and_never_answers_until_closed(fake):
    fake.next(Fault.silence())
    with pytest.raises(socket.timeout):
        with opened(fake, {"model": "m", "messages": PROMPT}, timeout=0.3):
            pass
    assert [c.fault for c in fake.calls] == ["silence"]
    started = time.monotonic()
    fake.close()
    assert time.monotonic() - started < 0.5


def test_slow_first_token_sends_the_head_then_waits(fake):
    fake.next(Fault.slow_first_token(0.4))
    started = time.monotonic()
    with opened(fake, {"model": "m", "messages": PROMPT, "stream": True}) as resp:
        head_at = time.monotonic()
        got = timed_events(resp)
    assert got[0][0] - head_at >= 0.25 and got[0][0] - started >= 0.4
    assert text([e for _, e in got]) == ANSWER and got[-1][1] == "data: [DONE]"


def test_slow_first_token_delays_a_buffered_reply_whole(fake):
    fake.next(Fault.slow_first_token(0.3))
    started = time.monotonic()
    status, _, body = ask(fake)
    assert time.monotonic() - started >= 0.3
    assert (status, body["choices"][0]["message"]["content"]) == (200, ANSWER)


def test_cut_closes_after_k_events_without_the_final_chunk(fake):
    fake.next(Fault.cut(3))
    with opened(fake, {"model": "m", "messages": PROMPT, "stream": True}) as resp:
        with pytest.raises(http.client.IncompleteRead) as cut:
            resp.read()
    stream = events(cut.value.partial)
    assert len(stream) == 3 and text(stream) == "tok0 tok1 tok2"


def test_stall_pauses_after_k_events_then_completes(fake):
    fake.next(Fault.stall(2, 0.4))
    with opened(fake, {"model": "m", "messages": PROMPT, "stream": True}) as resp:
        got = timed_events(resp)
    assert got[2][0] - got[1][0] >= 0.3 > got[1][0] - got[0][0]
    assert text([e for _, e in got]) == ANSWER and got[-1][1] == "data: [DONE]"


def test_malformed_inserts_an_event_that_is_not_json(fake):
    fake.next(Fault.malformed(2))
    stream = ask(fake, stream=True)[2]
    with pytest.raises(ValueError):
        json.loads(stream[2].removeprefix("data: "))
    assert text(stream[:2] + stream[3:]) == ANSWER and stream[-1] == "data: [DONE]"


def test_no_done_ends_the_stream_cleanly_without_done(fake):
    fake.next(Fault.no_done())
    stream = ask(fake, stream=True)[2]
    assert text(stream) == ANSWER and "data: [DONE]" not in stream


@pytest.mark.parametrize("named", [False, True])
def test_error_event_ends_the_stream_with_an_in_band_error(fake, named):
    fake.next(Fault.error_event(2, named=named))
    stream = ask(fake, stream=True)[2]
    assert text(stream[:2]) == "tok0 tok1" and len(stream) == 3
    event = stream[2].removeprefix("event: error\n") if named else stream[2]
    assert stream[2].startswith("event: error\n") == named
    assert json.loads(event.removeprefix("data: "))["error"]["type"] == "server_error"


def test_flapping_fails_every_other_request_for_a_while(fake):
    fake.always(Fault.flapping(Fault.status(503), seconds=0.4))
    flaps = [ask(fake)[0] for _ in range(4)]
    time.sleep(0.4)
    after = [ask(fake)[0] for _ in range(2)]
    assert (flaps, after) == ([503, 200, 503, 200], [200, 200])


def test_a_request_takes_the_queued_fault_then_its_models_then_the_standing_one(fake):
    fake.always(Fault.status(503))
    fake.for_model("big", Fault.context_length_exceeded())
    fake.next(Fault.status(429))
    statuses = [ask(fake, model=m)[0] for m in ("big", "big", "small")]
    assert statuses == [429, 400, 503]
    assert [c.fault for c in fake.calls] == ["status 429", "context_length_exceeded", "status 503"]
    fake.clear()
    assert (fake.calls, ask(fake, model="big")[0]) == ([], 200)


def test_a_stream_fault_on_a_buffered_request_is_a_misuse_500(fake):
    fake.next(Fault.cut(2))
    status, _, body = ask(fake)
    assert (status, body["error"]["type"]) == (500, "fake_misuse")


def test_gap_spaces_the_events(fake):
    fake.gap = 0.05
    with opened(fake, {"model": "m", "messages": PROMPT, "stream": True}) as resp:
        got = timed_events(resp)
    assert got[-1][0] - got[0][0] >= 0.04 * (len(got) - 1)


def test_close_drops_idle_keep_alive_connections(fake):
    conn = http.client.HTTPConnection("127.0.0.1", fake.port, timeout=2)
    try:
        conn.request("GET", "/v1/models")
        conn.getresponse().read()
        fake.close()
        with pytest.raises((ConnectionError, http.client.RemoteDisconnected)):
            conn.request("GET", "/v1/models")
            conn.getresponse()
    finally:
        conn.close()
