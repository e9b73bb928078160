"""Upstream connections are pooled per worker and kept alive."""
import time
import uuid

import urllib3

from forkproxy import RetryPolicy
from forkproxy.messages import UpstreamRequest
from forkproxy.upstream.attempts import Transport
from forkproxy.upstream.members import fixed_route
from tests.support.client import request
from tests.support.gunicorn import Gunicorn
from tests.support.servers import RawServer, Scripted, read_request_head


def test_fifty_sequential_requests_share_one_upstream_connection(gateway, upstream):
    prefix = f"/pool/{uuid.uuid4().hex}"
    for i in range(50):
        assert request(gateway.url, "GET", f"{prefix}/{i}").status == 200
    ports = {seen.peer_port for seen in upstream.seen(prefix)}
    assert len(upstream.seen(prefix)) == 50
    assert len(ports) == 1, f"{len(ports)} upstream connections"


def test_a_connection_the_upstream_closed_is_replaced_not_failed(gateway, upstream):
    prefix = f"/pool-close/{uuid.uuid4().hex}"
    upstream.route(prefix, lambda h, s: (setattr(h, "close_connection", True),
                                         h.reply(200, b"bye", headers=[("Connection", "close")])))
    for i in range(5):
        assert request(gateway.url, "POST", f"{prefix}/{i}", body=b"x").status == 200
    assert len({s.peer_port for s in upstream.seen(prefix)}) == 5


def test_a_keep_alive_connection_the_upstream_dropped_while_idle_is_not_used_for_a_post(gateway, upstream):
    import time
    prefix = f"/pool-idle/{uuid.uuid4().hex}"
    # Closes after answering without saying so, as an upstream's idle timeout does.
    upstream.route(prefix, lambda h, s: (h.reply(200, b"ok"), setattr(h, "close_connection", True)))
    for i in range(3):
        assert request(gateway.url, "POST", f"{prefix}/{i}", body=b"once").status == 200
        time.sleep(0.1)
    assert [s.body for s in upstream.seen(prefix)] == [b"once"] * 3


def test_bytes_an_upstream_sent_after_its_response_are_never_read_as_the_next_response(gateway):
    """A pooled connection with unasked-for bytes waiting in it is not reused: they would answer the next request.

    The stray reply is larger than the upstream reader's buffer, so part of it
    is still in the socket when the connection goes back to the pool.
    """
    stray = b"HTTP/1.1 200 OK\r\nContent-Length: 8192\r\n\r\n" + b"s" * 8192

    def answer_then_stray(conn):
        read_request_head(conn)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfirst" + stray)
        if read_request_head(conn):
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nlate")
    server = RawServer(answer_then_stray)
    try:
        for _ in range(3):
            reply = request(gateway.url, "GET", "/x", headers={"X-Test-Upstream": server.url})
            assert (reply.status, reply.body) == (200, b"first")
            time.sleep(0.05)  # all of the stray reply has arrived before the next request
        assert server.accepted == 3
    finally:
        server.close()


def closing_under_the_second_request():
    """An upstream whose first connection answers once, then closes as the next request arrives on it.

    That is the race of an upstream's keep-alive timeout with a request: the
    proxy's liveness check saw an open connection, the upstream closed it
    unanswered. Every later connection answers normally.
    """
    got = []

    def serve(conn):
        first = not got
        got.append(read_request_head(conn))
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfirst" if first else
                     b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfresh")
        while True:
            head = read_request_head(conn)
            if not head:
                return
            got.append(head)
            if first:
                return  # closed unanswered
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfresh")
    server = RawServer(serve)
    server.got = got
    return server


def test_a_get_on_a_pooled_connection_closed_under_it_is_sent_again_on_a_fresh_one(gateway):
    server = closing_under_the_second_request()
    try:
        via = {"X-Test-Upstream": server.url}
        assert request(gateway.url, "GET", "/race/1", headers=via).body == b"first"
        reply = request(gateway.url, "GET", "/race/2", headers=via)
        assert (reply.status, reply.body) == (200, b"fresh")
        assert reply.header("X-Seen-Attempts") == "1"  # the policy's single attempt was not used up
        assert server.accepted == 2
        assert [head.split(b" ")[1] for head in server.got] == [b"/race/1", b"/race/2", b"/race/2"]
    finally:
        server.close()


def test_a_post_whose_body_went_out_on_a_connection_closed_under_it_is_not_sent_again(gateway):
    server = closing_under_the_second_request()
    try:
        via = {"X-Test-Upstream": server.url}
        assert request(gateway.url, "POST", "/race/1", body=b"a", headers=via).body == b"first"
        reply = request(gateway.url, "POST", "/race/2", body=b"charge-once", headers=via)
        assert reply.status == 502 and reply.error_type() == "upstream_unreachable"
        assert [head.split(b" ")[1] for head in server.got] == [b"/race/1", b"/race/2"]
    finally:
        server.close()


def test_idle_pooled_connections_are_dropped_after_pool_idle_timeout(upstream):
    g = Gunicorn("tests.apps.gateway:app", env={"TEST_UPSTREAM": upstream.url, "TEST_POOL_IDLE": "0.3"}).start()
    try:
        prefix = f"/pool-idle-timeout/{uuid.uuid4().hex}"
        for i, pause in enumerate((0, 0.05, 0.05, 0.6, 0.05)):
            time.sleep(pause)
            assert request(g.url, "GET", f"{prefix}/{i}").status == 200
        ports = [seen.peer_port for seen in upstream.seen(prefix)]
        assert ports[0] == ports[1] == ports[2]  # reused while fresh
        assert ports[3] != ports[2] and ports[4] == ports[3]  # a new one after the idle pause
    finally:
        g.stop()


def test_a_failed_attempt_gives_its_slot_back_to_the_connection_pool_with_its_connection_closed():
    """The attempt's own failure passes through urllib3's urlopen, which closes the connection and frees its slot."""
    server = Scripted([200, "close", "close"])  # the second request: closed on the reused connection and on a fresh one
    transport = Transport(pool_maxsize=1, ca_certs=None)
    route = fixed_route(server.url)
    try:
        for expected in ("ok", "upstream_unreachable"):
            attempted = transport.attempts(route, UpstreamRequest("GET", "/x", urllib3.HTTPHeaderDict(), b""),
                                       RetryPolicy(), urllib3.Timeout(connect=2, read=2)).first()
            if attempted.reply is not None:
                assert attempted.reply.read_sized().decode() == expected
                attempted.reply.release()
            else:
                assert attempted.error.type == expected and attempted.member is route.member
        slots = transport.connections(route.member.base).pool
        assert slots.qsize() == 1 and slots.get_nowait() is None  # the slot is back, the connection is not
        assert server.got == 3 and server.accepted == 2
    finally:
        server.close()
