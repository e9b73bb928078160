"""Forwarding headers (X-Forwarded-Proto/Host, Forwarded, X-Real-IP): kept from trusted peers only, trust taken from gunicorn."""
import uuid

import pytest

from tests.support.client import request
from tests.support.gunicorn import Gunicorn


@pytest.fixture(scope="module")
def untrusting(upstream):
    # The test client (127.0.0.1) is not in gunicorn's forwarded_allow_ips here.
    g = Gunicorn("tests.apps.gateway:app", env={"TEST_UPSTREAM": upstream.url},
                 args=("--forwarded-allow-ips", "192.0.2.1")).start()
    yield g
    g.stop()


def test_untrusted_peer_cannot_set_forwarded_proto_or_host(untrusting, upstream):
    path = f"/t/{uuid.uuid4().hex}"
    request(untrusting.url, "GET", path, headers={
        "Host": "real.example", "X-Forwarded-Proto": "https", "X-Forwarded-Host": "spoofed.example",
        "X-Forwarded-For": "198.51.100.1"})
    (seen,) = upstream.seen(path)
    assert seen.all("X-Forwarded-Proto") == ["http"]
    assert seen.all("X-Forwarded-Host") == ["real.example"]
    assert seen.header("X-Forwarded-For") == "198.51.100.1, 127.0.0.1"


def test_trust_follows_gunicorn_cmd_args(upstream):
    g = Gunicorn("tests.apps.gateway:app", env={"TEST_UPSTREAM": upstream.url,
                                                "GUNICORN_CMD_ARGS": "--forwarded-allow-ips=192.0.2.0/24"}).start()
    try:
        path = f"/t/{uuid.uuid4().hex}"
        request(g.url, "GET", path, headers={"X-Forwarded-Proto": "https"})
        (seen,) = upstream.seen(path)
        assert seen.header("X-Forwarded-Proto") == "http"
    finally:
        g.stop()


def test_untrusted_peer_cannot_set_forwarded_or_x_real_ip(untrusting, upstream):
    path = f"/t/{uuid.uuid4().hex}"
    request(untrusting.url, "GET", path, headers={
        "Forwarded": "for=198.51.100.1;proto=https;host=spoofed.example", "X-Real-IP": "198.51.100.1"})
    (seen,) = upstream.seen(path)
    assert seen.all("Forwarded") == []
    assert seen.all("X-Real-IP") == ["127.0.0.1"]


def test_trusted_peer_keeps_its_forwarded_and_x_real_ip(gateway, upstream):
    path = f"/t/{uuid.uuid4().hex}"
    request(gateway.url, "GET", path, headers={"Forwarded": "for=198.51.100.1;proto=https",
                                              "X-Real-IP": "198.51.100.1"})
    (seen,) = upstream.seen(path)
    assert seen.all("Forwarded") == ["for=198.51.100.1;proto=https"]
    assert seen.all("X-Real-IP") == ["198.51.100.1"]
