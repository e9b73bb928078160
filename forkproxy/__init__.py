"""forkproxy: a reverse proxy and API gateway as a WSGI application.

Serve it with gunicorn's gevent workers: ``gunicorn -c gunicorn.conf.py forkproxy.app``.

The names below are imported on first use, so that the gunicorn master can
load ``forkproxy.server.accesslog`` without urllib3 or gevent, which a gevent
worker must import only after it has patched the standard library.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_HOMES = {
    "config": ("ConfigError",),
    "errors": ("BadRequest", "BadUpstreamResponse", "HookError", "InternalError", "LimitsUnavailable", "NoLiveUpstream",
               "PayloadTooLarge", "ProxyError", "RateLimited", "UpgradeNotSupported", "UpstreamBodyTooLarge",
               "UpstreamTimeout", "UpstreamUnreachable"),
    "limits.gcra": ("Limit",),
    "messages": ("MessageWriter", "Request", "Response", "StreamStats", "StreamWriter", "TunnelStats", "UpstreamRequest",
                 "UpstreamResponse", "WebSocketMessage"),
    "hooks": ("HOOK_NAMES",),
    "proxy": ("Proxy",),
    "upstream.retry": ("IDEMPOTENT_METHODS", "RetryPolicy"),
    "server.trust": ("TrustedProxies",),
    "server.worker": ("refuse_start",),
    "upstream.members": ("Upstream", "UpstreamPool"),
}
_HOME_OF = {name: module for module, names in _HOMES.items() for name in names}

__all__ = sorted(_HOME_OF)


def __getattr__(name: str) -> Any:
    module = _HOME_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'forkproxy' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:
    from forkproxy.config import ConfigError
    from forkproxy.errors import (BadRequest, BadUpstreamResponse, HookError, InternalError, LimitsUnavailable, NoLiveUpstream,
                                  PayloadTooLarge, ProxyError, RateLimited, UpgradeNotSupported, UpstreamBodyTooLarge,
                                  UpstreamTimeout, UpstreamUnreachable)
    from forkproxy.limits.gcra import Limit
    from forkproxy.messages import (MessageWriter, Request, Response, StreamStats, StreamWriter, TunnelStats, UpstreamRequest,
                                    UpstreamResponse, WebSocketMessage)
    from forkproxy.hooks import HOOK_NAMES
    from forkproxy.proxy import Proxy
    from forkproxy.upstream.retry import IDEMPOTENT_METHODS, RetryPolicy
    from forkproxy.server.trust import TrustedProxies
    from forkproxy.server.worker import refuse_start
    from forkproxy.upstream.members import Upstream, UpstreamPool
