"""The readers of an upstream body: one per framing, picked by ``reader_for``, and the read streams wait in.

A reader's ``next`` gives the bytes of one read (whole chunks of a chunked
body), None once the body has ended, and raises when it cannot end as its
framing says. Readers are small objects with ``__slots__`` rather than
closures: a stream keeps its readers for its whole life, and a closure with
its cells costs several times the bytes of the same state in slots; the
relay calls the bound ``next``, as cheap to call as a function.
"""
from __future__ import annotations

import socket
from http.client import IncompleteRead
from typing import Any, Callable, Protocol

import gevent.socket
from gevent.hub import Waiter, get_hub
from greenlet import getcurrent

from forkproxy.http.chunked import Dechunker
from forkproxy.http.wire import Framing

Read = Callable[[int], bytes]


class Reply(Protocol):
    """What a reader needs of the reply whose body it reads (``UpstreamReply``)."""

    framing: Framing

    def body_ended(self) -> None:
        """The body was read to its end: its connection can be reused."""


class BodyReader:
    """A body that ends when the upstream closes the connection; the base of the readers of the other framings."""

    __slots__ = ("_reply", "_read", "_size")

    def __init__(self, reply: Reply, read: Read, size: int) -> None:
        self._reply, self._read, self._size = reply, read, size

    def next(self) -> list[bytes] | None:
        data = self._read(self._size)
        if not data:
            self._reply.body_ended()
            return None
        return [data]


class ChunkedBody(BodyReader):
    """A chunked body: the chunks each read completed."""

    __slots__ = ("_dechunker",)

    def __init__(self, reply: Reply, read: Read, size: int) -> None:
        super().__init__(reply, read, size)
        self._dechunker = Dechunker(size)

    def next(self) -> list[bytes] | None:
        dechunker = self._dechunker
        if dechunker.done:
            self._reply.body_ended()
            return None
        dechunker.raise_if_broken()  # fail now, not after waiting for bytes that may never come
        data = self._read(self._size)
        if not data:
            dechunker.finish()  # raises: the body ended inside the coding
        return dechunker.feed(data)


class SizedBody(BodyReader):
    """A body of a Content-Length: what each read brought, never past the length."""

    __slots__ = ("_owed",)

    def __init__(self, reply: Reply, read: Read, size: int) -> None:
        super().__init__(reply, read, size)
        self._owed = reply.framing.length or 0

    def next(self) -> list[bytes] | None:
        owed = self._owed
        if not owed:
            self._reply.body_ended()
            return None
        data = self._read(min(self._size, owed))
        if not data:
            raise IncompleteRead(b"", owed)
        self._owed = owed - len(data)
        return [data]


def reader_for(framing: Framing) -> type[BodyReader]:
    if framing.chunked:
        return ChunkedBody
    if framing.length is not None:
        return SizedBody
    return BodyReader


class ClientLeft(Exception):
    """The client's connection ended while a stream's read waited for the upstream."""


class WaitingRead:
    """The read of a body that mostly waits (a stream): straight from the socket, the bytes held first.

    A socket read waits with no buffer allocated (gevent allocates it when
    bytes are there), and with fewer frames on the greenlet's stack, which
    is saved to the heap while the stream waits. After a short read the next
    bytes are rarely there yet: the read waits until the socket is readable,
    then reads once, instead of first making a read that finds nothing (a
    syscall and an exception per unit). ``set_idle`` bounds each wait: one
    libev timer kept for the stream, started and stopped around each read,
    where a socket timeout makes and drops a ``gevent.Timeout`` (an object,
    its dict and its callback) per wait. A TLS socket keeps its own
    timeout and always reads first (it may hold decrypted bytes its socket
    no longer shows as readable).

    With ``watch(client)``, a wait also ends when the client's connection
    turns readable: at its end (the client left, or nginx in front let go
    of it) the read raises ``ClientLeft`` at once, where otherwise a silent
    upstream would keep the stream, and the upstream's work, until the next
    write or ``stream_idle_timeout``.
    """

    __slots__ = ("_idle", "_held", "_sock", "_readable", "_short", "_client")

    def __init__(self, sock: Any, held: bytes) -> None:
        self._held = held
        self._sock = sock
        self._short = False
        self._idle: Any = None  # the libev timer bounding one read's wait; None: no bound
        self._readable: Any = None  # the socket's watcher, when the hub times its waits
        self._client: tuple[Any, Any] | None = None  # (its watcher, the client's socket)
        if type(sock) is gevent.socket.socket:  # not TLS
            self._readable = get_hub().loop.io(sock.fileno(), 1)
            self.set_idle(sock.gettimeout())
            sock.settimeout(None)

    def set_idle(self, seconds: float | None) -> None:
        """The longest one read may wait from now on (None: for ever); past it the read raises ``TimeoutError``,
        as a socket's own timeout does (a TLS socket's own timeout is that bound)."""
        if self._readable is None:
            self._sock.settimeout(seconds)
            return
        # Below the sockets' priority, as gevent.Timeout's: bytes and the bound due in one loop turn go to the bytes.
        self._idle = None if seconds is None else get_hub().loop.timer(seconds, priority=-1)

    def read(self, n: int) -> bytes:
        held = self._held
        if held:
            data, self._held = held[:n], held[n:]
        else:
            data = self._read_socket(n)
        self._short = self._readable is not None and len(data) < n
        return data

    def _read_socket(self, n: int) -> bytes:
        idle = self._idle
        if idle is not None:
            idle.start(getcurrent().throw, TimeoutError, update=True)  # from now, not the loop's last clock reading
        try:
            if self._short:
                self._wait_readable()
            return self._sock.recv(n)
        finally:
            if idle is not None:
                idle.stop()

    def watch(self, client: Any) -> None:
        """While waiting, also notice the end of ``client``'s connection; only where both sockets are plain
        gevent ones (a TLS read waits in its socket)."""
        if self._readable is not None and type(client) is gevent.socket.socket:
            self._client = (get_hub().loop.io(client.fileno(), 1), client)

    def _wait_readable(self) -> None:
        """Until the upstream's socket is readable; ``ClientLeft`` if the watched client's connection ends first."""
        readable = self._readable
        while self._client is not None:
            watcher, client = self._client
            waiter = Waiter()
            readable.start(waiter.switch, readable)
            watcher.start(waiter.switch, watcher)
            try:
                woke = waiter.get()
            finally:
                readable.stop()
                watcher.stop()
            if woke is readable:
                return
            self._check_client(client)
        get_hub().wait(readable)  # no client watched, or it sent bytes

    def _check_client(self, client: Any) -> None:
        """The client's socket woke the wait: at its end, the client left (``ClientLeft``); bytes (a pipelined
        request) are left for the server and the client is no longer watched (it would stay readable); nothing
        (a spurious wake) changes nothing. The peek never waits."""
        timeout = client.gettimeout()
        client.settimeout(0)
        try:
            left = not client.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            return
        except OSError:  # reset
            left = True
        finally:
            client.settimeout(timeout)
        if left:
            raise ClientLeft("the client closed its connection")
        self._client = None
