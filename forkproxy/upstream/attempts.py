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

The hooks that take part are handed in, never imported (the lifecycle owns
them): ``Shape`` makes each attempt's own request (``before_attempt``),
``Check`` gives each reply head its verdict (``judge_reply``) after reading
its first units where that is asked for (``first_byte_timeout``), and a
``Deadline`` bounds the whole. ``Attempts`` is one request's loop; it stays
with a streamed reply, so that a stream resumed after a failure
(``resume_stream``) goes on with the same count, order and deadline.

The connections of each origin are made lazily in the process that uses
them and forgotten in a forked child, so a gunicorn master never owns
sockets its workers would share.
"""
from __future__ import annotations

import os
import time
from typing import Any, Callable, NamedTuple

import urllib3
from urllib3.util.retry import Retry

from forkproxy.errors import NoLiveUpstream, ProxyError, UpstreamTimeout
from forkproxy.http import headers as header_rules
from forkproxy.http.wire import RequestHead
from forkproxy.messages import UpstreamRequest
from forkproxy.upstream.connections import CONNECTIONS, ONE_TRY, Connections, TLSConnections
from forkproxy.upstream.failures import AttemptFailed, SentNothing
from forkproxy.upstream.members import BaseURL, FixedRoute, PoolRoute, Upstream
from forkproxy.upstream.reply import UpstreamReply
from forkproxy.upstream.retry import RetryPolicy, may_retry, next_retry, pause
from forkproxy.tracing import NO_TRACE

# Methods whose empty body is still announced with Content-Length: 0.
_METHODS_WITH_BODY = frozenset(("POST", "PUT", "PATCH"))

Shape = Callable[[UpstreamRequest, Upstream], UpstreamRequest]
"""``shape(ureq, member)``: the request one attempt sends to ``member``, made from ``ureq`` (``before_attempt``)."""

ACCEPT, RETRY, FAIL_OVER = "accept", "retry", "fail_over"
VERDICTS = (ACCEPT, RETRY, FAIL_OVER, None)
Check = Callable[[UpstreamReply, Upstream, int], "str | None"]
"""``check(reply, member, attempts)``: one of ``VERDICTS`` for a reply head (``judge_reply``); it may read the
body, and raises an ``AttemptFailed`` for a reply whose first unit did not come (``first_byte_timeout``)."""

Ask = Callable[[Upstream], "UpstreamRequest | None"]
"""``ask(member)``: the request a resumed stream sends to ``member``, or None not to go on (``resume_stream``)."""


class StreamResumed(Exception):
    """What urllib3's count of retries records for a resumed attempt (its history says why each was made).

    Neither a connection nor a read error for urllib3, which would then ask
    whether the method may be retried: the ``resume_stream`` hook decided that.
    """


_RESUMING = StreamResumed("the stream broke off after its head went out")
# A timeout this close to the deadline was the deadline's (timers may fire a hair early).
_DEADLINE_SLACK = 0.01


class Deadline(NamedTuple):
    """The longest a request may take from received to its reply accepted, across every attempt and wait."""

    at: float  # time.monotonic() when it runs out
    seconds: float  # as set, for the message

    def cut(self, timeout: urllib3.Timeout) -> urllib3.Timeout:
        """``timeout``, itself when the time left exceeds it, else cut to what is left (a new one)."""
        left = self.at - time.monotonic()
        if left >= timeout.connect_timeout and left >= timeout.read_timeout:
            return timeout
        return urllib3.Timeout(connect=self.within(timeout.connect_timeout), read=self.within(timeout.read_timeout))

    def within(self, seconds: float) -> float:
        """``seconds``, cut to what is left of it (at least a millisecond: a wait then runs into it at once)."""
        return min(seconds, max(self.at - time.monotonic(), 0.001))

    def passed_after(self, seconds: float) -> bool:
        """Whether waiting ``seconds`` more would end at or past it."""
        return time.monotonic() + seconds >= self.at

    def ran_out(self, outcome: AttemptFailed, attempts: int, member: Upstream) -> Attempted:
        """An attempt cut short by it: 504, its message the deadline and the attempts made."""
        error = UpstreamTimeout(f"no upstream reply within the deadline of {self.seconds:g}s "
                                f"({attempts} attempt{'s' if attempts != 1 else ''})")
        error.__cause__ = outcome.error.__cause__
        return Attempted(None, error, attempts - 1, member)


class Attempted(NamedTuple):
    """How a request's attempts ended: an explicit outcome, never out-parameters."""

    reply: UpstreamReply | None  # the reply to relay (its connection owned by it); also the last when attempts ran out
    error: ProxyError | None  # set when no reply is used (then reply is None)
    retries: int  # retries made (a failover from a member that was sent nothing is none)
    member: Upstream | None  # the member that answered or was tried last; None when none was contacted


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

    def attempts(self, route: FixedRoute | PoolRoute, ureq: UpstreamRequest, policy: RetryPolicy,
                 timeout: urllib3.Timeout, upgrade: str | None = None, shape: Shape | None = None,
                 deadline: Deadline | None = None, trace: Any = NO_TRACE) -> Attempts:
        """The attempts of one request, ready to start (``Attempts.first``)."""
        return Attempts(self, route, ureq, policy, timeout, upgrade, shape, deadline, trace)


class Attempts:
    """One request's attempts: its route through the members, urllib3's count of its retries, its deadline.

    Kept while the reply is relayed, so that a stream resumed after a
    failure (``resume``) goes on with the same count, the same order of
    members and the same deadline as the attempts that got its head.
    """

    __slots__ = ("transport", "route", "ureq", "policy", "timeout", "upgrade", "shape", "deadline",
                 "trace", "retry", "headers", "sent")

    def __init__(self, transport: Transport, route: FixedRoute | PoolRoute, ureq: UpstreamRequest,
                 policy: RetryPolicy, timeout: urllib3.Timeout, upgrade: str | None, shape: Shape | None,
                 deadline: Deadline | None, trace: Any = NO_TRACE) -> None:
        self.transport = transport
        self.route = route
        self.ureq = ureq
        self.policy = policy
        self.timeout = timeout
        self.upgrade = upgrade  # the protocols a tunnel request asks for: the reply may be its 101
        self.shape = shape  # before_attempt: each attempt's own request, made from ureq (which stays as it is)
        self.deadline = deadline
        self.trace = trace  # the request's trace: a CLIENT span per attempt (``forkproxy.tracing``)
        self.retry: Retry | None = None  # urllib3's count of the retries made, from the first on
        self.headers: urllib3.HTTPHeaderDict | None = None  # ureq's on the wire, when no shape makes them per attempt
        self.sent = 0  # attempts begun (failovers from a member sent nothing included): the next one's resend count

    def first(self, check: Check | None = None) -> Attempted:
        """Make the attempts the request gets; the reply's body is still unread (unless ``check`` read some).

        A member that was sent nothing (failed connect or TLS handshake) is
        moved on from to one not tried yet, using no attempt and no wait.
        Every other outcome is retried as the policy says, on the member the
        route chooses next. Never raises for an upstream failure: its error
        is returned. What ``shape`` or ``check`` raise ends the request.
        ``check``'s verdict (``judge_reply``): ``"accept"`` takes the reply,
        ``"retry"`` sends again to its member, ``"fail_over"`` moves on to the
        next one at once, None leaves it to the policy. The deadline bounds
        the whole: each attempt's timeouts are cut to what is left, and no
        wait runs past it.

        A reply whose status is not one to retry returns at once, before the
        retry rules are consulted: most requests end so, and this keeps their
        cost at what a single urlopen cost before the loop was forkproxy's.
        """
        route, policy, deadline = self.route, self.policy, self.deadline
        if self.shape is None:
            self.headers = wire_headers(self.ureq)
        try:
            member = route.next()
        except NoLiveUpstream as error:
            return Attempted(None, error, 0, None)
        while True:
            outcome, verdict = self._attempt(member, self.ureq, self.headers, self._limit(self.timeout), check)
            # The policy is the hook's object, its methods perhaps the hook's code: what they raise leaves
            # no reply held (its connection closed, its member's in-flight count down).
            try:
                if verdict is None and isinstance(outcome, UpstreamReply) and not policy.retriable(outcome.status):
                    return self._attempted(outcome, member)  # most requests
                if verdict == ACCEPT:
                    return self._attempted(outcome, member)
                if self._ran_out(outcome):
                    return deadline.ran_out(outcome, self.made(), member)
                move = _move(policy, route, self.retry, self.ureq.method, outcome, verdict)
                if move is None or (deadline is not None and deadline.passed_after(move.wait)):
                    return self._attempted(outcome, member)  # the last outcome stands
                try:
                    member = route.repeat() if verdict == RETRY else route.next()
                except NoLiveUpstream:  # every member is down now: the last outcome stands, no retry made
                    return self._attempted(outcome, member)
                self.retry = move.retry  # counted once it has a member to go to
                _wait(route, outcome, move.wait)
            except BaseException:
                if isinstance(outcome, UpstreamReply):
                    outcome.close()
                raise

    def resume(self, ask: Ask, check: Check, timeout: urllib3.Timeout) -> UpstreamReply | None:
        """Attempts that carry on a stream whose head went out: a reply whose first units ``check`` read, or None.

        Each uses an attempt of the policy and goes to the next live member
        (the order of ``first``), no sooner asked than ``ask(member)`` gives
        its request (None: not to go on); a reply goes on only when ``check``
        accepts it and its status is below 300. No wait between them: a
        client is waiting mid-answer, so each waits for its head no longer
        than ``timeout`` either. None once attempts, members or the
        deadline are spent, or ``ask`` declines.
        """
        route, deadline = self.route, self.deadline
        while True:
            counted = next_retry(self.policy, self.retry, self.ureq.method, error=_RESUMING)
            if counted is None or (deadline is not None and deadline.passed_after(0)):
                return None
            try:
                member = route.next()
            except NoLiveUpstream:
                return None
            self.retry = counted
            try:
                ureq = ask(member)
            except BaseException:
                route.abandoned()
                raise
            if ureq is None:
                route.abandoned()
                return None
            outcome, verdict = self._attempt(member, ureq, None if self.shape else wire_headers(ureq),
                                             self._limit(timeout), check)
            if isinstance(outcome, UpstreamReply):
                if verdict in (ACCEPT, None) and outcome.status < 300:
                    return outcome
                outcome.close()

    def _limit(self, timeout: urllib3.Timeout) -> urllib3.Timeout:
        """An attempt's timeouts: ``timeout``, cut to what is left of the deadline."""
        return timeout if self.deadline is None else self.deadline.cut(timeout)

    def made(self) -> int:
        """Attempts made so far, the one under way included."""
        return len(self.retry.history) + 1 if self.retry is not None else 1

    def _attempted(self, outcome: UpstreamReply | AttemptFailed, member: Upstream) -> Attempted:
        retries = self.made() - 1
        if isinstance(outcome, AttemptFailed):
            return Attempted(None, outcome.error, retries, member)
        return Attempted(outcome, None, retries, member)

    def _ran_out(self, outcome: UpstreamReply | AttemptFailed) -> bool:
        """Whether a timeout was the deadline's: it has (all but) passed. A timeout of the attempt's own (a connect,
        a first unit) with time left is the attempt's, and failover goes on."""
        deadline = self.deadline
        return (deadline is not None and isinstance(outcome, AttemptFailed)
                and isinstance(outcome.error, UpstreamTimeout) and deadline.passed_after(_DEADLINE_SLACK))

    def _attempt(self, member: Upstream, ureq: UpstreamRequest, headers: urllib3.HTTPHeaderDict | None,
                 timeout: urllib3.Timeout, check: Check | None) -> tuple[UpstreamReply | AttemptFailed, str | None]:
        """One attempt on ``member``: one try on its connections, ended whatever it raised; its verdict, if checked."""
        route = self.route
        if self.shape is not None:
            ureq, headers = _shaped(route, self.shape, ureq, member)
        # Its traceparent goes into the headers just before they are encoded: without a shape they are
        # one dict for every attempt, and each attempt overwrites it with its own.
        span = self.trace.attempt(member, ureq.method, self.sent, headers)
        self.sent += 1
        try:
            connections = self.transport.connections(member.base)
            target = member.base.join(ureq.path)
            reply = connections.urlopen(
                ureq.method,
                target,
                body=ureq.body or None,
                headers=RequestHead(ureq.method, target, connections.host_header, headers, self.upgrade),
                retries=ONE_TRY,
                redirect=False,
                assert_same_host=False,
                timeout=timeout,
                release_conn=False,
            )
        except AttemptFailed as failure:
            span.end(0, failure.error.type)
            _end(route, None, failure.reason)
            return failure, None
        except BaseException as exc:  # not the upstream's doing (a bug, the worker stopping): ended all the same
            span.end(0, type(exc).__name__)
            _end(route, None, f"cut short ({type(exc).__name__}: {exc})")
            raise
        reply.on_release = route.done_later()  # in flight until its connection is released (read, drained, abandoned)
        if check is None:
            span.end(reply.status)
            _end(route, reply, "")
            return reply, None
        try:
            outcome, verdict = _checked(route, check, reply, member, self.made())
        except BaseException as exc:
            span.end(reply.status, exc.type if isinstance(exc, ProxyError) else type(exc).__name__)
            raise
        if isinstance(outcome, AttemptFailed):
            span.end(reply.status, outcome.error.type)
        else:
            span.end(reply.status, None, verdict)
        return outcome, verdict


def wire_headers(ureq: UpstreamRequest) -> urllib3.HTTPHeaderDict:
    """``ureq.headers`` less the framing a hook may have set, plus the Content-Length of the body really sent.

    Changed in place: the hooks that may look at ``ureq`` have all run by now.
    """
    headers = ureq.headers
    header_rules.drop_framing_set_by_hooks(headers)
    if ureq.body or ureq.method in _METHODS_WITH_BODY:
        headers["Content-Length"] = str(len(ureq.body))
    return headers


def _shaped(route: FixedRoute | PoolRoute, shape: Shape, ureq: UpstreamRequest,
            member: Upstream) -> tuple[UpstreamRequest, urllib3.HTTPHeaderDict]:
    """The attempt's own request; when making it raised, the member is given back unjudged (nothing was sent)."""
    try:
        shaped = shape(ureq, member)
        return shaped, wire_headers(shaped)
    except BaseException:
        route.abandoned()
        raise


def _end(route: FixedRoute | PoolRoute, reply: UpstreamReply | None, reason: str,
         verdict: str | None = None) -> None:
    """The one end of every attempt: health hears how it went, the trial settles, the in-flight count comes down.

    A reply's attempt is over when its connection is released (read,
    drained or abandoned: ``on_release``), so a relayed body counts in
    flight while it runs; any other attempt is over now, whatever raised in
    between. A reply that ``judge_reply`` sent on (``"retry"``,
    ``"fail_over"``) judged the request, not the member: it answered.
    """
    if reply is not None:
        if verdict == RETRY or verdict == FAIL_OVER:
            route.judged()
        else:
            route.answered(reply.status)  # a failure to health only if in fail_on_status
        return
    try:
        route.failed(reason)
    finally:
        route.done()


def _checked(route: FixedRoute | PoolRoute, check: Check, reply: UpstreamReply, member: Upstream,
             attempts: int) -> tuple[UpstreamReply | AttemptFailed, str | None]:
    """The reply's verdict, its attempt ended. A reply whose first unit did not come is a failed attempt;
    when checking raised, the reply is abandoned and health hears its status as usual."""
    try:
        verdict = check(reply, member, attempts)
    except AttemptFailed as failure:
        reply.close()  # its release ends it in flight
        route.failed(failure.reason)
        return failure, None
    except BaseException:
        reply.close()
        route.answered(reply.status)
        raise
    _end(route, reply, "", verdict)
    return reply, verdict


class Move(NamedTuple):
    """The next attempt: the count of retries with it, and the seconds to wait before it."""

    retry: Retry | None
    wait: float


def _move(policy: RetryPolicy, route: FixedRoute | PoolRoute, retry: Retry | None, method: str,
          outcome: UpstreamReply | AttemptFailed, verdict: str | None) -> Move | None:
    """What follows an outcome that was not accepted; None when nothing does (its outcome stands).

    A member that was sent nothing is moved on from, to one not tried yet,
    using no attempt. A verdict of ``judge_reply`` uses an attempt whatever
    the status and method (the hook judged the reply); ``"fail_over"`` goes
    at once, and only to another member. Else the policy decides.
    """
    if verdict is None and isinstance(outcome, SentNothing) and route.can_fail_over():
        return Move(retry, 0.0)
    if verdict == FAIL_OVER and not route.can_move_on():
        return None
    if verdict is not None:
        counted = next_retry(policy, retry, method, response=outcome)
    else:
        counted = _next_retry(policy, retry, method, outcome)
    if counted is None:
        return None
    if verdict == FAIL_OVER:
        return Move(counted, 0.0)
    return Move(counted, pause(policy, counted, outcome if isinstance(outcome, UpstreamReply) else None))


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


def _wait(route: FixedRoute | PoolRoute, outcome: UpstreamReply | AttemptFailed, seconds: float) -> None:
    """Before the next attempt, its member chosen: the reply not relayed is drained, then ``seconds`` are slept.

    Should the wait be cut short (the worker stopping), the chosen member's attempt ends all the same.
    """
    try:
        if isinstance(outcome, UpstreamReply):
            outcome.drain_conn()
        if seconds > 0:
            time.sleep(seconds)
    except BaseException as exc:
        _end(route, None, f"cut short before its attempt ({type(exc).__name__}: {exc})")
        raise
