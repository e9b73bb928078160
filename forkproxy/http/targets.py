"""Request targets, free of I/O.

The one rule that matters: whatever the client sends, the upstream host comes
from configuration (or ``pick_upstream``), never from the request target.
"""
from __future__ import annotations

import re

from forkproxy.errors import BadRequest

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
