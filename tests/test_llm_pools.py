"""examples/llm_pools.py end to end: a fallback chain of two providers through the real gunicorn, one test per
fault class of issue 27, against the fake misbehaving OpenAI provider (tests/support/openai_upstream.py).

The primary ("openai") and the fallback ("together") differ in key, model and path prefix. Both answer the same
60 tokens, so a client that got "tok0 ... tok59" once, in order, got the whole answer with nothing duplicated,
whichever provider wrote which part (each event names its writer in ``system_fingerprint``).
"""
from __future__ import annotations

import http.client
import json
import re
import time
import urllib.request
from dataclasses import dataclass

import pytest

from tests.support.gunicorn import Gunicorn
from tests.support.openai_upstream import CONTENT_FILTER, Fault, OpenAIUpstream
from tests.support.servers import free_port

TOKENS = 60
FULL = " ".join(f"tok{i}" for i in range(TOKENS))
PROMPT = [{"role": "user", "content": "say the tokens"}]


def prefix_of(n: int) -> str:
    """The first ``n`` tokens of the answer, as a resumed provider is sent them."""
    return " ".join(f"tok{i}" for i in range(n))


# -- the gateway and its providers ----------------------------------------------------------------------------

@pytest.fixture
def primary():
    with OpenAIUpstream("openai", key="sk-openai", tokens=TOKENS) as fake:
        yield fake


@pytest.fixture
def fallback():
    with OpenAIUpstream("together", key="sk-together", tokens=TOKENS) as fake:
        yield fake


def member_env(name: str, fake: OpenAIUpstream, model: str, prefix: str, resume: bool = True) -> dict:
    var = f"LLM_{name.upper()}"
    return {f"{var}_URL": fake.url + prefix, f"{var}_KEY": fake.key or "", f"{var}_MODEL": model,
            f"{var}_RESUME": "1" if resume else "0"}


@pytest.fixture
def start(tmp_path, primary, fallback):
    """``start(**env)``: the example in front of the two providers, with short timeouts for the tests."""
    started = []

    def start(**env) -> Gunicorn:
        port = free_port()
        given = {"LLM_CLIENT_KEYS": "client-1,client-2", "LLM_USAGE_LOG": str(tmp_path / "usage.jsonl"),
                 "LLM_PRIMARY": "openai", "LLM_FALLBACK": "together",
                 **member_env("openai", primary, "gpt-4o", "/openai/v1"),
                 **member_env("together", fallback, "llama-3.3", "/together/api/v1"),
                 "LLM_TIMEOUT": "2", "LLM_DEADLINE": "6", "LLM_FIRST_BYTE_TIMEOUT": "0.5",
                 "LLM_STREAM_IDLE_TIMEOUT": "0.5", "LLM_MAX_RETRY_AFTER": "2",
                 "FORKPROXY_METRICS_BIND": f"127.0.0.1:{port}", **{k: str(v) for k, v in env.items()}}
        g = Gunicorn("examples.llm_pools:app", env=given).start()
        g.usage_log, g.metrics_url = tmp_path / "usage.jsonl", f"http://127.0.0.1:{port}/metrics"
        started.append(g)
        return g
    yield start
    for g in started:
        g.stop()


# -- what the client got --------------------------------------------------------------------------------------

@dataclass
class Answer:
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    complete: bool  # False: the connection closed before the reply's end
    seconds: float

    def json(self):
        return json.loads(self.body)

    def events(self) -> list[str]:
        return [e for e in self.body.decode().split("\n\n") if e]

    def chunks(self) -> list[dict]:
        """The stream's JSON events, [DONE] left out."""
        return [json.loads(e.removeprefix("data: ")) for e in self.events() if e != "data: [DONE]"]

    def text(self) -> str:
        """The answer: the concatenated deltas of a stream, the message of a buffered reply."""
        if self.header("Content-Type") == "application/json":
            return self.json()["choices"][0]["message"]["content"]
        return "".join(c["choices"][0]["delta"].get("content", "") for c in self.chunks() if c.get("choices"))

    def writers(self) -> list[str]:
        """Which provider wrote each part of the answer, in order (runs of one writer collapsed)."""
        if self.header("Content-Type") == "application/json":
            return [self.json()["system_fingerprint"]]
        names = [c["system_fingerprint"] for c in self.chunks() if c.get("choices")]
        return [n for i, n in enumerate(names) if i == 0 or names[i - 1] != n]

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)


def chat(g: Gunicorn, stream: bool = False, key: str = "client-1", **fields) -> Answer:
    body = {"model": "any", "messages": PROMPT, "stream": stream, **fields}
    conn = http.client.HTTPConnection("127.0.0.1", g.port, timeout=15)
    started = time.monotonic()
    try:
        conn.request("POST", "/v1/chat/completions", json.dumps(body),
                     {"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
        resp = conn.getresponse()
        try:
            data, complete = resp.read(), True
        except http.client.IncompleteRead as cut:
            data, complete = cut.partial, False
        return Answer(resp.status, resp.getheaders(), data, complete, time.monotonic() - started)
    finally:
        conn.close()


def whole(answer: Answer, *writers: str) -> None:
    """The client got the complete answer once, in order, written by ``writers`` in turn, ending in one [DONE]."""
    assert (answer.status, answer.complete) == (200, True), answer.body[-300:]
    assert answer.text() == FULL
    assert answer.writers() == list(writers)
    if answer.header("Content-Type") != "application/json":
        assert answer.events().count("data: [DONE]") == 1 and answer.events()[-1] == "data: [DONE]"
        assert "error" not in answer.body.decode()


def usage_lines(g: Gunicorn, n: int = 1, timeout: float = 5) -> list[dict]:
    """The usage log once it has ``n`` lines (and no more show up right after)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = g.usage_log.read_text().splitlines() if g.usage_log.exists() else []
        if len(lines) >= n:
            time.sleep(0.1)
            return [json.loads(line) for line in g.usage_log.read_text().splitlines()]
        time.sleep(0.02)
    raise AssertionError(f"fewer than {n} usage lines:\n{g.log()[-3000:]}")


def metric(g: Gunicorn, name: str, **labels) -> float | None:
    with urllib.request.urlopen(g.metrics_url, timeout=5) as resp:
        text = resp.read().decode()
    shown = ",".join(f'{k}="{v}"' for k, v in labels.items())
    found = re.search(rf"^{name}{{{shown}}} (\S+)$" if labels else rf"^{name} (\S+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else None


def settled(g: Gunicorn, **up: int) -> None:
    """No stream left open, and each named member live (1) or down (0) as given."""
    assert metric(g, "forkproxy_active_streams") in (None, 0.0)
    for member, value in up.items():
        assert metric(g, "forkproxy_upstream_up", upstream=member) == value, member


# -- providers, keys, models, paths ---------------------------------------------------------------------------

def test_each_provider_gets_its_own_key_model_and_path_and_never_the_clients_key(start, primary, fallback):
    g = start()
    primary.next(Fault.status(503))
    whole(chat(g), "together")
    whole(chat(g, stream=True), "openai")
    first, second = fallback.calls[0], primary.calls[1]
    assert (primary.calls[0].path, primary.calls[0].key, primary.calls[0].model) == \
        ("/openai/v1/chat/completions", "sk-openai", "gpt-4o")
    assert (first.path, first.key, first.model) == ("/together/api/v1/chat/completions", "sk-together", "llama-3.3")
    assert (second.key, second.model, second.fault) == ("sk-openai", "gpt-4o", "ok")
    assert not [c for c in primary.calls + fallback.calls if "client-1" in json.dumps(c.headers)]


def test_an_unknown_client_key_gets_401_in_the_error_shape_and_reaches_no_provider(start, primary, fallback):
    g = start()
    answer = chat(g, key="stolen")
    assert answer.status == 401 and answer.json()["error"]["type"] == "unauthorized"
    assert not primary.calls and not fallback.calls


def test_a_provider_that_refuses_its_key_is_failed_over_and_marked_down(start, primary, fallback):
    g = start(LLM_OPENAI_KEY="sk-revoked")
    for stream in (False, True, False):
        whole(chat(g, stream=stream), "together")
    assert [c.fault for c in primary.calls] == ["invalid_api_key"] * 2  # LLM_MAX_FAILS=2, then no more detours
    g.wait_for_log(r"upstream openai marked down")
    settled(g, openai=0)


# -- refused replies: 429, 500, 503, 400s ---------------------------------------------------------------------

def test_429_with_a_short_retry_after_is_retried_on_the_same_provider_after_it(start, primary, fallback):
    g = start()
    primary.next(Fault.status(429, retry_after=1))
    answer = chat(g, stream=True)
    whole(answer, "openai")
    assert answer.seconds >= 0.9 and [c.fault for c in primary.calls] == ["status 429", "ok"]
    assert not fallback.calls and "marked down" not in g.log()
    settled(g, openai=1)


@pytest.mark.parametrize("retry_after", [None, 30], ids=["without-retry-after", "long-retry-after"])
def test_429_without_a_short_retry_after_fails_over_at_once(start, primary, fallback, retry_after):
    g = start()
    primary.next(Fault.status(429, retry_after=retry_after), Fault.status(429, retry_after=retry_after))
    answers = [chat(g), chat(g, stream=True)]
    for answer in answers:
        whole(answer, "together")
        assert answer.seconds < 1.5
    assert len(primary.calls) == 2 and "marked down" not in g.log()  # a verdict never counts in health
    settled(g, openai=1)


def test_500_once_fails_over_and_the_primary_keeps_its_traffic(start, primary, fallback):
    g = start()
    primary.next(Fault.status(500))
    whole(chat(g), "together")
    whole(chat(g), "openai")  # one 500 of LLM_MAX_FAILS=2: still live
    assert [c.fault for c in primary.calls] == ["status 500", "ok"]
    settled(g, openai=1)


def test_503_for_good_is_answered_by_the_fallback_and_marks_the_primary_down(start, primary, fallback):
    g = start()
    primary.always(Fault.status(503))
    for stream in (False, True, False, True):
        whole(chat(g, stream=stream), "together")
    g.wait_for_log(r"upstream openai marked down for 10s")
    assert len(primary.calls) == 2  # LLM_MAX_FAILS=2, then no traffic while down
    settled(g, openai=0, together=1)


def test_context_length_exceeded_fails_over_without_counting_against_the_primary(start, primary, fallback):
    g = start()
    primary.next(*[Fault.context_length_exceeded()] * 3)
    for stream in (False, True, False):
        whole(chat(g, stream=stream), "together")
    assert [c.model for c in fallback.calls] == ["llama-3.3"] * 3
    assert "marked down" not in g.log()
    settled(g, openai=1)


@pytest.mark.parametrize("stream", [False, True], ids=["buffered", "streamed"])
def test_a_content_filter_400_is_passed_on_as_it_is_and_the_fallback_never_asked(start, primary, fallback, stream):
    g = start()
    primary.next(Fault.content_filter())
    answer = chat(g, stream=stream)
    assert (answer.status, answer.json()) == (400, CONTENT_FILTER)
    assert not fallback.calls
    [line] = usage_lines(g)
    assert (line["upstream"], line["status"], line["usage"]) == ("openai", 400, None)


# -- no reply: reset, silence, deadline -----------------------------------------------------------------------

def test_a_reset_before_the_head_fails_over_the_post(start, primary, fallback):
    g = start()
    primary.next(Fault.reset(), Fault.reset())
    whole(chat(g), "together")
    whole(chat(g, stream=True), "together")
    assert [c.fault for c in primary.calls] == ["reset", "reset"]
    settled(g, together=1)


def test_silence_fails_over_after_the_timeout_and_the_deadline_bounds_it_across_attempts(start, primary, fallback):
    g = start(LLM_TIMEOUT=1, LLM_DEADLINE=2.5, LLM_MAX_FAILS=5)
    primary.next(Fault.silence())
    answer = chat(g)
    whole(answer, "together")
    assert 0.9 <= answer.seconds < 2.5  # one timeout, then the fallback
    primary.always(Fault.silence())
    fallback.always(Fault.silence())
    spent = chat(g)
    assert (spent.status, spent.json()["error"]["type"]) == (504, "upstream_timeout")
    assert "deadline of 2.5s" in spent.json()["error"]["message"]
    assert 2.3 <= spent.seconds < 4  # the deadline, not three timeouts of 1 s and their backoff


# -- streams: first token, cut, stall, malformed, [DONE], in-band errors --------------------------------------

def test_a_slow_first_token_fails_over_by_first_byte_timeout(start, primary, fallback):
    g = start()
    primary.next(Fault.slow_first_token(5))
    answer = chat(g, stream=True)
    whole(answer, "together")  # the fallback's head and answer alone: nothing of the slow one went out
    assert answer.seconds < 2.5  # well before the slow first token at 5 s
    assert fallback.calls[0].prefill is None
    [line] = usage_lines(g)
    assert (line["upstream"], line["events"], line["resumes"]) == ("together", TOKENS, 0)
    settled(g, openai=1)


def test_without_first_byte_timeout_a_stream_silent_before_its_first_event_is_resumed_from_nothing(
        start, primary, fallback):
    g = start(LLM_FIRST_BYTE_TIMEOUT=0)  # the head goes out at once; stream_idle_timeout (0.5 s) ends the wait
    primary.next(Fault.slow_first_token(5))
    answer = chat(g, stream=True)
    whole(answer, "together")
    assert answer.seconds < 2.5 and fallback.calls[0].prefill is None  # no text went out: nothing to prefill
    [line] = usage_lines(g)
    assert (line["upstream"], line["resumes"], line["errored"]) == ("together", 1, False)
    assert "Traceback" not in g.log()


def test_a_stream_cut_at_event_40_is_resumed_with_the_complete_answer_once(start, primary, fallback):
    g = start()
    primary.next(Fault.cut(40))
    answer = chat(g, stream=True)
    whole(answer, "openai", "together")
    assert [c["choices"][0]["delta"].get("content") for c in answer.chunks()[39:41]] == [" tok39", " tok40"]
    [resumed] = fallback.calls
    assert (resumed.prefill, resumed.messages[:-1], resumed.key, resumed.model) == \
        (prefix_of(40), PROMPT, "sk-together", "llama-3.3")
    [line] = usage_lines(g)
    assert (line["upstream"], line["model"], line["resumes"], line["events"]) == ("together", "llama-3.3", 1, TOKENS)
    assert line["usage"]["completion_tokens"] == TOKENS - 40  # the fallback's own part, counted once
    assert not line["errored"]
    settled(g)


def test_a_stalled_stream_is_resumed_after_stream_idle_timeout(start, primary, fallback):
    g = start()
    primary.next(Fault.stall(20, 5))
    answer = chat(g, stream=True)
    whole(answer, "openai", "together")
    assert answer.seconds < 3  # the idle timeout (0.5 s), not the 5 s stall
    assert fallback.calls[0].prefill == prefix_of(20)
    settled(g)


def test_a_malformed_event_is_failed_and_the_stream_resumed_never_passed_on(start, primary, fallback):
    # Failed, not passed on: SDKs parse every event and would raise; dropped, its text could be lost unnoticed.
    g = start()
    primary.next(Fault.malformed(20))
    answer = chat(g, stream=True)
    whole(answer, "openai", "together")
    assert b'{"choices": [{"delta": \n' not in answer.body
    assert fallback.calls[0].prefill == prefix_of(20)


def test_a_finished_stream_without_done_gets_one_done(start, primary, fallback):
    g = start()
    primary.next(Fault.no_done())
    whole(chat(g, stream=True), "openai")
    whole(chat(g, stream=True), "openai")  # a stream with its own [DONE] gets no second one
    assert not fallback.calls


@pytest.mark.parametrize("named", [False, True], ids=["data-error", "event-error"])
def test_an_in_band_error_event_before_any_text_fails_over(start, primary, fallback, named):
    g = start()
    primary.next(Fault.error_event(0, named=named))
    answer = chat(g, stream=True)
    whole(answer, "together")
    assert fallback.calls[0].prefill is None
    settled(g)


@pytest.mark.parametrize("named", [False, True], ids=["data-error", "event-error"])
def test_an_in_band_error_event_mid_stream_is_resumed_and_never_reaches_the_client(start, primary, fallback, named):
    g = start()
    primary.next(Fault.error_event(20, named=named))
    answer = chat(g, stream=True)
    whole(answer, "openai", "together")  # whole() also checks that no "error" reached the client
    assert fallback.calls[0].prefill == prefix_of(20)
    settled(g)


def test_a_member_that_refuses_prefill_is_never_sent_one_and_the_cut_stream_ends_cleanly(start, primary, fallback):
    g = start(LLM_TOGETHER_RESUME=0)
    primary.next(Fault.cut(20))
    answer = chat(g, stream=True)
    assert (answer.status, answer.complete) == (200, False)  # truncated: no final chunk
    assert answer.text() == prefix_of(20)
    assert json.loads(answer.events()[-1].removeprefix("data: "))["error"]["type"] == "upstream_stream_failed"
    assert not fallback.calls
    primary.next(Fault.status(503))  # failing over before any text needs no prefill: the member takes it
    whole(chat(g, stream=True), "together")
    assert [c.prefill for c in fallback.calls] == [None]
    cut = usage_lines(g, 2)[0]
    assert (cut["upstream"], cut["errored"], cut["resumes"], cut["events"]) == ("openai", True, 0, 20)
    settled(g)


# -- for a while, and accounting ------------------------------------------------------------------------------

def test_a_flapping_provider_never_costs_a_request(start, primary, fallback):
    g = start(LLM_MAX_FAILS=1, LLM_FAIL_TIMEOUT=0.2)
    primary.always(Fault.flapping(seconds=1.0))
    flap_ends = time.monotonic() + 1.0
    answers = []
    for i in range(16):  # about 1.5 s: through the flap and past it
        answers.append(chat(g, stream=bool(i % 2)))
        time.sleep(0.05)
    assert [a.status for a in answers] == [200] * 16 and {a.text() for a in answers} == {FULL}
    assert {a.writers()[0] for a in answers} == {"openai", "together"}
    time.sleep(max(0.0, flap_ends - time.monotonic()) + 0.5)
    for stream in (False, True):
        whole(chat(g, stream=stream), "openai")  # over: the primary is back
    g.wait_for_log(r"upstream openai live again")
    settled(g, openai=1, together=1)


def test_usage_names_the_member_that_answered_after_failover_and_counts_tokens_once(start, primary, fallback):
    g = start()
    primary.next(Fault.status(503), Fault.status(503))
    whole(chat(g), "together")
    whole(chat(g, stream=True), "together")
    buffered, streamed = usage_lines(g, 2)
    for line in (buffered, streamed):
        assert (line["upstream"], line["model"], line["asked"], line["status"]) == ("together", "llama-3.3", "any", 200)
        assert line["usage"] == {"prompt_tokens": 3, "completion_tokens": TOKENS, "total_tokens": TOKENS + 3}
    assert (streamed["streamed"], streamed["events"], streamed["resumes"]) == (True, TOKENS, 0)


def test_a_stream_the_client_hung_up_on_still_writes_its_usage_line(start, primary):
    g = start()
    primary.gap = 0.02
    conn = http.client.HTTPConnection("127.0.0.1", g.port, timeout=5)
    conn.request("POST", "/v1/chat/completions", json.dumps({"model": "any", "messages": PROMPT, "stream": True}),
                 {"Authorization": "Bearer client-2"})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.read1(100)
    resp.close()
    conn.close()
    [line] = usage_lines(g)
    assert (line["upstream"], line["client_disconnected"]) == ("openai", True) and 0 < line["events"] < TOKENS
    settled(g)


# -- deployments sharing the primary's traffic; the start ----------------------------------------------------

def test_pooled_deployments_share_the_traffic_and_fall_back_to_the_backup_provider(tmp_path):
    with OpenAIUpstream("east", key="sk-east") as east, OpenAIUpstream("west", key="sk-west") as west, \
            OpenAIUpstream("provider", key="sk-provider") as backup:
        g = Gunicorn("examples.llm_pools:app", env={
            "LLM_CLIENT_KEYS": "client-1", "LLM_PRIMARY": "east,west", "LLM_FALLBACK": "provider",
            **member_env("east", east, "llama", "/v1"), **member_env("west", west, "llama", "/v1"),
            **member_env("provider", backup, "llama-3.3-70b", "/api/v1"),
            "LLM_USAGE_LOG": str(tmp_path / "usage.jsonl")}).start()
        try:
            for _ in range(6):
                assert chat(g).status == 200
            assert (len(east.calls), len(west.calls), len(backup.calls)) == (3, 3, 0)  # least_busy: none in flight
            assert {c.key for c in east.calls} == {"sk-east"}
            east.close()
            west.close()
            for _ in range(3):
                answer = chat(g, stream=True)
                assert answer.status == 200 and answer.events()[-1] == "data: [DONE]"
            assert [c.model for c in backup.calls] == ["llama-3.3-70b"] * 3
            g.wait_for_log(r"upstream east marked down")
            assert chat(g, key="stranger").status == 401
        finally:
            g.stop()


IN_FLIGHT_FAULTS = [Fault.status(503), Fault.status(429), Fault.reset(), Fault.context_length_exceeded(),
                    Fault.slow_first_token(5), Fault.cut(20), Fault.stall(10, 5), Fault.malformed(10),
                    Fault.error_event(10)]


def test_in_flight_counts_come_back_down_after_every_fault(tmp_path):
    # least_busy sends each request to the primary with the fewest requests in flight, ties in turn: two
    # idle primaries alternate, and one whose count was left up after a fault would get nothing more.
    with OpenAIUpstream("east", tokens=30) as east, OpenAIUpstream("west", tokens=30) as west, \
            OpenAIUpstream("provider", tokens=30) as backup:
        g = Gunicorn("examples.llm_pools:app", env={
            "LLM_CLIENT_KEYS": "client-1", "LLM_PRIMARY": "east,west", "LLM_FALLBACK": "provider",
            **member_env("east", east, "llama", "/v1"), **member_env("west", west, "llama", "/v1"),
            **member_env("provider", backup, "llama-3.3-70b", "/api/v1"), "LLM_MAX_FAILS": "100",
            "LLM_FIRST_BYTE_TIMEOUT": "0.5", "LLM_STREAM_IDLE_TIMEOUT": "0.5"}).start()
        try:
            for fault in IN_FLIGHT_FAULTS:
                east.next(fault)
                for _ in range(2):  # the first may be west's turn
                    answer = chat(g, stream=True)
                    assert (answer.status, answer.complete, answer.text()) == (200, True, prefix_of(30)), fault
                    if east.calls:
                        break
                assert east.calls and east.calls[0].fault == fault.name, "east got nothing: its count stayed up"
                for fake in (east, west, backup):
                    fake.clear()
            for _ in range(4):
                assert chat(g, stream=True).status == 200
            assert (len(east.calls), len(west.calls)) == (2, 2)
        finally:
            g.stop()


@pytest.mark.parametrize("missing", ["LLM_PRIMARY", "LLM_OPENAI_MODEL", "LLM_CLIENT_KEYS"])
def test_missing_configuration_stops_the_start_with_one_line_naming_it(primary, missing):
    env = {"LLM_CLIENT_KEYS": "c", "LLM_PRIMARY": "openai", **member_env("openai", primary, "gpt-4o", "/v1")}
    g = Gunicorn("examples.llm_pools:app", env={k: v for k, v in env.items() if k != missing}).start(wait=False)
    try:
        assert g.wait_exit() != 0
        assert re.search(rf"forkproxy: examples.llm_pools: set {missing}, e\.g\. {missing}=\S+", g.log())
        assert "Traceback" not in g.log()
    finally:
        g.stop()
