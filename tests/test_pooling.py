"""Upstream connections are pooled per worker and kept alive."""
import uuid

from tests.support.client import request


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
