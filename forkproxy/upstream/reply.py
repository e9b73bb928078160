"""An upstream response whose head is read and whose body is still on the wire.

``UpstreamReply`` owns its connection until the body has been read to
its end (then ``release`` hands the connection back for reuse) or abandoned
(``release`` closes it). The body is read with plain buffered-socket reads,
one read per call, so the buffered path reads a sized body in one call and
the streaming path relays whatever one read brought.
"""
from __future__ import annotations

import io
import time
from http.client import IncompleteRead
from ssl import SSLWantReadError
from typing import TYPE_CHECKING, Any, BinaryIO, Callable

from urllib3 import HTTPHeaderDict

from forkproxy.http.wire import Framing, StatusLine
from forkproxy.upstream.body import WaitingRead, reader_for

if TYPE_CHECKING:
    from urllib3 import HTTPConnectionPool
    from urllib3.connection import HTTPConnection

Pieces = Callable[[], "list[bytes] | None"]
"""Body bytes of one read (whole chunks of a chunked body); None once the body has ended."""

_DRAIN_LIMIT = 64 * 1024
_DRAIN_SECONDS = 1.0  # the longest a retry waits for the body of the reply it replaces
READ_BUFFER = 2048  # the reader's buffer: the head is read through it; larger body reads bypass it
BODY_READ = 64 * 1024  # the most one read of a body asks for
_TAKEN = io.BytesIO()  # a reply's reader once its socket was taken: closed, as the reader it stands for
_TAKEN.close()


class UpstreamReply:
    """Status, headers and the unread body of one upstream response."""

    __slots__ = ("status", "reason", "headers", "framing", "on_release", "_fp", "_conn", "_connections", "_done",
                 "_waiting", "_reading")

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
        self._waiting: WaitingRead | None = None  # a stream's read, which bounds its own waits
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
        if self._waiting is not None:
            self._waiting.set_idle(seconds)
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
        in the socket, not in a ``size``-byte buffer (``body.WaitingRead``).
        """
        self._reading = True
        read = self._fp.read1
        if waiting:
            self._waiting = WaitingRead(*self.take_socket())  # set_read_timeout bounds its waits
            read = self._waiting.read
        return reader_for(self.framing)(self, read, size).next

    def watch_client(self, client: Any) -> None:
        """A stream's waits also notice the client's connection ending (``body.ClientLeft``)."""
        if self._waiting is not None:
            self._waiting.watch(client)

    def body_ended(self) -> None:
        """A reader read the body to its end: the connection can be reused."""
        self._done = True

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
        self._fp = _TAKEN  # the closed reader, its buffer and its socket's file object go with it
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
