"""Hooks registered on an instance with @proxy.hook, served by gunicorn."""
import uuid

import pytest

from tests.support.client import request
from tests.support.gunicorn import Gunicorn


@pytest.fixture(scope="module")
def hooked(upstream):
    g = Gunicorn("tests.apps.gateway:hooked", env={"TEST_UPSTREAM": upstream.url}).start()
    yield g
    g.stop()


def test_registered_hooks_run(hooked, upstream):
    path = f"/i/{uuid.uuid4().hex}"
    reply = request(hooked.url, "GET", path)
    assert reply.header("X-After") == "200"
    assert upstream.seen(path)[0].header("X-Hooked") == "instance"


def test_registered_short_circuit(hooked, upstream):
    path = f"/short/{uuid.uuid4().hex}"
    reply = request(hooked.url, "GET", path)
    assert (reply.status, reply.body, reply.header("X-After")) == (202, b"instance short-circuit", "0")
    assert upstream.seen(path) == []
