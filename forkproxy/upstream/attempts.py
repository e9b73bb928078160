"""The attempt loop: a request's attempts, from its first member to the reply it relays or the error it tells.

``Transport.send`` owns the attempts of one request: failover between
members, retries as the policy allows (counted by urllib3's ``Retry``,
``retry.next_retry``), the wait before each (backoff or Retry-After), and
the start and end of every attempt. An attempt starts when the route
chooses its member (counted in flight there, perhaps its trial) and is one
``urlopen`` on that member's connections, which makes exactly one try (the
fresh-connection resend inside it is part of it). It ends in ``_end``
whatever happened: health hears how it went, and the in-flight count comes
back down, at once for a failure, when its connection is released for a
reply (a stream holds its member's count while it runs).

The connections of each origin are made lazily in the process that uses
them and forgotten in a forked child, so a gunicorn master never owns
sockets its workers would share.
"""
from __future__ import annotations

import os
import time
from typing import NamedTuple

import urllib3
from urllib3.util.retry import Retry

from forkproxy.errors import NoLiveUpstream, ProxyError
from forkproxy.http import headers as header_rules
from forkproxy.http.wire import RequestHead
from forkproxy.messages import UpstreamRequest
from forkproxy.upstream.connections import CONNECTIONS, ONE_TRY, Connections, TLSConnections
from forkproxy.upstream.failures import AttemptFailed, SentNothing
from forkproxy.upstream.members import BaseURL, FixedRoute, PoolRoute
from forkproxy.upstream.reply import UpstreamReply
from forkproxy.upstream.retry import RetryPolicy, may_retry, next_retry, pause

# Methods whose empty body is still announced with Content-Length: 0.
_METHODS_WITH_BODY = frozenset(("POST", "PUT", "PATCH"))


class Attempted(NamedTuple):
    """How a request's attempts ended: an explicit outcome, never out-parameters."""

    reply: UpstreamReply | None  # the reply to relay (its connection owned by it); also the last when attempts ran out
    error: ProxyError | None  # set when no reply is used (then reply is None)
    retries: int  # retries made (a failover from a member that was sent nothing is none)
    member: BaseURL | None  # the member that answered or was tried last; None when none was contacted


class Transport:
    """The connections of one process, one connection pool per upstream origin, shared by all its requests.

    They are kept here rather than in a urllib3 PoolManager: its LRU of
    connection pools would close one in use once a pick_upstream hook routed
    to more origins than it holds, and a plain dict lookup is cheaper per request.
    """

    MAX_ORIGINS = 1024

    def __init__(self, *, pool_maxsize: int, ca_certs: str | None, idle_timeout: float = 4.0) -> None:
        self.pool_maxsize = pool_maxsize
        self.ca_certs = ca_certs
        self.idle_timeout = idle_timeout
        self._connections: dict[tuple[str, str, int], Connections | TLSConnections] = {}
        os.register_at_fork(after_in_child=self.forget)

    def forget(self) -> None:
        """Drop connections inherited over fork without touching their sockets."""
        self._connections = {}

    def connections(self, member: BaseURL) -> Connections | TLSConnections:
        """The connection pool of ``member``'s origin (scheme, host and port; the prefix is not part of it)."""
        key = (member.scheme, member.host, member.port)
        found = self._connections.get(key)
        if found is None:
            if len(self._connections) >= self.MAX_ORIGINS:  # a runaway hook: close the oldest origin's idle ones
                self._connections.pop(next(iter(self._connections))).close()
            tls = {"cert_reqs": "CERT_REQUIRED", "ca_certs": self.ca_certs} if member.scheme == "https" else {}
            found = self._connections[key] = CONNECTIONS[member.scheme](
                member.host, member.port, maxsize=self.pool_maxsize, block=False,
                idle_timeout=self.idle_timeout, **tls)
        return found

    def send(self, route: FixedRoute | PoolRoute, ureq: UpstreamRequest, policy: RetryPolicy,
             timeout: urllib3.Timeout, upgrade: str | None = None) -> Attempted:
        """Make the attempts ``ureq`` gets; the reply's body is still unread.

        A member that was sent nothing (failed connect or TLS handshake) is
        moved on from to one not tried yet, using no attempt and no wait.
        Every other outcome is retried as ``policy`` says, on the member the
        route chooses next. Never raises for an upstream failure: its error
        is returned. ``upgrade`` asks for a tunnel (the reply may be its 101).

        A reply whose status is not one to retry returns at once, before the
        retry rules are consulted: most requests end so, and this keeps their
        cost at what a single urlopen cost before the loop was forkproxy's.
        """
        headers = wire_headers(ureq)
        try:
            member = route.next()
        except NoLiveUpstream as error:
            return Attempted(None, error, 0, None)
        retry: Retry | None = None  # urllib3's count of the retries made, from the first on
        while True:
            outcome = self._attempt(route, member, ureq, headers, timeout, upgrade)
            if isinstance(outcome, UpstreamReply) and not policy.retriable(outcome.status):  # most requests
                return _attempted(outcome, retry, member)
            failover = isinstance(outcome, SentNothing) and route.can_fail_over()
            if not failover:
                counted = _next_retry(policy, retry, ureq.method, outcome)
                if counted is None:
                    return _attempted(outcome, retry, member)
                retry = counted
            try:
                member = route.next()
            except NoLiveUpstream:  # every member is down now: the last outcome stands
                return _attempted(outcome, retry, member)
            if not failover:
                _wait(route, policy, retry, outcome)

    def _attempt(self, route: FixedRoute | PoolRoute, member: BaseURL, ureq: UpstreamRequest,
                 headers: urllib3.HTTPHeaderDict, timeout: urllib3.Timeout,
                 upgrade: str | None) -> UpstreamReply | AttemptFailed:
        """One attempt on ``member``: one try on its connections, ended whatever it raised."""
        try:
            connections = self.connections(member)
            target = member.join(ureq.path)
            reply = connections.urlopen(
                ureq.method,
                target,
                body=ureq.body or None,
                headers=RequestHead(ureq.method, target, connections.host_header, headers, upgrade),
                retries=ONE_TRY,
                redirect=False,
                assert_same_host=False,
                timeout=timeout,
                release_conn=False,
            )
        except AttemptFailed as failure:
            _end(route, None, failure.reason)
            return failure
        except BaseException as exc:  # not the upstream's doing (a bug, the worker stopping): ended all the same
            _end(route, None, f"cut short ({type(exc).__name__}: {exc})")
            raise
        _end(route, reply, "")
        return reply


def wire_headers(ureq: UpstreamRequest) -> urllib3.HTTPHeaderDict:
    """``ureq.headers`` less the framing a hook may have set, plus the Content-Length of the body really sent.

    Changed in place: the hooks that may look at ``ureq`` have all run by now.
    """
    headers = ureq.headers
    header_rules.drop_framing_set_by_hooks(headers)
    if ureq.body or ureq.method in _METHODS_WITH_BODY:
        headers["Content-Length"] = str(len(ureq.body))
    return headers


def _end(route: FixedRoute | PoolRoute, reply: UpstreamReply | None, reason: str) -> None:
    """The one end of every attempt: health hears how it went, the trial settles, the in-flight count comes down.

    A reply's attempt is over when its connection is released (read,
    drained or abandoned), so a relayed body counts in flight while it runs;
    any other attempt is over now, whatever raised in between.
    """
    if reply is not None:
        reply.on_release = route.done
        route.answered(reply.status)  # a failure to health only if in fail_on_status
        return
    try:
        route.failed(reason)
    finally:
        route.done()


def _next_retry(policy: RetryPolicy, retry: Retry | None, method: str,
                outcome: UpstreamReply | AttemptFailed) -> Retry | None:
    """The count with one more retry, or None when the policy allows none after ``outcome``."""
    if isinstance(outcome, AttemptFailed):
        if not may_retry(policy, method, 0, outcome.sent):
            return None
        return next_retry(policy, retry, method, error=outcome)
    if not may_retry(policy, method, outcome.status, True):
        return None
    return next_retry(policy, retry, method, response=outcome)


def _wait(route: FixedRoute | PoolRoute, policy: RetryPolicy, retry: Retry,
          outcome: UpstreamReply | AttemptFailed) -> None:
    """Before the retry, its member chosen: the reply not relayed is drained, then the policy's wait is slept.

    Should the wait be cut short (the worker stopping), the chosen member's attempt ends all the same.
    """
    reply = outcome if isinstance(outcome, UpstreamReply) else None
    try:
        if reply is not None:
            reply.drain_conn()
        seconds = pause(policy, retry, reply)
        if seconds > 0:
            time.sleep(seconds)
    except BaseException as exc:
        _end(route, None, f"cut short before its attempt ({type(exc).__name__}: {exc})")
        raise


def _attempted(outcome: UpstreamReply | AttemptFailed, retry: Retry | None, member: BaseURL) -> Attempted:
    retries = len(retry.history) if retry is not None else 0
    if isinstance(outcome, AttemptFailed):
        return Attempted(None, outcome.error, retries, member)
    return Attempted(outcome, None, retries, member)
