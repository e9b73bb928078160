"""The proxy the FORKPROXY_* variables describe (served by ``forkproxy.app``)."""
from __future__ import annotations

import functools
import os
from typing import Mapping

from forkproxy.config import APP, PROXY, defaults, env_settings
from forkproxy.messages import Request
from forkproxy.proxy import Proxy
from forkproxy.upstream.retry import IDEMPOTENT_METHODS, RetryPolicy

_RETRY = defaults(APP)


class EnvProxy(Proxy):
    """A ``Proxy`` that retries as FORKPROXY_RETRY_* say.

    Failures after the request may have reached the upstream are retried for
    idempotent methods only; a failed connect is retried for every method.
    """

    retry_attempts: int = _RETRY["retry_attempts"]
    retry_backoff_ms: int = _RETRY["retry_backoff_ms"]

    def retry_policy(self, req: Request) -> RetryPolicy:
        return _idempotent_policy(self.retry_attempts, self.retry_backoff_ms)


@functools.lru_cache(maxsize=16)
def _idempotent_policy(attempts: int, backoff_ms: int) -> RetryPolicy:
    """One policy per setting, not per request: the retry loop only reads it."""
    return RetryPolicy(max_attempts=attempts, base_backoff_ms=backoff_ms, retry_methods=IDEMPOTENT_METHODS)


def from_env(env: Mapping[str, str] = os.environ) -> EnvProxy:
    """Build the proxy; raises ConfigError with a one-line message."""
    proxy = EnvProxy(**env_settings(env, PROXY))
    for name, value in env_settings(env, APP).items():
        setattr(proxy, name, value)
    return proxy
