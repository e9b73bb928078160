"""Upstream pools end to end: real upstream servers on loopback, the real gunicorn with gevent workers.

Members are separate servers, so each test can see which one answered
(``X-Seen-Upstream``, set from ``ures.upstream``) and how many requests each got.
"""
import re
import socket
import threading
import time
from collections import Counter
from contextlib import contextmanager

import pytest

from tests.support.client import StreamClient, request
from tests.support.gunicorn import Gunicorn
from tests.support.servers import (servers, RawServer, Scripted, Upstream as Server, behind_tls, event_stream, free_port,
                                   read_request_head, reset)


@contextmanager
def gateway(*members, **env):
    g = Gunicorn("tests.apps.pools:app", env={"TEST_MEMBERS": ",".join(members),
                                              **{f"TEST_{k.upper()}": str(v) for k, v in env.items()}}).start()
    try:
        yield g
    finally:
        g.stop()


_HELD = []


def dead():
    """A loopback URL where nothing listens: connects are refused.

    The port stays bound (not listening) for the rest of the run, so no
    server started later (a gunicorn of the next test) can be given it.
    """
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    _HELD.append(sock)
    return f"http://127.0.0.1:{sock.getsockname()[1]}"


def name(url):
    """How logs and metrics name a member given no name: its host:port."""
    return url.split("://", 1)[1]


def answered_by(g, n, path="/x", **headers):
    replies = [request(g.url, "GET", path, headers=headers) for _ in range(n)]
    assert all(r.status == 200 for r in replies), [r.status for r in replies]
    return Counter(r.header("X-Seen-Upstream") for r in replies)


def test_weighted_round_robin_shares_follow_the_weights():
    with servers(2) as (a, b), gateway(f"{a.url}*3", b.url) as g:
        assert answered_by(g, 80) == {a.url: 60, b.url: 20}
        assert "upstream_addr=127.0.0.1:" in g.log()


def test_a_refused_member_is_failed_over_without_an_attempt_marked_down_and_tried_again_later():
    placeholder = socket.socket()  # bound, not listening: refused until the member comes back on it
    placeholder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    placeholder.bind(("127.0.0.1", 0))
    port = placeholder.getsockname()[1]
    with servers(1) as (a,), gateway(a.url, f"http://127.0.0.1:{port}", fail_timeout=0.6) as g:
        replies = [request(g.url, "GET", "/x") for _ in range(6)]
        assert [r.status for r in replies] == [200] * 6
        assert {r.header("X-Seen-Upstream") for r in replies} == {a.url}
        assert {r.header("X-Seen-Attempts") for r in replies} == {"1"}  # the failed connect used none
        g.wait_for_log(rf"upstream 127.0.0.1:{port} marked down for 0.6s \(time 1 in a row\): .*Connection")
        time.sleep(0.7)
        assert answered_by(g, 3) == {a.url: 3}  # one of them was its trial: refused, so down twice as long
        g.wait_for_log(rf"upstream 127.0.0.1:{port} marked down for 1.2s \(time 2 in a row\)")
        placeholder.close()
        late_server = Server(port)  # the member comes back on its port
        try:
            time.sleep(1.3)
            seen = answered_by(g, 6)
            assert seen[f"http://127.0.0.1:{port}"] >= 1  # the trial succeeded: live again
            g.wait_for_log(rf"upstream 127.0.0.1:{port} live again after [0-9.]+s down")
        finally:
            late_server.close()


def test_a_member_answering_503_is_marked_down_and_the_retry_goes_to_another():
    with servers(2) as (a, b), gateway(a.url, b.url) as g:
        a.route("/", lambda h, s: h.reply(503, b"overloaded"))
        replies = [request(g.url, "GET", "/x", headers={"X-Test-Retry": "2"}) for _ in range(6)]
        assert [r.status for r in replies] == [200] * 6
        assert {r.header("X-Seen-Upstream") for r in replies} == {b.url}
        assert len(a.seen()) == 1  # marked down after its one failure (max_fails=1)
        g.wait_for_log(rf"upstream {name(a.url)} marked down for 10s .*answered 503")


def test_every_member_down_is_502_no_live_upstream_and_none_is_contacted():
    with servers(2) as (a, b), gateway(a.url, b.url) as g:
        for s in (a, b):
            s.route("/", lambda h, s: h.reply(503, b"overloaded"))
        first = request(g.url, "GET", "/x", headers={"X-Test-Retry": "2"})
        assert first.status == 503  # both tried: the last upstream reply goes to the client as it is
        contacted = len(a.seen()) + len(b.seen())
        started = time.monotonic()
        reply = request(g.url, "GET", "/x")
        assert reply.status == 502 and reply.error_type() == "no_live_upstream"
        assert time.monotonic() - started < 1
        assert len(a.seen()) + len(b.seen()) == contacted
        assert reply.header("X-Seen-Upstream") == "none"


def test_backups_take_traffic_only_while_every_primary_is_down():
    with servers(2) as (a, backup), gateway(a.url, f"{backup.url}+backup") as g:
        assert answered_by(g, 5) == {a.url: 5}
        a.kill()
        assert answered_by(g, 5) == {backup.url: 5}  # the first of them failed over from the dead primary
        assert backup.seen()


def test_a_post_fails_over_on_a_refused_connect_but_not_after_it_may_have_been_processed():
    with servers(1) as (b,), gateway(dead(), b.url) as g:
        reply = request(g.url, "POST", "/charge", body=b"once")
        assert reply.status == 200 and [s.body for s in b.seen("/charge")] == [b"once"]

    closed_unanswered = RawServer(lambda conn: read_request_head(conn))  # reads, then closes
    with servers(1) as (b,), gateway(closed_unanswered.url, b.url) as g:
        try:
            replies = [request(g.url, "POST", "/charge", body=b"once", headers={"X-Test-Retry": "3"})
                       for _ in range(2)]
            statuses = sorted(r.status for r in replies)
            assert statuses == [200, 502]  # one went to the member that closed: not sent again
            assert len(b.seen("/charge")) == 1
        finally:
            closed_unanswered.close()


def test_a_post_fails_over_after_sending_when_the_policy_names_post():
    closed_unanswered = RawServer(lambda conn: read_request_head(conn))
    with servers(1) as (b,), gateway(closed_unanswered.url, b.url) as g:
        try:
            replies = [request(g.url, "POST", "/c", body=b"x", headers={"X-Test-Retry": "2",
                                                                         "X-Test-Retry-Methods": "POST"})
                       for _ in range(2)]
            assert [r.status for r in replies] == [200, 200]
        finally:
            closed_unanswered.close()


def test_a_stream_fails_over_before_its_head_and_never_after():
    with servers(1) as (b,), gateway(dead(), b.url) as g:
        b.route("/events", event_stream(3))
        for _ in range(2):
            client = StreamClient(g.url, "/events")
            assert client.read_head() == 200
            assert b"".join(client.read_rest()) == b"".join(b"data: %d\n\n" % i for i in range(3))
            client.close()


def test_least_busy_sends_new_requests_away_from_members_holding_long_streams():
    hold = threading.Event()
    with servers(2) as (a, b), gateway(a.url, b.url, balance="least_busy") as g:
        for s in (a, b):
            s.route("/long", event_stream(1, before=lambda: hold.wait(10)))
        client = StreamClient(g.url, "/long")
        try:
            assert client.read_head() == 200
            busy = a if a.seen("/long") else b
            idle = b if busy is a else a
            assert answered_by(g, 10, "/short") == {idle.url: 10}
        finally:
            hold.set()
            client.close()
        time.sleep(0.2)
        assert answered_by(g, 10, "/short") == {a.url: 5, b.url: 5}  # nothing in flight: turns again


def test_two_hundred_concurrent_requests_while_a_member_dies_are_all_answered():
    with servers(3) as (a, b, c), gateway(a.url, b.url, c.url) as g:
        results, lock = [], threading.Lock()

        def client(i):
            try:
                r = request(g.url, "GET", f"/load/{i}", timeout=10)
                outcome = r.status if r.status == 200 else (r.status, r.error_type())
            except Exception as exc:  # a hang or a dropped connection would land here
                outcome = repr(exc)
            with lock:
                results.append(outcome)
        threads = [threading.Thread(target=client, args=(i,)) for i in range(200)]
        for i, t in enumerate(threads):
            t.start()
            if i == 60:
                b.kill()
        for t in threads:
            t.join(30)
        assert len(results) == 200
        bad = [r for r in results if r != 200 and not (isinstance(r, tuple) and r[0] == 502)]
        assert bad == [], Counter(map(str, bad))
        assert Counter(r == 200 for r in results)[True] >= 190


def test_forkproxy_app_takes_a_comma_separated_list_as_a_round_robin_pool():
    with servers(2) as (a, b):
        g = Gunicorn("forkproxy.app", env={"FORKPROXY_UPSTREAM": f"{a.url}, {b.url}"}).start()
        try:
            for i in range(4):
                assert request(g.url, "GET", f"/rr/{i}").status == 200
            assert (len(a.seen("/rr")), len(b.seen("/rr"))) == (2, 2)
        finally:
            g.stop()


def test_a_bad_list_in_forkproxy_upstream_stops_the_start_with_one_line():
    g = Gunicorn("forkproxy.app", env={"FORKPROXY_UPSTREAM": "http://127.0.0.1:1,ftp://x"}).start(wait=False)
    try:
        assert g.wait_exit(30) != 0
        assert re.search(r"forkproxy: FORKPROXY_UPSTREAM: .*ftp://x", g.log())
        assert "Traceback" not in g.log()
    finally:
        g.stop()


def test_pool_health_shows_in_metrics():
    port = free_port()
    with servers(1) as (a,):
        g = Gunicorn("tests.apps.pools:app", env={"TEST_MEMBERS": f"{a.url},{dead()}",
                                                  "FORKPROXY_METRICS_BIND": f"127.0.0.1:{port}"}).start()
        try:
            for _ in range(4):
                assert request(g.url, "GET", "/m").status == 200
            import urllib.request
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
                text = resp.read().decode()
            assert re.search(rf'forkproxy_upstream_up\{{upstream="{name(a.url)}"\}} 1\.0', text), text
            assert re.search(r'forkproxy_upstream_up\{upstream="127.0.0.1:\d+"\} 0\.0', text)
            assert re.search(r'forkproxy_upstream_marked_down_total\{upstream="127.0.0.1:\d+"\} 1\.0', text)
        finally:
            g.stop()


def test_a_member_that_accepts_and_never_answers_times_out_is_marked_down_and_the_retry_goes_elsewhere():
    hold = threading.Event()
    silent = RawServer(lambda conn: (read_request_head(conn), hold.wait(10)))
    with servers(1) as (b,), gateway(silent.url, b.url, timeout=0.5) as g:
        try:
            replies = [request(g.url, "GET", "/slow", headers={"X-Test-Retry": "2"}) for _ in range(4)]
            assert [r.status for r in replies] == [200] * 4
            assert {r.header("X-Seen-Upstream") for r in replies} == {b.url}
            assert silent.accepted == 1  # marked down after its one timeout
            g.wait_for_log(rf"upstream {name(silent.url)} marked down for 10s .*no response head in time")
        finally:
            hold.set()
            silent.close()


# -- a TLS handshake that fails sent nothing: a failed connect --------------------------------------------------

@contextmanager
def failing_tls(kind):
    """The https:// URL of an upstream whose TLS handshake fails as ``kind`` says."""
    if kind == "untrusted":  # a real TLS server, whose certificate the proxy has no reason to trust
        trustme = pytest.importorskip("trustme")
        with servers(1) as (plain,):
            tls = behind_tls(plain, trustme.CA().issue_cert("127.0.0.1"))
            try:
                yield tls.url
            finally:
                tls.shutdown()
                tls.server_close()
        return
    hold = threading.Event()
    ends = {"closed": lambda conn: conn.recv(4096),  # reads the ClientHello, then closes
            "reset": lambda conn: (conn.recv(4096), reset(conn)),
            "silent": lambda conn: hold.wait(5)}
    server = RawServer(ends[kind])
    try:
        yield f"https://127.0.0.1:{server.port}"
    finally:
        hold.set()
        server.close()


@pytest.mark.parametrize("kind", ["closed", "reset", "silent", "untrusted"])
def test_a_post_moves_on_from_a_member_whose_tls_handshake_fails_and_the_member_is_counted(kind):
    with servers(1) as (b,), failing_tls(kind) as bad, gateway(bad, b.url) as g:
        reply = request(g.url, "POST", "/charge", body=b"once")  # round robin tries the bad member first
        assert (reply.status, reply.header("X-Seen-Upstream")) == (200, b.url)
        assert reply.header("X-Seen-Attempts") == "1"  # the failed handshake used none
        assert [s.body for s in b.seen("/charge")] == [b"once"]
        g.wait_for_log(rf"upstream {name(bad)} marked down for 10s \(time 1 in a row\): TLS")


def test_a_tls_handshake_that_times_out_is_a_504_connect_timeout_saying_tls():
    with failing_tls("silent") as bad, gateway(bad, timeout=3) as g:  # connect_timeout is 1
        started = time.monotonic()
        reply = request(g.url, "POST", "/x", body=b"x")
        assert reply.status == 504 and reply.error_type() == "upstream_timeout"
        assert time.monotonic() - started < 2.5  # the connect's timeout, not the response head's
        message = reply.json()["error"]["message"]
        assert "TLS" in message and "response head" not in message
        assert "127.0.0.1" not in message
        g.wait_for_log(r"POST /x -> 504 upstream_timeout: TLS handshake with the upstream timed out "
                       r"\(https://127\.0\.0\.1:\d+: \w+")  # the log names the member and the failure


# -- the resend on a fresh connection, after a reused one closed unanswered, is part of the attempt ---------------

def test_a_resend_closed_unanswered_too_fails_the_attempt_with_502_and_counts_against_the_member():
    a = Scripted([200, "close", "close"])  # the third request: closed on the reused connection, then on a fresh one
    with servers(1) as (b,), gateway(a.url, b.url) as g:
        try:
            assert [request(g.url, "GET", "/x").header("X-Seen-Upstream") for _ in range(2)] == [a.url, b.url]
            reply = request(g.url, "GET", "/x")
            assert reply.status == 502 and reply.error_type() == "upstream_unreachable"
            assert a.got == 3
            assert answered_by(g, 4) == {b.url: 4}  # marked down by that one failure (max_fails=1)
            g.wait_for_log(rf"upstream {name(a.url)} marked down for 10s \(time 1 in a row\)")
        finally:
            a.close()


def test_least_busy_counts_an_attempt_whose_resend_was_closed_unanswered_as_no_longer_in_flight():
    a = Scripted([200, "close", "close"])
    with servers(1) as (b,), gateway(a.url, b.url, balance="least_busy", max_fails=10) as g:
        try:
            assert [request(g.url, "GET", "/x").header("X-Seen-Upstream") for _ in range(2)] == [a.url, b.url]
            request(g.url, "GET", "/x")  # closed on a's reused connection, then on a fresh one
            assert answered_by(g, 4) == {a.url: 2, b.url: 2}  # nothing in flight on either: turns again
        finally:
            a.close()


def test_a_trial_whose_resend_is_closed_unanswered_marks_the_member_down_again_and_a_later_trial_revives_it():
    a = Scripted([200, 503, "close", "close"])
    with servers(1) as (b,), gateway(a.url, b.url, fail_timeout=0.5) as g:
        try:
            seen = [request(g.url, "GET", "/x") for _ in range(3)]
            assert [(r.status, r.header("X-Seen-Upstream")) for r in seen] == [(200, a.url), (200, b.url),
                                                                                (503, a.url)]
            time.sleep(0.6)  # due for its trial, on its kept-alive connection: closed there and on a fresh one
            retried = [request(g.url, "GET", "/x", headers={"X-Test-Retry": "2"}) for _ in range(3)]
            assert [(r.status, r.header("X-Seen-Upstream")) for r in retried] == [(200, b.url)] * 3
            assert a.got == 4
            g.wait_for_log(rf"upstream {name(a.url)} marked down for 1s \(time 2 in a row\)")
            time.sleep(1.1)
            assert answered_by(g, 4)[a.url] >= 1  # its next trial was answered: live again
            g.wait_for_log(rf"upstream {name(a.url)} live again after")
        finally:
            a.close()


def test_least_busy_counts_a_retried_reply_off_its_own_member_not_the_one_retried_on():
    a = Scripted([503])  # drained, and its connection released, once b was already chosen for the retry
    with servers(1) as (b,), gateway(a.url, b.url, balance="least_busy", max_fails=10) as g:
        try:
            retried = request(g.url, "GET", "/x", headers={"X-Test-Retry": "2"})
            assert (retried.status, retried.header("X-Seen-Upstream")) == (200, b.url) and a.got == 1
            assert answered_by(g, 4) == {a.url: 2, b.url: 2}  # nothing in flight on either: turns again
        finally:
            a.close()


def test_a_retry_policy_whose_own_code_raises_leaves_no_reply_held_nor_its_member_counted_in_flight():
    with servers(2) as (a, b), gateway(a.url, b.url, balance="least_busy") as g:
        assert request(g.url, "GET", "/x", headers={"X-Test-Policy": "raises"}).status == 500
        assert answered_by(g, 4) == {a.url: 2, b.url: 2}  # nothing in flight on either: turns again
        g.wait_for_log(r"RuntimeError: a bug in the policy")


def test_a_retry_that_finds_no_live_member_is_not_counted():
    with servers(2) as (a, b), gateway(a.url, b.url) as g:
        for s in (a, b):  # each marked down by its 503: after two attempts, nothing is left to retry on
            s.route("/", lambda h, s: h.reply(503, b"overloaded"))
        reply = request(g.url, "GET", "/x", headers={"X-Test-Retry": "3"})
        assert (reply.status, reply.header("X-Seen-Attempts")) == (503, "2")
        assert len(a.seen()) + len(b.seen()) == 2
        g.wait_for_log(r"\"GET /x HTTP/1.1\" 503 .* retries=1")
