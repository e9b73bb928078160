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

``receive`` turns bytes read from one side into the bytes for each side, so
a caller is a plain read-and-write loop and this is tested without sockets.
"""
from __future__ import annotations

from typing import Callable

from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Message, Ping, Pong, TextMessage
from wsproto.extensions import PerMessageDeflate
from wsproto.frame_protocol import CloseReason

from .messages import MessageWriter, TunnelStats, WebSocketMessage

MessageHook = Callable[[WebSocketMessage, MessageWriter, TunnelStats], None]
_SENDING = (ConnectionState.OPEN, ConnectionState.REMOTE_CLOSING)  # states a close may still go out in


class MessageRelay:
    """Both directions of one WebSocket tunnel, message by message."""

    def __init__(self, on_message: MessageHook, stats: TunnelStats, max_message_bytes: int,
                 deflate: str | None = None) -> None:
        self._on_message = on_message
        self._stats = stats
        self._max = max_message_bytes
        self._conns = {True: _side(ConnectionType.SERVER, deflate), False: _side(ConnectionType.CLIENT, deflate)}
        self._parts: dict[bool, list] = {True: [], False: []}
        self._sizes = {True: 0, False: 0}
        self._onward: list[bytes] = []
        self._from_client = True
        self._writer = MessageWriter(self._send_on)
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
        src = self._conns[from_client]
        if src.state is ConnectionState.CLOSED or self.close_code is not None:
            return b"", b""  # after the closing handshake nothing more is read as frames
        src.receive_data(data)
        back: list[bytes] = []
        self._onward, self._from_client = [], from_client
        for event in src.events():
            if isinstance(event, Message):
                self._data(event, from_client, back)
            elif isinstance(event, CloseConnection):
                self._closed(event, src, back)
            elif isinstance(event, (Ping, Pong)):
                self._pass_on(event)
            if self.close_code is not None:
                break
        return b"".join(back), b"".join(self._onward)

    def close_both(self, code: int, reason: str) -> tuple[bytes, bytes]:
        """Close frames (to the client, to the upstream) ending the tunnel from the proxy's side."""
        self.close_code, self.close_reason = code, reason
        frames = []
        for conn in (self._conns[True], self._conns[False]):
            closing = conn.state in _SENDING
            frames.append(bytes(conn.send(CloseConnection(code, reason))) if closing else b"")
        return frames[0], frames[1]

    # -- events ------------------------------------------------------------

    def _data(self, event: Message, from_client: bool, back: list[bytes]) -> None:
        parts = self._parts[from_client]
        parts.append(event.data)
        size = self._sizes[from_client] = self._sizes[from_client] + len(event.data)
        if size > self._max or (isinstance(event.data, str) and 4 * size > self._max and
                                sum(len(p.encode("utf-8")) for p in parts) > self._max):
            self._proxy_close(from_client, back, CloseReason.MESSAGE_TOO_BIG,
                              f"message over the proxy's cap of {self._max} bytes")
            return
        if not event.message_finished:
            return
        data = "".join(parts) if isinstance(event, TextMessage) else b"".join(parts)
        parts.clear()
        self._sizes[from_client] = 0
        if from_client:
            self._stats.messages_from_client += 1
        else:
            self._stats.messages_from_upstream += 1
        try:
            self._on_message(WebSocketMessage(data, from_client), self._writer, self._stats)
        except Exception as exc:
            self.hook_failure = exc
            self._proxy_close(from_client, back, CloseReason.INTERNAL_ERROR, "message hook failed")

    def _send_on(self, data: str | bytes) -> None:
        """``out.send``: a message onward, in the direction of the message being handled."""
        dst = self._conns[not self._from_client]
        if dst.state is ConnectionState.OPEN:  # once that side is closing, a message cannot follow
            event = TextMessage(data=data) if isinstance(data, str) else BytesMessage(data=data)
            self._onward.append(bytes(dst.send(event)))

    def _pass_on(self, event: Ping | Pong) -> None:
        dst = self._conns[not self._from_client]
        if dst.state is ConnectionState.OPEN:
            self._onward.append(bytes(dst.send(type(event)(payload=bytes(event.payload)))))

    def _closed(self, event: CloseConnection, src: Connection, back: list[bytes]) -> None:
        if src.state is ConnectionState.OPEN:  # not a close frame: wsproto could not parse what came
            self._proxy_close(self._from_client, back, event.code, event.reason or "protocol error")
            return
        self.closed_first = self.closed_first or ("client" if self._from_client else "upstream")
        dst = self._conns[not self._from_client]
        if dst.state in _SENDING:
            self._onward.append(bytes(dst.send(CloseConnection(event.code, event.reason or None))))

    def _proxy_close(self, from_client: bool, back: list[bytes], code: int, reason: str) -> None:
        to_client, to_upstream = self.close_both(code, reason)
        back.append(to_client if from_client else to_upstream)
        self._onward.append(to_upstream if from_client else to_client)


def _side(kind: ConnectionType, deflate: str | None) -> Connection:
    extensions = []
    if deflate is not None:
        extension = PerMessageDeflate()
        extension.finalize(deflate)  # the parameters both ends agreed on, as the upstream's 101 gave them
        extensions.append(extension)
    return Connection(kind, extensions)
