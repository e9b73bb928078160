"""Request targets and upstream URL joining, without sockets."""
import pytest

from forkproxy.errors import BadRequest
from forkproxy.upstream.members import parse_base_url as parse_upstream
from forkproxy.http.targets import target_path


@pytest.mark.parametrize("target, path", [
    ("/a/b?c=d", "/a/b?c=d"),
    ("//evil.example/x", "//evil.example/x"),
    ("http://evil.example/x?y=1", "/x?y=1"),
    ("HTTPS://evil.example:8443", "/"),
    ("http://evil.example?q", "/?q"),
    ("http://user@evil.example/p", "/p"),
])
def test_accepted_targets_keep_only_a_path(target, path):
    assert target_path(target) == path


@pytest.mark.parametrize("target", ["*", "@evil.example/x", "evil.example:443", "", "ftp://h/x", "javascript:x"])
def test_targets_that_are_not_paths_are_refused(target):
    with pytest.raises(BadRequest):
        target_path(target)


def test_upstream_parts_and_join():
    up = parse_upstream("https://api.example:8443/base/")
    assert (up.scheme, up.host, up.port, up.prefix) == ("https", "api.example", 8443, "/base")
    assert up.join("/v1/x?y") == "/base/v1/x?y"
    assert up.join("//evil/x") == "/base//evil/x"
    assert parse_upstream("http://h").port == 80 and parse_upstream("https://h").port == 443
    assert parse_upstream("http://[::1]:9").origin == "http://[::1]:9"


@pytest.mark.parametrize("url", ["ftp://h", "h:80", "http://", "http://h/x?q=1", "http://u:p@h/", "not a url"])
def test_bad_upstream_urls_are_refused(url):
    with pytest.raises(ValueError):
        parse_upstream(url)
