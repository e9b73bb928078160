"""``Proxy``: the WSGI application, its settings and its hooks' defaults.

What happens to one request is ``forkproxy.lifecycle``'s story; this class
holds what a user subclasses: the settings (``forkproxy.config``), the hooks
(overridden, or registered with ``@proxy.hook``), and the per-process
resources a request uses (the upstream connections, the limits store).
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Iterable

from forkproxy.tracing import OFF, TracingUnavailable, for_worker
from forkproxy.config import DEFAULTS, check_settings
from forkproxy.hooks import HOOK_NAMES
from forkproxy.http import headers as header_rules
from forkproxy.lifecycle import serve
from forkproxy.limits.gcra import Limit, charge_amount
from forkproxy.limits.limiter import Limiter
from forkproxy.messages import (MessageWriter, Request, Response, StreamStats, StreamWriter, TunnelStats,
                                UpstreamRequest, UpstreamResponse, WebSocketMessage)
from forkproxy.server.trust import TrustedProxies
from forkproxy.server.worker import default_trusted
from forkproxy.upstream.attempts import Transport
from forkproxy.upstream.members import Upstream, UpstreamPool
from forkproxy.upstream.retry import RetryPolicy

log = logging.getLogger("forkproxy")


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
        self._tracer: Any = None

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

    def before_attempt(self, req: Request, ureq: UpstreamRequest, upstream: Upstream) -> None:
        """Shape one attempt's own copy of ``ureq`` for the member ``upstream`` (its key, model, path)."""

    def judge_reply(self, req: Request, ures: UpstreamResponse) -> "str | None":
        """A reply head's verdict: "accept", "retry" (same member), "fail_over" (next member) or None (the policy)."""
        return None

    def after_forward(self, req: Request, ures: UpstreamResponse, res: Response) -> None:
        """Runs once for every request that is not streamed."""

    def stream_request(self, req: Request) -> bool:
        """True sends the reply down the streaming path whatever its type."""
        return False

    def on_stream_chunk(self, chunk: bytes, out: StreamWriter, stats: StreamStats) -> None:
        out.write(chunk)

    def resume_stream(self, req: Request, ureq: UpstreamRequest, stats: StreamStats, upstream: Upstream) -> bool:
        """Whether a stream that failed after its head went out goes on at ``upstream``, with ``ureq`` as changed."""
        return False

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
        return self.overridden("on_ws_message")

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
        """One request, as ``forkproxy.lifecycle`` tells it."""
        return serve(self, environ, start_response)

    @property
    def transport(self) -> Transport:
        if self._transport is None:
            self._transport = Transport(pool_maxsize=self.pool_maxsize, ca_certs=self.ca_certs,
                                        idle_timeout=self.pool_idle_timeout)
        return self._transport

    @property
    def tracer(self) -> Any:
        """This worker's tracing (``forkproxy.tracing.OFF`` when off), made on first use, after the fork."""
        if self._tracer is None:
            try:
                self._tracer = for_worker(self.tracing)
            except TracingUnavailable as exc:  # a worker refuses to start so; elsewhere, said once
                log.error("forkproxy: %s; traces are off", exc)
                self._tracer = OFF
            except Exception:  # OpenTelemetry refusing its own settings must never fail every request
                log.exception("forkproxy: tracing could not start; traces are off")
                self._tracer = OFF
        return self._tracer

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

    def overridden(self, hook: str) -> bool:
        """Whether ``hook`` is user code: a subclass's method or one registered on this instance."""
        return hook in self.__dict__ or getattr(type(self), hook) is not getattr(Proxy, hook)
