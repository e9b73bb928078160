"""Errors the proxy itself answers with.

Each class carries the HTTP status and the contract's ``type`` string, so the
forwarding code raises one and a single place turns it into the JSON reply.
"""
from __future__ import annotations

import json
from typing import Sequence


class ProxyError(Exception):
    """An error answered by forkproxy, not by the upstream."""

    status: int = 500
    type: str = "proxy_error"
    headers: "Sequence[tuple[str, str]]" = ()  # sent with the reply (a 429's Retry-After)
    detail: str = ""  # for the log line only, never the client's (see HookError)

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def body(self) -> bytes:
        return json.dumps({"error": {"message": self.message, "type": self.type}}).encode()


class BadRequest(ProxyError):
    status, type = 400, "bad_request"


class PayloadTooLarge(ProxyError):
    status, type = 413, "payload_too_large"

    def __init__(self, cap: int) -> None:
        super().__init__(f"request body exceeds proxy cap of {cap} bytes")


class UpstreamUnreachable(ProxyError):
    status, type = 502, "upstream_unreachable"


class UpstreamBodyTooLarge(ProxyError):
    status, type = 502, "upstream_body_too_large"

    def __init__(self, cap: int) -> None:
        super().__init__(f"upstream response body exceeds proxy cap of {cap} bytes")


class BadUpstreamResponse(ProxyError):
    status, type = 502, "bad_upstream_response"


class UpstreamTimeout(ProxyError):
    status, type = 504, "upstream_timeout"


class UpgradeNotSupported(ProxyError):
    status, type = 501, "upgrade_not_supported"


class HookError(ProxyError):
    """A hook raised, or gave forkproxy what it cannot use; the client's message names no value the hook had.

    What it raised is the ``__cause__``, and ``detail`` what forkproxy
    refused: both for the log line only, as either may hold an address, an
    OS error or a secret.
    """

    status, type = 500, "hook_error"

    def __init__(self, message: str, detail: str = "") -> None:
        super().__init__(message)
        self.detail = detail


class InternalError(ProxyError):
    """A bug in forkproxy itself: still answered as JSON, with the traceback logged."""

    status, type = 500, "internal_error"


class NoLiveUpstream(ProxyError):
    status, type = 502, "no_live_upstream"


class RateLimited(ProxyError):
    status, type = 429, "rate_limited"

    def __init__(self, message: str, headers: list[tuple[str, str]], limit: str = "") -> None:
        super().__init__(message)
        self.headers = headers
        self.limit = limit  # the name of the limit that refused it (a key's prefix, never the key)


class LimitsUnavailable(ProxyError):
    status, type = 503, "limits_unavailable"
