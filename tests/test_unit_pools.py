"""Pools without sockets: smooth weighted round robin, least busy, passive health, backups, bad arguments,
how an attempt that raised settles its member, and what each failure before a head tells the client."""
import ssl
import time
from collections import Counter
from http.client import HTTPException

import pytest
import urllib3

from forkproxy import NoLiveUpstream, RetryPolicy, Upstream, UpstreamPool
from forkproxy.errors import BadUpstreamResponse, UpstreamTimeout, UpstreamUnreachable
from forkproxy.messages import UpstreamRequest
from forkproxy.upstream.attempts import Transport
from forkproxy.upstream.balance import SmoothWeighted, least_busy
from forkproxy.upstream.connections import Connections
from forkproxy.upstream.failures import BadHead, HeadTimeout, SentNothing, Unanswered
from forkproxy.upstream.health import Health, Rules


def picks(order, n, candidates=None):
    candidates = candidates or list(range(len(order.weights)))
    return [order.pick(candidates) for _ in range(n)]


def test_smooth_weighted_round_robin_spreads_a_heavy_member_as_nginx_does():
    assert "".join("abc"[i] for i in picks(SmoothWeighted([5, 1, 1]), 7)) == "aabacaa"


@pytest.mark.parametrize("weights", [[3, 1], [1, 1, 1], [5, 2, 1], [10, 1]])
def test_shares_follow_the_weights_over_every_full_cycle(weights):
    order = SmoothWeighted(weights)
    cycle = sum(weights)
    seq = picks(order, cycle * 20)
    for start in range(0, len(seq), cycle):
        assert Counter(seq[start:start + cycle]) == {i: w for i, w in enumerate(weights)}


def test_a_heavy_member_is_interleaved_with_the_others_not_sent_a_burst():
    seq = "".join("abc"[i] for i in picks(SmoothWeighted([5, 2, 1]), 8))
    assert seq == "abaacaba" and "aaa" not in seq * 2  # plain weighted round robin: aaaaabbc


def test_members_that_cannot_take_a_request_keep_their_score_untouched():
    order = SmoothWeighted([1, 1, 1])
    assert picks(order, 4, candidates=[0, 2]) == [0, 2, 0, 2]


def test_least_busy_takes_the_fewest_in_flight_relative_to_weight_ties_round_robin():
    order = SmoothWeighted([2, 1])
    assert least_busy([0, 1], [3, 1], order) == 1  # 3 per 2 of weight is busier than 1 per 1
    assert least_busy([0, 1], [1, 1], order) == 0  # 0.5 < 1
    tied = [least_busy([0, 1], [2, 1], order) for _ in range(6)]  # 1.0 == 1.0: weighted turns
    assert Counter(tied) == {0: 4, 1: 2}


RULES = Rules(max_fails=2, fail_timeout=10, max_fail_timeout=35)


def test_max_fails_within_fail_timeout_mark_a_member_down():
    h = Health()
    assert h.failed(0, RULES, trial=False) is None
    assert h.failed(11, RULES, trial=False) is None  # the first failure is out of the window
    assert h.failed(12, RULES, trial=False) == 10
    assert not h.available(21) and h.available(22)


def test_down_time_doubles_per_consecutive_marking_up_to_max_fail_timeout_and_a_trial_decides():
    h = Health()
    h.failed(0, RULES, False)
    assert h.failed(1, RULES, False) == 10
    assert h.chosen(11) is True and not h.available(11)  # one trial at a time
    assert h.failed(11.5, RULES, trial=True) == 20
    assert h.chosen(31.5) and h.failed(32, RULES, trial=True) == 35  # 40, capped
    assert h.chosen(67) and h.succeeded(67.5, trial=True) == 66.5  # live again, down since t=1
    assert h.live and h.available(68)
    h.failed(70, RULES, False)
    assert h.failed(71, RULES, False) == 10  # the doubling was forgotten


def test_outcomes_of_requests_sent_before_the_marking_do_not_count():
    h = Health()
    h.failed(0, RULES, False)
    h.failed(0, RULES, False)
    assert h.failed(1, RULES, trial=False) is None and h.succeeded(1, trial=False) is None
    assert not h.available(5)


def pool_of(*members, **kw):
    return UpstreamPool(list(members), **kw)


def chosen(pool, tried=(), now=0.0):
    return pool.choose(list(tried), now)


def test_backups_get_traffic_only_while_every_primary_is_down():
    pool = pool_of("http://a", "http://b", Upstream("http://c", backup=True), fail_timeout=5)
    assert {chosen(pool) for _ in range(10)} == {0, 1}
    pool.failed(0, "refused", False, now=0)
    assert {chosen(pool) for _ in range(10)} == {1}
    pool.failed(1, "refused", False, now=0)
    assert {chosen(pool) for _ in range(10)} == {2}


def test_every_member_down_is_no_live_upstream():
    pool = pool_of("http://a", Upstream("http://b", backup=True))
    pool.failed(0, "x", False, now=0)
    pool.failed(1, "x", False, now=0)
    with pytest.raises(NoLiveUpstream):
        pool.choose([], 1)


def test_a_pool_of_one_is_never_marked_down():
    pool = pool_of("http://a")
    for _ in range(5):
        pool.failed(0, "refused", False, now=0)
    assert chosen(pool) == 0


def test_members_not_tried_yet_come_first():
    pool = pool_of("http://a", "http://b", "http://c")
    assert chosen(pool, tried=[0, 1]) == 2
    assert chosen(pool, tried=[0, 1, 2]) is None  # every one tried: the route goes round again


@pytest.mark.parametrize("call, word", [
    (lambda: UpstreamPool([]), "members"),
    (lambda: UpstreamPool("http://a"), "members"),
    (lambda: UpstreamPool([Upstream("http://a", weight=0)]), "weight"),
    (lambda: UpstreamPool(["http://a"], balance="random"), "balance"),
    (lambda: UpstreamPool(["ftp://a"]), "url"),
    (lambda: UpstreamPool(["http://a"], max_fails=0), "max_fails"),
    (lambda: UpstreamPool(["http://a"], fail_timeout=-1), "fail_timeout"),
    (lambda: UpstreamPool(["http://a"], fail_timeout=10, max_fail_timeout=5), "max_fail_timeout"),
])
def test_bad_pool_arguments_raise_value_error_naming_the_argument(call, word):
    with pytest.raises(ValueError) as info:
        call()
    assert word in str(info.value)


class BrokenConnections(Connections):
    """Connections whose every try raises what no upstream failure is: a bug inside an attempt."""

    def urlopen(self, *args, **kwargs):
        raise RuntimeError("a bug inside an attempt")


class BrokenTransport(Transport):
    def connections(self, member):
        return BrokenConnections(member.host, member.port)


def test_an_attempt_that_raises_anything_settles_its_trial_and_leaves_the_in_flight_count():
    pool = pool_of("http://a", Upstream("http://b", backup=True), fail_timeout=0)
    pool.failed(0, "refused", False, now=time.monotonic())  # down for 0 s: its next request is its trial
    transport = BrokenTransport(pool_maxsize=1, ca_certs=None)
    with pytest.raises(RuntimeError):
        transport.attempts(pool.route(), UpstreamRequest("GET", "/", urllib3.HTTPHeaderDict()), RetryPolicy(),
                       urllib3.Timeout(1)).first()
    assert pool.in_flight == [0, 0]
    assert pool.health[0].ejections == 2 and not pool.health[0].trial_out  # the trial failed: down again


def test_every_member_down_is_an_outcome_with_no_member_not_an_exception():
    pool = pool_of("http://a", "http://b")
    for i in (0, 1):
        pool.failed(i, "refused", False, now=time.monotonic())
    attempted = Transport(pool_maxsize=1, ca_certs=None).attempts(
        pool.route(), UpstreamRequest("GET", "/", urllib3.HTTPHeaderDict()), RetryPolicy(), urllib3.Timeout(1)).first()
    assert attempted.reply is None and attempted.member is None and attempted.retries == 0
    assert isinstance(attempted.error, NoLiveUpstream)


@pytest.mark.parametrize("cause, timed_out, error, words", [
    (TimeoutError("_ssl.c:983: The handshake operation timed out"), True, UpstreamTimeout, "timed out"),
    (ssl.SSLCertVerificationError(1, "certificate verify failed"), False, UpstreamUnreachable, "certificate"),
    (ConnectionResetError(104, "Connection reset by peer"), False, UpstreamUnreachable, "failed"),
])
def test_a_failed_tls_handshake_tells_the_client_tls_and_neither_the_address_nor_the_os_error(
        cause, timed_out, error, words):
    failure = SentNothing.tls(cause, timed_out=timed_out)
    told = failure.error
    assert type(told) is error and "TLS handshake" in told.message and words in told.message
    assert str(cause) not in told.message
    assert told.__cause__ is cause and not failure.sent  # the log has what the handshake raised
    assert failure.reason.startswith("TLS handshake") and str(cause) in failure.reason


@pytest.mark.parametrize("failure, error", [
    (SentNothing.refused(ConnectionRefusedError(111, "Connection refused")), UpstreamUnreachable),
    (SentNothing.timed_out(TimeoutError("Connection to 10.1.2.3 timed out. (connect timeout=1)")), UpstreamTimeout),
    (Unanswered(ConnectionResetError(104, "Connection reset by peer"), body_unsent=True, nothing_read=True),
     UpstreamUnreachable),
    (HeadTimeout(TimeoutError("10.1.2.3: read timed out")), UpstreamTimeout),
    (BadHead(HTTPException("malformed response header line: 'X-Secret 10.1.2.3'")), BadUpstreamResponse),
])
def test_every_failure_before_a_head_tells_the_client_its_kind_and_keeps_the_detail_for_the_log(failure, error):
    told = failure.error
    assert type(told) is error
    assert str(told.__cause__) not in told.message and "Errno" not in told.message and "10.1.2.3" not in told.message
    assert str(told.__cause__) in failure.reason
    assert failure.sent == (not isinstance(failure, SentNothing))


def test_a_reply_released_after_the_next_member_was_chosen_comes_off_its_own_members_count():
    pool = pool_of("http://a", "http://b")
    route = pool.route()
    route.next()
    first, release = route.current, route.done_later()
    route.next()  # a retry's member, chosen before the first reply is drained
    release()
    assert pool.in_flight[first] == 0 and pool.in_flight[route.current] == 1
