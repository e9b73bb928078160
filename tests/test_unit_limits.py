"""GCRA and the limit objects, without I/O; the local store on a real SQLite file in one process."""
from __future__ import annotations

import multiprocessing

import pytest

from forkproxy import Limit, Proxy
from forkproxy.errors import RateLimited
from forkproxy.limits.gcra import charged, decide, headers, retry_after_seconds
from forkproxy.limits.limiter import Limiter, hashed
from forkproxy.limits.local import LocalStore

NOW = 1_000_000.0


def run(limits, count, now=NOW, tats=None):
    """``count`` requests at ``now``: how many pass, the last decision, the TATs after."""
    tats = tats or [None] * len(limits)
    passed, decision = 0, None
    for _ in range(count):
        decision, tats = decide(limits, tats, now)
        passed += decision.allowed
    return passed, decision, tats


def test_a_fresh_key_passes_its_burst_at_once_and_no_more():
    passed, decision, _ = run([Limit("r:k", rate=10, per=60)], 15)
    assert passed == 10 and not decision.allowed
    assert decision.retry_after == pytest.approx(6.0)  # one unit comes back every 6 s
    assert retry_after_seconds(decision) == 6


def test_burst_can_be_smaller_than_the_rate():
    passed, _, _ = run([Limit("r:k", rate=100, per=60, burst=3)], 10)
    assert passed == 3


def test_the_rate_refills_continuously():
    limit = Limit("r:k", rate=10, per=1)
    _, _, tats = run([limit], 10)
    assert run([limit], 5, now=NOW + 0.35, tats=tats)[0] == 3  # 0.35 s: 3.5 units back


def test_a_key_idle_for_longer_than_its_window_is_full_again():
    limit = Limit("r:k", rate=5, per=10)
    _, _, tats = run([limit], 5)
    assert run([limit], 9, now=NOW + 100, tats=tats)[0] == 5


def test_limits_are_taken_all_or_nothing():
    small, big = Limit("a:k", rate=2, per=60), Limit("b:k", rate=100, per=60)
    _, _, tats_small = run([small], 2)
    decision, after = decide([small, big], [tats_small[0], None], NOW)
    assert not decision.allowed and after == [tats_small[0], NOW]  # the big one took nothing


def test_cost_zero_only_checks_and_a_charge_may_overspend():
    budget = Limit("tok:k", rate=100, per=60, cost=0)
    decision, tats = decide([budget], [None], NOW)
    assert decision.allowed and tats == [NOW]  # checking took nothing
    overspent = charged(tats[0], budget.interval, 150, NOW)
    decision, _ = decide([budget], [overspent], NOW)
    assert not decision.allowed and decision.retry_after == pytest.approx(30.0)  # 50 tokens below zero
    assert decide([budget], [overspent], NOW + 30.01)[0].allowed


def test_a_cost_above_one_takes_that_many_units():
    limit = Limit("tok:k", rate=1000, per=60, cost=400)
    assert run([limit], 3)[0] == 2


def test_headers_name_the_tightest_limit_with_whole_numbers():
    loose, tight = Limit("rpm:k", rate=100, per=60), Limit("rpd:k", rate=5, per=86400)
    decision, _ = decide([loose, tight], [None, None], NOW)
    assert headers([loose, tight], decision) == [("RateLimit-Policy", '"rpd";q=5;w=86400'),
                                                 ("RateLimit", '"rpd";r=4;t=17280')]


def test_only_the_prefix_of_a_key_is_ever_shown():
    assert Limit("tpm:sk-secret", 1, 1).name == "tpm"
    assert Limit("sk-secret-without-prefix", 1, 1).name == "limit"
    assert "secret" not in repr(Limit("tpm:sk-secret", 1, 1))
    assert "secret" not in hashed("tpm:sk-secret") and hashed("a") != hashed("b")


@pytest.mark.parametrize("kwargs, named", [
    ({"key": ""}, "key"), ({"rate": 0}, "rate"), ({"rate": float("nan")}, "rate"), ({"per": 0}, "per"),
    ({"per": 86401}, "per"), ({"burst": 0.5}, "burst"), ({"cost": -1}, "cost"), ({"rate": True}, "rate"),
    ({"key": 5}, "key"),
])
def test_a_bad_limit_is_refused_naming_what_is_wrong(kwargs, named):
    with pytest.raises(ValueError) as info:
        Limit(**{"key": "r:k", "rate": 1, "per": 1, **kwargs})
    assert f"Limit {named}" in str(info.value)


@pytest.mark.parametrize("name, value", [
    ("limits_store", "memcached://x"), ("limits_store", "redis://"), ("limits_store", "local:"),
    ("limits_timeout", 0), ("limits_fail_open", "maybe"),
])
def test_bad_limit_settings_are_refused_at_construction(name, value):
    with pytest.raises(ValueError) as info:
        Proxy("http://127.0.0.1:1", **{name: value})
    assert name in str(info.value)


def test_a_redis_url_with_a_password_never_shows_it():
    with pytest.raises(ValueError) as info:
        Proxy("http://127.0.0.1:1", limits_store="redis://:hunter2@host:notaport/0")
    assert "hunter2" not in str(info.value)


# -- the local store, in this process and across processes ------------------------------


def test_the_local_store_keeps_hashed_keys_and_counts(tmp_path):
    limiter = Limiter(f"local:{tmp_path / 'l.lmdb'}", 0.05, True)
    limits = [Limit("rpm:sk-secret", rate=3, per=60)]
    for _ in range(3):
        limiter.take(limits)
    with pytest.raises(RateLimited) as info:
        limiter.take(limits)
    assert info.value.headers[0] == ("Retry-After", "20")
    assert b"sk-secret" not in (tmp_path / "l.lmdb").read_bytes()


def _take_many(path, count, out):
    store = LocalStore(path, 1.0)
    limit = Limit("rpm:shared", rate=50, per=3600)
    out.put(sum(store.take([hashed(limit.key)], [limit]).allowed for _ in range(count)))


def test_processes_sharing_the_local_store_never_let_more_than_the_limit_through(tmp_path):
    path = str(tmp_path / "shared.lmdb")
    out = multiprocessing.get_context("fork").Queue()
    procs = [multiprocessing.get_context("fork").Process(target=_take_many, args=(path, 40, out)) for _ in range(4)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(30)
    assert sum(out.get(timeout=5) for _ in procs) == 50


def test_a_charge_for_a_key_never_limited_is_a_no_op(tmp_path):
    store = LocalStore(str(tmp_path / "c.lmdb"), 0.05)
    store.charge(hashed("tok:new"), None, 10)
    limit = Limit("tok:new", rate=10, per=60, cost=0)
    assert store.take([hashed(limit.key)], [limit]).allowed
