"""One request's life in the proxy, top to bottom: the story a reader follows.

    serve(proxy, environ, start_response)
      handle                       the request's story; one error exit
        receive                    the request out of the environ: target, id, upgrade, body
        shape                      rewrite_path, before_forward (it may answer itself), the checks
        limit                      rate_limits, taken together
        attempt                    the attempt loop (``upstream.attempts``): a reply head, or an error
        relay                      tunnel (a 101) | stream | buffer (the body read whole)
      answer                       after_forward, then the reply: every request not streamed or tunnelled
      note                         what the access log and metrics read: written once, here

Every failure on the way is a ``ProxyError`` (hooks' failures too, see
``forkproxy.hooks``) and leaves through ``fail``, the one error exit, into
``answer``. What a request carries from step to step lives in one record,
``Trip``: the hooks' objects, the timings, the outcome of the attempts.
A reply leaves as one of two explicit outcomes, ``ClientReply`` (status, head,
body) or ``Tunnelled``.
"""
from __future__ import annotations

import functools
import logging
import sys
import time
from http import HTTPStatus
from typing import Any, Callable, Iterable, NamedTuple, Protocol

import urllib3

from forkproxy.errors import (BadRequest, BadUpstreamResponse, HookError, InternalError, PayloadTooLarge, ProxyError,
                              RateLimited)
from forkproxy.hooks import call
from forkproxy.http import handshake, headers as header_rules
from forkproxy.limits.gcra import Limit
from forkproxy.messages import Request, Response, UpstreamRequest, UpstreamResponse, describe
from forkproxy.metrics import metrics
from forkproxy.relay.buffered import read_body
from forkproxy.relay.stream import Primed, Resume, StreamHooks, StreamRelay, StreamSettings, is_event_stream, prime
from forkproxy.relay.tunnel import Tunnel, TunnelHooks, TunnelSettings
from forkproxy.server.inbound import REQUEST_ID_HEADER, read_request_body, request_from_environ, request_id
from forkproxy.server import takeover
from forkproxy.tracing import NO_TRACE
from forkproxy.server.worker import (ENV_REQUEST_ID, ENV_RETRIES, ENV_UPSTREAM, ENV_UPSTREAM_STATUS,
                                     ENV_UPSTREAM_TIME, close_connection_after)
from forkproxy.upstream.attempts import VERDICTS, Attempted, Attempts, Check, Deadline, Shape
from forkproxy.upstream.failures import NoFirstUnit
from forkproxy.upstream.members import FixedRoute, PoolRoute, Upstream, UpstreamPool, fixed_route
from forkproxy.upstream.reply import UpstreamReply
from forkproxy.upstream.retry import RetryPolicy

log = logging.getLogger("forkproxy")

_REASONS = {s.value: s.phrase for s in HTTPStatus}


class Gateway(Protocol):
    """What the lifecycle asks of the proxy it serves (``forkproxy.Proxy``): settings, hooks, resources.

    A protocol rather than the class itself, so that this module does not
    import the one that imports it.
    """

    allowed_upgrades: tuple[str, ...]
    timeout: float
    connect_timeout: float
    deadline: float
    first_byte_timeout: float
    max_request_body_bytes: int
    max_response_body_bytes: int
    stream_idle_timeout: float
    max_event_bytes: int
    sse_heartbeat_secs: float
    sse_error_event: bool
    tunnel_idle_timeout: float
    max_ws_message_bytes: int
    transport: Any  # upstream.attempts.Transport
    limiter: Any  # limits.limiter.Limiter
    pick_upstream: Callable[..., Any]
    rewrite_path: Callable[..., Any]
    retry_policy: Callable[..., Any]
    before_forward: Callable[..., Any]
    before_attempt: Callable[..., Any]
    judge_reply: Callable[..., Any]
    rate_limits: Callable[..., Any]
    stream_request: Callable[..., Any]
    after_forward: Callable[..., Any]
    on_stream_chunk: Callable[..., Any]
    resume_stream: Callable[..., Any]
    on_stream_end: Callable[..., Any]
    on_ws_message: Callable[..., Any]
    on_tunnel_end: Callable[..., Any]

    def trusted(self) -> Any: ...

    def overridden(self, hook: str) -> bool: ...

    def wants_messages(self) -> bool: ...


class Trip:
    """What one request carries from step to step: the hooks' objects, its timings, how its attempts went."""

    __slots__ = ("environ", "req", "res", "ures", "ureq", "upgrade", "stream_wanted", "received", "started",
                 "attempts", "member", "primed", "answered_by_hook", "close_after", "body_read", "counted", "trace")

    def __init__(self, environ: dict) -> None:
        self.environ = environ
        self.req: Request | None = None
        self.res = Response()
        self.ures = UpstreamResponse()
        self.ureq: UpstreamRequest | None = None
        self.upgrade: str | None = None  # the protocols a tunnel request asks for, as sent
        self.stream_wanted = False  # stream_request said so
        self.received = 0.0  # when the request was received, body included (monotonic): its deadline counts from it
        self.started = 0.0  # when the attempts began (monotonic)
        self.attempts: Attempts | None = None  # the attempt loop: a resumed stream goes on with it
        self.member: Upstream | None = None  # the member that answered, or was tried last
        self.primed: Primed | None = None  # the first units of the reply checked last, when they were read ahead
        self.answered_by_hook = False  # before_forward answered: res is the hook's
        self.close_after = False  # unread request bytes may be left: the connection is not reused
        self.body_read = False  # judge_reply was shown the reply's (error) body: it is in ures.body, to be buffered
        self.counted = False  # its reply is in the answered metric (once: a counter cannot be taken back)
        self.trace: Any = NO_TRACE  # its trace (``forkproxy.tracing``): the SERVER span, its attempts' CLIENT spans


class ClientReply(NamedTuple):
    """A reply for the server to send: buffered (a list of one body) or a stream (its relay)."""

    status: int
    headers: list[tuple[str, str]]
    body: Iterable[bytes]


class Tunnelled(NamedTuple):
    """A reply that is a tunnel: it writes its own 101 and takes the connection."""

    tunnel: Tunnel


# -- the WSGI call ---------------------------------------------------------------

def serve(proxy: Gateway, environ: dict, start_response: Callable) -> Iterable[bytes]:
    trip = Trip(environ)
    tracer = proxy.tracer
    if tracer.enabled:  # off: this one check is the whole cost
        trip.trace = tracer.request(environ, proxy.trusted())
    try:
        outcome = handle(proxy, trip)
    except Exception:  # a bug in forkproxy itself: still the contract's JSON, the traceback logged
        outcome = _internal_error(trip)
    if isinstance(outcome, Tunnelled):
        outcome.tunnel.run()
        takeover.give_back()  # to the server: this connection is over, write nothing more on it
    try:
        start_response(status_line(outcome.status), outcome.headers)
    except Exception as exc:  # a head the server refuses that no rule here foresaw: still JSON, nothing leaked
        return _refused_by_server(trip, start_response, outcome.body, exc)
    return outcome.body


def handle(proxy: Gateway, trip: Trip) -> ClientReply | Tunnelled:
    """The request's story. Every ``ProxyError`` on the way leaves through ``fail``, then ``answer``."""
    try:
        receive(proxy, trip)
        if shape(proxy, trip):
            limit(proxy, trip)
            reply = attempt(proxy, trip)
            if reply.status == 101:
                return tunnel(proxy, trip, reply)
            if not trip.body_read and _streams(proxy, trip, reply):
                return stream(proxy, trip, reply)
            buffer(proxy, trip, reply)
    except ProxyError as err:
        fail(trip, err)
    return answer(proxy, trip)


# -- the steps ---------------------------------------------------------------------

def receive(proxy: Gateway, trip: Trip) -> None:
    """The request out of the environ: its target (400 if not a path), its id, an upgrade asked for, its body."""
    req, refused = request_from_environ(trip.environ)
    req.span = trip.trace.span  # before any hook runs
    req.request_id = request_id(header_rules.get(req.headers, REQUEST_ID_HEADER))
    trip.req = req
    if refused is not None:
        raise refused
    if header_rules.wants_upgrade(req.headers):
        trip.upgrade = handshake.requested_upgrade(req.headers, proxy.allowed_upgrades)  # 501 if not allowed
        takeover.client_socket(trip.environ)  # 501 if the server cannot hand the connection over
    req.body = read_request_body(trip.environ, proxy.max_request_body_bytes, proxy.timeout)
    req.deadline = proxy.deadline
    trip.received = time.monotonic()


def shape(proxy: Gateway, trip: Trip) -> bool:
    """The upstream request, as the hooks make it; False when ``before_forward`` answered itself."""
    req = trip.req
    ureq = trip.ureq = _upstream_request(proxy, req)
    if trip.upgrade is not None and proxy.wants_messages():
        handshake.only_deflate_offered(ureq.headers)
    if call(proxy.before_forward, req, trip.res, ureq):
        trip.answered_by_hook = True
        return False
    _check_upstream_request(ureq)
    return True


def limit(proxy: Gateway, trip: Trip) -> None:
    """The request's rate limits, all taken or none (429 ``rate_limited``); only when ``rate_limits`` is user code."""
    if not proxy.overridden("rate_limits"):
        return
    limits = call(proxy.rate_limits, trip.req)
    if not limits:
        return
    if not isinstance(limits, (list, tuple)) or not all(isinstance(one, Limit) for one in limits):
        raise HookError(f"rate_limits must return a list of Limit, not {_kind(limits)}")  # never a key
    try:
        trip.req.rate_limit_headers = proxy.limiter.take(limits)  # raises RateLimited, LimitsUnavailable
    except RateLimited as refused:
        trip.trace.limited(limits, refused.limit)
        raise
    trip.trace.limited(limits)


def attempt(proxy: Gateway, trip: Trip) -> UpstreamReply:
    """The attempt loop: the reply whose head was accepted, or its error raised."""
    req = trip.req
    route = _route(proxy, req)
    policy = call(proxy.retry_policy, req)
    if not isinstance(policy, RetryPolicy):  # before any attempt: the loop would first touch it with a reply held
        raise HookError(f"retry_policy must return a RetryPolicy, not {type(policy).__name__}")
    trip.stream_wanted = call(proxy.stream_request, req)
    trip.started = time.monotonic()
    shape = _before_attempt(proxy, req) if proxy.overridden("before_attempt") else None
    trip.attempts = proxy.transport.attempts(route, trip.ureq, policy, timeouts(proxy), trip.upgrade, shape,
                                             _deadline(trip), trip.trace)
    # The check is handed to the attempts, not kept by them: its closure holds the trip, which holds them.
    attempted = trip.attempts.first(_check(proxy, trip, proxy.first_byte_timeout))
    _attempted(trip, attempted)
    if attempted.error is not None:
        raise attempted.error
    reply = attempted.reply
    trip.ures.status, trip.ures.headers = reply.status, reply.headers
    return reply


def tunnel(proxy: Gateway, trip: Trip, reply: UpstreamReply) -> Tunnelled:
    """A 101: the connection becomes a tunnel (``relay.tunnel``), which writes the client's 101 itself."""
    note(trip)
    trip.trace.status(101)
    hooks = TunnelHooks(proxy.on_ws_message if proxy.wants_messages() else None, proxy.on_tunnel_end)
    settings = TunnelSettings(proxy.tunnel_idle_timeout, proxy.max_ws_message_bytes)
    try:
        return Tunnelled(Tunnel(trip.req, reply, trip.member, trip.upgrade, own_fields(trip.req), hooks,
                                settings, trip.trace))
    except BaseException:
        reply.close()  # nobody else will: the tunnel never took the connection
        raise


def stream(proxy: Gateway, trip: Trip, reply: UpstreamReply) -> ClientReply:
    """The streaming path (``relay.stream``): the head now, then each unit as it arrives."""
    note(trip)
    hooks = StreamHooks(proxy.on_stream_chunk if proxy.overridden("on_stream_chunk") else None, proxy.on_stream_end)
    primed = trip.primed if trip.primed is not None and trip.primed.reply is reply else None
    resume = _resume(proxy, trip, reply.headers) if proxy.overridden("resume_stream") else None
    try:
        relay = StreamRelay(trip.req, reply, trip.member, hooks, stream_settings(proxy), primed, resume, trip.trace)
        status, fields = relay.head()
        trip.trace.status(status)
    except BaseException:
        reply.close()  # nobody else will: the relay never took the connection
        raise
    fields.append(("X-Accel-Buffering", "no"))
    fields += own_fields(trip.req)
    return ClientReply(status, fields, relay)


def buffer(proxy: Gateway, trip: Trip, reply: UpstreamReply) -> None:
    """The buffered path: the body read whole, up to ``max_response_body_bytes``, into ``res`` and ``ures``."""
    ures, res = trip.ures, trip.res
    if not trip.body_read:  # else judge_reply was shown it: it is in ures.body already
        ures.body = read_body(reply, proxy.max_response_body_bytes)
    res.status, res.body = reply.status, ures.body
    # Only an after_forward hook could make the two differ; without one, no copy.
    res.headers = reply.headers.copy() if proxy.overridden("after_forward") else reply.headers


def fail(trip: Trip, err: ProxyError) -> None:
    """The one error exit: the error is logged, seen by ``after_forward`` in ``ures.error``, and becomes ``res``."""
    where = describe(trip.req)  # set by receive before anything can fail
    raised = err.__cause__ if isinstance(err, HookError) else None  # a hook raised: its traceback too
    # The client's message names no address, OS error or hook's text: the log line has them.
    log.log(logging.ERROR if raised else logging.WARNING, "%s -> %d %s: %s%s", where, err.status, err.type,
            err.message, _detail(err, trip.ures), exc_info=raised)
    trip.ures.error = err
    trip.close_after = trip.close_after or isinstance(err, (PayloadTooLarge, BadRequest))
    error = Response.from_error(err)
    trip.res.status, trip.res.headers, trip.res.body = error.status, error.headers, error.body


def answer(proxy: Gateway, trip: Trip) -> ClientReply:
    """Every request not streamed or tunnelled ends here: ``after_forward`` exactly once, then ``res`` goes out."""
    req, res, ures = trip.req, trip.res, trip.ures
    note(trip)
    try:
        call(proxy.after_forward, req, ures, res)
        fields = _client_fields(req, res, checked=trip.answered_by_hook or proxy.overridden("after_forward"))
    except ProxyError as err:  # after_forward's own answer, a hook_error, or a header it set that cannot go out
        fail(trip, err)
        fields = _client_fields(req, res, checked=False)
    body: Iterable[bytes] = [res.body]
    if trip.close_after:
        body = close_connection_after(body, trip.environ)
    _count(trip, res.status, ures.error)
    trip.trace.answered(res.status, ures.error.type if ures.error else None)  # after after_forward: its attributes
    return ClientReply(res.status, fields, body)


def note(trip: Trip) -> None:
    """What gunicorn's access log reads of this request, written into the environ once, when its reply head is ready."""
    environ, ures = trip.environ, trip.ures
    environ[ENV_REQUEST_ID] = trip.req.request_id
    if trip.started:
        environ[ENV_RETRIES] = ures.attempts - 1
        environ[ENV_UPSTREAM_TIME] = f"{time.monotonic() - trip.started:.6f}"
    if trip.member is not None:
        environ[ENV_UPSTREAM] = trip.member.name
    if ures.status:
        environ[ENV_UPSTREAM_STATUS] = ures.status


def own_fields(req: Request) -> list[tuple[str, str]]:
    """forkproxy's own fields on every reply to ``req``: its request id, and the RateLimit fields once limited."""
    return [(REQUEST_ID_HEADER, req.request_id), *req.rate_limit_headers]


def status_line(status: int) -> str:
    return f"{status} {_REASONS.get(status, 'Unknown')}"


# -- the steps' parts ------------------------------------------------------------

def _upstream_request(proxy: Gateway, req: Request) -> UpstreamRequest:
    """The request as the upstream will get it, before the hooks: forwarding headers set, the path rewritten."""
    host = header_rules.get(req.headers, "host") or req.environ.get("SERVER_NAME", "")
    forwarded = header_rules.upstream_request_headers(
        req.headers,
        client_addr=req.remote_addr,
        proto=req.scheme,
        host=host,
        peer_trusted=req.remote_addr in proxy.trusted(),
    )
    forwarded[REQUEST_ID_HEADER] = req.request_id
    return UpstreamRequest(req.method, call(proxy.rewrite_path, req.raw_path), forwarded, req.body)


def _before_attempt(proxy: Gateway, req: Request) -> Shape:
    """Each attempt's own request: a fresh copy of what ``before_forward`` left, shaped by ``before_attempt``
    for its member, and checked as ``before_forward``'s is (nothing unchecked reaches an upstream)."""
    hook = proxy.before_attempt

    def shape(ureq: UpstreamRequest, member: Upstream) -> UpstreamRequest:
        own = UpstreamRequest(ureq.method, ureq.path, ureq.headers.copy(), ureq.body)
        call(hook, req, own, member)
        _check_upstream_request(own)
        return own
    return shape


def _check(proxy: Gateway, trip: Trip, wait: float, like: urllib3.HTTPHeaderDict | None = None) -> Check | None:
    """Each reply head's check before it is accepted; None when there is nothing to check.

    A reply that will stream has its first units read within ``wait``
    (``first_byte_timeout``, and every resumed attempt): no unit in time is
    a failed attempt. ``like``, for a resumed attempt, is the head the
    client has: a reply of another kind of body (events or not, another
    Content-Encoding), or one that ends before a unit, fails the attempt
    too. ``judge_reply``, when set, then gives its verdict,
    shown in ``ures`` with the first unit in ``ures.body``, or the body
    of a 4xx/5xx read whole (up to ``max_response_body_bytes``); a verdict
    that is not one of ``VERDICTS`` is a ``hook_error``.
    """
    judging = proxy.overridden("judge_reply")
    if not judging and not wait:
        return None
    hook, req, ures = proxy.judge_reply, trip.req, trip.ures
    resuming = like is not None

    def check(reply: UpstreamReply, member: Upstream, attempts: int) -> str | None:
        ures.status, ures.headers, ures.attempts = reply.status, reply.headers, attempts
        ures.upstream, ures.upstream_name = member.base.origin, member.name
        trip.body_read = judging and reply.status >= 400 and not resuming
        if judging and reply.status >= 400:
            ures.body = read_body(reply, proxy.max_response_body_bytes)
        elif wait and (resuming or _streams(proxy, trip, reply)):
            if resuming and not _same_kind(like, reply.headers):
                raise NoFirstUnit(BadUpstreamResponse("the resumed reply's body is not of the kind being relayed"),
                                  ValueError(f"Content-Type {header_rules.get(reply.headers, 'content-type')!r}"))
            deadline = trip.attempts.deadline
            within = wait if deadline is None else deadline.within(wait)
            trip.primed = prime(reply, member, stream_settings(proxy), within)
            if resuming and not trip.primed.units and reply.status < 300:
                raise NoFirstUnit(BadUpstreamResponse("the resumed reply ended before its first unit"), EOFError())
            ures.body = trip.primed.units[0] if trip.primed.units else b""  # the first unit, not its read's others
        else:
            ures.body = b""
        if not judging:
            return None
        verdict = call(hook, req, ures)
        if verdict not in VERDICTS:
            raise HookError(f"judge_reply must return 'accept', 'retry', 'fail_over' or None, not {_kind(verdict)}",
                            f"it returned {verdict!r:.100}")
        return verdict
    return check


def _resume(proxy: Gateway, trip: Trip, like: urllib3.HTTPHeaderDict) -> Resume:
    """What a stream that failed after its head went out calls: ``resume_stream`` asked for each next live member,
    on a copy of the request ``before_forward`` left, while the request's attempts and deadline allow; the reply
    it goes on with, its first units read (within ``first_byte_timeout``, else ``stream_idle_timeout``), of the
    kind of body ``like`` (the head the client has) announced. Each resumed attempt waits for its head no longer
    than for a first unit either: the client is waiting mid-answer."""
    hook, req, attempts = proxy.resume_stream, trip.req, trip.attempts
    wait = proxy.first_byte_timeout or proxy.stream_idle_timeout or proxy.timeout
    check = _check(proxy, trip, wait, like)
    timeout = _timeouts(proxy.connect_timeout, min(wait, proxy.timeout))

    def resume(stats: Any) -> Primed | None:
        def ask(member: Upstream) -> UpstreamRequest | None:
            ureq = trip.ureq
            own = UpstreamRequest(ureq.method, ureq.path, ureq.headers.copy(), ureq.body)
            if not call(hook, req, own, stats, member):
                return None
            _check_upstream_request(own)
            return own
        trip.primed = None
        if attempts.resume(ask, check, timeout) is None:
            return None
        trip.member, trip.ures.attempts = trip.primed.member, attempts.made()
        note(trip)  # the access log names the member relayed last, and the attempts made
        return trip.primed
    return resume


def _same_kind(sent: urllib3.HTTPHeaderDict, resumed: urllib3.HTTPHeaderDict) -> bool:
    """Whether a resumed reply's body can follow the one the client has: events after events (decoded for
    the client), or other bytes with the same Content-Encoding."""
    if is_event_stream(sent):
        return is_event_stream(resumed)
    return not is_event_stream(resumed) and (header_rules.get(sent, "content-encoding", "")
                                             == header_rules.get(resumed, "content-encoding", ""))


def stream_settings(proxy: Gateway) -> StreamSettings:
    return StreamSettings(proxy.stream_idle_timeout, proxy.max_event_bytes, proxy.sse_heartbeat_secs,
                          proxy.sse_error_event)


def _deadline(trip: Trip) -> Deadline | None:
    """The request's deadline, as a hook may have set ``req.deadline`` (0: none)."""
    seconds = trip.req.deadline
    if not seconds:
        return None
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not 0 < seconds < float("inf"):
        raise HookError(f"req.deadline must be a number of seconds (0 for none), not {_kind(seconds)}",
                        f"it is {seconds!r:.100}")
    return Deadline(trip.received + seconds, float(seconds))


def _check_upstream_request(ureq: UpstreamRequest) -> None:
    """What a hook may have set must not let one request smuggle another (or break the framing)."""
    if not isinstance(ureq.method, str) or not header_rules.TOKEN_RE.fullmatch(ureq.method):
        raise HookError("upstream method is not an HTTP token", f"it is {ureq.method!r:.100}")
    if not isinstance(ureq.path, str) or not ureq.path.startswith("/"):
        raise HookError("upstream path must start with '/'", f"it is {ureq.path!r:.100}")
    if header_rules.unfit_for_target(ureq.path):
        raise HookError("upstream path holds a space, a control or a non-latin-1 character",
                        f"it is {ureq.path!r:.100}")
    if not isinstance(ureq.headers, urllib3.HTTPHeaderDict):
        raise HookError(f"ureq.headers must be an HTTPHeaderDict, not {_kind(ureq.headers)}")
    bad = header_rules.first_forbidden(header_rules.lines(ureq.headers))
    if bad is not None:
        raise HookError(f"upstream request header {bad!r}: {header_rules.FORBIDDEN_WHY}")


def _route(proxy: Gateway, req: Request) -> FixedRoute | PoolRoute:
    """The way this request takes: to the one base URL ``pick_upstream`` gave, or through its pool."""
    picked = call(proxy.pick_upstream, req)
    if isinstance(picked, UpstreamPool):
        return picked.route()
    try:
        return fixed_route(picked)
    except (ValueError, TypeError) as exc:
        raise HookError("pick_upstream gave an unusable upstream", str(exc)) from None  # the URL may hold credentials


def _attempted(trip: Trip, attempted: Attempted) -> None:
    """What hooks and metrics see of the attempts: how many, the member tried last."""
    ures, member = trip.ures, attempted.member
    ures.attempts = attempted.retries + 1
    trip.req.ivars["proxy_retry_count"] = attempted.retries
    if member is None:  # a pool with every member down: nothing was contacted
        return
    trip.member, ures.upstream, ures.upstream_name = member, member.base.origin, member.name
    counters = metrics()
    if counters.enabled:
        counters.upstream_done(member.name, time.monotonic() - trip.started, attempted.retries)


def _streams(proxy: Gateway, trip: Trip, reply: UpstreamReply) -> bool:
    """Whether the reply goes down the streaming path: the hook asks for it, or the upstream sends events."""
    req = trip.req
    if req.method == "HEAD" or reply.status < 200 or reply.status in (204, 304):
        return False  # no body to stream
    return trip.stream_wanted or is_event_stream(reply.headers)


def _client_fields(req: Request, res: Response, *, checked: bool) -> list[tuple[str, str]]:
    """The head of ``res`` for the client; Content-Length is the body's, except where no body is
    sent (HEAD, 204, 304) and the upstream's stands.

    ``checked``: the status and headers a hook may have set are checked; the
    upstream's own passed ``wire.read_head``, which refuses the same.
    """
    if checked:
        _check_response(res)
    keep_length = req.method == "HEAD" or res.status in (204, 304)
    fields = header_rules.client_response_headers(res.headers, keep_content_length=keep_length,
                                                  drop=(REQUEST_ID_HEADER.lower(),))
    if not keep_length:
        fields.append(("Content-Length", str(len(res.body))))
    fields += own_fields(req)
    return fields


def _check_response(res: Response) -> None:
    """What a hook may have set of ``res``, else a hook_error naming the kind, never the value: a status the
    server can send (an int, 100 to 999), headers in an ``HTTPHeaderDict``, every line sendable."""
    status = res.status
    if type(status) is not int:
        raise HookError(f"res.status must be an int, not {_kind(status)}", f"it is {status!r:.100}")
    if not 100 <= status <= 999:
        raise HookError("res.status must be from 100 to 999", f"it is {status}")
    if not isinstance(res.headers, urllib3.HTTPHeaderDict):
        raise HookError(f"res.headers must be an HTTPHeaderDict, not {_kind(res.headers)}")
    bad = header_rules.first_forbidden(header_rules.lines(res.headers))  # every line, the dropped ones too
    if bad is not None:
        raise HookError(f"response header {bad!r}: {header_rules.FORBIDDEN_WHY}")


def _detail(err: ProxyError, ures: UpstreamResponse) -> str:
    """For the log: what the client's message leaves out.

    What the failure raised underneath, after the member tried last unless
    a hook raised it; else what forkproxy refused of a hook's (``HookError.detail``).
    """
    cause = err.__cause__
    if cause is None:
        return f" ({err.detail})" if err.detail else ""
    where = f"{ures.upstream}: " if ures.upstream and not isinstance(err, HookError) else ""
    return f" ({where}{type(cause).__name__}: {cause})"


def _kind(value: Any) -> str:
    """What a hook gave, named by its type only: its value may hold a key or an address, not for the client."""
    if isinstance(value, (list, tuple)):
        odd = next((one for one in value if not isinstance(one, Limit)), None)
        if odd is not None:
            return f"a {type(value).__name__} holding a {type(odd).__name__}"
    return "None" if value is None else f"a {type(value).__name__}"


def _internal_error(trip: Trip) -> ClientReply:
    environ = trip.environ
    log.exception("[%s] %s %s: internal error", trip.req.request_id if trip.req is not None else "-",
                  environ.get("REQUEST_METHOD"), environ.get("RAW_URI"))
    err = InternalError("internal proxy error; the proxy's log has the details")
    return ClientReply(err.status, _last_resort_fields(trip, err), [err.body()])


def _refused_by_server(trip: Trip, start_response: Callable, body: Iterable[bytes], exc: Exception) -> list[bytes]:
    environ = trip.environ
    log.error("[%s] %s %s: the server refused the reply head (%s: %s); answering 502",
              trip.req.request_id if trip.req is not None else "-", environ.get("REQUEST_METHOD"),
              environ.get("RAW_URI"), type(exc).__name__, exc)
    close = getattr(body, "close", None)
    if close is not None:
        close()
    err = BadUpstreamResponse("the reply head holds what HTTP cannot carry; the proxy's log has the details")
    start_response(status_line(err.status), _last_resort_fields(trip, err), sys.exc_info())
    return [err.body()]


def _last_resort_fields(trip: Trip, err: ProxyError) -> list[tuple[str, str]]:
    """The head of a reply made when the request's story broke off: JSON, and once the request is known,
    forkproxy's own fields, the access log's and the answered metric, so that the client's X-Request-ID
    finds the log line. Should recording raise (the trip may be what broke), the reply goes out all the same."""
    fields = _json_fields(err.body())
    if trip.req is None:  # no request id yet (the environ itself was unusable)
        trip.trace.answered(err.status, err.type)
        return fields
    try:
        note(trip)
        _count(trip, err.status, err)
        trip.trace.answered(err.status, err.type)  # nothing when answer ended it already
        return fields + own_fields(trip.req)
    except Exception:
        log.exception("[%s] recording the %d reply failed", trip.req.request_id, err.status)
        return fields


def _count(trip: Trip, status: int, error: ProxyError | None) -> None:
    """The request's reply in the answered metric, the first time only (a counter cannot be taken back)."""
    counters = metrics()
    if trip.counted or not counters.enabled:
        return
    trip.counted = True
    counters.answered(trip.environ.get("REQUEST_METHOD", "-"), status, trip.ures.upstream_name or "-",
                      error.type if error else None)


def timeouts(proxy: Gateway) -> urllib3.Timeout:
    """What each attempt waits: ``connect_timeout`` for a connect (never above ``timeout``), ``timeout`` per read."""
    return _timeouts(proxy.connect_timeout, proxy.timeout)


@functools.lru_cache(maxsize=16)
def _timeouts(connect: float, read: float) -> urllib3.Timeout:
    """One per pair of settings, not per request (urllib3 clones it per request)."""
    return urllib3.Timeout(connect=min(connect, read), read=read)


def _json_fields(body: bytes) -> list[tuple[str, str]]:
    return [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]

