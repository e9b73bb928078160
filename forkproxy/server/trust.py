"""Which peers may vouch for X-Forwarded-Proto and X-Forwarded-Host."""
from __future__ import annotations

import functools
import ipaddress
from typing import Iterable

_Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class TrustedProxies:
    """A set of IPs and CIDR networks, or everything (``*``).

    A peer that is not an IP address (a unix-socket client) is trusted, as in
    gunicorn: only a local process can reach a unix socket.
    """

    def __init__(self, entries: Iterable[str] | str = ()) -> None:
        if isinstance(entries, str):
            entries = entries.split(",")
        self.entries = tuple(e.strip() for e in entries if e and e.strip())
        self.trust_all = "*" in self.entries
        self._networks: tuple[_Network, ...] = tuple(
            ipaddress.ip_network(e, strict=False) for e in self.entries if e != "*"
        )
        # Peers are few (the nginx in front): each is judged once.
        self._verdict = functools.lru_cache(maxsize=4096)(self._judge)

    def __contains__(self, addr: str) -> bool:
        return self._verdict(addr)

    def _judge(self, addr: str) -> bool:
        if self.trust_all:
            return True
        try:
            ip = ipaddress.ip_address(addr)
        except ValueError:
            return True
        return any(ip in net for net in self._networks)

    def __repr__(self) -> str:
        return f"TrustedProxies({list(self.entries)!r})"
