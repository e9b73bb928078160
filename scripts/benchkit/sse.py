"""SSE load for the benchmark: a timestamping upstream and a client that measures.

    python -m scripts.benchkit.sse serve PORT
    python -m scripts.benchkit.sse latency URL STREAMS EVENTS INTERVAL_MS   -> JSON on stdout
    python -m scripts.benchkit.sse hold URL STREAMS SECONDS                 -> "READY n" when all are open
                                                   (URL's path, or /b/hold)

Each event the upstream sends carries its send time; the client subtracts it
from its receive time, so the same figure measured direct and through a proxy
gives the latency the proxy adds.
"""
from gevent import monkey

monkey.patch_all()

import json  # noqa: E402
import re  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from urllib.parse import parse_qs, urlsplit  # noqa: E402

import gevent  # noqa: E402
import gevent.pool  # noqa: E402
from gevent.server import StreamServer  # noqa: E402

_EVENT = re.compile(rb"data: ([0-9.]+)\n\n")
_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n"


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _event() -> bytes:
    return _chunk(b"data: %.6f\n\n" % time.time())


def read_request_head(conn: socket.socket, buf: bytes) -> tuple[bytes, bytes] | None:
    """(head, the bytes after it), reading on from ``buf``; None when the client closed first."""
    while b"\r\n\r\n" not in buf:
        data = conn.recv(65536)
        if not data:
            return None
        buf += data
    head, _, rest = buf.partition(b"\r\n\r\n")
    return head, rest


def handle(conn: socket.socket, addr) -> None:
    buf = b""
    try:
        while True:
            got = read_request_head(conn, buf)
            if got is None:
                return
            head, buf = got
            target = head.split(b" ", 2)[1].decode()
            url = urlsplit(target)
            args = {k: v[0] for k, v in parse_qs(url.query).items()}
            conn.sendall(_HEAD)
            if url.path.endswith("/hold"):
                conn.sendall(_event())
                while conn.recv(65536):
                    pass
                return
            events, interval = int(args.get("events", 10)), float(args.get("interval", 100)) / 1000
            for _ in range(events):
                gevent.sleep(interval)
                conn.sendall(_event())
            conn.sendall(b"0\r\n\r\n")
    except OSError:
        return
    finally:
        conn.close()


def serve(port: int) -> None:
    serve_with(handle, port)


def serve_with(handler, port: int) -> None:
    """Serve ``handler(conn, addr)`` on 127.0.0.1:``port`` until killed (the bench's upstreams)."""
    StreamServer(("127.0.0.1", port), handler, backlog=8192).serve_forever()


def _open(url: str, path: str, timeout: float = 60) -> socket.socket:
    parts = urlsplit(url)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=timeout)
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: bench\r\nAccept: text/event-stream\r\n\r\n".encode())
    return sock


def _one_stream(url: str, events: int, interval: float, out: list) -> None:
    sock = _open(url, f"/b/sse?events={events}&interval={interval}", timeout=30)
    buf, seen = b"", 0
    try:
        while seen < events:
            try:
                data = sock.recv(65536)
            except OSError:  # a target that holds back or never sends: counted as missing events
                break
            now = time.time()
            if not data:
                break
            buf += data
            for match in _EVENT.finditer(buf):
                out.append((now - float(match.group(1))) * 1000)
                seen += 1
            cut = buf.rfind(b"\n\n")
            if cut >= 0:
                buf = buf[cut + 2:]
    finally:
        sock.close()


def latency(url: str, streams: int, events: int, interval: float) -> dict:
    """Per-event latency over ``streams`` streams, their starts spread evenly over one interval.

    Started together, every stream's events would fall due at the same
    instant: 500 of them in one burst, whose queueing in the upstream and the
    client (which share a CPU) would swamp what a proxy adds. Spread, they
    arrive at a steady rate (streams/interval events per ms).
    """
    samples: list[float] = []
    step = interval / 1000 / streams
    gevent.joinall([gevent.spawn_later(i * step, _one_stream, url, events, interval, samples)
                    for i in range(streams)])
    samples.sort()
    expected = streams * events
    return {
        "events": len(samples), "expected": expected,
        "p50_ms": statistics.median(samples) if samples else None,
        "p99_ms": samples[int(len(samples) * 0.99) - 1] if samples else None,
    }


def _first_event(url: str) -> socket.socket:
    sock = _open(url, urlsplit(url).path or "/b/hold", timeout=120)
    data = b""
    while b"data: " not in data:
        part = sock.recv(65536)
        if not part:
            raise OSError("closed before the first event")
        data += part
    return sock


def hold(url: str, streams: int, seconds: float) -> None:
    hold_open(lambda: _first_event(url), streams, seconds)


_OPENING = 256


def hold_open(open_one, count: int, seconds: float) -> None:
    """Open ``count`` connections with ``open_one``, say "READY n", hold them ``seconds``, close them.

    At most ``_OPENING`` are being opened at a time: thousands of connects at
    once overflow the listen queue (somaxconn) and fail instead of waiting.
    """
    socks = []
    opening = gevent.pool.Pool(_OPENING)
    for _ in range(count):
        opening.spawn(lambda: socks.append(open_one()))
    opening.join(timeout=120)
    print(f"READY {len(socks)}", flush=True)
    gevent.sleep(seconds)
    for sock in socks:
        sock.close()


def command_line(commands: dict) -> None:
    """Run ``NAME ARG...`` from argv: ``commands`` maps NAME to (function, argument types); results print as JSON."""
    name, *args = sys.argv[1:]
    function, kinds = commands[name]
    result = function(*(kind(arg) for kind, arg in zip(kinds, args)))
    if result is not None:
        print(json.dumps(result))


if __name__ == "__main__":
    command_line({"serve": (serve, (int,)), "latency": (latency, (str, int, int, float)),
                  "hold": (hold, (str, int, float))})
