"""Tunnels: after an upstream's 101, the client's connection and the upstream's joined both ways.

Taking the client connection from gunicorn. The gevent worker owns the
client socket (``environ["gunicorn.socket"]``) and, after a reply, writes
its end (a final chunk) and reads the next request from it. A tunnel writes
the 101 head itself, relays until both sides are done, and then raises
``StopIteration`` out of the WSGI call: gunicorn's worker takes that as
"close this connection" (``base_async.handle``): it writes nothing more,
reads no next request, and closes the socket (the signal flask-sock uses
too). Bytes the client sent right behind its request head may already sit
in gunicorn's reader; they are taken from it (``wsgi.input.reader.unreader
.take_buffered()``, gunicorn 27's own way to hand such bytes on) and sent
first. Those two are the gunicorn internals a tunnel relies on.

Copying. One greenlet per direction (the request's own carries client to
upstream): each is a plain read-then-write loop, so a slow reader holds
back its writer and nothing queues in the proxy. A side's end of file is
passed on as a shutdown of the other side's write half (half-close, as Go's
ReverseProxy and Caddy do; a TLS connection cannot be half-closed in
Python's ssl, so there the tunnel ends). The tunnel is over when both
directions are done, on a reset, a proxy-made close, or ``tunnel_idle_timeout``
with no byte either way; ending it shuts both sockets, which wakes whichever
loop is still waiting.

Without ``on_ws_message`` bytes are copied as read. With it, ``wsrelay``
turns each read into messages and back.
"""
from __future__ import annotations

import logging
import socket
import time
from email.utils import formatdate
from http.client import HTTPException
from typing import TYPE_CHECKING, Any

import gevent
from gevent.lock import Semaphore

from forkproxy.http import handshake
from forkproxy import hooks
from forkproxy.server import shutdown
from forkproxy.errors import BadUpstreamResponse, UpgradeNotSupported
from forkproxy.server.inbound import REQUEST_ID_HEADER
from forkproxy.messages import Request, TunnelStats, describe
from forkproxy.metrics import metrics
from forkproxy.server.worker import ENV_BYTES_IN, log_access
from forkproxy.upstream.members import BaseURL
from forkproxy.upstream.reply import UpstreamReply
from forkproxy.relay.wsmessages import MessageRelay

if TYPE_CHECKING:
    from forkproxy.proxy import Proxy

log = logging.getLogger("forkproxy")

_READ = 64 * 1024
_DEFLATE_READ = 4 * 1024  # compressed input per step: a deflated message expands at most ~1000-fold per read


def client_socket(environ: dict) -> Any:
    """The client's socket, when the server lets a tunnel take it; UpgradeNotSupported otherwise."""
    sock = environ.get("gunicorn.socket")
    if sock is None or environ.get("SERVER_PROTOCOL") != "HTTP/1.1":
        raise UpgradeNotSupported("a tunnel needs an HTTP/1.1 client connection served by gunicorn")
    return sock


def _held_by_server(environ: dict) -> bytes:
    """Bytes gunicorn's reader already took from the socket past the request (pipelined tunnel bytes)."""
    unreader = getattr(getattr(environ.get("wsgi.input"), "reader", None), "unreader", None)
    take = getattr(unreader, "take_buffered", None)
    return take() if take is not None else b""


class _End:
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

    def __init__(self, proxy: "Proxy", req: Request, reply: UpstreamReply, upstream: BaseURL, asked: str) -> None:
        self.proxy = proxy
        self.req = req
        self.reply = reply
        self.upstream = upstream
        self.stats = TunnelStats(req)
        self.idle_timeout = proxy.tunnel_idle_timeout
        self.relay: MessageRelay | None = None
        self.read_size = _READ
        if proxy.wants_messages() and handshake.check_switch(asked, reply.headers) == handshake.WEBSOCKET:
            try:
                deflate = handshake.accepted_deflate(reply.headers)
            except HTTPException as exc:
                raise BadUpstreamResponse(str(exc)) from None
            self.relay = MessageRelay(proxy.on_ws_message, self.stats, proxy.max_ws_message_bytes, deflate)
            self.read_size = _DEFLATE_READ if deflate else _READ
        self.greenlet: gevent.Greenlet | None = None
        self._client: _End | None = None
        self._upstream: _End | None = None
        self._last = 0.0
        self._ending = False
        self._first_closer = ""

    # -- run -----------------------------------------------------------------

    def run(self) -> None:
        """Answer the client's upgrade and relay until the tunnel is over; never raises but to stop the worker."""
        environ = self.req.environ
        locked = self.relay is not None  # with messages, a close may be written by the other direction
        try:
            up_sock, up_held = self.reply.take_socket()
            reset = False
        except OSError:  # reset right behind its 101: the client still gets the 101, then the end
            up_sock, up_held, reset = self.reply.socket(), b"", True
        self._upstream = _End("upstream", up_sock, up_held, locked)
        self._client = _End("client", client_socket(environ), _held_by_server(environ), locked)
        self.greenlet = gevent.getcurrent()
        started = self._last = time.monotonic()
        shutdown.opened(self)
        counters = metrics()
        if counters.enabled:
            counters.active_tunnels.inc()
        other = None
        try:
            for end in (self._client, self._upstream):
                end.sock.settimeout(self.idle_timeout)
            own = (("Date", formatdate(usegmt=True)), (REQUEST_ID_HEADER, self.req.request_id),
                   *self.req.rate_limit_headers)  # what the server adds to, and forkproxy sets in, every reply
            head = handshake.client_head(self.reply.reason, self.reply.headers, own)
            try:
                self._client.write(head)
            except OSError:
                self._end("client", errored=True)
            if reset:
                self._end("upstream", errored=True)
            if not self._ending:
                other = gevent.spawn(self._copy, self._upstream, self._client)
                self._copy(self._client, self._upstream)
                other.join()
        finally:
            if other is not None and not other.dead:
                other.kill(block=False)  # the request's greenlet was killed: its partner goes too
            self._finish(time.monotonic() - started)

    def stop(self) -> None:
        """Called by ``shutdown.stop_all``: the worker is stopping; end the tunnel now."""
        self._end("proxy", errored=True)

    # -- one direction -------------------------------------------------------

    def _copy(self, src: _End, dst: _End) -> None:
        data, src.held = src.held, b""
        while True:
            if data:
                self._last = time.monotonic()
                self._carry(src, dst, data)
            if self._ending:
                return
            data = self._read(src)
            if data is None:
                return
            if not data:
                self._passed_end(src, dst)
                return

    def _read(self, src: _End) -> bytes | None:
        """One read; b"" at the side's end of file; None when the tunnel ended (idle, reset, or from elsewhere)."""
        sock, shortened = src.sock, False
        while True:
            try:
                data = sock.recv(self.read_size)
            except socket.timeout:
                left = self._last + self.idle_timeout - time.monotonic()
                if left <= 0 or self._ending:
                    self._end("idle")
                    return None
                sock.settimeout(left)  # another read was active meanwhile: wait out the rest
                shortened = True
                continue
            except (OSError, ValueError):
                self._end(src.name, errored=True)
                return None
            if shortened:
                sock.settimeout(self.idle_timeout)
            return None if self._ending and not data else data

    def _carry(self, src: _End, dst: _End, data: bytes) -> None:
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

    def _write(self, dst: _End, data: bytes) -> None:
        try:
            dst.write(data)
        except socket.timeout:
            self._end("idle")  # the reader took nothing for tunnel_idle_timeout
        except (OSError, ValueError):
            self._end(dst.name, errored=True)

    def _passed_end(self, src: _End, dst: _End) -> None:
        """``src`` closed its write half: so does forkproxy towards ``dst`` (or the tunnel ends, for TLS)."""
        if self._ending:
            return
        self._first_closer = self._first_closer or src.name
        if src.tls or dst.tls:
            self._end(src.name)
            return
        dst.shut(socket.SHUT_WR)

    def _proxy_closed(self, relay: MessageRelay) -> None:
        failure = relay.hook_failure
        if failure is not None:
            hooks.log_failure(self.proxy.on_ws_message, describe(self.req), failure)
        else:
            log.warning("%s: tunnel closed with %d: %s", describe(self.req), relay.close_code, relay.close_reason)
        self._end("proxy", errored=True)

    def _end(self, closed_by: str, errored: bool = False) -> None:
        """The tunnel is over: both sockets are shut, which wakes a loop still waiting on either."""
        if self._ending:
            return
        self._ending = True
        self.stats.closed_by = closed_by
        self.stats.errored = self.stats.errored or errored
        for end in (self._client, self._upstream):
            if end is not None:
                end.shut(socket.SHUT_RDWR)

    # -- the end -------------------------------------------------------------

    def _finish(self, seconds: float) -> None:
        shutdown.closed(self)
        self.reply.close()  # the upstream connection is never reused; its pool slot is free again
        if self._client is not None:
            self._client.shut(socket.SHUT_RDWR)  # gunicorn closes the socket itself
        stats = self.stats
        closed_first = self.relay.closed_first if self.relay is not None else ""
        stats.closed_by = stats.closed_by or closed_first or self._first_closer or "proxy"
        counters = metrics()
        if counters.enabled:
            counters.active_tunnels.dec()
            counters.tunnel_ended(stats.bytes_from_client, stats.bytes_from_upstream)
            counters.answered(self.req.method, 101, self.upstream.origin, "tunnel_cut" if stats.errored else None)
        hooks.call_after_head(self.proxy.on_tunnel_end, describe(self.req), self.req, stats)
        environ = self.req.environ
        environ[ENV_BYTES_IN] = stats.bytes_from_client
        log_access(environ, f"101 {self.reply.reason or 'Switching Protocols'}", stats.bytes_from_upstream,
                   self.req.headers, seconds)
