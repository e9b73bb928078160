"""Upstream members and their URLs (no I/O)."""
from __future__ import annotations

import functools
from typing import NamedTuple

from urllib3.util import parse_url


class BaseURL(NamedTuple):
    """An upstream base URL split into what a connection pool needs."""

    scheme: str
    host: str
    port: int
    prefix: str

    @property
    def origin(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    def join(self, path: str) -> str:
        """The request target on the upstream: prefix + path."""
        return self.prefix + path


@functools.lru_cache(maxsize=256)
def parse_base_url(url: str) -> BaseURL:
    """Parse and check a base URL; the cache keeps this off the hot path."""
    try:
        parsed = parse_url(url)
    except Exception as exc:  # urllib3 raises LocationParseError and friends
        raise ValueError(f"not a valid upstream URL: {url!r} ({exc})") from None
    scheme = (parsed.scheme or "").lower()
    if scheme not in ("http", "https") or not parsed.host:
        raise ValueError(f"upstream URL must be http:// or https:// with a host: {url!r}")
    if parsed.query or parsed.fragment or parsed.auth:
        raise ValueError(f"upstream URL takes no query, fragment or credentials: {url!r}")
    port = parsed.port or (443 if scheme == "https" else 80)
    host = parsed.host.strip("[]")
    return BaseURL(scheme, host, port, (parsed.path or "").rstrip("/"))
