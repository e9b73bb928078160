"""The API-gateway example end to end: auth gate, prefix routing, audit log."""
import json
import time
import uuid

import pytest

from tests.support.client import request
from tests.support.gunicorn import Gunicorn
from tests.support.servers import free_port


@pytest.fixture(scope="module")
def api(upstream, tmp_path_factory):
    audit = tmp_path_factory.mktemp("api") / "audit.jsonl"
    routes = (f"/users=http://127.0.0.1:{upstream.port}/svc-users,"
              f"/orders=http://127.0.0.1:{upstream.port}/svc-orders/v2,"
              f"/down=http://127.0.0.1:{free_port()}")
    g = Gunicorn("examples.api_gateway:app", env={"API_ROUTES": routes, "API_TOKENS": "tok-a,tok-b",
                                                  "API_AUDIT_LOG": str(audit)}).start()
    g.audit = audit
    yield g
    g.stop()


def audit_for(g, path):
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if g.audit.exists():
            found = [r for r in map(json.loads, g.audit.read_text().splitlines()) if r["path"] == path]
            if found:
                return found
        time.sleep(0.02)
    raise AssertionError(f"no audit line for {path}")


def test_no_token_is_401_and_audited(api, upstream):
    path = f"/users/{uuid.uuid4().hex}"
    reply = request(api.url, "GET", path)
    assert reply.status == 401 and reply.error_type() == "unauthorized"
    assert upstream.seen(f"/svc-users{path[6:]}") == []
    (line,) = audit_for(api, path)
    assert (line["status"], line["upstream_status"], line["caller"]) == (401, 0, None)


def test_prefix_routing_strips_the_prefix_and_keeps_the_service_base(api, upstream):
    marker = uuid.uuid4().hex
    assert request(api.url, "GET", f"/users/{marker}?q=1", headers={"Authorization": "Bearer tok-a"}).status == 200
    (seen,) = upstream.seen(f"/svc-users/{marker}")
    assert seen.path == f"/svc-users/{marker}?q=1"
    assert seen.header("Authorization") is None and seen.header("X-Gateway-Caller") == "tok-a..."
    assert request(api.url, "POST", f"/orders/{marker}", body=b"{}",
                   headers={"Authorization": "Bearer tok-b"}).status == 200
    assert upstream.seen(f"/svc-orders/v2/{marker}")[0].method == "POST"
    (line,) = audit_for(api, f"/users/{marker}?q=1")
    assert (line["status"], line["upstream_status"], line["service"]) == (200, 200, "/users")


def test_unknown_prefix_is_404_and_a_down_service_is_audited_as_an_error(api):
    assert request(api.url, "GET", "/nope/x", headers={"Authorization": "Bearer tok-a"}).status == 404
    path = f"/down/{uuid.uuid4().hex}"
    reply = request(api.url, "GET", path, headers={"Authorization": "Bearer tok-a"})
    assert reply.status == 502
    (line,) = audit_for(api, path)
    assert line["error"] == "upstream_unreachable"
