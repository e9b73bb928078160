"""Hostile requests: smuggling shapes, steering, hop-by-hop tricks, stalled and vanishing clients.

The upstream here is a raw counter: it records every request it parses, so a
test can prove it never parsed more requests than the client sent.
"""
import json
import socket
import threading
import time
import uuid

import pytest

from tests.support.client import raw, request, status_of
from tests.support.gunicorn import Gunicorn, client_connections, open_fds
from tests.support.servers import RawServer


SMUGGLING = {
    "cl_and_te": b"POST /s HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n"
                 b"0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
    "te_and_cl": b"POST /s HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 40\r\n\r\n"
                 b"0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
    "two_lengths": b"POST /s HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nContent-Length: 37\r\n\r\n"
                   b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
    "length_list": b"POST /s HTTP/1.1\r\nHost: x\r\nContent-Length: 0, 37\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
    "plus_length": b"POST /s HTTP/1.1\r\nHost: x\r\nContent-Length: +37\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
    "te_xchunked": b"POST /s HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: xchunked\r\n\r\n"
                   b"0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
    "te_chunked_identity": b"POST /s HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, identity\r\n\r\n"
                           b"0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
    "te_space_colon": b"POST /s HTTP/1.1\r\nHost: x\r\nTransfer-Encoding : chunked\r\nContent-Length: 5\r\n\r\n"
                      b"0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
    "te_obs_fold": b"POST /s HTTP/1.1\r\nHost: x\r\nX-A: 1\r\n Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n"
                   b"0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
    "bare_lf": b"POST /s HTTP/1.1\nHost: x\nTransfer-Encoding: chunked\nContent-Length: 5\n\n"
               b"0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
    "bad_chunk_size": b"POST /s HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                      b"-1\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
}


@pytest.fixture(scope="module")
def counted():
    """A gateway whose upstream counts every request line it parses."""
    seen, lock = [], threading.Lock()

    def serve(conn):
        buf = b""
        while True:
            while b"\r\n\r\n" not in buf:
                part = conn.recv(65536)
                if not part:
                    return
                buf += part
            head, _, buf = buf.partition(b"\r\n\r\n")
            lines = head.split(b"\r\n")
            length = next((int(l.split(b":")[1]) for l in lines if l.lower().startswith(b"content-length:")), 0)
            while len(buf) < length:
                buf += conn.recv(65536)
            body, buf = buf[:length], buf[length:]
            with lock:
                seen.append((lines[0].decode(), [l.decode() for l in lines[1:]], body))
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    server = RawServer(serve)
    g = Gunicorn("tests.apps.gateway:app", env={"TEST_UPSTREAM": server.url, "TEST_TIMEOUT": "3"}).start()
    g.seen = seen
    yield g
    g.stop()
    server.close()


@pytest.mark.parametrize("shape", sorted(SMUGGLING))
def test_smuggling_shapes_never_make_the_upstream_parse_a_second_request(counted, shape):
    before = len(counted.seen)
    reply = raw(counted.url, SMUGGLING[shape], timeout=5)
    time.sleep(0.2)
    new = counted.seen[before:]
    assert not any("smuggled" in line for line, _, _ in new), (shape, new)
    assert len(new) <= 1
    for _, headers, body in new:  # if one request went through, it is one clean request
        assert not any(h.lower().startswith("transfer-encoding") for h in headers)
        assert b"GET /smuggled" not in body or shape in ("cl_and_te",)  # a body is only a body
    assert reply.count(b"HTTP/1.1 ") >= 1


def test_pipelined_requests_are_answered_in_order_once_each(counted):
    marker = uuid.uuid4().hex
    data = b"".join(f"GET /pipe/{marker}/{i} HTTP/1.1\r\nHost: x\r\n\r\n".encode() for i in range(3))
    reply = raw(counted.url, data + f"GET /pipe/{marker}/3 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    assert reply.count(b"HTTP/1.1 200 OK") == 4
    lines = [line for line, _, _ in counted.seen if marker in line]
    assert lines == [f"GET /pipe/{marker}/{i} HTTP/1.1" for i in range(4)]


def test_proxy_credentials_never_reach_the_upstream(counted):
    marker = uuid.uuid4().hex
    request(counted.url, "GET", f"/cred/{marker}", headers={
        "Proxy-Authorization": "Basic c2VjcmV0", "Connection": "keep-alive, Proxy-Authorization"})
    (headers,) = [h for line, h, _ in counted.seen if marker in line]
    assert not any("proxy-authorization" in h.lower() or "c2VjcmV0" in h for h in headers)


@pytest.mark.parametrize("named", ["X-Forwarded-For", "X-Request-ID", "Content-Length", "Host"])
def test_connection_cannot_strip_what_the_proxy_sets(counted, named):
    marker = uuid.uuid4().hex
    request(counted.url, "POST", f"/hop/{marker}", body=b"abc", headers={"Connection": named})
    (headers,) = [h for line, h, _ in counted.seen if marker in line]
    names = [h.split(":")[0].lower() for h in headers]
    assert named.lower() in names


def test_a_stalled_upload_is_cut_after_the_timeout_and_never_forwarded(counted):
    marker = uuid.uuid4().hex
    with socket.create_connection(("127.0.0.1", counted.port), timeout=10) as sock:
        sock.sendall(f"POST /stall/{marker} HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n".encode() + b"a" * 10)
        started = time.monotonic()
        data = sock.recv(65536)
        assert status_of(data) == 400
        assert 2 <= time.monotonic() - started < 8  # the gateway's timeout is 3 s
    counted.wait_for_log(rf"POST /stall/{marker} -> 400 bad_request: request body stalled")
    assert not [line for line, _, _ in counted.seen if marker in line]


def test_clients_vanishing_mid_request_leak_no_connections(counted):
    (worker,) = counted.worker_pids()
    for _ in range(3):
        for i in range(30):
            with socket.create_connection(("127.0.0.1", counted.port)) as sock:
                if i % 3 == 0:
                    sock.sendall(b"POST /gone HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\nabc")
                elif i % 3 == 1:
                    sock.sendall(b"GET /gone HTTP/1.1\r\nHost: x\r\n")  # head never finished
                else:
                    sock.sendall(b"GET /gone HTTP/1.1\r\nHost: x\r\n\r\n")  # gone before the reply
    assert request(counted.url, "GET", "/still-fine").status == 200
    deadline = time.monotonic() + 10
    while client_connections(worker, counted.port) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert client_connections(worker, counted.port) == 0, "the worker still holds connections of gone clients"
    assert open_fds(worker) < 40  # and the upstream side is pooled, not piling up


def test_a_broken_chunked_upload_is_400_whose_message_names_no_error_text_and_the_log_keeps_it(counted):
    marker = uuid.uuid4().hex
    reply = raw(counted.url, f"POST /broken/{marker} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                             f"5\r\nhello\r\nzz\r\n".encode(), timeout=5)
    assert status_of(reply) == 400
    body = json.loads(reply.split(b"\r\n\r\n", 1)[1])
    assert body == {"error": {"message": "malformed or incomplete request body", "type": "bad_request"}}
    counted.wait_for_log(rf"POST /broken/{marker} -> 400 bad_request: malformed or incomplete request body \(\w+")
    assert not [line for line, _, _ in counted.seen if marker in line]
