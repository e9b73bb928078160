"""Talking to the upstream: the per-process urllib3 pools, one per upstream origin.

Pools are made lazily in the process that uses them and forgotten in a forked
child, so a gunicorn master never owns sockets its workers would share.
"""
from __future__ import annotations

import os
from http.client import HTTPException

import urllib3
from urllib3.exceptions import ConnectTimeoutError, MaxRetryError

from forkproxy.http import headers as header_rules
from forkproxy.messages import UpstreamRequest
from forkproxy.http.wire import RequestHead
from forkproxy.upstream.connections import POOL_CLASSES, ProxyPool, ProxyTLSPool
from forkproxy.upstream.failures import head_error
from forkproxy.errors import NoLiveUpstream
from forkproxy.upstream.retry import Failover
from forkproxy.upstream.members import BaseURL, FixedRoute, PoolRoute
from forkproxy.upstream.reply import UpstreamReply

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

    def pool(self, upstream: BaseURL) -> ProxyPool | ProxyTLSPool:
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
        route: FixedRoute | PoolRoute,
        ureq: UpstreamRequest,
        *,
        retries: urllib3.Retry,
        timeout: urllib3.Timeout,
        upgrade: str | None = None,
    ) -> UpstreamReply:
        """Send ``ureq`` and return the response with its body still unread.

        Each attempt is one urlopen on the pool of the member ``route``
        picks; a retry the Retry allows comes back as ``Failover`` and goes
        to the member picked next. Raises ``ProxyError`` when no usable
        response head arrived. ``upgrade`` asks for a tunnel (the reply may be its 101).
        """
        headers = wire_headers(ureq)
        base = route.next()
        while True:
            try:
                reply = self._attempt(base, ureq, headers, retries, timeout, upgrade)
            except BaseException as exc:
                error, response, next_retries = _ending(exc)
                _settle(route, error, response)
                if response is None and not isinstance(error, _UPSTREAM_FAILURES):
                    raise  # not the upstream's doing (a bug, the worker stopping): the route is settled all the same
            else:
                route.answered(reply.status)
                reply.on_release = route.done
                return reply
            sent_nothing = isinstance(error, ConnectTimeoutError) and route.can_fail_over()
            if sent_nothing:  # on to a member not tried yet, using no attempt and sleeping no backoff
                retries.count.retries = len(retries.history)
            elif next_retries is None:
                raise head_error(error, base) from error
            else:
                retries = next_retries
            try:
                base = route.next()
            except NoLiveUpstream:  # the last failure stands: every member is down now
                if response is not None:
                    return response  # the upstream's own answer goes to the client as it is
                raise head_error(error, route.base) from error
            if response is not None:
                response.drain_conn()
            if not sent_nothing:
                retries.sleep(response)

    def _attempt(self, base: BaseURL, ureq: UpstreamRequest, headers: urllib3.HTTPHeaderDict,
                 retries: urllib3.Retry, timeout: urllib3.Timeout, upgrade: str | None) -> UpstreamReply:
        pool = self.pool(base)
        target = base.join(ureq.path)
        return pool.urlopen(
            ureq.method,
            target,
            body=ureq.body or None,
            headers=RequestHead(ureq.method, target, pool.host_header, headers, upgrade),
            retries=retries,
            redirect=False,
            assert_same_host=False,
            timeout=timeout,
            release_conn=False,
        )


def wire_headers(ureq: UpstreamRequest) -> urllib3.HTTPHeaderDict:
    """``ureq.headers`` less the framing a hook may have set, plus the Content-Length of the body really sent.

    Changed in place: the hooks that may look at ``ureq`` have all run by now.
    """
    headers = ureq.headers
    header_rules.drop_framing_set_by_hooks(headers)
    if ureq.body or ureq.method in _METHODS_WITH_BODY:
        headers["Content-Length"] = str(len(ureq.body))
    return headers


_UPSTREAM_FAILURES = (urllib3.exceptions.HTTPError, HTTPException, OSError)


def _ending(exc: BaseException) -> tuple[BaseException | None, UpstreamReply | None, urllib3.Retry | None]:
    """What an attempt raised, as (its error, the upstream's reply, the Retry for another attempt)."""
    if isinstance(exc, Failover):  # the policy allows another attempt
        return exc.error, exc.response, exc.retry
    if isinstance(exc, MaxRetryError):  # the policy's attempts are spent
        return exc.reason, None, None
    return exc, None, None


def _settle(route: FixedRoute | PoolRoute, error: BaseException | None, response: UpstreamReply | None) -> None:
    """An attempt that hands no reply on is over: health hears how it went, and it is no longer in flight.

    The one place every such attempt ends, whatever it raised, so that no
    member is left with a request in flight or a trial that never settles.
    """
    try:
        if response is not None:
            route.answered(response.status)  # a failure to health only if in fail_on_status
        else:
            route.failed(_why(error))
    finally:
        route.done()


def _why(error: BaseException | None) -> str:
    """The reason an attempt failed, for the log line of a member marked down."""
    reason = getattr(error, "reason", None) or error
    return f"{type(reason).__name__}: {reason}"
