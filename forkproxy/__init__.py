"""forkproxy: a reverse proxy and API gateway as a WSGI application.

Serve it with gunicorn's gevent workers: ``gunicorn -c gunicorn.conf.py forkproxy.app``.
"""
from .config import ConfigError
from .errors import (
    BadRequest,
    BadUpstreamResponse,
    HookError,
    InternalError,
    PayloadTooLarge,
    ProxyError,
    UpgradeNotSupported,
    UpstreamBodyTooLarge,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from .messages import Request, Response, StreamStats, StreamWriter, UpstreamRequest, UpstreamResponse
from .proxy import HOOK_NAMES, Proxy
from .retry import IDEMPOTENT_METHODS, RetryPolicy
from .trust import TrustedProxies

__version__ = "0.1.0"

__all__ = [
    "Proxy", "RetryPolicy", "HOOK_NAMES", "IDEMPOTENT_METHODS", "TrustedProxies", "ConfigError",
    "Request", "Response", "UpstreamRequest", "UpstreamResponse", "StreamStats", "StreamWriter",
    "ProxyError", "BadRequest", "PayloadTooLarge", "UpstreamUnreachable", "UpstreamBodyTooLarge",
    "BadUpstreamResponse", "UpstreamTimeout", "UpgradeNotSupported", "HookError", "InternalError",
]
