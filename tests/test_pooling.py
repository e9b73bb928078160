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
