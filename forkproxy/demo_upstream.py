"""A small OpenAI-compatible mock, so forkproxy has something to proxy.

    python -m forkproxy.demo_upstream --port 9000

GET /v1/models; POST /v1/chat/completions (buffered, or an SSE stream with
"stream": true, ending in a usage chunk and ``data: [DONE]``); anything else
under /echo is echoed back as JSON.
"""
from __future__ import annotations

import argparse
import json
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MODELS = ["demo-small", "demo-large"]


def completion_words(messages: list) -> list[str]:
    last = next((m.get("content", "") for m in reversed(messages) if isinstance(m, dict)), "")
    return f"You said: {last}".split() if last else ["Hello", "from", "the", "demo", "upstream."]


class DemoHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "forkproxy-demo/1"

    def log_message(self, fmt: str, *args) -> None:  # quiet: the proxy logs requests
        pass

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _json(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if self.path == "/v1/models":
            return self._json(200, {"object": "list", "data": [{"id": m, "object": "model"} for m in MODELS]})
        self._echo(b"")

    def do_POST(self) -> None:
        body = self._body()
        if self.path == "/v1/chat/completions":
            return self._chat(body)
        self._echo(body)

    do_PUT = do_PATCH = do_DELETE = do_POST

    def _echo(self, body: bytes) -> None:
        self._json(200, {
            "method": self.command,
            "path": self.path,
            "headers": dict(self.headers.items()),
            "body": body.decode("utf-8", "replace"),
        })

    def _chat(self, body: bytes) -> None:
        try:
            request = json.loads(body or b"{}")
        except ValueError:
            return self._json(400, {"error": {"message": "body is not JSON", "type": "invalid_request_error"}})
        model = request.get("model", MODELS[0])
        words = completion_words(request.get("messages", []))
        usage = {"prompt_tokens": len(json.dumps(request.get("messages", [])).split()),
                 "completion_tokens": len(words)}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        if request.get("stream"):
            return self._stream(model, words, usage)
        self._json(200, {
            "id": "chatcmpl-demo", "object": "chat.completion", "model": model,
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": " ".join(words)}}],
            "usage": usage,
        })

    def _stream(self, model: str, words: list[str], usage: dict) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        base = {"id": "chatcmpl-demo", "object": "chat.completion.chunk", "model": model}
        for i, word in enumerate(words):
            delta = {"content": (" " if i else "") + word}
            self._event({**base, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]})
            time.sleep(0.05)
        self._event({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
        self._event({**base, "choices": [], "usage": usage})
        self._chunk(b"data: [DONE]\n\n")
        self._chunk(b"")

    def _event(self, payload: dict) -> None:
        self._chunk(b"data: " + json.dumps(payload).encode() + b"\n\n")

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()


def serve(host: str = "127.0.0.1", port: int = 9000) -> ThreadingHTTPServer:
    server = ThreadingHTTPServer((host, port), DemoHandler)
    server.daemon_threads = True
    return server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    args = parser.parse_args()
    server = serve(args.host, args.port)
    print(f"demo upstream on http://{args.host}:{server.server_address[1]}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
