"""Hook registration and the objects handed to hooks, without sockets."""
import pytest
import urllib3
from urllib3 import HTTPHeaderDict

from forkproxy import HOOK_NAMES, Proxy, Request, Response, UpstreamRequest
from forkproxy.hooks import HOOKS
from forkproxy.lifecycle import timeouts


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
    assert timeouts(proxy).connect_timeout == 1  # connect never above the whole timeout
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
    proxy._transport = object()  # any internal failure: here, the upstream connections are broken
    seen = {}
    body = b"".join(proxy({"REQUEST_METHOD": "GET", "RAW_URI": "/x"}, lambda s, h: seen.update(status=s, headers=h)))
    assert seen["status"] == "500 Internal Server Error"
    assert json.loads(body)["error"]["type"] == "internal_error"
    assert "internal error" in caplog.text


def test_a_bug_inside_forkproxy_is_a_500_carrying_the_request_id_to_the_client_the_access_log_and_metrics(
        monkeypatch):
    import types
    from forkproxy import lifecycle
    from forkproxy.server.worker import ENV_REQUEST_ID
    answered = []
    monkeypatch.setattr(lifecycle, "metrics", lambda: types.SimpleNamespace(
        enabled=True, answered=lambda *counted: answered.append(counted)))
    proxy = Proxy("http://127.0.0.1:1")
    proxy._transport = object()  # any internal failure once the request is known
    environ, seen = {"REQUEST_METHOD": "GET", "RAW_URI": "/x", "HTTP_X_REQUEST_ID": "req-42"}, {}
    b"".join(proxy(environ, lambda s, h: seen.update(status=s, headers=h)))
    assert seen["status"] == "500 Internal Server Error" and ("X-Request-ID", "req-42") in seen["headers"]
    assert environ[ENV_REQUEST_ID] == "req-42"
    assert answered == [("GET", 500, "-", "internal_error")]


def test_pools_for_many_upstream_origins_all_stay_open():
    from forkproxy.upstream.members import parse_base_url as parse_upstream
    from forkproxy.upstream.attempts import Transport
    transport = Transport(pool_maxsize=4, ca_certs=None)
    pools = [transport.connections(parse_upstream(f"http://127.0.0.1:{10000 + i}")) for i in range(100)]
    assert all(pool.pool is not None for pool in pools)  # none closed behind a request's back
    assert transport.connections(parse_upstream("http://127.0.0.1:10000/other-prefix")) is pools[0]
    assert transport.connections(parse_upstream("https://127.0.0.1:10000")) is not pools[0]


def test_settings_given_as_class_attributes_are_defaults_that_keywords_override():
    class Gateway(Proxy):
        upstream = "http://127.0.0.1:9000"
        timeout = 5
        max_request_body_bytes = 10

    assert (Gateway().timeout, Gateway().max_request_body_bytes, Gateway().upstream) == (5, 10, "http://127.0.0.1:9000")
    assert Gateway(timeout=7).timeout == 7
    assert Gateway("http://127.0.0.1:1").upstream == "http://127.0.0.1:1"
    assert timeouts(Gateway()).read_timeout == 5  # what the exchange really uses
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


def test_the_readmes_hook_table_is_the_one_the_hook_specs_make():
    from tests.test_unit_config import readme_table
    from forkproxy.hooks import hook_table

    assert readme_table("### Hooks") == hook_table(), "paste forkproxy.hooks.hook_table() into the README"


@pytest.mark.parametrize("spec", HOOKS, ids=lambda spec: spec.name)
def test_every_specified_hook_is_a_proxy_method_with_the_specified_signature(spec):
    import inspect
    from forkproxy.hooks import AFTER_HEAD, BEFORE_HEAD

    signature = inspect.signature(getattr(Proxy, spec.name))
    assert tuple(signature.parameters)[1:] == spec.params  # after self
    returns = str(signature.return_annotation).strip("'\"")
    # the README names a hook's main return type (pick_upstream: a URL; a pool is its own section)
    assert returns.split(" | ")[0] == (spec.returns or "None").split(" | ")[0]
    assert spec.phase in (BEFORE_HEAD, AFTER_HEAD) and spec.when and spec.then and spec.if_raises


def test_a_proxy_registers_exactly_the_specified_hooks():
    from forkproxy.hooks import HOOK_NAMES

    proxy = Proxy("http://127.0.0.1:1")
    for name in HOOK_NAMES:
        fn = lambda *args: None  # noqa: E731
        fn.__name__ = name
        assert proxy.hook(fn) is fn and getattr(proxy, name) is fn
    for not_a_hook in ("charge", "wants_messages"):  # methods, not hooks
        fn = lambda *args: None  # noqa: E731
        fn.__name__ = not_a_hook
        with pytest.raises(ValueError):
            proxy.hook(fn)


def test_req_json_parses_a_body_once_for_every_hook_that_asks_and_again_only_for_a_new_body():
    from forkproxy.messages import Request

    req = Request(method="POST", raw_path="/v1/chat", headers=urllib3.HTTPHeaderDict(), body=b'{"stream": true}')
    first = req.json()
    assert first == {"stream": True} and req.json() is first  # before_forward and stream_request share it
    req.body = b"[1]"
    assert req.json() == [1]
    req.body = b"not json"
    assert req.json() is None and req.json() is None
