"""The bundled demo upstream behind the ready-made app: what scripts/serve runs."""
import json
import threading

import pytest

from forkproxy import demo_upstream
from tests.support.client import request
from tests.support.gunicorn import Gunicorn


@pytest.fixture(scope="module")
def demo_proxy():
    server = demo_upstream.serve(port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    g = Gunicorn("forkproxy.app", env={"FORKPROXY_UPSTREAM": f"http://127.0.0.1:{server.server_address[1]}"}).start()
    yield g
    g.stop()
    server.shutdown()


def test_models(demo_proxy):
    reply = request(demo_proxy.url, "GET", "/v1/models")
    assert [m["id"] for m in reply.json()["data"]] == ["demo-small", "demo-large"]


def test_buffered_chat_completion(demo_proxy):
    body = json.dumps({"model": "demo-large", "messages": [{"role": "user", "content": "hello proxy"}]}).encode()
    reply = request(demo_proxy.url, "POST", "/v1/chat/completions", body=body,
                    headers={"Content-Type": "application/json"})
    data = reply.json()
    assert data["model"] == "demo-large"
    assert data["choices"][0]["message"]["content"] == "You said: hello proxy"
    assert data["usage"]["completion_tokens"] == 4


def test_streamed_chat_completion_arrives_as_sse(demo_proxy):
    body = json.dumps({"stream": True, "messages": [{"role": "user", "content": "a b"}]}).encode()
    reply = request(demo_proxy.url, "POST", "/v1/chat/completions", body=body)
    assert reply.header("Content-Type") == "text/event-stream"
    assert reply.header("X-Accel-Buffering") == "no"
    events = [e for e in reply.body.split(b"\n\n") if e]
    assert events[-1] == b"data: [DONE]"
    words = [json.loads(e[6:])["choices"][0]["delta"].get("content", "") for e in events[:-1]
             if json.loads(e[6:])["choices"]]
    assert "".join(words) == "You said: a b"


def test_echo(demo_proxy):
    reply = request(demo_proxy.url, "POST", "/echo/x?y=1", body=b"hi")
    assert reply.json()["path"] == "/echo/x?y=1" and reply.json()["body"] == "hi"
