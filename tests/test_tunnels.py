"""WebSocket tunnels through the real gunicorn with gevent workers, against a real WebSocket server.

Clients are the ``websockets`` library's sync client, and raw sockets for the
edge cases (bytes on either side of the 101, half-close, what gunicorn writes
after the tunnel). tests/apps/tunnels.py is the gateway.
"""
from __future__ import annotations

import json
import os
import socket
import ssl
import time

import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from tests.conftest import Records
from tests.support.client import request
from tests.support.gunicorn import Gunicorn
from tests.support.servers import RawServer, read_request_head
from tests.support.websocket import (WebSocketUpstream, handshake_request, read_head, read_to_close,
                                     switching)


@pytest.fixture(scope="module")
def ws_upstream():
    server = WebSocketUpstream(subprotocols=["chat.v2", "chat.v1"])
    yield server
    server.close()


@pytest.fixture(scope="module")
def start_gateway(ws_upstream, recorded_gateways):
    def start(app="tests.apps.tunnels:app", **env):
        return recorded_gateways(app, **{"TEST_UPSTREAM": ws_upstream.url, **env})
    return start


@pytest.fixture(scope="module")
def tunnels(start_gateway):
    """Byte-copying tunnels (no message hook)."""
    return start_gateway()


@pytest.fixture(scope="module")
def message_tunnels(start_gateway):
    """Tunnels with on_ws_message (X-Mode picks what it does)."""
    return start_gateway("tests.apps.tunnels:messages_app")


@pytest.fixture(scope="module")
def capped_message_tunnels(start_gateway):
    """Tunnels with on_ws_message and max_ws_message_bytes of 4096."""
    return start_gateway("tests.apps.tunnels:messages_app", TEST_MAX_MESSAGE="4096")


def ws_url(g, path: str) -> str:
    return g.url.replace("http://", "ws://") + path


def census(g) -> dict:
    return json.loads(request(g.url, path="/_census").body)


def raw_tunnel(g, path: str = "/echo", extra: str = "", after: bytes = b"") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", g.port), timeout=10)
    sock.sendall(handshake_request(path, extra) + after)
    return sock


# -- messages both ways -------------------------------------------------------


@pytest.mark.parametrize("kind", ["bytes copied", "message hooks"])
def test_text_and_binary_messages_up_to_1_mib_echo_through_the_tunnel(kind, tunnels, message_tunnels):
    g = tunnels if kind == "bytes copied" else message_tunnels
    big = os.urandom(1024 * 1024)
    with connect(ws_url(g, "/echo"), max_size=None) as ws:
        ws.send("héllo")
        assert ws.recv() == "héllo"
        ws.send(b"\x00\xffbinary")
        assert ws.recv() == b"\x00\xffbinary"
        ws.send(big)
        assert ws.recv() == big
        ws.send("x" * (1024 * 1024))
        assert ws.recv() == "x" * (1024 * 1024)
    record = g.records.wait_one("/echo")
    assert record["bytes_from_client"] > 1024 * 1024 and record["bytes_from_upstream"] > 1024 * 1024  # "x"s deflate
    if kind == "message hooks":
        assert (record["messages_from_client"], record["messages_from_upstream"]) == (4, 4)
    else:
        assert (record["messages_from_client"], record["messages_from_upstream"]) == (0, 0)
    assert not record["errored"]
    g.wait_for_log(r'"GET /echo HTTP/1.1" 101 \d+ .* bytes_in=\d+')


@pytest.mark.parametrize("kind", ["bytes copied", "message hooks"])
def test_an_ordered_burst_of_messages_arrives_whole_and_in_order(kind, tunnels, message_tunnels):
    g = tunnels if kind == "bytes copied" else message_tunnels
    with connect(ws_url(g, "/burst/2000")) as ws:
        ws.send("go")
        got = [ws.recv(timeout=10) for _ in range(2000)]
    assert got == [f"m{i}" for i in range(2000)]


def test_the_subprotocol_the_upstream_picks_reaches_the_client(tunnels, ws_upstream):
    with connect(ws_url(tunnels, "/echo-sub"), subprotocols=["chat.v1", "chat.v2"]) as ws:
        assert ws.subprotocol == "chat.v2"
        ws.send("hi")
        assert ws.recv() == "hi"
    path, headers = ws_upstream.seen[-1]
    assert path == "/echo-sub" and headers["Sec-WebSocket-Protocol"] == "chat.v1, chat.v2"


@pytest.mark.parametrize("kind", ["bytes copied", "message hooks"])
def test_close_codes_pass_both_ways(kind, tunnels, message_tunnels, ws_upstream):
    g = tunnels if kind == "bytes copied" else message_tunnels
    with connect(ws_url(g, "/close/4001")) as ws:
        ws.send("close please")
        with pytest.raises(ConnectionClosed):
            ws.recv(timeout=10)
        assert (ws.close_code, ws.close_reason) == (4001, "bye")
    path = f"/client-closes-{kind.replace(' ', '-')}"
    with connect(ws_url(g, path)) as ws:
        ws.send("x")
        ws.recv()
        ws.close(4002, "done here")
    deadline = time.monotonic() + 10
    while (path, 4002) not in ws_upstream.closed and time.monotonic() < deadline:
        time.sleep(0.02)
    assert (path, 4002) in ws_upstream.closed
    record = g.records.wait_one(path)
    assert not record["errored"]
    # With messages forkproxy sees who sent the first close frame; bytes alone show who closed TCP first.
    assert record["closed_by"] == ("client" if kind == "message hooks" else "upstream")


# -- the handshake ----------------------------------------------------------------


def test_the_handshake_goes_through_before_forward_which_swaps_the_key(tunnels, ws_upstream):
    with connect(ws_url(tunnels, "/echo-key"), additional_headers={"Authorization": "Bearer client-key"}) as ws:
        ws.send("a")
        assert ws.recv() == "a"
    path, headers = ws_upstream.seen[-1]
    assert path == "/echo-key" and headers["Authorization"] == "Bearer real-key"
    assert headers["Upgrade"] == "websocket" and headers["Connection"] == "Upgrade"
    assert "Sec-WebSocket-Key" in headers and headers["Sec-WebSocket-Version"] == "13"  # any case


def test_a_short_circuit_answers_the_upgrade_and_no_tunnel_opens(tunnels, ws_upstream):
    before = len(ws_upstream.seen)
    with pytest.raises(InvalidStatus) as caught:
        connect(ws_url(tunnels, "/denied"), additional_headers={"X-Test-Deny": "1"})
    assert caught.value.response.status_code == 401
    assert caught.value.response.body == b'{"error": "denied"}'
    assert len(ws_upstream.seen) == before


def test_a_rejected_handshake_is_an_ordinary_reply(tunnels):
    sock = raw_tunnel(tunnels, "/reject")
    head, rest = read_head(sock)
    assert head.startswith(b"HTTP/1.1 403")
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
    while len(rest) < length:
        rest += sock.recv(65536)
    assert rest == b"no tunnel for you\n"
    sock.close()


@pytest.mark.parametrize("reply", [
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n",
    b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n\r\n",
], ids=["another protocol", "no protocol"])
def test_a_101_that_does_not_switch_to_the_protocol_asked_for_is_502(tunnels, reply):
    server = RawServer(lambda conn: (read_request_head(conn), conn.sendall(reply), time.sleep(1)))
    try:
        sock = raw_tunnel(tunnels, "/wrong", extra=f"X-Test-Upstream: {server.url}\r\n")
        head, body = read_head(sock)
        assert head.startswith(b"HTTP/1.1 502")
        while not body.endswith(b"}}"):
            body += sock.recv(65536)
        assert json.loads(body)["error"]["type"] == "bad_upstream_response"
        sock.close()
    finally:
        server.close()


def test_an_upgrade_to_a_protocol_not_allowed_is_501(tunnels):
    reply = request(tunnels.url, path="/x", headers={"Connection": "Upgrade", "Upgrade": "spdy/3"})
    assert reply.status == 501 and reply.error_type() == "upgrade_not_supported"
    assert "spdy" in reply.json()["error"]["message"]


def test_the_clients_101_drops_the_upstreams_x_accel_fields_and_carries_one_request_id(tunnels):
    fields = (b"X-Accel-Redirect: /internal/secret\r\nX-Accel-Buffering: yes\r\nX-Request-ID: upstream-made\r\n"
              b"Keep-Alive: timeout=5\r\nX-Kept: yes\r\n")
    server = RawServer(switching(lambda conn, head, reply: (conn.sendall(reply), read_to_close(conn)), fields))
    try:
        sock = raw_tunnel(tunnels, "/accel", extra=f"X-Test-Upstream: {server.url}\r\nX-Request-ID: client-made\r\n")
        head, _ = read_head(sock)
        sock.close()
    finally:
        server.close()
    lines = head.decode("latin-1").lower().split("\r\n")
    assert lines[0].startswith("http/1.1 101 ") and "x-kept: yes" in lines and "upgrade: websocket" in lines
    assert [line for line in lines if line.startswith(("x-accel-", "keep-alive"))] == []
    assert [line for line in lines if line.startswith("x-request-id")] == ["x-request-id: client-made"]


# -- bytes on either side of the 101, half-close, what gunicorn does after ---------


def test_bytes_the_upstream_sent_with_its_101_are_not_lost(tunnels):
    def early(conn, head, reply):
        conn.sendall(reply + b"early bytes")  # in the same write as the head
        conn.shutdown(socket.SHUT_WR)
        read_to_close(conn)
    server = RawServer(switching(early))
    try:
        sock = raw_tunnel(tunnels, "/early", extra=f"X-Test-Upstream: {server.url}\r\n")
        head, rest = read_head(sock)
        assert head.startswith(b"HTTP/1.1 101 ")
        assert read_to_close(sock, rest) == b"early bytes"
        sock.close()
    finally:
        server.close()


def test_bytes_behind_the_request_head_reach_the_upstream_and_gunicorn_reads_no_next_request(tunnels):
    received = []

    def collect(conn, head, reply):
        conn.sendall(reply)
        received.append(read_to_close(conn))
        conn.sendall(b"bye")
    server = RawServer(switching(collect))
    try:
        behind = b"pipelined\x00GET /next HTTP/1.1\r\nHost: x\r\n\r\n"
        sock = raw_tunnel(tunnels, "/behind", extra=f"X-Test-Upstream: {server.url}\r\n", after=behind)
        head, rest = read_head(sock)
        assert head.startswith(b"HTTP/1.1 101 ")
        sock.shutdown(socket.SHUT_WR)  # half-close: the upstream sees the end and answers
        # After the 101 the client gets the tunnel's bytes and the close: no reply to "GET /next", no chunk.
        assert read_to_close(sock, rest) == b"bye"
        sock.close()
        assert received == [behind]
    finally:
        server.close()
    record = tunnels.records.wait_one("/behind")
    assert record["closed_by"] == "client" and not record["errored"]
    assert record["bytes_from_client"] == len(behind) and record["bytes_from_upstream"] == 3
    # gunicorn was told the connection is not its own: no reply head of its own after the tunnel (which
    # fails without the StopIteration, as gunicorn has no status to write), one access line, no next request.
    log = tunnels.log()
    assert "/next" not in log and "Traceback" not in log and "Error handling request" not in log
    assert len([line for line in log.splitlines() if '"GET /behind HTTP/1.1" 101 3 ' in line]) == 1


@pytest.mark.parametrize("framing,body", [
    ("Transfer-Encoding: chunked", b"0\r\n\r\n"),  # gunicorn's chunked reader keeps its unreader elsewhere
    ("Content-Length: 0", b""),
])
def test_bytes_behind_an_upgrade_request_with_a_body_reach_the_upstream(tunnels, framing, body):
    received = []

    def collect(conn, head, reply):
        conn.sendall(reply)
        received.append(read_to_close(conn))
    server = RawServer(switching(collect))
    try:
        behind = b"pipelined behind the body"
        sock = raw_tunnel(tunnels, "/behind-body", extra=f"X-Test-Upstream: {server.url}\r\n{framing}\r\n",
                          after=body + behind)
        head, _ = read_head(sock)
        assert head.startswith(b"HTTP/1.1 101 ")
        sock.shutdown(socket.SHUT_WR)
        read_to_close(sock)
        sock.close()
    finally:
        server.close()
    assert received == [behind]


def test_half_close_from_the_upstream_leaves_the_client_side_open(tunnels):
    def talk_first(conn, head, reply):
        conn.sendall(reply + b"all I say")
        conn.shutdown(socket.SHUT_WR)  # done writing, still reading
        data = read_to_close(conn)
        received.append(data)
    received = []
    server = RawServer(switching(talk_first))
    try:
        sock = raw_tunnel(tunnels, "/upstream-half", extra=f"X-Test-Upstream: {server.url}\r\n")
        head, rest = read_head(sock)
        assert read_to_close(sock, rest) == b"all I say"  # the upstream's end of file reached the client
        sock.sendall(b"still heard")  # ...whose own direction is still open
        sock.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + 5
        while not received and time.monotonic() < deadline:
            time.sleep(0.01)
        assert received == [b"still heard"]
        sock.close()
    finally:
        server.close()
    record = tunnels.records.wait_one("/upstream-half")
    assert record["closed_by"] == "upstream" and not record["errored"]


def test_an_idle_tunnel_is_closed_after_tunnel_idle_timeout(start_gateway):
    g = start_gateway(TEST_TUNNEL_IDLE="1")
    with connect(ws_url(g, "/echo-idle")) as ws:
        ws.send("active")
        assert ws.recv() == "active"
        started = time.monotonic()
        with pytest.raises(ConnectionClosed):
            ws.recv(timeout=10)
        waited = time.monotonic() - started
    assert 0.8 < waited < 5
    record = g.records.wait_one("/echo-idle")
    assert record["closed_by"] == "idle" and not record["errored"]


def test_traffic_one_way_keeps_a_tunnel_open_past_the_idle_timeout(start_gateway):
    g = start_gateway(TEST_TUNNEL_IDLE="1")
    with connect(ws_url(g, "/echo-busy")) as ws:
        for i in range(8):  # 2.4 s of messages, each well inside the idle timeout
            ws.send(f"{i}")
            assert ws.recv(timeout=5) == f"{i}"
            time.sleep(0.3)


# -- message hooks ----------------------------------------------------------------------


def test_a_message_hook_transforms_and_drops_messages(message_tunnels):
    with connect(ws_url(message_tunnels, "/echo-upper"), additional_headers={"X-Mode": "upper"}) as ws:
        ws.send("shout")
        assert ws.recv() == "SHOUT"
        ws.send(b"bytes stay")
        assert ws.recv() == b"bytes stay"
    with connect(ws_url(message_tunnels, "/echo-drop"), additional_headers={"X-Mode": "drop"}) as ws:
        ws.send("drop-me please")
        ws.send("keep me")
        assert ws.recv(timeout=5) == "keep me"
    record = message_tunnels.records.wait_one("/echo-drop")
    assert (record["messages_from_client"], record["messages_from_upstream"]) == (2, 1)


def test_a_message_hook_that_blocks_one_way_neither_loses_nor_misroutes_messages_the_other_way(message_tunnels,
                                                                                               ws_upstream):
    # The hook sleeps 20 ms on each client message; the client keeps sending, so while the hook
    # sleeps on one message, the upstream's echo of the one before flows the other way.
    sent = [f"c{i}" for i in range(30)]
    with connect(ws_url(message_tunnels, "/echo-slow-hook"), additional_headers={"X-Mode": "slow-client"}) as ws:
        for text in sent:
            ws.send(text)
            time.sleep(0.005)
        got = [ws.recv(timeout=5) for _ in sent]
    assert got == sent  # each reached the upstream, in order, and came back, in order
    record = message_tunnels.records.wait_one("/echo-slow-hook")
    assert not record["errored"] and (record["messages_from_client"], record["messages_from_upstream"]) == (30, 30)
    deadline = time.monotonic() + 5
    while not any(path == "/echo-slow-hook" for path, _ in ws_upstream.closed) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert ("/echo-slow-hook", 1000) in ws_upstream.closed  # never 1002: no unmasked frame reached it


def test_a_message_hook_counts_usage_for_billing_at_tunnel_end(message_tunnels):
    with connect(ws_url(message_tunnels, "/usage"), additional_headers={"X-Mode": "count-usage"}) as ws:
        for text in ("abc", "defgh"):
            ws.send(text)
            ws.recv()
            ws.recv()
    assert message_tunnels.records.wait_one("/usage")["meta"] == {"tokens": 24}


def test_a_failing_message_hook_closes_both_sides_with_1011(message_tunnels, ws_upstream):
    with connect(ws_url(message_tunnels, "/echo-fail"), additional_headers={"X-Mode": "fail"}) as ws:
        ws.send("fine")
        assert ws.recv() == "fine"
        ws.send("boom")
        with pytest.raises(ConnectionClosed):
            ws.recv(timeout=5)
        assert ws.close_code == 1011
    record = message_tunnels.records.wait_one("/echo-fail")
    assert record["closed_by"] == "proxy" and record["errored"]
    message_tunnels.wait_for_log(r"hook 'on_ws_message' raised RuntimeError: hook failed on purpose")
    assert ws_upstream.closed and ("/echo-fail", 1011) in ws_upstream.closed


@pytest.mark.parametrize("char", ["y", "é", "€"])
def test_a_message_over_max_ws_message_bytes_closes_both_sides_with_1009(char, capped_message_tunnels, ws_upstream):
    g = capped_message_tunnels
    width = len(char.encode())
    at_cap = char * (4096 // width) + "y" * (4096 % width)  # 4096 bytes of UTF-8, fewer characters
    path = f"/echo-cap-{width}"
    with connect(ws_url(g, path)) as ws:
        ws.send(at_cap)
        assert ws.recv() == at_cap
        ws.send(at_cap + "y")
        with pytest.raises(ConnectionClosed):
            ws.recv(timeout=5)
        assert ws.close_code == 1009
    record = g.records.wait_one(path)
    assert record["closed_by"] == "proxy" and record["errored"]
    g.wait_for_log(rf"GET {path}: tunnel ended by proxy \(errored\): closed with 1009: message over the proxy's cap")
    deadline = time.monotonic() + 5
    while (path, 1009) not in ws_upstream.closed and time.monotonic() < deadline:
        time.sleep(0.02)
    assert (path, 1009) in ws_upstream.closed


def test_pings_pass_through_message_hooks(message_tunnels):
    with connect(ws_url(message_tunnels, "/echo-ping")) as ws:
        assert ws.ping(b"are you there").wait(5)


# -- gone peers, many tunnels, stopping -------------------------------------------------


@pytest.mark.parametrize("who", ["client", "upstream"])
def test_a_peer_that_vanishes_leaves_no_greenlet_or_socket_behind(who, tunnels):
    before = census(tunnels)
    hold = []

    def vanish(conn, head, reply):
        conn.sendall(reply)
        if who == "upstream":
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            conn.close()  # a reset
        else:
            hold.append(conn.recv(10))
            read_to_close(conn)
    server = RawServer(switching(vanish))
    try:
        sockets = []
        for _ in range(20):
            sock = raw_tunnel(tunnels, f"/vanish-{who}", extra=f"X-Test-Upstream: {server.url}\r\n")
            read_head(sock)
            sockets.append(sock)
        for sock in sockets:
            if who == "client":
                sock.sendall(b"x")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            sock.close()
        deadline = time.monotonic() + 10
        while len(tunnels.records.for_path(f"/vanish-{who}")) < 20 and time.monotonic() < deadline:
            time.sleep(0.05)
        records = tunnels.records.for_path(f"/vanish-{who}")
        assert len(records) == 20 and {r["closed_by"] for r in records} == {who}
        time.sleep(0.2)
        after = census(tunnels)
        assert after["greenlets"] <= before["greenlets"] and after["fds"] <= before["fds"]
    finally:
        server.close()


@pytest.mark.slow
def test_a_thousand_open_tunnels_on_one_worker_while_ordinary_requests_stay_prompt(tunnels, upstream):
    sockets = []
    try:
        for i in range(1000):
            sockets.append(raw_tunnel(tunnels, "/echo-many"))
        for sock in sockets:
            head, _ = read_head(sock)
            assert head.startswith(b"HTTP/1.1 101")
        slowest = 0.0
        for _ in range(20):
            started = time.monotonic()
            reply = request(tunnels.url, path="/plain", headers={"X-Test-Upstream": upstream.url})
            slowest = max(slowest, time.monotonic() - started)
            assert reply.status in (200, 404)
        assert slowest < 1.0, slowest
        assert census(tunnels)["greenlets"] >= 2000  # two per tunnel: one each way
    finally:
        for sock in sockets:
            sock.close()
    deadline = time.monotonic() + 20
    while len(tunnels.records.for_path("/echo-many")) < 1000 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(tunnels.records.for_path("/echo-many")) == 1000


def test_sigterm_gives_open_tunnels_graceful_timeout_then_closes_them_once(ws_upstream, tmp_path):
    records = Records(tmp_path / "records.jsonl")
    g = Gunicorn("tests.apps.tunnels:app", env={"TEST_UPSTREAM": ws_upstream.url, "TEST_RECORDS": str(records.path),
                                                 "FORKPROXY_GRACEFUL_TIMEOUT": "4"}).start()
    try:
        with connect(ws_url(g, "/echo-stop")) as ws:
            ws.send("before")
            assert ws.recv() == "before"
            g.proc.send_signal(15)
            time.sleep(1)
            ws.send("during the graceful time")
            assert ws.recv(timeout=5) == "during the graceful time"
            started = time.monotonic()
            with pytest.raises(ConnectionClosed):
                ws.recv(timeout=10)
            assert time.monotonic() - started < 4
        record = records.wait_one("/echo-stop")
        assert record["closed_by"] == "proxy" and record["errored"]
        assert g.wait_exit(10) == 0
        assert "GET /echo-stop: tunnel ended by proxy (errored): worker stopping" in g.log()
    finally:
        g.stop()


# -- tunnels to a pool, and to a wss:// upstream ------------------------------------------


def test_a_tunnel_fails_over_past_a_dead_pool_member_until_the_101(start_gateway, ws_upstream):
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))  # bound, never listening: connects are refused
    try:
        g = start_gateway(TEST_UPSTREAM=f"http://127.0.0.1:{dead.getsockname()[1]},{ws_upstream.url}")
        for i in range(4):  # round robin puts the dead member first half of the time
            with connect(ws_url(g, f"/echo-pool-{i}")) as ws:
                ws.send("through the pool")
                assert ws.recv() == "through the pool"
    finally:
        dead.close()


@pytest.mark.parametrize("kind", ["bytes copied", "message hooks"])
def test_a_tunnel_to_a_wss_upstream_is_verified_and_carries_messages(kind, start_gateway, tmp_path):
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    upstream = WebSocketUpstream(ssl_context=context)
    try:
        app = "tests.apps.tunnels:app" if kind == "bytes copied" else "tests.apps.tunnels:messages_app"
        g = start_gateway(app, TEST_UPSTREAM=upstream.url, TEST_CA=str(tmp_path / "ca.pem"))
        with connect(ws_url(g, "/echo-tls"), max_size=None) as ws:
            for message in ("over tls", os.urandom(200_000)):
                ws.send(message)
                assert ws.recv(timeout=10) == message
        record = g.records.wait_one("/echo-tls")
        assert not record["errored"] and record["closed_by"] in ("client", "upstream")
    finally:
        upstream.close()
