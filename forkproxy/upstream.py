"""Talking to the upstream: per-process urllib3 pools and error mapping.

Pools are made lazily in the process that uses them and forgotten in a forked
child, so a gunicorn master never owns sockets its workers would share.
"""
from __future__ import annotations

import os
from http.client import HTTPException, IncompleteRead
from typing import Any

import urllib3
from urllib3.exceptions import (
    ConnectTimeoutError,
    MaxRetryError,
    NewConnectionError,
    ProtocolError,
    ReadTimeoutError,
    SSLError,
)

from .errors import BadUpstreamResponse, ProxyError, UpstreamTimeout, UpstreamUnreachable
from . import headers as header_rules
from .messages import UpstreamRequest
from .urls import Upstream
from .pools import POOL_CLASSES, ProxyPool, ProxyTLSPool
from .reply import UpstreamReply
from .wire import RequestHead

# Methods whose empty body is still announced with Content-Length: 0.
_METHODS_WITH_BODY = frozenset(("POST", "PUT", "PATCH"))


class Transport:
    """The connection pools of one process, one per upstream origin, shared by all its requests.

    The pools are kept here rather than in a urllib3 PoolManager: its LRU of
    pools would close one in use once a pick_upstream hook routed to more
    origins than it holds, and a plain dict lookup is cheaper per request.
    """

    MAX_POOLS = 1024

    def __init__(self, *, pool_maxsize: int, ca_certs: str | None, idle_timeout: float = 4.0) -> None:
        self.pool_maxsize = pool_maxsize
        self.ca_certs = ca_certs
        self.idle_timeout = idle_timeout
        self._pools: dict[tuple[str, str, int], ProxyPool | ProxyTLSPool] = {}
        os.register_at_fork(after_in_child=self.forget)

    def forget(self) -> None:
        """Drop pools inherited over fork without touching their sockets."""
        self._pools = {}

    def pool(self, upstream: Upstream) -> ProxyPool | ProxyTLSPool:
        key = (upstream.scheme, upstream.host, upstream.port)
        pool = self._pools.get(key)
        if pool is None:
            if len(self._pools) >= self.MAX_POOLS:  # a runaway hook: drop the oldest origin's idle connections
                self._pools.pop(next(iter(self._pools))).close()
            tls = {"cert_reqs": "CERT_REQUIRED", "ca_certs": self.ca_certs} if upstream.scheme == "https" else {}
            pool = self._pools[key] = POOL_CLASSES[upstream.scheme](
                upstream.host, upstream.port, maxsize=self.pool_maxsize, block=False,
                idle_timeout=self.idle_timeout, **tls)
        return pool

    def send(
        self,
        upstream: Upstream,
        ureq: UpstreamRequest,
        *,
        retries: urllib3.Retry,
        timeout: urllib3.Timeout,
    ) -> UpstreamReply:
        """Send ``ureq`` and return the response with its body still unread.

        Raises ``ProxyError`` when no usable response head arrived.
        """
        pool = self.pool(upstream)
        target = upstream.join(ureq.path)
        try:
            return pool.urlopen(
                ureq.method,
                target,
                body=ureq.body or None,
                headers=RequestHead(ureq.method, target, pool.host_header, wire_headers(ureq)),
                retries=retries,
                redirect=False,
                assert_same_host=False,
                timeout=timeout,
                release_conn=False,
            )
        except MaxRetryError as exc:
            raise head_error(exc.reason, upstream) from exc
        except (urllib3.exceptions.HTTPError, HTTPException, OSError) as exc:
            raise head_error(exc, upstream) from exc


def wire_headers(ureq: UpstreamRequest) -> urllib3.HTTPHeaderDict:
    """``ureq.headers`` less the framing a hook may have set, plus the Content-Length of the body really sent.

    Changed in place: the hooks that may look at ``ureq`` have all run by now.
    """
    headers = ureq.headers
    header_rules.drop_framing_set_by_hooks(headers)
    if ureq.body or ureq.method in _METHODS_WITH_BODY:
        headers["Content-Length"] = str(len(ureq.body))
    return headers


def head_error(exc: Any, upstream: Upstream) -> ProxyError:
    """Map a failure before the response head to the contract's error."""
    where = upstream.origin
    if isinstance(exc, NewConnectionError):  # before ConnectTimeoutError: it is a subclass
        return UpstreamUnreachable(f"cannot connect to upstream {where}: {_reason(exc)}")
    if isinstance(exc, ConnectTimeoutError):
        return UpstreamTimeout(f"connect to upstream {where} timed out")
    if isinstance(exc, ReadTimeoutError):
        return UpstreamTimeout(f"upstream {where} sent no response head in time")
    if isinstance(exc, SSLError):
        return UpstreamUnreachable(f"TLS with upstream {where} failed: {_reason(exc)}")
    inner = exc.args[1] if isinstance(exc, ProtocolError) and len(exc.args) > 1 else exc
    if isinstance(inner, (ConnectionError, TimeoutError)) or type(inner) is OSError:
        return UpstreamUnreachable(f"upstream {where} closed the connection before a response head")
    if isinstance(inner, HTTPException):
        return BadUpstreamResponse(f"upstream {where} sent a malformed response head: {_reason(inner)}")
    return UpstreamUnreachable(f"upstream {where} failed before a response head: {_reason(exc)}")


def body_error(exc: BaseException, upstream: Upstream) -> ProxyError:
    """Map a failure while reading a response body to the contract's error."""
    where = upstream.origin
    if isinstance(exc, ReadTimeoutError) or isinstance(exc, TimeoutError):
        return UpstreamTimeout(f"upstream {where} went silent while sending the body")
    inner = exc.args[1] if isinstance(exc, ProtocolError) and len(exc.args) > 1 else exc
    if isinstance(inner, IncompleteRead):
        return BadUpstreamResponse(f"upstream {where} body ended short of its length")
    return BadUpstreamResponse(f"upstream {where} broke off the body: {_reason(exc)}")


def _reason(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text.split(": ", 1)[-1] if isinstance(exc, NewConnectionError) else text
