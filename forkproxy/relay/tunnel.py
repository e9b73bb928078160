"""Tunnels: after an upstream's 101, the client's connection and the upstream's joined both ways.

Taking the client connection from gunicorn (``forkproxy.server.takeover``,
where the gunicorn internals this needs are kept): a tunnel writes the 101
head itself, sends first the bytes the client sent behind its request that
gunicorn already read, relays until both sides are done, and then the
caller has gunicorn close the connection (``takeover.give_back``).

Copying. One greenlet per direction (the request's own carries client to
upstream): each is a plain read-then-write loop, so a slow reader holds
back its writer and nothing queues in the proxy. A side's end of file is
passed on as a shutdown of the other side's write half (half-close, as Go's
ReverseProxy and Caddy do; a TLS connection cannot be half-closed in
Python's ssl, so there the tunnel ends). The tunnel is over when both
directions are done, on a reset, a proxy-made close, or ``tunnel_idle_timeout``
with no byte either way; cutting it shuts both sockets, which wakes whichever
loop is still waiting. How it ended is one ``TunnelEnd``, decided where the
cause is seen (the first cut wins; without one, the side that closed first),
and ``Tunnel.finish`` does what every end needs, in one place.

Without ``on_ws_message`` bytes are copied as read. With it, ``wsmessages``
turns each read into messages and back.
"""
from __future__ import annotations

import logging
import socket
import time
from email.utils import formatdate
from http.client import HTTPException
from typing import Any, Callable, NamedTuple

import gevent
from gevent.lock import Semaphore

from forkproxy.errors import BadUpstreamResponse
from forkproxy.hooks import call_after_head, log_failure
from forkproxy.http import handshake
from forkproxy.messages import Request, TunnelStats, describe
from forkproxy.metrics import metrics
from forkproxy.relay.wsmessages import MessageHook, MessageRelay
from forkproxy.server import shutdown, takeover
from forkproxy.server.worker import ENV_BYTES_IN, log_access
from forkproxy.tracing import NO_TRACE
from forkproxy.upstream.members import Upstream
from forkproxy.upstream.reply import UpstreamReply

log = logging.getLogger("forkproxy")

_READ = 64 * 1024
_DEFLATE_READ = 4 * 1024  # compressed input per step: a deflated message expands at most ~1000-fold per read


class TunnelHooks(NamedTuple):
    """The hooks a tunnel calls, handed to it: ``on_ws_message`` (None unless it is user code), ``on_tunnel_end``."""

    on_message: MessageHook | None
    on_end: Callable[[Request, TunnelStats], None]


class TunnelSettings(NamedTuple):
    idle_timeout: float  # ``tunnel_idle_timeout``: the tunnel ends after that long with no byte either way
    max_message_bytes: int  # ``max_ws_message_bytes``: the largest message a message hook is handed


class TunnelEnd(NamedTuple):
    """How a tunnel ended: who ended it (``TunnelStats.closed_by``), whether by a failure, and why (for the log)."""

    closed_by: str  # "client", "upstream", "idle" or "proxy"
    errored: bool
    detail: str


_IDLE = TunnelEnd("idle", False, "no byte either way for tunnel_idle_timeout")
_WORKER_STOPPING = TunnelEnd("proxy", True, "worker stopping")


class _Side:
    """One side of the tunnel: its socket, the bytes read ahead of the tunnel, a write lock when two may write."""

    __slots__ = ("name", "sock", "held", "lock", "tls")

    def __init__(self, name: str, sock: Any, held: bytes, locked: bool) -> None:
        self.name = name
        self.sock = sock
        self.held = held
        self.lock = Semaphore() if locked else None
        self.tls = hasattr(sock, "getpeercert")  # the stdlib's SSLSocket or gevent's, patched in or not

    def write(self, data: bytes) -> None:
        if self.lock is None:
            self.sock.sendall(data)
        else:
            with self.lock:
                self.sock.sendall(data)

    def shut(self, how: int) -> None:
        try:
            self.sock.shutdown(how)
        except (OSError, ValueError):  # already shut, reset, or a TLS socket already unwrapped
            pass


class Tunnel:
    """One tunnel: made once the upstream answered 101, run in the request's greenlet."""

    def __init__(self, req: Request, reply: UpstreamReply, member: Upstream, upgrade: str,
                 own_fields: list[tuple[str, str]], hooks: TunnelHooks, settings: TunnelSettings,
                 trace: Any = NO_TRACE) -> None:
        """``own_fields``: forkproxy's own fields for the client's 101 (its request id, RateLimit fields);
        ``trace``: the request's trace, told of the end."""
        self.req = req
        self.trace = trace
        self.reply = reply
        self.member = member
        self.own_fields = own_fields
        self.hooks = hooks
        self.stats = TunnelStats(req)
        self.idle_timeout = settings.idle_timeout
        self.relay: MessageRelay | None = None
        self.read_size = _READ
        if hooks.on_message is not None and handshake.check_switch(upgrade, reply.headers) == handshake.WEBSOCKET:
            try:
                deflate = handshake.accepted_deflate(reply.headers)
            except HTTPException as exc:
                raise BadUpstreamResponse(str(exc)) from None
            self.relay = MessageRelay(hooks.on_message, self.stats, settings.max_message_bytes, deflate)
            self.read_size = _DEFLATE_READ if deflate else _READ
        self.greenlet: gevent.Greenlet | None = None
        self.end: TunnelEnd | None = None  # the first cut; once over, how it ended
        # Taken last: once gunicorn's read-ahead is taken, the tunnel owns the client connection.
        self._client = _Side("client", takeover.client_socket(req.environ), takeover.held_bytes(req.environ),
                             locked=self.relay is not None)  # with messages, a close may come from either way
        self._upstream: _Side | None = None
        self._first_closer = ""  # the side whose end of file came first
        self._started = self._last = 0.0

    # -- run -----------------------------------------------------------------

    def run(self) -> None:
        """Answer the client's upgrade and relay until the tunnel is over; never raises but to stop the worker."""
        try:
            up_sock, up_held = self.reply.take_socket()
            reset = None
        except OSError as exc:  # reset right behind its 101: the client still gets the 101, then the end
            up_sock, up_held, reset = self.reply.socket(), b"", exc
        self._upstream = _Side("upstream", up_sock, up_held, locked=self.relay is not None)
        self._open()
        other = None
        try:
            for side in (self._client, self._upstream):
                side.sock.settimeout(self.idle_timeout)
            self._write(self._client, self._head())
            if reset is not None:
                self._cut(TunnelEnd("upstream", True, f"reset right behind its 101: {reset}"))
            if self.end is None:
                other = gevent.spawn(self._copy, self._upstream, self._client)
                self._copy(self._client, self._upstream)
                other.join()
        finally:
            if other is not None and not other.dead:
                other.kill(block=False)  # the request's greenlet was killed: its partner goes too
            self.finish(self.end or self._uncut_end())

    def stop(self) -> None:
        """Called by ``shutdown.stop_all``: the worker is stopping; end the tunnel now."""
        self._cut(_WORKER_STOPPING)

    def _open(self) -> None:
        self.greenlet = gevent.getcurrent()
        self._started = self._last = time.monotonic()
        shutdown.opened(self)
        counters = metrics()
        if counters.enabled:
            counters.active_tunnels.inc()

    def _head(self) -> bytes:
        """The client's 101, with what the server adds to every reply (Date) and forkproxy's own fields."""
        own = (("Date", formatdate(usegmt=True)), *self.own_fields)
        return handshake.client_head(self.reply.reason, self.reply.headers, own)

    # -- one direction -------------------------------------------------------

    def _copy(self, src: _Side, dst: _Side) -> None:
        data, src.held = src.held, b""
        while True:
            if data:
                self._last = time.monotonic()
                self._carry(src, dst, data)
            if self.end is not None:
                return
            data = self._read(src)
            if data is None:
                return
            if not data:
                self._passed_end(src, dst)
                return

    def _read(self, src: _Side) -> bytes | None:
        """One read; b"" at the side's end of file; None when the tunnel was cut (idle, reset, or from elsewhere)."""
        sock, shortened = src.sock, False
        while True:
            try:
                data = sock.recv(self.read_size)
            except socket.timeout:
                left = self._last + self.idle_timeout - time.monotonic()
                if left <= 0 or self.end is not None:
                    self._cut(_IDLE)
                    return None
                sock.settimeout(left)  # another read was active meanwhile: wait out the rest
                shortened = True
                continue
            except (OSError, ValueError) as exc:
                self._cut(_failed(src, exc))
                return None
            if shortened:
                sock.settimeout(self.idle_timeout)
            return None if self.end is not None and not data else data

    def _carry(self, src: _Side, dst: _Side, data: bytes) -> None:
        from_client = src is self._client
        stats = self.stats
        if from_client:
            stats.bytes_from_client += len(data)
        else:
            stats.bytes_from_upstream += len(data)
        relay = self.relay
        if relay is None:
            self._write(dst, data)
            return
        back, onward = relay.receive(from_client, data)
        if onward:
            self._write(dst, onward)
        if back:
            self._write(src, back)
        if relay.close_code is not None:
            self._proxy_closed(relay)

    def _write(self, dst: _Side, data: bytes) -> None:
        try:
            dst.write(data)
        except socket.timeout:
            self._cut(_IDLE)  # the reader took nothing for tunnel_idle_timeout
        except (OSError, ValueError) as exc:
            self._cut(_failed(dst, exc))

    def _passed_end(self, src: _Side, dst: _Side) -> None:
        """``src`` closed its write half: so does forkproxy towards ``dst`` (or the tunnel ends, for TLS)."""
        if self.end is not None:
            return
        self._first_closer = self._first_closer or src.name
        if src.tls or dst.tls:
            self._cut(TunnelEnd(src.name, False, "end of file over TLS, which cannot be half-closed"))
            return
        dst.shut(socket.SHUT_WR)

    def _proxy_closed(self, relay: MessageRelay) -> None:
        """The message relay closed both sides itself: a message over the cap, a bad frame, or the hook failed."""
        if relay.hook_failure is not None:
            log_failure(self.hooks.on_message, describe(self.req), relay.hook_failure)
        self._cut(TunnelEnd("proxy", True, f"closed with {relay.close_code}: {relay.close_reason}"))

    def _cut(self, end: TunnelEnd) -> None:
        """End the tunnel now, for the first cause only: both sockets are shut, which wakes a loop still waiting."""
        if self.end is not None:
            return
        self.end = end
        for side in (self._client, self._upstream):
            if side is not None:
                side.shut(socket.SHUT_RDWR)

    def _uncut_end(self) -> TunnelEnd:
        """How a tunnel nothing cut ended: by the side that closed first (its close frame, else its end of file)."""
        first = (self.relay.closed_first if self.relay is not None else "") or self._first_closer
        if first:
            return TunnelEnd(first, False, "each side closed its own way")
        return TunnelEnd("proxy", False, "the relay was stopped before either side closed")

    # -- the end -------------------------------------------------------------

    def finish(self, end: TunnelEnd) -> None:
        """The tunnel is over: the once-only work of every end, from how it ended."""
        self.end = end
        shutdown.closed(self)
        self.reply.close()  # the upstream connection is never reused; its pool slot is free again
        self._client.shut(socket.SHUT_RDWR)  # gunicorn closes the socket itself
        req, stats = self.req, self.stats
        stats.closed_by = end.closed_by
        stats.errored = stats.errored or end.errored
        # A peer's end is routine; the proxy's own cut says why.
        level = logging.WARNING if end.closed_by == "proxy" and end.errored else logging.DEBUG
        if log.isEnabledFor(level):
            log.log(level, "%s: tunnel ended by %s%s: %s", describe(req), end.closed_by,
                    " (errored)" if end.errored else "", end.detail)
        counters = metrics()
        if counters.enabled:
            counters.active_tunnels.dec()
            counters.tunnel_ended(stats.bytes_from_client, stats.bytes_from_upstream)
            counters.answered(req.method, 101, self.member.name, "tunnel_cut" if stats.errored else None)
        call_after_head(self.hooks.on_end, describe(req), req, stats)
        self.trace.tunnel_ended(stats)  # after on_end: its attributes
        environ = req.environ
        environ[ENV_BYTES_IN] = stats.bytes_from_client
        log_access(environ, f"101 {self.reply.reason or 'Switching Protocols'}", stats.bytes_from_upstream,
                   req.headers, time.monotonic() - self._started)


def _failed(side: _Side, exc: BaseException) -> TunnelEnd:
    """A read or write on ``side`` failed (reset, broken pipe, a TLS error): that side ended the tunnel."""
    return TunnelEnd(side.name, True, f"{type(exc).__name__}: {exc}")
