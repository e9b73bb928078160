"""Upstream connections are pooled per worker and kept alive."""
import time
import uuid

from tests.support.client import request
from tests.support.servers import RawServer, read_request_head


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
