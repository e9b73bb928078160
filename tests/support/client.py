"""HTTP clients for the tests: http.client for ordinary requests, raw sockets
for bytes no well-behaved client would send."""
from __future__ import annotations

import http.client
import json
import socket
from dataclasses import dataclass


@dataclass
class Reply:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        values = self.all(name)
        return values[0] if values else None

    def all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]

    def json(self):
        return json.loads(self.body)

    def error_type(self) -> str:
        assert self.header("content-type") == "application/json", self.headers
        return self.json()["error"]["type"]


def request(url: str, method: str = "GET", path: str = "/", body: bytes | None = None,
            headers: dict | list | None = None, timeout: float = 15) -> Reply:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        conn.putrequest(method, path, skip_host=_has(headers, "host"), skip_accept_encoding=True)
        items = headers.items() if isinstance(headers, dict) else (headers or [])
        for k, v in items:
            conn.putheader(k, v)
        if body is not None and not _has(headers, "content-length") and not _has(headers, "transfer-encoding"):
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        resp = conn.getresponse()
        return Reply(resp.status, resp.getheaders(), resp.read())
    finally:
        conn.close()


def _has(headers, name: str) -> bool:
    items = headers.items() if isinstance(headers, dict) else (headers or [])
    return any(k.lower() == name for k, _ in items)


def raw(url: str, data: bytes, timeout: float = 10, read_until_close: bool = True) -> bytes:
    """Send bytes as they are; return everything the server sends back."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(data)
        if not read_until_close:
            return read_response_bytes(sock)
        out = b""
        while True:
            try:
                part = sock.recv(65536)
            except (ConnectionResetError, TimeoutError):
                break
            if not part:
                break
            out += part
        return out


def read_response_bytes(sock: socket.socket) -> bytes:
    """One response with a Content-Length body, read off a raw socket."""
    data = b""
    while b"\r\n\r\n" not in data:
        part = sock.recv(65536)
        if not part:
            return data
        data += part
    head, _, rest = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(rest) < length:
        part = sock.recv(65536)
        if not part:
            break
        rest += part
    return head + b"\r\n\r\n" + rest


def status_of(raw_reply: bytes) -> int:
    return int(raw_reply.split(b" ", 2)[1])


class Truncated(Exception):
    """The connection closed before the terminating chunk."""


class StreamClient:
    """Reads a chunked reply piece by piece, as each chunk arrives."""

    def __init__(self, url: str, path: str = "/", method: str = "GET", headers: dict | None = None,
                 body: bytes = b"", timeout: float = 10) -> None:
        host, port = url.removeprefix("http://").split(":")
        self.sock = socket.create_connection((host, int(port)), timeout=timeout)
        lines = [f"{method} {path} HTTP/1.1", "Host: test"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        if body or method in ("POST", "PUT"):
            lines.append(f"Content-Length: {len(body)}")
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        self.buf = b""
        self.status = 0
        self.headers: list[tuple[str, str]] = []

    def _fill(self) -> None:
        try:
            part = self.sock.recv(65536)
        except ConnectionResetError:
            part = b""
        if not part:
            raise Truncated(self.buf[:200])
        self.buf += part

    def _line(self) -> bytes:
        while b"\r\n" not in self.buf:
            self._fill()
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line

    def read_head(self) -> int:
        status_line = self._line()
        self.status = int(status_line.split()[1])
        while True:
            line = self._line()
            if not line:
                break
            name, _, value = line.decode("latin-1").partition(":")
            self.headers.append((name.strip(), value.strip()))
        return self.status

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)

    def next_chunk(self) -> bytes | None:
        """The next chunk's data, or None after the terminating chunk."""
        size = int(self._line().split(b";")[0], 16)
        while len(self.buf) < size + 2:
            self._fill()
        data, self.buf = self.buf[:size], self.buf[size + 2:]
        return data if size else None

    def read_rest(self) -> list[bytes]:
        chunks = []
        while (chunk := self.next_chunk()) is not None:
            chunks.append(chunk)
        return chunks

    def close(self) -> None:
        self.sock.close()
