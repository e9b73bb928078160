"""Header rules, without sockets."""
import pytest
from urllib3 import HTTPHeaderDict

from forkproxy import Proxy
from forkproxy.http import headers as header_rules
from forkproxy.http.headers import (client_response_headers, connection_named, fields, first_forbidden, header_dict,
                                    upstream_request_headers, wants_upgrade)


@pytest.mark.parametrize("name", ["Connection", "KEEP-ALIVE", "proxy-connection", "Transfer-Encoding", "upgrade",
                                  "Proxy-Authorization", "proxy-authenticate", "TE", "Trailer"])
def test_hop_by_hop_names_in_any_case(name):
    assert Proxy.is_hop_by_hop(name)


@pytest.mark.parametrize("name", ["Content-Type", "Authorization", "X-Connection", "Trailers", "Host"])
def test_end_to_end_names(name):
    assert not Proxy.is_hop_by_hop(name)


def test_connection_named_headers_across_repeated_connection_headers():
    h = HTTPHeaderDict()
    h.add("Connection", "close, X-A")
    h.add("Connection", " x-b ,,")
    assert connection_named(h) == {"close", "x-a", "x-b"}


def forwarded(headers, **kw):
    args = dict(client_addr="192.0.2.9", proto="http", host="proxy.example", peer_trusted=False)
    args.update(kw)
    return upstream_request_headers(HTTPHeaderDict(headers), **args)


def test_towards_upstream_host_length_expect_are_left_to_the_transport():
    out = forwarded({"Host": "a", "Content-Length": "3", "Expect": "100-continue", "X-Y": "1"})
    assert "host" not in out and "content-length" not in out and "expect" not in out
    assert out["X-Y"] == "1"


def test_forwarded_for_is_appended_to_an_existing_chain():
    out = forwarded({"X-Forwarded-For": "198.51.100.1, 198.51.100.2"})
    assert out.getlist("X-Forwarded-For") == ["198.51.100.1, 198.51.100.2, 192.0.2.9"]


def test_forwarded_proto_and_host_from_an_untrusted_peer_are_replaced():
    out = forwarded({"X-Forwarded-Proto": "https", "X-Forwarded-Host": "evil"})
    assert out.getlist("X-Forwarded-Proto") == ["http"]
    assert out.getlist("X-Forwarded-Host") == ["proxy.example"]


def test_forwarded_proto_and_host_from_a_trusted_peer_are_kept():
    out = forwarded({"X-Forwarded-Proto": "https", "X-Forwarded-Host": "front"}, peer_trusted=True)
    assert (out["X-Forwarded-Proto"], out["X-Forwarded-Host"]) == ("https", "front")


def test_trusted_peer_that_sent_none_gets_our_view():
    out = forwarded({}, peer_trusted=True, proto="https")
    assert (out["X-Forwarded-Proto"], out["X-Forwarded-Host"]) == ("https", "proxy.example")


def test_headers_named_in_connection_are_dropped_towards_the_upstream():
    out = forwarded({"Connection": "X-Secret", "X-Secret": "1", "X-Other": "2"})
    assert "x-secret" not in out and out["X-Other"] == "2"


def test_towards_the_client_x_accel_and_length_are_dropped_and_repeats_kept():
    h = HTTPHeaderDict()
    for k, v in [("Set-Cookie", "a=1"), ("Set-Cookie", "b=2"), ("X-Accel-Redirect", "/x"),
                 ("Content-Length", "9"), ("Transfer-Encoding", "chunked"), ("ETag", "e")]:
        h.add(k, v)
    pairs = client_response_headers(h, keep_content_length=False)
    assert pairs == [("Set-Cookie", "a=1"), ("Set-Cookie", "b=2"), ("ETag", "e")]
    assert ("Content-Length", "9") in client_response_headers(h, keep_content_length=True)


def test_upgrade_needs_both_connection_upgrade_and_an_upgrade_header():
    assert wants_upgrade(HTTPHeaderDict({"Connection": "keep-alive, Upgrade", "Upgrade": "websocket"}))
    assert not wants_upgrade(HTTPHeaderDict({"Upgrade": "websocket"}))
    assert not wants_upgrade(HTTPHeaderDict({"Connection": "upgrade"}))


@pytest.mark.parametrize("pair", [("X", "a\rb"), ("X", "a\nb"), ("X", "a\0b"), ("X\r\nY", "v"), ("X", "caf\u2026")])
def test_cr_lf_nul_are_found_in_names_and_values(pair):
    assert first_forbidden([("Ok", "fine"), pair]) == pair[0]
    assert first_forbidden([("Ok", "fine"), ("Latin", "caf\xe9")]) is None


@pytest.mark.parametrize("name", ["Bad Name", "X:Y", "Trailing ", "", "caf\xe9"])
def test_a_header_name_that_is_not_a_token_is_found(name):
    assert first_forbidden([("Ok", "fine"), (name, "v")]) == name


@pytest.mark.parametrize("value", [5, b"bytes", None, ["a"]])
def test_a_header_value_that_is_not_a_str_is_found_by_its_name(value):
    assert first_forbidden([("Ok", "fine"), ("X-Count", value)]) == "X-Count"


def test_a_header_name_that_is_not_a_str_is_named_by_its_type_only():
    assert first_forbidden([("Ok", "fine"), (b"X-Secret", "v")]) == "<bytes>"


def test_fields_read_any_mapping_as_they_read_a_header_dict():
    pairs = [("Set-Cookie", "a=1"), ("X-One", "1"), ("set-cookie", "b=2")]
    assert list(fields(HTTPHeaderDict(pairs))) == [("set-cookie", ["Set-Cookie", "a=1", "b=2"]),
                                                   ("x-one", ["X-One", "1"])]
    assert list(fields({"X-One": "1"})) == [("x-one", ["X-One", "1"])]


def test_header_dict_is_what_add_builds_for_repeated_and_mixed_case_names():
    pairs = [("Set-Cookie", "a=1"), ("X-One", "1"), ("set-cookie", "b=2"), ("SET-COOKIE", "c=3"), ("x-two", "")]
    added = HTTPHeaderDict()
    for name, value in pairs:
        added.add(name, value)
    built = header_dict(pairs)
    assert list(built.items()) == list(added.items())
    assert built.getlist("set-cookie") == ["a=1", "b=2", "c=3"] and built["X-ONE"] == "1"
    assert list(built) == list(added) == ["Set-Cookie", "X-One", "x-two"]


@pytest.mark.parametrize("name", ["X-Many", "x-many", "X-One", "x-absent", "Host"])
def test_get_and_getlist_answer_as_http_header_dict_does(name):
    headers = header_dict([("X-Many", "1"), ("x-many", "2"), ("X-One", ""), ("Host", "h")])
    assert header_rules.getlist(headers, name) == headers.getlist(name)
    assert header_rules.get(headers, name) == headers.get(name)
    assert header_rules.get(headers, name, "dflt") == headers.get(name, "dflt")


def test_get_falls_back_to_a_plain_mapping():
    assert header_rules.get({"host": "h"}, "host") == "h" and header_rules.get({}, "host", "-") == "-"
