"""A real WebSocket upstream for the tunnel tests, written with the ``websockets`` library.

The server runs its asyncio loop in a thread on 127.0.0.1 (ephemeral port).
The path picks the behaviour:

- ``/echo``: every message back as it came (text as text, binary as binary);
- ``/burst/N``: on the first message, N numbered text messages back in order;
- ``/close/CODE``: on the first message, a close with CODE and reason "bye";
- ``/usage``: on each message, two realtime-API style JSON events back, the second with usage;
- ``/reject``: the handshake is refused with 403;
- anything else: echo.

Each handshake's request headers are recorded in ``seen`` (path, headers).
"""
from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import json
import threading
from http import HTTPStatus

from websockets.asyncio.server import serve
from websockets.exceptions import ConnectionClosed


class WebSocketUpstream:
    def __init__(self, subprotocols: list[str] | None = None, compression: str | None = "deflate",
                 ssl_context=None) -> None:
        self.seen: list[tuple[str, dict]] = []
        self.closed: list[tuple[str, int | None]] = []  # (path, close code received) per connection
        self._subprotocols = subprotocols
        self._compression = compression
        self._ssl = ssl_context
        self._loop = asyncio.new_event_loop()
        started = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(started,), daemon=True)
        self._thread.start()
        started.wait(10)
        self.url = f"{'https' if ssl_context else 'http'}://127.0.0.1:{self.port}"

    def _run(self, started: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._start())
        started.set()
        self._loop.run_forever()

    async def _start(self) -> None:
        self._server = await serve(self._handle, "127.0.0.1", 0, process_request=self._process,
                                   select_subprotocol=self._pick, compression=self._compression,
                                   max_size=64 * 1024 * 1024, ping_interval=None, ssl=self._ssl)
        self.port = self._server.sockets[0].getsockname()[1]

    def _pick(self, connection, offered):
        """The server's first preference the client offered; none (not a refusal) when it offered none."""
        return next((p for p in self._subprotocols or () if p in offered), None)

    def _process(self, connection, request):
        self.seen.append((request.path, request.headers))  # case-insensitive
        if request.path.startswith("/reject"):
            return connection.respond(HTTPStatus.FORBIDDEN, "no tunnel for you\n")
        return None

    async def _handle(self, ws) -> None:
        path = ws.request.path
        try:
            if path.startswith("/burst/"):
                await ws.recv()
                for i in range(int(path.rsplit("/", 1)[1])):
                    await ws.send(f"m{i}")
                await ws.wait_closed()
            elif path.startswith("/close/"):
                await ws.recv()
                await ws.close(int(path.rsplit("/", 1)[1]), "bye")
            elif path.startswith("/usage"):
                async for message in ws:
                    await ws.send(json.dumps({"type": "response.text.delta", "delta": str(message)[:10]}))
                    tokens = len(str(message))
                    await ws.send(json.dumps({"type": "response.done", "response": {"usage": {
                        "input_tokens": tokens, "output_tokens": 2 * tokens, "total_tokens": 3 * tokens}}}))
            else:
                async for message in ws:
                    await ws.send(message)
        except ConnectionClosed:
            pass
        finally:
            self.closed.append((path, ws.close_code))

    def close(self) -> None:
        async def stop() -> None:
            self._server.close()
            await self._server.wait_closed()
        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


def handshake_request(path: str = "/echo", extra: str = "", key: str | None = None) -> bytes:
    """A client's WebSocket opening handshake as raw bytes."""
    key = key or base64.b64encode(os.urandom(16)).decode()
    return (f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n").encode()


def accept_for(key: str) -> str:
    return base64.b64encode(hashlib.sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()).decode()


def read_head(sock, data: bytes = b"") -> tuple[bytes, bytes]:
    """(response head, bytes after it) read from ``sock``."""
    while b"\r\n\r\n" not in data:
        got = sock.recv(65536)
        if not got:
            raise AssertionError(f"connection ended inside the head: {data!r}")
        data += got
    head, _, rest = data.partition(b"\r\n\r\n")
    return head + b"\r\n\r\n", rest


def read_to_close(sock, data: bytes = b"", timeout: float = 10) -> bytes:
    sock.settimeout(timeout)
    while True:
        got = sock.recv(65536)
        if not got:
            return data
        data += got


def switching(handle_after, fields: bytes = b""):
    """A raw upstream handler: read the request head, answer 101 (websocket, plus ``fields``), then
    ``handle_after(conn, head, reply)``, which sends the 101 ``reply``."""
    from tests.support.servers import read_request_head

    def handle(conn) -> None:
        head = read_request_head(conn)
        key = next((line.split(b":", 1)[1].strip().decode() for line in head.split(b"\r\n")
                    if line.lower().startswith(b"sec-websocket-key:")), "")
        reply = (f"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 f"Sec-WebSocket-Accept: {accept_for(key)}\r\n").encode() + fields + b"\r\n"
        handle_after(conn, head, reply)
    return handle
