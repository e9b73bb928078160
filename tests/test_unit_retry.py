"""RetryPolicy, what it decides, and the urllib3 Retry that counts the retries, without sockets."""
import pytest
from urllib3.util.retry import Retry

from forkproxy import RetryPolicy
from forkproxy.upstream.failures import SentNothing, Unanswered
from forkproxy.upstream.retry import may_retry, next_retry, pause


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


class Answer:
    """What the loop hands the retry logic of an upstream reply: its status and headers."""

    def __init__(self, status, headers=None):
        self.status, self.headers = status, headers or {}

    def get_redirect_location(self):
        return False


def sent_but_unanswered():
    return Unanswered(ConnectionResetError("reset"), body_unsent=False, nothing_read=True)


def retried(policy, retry, method, **kw):
    """The count after one more retry, which the policy allows."""
    counted = next_retry(policy, retry, method, **kw)
    assert isinstance(counted, Retry)
    return counted


def test_the_wait_before_retry_n_is_backoff_for_n():
    p = RetryPolicy(max_attempts=4, base_backoff_ms=100)
    r, waits = None, []
    for _ in range(3):
        r = retried(p, r, "GET", error=sent_but_unanswered())
        waits.append(pause(p, r))
    assert waits == [0.1, 0.2, 0.4]


def test_attempts_run_out_after_max_attempts_and_the_count_survives():
    p = RetryPolicy(max_attempts=3)
    r = retried(p, None, "GET", error=sent_but_unanswered())
    r = retried(p, r, "GET", response=Answer(503))
    assert next_retry(p, r, "GET", error=sent_but_unanswered()) is None
    assert len(r.history) == 2


def test_the_count_is_an_immutable_urllib3_retry_each_retry_a_new_value():
    p = RetryPolicy(max_attempts=5)
    first = retried(p, None, "GET", response=Answer(502))
    second = retried(p, first, "GET", response=Answer(502))
    assert (len(first.history), len(second.history)) == (1, 2)
    assert [h.status for h in second.history] == [502, 502]


def test_a_single_attempt_policy_allows_no_retry():
    assert next_retry(RetryPolicy(), None, "GET", response=Answer(503)) is None


def test_status_retry_follows_the_policy_not_retry_after_alone():
    p = RetryPolicy(max_attempts=3, retry_on_status=(503,))
    assert may_retry(p, "GET", 503, sent=True)
    assert not may_retry(p, "GET", 429, sent=True)
    assert not may_retry(p, "GET", 413, sent=True)
    assert not may_retry(p, "GET", 200, sent=True)


def test_methods_outside_retry_methods_are_not_retried_after_sending():
    p = RetryPolicy(max_attempts=3, retry_methods=["GET"])
    assert not may_retry(p, "POST", 503, sent=True)
    assert not may_retry(p, "POST", 0, sent=True)


def test_a_failed_connect_is_retried_for_any_method():
    p = RetryPolicy(max_attempts=2, retry_methods=["GET"])
    assert may_retry(p, "POST", 0, sent=False)
    refused = SentNothing.refused(ConnectionRefusedError(111, "refused"))
    assert len(retried(p, None, "POST", error=refused).history) == 1


def test_retry_after_is_capped_at_max_backoff_and_only_for_429_and_503():
    p = RetryPolicy(max_attempts=3, max_backoff_ms=500)
    r = retried(p, None, "GET", response=Answer(503))
    assert pause(p, r, Answer(503, {"Retry-After": "120"})) == 0.5
    assert pause(p, r, Answer(429, {"Retry-After": "0"})) == 0  # at once, not after the backoff
    assert pause(RetryPolicy(max_attempts=3, base_backoff_ms=70), r, Answer(502, {"Retry-After": "120"})) == 0.07


@pytest.mark.parametrize("value", ["soon-ish", "-5", "Fri, 31 Dec 99999 23:59:59 GMT",
                                   "Fri, 31 Dec 9999999999999999999 23:59:59 GMT"])
def test_unparseable_retry_after_falls_back_to_the_backoff(value):
    p = RetryPolicy(max_attempts=2, base_backoff_ms=70)
    r = retried(p, None, "GET", response=Answer(503))
    assert pause(p, r, Answer(503, {"Retry-After": value})) == 0.07


def test_a_failure_after_sending_is_retried_for_idempotent_methods_only_unless_the_policy_names_the_method():
    default = RetryPolicy(max_attempts=3)
    assert may_retry(default, "GET", 0, sent=True) and may_retry(default, "TRACE", 0, sent=True)
    assert not may_retry(default, "POST", 0, sent=True)
    assert may_retry(default, "POST", 503, sent=True)  # the upstream's own "not processed" answer
    named = RetryPolicy(max_attempts=3, retry_methods=["POST"])
    assert may_retry(named, "POST", 0, sent=True)
    assert not may_retry(named, "GET", 0, sent=True)


@pytest.mark.parametrize("name, value", [("max_attempts", 0), ("base_backoff_ms", -1), ("max_backoff_ms", -1),
                                         ("backoff_multiplier", "2"), ("max_attempts", True)])
def test_a_policy_out_of_range_is_refused_naming_the_argument(name, value):
    with pytest.raises(ValueError) as info:
        RetryPolicy(**{name: value})
    assert name in str(info.value)
