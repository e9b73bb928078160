"""Failover that LLM and API traffic needs, end to end: named members with their own data, backups tried
within a request, and ``before_attempt`` shaping each attempt for its member.

Real upstream servers on loopback, the real gunicorn with gevent workers (``tests/apps/failover.py``).
"""
import json
import re
import threading
import time
from contextlib import contextmanager

from tests.support.client import request
from tests.support.gunicorn import Gunicorn
from tests.support.servers import RawServer, free_port, read_request_head, servers


@contextmanager
def gateway(members=None, upstream=None, **env):
    given = {"TEST_MEMBERS": json.dumps(members)} if members is not None else {"TEST_UPSTREAM": upstream}
    g = Gunicorn("tests.apps.failover:app",
                 env={**given, **{(k if k.startswith("FORKPROXY_") else f"TEST_{k.upper()}"): str(v)
                                  for k, v in env.items()}}).start()
    try:
        yield g
    finally:
        g.stop()


def overloaded(handler, seen):
    handler.reply(503, b"overloaded")


def answered(g, n, path="/x", headers=None):
    return [request(g.url, "GET", path, headers=headers) for _ in range(n)]


# -- names ----------------------------------------------------------------------------------------------------

def test_a_named_member_is_named_so_in_the_log_the_access_log_the_metrics_and_ures():
    port = free_port()
    with servers(2) as (a, b):
        a.route("/", overloaded)
        members = [{"url": a.url, "name": "gpt-4o"}, {"url": b.url, "name": "llama", "backup": True}]
        with gateway(members, FORKPROXY_ACCESS_LOG_FORMAT="json",
                     FORKPROXY_METRICS_BIND=f"127.0.0.1:{port}") as g:
            reply = request(g.url, "GET", "/named", headers={"X-Test-Retry": "2"})
            assert reply.status == 200
            assert (reply.header("X-Seen-Name"), reply.header("X-Seen-Upstream")) == ("llama", b.url)
            g.wait_for_log(r"upstream gpt-4o marked down for 10s .*answered 503")
            record = json.loads(g.wait_for_log(r'\{"remote".*"/named".*\}').group(0))
            assert record["upstream"] == "llama"
            import urllib.request
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
                text = resp.read().decode()
            assert re.search(r'forkproxy_upstream_up\{upstream="gpt-4o"\} 0\.0', text), text
            assert re.search(r'forkproxy_upstream_marked_down_total\{upstream="gpt-4o"\} 1\.0', text)
            assert re.search(r'forkproxy_requests_total\{method="GET",status="200",upstream="llama"\} 1\.0', text)


# -- backups within one request -------------------------------------------------------------------------------

def test_a_backup_is_tried_within_the_request_once_the_primary_failed_though_the_primary_stays_live():
    with servers(2) as (a, backup):
        a.route("/", overloaded)
        members = [{"url": a.url, "name": "primary"}, {"url": backup.url, "name": "backup", "backup": True}]
        with gateway(members, max_fails=3) as g:
            replies = answered(g, 2, headers={"X-Test-Retry": "2"})
            assert [(r.status, r.header("X-Seen-Name")) for r in replies] == [(200, "backup")] * 2
            assert len(a.seen()) == 2 and len(backup.seen()) == 2  # each request: primary first, then backup
            assert "marked down" not in g.log()  # 2 failures of max_fails=3: the primary is live all along


def test_a_member_that_timed_out_is_not_tried_again_while_another_is_live():
    hold = threading.Event()
    silent = RawServer(lambda conn: (read_request_head(conn), hold.wait(10)))
    try:
        with servers(1) as (backup,):
            members = [{"url": silent.url, "name": "silent"}, {"url": backup.url, "name": "b", "backup": True}]
            with gateway(members, max_fails=5, timeout=1) as g:
                started = time.monotonic()
                reply = request(g.url, "GET", "/slow", headers={"X-Test-Retry": "3"})
                took = time.monotonic() - started
                assert (reply.status, reply.header("X-Seen-Name")) == (200, "b")
                assert silent.accepted == 1 and 1 <= took < 1.8  # one timeout, not two
    finally:
        hold.set()
        silent.close()


def test_primaries_then_backups_in_their_order_then_round_again_in_the_same_order():
    with servers(4) as (p1, p2, b1, b2):
        for s in (p1, p2, b1, b2):
            s.route("/", overloaded)
        members = [{"url": p1.url, "name": "p1"}, {"url": p2.url, "name": "p2"},
                   {"url": b1.url, "name": "b1", "backup": True}, {"url": b2.url, "name": "b2", "backup": True}]
        with gateway(members, max_fails=100, before_attempt=1) as g:
            reply = request(g.url, "GET", "/order", headers={"X-Test-Retry": "7"})
            assert reply.status == 503 and reply.header("X-Seen-Attempts") == "7"
            order = reply.header("X-Seen-Attempted").split(",")
            assert sorted(order[:2]) == ["p1", "p2"] and order[2:4] == ["b1", "b2"]
            assert order[4:] == order[:3]  # every member tried: again, in the same order


def test_a_plain_url_is_one_member_every_attempt_goes_to_it():
    with servers(1) as (a,):
        a.route("/", overloaded)
        with gateway(upstream=a.url, before_attempt=1) as g:
            reply = request(g.url, "GET", "/plain", headers={"X-Test-Retry": "3"})
            assert reply.status == 503 and len(a.seen()) == 3
            assert reply.header("X-Seen-Attempted") == ",".join([a.url.split("://")[1]] * 3)


# -- before_attempt -------------------------------------------------------------------------------------------

def test_before_attempt_gives_each_member_its_own_key_model_and_path_on_a_fresh_copy():
    with servers(2) as (openai, together):
        openai.route("/", overloaded)
        members = [
            {"url": openai.url, "name": "openai", "meta": {"key": "k1", "model": "gpt-4o", "path": "/v1"}},
            {"url": together.url, "name": "together", "backup": True,
             "meta": {"key": "k2", "model": "llama-3.3", "path": "/api/v1"}},
        ]
        with gateway(members, before_attempt=1) as g:
            body = json.dumps({"model": "asked", "messages": []}).encode()
            reply = request(g.url, "POST", "/chat/completions", body=body,
                            headers={"X-Test-Retry": "2", "X-Test-Retry-Methods": "POST",
                                     "Authorization": "Bearer client"})
            assert (reply.status, reply.header("X-Seen-Name")) == (200, "together")
            first, second = openai.seen()[0], together.seen()[0]
            assert (first.path, second.path) == ("/v1/chat/completions", "/api/v1/chat/completions")
            assert (first.header("Authorization"), second.header("Authorization")) == ("Bearer k1", "Bearer k2")
            assert json.loads(first.body)["model"] == "gpt-4o" and json.loads(second.body)["model"] == "llama-3.3"
            assert first.all("X-Member") == ["openai"] and second.all("X-Member") == ["together"]  # fresh copies
            assert second.header("X-Shaped-By") == "before_forward"
            assert second.header("Content-Length") == str(len(second.body))


def test_a_before_attempt_that_sets_what_http_cannot_carry_is_500_hook_error_and_nothing_is_sent():
    with servers(1) as (a,):
        with gateway([{"url": a.url, "name": "a"}], before_attempt=1) as g:
            reply = request(g.url, "GET", "/bad", headers={"X-Test-Bad-For": "a"})
            assert (reply.status, reply.error_type()) == (500, "hook_error")
            assert not a.seen()


def test_a_before_attempt_that_raises_is_500_hook_error_and_leaves_its_member_settled():
    with servers(2) as (a, b):
        a.route("/", overloaded)
        members = [{"url": a.url, "name": "a"}, {"url": b.url, "name": "b", "backup": True}]
        with gateway(members, before_attempt=1, fail_timeout=0.3) as g:
            request(g.url, "GET", "/x", headers={"X-Test-Retry": "2"})  # a answers 503: marked down
            g.wait_for_log(r"upstream a marked down")
            time.sleep(0.4)  # a is due for its trial: the next request goes to a
            reply = request(g.url, "GET", "/x", headers={"X-Test-Raise-For": "a"})
            assert (reply.status, reply.error_type()) == (500, "hook_error")
            assert len(a.seen()) == 1  # nothing was sent to a for it
            a.route("/", lambda h, s: h.reply(200, b"ok"))
            replies = answered(g, 4)
            assert {r.header("X-Seen-Name") for r in replies} == {"a"}  # a's trial was not left hanging
            g.wait_for_log(r"upstream a live again after")
            assert "marked down for 0.6s" not in g.log()  # the hook's failure did not count against a


# -- judge_reply ----------------------------------------------------------------------------------------------

def error_400(code):
    def route(handler, seen):
        handler.reply(400, json.dumps({"error": {"code": code, "message": code}}).encode(),
                      content_type="application/json")
    return route


CHAT = json.dumps({"model": "m", "messages": []}).encode()
LLM_VERDICTS = {"X-Test-Verdicts": "context_length_exceeded=fail_over,content_filter=accept"}


def test_judge_reply_fails_over_a_context_too_long_400_and_passes_a_content_filter_400_as_it_is():
    with servers(2) as (small, large):
        small.route("/ctx", error_400("context_length_exceeded"))
        small.route("/filter", error_400("content_filter"))
        members = [{"url": small.url, "name": "small"}, {"url": large.url, "name": "large", "backup": True}]
        with gateway(members, judge=1) as g:
            moved = request(g.url, "POST", "/ctx", body=CHAT, headers={**LLM_VERDICTS, "X-Test-Retry": "2"})
            assert (moved.status, moved.header("X-Seen-Name")) == (200, "large")
            assert moved.header("X-Seen-Judged").split(",")[0].startswith("small:400:")
            kept = request(g.url, "POST", "/filter", body=CHAT, headers={**LLM_VERDICTS, "X-Test-Retry": "2"})
            assert (kept.status, kept.json()["error"]["code"]) == (400, "content_filter")
            assert not large.seen("/filter")
            spent = request(g.url, "POST", "/ctx", body=CHAT, headers=LLM_VERDICTS)  # one attempt: none left
            assert (spent.status, spent.json()["error"]["code"]) == (400, "context_length_exceeded")


def test_judge_reply_retry_goes_to_the_same_member_after_retry_after_and_never_counts_against_it():
    with servers(2) as (a, b):
        answers = [503]

        def once_busy(handler, seen):
            if answers:
                handler.reply(answers.pop(), b"busy", headers=[("Retry-After", "1")])
            else:
                handler.reply(200, b"ok")
        a.route("/", once_busy)
        with gateway([{"url": a.url, "name": "a"}, {"url": b.url, "name": "b"}], judge=1) as g:
            started = time.monotonic()
            reply = request(g.url, "GET", "/x", headers={"X-Test-Verdicts": "503=retry", "X-Test-Retry": "2"})
            assert (reply.status, reply.header("X-Seen-Name")) == (200, "a") and not b.seen()
            assert time.monotonic() - started >= 1  # its Retry-After
            assert reply.header("X-Seen-Judged") == "a:503:4,a:200:0"
            assert "marked down" not in g.log()  # a 503 with max_fails=1 would have marked it down


def test_a_judge_reply_verdict_that_is_none_of_them_is_500_hook_error():
    with servers(1) as (a,):
        with gateway([{"url": a.url, "name": "a"}], judge=1) as g:
            reply = request(g.url, "GET", "/x", headers={"X-Test-Verdicts": "200=maybe"})
            assert (reply.status, reply.error_type()) == (500, "hook_error")


def test_a_streamed_error_reply_read_for_judge_reply_goes_to_the_client_buffered_through_after_forward():
    with servers(1) as (a,):
        a.route("/", lambda h, s: h.reply(500, b"data: {\"error\": \"down\"}\n\n", content_type="text/event-stream"))
        with gateway([{"url": a.url, "name": "a"}], judge=1) as g:
            reply = request(g.url, "GET", "/stream")
            assert (reply.status, reply.body) == (500, b"data: {\"error\": \"down\"}\n\n")
            assert reply.header("X-Seen-Judged") == "a:500:25"  # after_forward ran


# -- deadline -------------------------------------------------------------------------------------------------

@contextmanager
def silent_servers(n):
    hold = threading.Event()
    started = [RawServer(lambda conn: (read_request_head(conn), hold.wait(10))) for _ in range(n)]
    try:
        yield started
    finally:
        hold.set()
        for s in started:
            s.close()


def test_a_deadline_is_spent_across_attempts_and_the_attempt_running_into_it_is_504_naming_it():
    with silent_servers(2) as (s1, s2):
        members = [{"url": s1.url, "name": "s1"}, {"url": s2.url, "name": "s2"}]
        with gateway(members, timeout=1, max_fails=5) as g:
            started = time.monotonic()
            reply = request(g.url, "GET", "/x", headers={"X-Test-Retry": "5", "X-Test-Deadline": "1.5"})
            took = time.monotonic() - started
            assert (reply.status, reply.error_type()) == (504, "upstream_timeout")
            assert reply.json()["error"]["message"] == "no upstream reply within the deadline of 1.5s (2 attempts)"
            assert 1.4 <= took < 1.9  # 1 s, then the 0.5 s left: not 5 attempts of 1 s
            assert s1.accepted + s2.accepted == 2


def test_a_backoff_that_would_end_past_the_deadline_is_not_slept_the_last_reply_stands():
    with servers(1) as (a,):
        a.route("/", lambda h, s: h.reply(503, b"busy", headers=[("Retry-After", "5")]))
        with gateway(upstream=a.url) as g:
            started = time.monotonic()
            reply = request(g.url, "GET", "/x", headers={"X-Test-Retry": "3", "X-Test-Deadline": "2"})
            assert (reply.status, reply.body) == (503, b"busy")
            assert time.monotonic() - started < 1 and len(a.seen()) == 1


def test_forkproxy_deadline_bounds_a_request_of_the_ready_made_app():
    with silent_servers(1) as (s,):
        g = Gunicorn("forkproxy.app", env={"FORKPROXY_UPSTREAM": s.url, "FORKPROXY_TIMEOUT": "10",
                                           "FORKPROXY_DEADLINE": "1"}).start()
        try:
            started = time.monotonic()
            reply = request(g.url, "GET", "/x")
            assert (reply.status, reply.error_type()) == (504, "upstream_timeout")
            assert "deadline of 1s (1 attempt)" in reply.json()["error"]["message"]
            assert time.monotonic() - started < 2
        finally:
            g.stop()
