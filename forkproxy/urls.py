"""Request targets and upstream URLs, free of I/O.

The one rule that matters: whatever the client sends, the upstream host comes
from configuration (or ``pick_upstream``), never from the request target.
"""
from __future__ import annotations

import functools
import re
from typing import NamedTuple

from urllib3.util import parse_url

from .errors import BadRequest

_ABSOLUTE_FORM = re.compile(r"^(https?)://[^/?#]*(.*)$", re.IGNORECASE | re.DOTALL)


def target_path(target: str) -> str:
    """The path+query to forward for a request target (RFC 9112 section 3.2).

    Origin form (``/x?y``) is kept as it is, ``//host/x`` included: it is a
    path. Absolute form (``http://host/x?y``) keeps only its path+query.
    Anything else (``*``, ``@host``, ``host:port``) is refused.
    """
    if target.startswith("/"):
        return target
    match = _ABSOLUTE_FORM.match(target)
    if match is None:
        raise BadRequest(f"request target is not a path: {target[:200]!r}")
    rest = match.group(2)
    if not rest.startswith("/"):
        rest = "/" + rest
    return rest


class Upstream(NamedTuple):
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
def parse_upstream(url: str) -> Upstream:
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
    return Upstream(scheme, host, port, (parsed.path or "").rstrip("/"))
