"""RetryPolicy and the urllib3 Retry it drives, without sockets."""
from unittest import mock

import pytest
from urllib3.exceptions import MaxRetryError, NewConnectionError, ProtocolError

from forkproxy import RetryPolicy
from forkproxy.upstream.retry import Failover, PolicyRetry


def test_defaults():
    p = RetryPolicy()
    assert (p.max_attempts, p.base_backoff_ms, p.backoff_multiplier) == (1, 0, 2)
    assert tuple(p.retry_on_status) == (502, 503, 504)
    assert (p.max_backoff_ms, p.jitter) == (30000, False)


def test_backoff_for_is_base_times_multiplier_to_the_n_capped():
    p = RetryPolicy(base_backoff_ms=100, backoff_multiplier=3, max_backoff_ms=1000)
    assert [p.backoff_for(n) for n in range(4)] == [100, 300, 900, 1000]
    assert isinstance(p.backoff_for(1), int)


def test_base_backoff_secs_and_ms_are_one_value_last_write_wins():
    p = RetryPolicy()
    p.base_backoff_ms = 100
    p.base_backoff_secs = 0.25
    assert (p.base_backoff_ms, p.base_backoff_secs) == (250, 0.25)
    p.base_backoff_ms = 40
    assert p.base_backoff_secs == 0.04


def test_retriable_statuses_and_no_response():
    p = RetryPolicy()
    assert p.retriable(0) and p.retriable(503) and not p.retriable(500) and not p.retriable(200)


def test_jitter_sleeps_a_random_part_of_the_backoff():
    p = RetryPolicy(base_backoff_ms=1000, jitter=True)
    samples = {p.sleep_ms(0) for _ in range(50)}
    assert all(0 <= s <= 1000 for s in samples) and len(samples) > 1


def retried(r, method, url, **kw):
    """The Retry for the next attempt: each retry the policy allows leaves urlopen as a Failover carrying it."""
    with pytest.raises(Failover) as move:
        r.increment(method, url, **kw)
    return move.value.retry


def test_urllib3_sleeps_backoff_for_n_before_retry_n():
    r = RetryPolicy(max_attempts=4, base_backoff_ms=100).to_urllib3()
    sleeps = []
    with mock.patch("time.sleep", sleeps.append):
        for _ in range(3):
            r = retried(r, "GET", "/x", error=ProtocolError("reset"))
            r.sleep()
    assert sleeps == [0.1, 0.2, 0.4]


def test_attempts_run_out_after_max_attempts_and_the_count_survives():
    r = RetryPolicy(max_attempts=3).to_urllib3()
    r = retried(r, "GET", "/x", error=ProtocolError("a"))
    r = retried(r, "GET", "/x", error=ProtocolError("b"))
    with pytest.raises(MaxRetryError):
        r.increment("GET", "/x", error=ProtocolError("c"))
    assert r.count.retries == 2


def test_status_retry_follows_the_policy_not_retry_after_alone():
    r = RetryPolicy(max_attempts=3, retry_on_status=(503,)).to_urllib3()
    assert r.is_retry("GET", 503)
    assert not r.is_retry("GET", 429, has_retry_after=True)
    assert not r.is_retry("GET", 413, has_retry_after=True)


def test_methods_outside_retry_methods_are_not_retried_after_sending():
    r = RetryPolicy(max_attempts=3, retry_methods=["GET"]).to_urllib3()
    assert not r.is_retry("POST", 503)
    with pytest.raises(ProtocolError):
        r.increment("POST", "/x", error=ProtocolError("reset"))


def test_a_failed_connect_is_retried_for_any_method():
    r = RetryPolicy(max_attempts=2, retry_methods=["GET"]).to_urllib3()
    err = NewConnectionError(None, "refused")
    assert retried(r, "POST", "/x", error=err).count.retries == 1


def test_retry_after_is_capped_at_max_backoff_and_only_for_429_and_503():
    r = RetryPolicy(max_attempts=2, max_backoff_ms=500).to_urllib3()
    sleeps = []
    response = mock.Mock(status=503, headers={"Retry-After": "120"})
    with mock.patch("time.sleep", sleeps.append):
        assert r.sleep_for_retry(response)
        response.status = 502
        assert not r.sleep_for_retry(response)
    assert sleeps == [0.5]


def test_unparseable_retry_after_falls_back_to_the_backoff():
    r = retried(RetryPolicy(max_attempts=2, base_backoff_ms=70).to_urllib3(), "GET", "/x", error=ProtocolError("x"))
    sleeps = []
    with mock.patch("time.sleep", sleeps.append):
        r.sleep(mock.Mock(status=503, headers={"Retry-After": "soon-ish"}))
    assert sleeps == [0.07]


def test_new_keeps_the_policy():
    p = RetryPolicy(max_attempts=5)
    r = PolicyRetry(policy=p).new(total=1)
    assert r.policy is p and r.total == 1


def test_a_failure_after_sending_is_retried_for_idempotent_methods_only_unless_the_policy_names_the_method():
    default = RetryPolicy(max_attempts=3).to_urllib3()
    retried(default, "GET", "/x", error=ProtocolError("reset after sending"))
    retried(default, "TRACE", "/x", error=ProtocolError("reset after sending"))
    with pytest.raises(ProtocolError):
        default.increment("POST", "/x", error=ProtocolError("reset after sending"))
    assert default.is_retry("POST", 503)  # the upstream's own "not processed" answer
    named = RetryPolicy(max_attempts=3, retry_methods=["POST"]).to_urllib3()
    retried(named, "POST", "/x", error=ProtocolError("reset after sending"))
    with pytest.raises(ProtocolError):
        named.increment("GET", "/x", error=ProtocolError("reset after sending"))


@pytest.mark.parametrize("name, value", [("max_attempts", 0), ("base_backoff_ms", -1), ("max_backoff_ms", -1),
                                         ("backoff_multiplier", "2"), ("max_attempts", True)])
def test_a_policy_out_of_range_is_refused_naming_the_argument(name, value):
    with pytest.raises(ValueError) as info:
        RetryPolicy(**{name: value})
    assert name in str(info.value)
