"""WebSocket load for the benchmark: an echo upstream and a client that measures.

    python -m scripts.benchkit.ws serve PORT
    python -m scripts.benchkit.ws latency URL TUNNELS ROUNDS INTERVAL_MS   -> JSON on stdout
    python -m scripts.benchkit.ws rate URL TUNNELS SECONDS WINDOW          -> JSON on stdout
    python -m scripts.benchkit.ws hold URL TUNNELS SECONDS                 -> "READY n" when all are open

Both ends speak just enough WebSocket for small text messages (a 2-byte
header, masked from the client): the bench's upstream and client must cost
little beside the proxy they measure, so they do not parse frames with a
general library. The proxy under test does (wsproto, with message hooks) or
copies bytes (without).
"""
from gevent import monkey

monkey.patch_all()

import base64  # noqa: E402
import hashlib  # noqa: E402
import os  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from urllib.parse import urlsplit  # noqa: E402

import gevent  # noqa: E402

from scripts.benchkit.sse import command_line, hold_open, read_request_head, serve_with  # noqa: E402

_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
PAYLOAD = b"bench-message-16"  # 16 bytes: the echo is 18


def _masked(payload: bytes) -> bytes:
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes((0x81, 0x80 | len(payload))) + mask + masked


FRAME = _masked(PAYLOAD)
ECHO_LEN = 2 + len(PAYLOAD)


# -- the upstream ----------------------------------------------------------------


def _accept(head: bytes) -> bytes:
    key = next(line.split(b":", 1)[1].strip() for line in head.split(b"\r\n")
               if line.lower().startswith(b"sec-websocket-key:"))
    accept = base64.b64encode(hashlib.sha1(key + _GUID.encode()).digest())
    return b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n" \
           b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n"


def handle(conn: socket.socket, addr) -> None:
    try:
        got = read_request_head(conn, b"")
        if got is None:
            return
        head, buf = got
        conn.sendall(_accept(head))
        while True:
            out = []
            while len(buf) >= 6 and len(buf) >= 6 + (buf[1] & 0x7F):
                opcode, length = buf[0] & 0x0F, buf[1] & 0x7F
                mask, payload = buf[2:6], buf[6:6 + length]
                buf = buf[6 + length:]
                data = (int.from_bytes(payload, "big") ^ int.from_bytes((mask * 32)[:length], "big")).to_bytes(
                    length, "big")
                if opcode == 8:  # close: answer it and end
                    conn.sendall(b"".join(out) + bytes((0x88, length)) + data)
                    return
                out.append(bytes((0x80 | opcode, length)) + data)
            if out:
                conn.sendall(b"".join(out))
            data = conn.recv(65536)
            if not data:
                return
            buf += data
    except OSError:
        return
    finally:
        conn.close()


def serve(port: int) -> None:
    serve_with(handle, port)


# -- the client ------------------------------------------------------------------


def _open(url: str, timeout: float = 60) -> socket.socket:
    parts = urlsplit(url)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=timeout)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall((f"GET /b/ws HTTP/1.1\r\nHost: bench\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
                  f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
    data = b""
    while b"\r\n\r\n" not in data:
        got = sock.recv(65536)
        if not got:
            raise OSError("closed during the handshake")
        data += got
    if not data.startswith(b"HTTP/1.1 101"):
        raise OSError(f"no 101: {data[:60]!r}")
    return sock


def _read_exactly(sock: socket.socket, count: int) -> None:
    while count > 0:
        got = sock.recv(max(count, 65536))
        if not got:
            raise OSError("closed")
        count -= len(got)


def _rtts(url: str, rounds: int, interval: float, out: list) -> None:
    sock = _open(url)
    try:
        for _ in range(rounds):
            gevent.sleep(interval)
            sent = time.perf_counter()
            sock.sendall(FRAME)
            _read_exactly(sock, ECHO_LEN)
            out.append((time.perf_counter() - sent) * 1000)
    except OSError:
        pass
    finally:
        sock.close()


def latency(url: str, tunnels: int, rounds: int, interval_ms: float) -> dict:
    samples: list[float] = []
    socks_jobs = [gevent.spawn(_rtts, url, rounds, interval_ms / 1000, samples) for _ in range(tunnels)]
    gevent.joinall(socks_jobs)
    samples.sort()
    return {"samples": len(samples), "expected": tunnels * rounds,
            "p50_ms": statistics.median(samples) if samples else None,
            "p99_ms": samples[int(len(samples) * 0.99) - 1] if samples else None}


def _pump(url: str, seconds: float, window: int, counts: list) -> None:
    sock = _open(url)
    done = 0
    try:
        sock.sendall(FRAME * window)
        owed, deadline = 0, time.monotonic() + seconds
        while time.monotonic() < deadline:
            got = sock.recv(65536)
            if not got:
                break
            owed += len(got)
            echoed, owed = divmod(owed, ECHO_LEN)
            done += echoed
            if echoed:
                sock.sendall(FRAME * echoed)
    except OSError:
        pass
    finally:
        counts.append(done)
        sock.close()


def rate(url: str, tunnels: int, seconds: float, window: int) -> dict:
    counts: list[int] = []
    gevent.joinall([gevent.spawn(_pump, url, seconds, window, counts) for _ in range(tunnels)])
    return {"messages": sum(counts), "per_s": sum(counts) / seconds}


def hold(url: str, tunnels: int, seconds: float) -> None:
    hold_open(lambda: _open(url, timeout=120), tunnels, seconds)


if __name__ == "__main__":
    command_line({"serve": (serve, (int,)), "latency": (latency, (str, int, int, float)),
                  "rate": (rate, (str, int, float, int)), "hold": (hold, (str, int, float))})
