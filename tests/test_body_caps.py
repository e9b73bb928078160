"""Body caps both ways, enforced while reading, and short uploads never forwarded."""
import socket
import time
import uuid

from tests.support.client import raw, read_response_bytes, request, status_of
from tests.support.gunicorn import Gunicorn, rss_kib
from tests.support.servers import RawServer, read_request_head

import pytest

MiB = 1024 * 1024


@pytest.fixture(scope="module")
def capped(upstream):
    g = Gunicorn("tests.apps.gateway:app", env={
        "TEST_UPSTREAM": upstream.url, "TEST_MAX_REQUEST": "1000", "TEST_MAX_RESPONSE": str(1 * MiB)}).start()
    yield g
    g.stop()


def unique(prefix="/l"):
    return f"{prefix}/{uuid.uuid4().hex}"


def test_body_at_the_cap_is_forwarded(capped, upstream):
    path = unique()
    reply = request(capped.url, "POST", path, body=b"x" * 1000)
    assert reply.status == 200
    assert upstream.seen(path)[0].body == b"x" * 1000


def test_declared_length_over_the_cap_is_refused_before_the_body_is_read(capped, upstream):
    path = unique()
    with socket.create_connection(("127.0.0.1", capped.port), timeout=5) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 5000000\r\n\r\n".encode())
        sock.sendall(b"only a little")  # the other 4,999,987 bytes never come
        data = read_response_bytes(sock)
    assert status_of(data) == 413
    body = data.split(b"\r\n\r\n", 1)[1]
    assert b'"type": "payload_too_large"' in body
    assert b"request body exceeds proxy cap of 1000 bytes" in body
    assert upstream.seen(path) == []


def test_chunked_upload_over_the_cap_is_refused(capped, upstream):
    path = unique()
    chunk = b"y" * 400
    upload = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(5)) + b"0\r\n\r\n"
    reply = raw(capped.url, f"POST {path} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".encode() + upload)
    assert status_of(reply) == 413
    assert upstream.seen(path) == []


def test_chunked_upload_under_the_cap_is_forwarded_with_a_content_length(capped, upstream):
    path = unique()
    upload = b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    reply = raw(capped.url, f"POST {path} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                            "Connection: close\r\n\r\n".encode() + upload)
    assert status_of(reply) == 200
    (seen,) = upstream.seen(path)
    assert seen.body == b"hello world"
    assert seen.header("Content-Length") == "11"
    assert seen.header("Transfer-Encoding") is None


def test_body_cut_short_by_a_vanishing_client_is_never_forwarded(capped, upstream):
    path = unique()
    with socket.create_connection(("127.0.0.1", capped.port), timeout=5) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 500\r\n\r\n".encode() + b"z" * 100)
    capped.wait_for_log(rf"POST {path} -> 400 bad_request: request body ended after 100 of 500 bytes")
    assert upstream.seen(path) == []


def test_response_over_the_cap_with_a_declared_length_is_502_without_reading_it(capped, upstream):
    path = unique("/big-declared")
    upstream.route(path, lambda h, s: (h.send_response(200), h.send_header("Content-Length", str(100 * MiB)),
                                       h.end_headers(), h.wfile.write(b"a" * MiB)))
    reply = request(capped.url, "GET", path)
    assert reply.status == 502
    assert reply.json()["error"] == {"type": "upstream_body_too_large",
                                     "message": f"upstream response body exceeds proxy cap of {MiB} bytes"}


def test_response_over_the_cap_is_cut_off_while_reading(capped):
    sent = []

    def flood(conn):
        read_request_head(conn)
        conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        piece = b"%x\r\n%s\r\n" % (MiB, b"b" * MiB)
        for _ in range(100):  # 100 MiB, if anyone kept reading
            conn.sendall(piece)
            sent.append(1)
    server = RawServer(flood)
    worker = capped.worker_pids()[0]
    try:
        reply = request(capped.url, "GET", "/flood", headers={"X-Test-Upstream": server.url})
        assert reply.status == 502 and reply.error_type() == "upstream_body_too_large"
        time.sleep(0.3)
        assert len(sent) < 20, f"the upstream got to send {len(sent)} MiB"
        assert rss_kib(worker, "VmHWM") < 120 * 1024
    finally:
        server.close()


def test_chunked_upload_cut_short_by_a_vanishing_client_is_never_forwarded(capped, upstream):
    path = unique()
    with socket.create_connection(("127.0.0.1", capped.port), timeout=5) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
                     + b"a\r\n0123456789\r\n64\r\nonly-part")
    capped.wait_for_log(rf"POST {path} -> 400 bad_request")
    assert upstream.seen(path) == []
