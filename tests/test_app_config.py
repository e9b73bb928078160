"""forkproxy.app from FORKPROXY_* variables, and its one-line start errors."""
import uuid

import pytest

from forkproxy.envproxy import from_env
from forkproxy.config import ConfigError
from tests.support.client import request
from tests.support.gunicorn import Gunicorn


def test_settings_come_from_the_environment(tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    proxy = from_env({
        "FORKPROXY_UPSTREAM": "https://api.example:8443/v1", "FORKPROXY_TIMEOUT": "12.5",
        "FORKPROXY_CONNECT_TIMEOUT": "2", "FORKPROXY_MAX_REQUEST_BODY_BYTES": "0",
        "FORKPROXY_MAX_RESPONSE_BODY_BYTES": "4096", "FORKPROXY_RETRY_ATTEMPTS": "4",
        "FORKPROXY_RETRY_BACKOFF_MS": "250", "FORKPROXY_CA_CERTS": str(ca),
    })
    assert proxy.upstream == "https://api.example:8443/v1"
    assert (proxy.timeout, proxy.connect_timeout) == (12.5, 2.0)
    assert (proxy.max_request_body_bytes, proxy.max_response_body_bytes) == (0, 4096)
    assert proxy.ca_certs == str(ca)
    get, post = (proxy.retry_policy(type("R", (), {"method": m})()) for m in ("GET", "POST"))
    assert (get.max_attempts, get.base_backoff_ms) == (4, 250)
    assert get.method_retriable("GET") and get.method_retriable("DELETE")
    assert not post.method_retriable("POST") and not post.method_retriable("PATCH")


def test_defaults_follow_the_contract():
    proxy = from_env({"FORKPROXY_UPSTREAM": "http://127.0.0.1:9"})
    assert (proxy.timeout, proxy.connect_timeout) == (30, 10)
    assert (proxy.max_request_body_bytes, proxy.max_response_body_bytes) == (1048576, 8388608)
    assert (proxy.stream_idle_timeout, proxy.max_event_bytes, proxy.sse_heartbeat_secs) == (60, 1048576, 0)
    assert proxy.ca_certs is None
    policy = proxy.retry_policy(type("R", (), {"method": "GET"})())
    assert (policy.max_attempts, policy.base_backoff_ms) == (1, 100)


@pytest.mark.parametrize("env, words", [
    ({}, ["FORKPROXY_UPSTREAM", "not set"]),
    ({"FORKPROXY_UPSTREAM": "ftp://x"}, ["FORKPROXY_UPSTREAM", "ftp://x"]),
    ({"FORKPROXY_UPSTREAM": "http://x", "FORKPROXY_TIMEOUT": "soon"}, ["FORKPROXY_TIMEOUT", "'soon'"]),
    ({"FORKPROXY_UPSTREAM": "http://x", "FORKPROXY_CONNECT_TIMEOUT": "-1"}, ["FORKPROXY_CONNECT_TIMEOUT", "'-1'"]),
    ({"FORKPROXY_UPSTREAM": "http://x", "FORKPROXY_MAX_REQUEST_BODY_BYTES": "1.5"},
     ["FORKPROXY_MAX_REQUEST_BODY_BYTES", "'1.5'"]),
    ({"FORKPROXY_UPSTREAM": "http://x", "FORKPROXY_RETRY_ATTEMPTS": "x"}, ["FORKPROXY_RETRY_ATTEMPTS", "'x'"]),
    ({"FORKPROXY_UPSTREAM": "http://x", "FORKPROXY_CA_CERTS": "/nope.pem"}, ["FORKPROXY_CA_CERTS", "/nope.pem"]),
    # a value that would make every request fail, or that the socket layer cannot take
    ({"FORKPROXY_UPSTREAM": "http://x", "FORKPROXY_TIMEOUT": "0"}, ["FORKPROXY_TIMEOUT", "above 0", "'0'"]),
    ({"FORKPROXY_UPSTREAM": "http://x", "FORKPROXY_CONNECT_TIMEOUT": "0"}, ["FORKPROXY_CONNECT_TIMEOUT", "'0'"]),
    ({"FORKPROXY_UPSTREAM": "http://x", "FORKPROXY_TIMEOUT": "inf"}, ["FORKPROXY_TIMEOUT", "finite"]),
    ({"FORKPROXY_UPSTREAM": "http://x", "FORKPROXY_TIMEOUT": "nan"}, ["FORKPROXY_TIMEOUT", "finite"]),
    ({"FORKPROXY_UPSTREAM": "http://x", "FORKPROXY_MAX_EVENT_BYTES": "0"}, ["FORKPROXY_MAX_EVENT_BYTES", "at least 1"]),
    ({"FORKPROXY_UPSTREAM": "http://x", "FORKPROXY_POOL_IDLE_TIMEOUT": "0"}, ["FORKPROXY_POOL_IDLE_TIMEOUT"]),
    ({"FORKPROXY_UPSTREAM": "http://x", "FORKPROXY_TUNNEL_IDLE_TIMEOUT": "soon"},
     ["FORKPROXY_TUNNEL_IDLE_TIMEOUT", "not a number", "'soon'"]),
    ({"FORKPROXY_UPSTREAM": "http://x", "FORKPROXY_TUNNEL_IDLE_TIMEOUT": "0"}, ["FORKPROXY_TUNNEL_IDLE_TIMEOUT"]),
    ({"FORKPROXY_UPSTREAM": "http://x", "FORKPROXY_LIMITS_STORE": "memcached://cache:11211"},
     ["FORKPROXY_LIMITS_STORE", "redis://", "'memcached://cache:11211'"]),
    ({"FORKPROXY_UPSTREAM": "http://x", "FORKPROXY_RETRY_ATTEMPTS": "0"}, ["FORKPROXY_RETRY_ATTEMPTS", "at least 1"]),
    ({"FORKPROXY_UPSTREAM": "http://x", "FORKPROXY_RETRY_BACKOFF_MS": "-5"}, ["FORKPROXY_RETRY_BACKOFF_MS", "'-5'"]),
])
def test_a_bad_value_is_one_line_naming_the_variable_and_value(env, words):
    with pytest.raises(ConfigError) as info:
        from_env(env)
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message


def test_gunicorn_stops_at_start_with_the_one_line_error():
    env = {"FORKPROXY_UPSTREAM": "", "FORKPROXY_TIMEOUT": "abc"}
    g = Gunicorn("forkproxy.app", env=env).start(wait=False)
    try:
        assert g.wait_exit(30) != 0
        assert "forkproxy: FORKPROXY_UPSTREAM is not set" in g.log()
        assert "Traceback" not in g.log()
    finally:
        g.stop()


def test_ready_made_app_forwards_and_retries_idempotent_methods_only(upstream):
    path = f"/app/{uuid.uuid4().hex}"
    hits = {"n": 0}

    def flaky(h, s):
        hits["n"] += 1
        h.reply(503 if hits["n"] % 2 else 200, b"r%d" % hits["n"])
    upstream.route(path, flaky)
    g = Gunicorn("forkproxy.app", env={"FORKPROXY_UPSTREAM": upstream.url, "FORKPROXY_RETRY_ATTEMPTS": "2",
                                       "FORKPROXY_RETRY_BACKOFF_MS": "10"}).start()
    try:
        assert request(g.url, "GET", path).body == b"r2"  # 503 then 200
        assert request(g.url, "POST", path, body=b"x").status == 503  # not retried
        assert hits["n"] == 3
        g.wait_for_log(rf"\"GET {path} HTTP/1.1\" 200 .*upstream=200 upstream_time=[0-9.]+ retries=1")
    finally:
        g.stop()
