"""``Proxy``: the WSGI application and its hooks.

One request runs top to bottom in ``_exchange``: read the request, let the
hooks shape it, send it (urllib3 retries as the policy says), then either
buffer the reply or hand it to the streaming path. Every proxy-made failure is
a ``ProxyError`` turned into the contract's JSON in one place.
"""
from __future__ import annotations

import functools
import logging
import sys
import time
from http import HTTPStatus
from typing import Any, Callable, Iterable

import urllib3

from forkproxy.http import handshake
from forkproxy.http import headers as header_rules
from forkproxy.relay.buffered import read_body
from forkproxy.config import DEFAULTS, check_settings
from forkproxy.errors import BadRequest, BadUpstreamResponse, HookError, InternalError, PayloadTooLarge, ProxyError
from forkproxy.limits.gcra import Limit, charge_amount
from forkproxy.limits.limiter import Limiter
from forkproxy.hooks import call
from forkproxy.server.inbound import REQUEST_ID_HEADER, read_request_body, request_from_environ, request_id
from forkproxy.metrics import metrics
from forkproxy.messages import (MessageWriter, Request, Response, StreamStats, StreamWriter, TunnelStats, UpstreamRequest,
                                UpstreamResponse, WebSocketMessage, describe)
from forkproxy.upstream.retry import RetryPolicy
from forkproxy.server.worker import (ENV_REQUEST_ID, ENV_RETRIES, ENV_UPSTREAM, ENV_UPSTREAM_STATUS, ENV_UPSTREAM_TIME,
                                     close_connection_after, default_trusted)
from forkproxy.relay.stream import StreamRelay, is_event_stream
from forkproxy.server.trust import TrustedProxies
from forkproxy.relay.tunnel import Tunnel, client_socket
from forkproxy.upstream.members import BaseURL, FixedRoute, PoolRoute, UpstreamPool, fixed_route
from forkproxy.upstream.attempts import Transport

log = logging.getLogger("forkproxy")

HOOK_NAMES = (
    "pick_upstream", "rewrite_path", "retry_policy", "before_forward",
    "after_forward", "stream_request", "on_stream_chunk", "on_stream_end",
    "on_ws_message", "on_tunnel_end", "rate_limits",
)

_REASONS = {s.value: s.phrase for s in HTTPStatus}


def status_line(status: int) -> str:
    return f"{status} {_REASONS.get(status, 'Unknown')}"


class Proxy:
    """A reverse proxy to one upstream, as a WSGI application.

    Customise it by overriding the hooks in a subclass, or by registering
    plain functions with ``@proxy.hook``. Settings are plain attributes.
    """

    upstream: "str | UpstreamPool | None" = None

    def __init__(self, upstream: "str | UpstreamPool | None" = None, **settings: Any) -> None:
        """Settings given as class attributes of a subclass are its defaults; keywords override them."""
        cls = type(self)
        given = {name: getattr(cls, name) for name in ("upstream", *DEFAULTS) if hasattr(cls, name)}
        given.update(settings)
        if upstream is not None:
            given["upstream"] = upstream
        checked = check_settings(given)
        for name, default in DEFAULTS.items():
            setattr(self, name, checked.get(name, default))
        self.upstream = checked["upstream"]
        self._transport: Transport | None = None
        self._limiter: Limiter | None = None

    # -- hooks -------------------------------------------------------------

    def pick_upstream(self, req: Request) -> "str | UpstreamPool":
        """Base URL for this request (scheme, host, port, optional prefix), or a pool of them."""
        return self.upstream

    def rewrite_path(self, path: str) -> str:
        """Upstream path+query for the raw path+query the client sent."""
        return path

    def retry_policy(self, req: Request) -> RetryPolicy:
        return RetryPolicy()

    def before_forward(self, req: Request, res: Response, ureq: UpstreamRequest) -> bool:
        """Shape ``ureq``; return True to answer with ``res`` instead."""
        return False

    def after_forward(self, req: Request, ures: UpstreamResponse, res: Response) -> None:
        """Runs once for every request that is not streamed."""

    def stream_request(self, req: Request) -> bool:
        """True sends the reply down the streaming path whatever its type."""
        return False

    def on_stream_chunk(self, chunk: bytes, out: StreamWriter, stats: StreamStats) -> None:
        out.write(chunk)

    def on_stream_end(self, req: Request, out: StreamWriter, stats: StreamStats) -> None:
        """Runs once per streamed response, after its last unit."""

    def rate_limits(self, req: Request) -> list[Limit]:
        """The limits this request counts against, taken together after ``before_forward``."""
        return []

    def charge(self, key: "str | bytes | Limit", amount: float) -> None:
        """Take ``amount`` from ``key``'s limits, or from the ``Limit`` given, after the fact (may go below zero)."""
        if not isinstance(key, (str, bytes, Limit)):
            raise ValueError(f"charge takes a str or bytes key or a Limit, not {type(key).__name__}")
        amount = charge_amount(amount)
        if amount:
            self.limiter.charge(key, amount)

    def on_ws_message(self, msg: WebSocketMessage, out: MessageWriter, stats: TunnelStats) -> None:
        """Each WebSocket data message of a tunnel, only when overridden (else bytes are copied untouched)."""
        out.send(msg.data)

    def on_tunnel_end(self, req: Request, stats: TunnelStats) -> None:
        """Runs once per tunnel, after it closed, whoever closed it."""

    def wants_messages(self) -> bool:
        """Whether tunnels are parsed into messages: ``on_ws_message`` is user code."""
        return self._overrides("on_ws_message")

    def hook(self, fn: Callable) -> Callable:
        """Register ``fn`` as the hook its name says, for this instance only."""
        name = getattr(fn, "__name__", "")
        if name not in HOOK_NAMES:
            raise ValueError(f"unknown hook {name!r}; valid hooks: {', '.join(HOOK_NAMES)}")
        setattr(self, name, fn)
        return fn

    @staticmethod
    def is_hop_by_hop(name: str) -> bool:
        return header_rules.is_hop_by_hop(name)

    # -- WSGI --------------------------------------------------------------

    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        try:
            req, refused = request_from_environ(environ)
            status, headers, body = self._exchange(req, refused)
        except Exception:
            log.exception("[%s] %s %s: internal error", environ.get(ENV_REQUEST_ID, "-"),
                          environ.get("REQUEST_METHOD"), environ.get("RAW_URI"))
            err = InternalError("internal proxy error; the proxy's log has the details")
            status, body = err.status, [err.body()]
            headers = _json_headers(body[0])
        if isinstance(body, Tunnel):
            body.run()
            # To gunicorn's worker: this connection is over; write nothing more on it, read nothing more.
            raise StopIteration("the tunnel took the connection")
        try:
            start_response(status_line(status), headers)
        except Exception as exc:  # a head the server refuses that no rule here foresaw: still JSON, nothing leaked
            return _refused_by_server(environ, start_response, body, exc)
        return body

    @property
    def transport(self) -> Transport:
        if self._transport is None:
            self._transport = Transport(pool_maxsize=self.pool_maxsize, ca_certs=self.ca_certs,
                                        idle_timeout=self.pool_idle_timeout)
        return self._transport

    @property
    def limiter(self) -> Limiter:
        if self._limiter is None:
            self._limiter = Limiter(self.limits_store, self.limits_timeout, self.limits_fail_open)
        return self._limiter

    def trusted(self) -> TrustedProxies:
        configured = self.trusted_proxies
        if configured is None:
            return default_trusted()
        if not isinstance(configured, TrustedProxies):
            self.trusted_proxies = configured = TrustedProxies(configured)
        return configured

    # -- one request -------------------------------------------------------

    def _exchange(self, req: Request, refused: BadRequest | None) -> tuple[int, list, Iterable[bytes]]:
        req.request_id = req.environ[ENV_REQUEST_ID] = request_id(header_rules.get(req.headers, REQUEST_ID_HEADER))
        res = Response()
        ures = UpstreamResponse()
        close = False
        try:
            if refused is not None:
                raise refused
            streamed = self._forward(req, res, ures)
            if streamed is not None:
                return streamed
        except ProxyError as err:
            close = isinstance(err, (PayloadTooLarge, BadRequest))
            self._fail(req, res, ures, err)
        try:
            call(self.after_forward, req, ures, res)
            reply_headers = self._client_headers(req, res, hook_made=res.headers is not ures.headers)
        except ProxyError as err:  # after_forward's own answer, a hook_error, or a header it set that cannot go out
            self._fail(req, res, ures, err)
            reply_headers = self._client_headers(req, res, hook_made=False)
        body: Iterable[bytes] = [res.body]
        if close:
            body = close_connection_after(body, req.environ)
        counters = metrics()
        if counters.enabled:
            counters.answered(req.method, res.status, ures.upstream or "-",
                              ures.error.type if ures.error else None)
        return res.status, reply_headers, body

    def _fail(self, req: Request, res: Response, ures: UpstreamResponse, err: ProxyError) -> None:
        if isinstance(err, HookError) and err.__cause__ is not None:
            log.error("%s: %s", describe(req), err.message, exc_info=err.__cause__)
        else:  # the client's message names no address or OS error: the log line has them
            log.warning("%s -> %d %s: %s%s", describe(req), err.status, err.type, err.message, _detail(err, ures))
        ures.error = err
        error = Response.from_error(err)
        res.status, res.headers, res.body = error.status, error.headers, error.body

    def _forward(self, req: Request, res: Response, ures: UpstreamResponse):
        """Fill ``res`` and ``ures``; return a streamed reply when there is one."""
        upgrade = self._upgrade_asked(req)
        req.body = read_request_body(req.environ, self.max_request_body_bytes, self.timeout)
        ureq = self._upstream_request(req)
        if upgrade is not None and self.wants_messages():
            handshake.only_deflate_offered(ureq.headers)
        if call(self.before_forward, req, res, ureq):
            return None
        _check_upstream_request(ureq)
        if self._overrides("rate_limits"):
            self._take_limits(req)
        route = self._route(req)
        policy = call(self.retry_policy, req)
        retries = policy.to_urllib3()
        stream_wanted = call(self.stream_request, req)
        started = time.monotonic()
        try:
            resp = self.transport.send(route, ureq, retries=retries, timeout=self._timeout(), upgrade=upgrade)
        finally:
            _note_upstream(req, ures, route.base, retries.count.retries, started)
        upstream = route.base
        ures.status, ures.headers = resp.status, resp.headers
        req.environ[ENV_UPSTREAM_STATUS] = resp.status
        if resp.status == 101:
            try:
                return 101, [], Tunnel(self, req, resp, upstream, upgrade)
            except BaseException:
                resp.close()
                raise
        if (stream_wanted or is_event_stream(resp.headers)) and _may_have_body(req.method, resp.status):
            try:
                return StreamRelay(self, req, resp, upstream).reply()
            except BaseException:
                resp.close()  # nobody else will: the relay never took the connection
                raise
        ures.body = read_body(resp, self.max_response_body_bytes, upstream)
        req.environ[ENV_UPSTREAM_TIME] = f"{time.monotonic() - started:.6f}"  # buffered: head and body
        res.status, res.body = resp.status, ures.body
        # Only an after_forward hook could make the two differ; without one, no copy.
        res.headers = resp.headers.copy() if self._overrides("after_forward") else resp.headers
        return None

    def _take_limits(self, req: Request) -> None:
        limits = call(self.rate_limits, req)
        if not limits:
            return
        if not isinstance(limits, (list, tuple)) or not all(isinstance(limit, Limit) for limit in limits):
            raise HookError(f"rate_limits must return a list of Limit, not {limits!r:.100}")
        req.rate_limit_headers = self.limiter.take(limits)  # raises RateLimited, LimitsUnavailable

    def _upgrade_asked(self, req: Request) -> str | None:
        """The protocols a tunnel request asks for (as sent), None for an ordinary request; 501 if not allowed."""
        if not header_rules.wants_upgrade(req.headers):
            return None
        asked = handshake.requested_upgrade(req.headers, self.allowed_upgrades)
        client_socket(req.environ)
        return asked

    def _overrides(self, hook: str) -> bool:
        """Whether ``hook`` is user code: a subclass's method or one registered on this instance."""
        return hook in self.__dict__ or getattr(type(self), hook) is not getattr(Proxy, hook)

    def _upstream_request(self, req: Request) -> UpstreamRequest:
        environ = req.environ
        host = header_rules.get(req.headers, "host") or environ.get("SERVER_NAME", "")
        forwarded = header_rules.upstream_request_headers(
            req.headers,
            client_addr=req.remote_addr,
            proto=req.scheme,
            host=host,
            peer_trusted=req.remote_addr in self.trusted(),
        )
        forwarded[REQUEST_ID_HEADER] = req.request_id
        return UpstreamRequest(req.method, call(self.rewrite_path, req.raw_path), forwarded, req.body)

    def _route(self, req: Request) -> FixedRoute | PoolRoute:
        """The way this request takes: to the one base URL ``pick_upstream`` gave, or through its pool."""
        picked = call(self.pick_upstream, req)
        if isinstance(picked, UpstreamPool):
            return picked.route()
        try:
            return fixed_route(picked)
        except (ValueError, TypeError) as exc:
            raise HookError(f"pick_upstream gave an unusable upstream: {exc}") from None

    def _timeout(self) -> urllib3.Timeout:
        return _urllib3_timeout(self.connect_timeout, self.timeout)

    def _client_headers(self, req: Request, res: Response, *, hook_made: bool) -> list[tuple[str, str]]:
        """WSGI headers for ``res``; Content-Length is the body's, except
        where no body is sent (HEAD, 204, 304) and the upstream's stands.

        Headers a hook may have set are checked; the upstream's own passed
        wire.read_head, which refuses the same characters.
        """
        keep_length = req.method == "HEAD" or res.status in (204, 304)
        pairs = header_rules.client_response_headers(res.headers, keep_content_length=keep_length,
                                                     drop=(REQUEST_ID_HEADER.lower(),))
        bad = header_rules.first_forbidden(pairs) if hook_made else None
        if bad is not None:
            raise HookError(f"response header {bad!r}: {header_rules.FORBIDDEN_WHY}")
        if not keep_length:
            pairs.append(("Content-Length", str(len(res.body))))
        pairs.append((REQUEST_ID_HEADER, req.request_id))
        pairs += req.rate_limit_headers
        return pairs


def _detail(err: ProxyError, ures: UpstreamResponse) -> str:
    """For the log: the member tried last and what the failure raised underneath, when there is one."""
    cause = err.__cause__
    if cause is None:
        return ""
    where = f"{ures.upstream}: " if ures.upstream else ""
    return f" ({where}{type(cause).__name__}: {cause})"


def _json_headers(body: bytes) -> list[tuple[str, str]]:
    return [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]


def _refused_by_server(environ: dict, start_response: Callable, body: Iterable[bytes],
                       exc: Exception) -> list[bytes]:
    log.error("[%s] %s %s: the server refused the reply head (%s: %s); answering 502",
              environ.get(ENV_REQUEST_ID, "-"), environ.get("REQUEST_METHOD"), environ.get("RAW_URI"),
              type(exc).__name__, exc)
    close = getattr(body, "close", None)
    if close is not None:
        close()
    err = BadUpstreamResponse("the reply head holds what HTTP cannot carry; the proxy's log has the details")
    start_response(status_line(err.status), _json_headers(err.body()), sys.exc_info())
    return [err.body()]


@functools.lru_cache(maxsize=16)
def _urllib3_timeout(connect: float, read: float) -> urllib3.Timeout:
    """One per pair of settings, not per request (urllib3 clones it per request)."""
    return urllib3.Timeout(connect=min(connect, read), read=read)


def _check_upstream_request(ureq: UpstreamRequest) -> None:
    """What a hook may have set must not let one request smuggle another (or break the framing)."""
    if not isinstance(ureq.method, str) or not header_rules.TOKEN_RE.fullmatch(ureq.method):
        raise HookError(f"upstream method is not an HTTP token: {ureq.method!r}")
    if not isinstance(ureq.path, str) or not ureq.path.startswith("/"):
        raise HookError(f"upstream path must start with '/': {ureq.path!r}")
    if header_rules.unfit_for_target(ureq.path):
        raise HookError(f"upstream path holds a space, a control or a non-latin-1 character: {ureq.path!r}")
    bad = header_rules.first_forbidden(header_rules.lines(ureq.headers))
    if bad is not None:
        raise HookError(f"upstream request header {bad!r}: {header_rules.FORBIDDEN_WHY}")


def _may_have_body(method: str, status: int) -> bool:
    return method != "HEAD" and status >= 200 and status not in (204, 304)


def _note_upstream(req: Request, ures: UpstreamResponse, upstream: BaseURL | None, retries: int,
                   started: float) -> None:
    """What hooks, the access log and metrics see of the attempts: how many, how long, the member tried last."""
    elapsed = time.monotonic() - started
    ures.attempts = retries + 1
    req.ivars["proxy_retry_count"] = retries
    req.environ[ENV_RETRIES] = retries
    req.environ[ENV_UPSTREAM_TIME] = f"{elapsed:.6f}"
    if upstream is None:  # a pool with every member down: nothing was contacted
        return
    ures.upstream = upstream.origin
    req.environ[ENV_UPSTREAM] = upstream.host_port
    counters = metrics()
    if counters.enabled:
        counters.upstream_done(upstream.origin, elapsed, retries)
