"""An OpenAI-compatible mock upstream for the LLM workloads, and a client that times the first chunk.

    python -m scripts.benchkit.openai serve PORT
    python -m scripts.benchkit.openai ttfc URL COUNT CONCURRENCY     -> JSON on stdout

``POST /v1/chat/completions`` answers at once: a ~1 KiB chat.completion, or
with ``"stream": true`` 50 ``chat.completion.chunk`` events, a usage chunk
and ``[DONE]``, chunked. ``ttfc`` sends streamed completions and measures,
per request, the time from sending to the first event's bytes.
"""
from gevent import monkey

monkey.patch_all()

import json  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from urllib.parse import urlsplit  # noqa: E402

import gevent  # noqa: E402

from scripts.benchkit.sse import command_line, read_request_head, serve_with  # noqa: E402

MODEL = "bench-model"
API_KEY = "sk-" + "5be7c0de" * 8  # what clients send; LiteLLM refuses to start without a strong master key
BODY = json.dumps({"model": MODEL, "stream": False,
                   "messages": [{"role": "user", "content": "Say something about proxies."}]}).encode()
STREAM_BODY = json.dumps({"model": MODEL, "stream": True,
                          "messages": [{"role": "user", "content": "Say something about proxies."}]}).encode()


def _completion() -> bytes:
    text = "A reverse proxy forwards requests to upstream servers and relays their answers. " * 11
    return json.dumps({
        "id": "chatcmpl-bench", "object": "chat.completion", "created": 1764633600, "model": MODEL,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text[:880]}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 12, "completion_tokens": 180, "total_tokens": 192}}).encode()


def _stream() -> bytes:
    def chunk(data: bytes) -> bytes:
        return b"%x\r\n%s\r\n" % (len(data), data)
    base = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1764633600, "model": MODEL}
    events = [json.dumps({**base, "choices": [{"index": 0, "delta": {"content": f"word{i} "},
                                               "finish_reason": None}]}) for i in range(49)]
    events.append(json.dumps({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}))
    events.append(json.dumps({**base, "choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": 50,
                                                                "total_tokens": 62}}))
    body = b"".join(chunk(b"data: " + e.encode() + b"\n\n") for e in events)
    return body + chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n"


COMPLETION, STREAM = _completion(), _stream()
_JSON_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(COMPLETION))
_SSE_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"


def handle(conn: socket.socket, addr) -> None:
    buf = b""
    try:
        while True:
            got = read_request_head(conn, buf)
            if got is None:
                return
            head, buf = got
            length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), 0)
            while len(buf) < length:
                data = conn.recv(65536)
                if not data:
                    return
                buf += data
            body, buf = buf[:length], buf[length:]
            if b'"stream": true' in body or b'"stream":true' in body:
                conn.sendall(_SSE_HEAD + STREAM)  # one write: a second small one would wait on delayed ACKs
            else:
                conn.sendall(_JSON_HEAD + COMPLETION)
    except OSError:
        return
    finally:
        conn.close()


def serve(port: int) -> None:
    serve_with(handle, port)


def _first_chunks(url: str, count: int, out: list) -> None:
    parts = urlsplit(url)
    request = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
               f"Authorization: Bearer {API_KEY}\r\nContent-Length: {len(STREAM_BODY)}\r\n\r\n").encode() + STREAM_BODY
    for _ in range(count):
        sock = socket.create_connection((parts.hostname, parts.port), timeout=30)
        try:
            sent = time.perf_counter()
            sock.sendall(request)
            data = b""
            while b"data: " not in data:
                got = sock.recv(65536)
                if not got:
                    break
                data += got
            if b"data: " in data:
                out.append((time.perf_counter() - sent) * 1000)
        finally:
            sock.close()


def ttfc(url: str, count: int, concurrency: int) -> dict:
    samples: list[float] = []
    gevent.joinall([gevent.spawn(_first_chunks, url, count // concurrency, samples) for _ in range(concurrency)])
    samples.sort()
    return {"samples": len(samples), "p50_ms": statistics.median(samples) if samples else None,
            "p99_ms": samples[max(0, int(len(samples) * 0.99) - 1)] if samples else None}


if __name__ == "__main__":
    command_line({"serve": (serve, (int,)), "ttfc": (ttfc, (str, int, int))})
