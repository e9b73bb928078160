"""Real upstream servers on 127.0.0.1 for the tests.

``Upstream`` is a threaded HTTP/1.1 server whose routes each test registers
(and which records every request it got), also behind TLS (``behind_tls``);
``RawServer`` hands each accepted socket to a function, for upstreams that
misbehave on purpose; ``Scripted`` answers requests in turn as a script says.
"""
from __future__ import annotations

import socket
import ssl
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from contextlib import contextmanager
from typing import Callable, Iterator


@dataclass
class Seen:
    """One request as the upstream received it."""

    method: str
    path: str
    headers: list[tuple[str, str]]
    body: bytes
    peer_port: int
    target: str = ""  # the request target exactly as sent (http.server folds a leading //)
    at: float = field(default_factory=time.monotonic)

    def header(self, name: str) -> str | None:
        values = self.all(name)
        return values[0] if values else None

    def all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def setup(self) -> None:
        super().setup()
        self.server.upstream.connections.add(self.connection)

    def finish(self) -> None:
        self.server.upstream.connections.discard(self.connection)
        super().finish()

    def handle_one_request(self) -> None:
        try:
            super().handle_one_request()
        except (ConnectionError, BrokenPipeError):
            self.close_connection = True

    def _any(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            body = self._read_chunked()
        else:
            body = self.rfile.read(length) if length else b""
        seen = Seen(self.command, self.path, list(self.headers.items()), body, self.client_address[1],
                    target=self.requestline.split(" ")[1])
        self.server.upstream.record(seen)
        route = self.server.upstream.route_for(self.path)
        route(self, seen)

    def _read_chunked(self) -> bytes:
        parts = []
        while True:
            size = int(self.rfile.readline().split(b";")[0], 16)
            if size == 0:
                self.rfile.readline()
                return b"".join(parts)
            parts.append(self.rfile.read(size))
            self.rfile.readline()

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = _any

    # helpers for routes
    def reply(self, status: int = 200, body: bytes = b"", headers: list[tuple[str, str]] = (),
              content_type: str = "text/plain") -> None:
        self.send_response(status)
        names = {k.lower() for k, _ in headers}
        if "content-type" not in names:
            self.send_header("Content-Type", content_type)
        for k, v in headers:
            self.send_header(k, v)
        if "content-length" not in names and "transfer-encoding" not in names:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD" and status not in (204, 304):
            self.wfile.write(body)

    def start_chunked(self, status: int = 200, headers: list[tuple[str, str]] = (),
                      content_type: str = "text/plain") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.wfile.flush()

    def chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def end_chunked(self) -> None:
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024  # the default of 5 drops SYNs when hundreds connect at once


def echo(handler: Handler, seen: Seen) -> None:
    import json
    handler.reply(200, json.dumps({
        "method": seen.method, "path": seen.path, "headers": seen.headers,
        "body": seen.body.decode("latin-1"),
    }).encode(), content_type="application/json")


def event_stream(count: int, *, gap: float = 0.0,
                 before: Callable[[], object] | None = None) -> Callable[[Handler, Seen], None]:
    """A route answering with events ``data: 0`` .. ``data: count-1``, one chunk each, ``gap`` s apart.

    ``before`` runs after the head went out and before the first event.
    """
    def route(handler: Handler, seen: Seen) -> None:
        handler.start_chunked(content_type="text/event-stream")
        if before is not None:
            before()
        for i in range(count):
            handler.chunk(b"data: %d\n\n" % i)
            if gap:
                time.sleep(gap)
        handler.end_chunked()
    return route


class Upstream:
    """A programmable upstream: ``route(prefix, fn)``; unknown paths echo."""

    def __init__(self, port: int = 0) -> None:
        self._routes: dict[str, Callable[[Handler, Seen], None]] = {}
        self._seen: list[Seen] = []
        self._lock = threading.Lock()
        self.connections: set[socket.socket] = set()
        self.server = Server(("127.0.0.1", port), Handler)
        self.server.upstream = self
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def route(self, prefix: str, fn: Callable[[Handler, Seen], None]) -> None:
        self._routes[prefix] = fn

    def route_for(self, path: str) -> Callable[[Handler, Seen], None]:
        best = max((p for p in self._routes if path.startswith(p)), key=len, default=None)
        return self._routes[best] if best is not None else echo

    def record(self, seen: Seen) -> None:
        with self._lock:
            self._seen.append(seen)

    def seen(self, prefix: str = "") -> list[Seen]:
        with self._lock:
            return [s for s in self._seen if s.path.startswith(prefix) or s.target.startswith(prefix)]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def kill(self) -> None:
        """Die as a crashed server does: no new connections, and the open ones reset."""
        self.close()
        for conn in list(self.connections):
            reset(conn)


def reset(conn: socket.socket) -> None:
    """Reset a connection (RST, not FIN), as a crashed peer does."""
    try:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        conn.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


class _TLSHandler(Handler):
    def setup(self) -> None:
        self.request.do_handshake()  # in this connection's thread: a peer that sends nothing stalls only it
        super().setup()


class _TLSServer(Server):
    def handle_error(self, request, client_address) -> None:
        if not isinstance(sys.exc_info()[1], OSError):  # a handshake the client broke off is no server error
            super().handle_error(request, client_address)


def behind_tls(upstream: Upstream, cert) -> Server:
    """A second listener for ``upstream``'s routes, speaking TLS with ``cert`` (a trustme cert).

    Its address is ``.url`` (https); stop it with ``shutdown()`` and ``server_close()``.
    """
    tls = _TLSServer(("127.0.0.1", 0), _TLSHandler)
    tls.upstream = upstream
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    cert.configure_cert(context)
    tls.socket = context.wrap_socket(tls.socket, server_side=True, do_handshake_on_connect=False)
    tls.url = f"https://127.0.0.1:{tls.server_address[1]}"
    threading.Thread(target=tls.serve_forever, daemon=True).start()
    return tls


def over_tls(handle: Callable[[socket.socket], None], cert) -> Callable[[socket.socket], None]:
    """``handle`` for a ``RawServer`` whose connections speak TLS with ``cert`` (a trustme cert).

    ``handle`` gets the TLS socket once the handshake is done; the server's
    URL is then ``https://127.0.0.1:<port>``.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    cert.configure_cert(context)

    def serve(conn: socket.socket) -> None:
        with context.wrap_socket(conn, server_side=True) as tls:
            handle(tls)
    return serve


class RawServer:
    """Accepts connections and runs ``handle(sock)`` for each in a thread."""

    def __init__(self, handle: Callable[[socket.socket], None], backlog: int = 128) -> None:
        self.handle = handle
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(backlog)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.accepted = 0
        self._closed = False
        threading.Thread(target=self._loop, daemon=True).start()

    def _loop(self) -> None:
        while not self._closed:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=self._run, args=(conn,), daemon=True).start()

    def _run(self, conn: socket.socket) -> None:
        try:
            self.handle(conn)
        except OSError:
            pass
        finally:
            conn.close()

    def close(self) -> None:
        self._closed = True
        self.sock.close()


class Scripted(RawServer):
    """A keep-alive upstream that answers each request head it reads, in arrival order, as ``script`` says.

    An int answers with that status (and a 2-byte body); ``"close"`` closes the
    connection unanswered. Once the script is spent every request gets 200.
    ``got`` counts the heads read. For requests without a body only.
    """

    def __init__(self, script: list[int | str]) -> None:
        self.script = list(script)
        self.got = 0
        self._lock = threading.Lock()
        super().__init__(self._serve)

    def _serve(self, conn: socket.socket) -> None:
        while read_request_head(conn):
            with self._lock:
                self.got += 1
                action = self.script.pop(0) if self.script else 200
            if action == "close":
                return
            conn.sendall(b"HTTP/1.1 %d Scripted\r\nContent-Length: 2\r\n\r\nok" % action)


@contextmanager
def answering(reply: bytes) -> Iterator[RawServer]:
    """A raw upstream that reads each request head and answers with ``reply`` exactly as given."""
    server = RawServer(lambda conn: (read_request_head(conn), conn.sendall(reply)))
    try:
        yield server
    finally:
        server.close()


def read_request_head(conn: socket.socket, limit: int = 65536) -> bytes:
    """Read up to the end of a request head; what a raw upstream needs first."""
    data = b""
    while b"\r\n\r\n" not in data and len(data) < limit:
        part = conn.recv(4096)
        if not part:
            break
        data += part
    return data


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def servers(n: int) -> Iterator[list[Upstream]]:
    """``n`` well-behaved upstream servers, closed afterwards."""
    started = [Upstream() for _ in range(n)]
    try:
        yield started
    finally:
        for server in started:
            server.close()


def silent_after_one_event(proxy_hung_up: threading.Event) -> "RawServer":
    """An upstream event stream that sends one event, then nothing (a model thinking); it sets
    ``proxy_hung_up`` when the proxy closes the connection."""
    def script(conn: socket.socket) -> None:
        read_request_head(conn)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"9\r\ndata: 0\n\n\r\n")
        conn.settimeout(30)
        try:
            if conn.recv(1) == b"":
                proxy_hung_up.set()
        except OSError:
            proxy_hung_up.set()
    return RawServer(script)
