"""Hook registration and the objects handed to hooks, without sockets."""
import pytest
from urllib3 import HTTPHeaderDict

from forkproxy import HOOK_NAMES, Proxy, Request, Response, UpstreamRequest


def test_hook_registration_by_function_name_replaces_per_instance():
    a, b = Proxy("http://127.0.0.1:1"), Proxy("http://127.0.0.1:1")

    @a.hook
    def rewrite_path(path):
        return "/one" + path

    @a.hook
    def rewrite_path(path):  # noqa: F811 - registering again replaces
        return "/two" + path

    assert a.rewrite_path("/x") == "/two/x"
    assert b.rewrite_path("/x") == "/x"


def test_unknown_hook_name_raises_naming_the_valid_ones():
    proxy = Proxy("http://127.0.0.1:1")
    with pytest.raises(ValueError) as info:
        @proxy.hook
        def before_forwardd(req, res, ureq):
            return False
    for name in HOOK_NAMES:
        assert name in str(info.value)


def test_settings_are_checked_and_are_plain_attributes():
    proxy = Proxy("http://127.0.0.1:1", timeout=5, max_request_body_bytes=10)
    assert (proxy.timeout, proxy.max_request_body_bytes, proxy.connect_timeout) == (5, 10, 10)
    proxy.timeout = 1
    assert proxy._timeout().connect_timeout == 1  # connect never above the whole timeout
    with pytest.raises(ValueError):
        Proxy("ftp://x")
    with pytest.raises(ValueError):
        Proxy("http://x", timeout=-1)
    with pytest.raises(TypeError):
        Proxy("http://x", timeoutt=1)


def test_request_fields():
    req = Request(method="POST", raw_path="/a%20b/c?x=1&y=2", headers=HTTPHeaderDict({"A": "1"}),
                  body=b'{"model": "m"}')
    assert (req.path, req.query_string) == ("/a b/c", "x=1&y=2")
    assert req.json() == {"model": "m"}
    assert req.headers["a"] == "1"
    req.body = b"not json"
    assert req.json() is None


def test_str_bodies_are_encoded_as_utf8():
    res, ureq = Response(), UpstreamRequest("GET", "/", HTTPHeaderDict())
    res.body = "héllo"
    ureq.body = "wörld"
    assert (res.body, ureq.body) == ("héllo".encode(), "wörld".encode())


def test_a_bug_inside_forkproxy_is_still_a_json_500(caplog):
    import json
    proxy = Proxy("http://127.0.0.1:1")
    proxy._exchange = None  # any internal failure
    seen = {}
    body = b"".join(proxy({"REQUEST_METHOD": "GET", "RAW_URI": "/x"}, lambda s, h: seen.update(status=s, headers=h)))
    assert seen["status"] == "500 Internal Server Error"
    assert json.loads(body)["error"]["type"] == "internal_error"
    assert "internal error" in caplog.text


def test_pools_for_many_upstream_origins_all_stay_open():
    from forkproxy.upstream.members import parse_base_url as parse_upstream
    from forkproxy.upstream.attempts import Transport
    transport = Transport(pool_maxsize=4, ca_certs=None)
    pools = [transport.pool(parse_upstream(f"http://127.0.0.1:{10000 + i}")) for i in range(100)]
    assert all(pool.pool is not None for pool in pools)  # none closed behind a request's back
    assert transport.pool(parse_upstream("http://127.0.0.1:10000/other-prefix")) is pools[0]
    assert transport.pool(parse_upstream("https://127.0.0.1:10000")) is not pools[0]


def test_settings_given_as_class_attributes_are_defaults_that_keywords_override():
    class Gateway(Proxy):
        upstream = "http://127.0.0.1:9000"
        timeout = 5
        max_request_body_bytes = 10

    assert (Gateway().timeout, Gateway().max_request_body_bytes, Gateway().upstream) == (5, 10, "http://127.0.0.1:9000")
    assert Gateway(timeout=7).timeout == 7
    assert Gateway("http://127.0.0.1:1").upstream == "http://127.0.0.1:1"
    assert Gateway()._timeout().read_timeout == 5  # what the exchange really uses
    assert Proxy("http://127.0.0.1:1").timeout == 30


def test_settings_given_as_class_attributes_are_checked_too():
    class Gateway(Proxy):
        timeout = 0

    with pytest.raises(ValueError) as info:
        Gateway("http://127.0.0.1:1")
    assert "timeout" in str(info.value)


@pytest.mark.parametrize("name, value", [
    ("timeout", 0), ("timeout", float("inf")), ("connect_timeout", 0), ("max_event_bytes", 0),
    ("pool_maxsize", 0), ("pool_idle_timeout", 0), ("stream_idle_timeout", -1), ("sse_heartbeat_secs", -0.5),
    ("max_request_body_bytes", 1.5), ("max_response_body_bytes", True), ("tunnel_idle_timeout", 0),
    ("max_ws_message_bytes", 0),
])
def test_every_numeric_setting_has_its_range_checked_at_construction(name, value):
    with pytest.raises(ValueError) as info:
        Proxy("http://127.0.0.1:1", **{name: value})
    assert name in str(info.value)


@pytest.mark.parametrize("name, value", [
    ("stream_idle_timeout", 0), ("sse_heartbeat_secs", 0), ("max_request_body_bytes", 0),
    ("max_response_body_bytes", 0), ("max_event_bytes", 1), ("pool_idle_timeout", 0.5),
])
def test_zero_turns_off_what_it_is_documented_to(name, value):
    assert getattr(Proxy("http://127.0.0.1:1", **{name: value}), name) == value


def test_allowed_upgrades_are_protocol_names_kept_lower_case():
    assert Proxy("http://127.0.0.1:1", allowed_upgrades=("WebSocket", "my-proto")).allowed_upgrades == (
        "websocket", "my-proto")
    assert Proxy("http://127.0.0.1:1", allowed_upgrades=()).allowed_upgrades == ()
    for bad in (("web socket",), 5):
        with pytest.raises(ValueError) as info:
            Proxy("http://127.0.0.1:1", allowed_upgrades=bad)
        assert "allowed_upgrades" in str(info.value)
