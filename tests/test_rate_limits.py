"""Rate limits and budgets end to end: the real gunicorn with gevent workers, the local store, a real Redis.

tests/apps/limited.py is the gateway; the client names its limits in headers.
"""
from __future__ import annotations

import os
import re
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.support.client import request
from tests.support.gunicorn import Gunicorn
from tests.support.redis import BINARY as REDIS, RedisServer
from tests.support.servers import free_port
from tests.test_observability import sample, scrape

needs_redis = pytest.mark.skipif(REDIS is None, reason="redis-server is not installed (.ci/run installs it)")


def key() -> str:
    return "k-" + uuid.uuid4().hex[:12]


@pytest.fixture(scope="module")
def start(gateways, upstream, tmp_path_factory):
    def run(workers=1, store=None, **env):
        store = store or f"local:{tmp_path_factory.mktemp('limits') / 'limits.lmdb'}"
        return gateways("tests.apps.limited:app", workers=workers, TEST_UPSTREAM=upstream.url,
                        FORKPROXY_LIMITS_STORE=store, **env)
    return run


@pytest.fixture(scope="module")
def local(start):
    return start(workers=2)


def fire(urls: list[str], count: int, headers: dict, path: str = "/limited") -> list:
    """``count`` requests at once, each on a new connection, spread over ``urls``."""
    with ThreadPoolExecutor(max_workers=32) as pool:
        return list(pool.map(lambda i: request(urls[i % len(urls)], "GET", path, headers=headers), range(count)))


def fire_keys(url: str, keys: list[str], limit: str) -> list:
    """A request for each of ``keys`` at once (as clients that make keys up)."""
    with ThreadPoolExecutor(max_workers=32) as pool:
        return list(pool.map(lambda k: request(url, "GET", "/limited", headers={"X-Key": k, "X-Limit": limit}), keys))


def statuses(replies) -> dict:
    counts = {}
    for reply in replies:
        counts[reply.status] = counts.get(reply.status, 0) + 1
    return counts


# -- counts are exact across workers and hosts ---------------------------------------


def test_workers_sharing_the_local_store_let_exactly_the_limit_through(local, start, upstream):
    # gunicorn may hand one worker all the connections, so a second instance on the same store
    # makes sure at least two processes count (the local store is per machine, not per instance).
    other = start(store=local.env["FORKPROXY_LIMITS_STORE"])
    upstream.route("/slow-limited", lambda h, s: (time.sleep(0.02), h.reply(200, b"ok")))
    replies = fire([local.url, other.url], 90, {"X-Key": key(), "X-Limit": "30/600"}, path="/slow-limited")
    assert statuses(replies) == {200: 30, 429: 60}
    assert len({r.header("X-Worker") for r in replies}) >= 2


@needs_redis
def test_two_instances_of_two_workers_sharing_one_redis_let_exactly_the_limit_through(start, redis_server):
    a, b = start(workers=2, store=redis_server.url), start(workers=2, store=redis_server.url)
    replies = fire([a.url, b.url], 120, {"X-Key": key(), "X-Limit": "40/600"})
    assert statuses(replies) == {200: 40, 429: 80}
    assert len({r.header("X-Worker") for r in replies}) >= 2  # both hosts (gunicorn may favour one worker of each)


# -- the algorithm as a client sees it -------------------------------------------------


@pytest.fixture(scope="module")
def local_one(start):
    return start()


@pytest.fixture(scope="module")
def redis_one(start, redis_server):
    return start(store=redis_server.url)


@pytest.fixture
def store_of(request):
    """store_of(store): None for a new local store (start() makes one), or the module's Redis URL."""
    return lambda store: request.getfixturevalue("redis_server").url if store == "redis" else None


@pytest.fixture
def gateway_for(request):
    """gateway_for(store): a one-worker gateway on a local store, or on the module's Redis (skipped without one)."""
    return lambda store: request.getfixturevalue("local_one" if store == "local" else "redis_one")


@pytest.mark.parametrize("store", ["local", "redis"])
def test_a_burst_passes_then_the_rate_refills_it(store, gateway_for):
    g = gateway_for(store)
    headers = {"X-Key": key(), "X-Limit": "5/5"}  # 5 in 5 seconds, all 5 at once (a loaded machine has a second)
    got = [request(g.url, "GET", "/limited", headers=headers) for _ in range(6)]
    assert [r.status for r in got] == [200] * 5 + [429]
    refused = got[-1]
    assert refused.error_type() == "rate_limited" and refused.header("Retry-After") == "1"
    assert "'req'" in refused.json()["error"]["message"]
    time.sleep(2.5)  # 2.5 units back
    again = [request(g.url, "GET", "/limited", headers=headers).status for _ in range(4)]
    assert 1 <= again.count(200) <= 3 and again[0] == 200


def test_replies_carry_the_ratelimit_headers_of_the_tightest_limit(local):
    headers = {"X-Key": key(), "X-Limit": "20/60"}
    first = request(local.url, "GET", "/limited", headers=headers)
    assert first.header("RateLimit-Policy") == '"req";q=20;w=60'
    assert first.header("RateLimit") == '"req";r=19;t=3'
    tight = request(local.url, "GET", "/limited", headers={**headers, "X-Also": "tight"})
    assert tight.header("RateLimit-Policy") == '"tight";q=5;w=60'  # 4 of 5 left is tighter than 18 of 20
    assert re.fullmatch(r'"tight";r=4;t=1[12]', tight.header("RateLimit"))


def test_all_limits_are_taken_together_or_none_is(local):
    k = key()
    for _ in range(5):
        assert request(local.url, "GET", "/limited", headers={"X-Key": k, "X-Also": "small"}).status == 200
    both = {"X-Key": k, "X-Also": "small", "X-Limit": "100/60"}
    assert all(request(local.url, "GET", "/limited", headers=both).status == 429 for _ in range(3))
    alone = request(local.url, "GET", "/limited", headers={"X-Key": k, "X-Limit": "100/60"})
    assert alone.header("RateLimit") == '"req";r=99;t=1'  # the refused three took nothing


@pytest.mark.parametrize("store", ["local", "redis"])
def test_a_budget_charged_after_the_reply_refuses_the_next_request_until_it_refills(store, gateway_for, upstream):
    g = gateway_for(store)
    upstream.route("/tokens", lambda h, s: h.reply(200, b"{}", headers=[("X-Tokens", "150")]))
    headers = {"X-Key": key(), "X-Budget": "100/60"}  # 100 tokens a minute, checked, charged afterwards
    assert request(g.url, "GET", "/tokens", headers=headers).status == 200  # spends 150: 50 below zero
    refused = request(g.url, "GET", "/tokens", headers=headers)
    assert refused.status == 429 and int(refused.header("Retry-After")) in (30, 31)


def test_a_streamed_completion_is_charged_from_its_usage_chunk(local, upstream):
    def completion(h, s):
        h.start_chunked(content_type="text/event-stream")
        h.chunk(b'data: {"choices": [{"delta": {"content": "hi"}}]}\n\n')
        h.chunk(b'data: {"choices": [], "usage": {"total_tokens": 90}}\n\n')
        h.chunk(b"data: [DONE]\n\n")
        h.end_chunked()
    upstream.route("/stream-usage", completion)
    headers = {"X-Key": key(), "X-Budget": "100/60"}
    assert request(local.url, "GET", "/stream-usage", headers=headers).status == 200
    assert request(local.url, "GET", "/stream-usage", headers=headers).status == 200  # 90 of 100: not spent yet
    deadline = time.monotonic() + 5
    while request(local.url, "GET", "/stream-usage", headers=headers).status != 429:
        assert time.monotonic() < deadline  # 180 charged: spent until it refills


# -- keys stay secret --------------------------------------------------------------------


@needs_redis
def test_keys_are_hashed_in_redis_the_local_store_and_the_log(start, redis_server, local):
    secret = "sk-live-" + uuid.uuid4().hex
    g = start(store=redis_server.url, FORKPROXY_METRICS_BIND="")
    for target in (g, local):
        for _ in range(3):
            request(target.url, "GET", "/limited", headers={"X-Key": secret, "X-Limit": "1/60"})
    keys = redis_server.command("KEYS", "*")
    assert b"fpl:" in keys and secret.encode() not in keys
    assert secret not in g.log() and secret not in local.log()
    store_file = Path(re.search(r"local:(\S+)", " ".join(local.env.values())).group(1))
    for path in store_file.parent.iterdir():
        assert secret.encode() not in path.read_bytes()


# -- a failing store ------------------------------------------------------------------------


@needs_redis
def test_redis_killed_paused_and_restarted_fails_open_fast_and_limiting_resumes(start):
    server = RedisServer()
    try:
        g = start(store=server.url)
        headers = {"X-Key": key(), "X-Limit": "3/600"}
        assert [request(g.url, "GET", "/limited", headers=headers).status for _ in range(4)] == [200] * 3 + [429]
        for outage in (server.pause, server.stop):
            outage()
            slowest = 0.0
            for _ in range(20):
                started = time.monotonic()
                assert request(g.url, "GET", "/limited", headers=headers).status == 200  # uncounted
                slowest = max(slowest, time.monotonic() - started)
            assert slowest < 0.5, slowest
            if outage == server.pause:
                server.resume()
            else:
                server.start()  # an empty Redis on the same port: the script is loaded again (NOSCRIPT)
            deadline = time.monotonic() + 5
            while request(g.url, "GET", "/limited", headers=headers).status != 429:
                assert time.monotonic() < deadline, "limiting did not resume"
                time.sleep(0.1)
        log = g.log()
        assert log.count("limits store") == 4, log  # one line when each outage began, one when it ended
    finally:
        server.close()


@needs_redis
def test_fail_closed_answers_503_while_the_store_is_down(start):
    server = RedisServer()
    try:
        g = start(store=server.url, TEST_FAIL_CLOSED="1")
        headers = {"X-Key": key(), "X-Limit": "100/60"}
        assert request(g.url, "GET", "/limited", headers=headers).status == 200
        server.stop()
        down = request(g.url, "GET", "/limited", headers=headers)
        assert down.status == 503 and down.error_type() == "limits_unavailable"
        assert request(g.url, "GET", "/plain").status == 200  # requests without limits never ask the store
    finally:
        server.close()


@needs_redis
def test_a_redis_that_refuses_scripts_fails_open_with_one_log_line(start):
    server = RedisServer("--rename-command", "EVALSHA", "", "--rename-command", "EVAL", "")
    try:
        g = start(store=server.url)
        for _ in range(5):
            assert request(g.url, "GET", "/limited", headers={"X-Key": key(), "X-Limit": "1/60"}).status == 200
            time.sleep(0.3)  # past the store's rest after a failure: each request asks again
        assert g.log().count("limits store") == 1
    finally:
        server.close()


@needs_redis
def test_a_flushed_script_is_loaded_again(start, redis_server):
    g = start(store=redis_server.url)
    headers = {"X-Key": key(), "X-Limit": "2/600"}
    assert request(g.url, "GET", "/limited", headers=headers).status == 200
    redis_server.command("SCRIPT", "FLUSH")
    assert [request(g.url, "GET", "/limited", headers=headers).status for _ in range(2)] == [200, 429]
    assert "limits store" not in g.log()


def test_a_limited_request_leaves_an_unlimited_one_alone(local):
    k = key()
    request(local.url, "GET", "/limited", headers={"X-Key": k, "X-Limit": "1/600"})
    assert request(local.url, "GET", "/limited", headers={"X-Key": k, "X-Limit": "1/600"}).status == 429
    plain = request(local.url, "GET", "/limited", headers={"X-Key": k})
    assert plain.status == 200 and plain.header("RateLimit") is None


def test_threads_are_not_needed_for_counting(local):
    # Sequential requests on one keep-alive connection count the same as concurrent ones.
    k = {"X-Key": key(), "X-Limit": "4/600"}
    assert [request(local.url, "GET", "/limited", headers=k).status for _ in range(6)] == [200] * 4 + [429] * 2
    assert threading.active_count() >= 1


@needs_redis
def test_metrics_count_refusals_by_limit_name_and_store_errors_never_naming_a_key(start):
    server = RedisServer()
    port = free_port()
    secret = "sk-live-" + uuid.uuid4().hex
    try:
        g = start(workers=2, store=server.url, FORKPROXY_METRICS_BIND=f"127.0.0.1:{port}")
        for _ in range(4):
            request(g.url, "GET", "/limited", headers={"X-Key": secret, "X-Limit": "2/600"})
        server.stop()
        request(g.url, "GET", "/limited", headers={"X-Key": secret, "X-Limit": "2/600"})
        deadline, text = time.monotonic() + 10, ""
        while time.monotonic() < deadline:
            text = scrape(port)
            if sample(text, "forkproxy_limits_store_errors_total") >= 1:
                break
            time.sleep(0.1)
        assert sample(text, "forkproxy_rate_limited_total", limit="req") == 2
        assert sample(text, "forkproxy_limits_store_errors_total") == 1
        assert secret not in text
    finally:
        server.close()


# -- values, keys and limits that must never switch limits off ----------------------------------------------


@pytest.fixture(scope="module")
def tokens_as_asked(upstream):
    """/tokens-as answers X-Tokens with what the client asked for in X-Want-Tokens (the gateway charges it)."""
    upstream.route("/tokens-as", lambda h, s: h.reply(200, b"{}", headers=[("X-Tokens", s.header("X-Want-Tokens"))]))
    return "/tokens-as"


@pytest.mark.parametrize("store", ["local", "redis"])
@pytest.mark.parametrize("tokens", ["Infinity", "1" + "0" * 400])
def test_a_charge_of_infinity_or_beyond_float_range_is_that_requests_500_alone(store, tokens, gateway_for,
                                                                               tokens_as_asked):
    g = gateway_for(store)
    budget = {"X-Key": key(), "X-Budget": "100/60"}
    bad = request(g.url, "GET", tokens_as_asked, headers={**budget, "X-Want-Tokens": tokens})
    assert bad.status == 500 and bad.error_type() == "hook_error"
    other = {"X-Key": key(), "X-Limit": "1/60"}
    assert [request(g.url, "GET", "/limited", headers=other).status for _ in range(2)] == [200, 429]  # still on
    for _ in range(2):  # the key is as it was: usable, and charged by a good amount
        assert request(g.url, "GET", tokens_as_asked, headers={**budget, "X-Want-Tokens": "60"}).status == 200
    assert request(g.url, "GET", tokens_as_asked, headers={**budget, "X-Want-Tokens": "0"}).status == 429


@pytest.mark.parametrize("store", ["local", "redis"])
def test_a_key_may_hold_any_code_point_or_be_bytes(store, gateway_for):
    g = gateway_for(store)
    lone = ('{"key": "\\ud800 %s"}' % key()).encode()  # a lone surrogate, as req.json() gives it
    replies = [request(g.url, "POST", "/limited", body=lone, headers={"X-Limit": "1/60"}) for _ in range(2)]
    assert [r.status for r in replies] == [200, 429]
    as_bytes = {"X-Key": key(), "X-Limit": "1/60", "X-Bytes-Key": "1"}
    assert [request(g.url, "GET", "/limited", headers=as_bytes).status for _ in range(2)] == [200, 429]


@pytest.mark.parametrize("store", ["local", "redis"])
def test_the_same_key_rate_and_per_twice_in_a_request_take_both_costs(store, gateway_for):
    g = gateway_for(store)
    twice = {"X-Key": key(), "X-Limit": "3/60,3/60"}
    # the first takes 2 of 3; the second asks 2 of the 1 left
    assert [request(g.url, "GET", "/limited", headers=twice).status for _ in range(2)] == [200, 429]
    once = request(g.url, "GET", "/limited", headers={**twice, "X-Limit": "3/60"})
    assert once.status == 200 and once.header("RateLimit") == '"req";r=0;t=60'


@pytest.mark.parametrize("store", ["local", "redis"])
def test_one_key_with_another_rate_or_per_is_another_limit(store, gateway_for):
    g = gateway_for(store)
    k = key()
    assert [request(g.url, "GET", "/limited", headers={"X-Key": k, "X-Limit": "2/60"}).status
            for _ in range(3)] == [200, 200, 429]
    for spec in ("3/60", "2/61"):
        assert [request(g.url, "GET", "/limited", headers={"X-Key": k, "X-Limit": spec}).status
                for _ in range(2)] == [200, 200]


@pytest.mark.parametrize("store", ["local", "redis"])
def test_a_cost_over_the_burst_is_refused_without_retry_after_saying_so(store, gateway_for):
    g = gateway_for(store)
    for _ in range(2):
        reply = request(g.url, "GET", "/limited", headers={"X-Key": key(), "X-Limit": "10/60/2/3"})
        assert reply.status == 429 and reply.error_type() == "rate_limited"
        assert reply.header("Retry-After") is None and "over its burst" in reply.json()["error"]["message"]
        assert reply.header("RateLimit-Policy") == '"req";q=2;w=60'


# -- charges are never lost silently -----------------------------------------------------------------------------


@pytest.mark.parametrize("store", ["local", "redis"])
def test_a_budget_checked_on_one_instance_is_charged_by_key_from_another(store, start, store_of, tokens_as_asked):
    spec = store_of(store)
    a = start(store=spec)
    b = start(store=spec or a.env["FORKPROXY_LIMITS_STORE"])
    k = key()
    assert request_status(a, tokens_as_asked, {"X-Key": k, "X-Budget": "100/60", "X-Want-Tokens": "0"}) == 200
    # b never saw the limit: it finds its rate and per in the store
    assert request_status(b, tokens_as_asked, {"X-Key": k, "X-Charge": "tok", "X-Want-Tokens": "150"}) == 200
    refused = request(a.url, "GET", tokens_as_asked, headers={"X-Key": k, "X-Budget": "100/60", "X-Want-Tokens": "0"})
    assert refused.status == 429 and refused.header("Retry-After") in ("30", "31")
    assert "dropped" not in a.log() + b.log()


def request_status(g, path, headers) -> int:
    return request(g.url, "GET", path, headers=headers).status


@needs_redis
def test_a_budget_only_checked_is_kept_in_redis_for_at_least_its_per(redis_one, redis_server):
    k = key()
    assert request(redis_one.url, "GET", "/limited", headers={"X-Key": k, "X-Budget": "100/600"}).status == 200
    from forkproxy.limits.gcra import key_digest
    ttl = int(redis_server.command("PTTL", "fpl:" + key_digest("tok:" + k).hex()).strip(b":\r\n"))
    assert ttl >= 600_000


@pytest.mark.parametrize("store", ["local", "redis"])
def test_a_charge_to_a_key_with_no_limit_is_logged_by_prefix_and_counted(store, start, store_of, tokens_as_asked):
    port = free_port()
    g = start(store=store_of(store), FORKPROXY_METRICS_BIND=f"127.0.0.1:{port}")
    secret = "sk-live-" + uuid.uuid4().hex
    assert request_status(g, tokens_as_asked, {"X-Key": secret, "X-Charge": "lost", "X-Want-Tokens": "7"}) == 200
    line = g.wait_for_log(r".*dropped.*").group(0)
    assert "'lost'" in line and secret not in g.log()
    assert sample(scrape(port), "forkproxy_limits_charges_dropped_total", limit="lost") == 1


@pytest.mark.parametrize("store", ["local", "redis"])
def test_a_charge_may_name_the_limit_itself(store, gateway_for, tokens_as_asked):
    g = gateway_for(store)
    by_limit = {"X-Key": key(), "X-Budget": "100/60", "X-Charge": "limit"}
    assert request_status(g, tokens_as_asked, {**by_limit, "X-Want-Tokens": "150"}) == 200
    assert request_status(g, tokens_as_asked, {**by_limit, "X-Want-Tokens": "0"}) == 429


# -- the wall clock steps --------------------------------------------------------------------------------------


def test_a_step_back_of_the_local_clock_never_lengthens_the_wait(start, tmp_path):
    clock = tmp_path / "clock"
    clock.write_text("0")
    g = start(TEST_CLOCK_FILE=str(clock))
    headers = {"X-Key": key(), "X-Limit": "60/3600/5"}  # one a minute comes back, 5 at once
    assert request_status(g, "/limited", headers) == 200  # 1 of 5
    clock.write_text("-3600")
    assert [request_status(g, "/limited", headers) for _ in range(4)] == [200] * 4
    assert 55 <= int(request(g.url, "GET", "/limited", headers=headers).header("Retry-After")) <= 60  # not ~3600


@needs_redis
def test_a_step_back_of_the_redis_clock_never_lengthens_the_wait(redis_one, redis_server):
    from forkproxy.limits.gcra import key_digest
    headers = {"X-Key": key(), "X-Limit": "60/3600/5"}
    assert request_status(redis_one, "/limited", headers) == 200
    now = time.time()  # Redis's clock is this machine's
    # 1 of 5 used, as written by this very Redis had its clock been an hour ahead then
    redis_server.command("HSET", "fpl:" + key_digest("req:" + headers["X-Key"]).hex(), "60.0/3600.0",
                         f"{now + 3660:.6f} {now + 3600:.6f}")
    assert [request_status(redis_one, "/limited", headers) for _ in range(4)] == [200] * 4
    assert 55 <= int(request(redis_one.url, "GET", "/limited", headers=headers).header("Retry-After")) <= 60


# -- the local store: only this user's, and never filled by made-up keys ----------------------------------------

SMALL_MAP = str(64 * 1024 + 128 * 256)  # room for 128 limits (local.LMDB_OWN + 128 * local.ENTRY_ROOM)


def test_the_local_store_reclaims_made_up_keys_once_their_bucket_refilled(start):
    g = start(TEST_LIMITS_MAP_SIZE=SMALL_MAP)
    fire_keys(g.url, [key() for _ in range(800)], "1/1")  # made-up keys living a second: far more than it holds
    time.sleep(1.2)
    fresh = [key() for _ in range(100)]
    assert statuses(fire_keys(g.url, fresh, "1/600")) == {200: 100}
    assert statuses(fire_keys(g.url, fresh, "1/600")) == {429: 100}  # every one was counted: there was room


def test_a_local_store_full_of_live_keys_leaves_new_keys_uncounted_and_stored_ones_enforced(start):
    g = start(TEST_LIMITS_MAP_SIZE=SMALL_MAP)
    held = {"X-Key": key(), "X-Limit": "1/600"}
    assert request_status(g, "/limited", held) == 200
    fire_keys(g.url, [key() for _ in range(800)], "1/600")  # made-up keys live for 10 minutes: more than it holds
    for _ in range(3):
        new = {"X-Key": key(), "X-Limit": "1/600"}
        assert [request_status(g, "/limited", new) for _ in range(2)] == [200, 200]  # uncounted, this request alone
        assert request_status(g, "/limited", held) == 429  # right after: no rest, stored keys are enforced
    assert g.log().count("is full") == 1


@pytest.mark.parametrize("plant", ["foreign file", "open file", "foreign folder", "open folder"])
def test_a_store_path_another_user_owns_or_may_write_stops_the_start_naming_it(plant, tmp_path, upstream):
    folder = tmp_path / "store"
    folder.mkdir()
    path = folder / "limits.lmdb"
    named = folder if plant.endswith("folder") else path
    if named == path:
        path.write_bytes(b"")
    os.chown(named, 65534, 65534) if plant.startswith("foreign") else os.chmod(named, 0o777)
    g = Gunicorn("forkproxy.app", env={"FORKPROXY_UPSTREAM": upstream.url,
                                       "FORKPROXY_LIMITS_STORE": f"local:{path}"}).start(wait=False)
    try:
        assert g.wait_exit(30) != 0
        lines = [line for line in g.log().splitlines() if line.startswith("forkproxy: FORKPROXY_LIMITS_STORE")]
        assert len(lines) == 1 and str(named) in lines[0], g.log()
        assert "Traceback" not in g.log()
    finally:
        g.stop()
