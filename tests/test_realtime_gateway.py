"""examples/realtime_gateway.py under the real gunicorn, in front of a real WebSocket server."""
import json
import time

import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from tests.support.gunicorn import Gunicorn
from tests.support.websocket import WebSocketUpstream


@pytest.fixture(scope="module")
def realtime(tmp_path_factory):
    upstream = WebSocketUpstream()
    usage = tmp_path_factory.mktemp("realtime") / "usage.jsonl"
    g = Gunicorn("examples.realtime_gateway:app", env={
        "REALTIME_UPSTREAM": upstream.url, "REALTIME_UPSTREAM_KEY": "real-secret",
        "REALTIME_CLIENT_KEYS": "client-1,client-2", "REALTIME_USAGE_LOG": str(usage)}).start()
    g.upstream, g.usage = upstream, usage
    yield g
    g.stop()
    upstream.close()


def sessions(g, path):
    lines = g.usage.read_text().splitlines() if g.usage.exists() else []
    return [r for r in map(json.loads, lines) if r["path"] == path]


def wait_session(g, path, timeout=10):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sessions(g, path):
            time.sleep(0.05)
            return sessions(g, path)
        time.sleep(0.02)
    raise AssertionError(f"no session line for {path}")


def test_a_session_gets_the_real_key_and_is_billed_once_with_its_usage(realtime):
    url = realtime.url.replace("http://", "ws://") + "/usage/v1/realtime?model=gpt-realtime"
    with connect(url, additional_headers={"Authorization": "Bearer client-1"}) as ws:
        for text in ("hello", "how are you"):
            ws.send(text)
            assert json.loads(ws.recv())["type"] == "response.text.delta"
            assert json.loads(ws.recv())["type"] == "response.done"
    path, headers = realtime.upstream.seen[-1]
    assert path.startswith("/usage/v1/realtime") and headers["Authorization"] == "Bearer real-secret"
    (record,) = wait_session(realtime, "/usage/v1/realtime")
    assert record["usage"] == {"input_tokens": 16, "output_tokens": 32, "total_tokens": 48}
    assert (record["messages_from_client"], record["messages_from_upstream"]) == (2, 4)
    assert record["closed_by"] == "client" and not record["errored"]
    assert record["client"] and "client-1" not in json.dumps(record)


def test_an_unknown_key_gets_401_and_no_session_opens(realtime):
    before = len(realtime.upstream.seen)
    with pytest.raises(InvalidStatus) as caught:
        connect(realtime.url.replace("http://", "ws://") + "/usage/denied",
                additional_headers={"Authorization": "Bearer stolen"})
    assert caught.value.response.status_code == 401
    assert json.loads(caught.value.response.body)["error"]["type"] == "unauthorized"
    assert len(realtime.upstream.seen) == before
