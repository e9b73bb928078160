"""The connections to one upstream origin (a urllib3 connection pool), and the exchange on one of them.

urllib3 keeps what it is good at: the pool of keep-alive connections, connect
and TLS with verification, and ``urlopen`` checking a connection out and
back in. ``urlopen`` makes exactly one try (``ONE_TRY``): the attempt loop
(``attempts``) decides what happens next. Only ``_make_request``, the
exchange (the one request-response on a connection), is forkproxy's: the
head goes out in one write, the response head is read strictly by
``wire.read_head`` into an ``UpstreamReply``, and each step that fails
raises its own ``AttemptFailed`` (``failures``), which ``urlopen`` lets
through untouched, closing the connection. http.client's request and
response objects cost more than the rest of a proxied request (see the
README's benchmark section) and parse heads laxly.

urllib3 internals this relies on, and why: ``_make_request`` (the exchange
itself), ``_get_conn`` and ``_put_conn`` (dropping idle connections; a reply
returns its connection with ``_put_conn``, as urllib3's own responses do).
Everything else goes through public API. setup.py pins the urllib3 releases
this is tested with, and CI runs the suite once more against the newest.
"""
from __future__ import annotations

import errno
import select
import socket
import time
from http.client import HTTPException, RemoteDisconnected
from typing import Any, Callable

from gevent.exceptions import InvalidSwitchError
from gevent.monkey import get_original
from greenlet import GreenletExit, getcurrent, greenlet
from urllib3.connection import HTTPConnection, HTTPSConnection, port_by_scheme
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import ConnectTimeoutError, LocationValueError, NewConnectionError, SSLError
from urllib3.util.retry import Retry
from urllib3.util.ssl_match_hostname import CertificateError
from urllib3.util.timeout import Timeout

from forkproxy.http.wire import RequestHead, body_framing, host_header, read_head
from forkproxy.upstream.failures import AttemptFailed, BadHead, HeadTimeout, SentNothing, Unanswered
from forkproxy.upstream.reply import READ_BUFFER, UpstreamReply
from forkproxy.upstream.retry import IDEMPOTENT_METHODS

_os_poll = get_original("select", "poll")
# Smaller bodies go out in the same write as the head: one copy of the body costs less than
# a second send() (a 64 KiB POST: 398-401 µs per request against 406-417 with two writes).
_JOIN_BODY_BELOW = 128 * 1024
_SEND_ERRNOS_TO_READ_PAST = (errno.EPROTOTYPE, errno.ECONNRESET)
_WOULD_BLOCK = frozenset((errno.EAGAIN, errno.EWOULDBLOCK))

ONE_TRY = Retry(total=False, redirect=False, allowed_methods=None)
"""``retries`` for ``urlopen``: exactly one try, no redirect followed; what follows is the attempt loop's.

One value shared by every request (a Retry is never changed; ``urlopen``
makes one of its own from anything else). No method list: ``urlopen`` asks
it about every reply, and the answer is no retry whatever the method.
"""


class _Alive:
    """``is_connected`` as one zero-timeout poll of the OS, not gevent's.

    urllib3 checks a pooled connection before reusing it; under gevent its
    poll is gevent's, which arms a watcher and goes through the hub. A zero
    timeout never blocks, so the unpatched poll is safe in a greenlet and
    costs a fraction of that. Only "nothing to read" means idle and open:
    readable is the upstream's close, or bytes nobody asked for that would
    be read as the next response.
    """

    @property
    def is_connected(self) -> bool:
        fd = self.sock.fileno() if self.sock is not None else -1
        if fd < 0:
            return False
        poller = _os_poll()
        poller.register(fd, select.POLLIN)
        try:
            return not poller.poll(0)
        except OSError:
            return False


class Connection(_Alive, HTTPConnection):
    """A plain connection whose liveness check is one poll of the OS."""


class _Exchange:
    """``_make_request`` for a connection pool: one request out, one response head in."""

    def __init__(self, host: str, port: int | None = None, *, idle_timeout: float = 4.0, **kw: Any) -> None:
        super().__init__(host, port, **kw)
        default_port = port_by_scheme[self.scheme]
        self.host_header = host_header(_ascii_host(self.host), self.port or default_port, default_port)
        self.idle_timeout = idle_timeout

    # -- idle connections: dropped before the upstream's keep-alive timeout can close them under a request

    def _get_conn(self, timeout: float | None = None) -> HTTPConnection:
        conn = super()._get_conn(timeout)
        if conn.sock is not None and time.monotonic() - getattr(conn, "idle_since", 0.0) > self.idle_timeout:
            conn.close()  # reconnected by the exchange
        return conn

    def _put_conn(self, conn: HTTPConnection | None) -> None:
        if conn is not None:
            conn.idle_since = time.monotonic()
        super()._put_conn(conn)

    def _make_request(self, conn: HTTPConnection, method: str, url: str, body: bytes | None = None,
                      headers: RequestHead | None = None, retries: Any = None, timeout: Any = None,
                      **_response_kw: Any) -> UpstreamReply:
        """The exchange; once more on a fresh connection when a reused one closed unanswered.

        An upstream may close an idle keep-alive connection just as a request
        goes out on it. When no byte of a response arrived, the request is
        sent again on a new connection if that is safe (an idempotent method,
        or nothing of the body sent yet: Go's Transport rule): part of the
        same attempt, not one of the retry policy's. Raises ``AttemptFailed``.
        """
        self.num_requests += 1
        if conn.sock is not None:  # reused
            try:
                return self._exchange(conn, method, body, headers, timeout)
            except Unanswered as unanswered:
                if not (unanswered.nothing_read and (method in IDEMPOTENT_METHODS or unanswered.body_unsent)):
                    raise
            conn.close()
        return self._exchange(conn, method, body, headers, timeout)

    def _exchange(self, conn: HTTPConnection, method: str, body: bytes | None, head: RequestHead,
                  timeout: Timeout) -> UpstreamReply:
        """One request-response on ``conn``, up to the response head; each step raises its own failure."""
        connect_timeout = Timeout.resolve_default_timeout(timeout.connect_timeout)
        conn.timeout = connect_timeout
        if conn.is_closed:
            _on_own_stack(_connect, conn)
        sock = conn.sock
        fp = None
        body_unsent, nothing_read = False, True
        try:
            sock.settimeout(connect_timeout)  # a reused connection still has its last read's timeout
            body_unsent = _send(sock, head.data, body)  # the target as received, not urlopen's ``url``
            sock.settimeout(timeout.read_timeout)
            fp = sock.makefile("rb", READ_BUFFER)
            if not fp.peek(1):
                closed = RemoteDisconnected("closed with no byte of a response")  # as http.client names it
                raise Unanswered(closed, body_unsent=body_unsent, nothing_read=True)
            nothing_read = False
            status, reply_headers = read_head(fp)
            framing = body_framing(method, status, reply_headers, head.upgrade)
        except BaseException as exc:
            if fp is not None:
                fp.close()  # else the reader would keep the socket open after urllib3 closes the connection
            if isinstance(exc, (OSError, HTTPException)):
                raise _failure_once_sent(exc, body_unsent, nothing_read) from exc
            raise
        return UpstreamReply(self, conn, fp, status, reply_headers, framing)


def _connect(conn: HTTPConnection) -> None:
    """Connect (and for https, handshake and verify); ``SentNothing`` when that fails.

    urllib3's connect raises its own errors for the TCP connect and name
    resolution; whatever else it raises came from the TLS handshake.
    """
    try:
        conn.connect()
    except (NewConnectionError, LocationValueError) as exc:  # refused, unreachable, no such name
        raise SentNothing.refused(exc) from exc
    except ConnectTimeoutError as exc:
        raise SentNothing.timed_out(exc) from exc
    except (OSError, CertificateError, SSLError) as exc:  # ssl.SSLError and socket.timeout are OSErrors
        raise SentNothing.tls(exc, timed_out=_timed_out(exc)) from exc


def _on_own_stack(work: Callable[[HTTPConnection], None], conn: HTTPConnection) -> None:
    """``work(conn)`` on a greenlet of its own, run at once and ended before this returns.

    A connect is the deepest point of a request: urllib3, name resolution,
    gevent's connect and its timeout, perhaps a TLS handshake, below the
    lifecycle and the attempt loop. CPython 3.11 keeps a greenlet's frames
    in a chunk of its own and never gives back a page of it that was once
    touched, so a stream's greenlet kept the page its connect touched for
    the stream's whole life: about 4 KiB per open stream. A greenlet that
    ends gives its chunk back. It costs about 10 µs per new connection;
    a kept-alive one costs nothing.

    No hook runs here; the work sees the request's contextvars all the
    same. If this greenlet is interrupted meanwhile (a worker stopping kills
    it), or switched into by something else, the work is ended before the
    interruption goes on, so nothing of it runs later; if the work's own
    greenlet is killed, the connect fails with that.
    """
    helper = greenlet(work)  # its parent is this greenlet: when work ends, this one goes on
    helper.gr_context = getcurrent().gr_context
    try:
        ended = helper.switch(conn)
        if not helper.dead:  # a stray switch into this greenlet, which gevent's own waits refuse too
            raise InvalidSwitchError(f"switch into a request while its connect runs: {ended!r}")
    except BaseException:
        if not helper.dead:
            helper.throw()  # GreenletExit where the work waits, which unwinds it
        raise
    if isinstance(ended, GreenletExit):  # the helper itself was killed: no connection was made
        raise ended


def _failure_once_sent(exc: OSError | HTTPException, body_unsent: bool, nothing_read: bool) -> AttemptFailed:
    """What went wrong once the request was on its way: a timeout, a head refused, or the connection lost."""
    if _timed_out(exc):
        return HeadTimeout(exc)
    if isinstance(exc, HTTPException) and not isinstance(exc, ConnectionError):  # RemoteDisconnected is both
        return BadHead(exc)
    return Unanswered(exc, body_unsent=body_unsent, nothing_read=nothing_read)


def _timed_out(exc: BaseException) -> bool:
    """A socket timeout, or TLS's "would block" on a socket with a timeout."""
    return isinstance(exc, socket.timeout) or getattr(exc, "errno", None) in _WOULD_BLOCK


def _send(sock: socket.socket, head: bytes, body: bytes | None) -> bool:
    """Write the request; True when it failed before any byte of its body (or all of it) went out.

    A failed write is not the end: the upstream may have answered before it
    stopped reading, so its answer is read all the same.
    """
    body_unsent = True
    try:
        if body and len(body) < _JOIN_BODY_BELOW:
            body_unsent = False  # one write: no telling how much of it left
            _write_all(sock, head + body)
        else:
            _write_all(sock, head)
            body_unsent = False
            if body:
                _write_all(sock, body)
    except BrokenPipeError:
        pass
    except OSError as exc:
        if exc.errno not in _SEND_ERRNOS_TO_READ_PAST:
            raise
    return body_unsent


def _write_all(sock: socket.socket, data: bytes) -> None:
    """``sock.sendall(data)``, one ``send`` when that takes it all (as it nearly always does).

    gevent's ``sendall`` asks the kernel for the send buffer's size and
    slices a memoryview on every call, even for a head that one ``send``
    takes whole; its ``send`` waits (under the socket's timeout) like it.
    """
    sent = sock.send(data)
    if sent < len(data):
        sock.sendall(memoryview(data)[sent:])


class Connections(_Exchange, HTTPConnectionPool):
    """The keep-alive connections to one http:// origin."""

    ConnectionCls = Connection


class TLSConnections(_Exchange, HTTPSConnectionPool):
    """The keep-alive connections to one https:// origin."""

    # A TLS socket cannot be peeked at below the record layer: urllib3's own liveness check stays.
    ConnectionCls = HTTPSConnection


CONNECTIONS = {"http": Connections, "https": TLSConnections}


def _ascii_host(host: str) -> str:
    try:
        host.encode("ascii")
        return host
    except UnicodeEncodeError:
        return host.encode("idna").decode("ascii")
