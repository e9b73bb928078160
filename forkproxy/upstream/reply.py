"""An upstream response whose head is read and whose body is still on the wire.

``UpstreamReply`` owns its connection until the body has been read to
its end (then ``release`` hands the connection back for reuse) or abandoned
(``release`` closes it). The body is read with plain buffered-socket reads,
one read per call, so the buffered path reads a sized body in one call and
the streaming path relays whatever one read brought.
"""
from __future__ import annotations

import time
from http.client import IncompleteRead
from ssl import SSLWantReadError
from typing import TYPE_CHECKING, Any, BinaryIO, Callable

import gevent.socket
from gevent import Timeout
from gevent.hub import get_hub
from urllib3 import HTTPHeaderDict

from forkproxy.http.chunked import Dechunker
from forkproxy.http.wire import Framing, StatusLine

if TYPE_CHECKING:
    from urllib3 import HTTPConnectionPool
    from urllib3.connection import HTTPConnection

Pieces = Callable[[], "list[bytes] | None"]
"""Body bytes of one read (whole chunks of a chunked body); None once the body has ended."""

_DRAIN_LIMIT = 64 * 1024
_DRAIN_SECONDS = 1.0  # the longest a retry waits for the body of the reply it replaces
READ_BUFFER = 2048  # the reader's buffer: the head is read through it; larger body reads bypass it
BODY_READ = 64 * 1024  # the most one read of a body asks for


class UpstreamReply:
    """Status, headers and the unread body of one upstream response."""

    __slots__ = ("status", "reason", "headers", "framing", "on_release", "_fp", "_conn", "_connections", "_done",
                 "_waiting", "_idle", "_reading")

    def __init__(self, connections: "HTTPConnectionPool", conn: "HTTPConnection", fp: BinaryIO,
                 status: StatusLine, headers: HTTPHeaderDict, framing: Framing) -> None:
        self.status = status.status
        self.reason = status.reason
        self.headers = headers
        self.framing = framing
        self._fp = fp
        self._conn: "HTTPConnection | None" = conn
        self._connections = connections
        self._done = framing.length == 0 and not framing.chunked
        self.on_release: Callable[[], None] | None = None  # told once: the attempt that got this reply is over
        self._waiting = False  # a waiting reader reads the body: its own timer bounds each wait (``_idle``)
        self._idle: Timeout | None = None
        self._reading = False  # a reader of the body was made: what it read is gone from the connection

    def get_redirect_location(self) -> bool:
        """What urllib3's ``Retry.increment`` asks of a response it counts: redirects go to the client."""
        return False

    def drain_conn(self) -> None:
        """A reply not relayed (another attempt follows): a small body is read so the connection can be reused.

        Bounded in size and in time (``_DRAIN_SECONDS`` in all, whatever the
        read timeout), as the retry waits for it: a body that is larger, ends
        with the connection, or has not come by then is cut, its connection closed.
        """
        framing = self.framing
        if self._reading or framing.will_close or (framing.length or 0) > _DRAIN_LIMIT:
            self.close()  # a body partly read ahead (a stream's first units) cannot be drained from its start
            return
        try:
            pieces, size, until = self.pieces(_DRAIN_LIMIT), 0, time.monotonic() + _DRAIN_SECONDS
            while size <= _DRAIN_LIMIT and (left := until - time.monotonic()) > 0:
                self.set_read_timeout(left)
                if (got := pieces()) is None:
                    break
                size += sum(map(len, got))
        except Exception:
            pass  # a broken or slow body only means the connection is not reused
        finally:
            self.release()

    # -- the body -----------------------------------------------------------

    def set_read_timeout(self, seconds: float | None) -> None:
        """The longest one read may wait from now on (None: for ever)."""
        if self._waiting:
            self._idle = _idle_timer(seconds)
            return
        conn = self._conn
        if conn is not None and conn.sock is not None:
            conn.sock.settimeout(seconds)

    def read_sized(self) -> bytes:
        """The whole body of a reply with a Content-Length, in one read."""
        length = self.framing.length or 0
        data = self._fp.read(length) if length else b""
        if len(data) < length:
            raise IncompleteRead(data, length - len(data))
        self._done = True
        return data

    def pieces(self, size: int = BODY_READ, *, waiting: bool = False) -> Pieces:
        """The body as a function giving the bytes of one read of at most ``size``.

        ``waiting`` is for bodies that mostly wait (streams): the wait happens
        in the reader's own small buffer, not in a ``size``-byte one.
        """
        fp, framing = self._fp, self.framing
        self._reading = True
        read1 = self._waiting_read() if waiting else fp.read1
        if framing.chunked:
            return self._chunks(read1, size)
        if framing.length is not None:
            return self._sized(read1, size, framing.length)
        return self._to_close(read1, size)

    def _chunks(self, read1: Callable[[int], bytes], size: int) -> Pieces:
        dechunker = Dechunker(size)

        def chunks() -> list[bytes] | None:
            if dechunker.done:
                self._done = True
                return None
            dechunker.raise_if_broken()  # fail now, not after waiting for bytes that may never come
            data = read1(size)
            if not data:
                dechunker.finish()  # raises: the body ended inside the coding
            return dechunker.feed(data)
        return chunks

    def _sized(self, read1: Callable[[int], bytes], size: int, length: int) -> Pieces:
        owed = [length]

        def sized() -> list[bytes] | None:
            if not owed[0]:
                self._done = True
                return None
            data = read1(min(size, owed[0]))
            if not data:
                raise IncompleteRead(b"", owed[0])
            owed[0] -= len(data)
            return [data]
        return sized

    def _to_close(self, read1: Callable[[int], bytes], size: int) -> Pieces:
        def to_close() -> list[bytes] | None:
            data = read1(size)
            if not data:
                self._done = True
                return None
            return [data]
        return to_close

    def _waiting_read(self) -> Callable[[int], bytes]:
        """A read for a body that mostly waits: straight from the socket once the reader is empty.

        A socket read waits with no buffer allocated (gevent allocates it when
        bytes are there), and with fewer frames on the greenlet's stack, which
        is saved to the heap while the stream waits. The reader may hold the
        first body bytes (read with the head): those come first.
        """
        sock, first = self.take_socket()
        held = [first] if first else []
        recv = sock.recv
        if type(sock) is not gevent.socket.socket:  # TLS may hold decrypted bytes the socket no longer shows
            return _read_held_first(held, recv)
        # A gevent socket with a timeout makes and drops a Timeout on every wait; one kept for
        # the stream, started and cancelled around each read, bounds the wait the same way.
        self._idle, self._waiting = _idle_timer(sock.gettimeout()), True
        sock.settimeout(None)
        # After a short read the next bytes are rarely there yet: wait until the socket is readable,
        # then read once, instead of a read that finds nothing (a syscall and an exception) first.
        readable, wait = get_hub().loop.io(sock.fileno(), 1), get_hub().wait
        short = [False]

        def read(n: int) -> bytes:
            if held:
                return _take_held(held, n)
            idle = self._idle
            if idle is not None:
                idle.start()
            try:
                if short[0]:
                    wait(readable)
                data = recv(n)
            finally:
                if idle is not None:
                    idle.cancel()
            short[0] = len(data) < n
            return data
        return read

    def socket(self) -> Any:
        return self._conn.sock

    def take_socket(self) -> tuple[Any, bytes]:
        """The connection's socket and the bytes its reader already holds, which come first.

        The reader is closed (its buffer goes: a stream or a tunnel may stay
        open for hours); the connection stays this reply's until ``release``.
        """
        sock = self.socket()
        timeout = sock.gettimeout()
        sock.settimeout(0)  # the reader's bytes only, no wait
        try:
            held = self._fp.read1(READ_BUFFER) or b""
        except (BlockingIOError, SSLWantReadError):  # TLS says "nothing yet" its own way
            held = b""
        finally:
            sock.settimeout(timeout)
        self._fp.close()
        return sock, held

    # -- the connection -------------------------------------------------------

    def release(self) -> None:
        """Give the connection back: for reuse after a complete body, closed otherwise. Runs once."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if self.on_release is not None:
            self.on_release()
        self._fp.close()  # the reader, not the socket: it is the connection's
        if not self._done or self.framing.will_close:
            conn.close()
            conn = None
        self._connections._put_conn(conn)

    def close(self) -> None:
        """Abandon the body: the connection is closed, never reused."""
        self._done = False
        self.release()


def _read_held_first(held: list[bytes], recv: Callable[[int], bytes]) -> Callable[[int], bytes]:
    """A plain read that gives the bytes held from the reader first."""
    def read(n: int) -> bytes:
        return _take_held(held, n) if held else recv(n)
    return read


def _take_held(held: list[bytes], n: int) -> bytes:
    """At most ``n`` of the bytes held; the rest stays held."""
    data = held.pop()
    if len(data) > n:
        held.append(data[n:])
        data = data[:n]
    return data


def _idle_timer(seconds: float | None) -> Timeout | None:
    """A reusable bound on one read's wait: it raises ``TimeoutError``, as a socket's own timeout does."""
    return None if seconds is None else Timeout(seconds, TimeoutError)
