"""A stream's first unit and its resume, end to end: ``first_byte_timeout`` holds the head until the first unit
and fails over a slow or broken start; ``resume_stream`` carries a stream that broke after its head went out on
to the next live member, the client seeing one whole answer.

Fake OpenAI-style providers on loopback (``tests/support/openai_upstream.py``), the real gunicorn with gevent
workers serving ``tests/apps/resuming.py``.
"""
import json
import time
from contextlib import ExitStack, contextmanager

import pytest

from tests.support.client import StreamClient, Truncated
from tests.support.gunicorn import Gunicorn
from tests.support.openai_upstream import Fault, OpenAIUpstream

ANSWER = " ".join(f"tok{i}" for i in range(12))
CHAT = json.dumps({"model": "m", "stream": True, "messages": [{"role": "user", "content": "count"}]}).encode()


@contextmanager
def providers(*specs):
    """Fake providers, one per spec ``(name, meta)``, members of the pool in that order; the gateway over them."""
    with ExitStack() as stack:
        fakes = [stack.enter_context(OpenAIUpstream(name, tokens=12)) for name, _ in specs]
        yield fakes, [{"url": fake.url, "name": name, "meta": meta or {}} for fake, (name, meta) in zip(fakes, specs)]


@contextmanager
def gateway(members, **env):
    g = Gunicorn("tests.apps.resuming:app", env={"TEST_MEMBERS": json.dumps(members),
                                                  **{k if k.startswith("FORKPROXY_") else f"TEST_{k.upper()}": str(v)
                                                     for k, v in env.items()}}).start()
    try:
        yield g
    finally:
        g.stop()


class Streamed:
    """What the client got: the status, the answer's text, the end's record, whether the reply was cut."""

    def __init__(self, g):
        client = StreamClient(g.url, "/v1/chat/completions", "POST", {"Content-Type": "application/json"}, CHAT,
                              timeout=20)
        started = time.monotonic()
        self.status = client.read_head()
        self.head_after = time.monotonic() - started
        self.events, self.cut = [], False
        if client.header("Content-Length") is not None:  # an error the proxy made: buffered JSON
            while len(client.buf) < int(client.header("Content-Length")):
                client._fill()
            self.events = [client.buf.decode()]
        else:
            try:
                while (chunk := client.next_chunk()) is not None:
                    self.events += split(chunk)
            except Truncated:
                self.cut = True
        client.close()
        self.text = "".join(delta(event) for event in self.events)
        ends = [json.loads(e[len(": end "):]) for e in self.events if e.startswith(": end ")]
        self.end = ends[0] if ends else None
        self.fingerprints = [json.loads(e[6:])["system_fingerprint"] for e in self.events
                             if e.startswith("data: {\"id\"")]


def split(chunk):
    return [event for event in chunk.decode().split("\n\n") if event]


def delta(event):
    if not event.startswith("data: {\"id\""):
        return ""
    return "".join(choice["delta"].get("content") or "" for choice in json.loads(event[6:])["choices"])



# -- first_byte_timeout ----------------------------------------------------------------------------------------

def test_a_slow_first_token_fails_over_within_first_byte_timeout_and_the_client_gets_one_whole_answer():
    with providers(("slow", None), ("fast", None)) as ((slow, fast), members), gateway(members, first_byte=0.5) as g:
        slow.next(Fault.slow_first_token(4))
        started = time.monotonic()
        got = Streamed(g)
        took = time.monotonic() - started
        assert got.status == 200 and not got.cut and got.text == ANSWER
        assert set(got.fingerprints) == {"fast"}  # nothing of the slow one reached the client
        assert took < 3, took  # the slow one would have taken 4 s
        assert got.end["upstream"] == "fast" and got.end["resumes"] == 0
        g.wait_for_log(r"no first unit within 0.5s")


def test_the_head_is_held_until_the_first_unit_and_judge_reply_sees_that_unit():
    with providers(("a", None),) as ((a,), members), gateway(members, first_byte=3, judge=1) as g:
        a.next(Fault.slow_first_token(0.6))
        got = Streamed(g)
        assert got.status == 200 and got.text == ANSWER
        assert got.head_after >= 0.5  # the head waited for the first event
        (judged,) = got.end["judged"]
        assert judged.startswith('a:200:data: {"id"'), judged


def test_no_first_unit_from_any_member_is_504_upstream_timeout_after_each_was_tried_once():
    with providers(("a", None), ("b", None)) as ((a, b), members), gateway(members, first_byte=0.3) as g:
        a.always(Fault.slow_first_token(3))
        b.always(Fault.slow_first_token(3))
        got = Streamed(g)
        assert got.status == 504 and json.loads(got.events[0])["error"]["type"] == "upstream_timeout"
        assert len(a.calls) == len(b.calls) == 1


def test_a_stream_broken_before_its_first_unit_at_every_member_is_502():
    with providers(("a", None), ("b", None)) as ((a, b), members), gateway(members, first_byte=2) as g:
        a.always(Fault.cut(0))
        b.always(Fault.cut(0))
        got = Streamed(g)
        assert got.status == 502, got.events
        assert json.loads(got.events[0])["error"]["type"] in ("bad_upstream_response", "upstream_unreachable")
        assert "127.0.0.1" not in got.events[0]


def test_a_first_unit_late_with_time_left_of_the_deadline_still_fails_over():
    with providers(("slow", None), ("fast", None)) as ((slow, fast), members), \
            gateway(members, first_byte=0.5, deadline=4) as g:  # under the app's timeout of 5: attempts are cut
        slow.next(Fault.slow_first_token(4))
        got = Streamed(g)
        assert got.status == 200 and got.text == ANSWER and set(got.fingerprints) == {"fast"}


def test_a_reply_read_ahead_then_retried_is_let_go_at_once_not_drained_from_its_start():
    with providers(("a", None), ("b", None)) as ((a, b), members), gateway(members, first_byte=5) as g:
        a.next(Fault.status(503))  # a JSON 503 on a keep-alive connection: retried by the policy
        started = time.monotonic()
        got = Streamed(g)
        assert got.status == 200 and got.text == ANSWER
        assert time.monotonic() - started < 0.8  # draining what was read already waited a whole second


def test_without_first_byte_timeout_the_head_goes_out_at_once():
    with providers(("a", None),) as ((a,), members), gateway(members) as g:
        a.next(Fault.slow_first_token(0.8))
        got = Streamed(g)
        assert got.status == 200 and got.text == ANSWER and got.head_after < 0.6


# -- resume_stream ---------------------------------------------------------------------------------------------

def test_a_stream_cut_mid_way_is_resumed_at_the_next_member_and_the_answer_arrives_whole_once():
    with providers(("a", None), ("b", {"resume": True})) as ((a, b), members), \
            gateway(members, resume=1, FORKPROXY_ACCESS_LOG_FORMAT="json") as g:
        a.next(Fault.cut(5))
        got = Streamed(g)
        assert not got.cut and got.text == ANSWER  # no token lost, none twice
        record = json.loads(g.wait_for_log(r'\{"remote".*"/v1/chat/completions".*\}').group(0))
        assert (record["upstream"], record["retries"]) == ("b", 1)  # the access log names the member relayed last
        assert got.fingerprints[:5] == ["a"] * 5 and set(got.fingerprints[5:]) == {"b"}
        assert got.end["resumes"] == 1 and got.end["upstream"] == "b" and not got.end["errored"]
        assert got.end["asked"] == ["b"]
        (resumed,) = b.calls
        assert resumed.prefill == " ".join(f"tok{i}" for i in range(5))


def test_a_stalled_stream_is_resumed_after_stream_idle_timeout():
    with providers(("a", None), ("b", {"resume": True})) as ((a, b), members), \
            gateway(members, resume=1, idle=0.5) as g:
        a.next(Fault.stall(3, 10))
        got = Streamed(g)
        assert not got.cut and got.text == ANSWER and got.end["resumes"] == 1


def test_an_in_band_error_event_failed_by_the_hook_is_resumed():
    with providers(("a", None), ("b", {"resume": True})) as ((a, b), members), gateway(members, resume=1) as g:
        a.next(Fault.error_event(4))
        got = Streamed(g)
        assert not got.cut and got.text == ANSWER and got.end["resumes"] == 1
        sent = [e for e in got.events if not e.startswith(": end")]
        assert got.end["chunks"] == len(sent) + 1  # the failed unit counted, not sent
        assert not any('"error"' in e for e in sent)


def test_a_member_the_hook_declines_is_sent_nothing_and_the_stream_fails_with_its_error_event():
    with providers(("a", None), ("b", {"resume": False})) as ((a, b), members), gateway(members, resume=1) as g:
        a.next(Fault.cut(5))
        got = Streamed(g)
        assert got.cut and got.end["errored"] and got.end["resumes"] == 0 and got.end["asked"] == ["b"]
        assert not b.calls  # never sent a prefill it would not take
        error = [e for e in got.events if e.startswith('data: {"error"')]
        assert json.loads(error[0][6:])["error"]["type"] == "upstream_stream_failed"


def test_a_resumed_attempt_that_fails_before_its_first_unit_asks_again_for_the_next_member():
    with providers(("a", None), ("b", {"resume": True}), ("c", {"resume": True})) as ((a, b, c), members), \
            gateway(members, resume=1, attempts=4) as g:
        a.next(Fault.cut(3))
        b.next(Fault.status(503))
        got = Streamed(g)
        assert not got.cut and got.text == ANSWER
        assert got.end["asked"] == ["b", "c"] and got.end["resumes"] == 1 and got.end["upstream"] == "c"


def test_a_resumed_reply_that_ends_before_a_unit_is_a_failed_attempt_not_a_complete_answer():
    with providers(("a", None), ("b", {"resume": True}), ("c", {"resume": True})) as ((a, b, c), members), \
            gateway(members, resume=1, attempts=4) as g:
        a.next(Fault.cut(3))
        b.next(Fault.empty())
        got = Streamed(g)
        assert not got.cut and got.text == ANSWER and got.end["asked"] == ["b", "c"] and got.end["upstream"] == "c"


def test_resume_uses_the_requests_attempts_so_one_attempt_never_asks():
    with providers(("a", None), ("b", {"resume": True})) as ((a, b), members), \
            gateway(members, resume=1, attempts=1) as g:
        a.next(Fault.cut(5))
        got = Streamed(g)
        assert got.cut and got.end["asked"] == [] and not b.calls


def test_after_a_resumed_stream_no_attempt_is_left_in_flight_and_only_the_failed_start_counts_in_health():
    with providers(("a", None), ("b", {"resume": True}), ("c", {"resume": True})) as ((a, b, c), members), \
            gateway(members, resume=1, attempts=4, idle=1) as g:
        a.next(Fault.cut(5))
        b.next(Fault.slow_first_token(8))  # no first unit within stream_idle_timeout: a failed attempt
        got = Streamed(g)
        assert got.text == ANSWER and got.end["asked"] == ["b", "c"]
        assert got.end["in_flight"] == [0, 0, 0]  # the cut, the failed and the relayed attempt all ended
        assert got.end["live"] == [True, False, True]  # a answered (then broke); b never sent a unit
