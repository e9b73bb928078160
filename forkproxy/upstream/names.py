"""Upstream hosts given as IP addresses resolve in the greenlet; names still go to gevent's resolver thread.

gevent's default resolver runs every ``getaddrinfo`` on a thread of the hub's
pool, ``127.0.0.1`` included, though the C library answers an address from
the string alone, without a lookup: each new upstream connection paid a
hand-off to a thread and back (lock waits and two wake-ups). A host that is
a name still resolves on the thread, where a slow DNS server cannot stall
the worker.
"""
from __future__ import annotations

import _socket
from typing import Any

from gevent.resolver.thread import Resolver as ThreadResolver


class AddressesInline(ThreadResolver):
    """gevent's thread resolver, but an IP address is turned into its address info where it is asked for."""

    def getaddrinfo(self, host: Any, port: Any, family: int = 0, type: int = 0, proto: int = 0,
                    flags: int = 0) -> list:
        if is_address(host):
            return _socket.getaddrinfo(host, port, family, type, proto, flags | _socket.AI_NUMERICHOST)
        return super().getaddrinfo(host, port, family, type, proto, flags)


def is_address(host: Any) -> bool:
    """Whether ``host`` is an IPv4 or IPv6 address (no zone), so no lookup can block on it."""
    if not isinstance(host, str):
        return False
    for family in (_socket.AF_INET, _socket.AF_INET6):
        try:
            _socket.inet_pton(family, host)
            return True
        except (OSError, ValueError):  # ValueError: a NUL in the string
            pass
    return False


def install(hub: Any) -> None:
    """Use ``AddressesInline`` in this worker's hub, unless another resolver than gevent's default was chosen."""
    if type(hub.resolver) is ThreadResolver:
        hub.resolver = AddressesInline(hub)
