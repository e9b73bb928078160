"""WebSocket messages on their way through a tunnel, framed by wsproto; no I/O here.

Used only when a proxy overrides ``on_ws_message``; otherwise a tunnel copies
bytes untouched. Each side of the proxy is one wsproto ``Connection`` (its
post-handshake frame layer): towards the client forkproxy is the server (it
reads masked frames, writes unmasked ones), towards the upstream the client.
Frames are parsed by wsproto, never here. Data messages are put together
from their frames (wsproto hands over a large frame's payload as it arrives,
so the cap is enforced while a message grows) and handed to the hook; ping,
pong and close frames pass on as they came. permessage-deflate, the one
extension browsers use, is undone and redone with the parameters the
upstream accepted; message hooks offer no other extension (``handshake``).

The two directions run in two greenlets, and a hook may block (I/O, sleep)
in either: each direction keeps its own state (``_Direction``: the message
growing, what goes on), so nothing one direction has in hand is touched by
the other. What they share is each side's ``Connection``: one direction
reads it, the other writes to it, and wsproto keeps those two apart (its
parser and its framer hold separate state, the deflate extension a separate
decompressor and compressor) but for the close state, which only moves on.

``receive`` turns bytes read from one side into the bytes for each side, so
a caller is a plain read-and-write loop and this is tested without sockets.
"""
from __future__ import annotations

import codecs
import io
from typing import Callable

from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Message, Ping, Pong, TextMessage
from wsproto.extensions import PerMessageDeflate
from wsproto.frame_protocol import CloseReason

from forkproxy.messages import MessageWriter, TunnelStats, WebSocketMessage

MessageHook = Callable[[WebSocketMessage, MessageWriter, TunnelStats], None]
_SENDING = (ConnectionState.OPEN, ConnectionState.REMOTE_CLOSING)  # states a close may still go out in
_DECODE_STEP = 64 * 1024


class _Pieces:
    """A data message growing frame by frame, held as its payload bytes in one buffer.

    A text fragment comes from wsproto decoded; it is kept as its UTF-8
    bytes, so the size (what the cap counts) is the buffer's, known without
    going over the message again, and the whole costs about its own size
    whatever the frame sizes. ``BytesIO.getvalue`` hands the buffer over
    without a copy.
    """

    __slots__ = ("_buffer", "_text")

    def __init__(self) -> None:
        self._buffer = io.BytesIO()
        self._text = False

    def add(self, event: Message) -> int:
        """Append a fragment; the message's size so far, in bytes."""
        data = event.data
        self._text = isinstance(event, TextMessage)
        self._buffer.write(data.encode("utf-8") if self._text else data)
        return self._buffer.tell()

    def take(self) -> str | bytes:
        """The whole message (str for text), leaving the buffer empty for the next."""
        data, self._buffer = self._buffer.getvalue(), io.BytesIO()
        return _decoded(data) if self._text else data


def _decoded(utf8: bytes) -> str:
    """Text wsproto has checked already, as one str, decoded in steps unless it is ASCII.

    CPython's UTF-8 decoder first sizes its output for the input's length in
    the widest kind of character it has met, up to five times the input at
    once; step by step that excess is one step's, whatever the characters.
    """
    if utf8.isascii():
        return utf8.decode("ascii")
    view = memoryview(utf8)
    return "".join(codecs.iterdecode((view[at:at + _DECODE_STEP] for at in range(0, len(view), _DECODE_STEP)),
                                     "utf-8"))


class _Direction:
    """One direction of the tunnel: the side it reads, the side it writes on to, and its own state."""

    __slots__ = ("from_client", "src", "dst", "pieces", "onward", "writer")

    def __init__(self, from_client: bool, src: Connection, dst: Connection) -> None:
        self.from_client = from_client
        self.src = src
        self.dst = dst
        self.pieces = _Pieces()
        self.onward: list[bytes | bytearray] = []  # frames for ``dst`` from the read being handled
        self.writer = MessageWriter(self.send_on)

    def send_on(self, data: str | bytes) -> None:
        """``out.send``: a message onward, in this direction."""
        if self.dst.state is ConnectionState.OPEN:  # once that side is closing, a message cannot follow
            self.onward.append(self.dst.send(TextMessage(data) if isinstance(data, str) else BytesMessage(data)))

    def pass_on(self, event: Ping | Pong) -> None:
        if self.dst.state is ConnectionState.OPEN:
            self.onward.append(self.dst.send(type(event)(payload=bytes(event.payload))))

    def take_onward(self) -> bytes:
        onward, self.onward = self.onward, []
        return b"".join(onward)


class MessageRelay:
    """Both directions of one WebSocket tunnel, message by message."""

    def __init__(self, on_message: MessageHook, stats: TunnelStats, max_message_bytes: int,
                 deflate: str | None = None) -> None:
        self._on_message = on_message
        self._stats = stats
        self._max = max_message_bytes
        client_side, upstream_side = _side(ConnectionType.SERVER, deflate), _side(ConnectionType.CLIENT, deflate)
        self._directions = {True: _Direction(True, client_side, upstream_side),
                            False: _Direction(False, upstream_side, client_side)}
        self.close_code: int | None = None  # set once forkproxy closed both sides itself
        self.close_reason = ""
        self.hook_failure: Exception | None = None  # what on_ws_message raised, when it did
        self.closed_first = ""  # "client" or "upstream": who sent the first close frame

    def receive(self, from_client: bool, data: bytes) -> tuple[bytes, bytes]:
        """Bytes read from one side: (bytes back to that side, bytes on to the other).

        After a message over the cap, a frame wsproto refuses or a hook that
        raised (``hook_failure``), both sides get a close frame and
        ``close_code`` says why; the tunnel is over then.
        """
        way = self._directions[from_client]
        if way.src.state is ConnectionState.CLOSED or self.close_code is not None:
            return b"", b""  # after the closing handshake nothing more is read as frames
        way.src.receive_data(data)
        back: list[bytes] = []
        for event in way.src.events():
            if isinstance(event, Message):
                self._data(event, way, back)
            elif isinstance(event, CloseConnection):
                self._closed(event, way, back)
            elif isinstance(event, (Ping, Pong)):
                way.pass_on(event)
            if self.close_code is not None:
                break
        return b"".join(back), way.take_onward()

    def close_both(self, code: int, reason: str) -> tuple[bytes, bytes]:
        """Close frames (to the client, to the upstream) ending the tunnel from the proxy's side."""
        self.close_code, self.close_reason = code, reason
        frames = []
        for conn in (self._directions[True].src, self._directions[False].src):
            frames.append(bytes(conn.send(CloseConnection(code, reason))) if conn.state in _SENDING else b"")
        return frames[0], frames[1]

    # -- events ------------------------------------------------------------

    def _data(self, event: Message, way: _Direction, back: list[bytes]) -> None:
        if way.pieces.add(event) > self._max:
            self._proxy_close(way, back, CloseReason.MESSAGE_TOO_BIG,
                              f"message over the proxy's cap of {self._max} bytes")
            return
        if not event.message_finished:
            return
        message = WebSocketMessage(way.pieces.take(), way.from_client)
        if way.from_client:
            self._stats.messages_from_client += 1
        else:
            self._stats.messages_from_upstream += 1
        try:
            self._on_message(message, way.writer, self._stats)
        except Exception as exc:
            self.hook_failure = exc
            self._proxy_close(way, back, CloseReason.INTERNAL_ERROR, "message hook failed")

    def _closed(self, event: CloseConnection, way: _Direction, back: list[bytes]) -> None:
        if way.src.state is ConnectionState.OPEN:  # not a close frame: wsproto could not parse what came
            self._proxy_close(way, back, event.code, event.reason or "protocol error")
            return
        self.closed_first = self.closed_first or ("client" if way.from_client else "upstream")
        if way.dst.state in _SENDING:
            way.onward.append(way.dst.send(CloseConnection(event.code, event.reason or None)))

    def _proxy_close(self, way: _Direction, back: list[bytes], code: int, reason: str) -> None:
        to_client, to_upstream = self.close_both(code, reason)
        back.append(to_client if way.from_client else to_upstream)
        way.onward.append(to_upstream if way.from_client else to_client)


def _side(kind: ConnectionType, deflate: str | None) -> Connection:
    extensions = []
    if deflate is not None:
        extension = PerMessageDeflate()
        extension.finalize(deflate)  # the parameters both ends agreed on, as the upstream's 101 gave them
        extensions.append(extension)
    return Connection(kind, extensions)
