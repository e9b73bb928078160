"""forkproxy behind a real nginx running the shipped site config."""
import tempfile
import threading
import uuid
from pathlib import Path

import pytest

from tests.support.client import StreamClient, request
from tests.support.gunicorn import Gunicorn
from tests.support.nginx import NGINX, Nginx
from tests.support.servers import RawServer, free_port, read_request_head, silent_after_one_event
from tests.support.websocket import WebSocketUpstream
from websockets.sync.client import connect

pytestmark = pytest.mark.skipif(NGINX is None, reason="nginx is not installed (.ci/run installs it)")


@pytest.fixture(scope="module")
def stack(upstream):
    sock_dir = Path(tempfile.mkdtemp(prefix="fp-sock-"))
    unix_path = sock_dir / "gunicorn.sock"
    g = Gunicorn("tests.apps.gateway:app", env={"TEST_UPSTREAM": upstream.url, "TEST_TIMEOUT": "1",
                                                "TEST_MAX_REQUEST": str(1024 * 1024)},
                 unix_path=str(unix_path)).start()
    tcp = Nginx(f"127.0.0.1:{g.port}")
    unix = Nginx(f"unix:{unix_path}")
    yield tcp, unix, g
    tcp.stop()
    unix.stop()
    g.stop()


def test_sse_events_pass_nginx_one_at_a_time(stack, upstream):
    tcp, _, _ = stack
    path = f"/ngx-sse/{uuid.uuid4().hex}"
    first_seen = threading.Event()
    waited = {}

    def route(h, s):
        h.start_chunked(content_type="text/event-stream")
        h.chunk(b"data: first\n\n")
        waited["first"] = first_seen.wait(5)  # the second event does not exist until the first arrived
        h.chunk(b"data: second\n\n")
        h.end_chunked()
    upstream.route(path, route)
    client = StreamClient(tcp.url, path)
    assert client.read_head() == 200
    assert client.next_chunk() == b"data: first\n\n"
    first_seen.set()
    assert b"".join(client.read_rest()) == b"data: second\n\n"
    assert waited["first"] is True


def test_a_client_that_leaves_a_silent_stream_through_nginx_ends_it_at_once(upstream):
    # nginx lets go of forkproxy's connection when its client leaves; the relay, waiting on a silent
    # upstream (stream_idle_timeout 60 s), notices that at once and hangs up on the upstream.
    g = Gunicorn("tests.apps.streams:app", env={"TEST_UPSTREAM": upstream.url, "TEST_IDLE": "60"}).start()
    front = Nginx(f"127.0.0.1:{g.port}")
    proxy_hung_up = threading.Event()
    silent = silent_after_one_event(proxy_hung_up)
    try:
        client = StreamClient(front.url, f"/ngx-left/{uuid.uuid4().hex}", headers={"X-Test-Upstream": silent.url})
        assert client.read_head() == 200
        assert client.next_chunk() == b"data: 0\n\n"
        client.close()
        assert proxy_hung_up.wait(10), "the upstream kept a stream whose client left through nginx"
    finally:
        silent.close()
        front.stop()
        g.stop()


def test_forwarded_chain_through_nginx(stack, upstream):
    tcp, _, _ = stack
    path = f"/ngx-xff/{uuid.uuid4().hex}"
    request(tcp.url, "GET", path, headers={"X-Forwarded-For": "203.0.113.9", "X-Forwarded-Proto": "https",
                                           "Host": "api.example"})
    (seen,) = upstream.seen(path)
    # nginx appends the client, forkproxy appends nginx: each hop names the peer it heard from
    assert seen.header("X-Forwarded-For") == "203.0.113.9, 127.0.0.1, 127.0.0.1"
    assert seen.header("X-Forwarded-Proto") == "http"  # nginx set it from its own $scheme
    assert seen.header("X-Forwarded-Host") == "api.example"
    assert seen.header("Host") == f"127.0.0.1:{upstream.port}"


def test_request_id_from_nginx_reaches_the_upstream(stack, upstream):
    tcp, _, _ = stack
    path = f"/ngx-rid/{uuid.uuid4().hex}"
    reply = request(tcp.url, "GET", path)
    rid = upstream.seen(path)[0].header("X-Request-ID")
    assert rid and len(rid) == 32 and reply.header("X-Request-ID") == rid
    path = f"/ngx-rid/{uuid.uuid4().hex}"
    request(tcp.url, "GET", path, headers={"X-Request-ID": "from-client"})
    assert upstream.seen(path)[0].header("X-Request-ID") == "from-client"


def test_forkproxy_json_errors_pass_nginx_unchanged(stack):
    tcp, _, _ = stack
    reply = request(tcp.url, "POST", "/big", body=b"x" * (1024 * 1024 + 10))
    assert reply.status == 413 and reply.error_type() == "payload_too_large"
    reply = request(tcp.url, "GET", "/x", headers={"X-Test-Upstream": f"http://127.0.0.1:{free_port()}"})
    assert reply.status == 502 and reply.error_type() == "upstream_unreachable"
    hold = threading.Event()
    server = RawServer(lambda conn: (read_request_head(conn), hold.wait(5)))
    try:
        reply = request(tcp.url, "GET", "/x", headers={"X-Test-Upstream": server.url})
        assert reply.status == 504 and reply.error_type() == "upstream_timeout"
    finally:
        hold.set()
        server.close()


def test_unix_socket_bind_behind_nginx(stack, upstream):
    _, unix, _ = stack
    path = f"/ngx-unix/{uuid.uuid4().hex}"
    reply = request(unix.url, "GET", path, headers={"X-Forwarded-For": "198.51.100.4"})
    assert reply.status == 200
    (seen,) = upstream.seen(path)
    assert seen.header("X-Forwarded-For").startswith("198.51.100.4, 127.0.0.1")


def test_a_websocket_tunnel_passes_nginx_and_ordinary_requests_keep_their_connections(upstream, tmp_path):
    ws_upstream = WebSocketUpstream()
    g = Gunicorn("tests.apps.tunnels:app", env={"TEST_UPSTREAM": ws_upstream.url,
                                                "TEST_RECORDS": str(tmp_path / "records.jsonl")}).start()
    front = Nginx(f"127.0.0.1:{g.port}")
    try:
        with connect(front.url.replace("http://", "ws://") + "/ngx-ws",
                     additional_headers={"Authorization": "Bearer client-key"}, max_size=None) as ws:
            for message in ("text", b"\x00binary", "x" * 300_000):
                ws.send(message)
                assert ws.recv(timeout=10) == message
        path, headers = ws_upstream.seen[-1]
        assert path == "/ngx-ws" and headers["Upgrade"] == "websocket"
        assert headers["Authorization"] == "Bearer real-key"
        for _ in range(3):  # the mapping leaves plain requests an empty Connection header (keep-alive)
            reply = request(front.url, "GET", "/plain", headers={"X-Test-Upstream": upstream.url})
            assert reply.status in (200, 404)
        seen = upstream.seen("/plain")
        assert seen and all(s.header("Upgrade") is None for s in seen)
    finally:
        front.stop()
        g.stop()
        ws_upstream.close()
