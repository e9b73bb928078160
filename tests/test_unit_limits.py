"""GCRA and the limit objects without I/O; the stores in one process: local on a real LMDB file, a real redis-server."""
from __future__ import annotations

import logging
import math
import multiprocessing
import os
import stat
import time
import uuid

import pytest

from forkproxy import Limit, Proxy
from forkproxy.errors import LimitsUnavailable, RateLimited
from forkproxy.limits import local
from forkproxy.limits import paths
from forkproxy.limits.gcra import (HORIZON, MAX_CHARGE, charge_amount, charged, current, decide, headers, key_digest,
                                   retry_after_seconds)
from forkproxy.limits.limiter import Limiter
from forkproxy.limits.local import LocalStore, StoreFull


NOW = 1_000_000.0


def run(limits, count, now=NOW, stored=None):
    """``count`` requests at ``now``: how many pass, the last decision, the stored states after (by limit index)."""
    ids = list(range(len(limits)))
    stored = dict(stored or {i: None for i in ids})
    passed, decision = 0, None
    for _ in range(count):
        decision, writes = decide(limits, ids, stored, now)
        stored.update({i: (tat, now) for i, tat in writes.items()})
        passed += decision.allowed
    return passed, decision, stored


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
    _, _, stored = run([limit], 10)
    assert run([limit], 5, now=NOW + 0.35, stored=stored)[0] == 3  # 0.35 s: 3.5 units back


def test_a_key_idle_for_longer_than_its_window_is_full_again():
    limit = Limit("r:k", rate=5, per=10)
    _, _, stored = run([limit], 5)
    assert run([limit], 9, now=NOW + 100, stored=stored)[0] == 5


def test_limits_are_taken_all_or_nothing():
    small, big = Limit("a:k", rate=2, per=60), Limit("b:k", rate=100, per=60)
    _, _, after_small = run([small], 2)
    decision, writes = decide([small, big], [0, 1], {0: after_small[0], 1: None}, NOW)
    assert not decision.allowed and writes == {}  # refused: nothing written, the big one took nothing


def test_cost_zero_only_checks_and_a_charge_may_overspend():
    budget = Limit("tok:k", rate=100, per=60, cost=0)
    decision, writes = decide([budget], [0], {0: None}, NOW)
    assert decision.allowed and writes == {0: NOW}  # checking took nothing, but the limit is stored (for charges)
    overspent = charged((NOW, NOW), budget.interval, 150, NOW)
    decision, _ = decide([budget], [0], {0: (overspent, NOW)}, NOW)
    assert not decision.allowed and decision.retry_after == pytest.approx(30.0)  # 50 tokens below zero
    assert decide([budget], [0], {0: (overspent, NOW)}, NOW + 30.01)[0].allowed


def test_a_cost_above_one_takes_that_many_units():
    limit = Limit("tok:k", rate=1000, per=60, cost=400)
    assert run([limit], 3)[0] == 2


def test_headers_name_the_tightest_limit_with_whole_numbers():
    loose, tight = Limit("rpm:k", rate=100, per=60), Limit("rpd:k", rate=5, per=86400)
    decision, _ = decide([loose, tight], [0, 1], {0: None, 1: None}, NOW)
    assert headers([loose, tight], decision) == [("RateLimit-Policy", '"rpd";q=5;w=86400'),
                                                 ("RateLimit", '"rpd";r=4;t=17280')]


def test_only_a_short_printable_prefix_of_a_key_is_ever_shown():
    assert Limit("tpm:sk-secret", 1, 1).name == "tpm"
    assert Limit(b"tpm:sk-secret", 1, 1).name == "tpm"
    assert Limit("sk-secret-without-prefix", 1, 1).name == "limit"
    for odd in ('a"b:k', "a\\b:k", "a b:k", "\ud800:k", "é:k", "x" * 65 + ":k", b"\xff:k", "\r\n:k"):
        assert Limit(odd, 1, 1).name == "limit"  # never breaks a header, a metric label or a log line
    assert "secret" not in repr(Limit("tpm:sk-secret", 1, 1))
    assert b"secret" not in key_digest("tpm:sk-secret") and key_digest("a") != key_digest("b")


# -- values are checked where they are given (issue 25, 8) ---------------------------------------


@pytest.mark.parametrize("kwargs, named", [
    ({"key": 5}, "key"), ({"key": None}, "key"),
    ({"rate": 0}, "rate"), ({"rate": -1}, "rate"), ({"rate": float("nan")}, "rate"), ({"rate": True}, "rate"),
    ({"rate": float("inf")}, "rate"), ({"rate": 10 ** 400}, "rate"), ({"rate": "5"}, "rate"),
    ({"per": 0}, "per"), ({"per": 86401}, "per"), ({"per": float("inf")}, "per"), ({"per": 10 ** 400}, "per"),
    ({"burst": 0}, "burst"), ({"burst": float("inf")}, "burst"), ({"burst": 10 ** 400}, "burst"),
    ({"cost": -1}, "cost"), ({"cost": float("inf")}, "cost"), ({"cost": 10 ** 400}, "cost"),
    ({"cost": float("nan")}, "cost"),
])
def test_a_limit_with_a_value_that_is_not_a_finite_number_in_range_is_refused_naming_it(kwargs, named):
    with pytest.raises(ValueError) as info:
        Limit(**{"key": "r:k", "rate": 1, "per": 1, **kwargs})
    assert f"Limit {named}" in str(info.value)


def test_any_finite_values_above_zero_make_a_limit_whose_state_stays_finite():
    extremes = [Limit("r:k", rate=5e-324, per=86400, burst=1e308, cost=1e308),
                Limit("r:k", rate=1e308, per=5e-324, burst=5e-324, cost=0), Limit("", 1, 1, burst=0.5, cost=0.5)]
    for limit in extremes:
        _, decision, stored = run([limit], 3)
        assert all(math.isfinite(x) for x in (decision.retry_after, *decision.ahead, *stored[0]))
        assert charged(stored[0], limit.interval, MAX_CHARGE, NOW) - NOW <= HORIZON
        headers([limit], decision)  # no overflow either


@pytest.mark.parametrize("amount", [-1, float("inf"), float("-inf"), float("nan"), 10 ** 400, MAX_CHARGE + 1,
                                    float(MAX_CHARGE) * 2, True, "5", None])
def test_a_charge_amount_that_is_negative_not_finite_or_over_2_53_is_refused(amount, tmp_path):
    proxy = Proxy("http://127.0.0.1:1", limits_store=f"local:{tmp_path / 'l.lmdb'}")
    with pytest.raises(ValueError):
        proxy.charge("tok:k", amount)
    assert charge_amount(MAX_CHARGE) == MAX_CHARGE and charge_amount(0) == 0.0


# -- a clock step never makes a client wait longer (issue 25, 12) ---------------------------------------


def test_a_clock_step_back_of_an_hour_never_lengthens_the_wait():
    limit = Limit("rpm:k", rate=60, per=60)
    _, _, stored = run([limit], 1)  # 1 of 60 used at NOW
    decision, _ = decide([limit], [0], stored, NOW - 3600)
    assert decision.allowed and decision.ahead[0] == pytest.approx(2.0)  # 2 of 60 used, not 3601 s ahead
    _, _, spent = run([limit], 60)
    decision, writes = decide([limit], [0], spent, NOW - 3600)
    assert not decision.allowed and decision.retry_after == pytest.approx(1.0)  # what refilling takes, no more
    assert writes == {0: pytest.approx(NOW - 3600 + 60)}  # moved back for good, though refused


def test_after_a_step_back_the_bucket_refills_as_time_passes():
    limit = Limit("rpm:k", rate=60, per=60)
    _, _, spent = run([limit], 60)
    back = NOW - 3600
    _, writes = decide([limit], [0], spent, back)
    stored = {0: (writes[0], back)}
    assert run([limit], 60, now=back + 30, stored=stored)[0] == 30  # half a minute later: half the bucket back


def test_a_charged_debt_survives_a_step_back_but_never_grows():
    assert current((NOW + 500, NOW), NOW - 3600) == pytest.approx(NOW - 3600 + 500)
    assert current((NOW + 500, NOW), NOW + 3600) == NOW + 3600  # a step forward: refilled sooner, never later


# -- one key, one rate and per: one limit (issue 25, 13) ---------------------------------------------


def test_the_same_limit_twice_in_one_request_takes_both_costs():
    twice = [Limit("r:k", rate=3, per=60), Limit("r:k", rate=3, per=60)]
    decision, writes = decide(twice, ["a", "a"], {"a": None}, NOW)
    assert decision.allowed and writes == {"a": NOW + 40}  # 2 of 3 taken
    decision, _ = decide(twice, ["a", "a"], {"a": (NOW + 40, NOW)}, NOW)
    assert not decision.allowed  # 1 left, 2 asked


def test_a_cost_over_the_burst_can_never_pass():
    limit = Limit("r:k", rate=10, per=60, burst=2, cost=3)
    assert limit.over_burst and not Limit("r:k", rate=10, per=60, burst=3, cost=3).over_burst
    assert run([limit], 1, stored={0: None})[0] == 0
    assert run([limit], 1, now=NOW + 10 ** 6)[0] == 0


# -- the stores, in this process: the same rules for local and Redis ---------------------------------------


@pytest.fixture(params=["local", "redis"])
def limiter(request, tmp_path):
    """A fail-open Limiter on a new local store, or on the module's redis-server."""
    spec = f"local:{tmp_path / 'l.lmdb'}" if request.param == "local" else request.getfixturevalue("redis_server").url
    return Limiter(spec, 1.0, True)


def key(prefix="r"):
    return f"{prefix}:{uuid.uuid4().hex}"


def refused(limiter, limits):
    with pytest.raises(RateLimited) as info:
        limiter.take(limits)
    return info.value


def test_extreme_charges_leave_every_key_usable_and_limits_on(limiter):
    budget, other = Limit(key("tok"), rate=100, per=60, cost=0), Limit(key(), rate=1, per=60)
    limiter.take([budget])
    limiter.charge(budget.key, float(MAX_CHARGE))
    limiter.charge(budget, float(MAX_CHARGE))
    assert 0 < int(dict(refused(limiter, [budget]).headers)["Retry-After"]) <= HORIZON * 2
    limiter.take([other])
    refused(limiter, [other])  # the store was never rested: limits are still on


def test_a_key_may_be_any_str_or_bytes(limiter):
    for k in ("req:\ud800" + uuid.uuid4().hex, "\udfff\x00:" + uuid.uuid4().hex, ("req:" + uuid.uuid4().hex).encode(),
              b"\xff\xfe" + os.urandom(8), ""):
        limit = Limit(k, rate=1, per=60)
        limiter.take([limit])
        refused(limiter, [limit])
        limiter.take([Limit(k, rate=1, per=61)])  # another per: another limit


def test_a_str_key_and_its_utf8_bytes_are_one_key(limiter):
    k = key()
    limiter.take([Limit(k, rate=1, per=60)])
    refused(limiter, [Limit(k.encode(), rate=1, per=60)])


def test_one_key_with_another_rate_or_per_never_shares_state(limiter):
    k = key()
    limiter.take([Limit(k, rate=2, per=60)] * 2)
    refused(limiter, [Limit(k, rate=2, per=60)])
    for _ in range(3):
        limiter.take([Limit(k, rate=3, per=60)])
    limiter.take([Limit(k, rate=2, per=61)])


def test_the_same_limit_twice_in_one_request_takes_both_costs_in_the_store(limiter):
    k = key()
    limiter.take([Limit(k, rate=3, per=60)] * 2)
    refused(limiter, [Limit(k, rate=3, per=60)] * 2)
    limiter.take([Limit(k, rate=3, per=60)])  # the refused pair took nothing


def test_a_cost_over_the_burst_is_refused_without_retry_after(limiter):
    err = refused(limiter, [Limit(key(), rate=10, per=60, burst=2, cost=3)])
    assert "Retry-After" not in dict(err.headers) and "over its burst" in err.message
    assert dict(err.headers)["RateLimit-Policy"] == '"r";q=2;w=60'


def test_a_cost_over_the_burst_is_refused_even_when_the_store_fails_closed(tmp_path):
    limiter = Limiter(f"local:{tmp_path / 'missing' / 'l.lmdb'}", 1.0, False)
    with pytest.raises(LimitsUnavailable):
        limiter.take([Limit(key(), rate=10, per=60)])
    assert "over its burst" in refused(limiter, [Limit(key(), rate=10, per=60, burst=2, cost=3)]).message


def test_a_budget_charged_by_key_is_found_after_any_number_of_other_keys(limiter):
    budget = Limit(key("tok"), rate=100, per=60, cost=0)
    limiter.take([budget])
    for _ in range(70):  # more keys than any cache of this process holds
        limiter.take([Limit(key(), rate=1e6, per=60) for _ in range(1000)])
    limiter.charge(budget.key, 150)
    assert dict(refused(limiter, [budget]).headers)["Retry-After"] in ("30", "31")


def test_a_charge_by_key_takes_from_every_limit_of_the_key_and_a_limit_charges_itself(limiter):
    k = key("tok")
    minute, day = Limit(k, rate=100, per=60, cost=0), Limit(k, rate=1000, per=86400, cost=0)
    limiter.take([minute, day])
    limiter.charge(k, 150)  # the tokens were spent: both budgets count them
    assert dict(refused(limiter, [minute]).headers)["Retry-After"] in ("30", "31")
    limiter.take([day])  # 150 of 1000
    limiter.charge(day, 900)  # this budget alone
    refused(limiter, [day])


def test_a_charge_to_a_key_with_no_limit_is_logged_by_its_prefix_and_dropped(limiter, caplog):
    secret = "tok:sk-" + uuid.uuid4().hex
    with caplog.at_level(logging.WARNING, logger="forkproxy"):
        limiter.charge(secret, 10)
    assert "'tok'" in caplog.text and "dropped" in caplog.text and secret[4:] not in caplog.text
    limiter.take([Limit(secret, rate=10, per=60, cost=10)])  # nothing was charged


def test_a_clock_step_back_in_the_store_never_lengthens_the_wait(limiter, monkeypatch):
    limit = Limit(key(), rate=60, per=60)
    limiter.take([limit])
    step_back_an_hour(limiter, limit, monkeypatch)
    for _ in range(59):
        limiter.take([limit])  # 1 of 60 was used, before or after the step
    assert dict(refused(limiter, [limit]).headers)["Retry-After"] == "1"


def step_back_an_hour(limiter, limit, monkeypatch):
    """The local store's clock goes back an hour; Redis's key reads as if written an hour ahead (as after a step)."""
    if isinstance(limiter.store, LocalStore):
        monkeypatch.setattr(local, "clock", lambda: time.time() - 3600)
        return
    import redis

    now = time.time()
    client = redis.Redis.from_url(limiter.store.url)
    client.hset("fpl:" + key_digest(limit.key).hex(), f"{limit.rate!r}/{limit.per!r}",
                f"{now + 3600 + 1:.6f} {now + 3600:.6f}")
    client.close()


# -- the local store: where it lives, how full it gets ----------------------------------------------------


def test_the_local_store_keeps_hashed_keys_and_counts(tmp_path, monkeypatch):
    monkeypatch.setattr(local, "MAP_SIZE", 1024 * 1024)  # read whole below
    limiter = Limiter(f"local:{tmp_path / 'l.lmdb'}", 0.05, True)
    limits = [Limit("rpm:sk-secret", rate=3, per=60)]
    for _ in range(3):
        limiter.take(limits)
    assert dict(refused(limiter, limits).headers)["Retry-After"] == "20"
    assert b"sk-secret" not in (tmp_path / "l.lmdb").read_bytes()


def test_the_local_store_files_are_the_users_alone(tmp_path):
    limiter = Limiter(f"local:{tmp_path / 'l.lmdb'}", 0.05, True)
    limiter.take([Limit(key(), 1, 1)])
    for name in ("l.lmdb", "l.lmdb-lock"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600


def test_the_default_local_store_is_in_a_folder_of_the_users_own(tmp_path, monkeypatch):
    folder = tmp_path / f"forkproxy-{os.getuid()}"
    monkeypatch.setattr(paths, "default_dir", lambda: str(folder))
    Limiter("local", 0.05, True).take([Limit(key(), 1, 1)])
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700 and folder.stat().st_uid == os.getuid()
    assert stat.S_IMODE((folder / "limits.lmdb").stat().st_mode) == 0o600


@pytest.mark.parametrize("plant", ["foreign folder", "open folder", "folder link"])
def test_a_default_folder_another_user_made_or_may_write_stops_the_start_naming_it(plant, tmp_path, monkeypatch):
    folder = tmp_path / "forkproxy-0"
    monkeypatch.setattr(paths, "default_dir", lambda: str(folder))
    if plant == "folder link":
        (tmp_path / "elsewhere").mkdir(mode=0o700)
        folder.symlink_to(tmp_path / "elsewhere")
    else:
        folder.mkdir(mode=0o700)
        os.chown(folder, 65534, 65534) if plant == "foreign folder" else os.chmod(folder, 0o777)
    with pytest.raises(ValueError) as info:
        Proxy("http://127.0.0.1:1")
    assert str(folder) in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("plant", ["foreign file", "open file", "file link", "foreign lock", "open folder"])
def test_a_named_store_another_user_owns_or_may_write_stops_the_start_naming_it(plant, tmp_path):
    path = tmp_path / "l.lmdb"
    if plant == "open folder":
        os.chmod(tmp_path, 0o777)
        named = tmp_path
    elif plant == "file link":
        os.symlink(tmp_path / "target", path)
        named = path
    else:
        named = path.with_name("l.lmdb-lock") if plant == "foreign lock" else path
        named.write_bytes(b"")
        os.chown(named, 65534, 65534) if plant.startswith("foreign") else os.chmod(named, 0o666)
    with pytest.raises(ValueError) as info:
        Proxy("http://127.0.0.1:1", limits_store=f"local:{path}")
    assert str(named) in str(info.value) and "\n" not in str(info.value)


def test_a_named_store_in_a_sticky_shared_folder_is_accepted(tmp_path):
    os.chmod(tmp_path, 0o1777)  # as /tmp
    Limiter(f"local:{tmp_path / 'l.lmdb'}", 0.05, True).take([Limit(key(), 1, 1)])


@pytest.fixture
def small_map(monkeypatch, tmp_path):
    """A local store with room for 256 limits, and a clock the test moves."""
    monkeypatch.setattr(local, "MAP_SIZE", local.LMDB_OWN + 256 * local.ENTRY_ROOM)
    clock = [time.time()]
    monkeypatch.setattr(local, "clock", lambda: clock[0])
    return Limiter(f"local:{tmp_path / 'small.lmdb'}", 0.05, True), clock


def test_a_full_local_store_leaves_only_a_new_key_uncounted_and_keeps_stored_keys_enforced(small_map):
    limiter, _ = small_map
    stored = [Limit(key(), rate=1, per=600) for _ in range(256)]
    for limit in stored:
        limiter.take([limit])
    new = Limit(key(), rate=1, per=600)
    with pytest.raises(StoreFull):
        limiter.store.take([new])
    for _ in range(3):
        assert limiter.take([new]) == []  # uncounted: a failure of this request alone
        refused(limiter, [stored[0]])  # no rest: stored keys are still enforced
    limiter.fail_open = False
    with pytest.raises(LimitsUnavailable):  # 503 for the new key's request alone
        limiter.take([new])
    refused(limiter, [stored[1]])


def test_the_local_store_reclaims_keys_whose_bucket_has_refilled(small_map):
    limiter, clock = small_map
    for _ in range(1000):  # made-up keys, four times what the map holds: each lives a second
        assert limiter.take([Limit(key(), rate=1, per=1)]) != []  # counted
        clock[0] += 0.005
    late = Limit(key(), rate=1, per=600)
    limiter.take([late])
    refused(limiter, [late])  # counted: there was room


def _take_many(path, count, out):
    store = LocalStore(path)
    limit = Limit("rpm:shared", rate=50, per=3600)
    out.put(sum(store.take([limit]).allowed for _ in range(count)))


def test_processes_sharing_the_local_store_never_let_more_than_the_limit_through(tmp_path):
    path = str(tmp_path / "shared.lmdb")
    out = multiprocessing.get_context("fork").Queue()
    procs = [multiprocessing.get_context("fork").Process(target=_take_many, args=(path, 40, out)) for _ in range(4)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(30)
    assert sum(out.get(timeout=5) for _ in procs) == 50


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
