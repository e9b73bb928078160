"""Upstream addresses resolve without gevent's resolver thread; names still use it."""
import socket

import gevent.hub
import pytest

from forkproxy.upstream import names


@pytest.mark.parametrize("host", ["127.0.0.1", "10.0.0.7", "::1", "2001:db8::1"])
def test_an_ip_address_is_an_address(host):
    assert names.is_address(host)


@pytest.mark.parametrize("host", ["localhost", "api.openai.com", "fe80::1%eth0", "1.2.3", "", "1.2.3.4\x00x", b"127.0.0.1", None])
def test_a_name_or_anything_else_is_not(host):
    assert not names.is_address(host)


class RecordingPool:
    """Stands in for the hub's thread pool: records what would have gone to a thread, and runs it."""

    def __init__(self):
        self.calls = []

    def apply(self, fn, args, kwargs=None):
        self.calls.append(args)
        return fn(*args, **(kwargs or {}))


def test_an_address_resolves_in_the_caller_and_a_name_on_the_thread():
    resolver = names.AddressesInline(gevent.hub.get_hub())
    resolver.pool = RecordingPool()
    got = resolver.getaddrinfo("127.0.0.1", 8080, 0, socket.SOCK_STREAM)
    assert [info[4] for info in got] == [("127.0.0.1", 8080)] and resolver.pool.calls == []
    assert resolver.getaddrinfo("localhost", 8080, 0, socket.SOCK_STREAM)
    assert resolver.pool.calls == [("localhost", 8080, 0, socket.SOCK_STREAM, 0, 0)]


def test_another_resolver_chosen_by_the_operator_is_kept():
    class Chosen:
        pass

    hub = type("Hub", (), {"resolver": Chosen()})()
    names.install(hub)
    assert isinstance(hub.resolver, Chosen)
