"""Retries as the policy says, counted by urllib3's Retry, with backoff really slept."""
import os
import socket
import threading
import time
import uuid

import pytest

from tests.support.client import request
from tests.support.gunicorn import Gunicorn
from tests.support.servers import RawServer, free_port, over_tls, read_request_head


def unique(prefix="/r"):
    return f"{prefix}/{uuid.uuid4().hex}"


def failing_then_ok(upstream, path, failures, status=503, headers=()):
    count = {"n": 0}

    def route(h, s):
        count["n"] += 1
        if count["n"] <= failures:
            h.reply(status, b"busy %d" % count["n"], headers=list(headers))
        else:
            h.reply(200, b"finally")
    upstream.route(path, route)


def test_retriable_status_is_retried_with_exponential_backoff(gateway, upstream):
    path = unique()
    failing_then_ok(upstream, path, failures=2)
    reply = request(gateway.url, "GET", path, headers={"X-Test-Retry": "3", "X-Test-Backoff": "150"})
    assert (reply.status, reply.body) == (200, b"finally")
    seen = upstream.seen(path)
    assert len(seen) == 3
    gaps = [b.at - a.at for a, b in zip(seen, seen[1:])]
    assert 0.14 <= gaps[0] < 1.5, gaps  # backoff_for(0) = 150 ms
    assert 0.29 <= gaps[1] < 2.0, gaps  # backoff_for(1) = 300 ms
    assert reply.header("X-Seen-Retries") == "2"
    assert reply.header("X-Seen-Attempts") == "3"
    gateway.wait_for_log(rf"GET {path} HTTP/1.1\" 200 .* upstream=200 .* retries=2")


def test_when_attempts_run_out_the_last_upstream_reply_goes_to_the_client(gateway, upstream):
    path = unique()
    failing_then_ok(upstream, path, failures=5, headers=[("X-Upstream-Said", "busy")])
    reply = request(gateway.url, "GET", path, headers={"X-Test-Retry": "3"})
    assert (reply.status, reply.body) == (503, b"busy 3")
    assert reply.header("X-Upstream-Said") == "busy"
    assert len(upstream.seen(path)) == 3
    assert reply.header("X-Seen-Retries") == "2"


def test_non_retriable_status_is_not_retried(gateway, upstream):
    path = unique()
    failing_then_ok(upstream, path, failures=1, status=500)
    reply = request(gateway.url, "GET", path, headers={"X-Test-Retry": "3"})
    assert reply.status == 500
    assert len(upstream.seen(path)) == 1


def test_post_is_retried_when_the_policy_includes_it(gateway, upstream):
    path = unique()
    failing_then_ok(upstream, path, failures=1)
    reply = request(gateway.url, "POST", path, body=b"again", headers={"X-Test-Retry": "2"})
    assert reply.status == 200
    assert [s.body for s in upstream.seen(path)] == [b"again", b"again"]


def test_post_is_not_retried_after_it_may_have_reached_the_upstream_when_the_policy_says_so(gateway, upstream):
    path = unique()
    failing_then_ok(upstream, path, failures=1)
    reply = request(gateway.url, "POST", path, body=b"once", headers={
        "X-Test-Retry": "3", "X-Test-Retry-Methods": "GET,HEAD"})
    assert reply.status == 503
    assert len(upstream.seen(path)) == 1


def test_failed_connect_is_retried_whatever_the_method(gateway):
    port = free_port()
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)

    def open_late():  # refused at first, then an upstream appears on the port
        time.sleep(0.25)
        listener.bind(("127.0.0.1", port))
        listener.listen(8)
        conn, _ = listener.accept()
        conn.recv(65536)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\nConnection: close\r\n\r\nlate")
        conn.close()
    threading.Thread(target=open_late, daemon=True).start()
    try:
        reply = request(gateway.url, "POST", "/x", body=b"b", headers={
            "X-Test-Upstream": f"http://127.0.0.1:{port}", "X-Test-Retry": "6", "X-Test-Backoff": "100",
            "X-Test-Retry-Methods": "GET"})
        assert (reply.status, reply.body) == (200, b"late")
        assert int(reply.header("X-Seen-Retries")) >= 1
    finally:
        listener.close()


def test_retry_after_is_honoured_up_to_max_backoff(gateway, upstream):
    path = unique()
    failing_then_ok(upstream, path, failures=1, headers=[("Retry-After", "1")])
    reply = request(gateway.url, "GET", path, headers={"X-Test-Retry": "2", "X-Test-Backoff": "10"})
    assert reply.status == 200
    first, second = upstream.seen(path)
    assert 0.95 <= second.at - first.at < 3

    path = unique()
    failing_then_ok(upstream, path, failures=1, headers=[("Retry-After", "30")])
    reply = request(gateway.url, "GET", path, headers={
        "X-Test-Retry": "2", "X-Test-Backoff": "10", "X-Test-Max-Backoff": "400"})
    assert reply.status == 200
    first, second = upstream.seen(path)
    assert 0.35 <= second.at - first.at < 2.5


def test_unreachable_after_retries_reports_the_retries(gateway):
    reply = request(gateway.url, "GET", "/x", headers={
        "X-Test-Upstream": f"http://127.0.0.1:{free_port()}", "X-Test-Retry": "3"})
    assert reply.status == 502 and reply.error_type() == "upstream_unreachable"
    assert reply.header("X-Seen-Retries") == "2"


def closing_unanswered_then_ok(upstream, path):
    """The first request is read and its connection closed unanswered: it may have been processed."""
    count = {"n": 0}

    def route(h, s):
        count["n"] += 1
        if count["n"] == 1:
            h.close_connection = True
            return
        h.reply(200, b"second")
    upstream.route(path, route)


def test_a_post_that_may_have_been_processed_is_not_retried_by_a_default_policy(gateway, upstream):
    path = unique()
    closing_unanswered_then_ok(upstream, path)
    reply = request(gateway.url, "POST", path, body=b"charge-once", headers={"X-Test-Retry": "3"})
    assert reply.status == 502 and reply.error_type() == "upstream_unreachable"
    assert len(upstream.seen(path)) == 1


def test_a_get_that_may_have_been_processed_is_retried_by_a_default_policy(gateway, upstream):
    path = unique()
    closing_unanswered_then_ok(upstream, path)
    reply = request(gateway.url, "GET", path, headers={"X-Test-Retry": "3"})
    assert (reply.status, reply.body) == (200, b"second")
    assert len(upstream.seen(path)) == 2


def test_a_post_the_policy_names_is_retried_after_it_may_have_been_processed(gateway, upstream):
    path = unique()
    closing_unanswered_then_ok(upstream, path)
    reply = request(gateway.url, "POST", path, body=b"idempotent-by-key", headers={
        "X-Test-Retry": "3", "X-Test-Retry-Methods": "POST"})
    assert (reply.status, reply.body) == (200, b"second")
    assert len(upstream.seen(path)) == 2


def test_a_post_whose_tls_connection_breaks_after_it_went_out_is_not_sent_again_by_a_default_policy():
    """A TLS error once the request went out is a failure after sending (it may have been processed)."""
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    got = []

    def break_tls(tls):  # reads the request, then answers with bytes outside TLS: the proxy's TLS read fails
        got.append(read_request_head(tls))
        os.write(tls.fileno(), b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        tls.settimeout(5)
        tls.recv(1)  # until the proxy has closed the connection
    server = RawServer(over_tls(break_tls, ca.issue_cert("127.0.0.1")))
    with ca.cert_pem.tempfile() as bundle:
        g = Gunicorn("tests.apps.pools:app", env={"TEST_MEMBERS": f"https://127.0.0.1:{server.port}",
                                                  "TEST_CA": bundle}).start()
        try:
            reply = request(g.url, "POST", "/charge", body=b"once", headers={"X-Test-Retry": "3"})
            assert reply.status == 502 and reply.error_type() == "upstream_unreachable"
            assert len(got) == 1
            reply = request(g.url, "GET", "/read", headers={"X-Test-Retry": "3"})
            assert reply.status == 502 and len(got) == 4  # an idempotent method is retried
        finally:
            g.stop()
            server.close()


def test_a_reply_retried_while_its_body_trickles_in_is_cut_after_a_second_and_the_retry_goes_out(gateway):
    stop, served = threading.Event(), []

    def serve(conn):
        served.append(conn)
        read_request_head(conn)
        if len(served) > 1:
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\nfinally")
            return
        conn.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 60000\r\n\r\n")
        while not stop.wait(0.3):  # a byte well within the read timeout (3 s), never the whole body
            conn.sendall(b".")
    server = RawServer(serve)
    try:
        started = time.monotonic()
        reply = request(gateway.url, "GET", "/x", headers={"X-Test-Upstream": server.url, "X-Test-Retry": "2"})
        assert (reply.status, reply.body, reply.header("X-Seen-Attempts")) == (200, b"finally", "2")
        assert time.monotonic() - started < 2.5  # the drain's second, not the trickle's length
    finally:
        stop.set()
        server.close()
