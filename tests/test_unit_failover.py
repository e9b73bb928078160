"""Failover without sockets: members' names and data, the order of a request's members, and a
``before_attempt`` that raises leaving its member settled."""
import time

import pytest
import urllib3

from forkproxy import Proxy, RetryPolicy, Upstream, UpstreamPool
from forkproxy.errors import HookError
from forkproxy.lifecycle import _before_attempt
from forkproxy.messages import Request, UpstreamRequest
from forkproxy.upstream.attempts import Transport
from forkproxy.upstream.members import fixed_route


def test_a_member_is_named_by_its_host_and_port_unless_given_a_name():
    assert Upstream("https://api.example/v1").name == "api.example:443"
    assert Upstream("http://[::1]:8000").name == "[::1]:8000"
    assert Upstream("https://api.example/v1", name="gpt-4o").name == "gpt-4o"


def test_meta_is_the_users_own_dict_as_given():
    meta = {"model": "gpt-4o", "key": "k"}
    assert Upstream("http://a", meta=meta).meta is meta
    assert Upstream("http://a").meta == {}


@pytest.mark.parametrize("kwargs, word", [
    ({"name": ""}, "name"), ({"name": "a\nb"}, "name"), ({"name": 3}, "name"), ({"meta": ["k"]}, "meta"),
])
def test_a_bad_name_or_meta_raises_value_error_naming_it(kwargs, word):
    with pytest.raises(ValueError, match=word):
        Upstream("http://a", **kwargs)


def test_two_members_of_one_name_in_a_pool_raise_value_error_naming_it():
    with pytest.raises(ValueError, match="'gpt'"):
        UpstreamPool([Upstream("http://a", name="gpt"), Upstream("http://b", name="gpt")])
    with pytest.raises(ValueError, match="'a:80'"):  # one origin twice, unnamed
        UpstreamPool(["http://a", "http://a"])
    UpstreamPool([Upstream("http://a", name="gpt-4o"), Upstream("http://a", name="gpt-4o-mini")])


def names(route, n):
    tried = []
    for _ in range(n):
        tried.append(route.next().name)
        route.done()
    return tried


def test_a_request_tries_every_primary_then_the_backups_in_their_order_then_again_in_the_same_order():
    pool = UpstreamPool([Upstream("http://p1"), Upstream("http://p2"), Upstream("http://b1", backup=True),
                         Upstream("http://b2", backup=True)])
    order = names(pool.route(), 9)
    assert sorted(order[:2]) == ["p1:80", "p2:80"] and order[2:4] == ["b1:80", "b2:80"]
    assert order[4:8] == order[:4] and order[8] == order[0]
    assert pool.in_flight == [0, 0, 0, 0]


def test_a_member_down_is_skipped_and_backups_come_once_every_primary_was_tried_or_is_down():
    pool = UpstreamPool([Upstream("http://p1"), Upstream("http://p2"), Upstream("http://b1", backup=True)])
    pool.failed(0, "refused", False, time.monotonic())
    assert names(pool.route(), 4) == ["p2:80", "b1:80", "p2:80", "b1:80"]


def test_a_plain_url_is_one_member_made_once_every_attempt_goes_to_it():
    route = fixed_route("http://127.0.0.1:9")
    assert route is fixed_route("http://127.0.0.1:9")
    assert route.next() is route.next() is route.member and route.member.url == "http://127.0.0.1:9"


class Shaping(Proxy):
    def before_attempt(self, req, ureq, upstream):
        if upstream.name == "raises":
            raise RuntimeError("no key")
        ureq.headers.add("X-Member", upstream.name)


def shaper():
    req = Request(method="GET", raw_path="/", headers=urllib3.HTTPHeaderDict())
    return _before_attempt(Shaping("http://127.0.0.1:9"), req)


def test_before_attempt_shapes_a_fresh_copy_each_time_and_leaves_the_request_as_before_forward_left_it():
    ureq = UpstreamRequest("POST", "/v1", urllib3.HTTPHeaderDict({"A": "1"}), b"{}")
    shape = shaper()
    one, two = shape(ureq, Upstream("http://a", name="one")), shape(ureq, Upstream("http://b", name="two"))
    assert one.headers.getlist("X-Member") == ["one"] and two.headers.getlist("X-Member") == ["two"]
    assert "X-Member" not in ureq.headers and (two.method, two.path, two.body) == ("POST", "/v1", b"{}")


def test_a_before_attempt_that_raises_gives_its_member_back_unjudged_trial_included():
    pool = UpstreamPool([Upstream("http://127.0.0.1:9", name="raises"), Upstream("http://127.0.0.1:9", name="b",
                                                                              backup=True)], fail_timeout=0)
    pool.failed(0, "refused", False, now=time.monotonic())  # down for 0 s: its next request is its trial
    with pytest.raises(HookError):
        Transport(pool_maxsize=1, ca_certs=None).attempts(
            pool.route(), UpstreamRequest("GET", "/", urllib3.HTTPHeaderDict()), RetryPolicy(), urllib3.Timeout(1),
            shape=shaper()).first()
    assert pool.in_flight == [0, 0]
    assert pool.health[0].ejections == 1 and not pool.health[0].trial_out  # not judged: due for a trial again
    assert pool.health[0].available(time.monotonic())


def test_a_deadline_cuts_each_attempts_timeouts_to_what_is_left_and_leaves_them_while_more_is_left():
    from forkproxy.upstream.attempts import Deadline

    timeout = urllib3.Timeout(connect=1, read=3)
    assert Deadline(time.monotonic() + 10, 10).cut(timeout) is timeout
    cut = Deadline(time.monotonic() + 2, 10).cut(timeout)
    assert cut.connect_timeout == 1 and 1.9 < cut.read_timeout <= 2
    spent = Deadline(time.monotonic() - 1, 10).cut(timeout)
    assert spent.connect_timeout == spent.read_timeout == 0.001  # an attempt now runs into it at once
    assert Deadline(time.monotonic() + 1, 10).passed_after(2) and not Deadline(time.monotonic() + 1, 10).passed_after(0)


def test_a_trial_that_judge_reply_sent_on_makes_its_member_live_and_no_verdict_counts_against_one():
    pool = UpstreamPool([Upstream("http://a"), Upstream("http://b")], fail_timeout=0, max_fails=1)
    pool.failed(0, "refused", False, now=time.monotonic())
    route = pool.route()
    assert route.next().name == "a:80" and route.trial
    route.judged()
    route.done()
    assert pool.health[0].live and pool.down == 0
    route = pool.route()
    route.next()
    route.judged()
    route.done()
    assert all(h.live and not h.fails for h in pool.health)


def test_fail_over_needs_another_member_a_plain_url_has_none():
    assert not fixed_route("http://127.0.0.1:9").can_move_on()
    pool = UpstreamPool([Upstream("http://a"), Upstream("http://b", backup=True)])
    route = pool.route()
    route.next()
    assert route.can_move_on()
    pool.failed(1, "refused", False, now=time.monotonic())
    assert not route.can_move_on()
