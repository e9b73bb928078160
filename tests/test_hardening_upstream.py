"""Upstream faults beyond the basic error table: each gives the contract's answer,
a log line with the reason, and a worker that keeps serving others meanwhile."""
import gzip
import re
import socket
import threading
import time
import uuid
from contextlib import contextmanager

import pytest

from tests.support.client import request
from tests.support.servers import RawServer, answering, free_port, read_request_head


def via(server):
    return {"X-Test-Upstream": server.url}


def linger_reset(conn):
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")


@pytest.mark.parametrize("framing", [b"Content-Length: 100000", b"Transfer-Encoding: chunked"])
def test_reset_mid_body_is_502_and_logged(gateway, framing):
    def script(conn):
        read_request_head(conn)
        body = b"a" * 5000 if b"Content" in framing else b"1388\r\n" + b"a" * 5000 + b"\r\n"
        conn.sendall(b"HTTP/1.1 200 OK\r\n" + framing + b"\r\n\r\n" + body)
        time.sleep(0.1)
        linger_reset(conn)
    server = RawServer(script)
    marker = uuid.uuid4().hex
    try:
        reply = request(gateway.url, "GET", f"/midbody/{marker}", headers=via(server))
        assert reply.status == 502 and reply.error_type() == "bad_upstream_response"
        gateway.wait_for_log(rf"GET /midbody/{marker} -> 502 bad_upstream_response: the upstream broke off the body "
                             rf"\(http://127\.0\.0\.1:\d+: ")
    finally:
        server.close()


def test_a_slow_drip_is_served_while_others_are_served_too(gateway, upstream):
    def drip(conn):
        read_request_head(conn)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n")
        for _ in range(10):
            time.sleep(0.25)  # 2.5 s in all, each gap well under the 3 s read timeout
            conn.sendall(b"d")
    server = RawServer(drip)
    result = {}
    t = threading.Thread(target=lambda: result.update(reply=request(gateway.url, "GET", "/drip", headers=via(server))))
    try:
        t.start()
        time.sleep(0.2)
        for i in range(10):
            started = time.monotonic()
            assert request(gateway.url, "GET", f"/beside-drip/{i}").status == 200
            assert time.monotonic() - started < 0.5
        t.join(10)
        assert result["reply"].status == 200 and result["reply"].body == b"d" * 10
    finally:
        server.close()


def test_a_drip_with_a_gap_longer_than_the_timeout_is_504(gateway):
    def drip(conn):
        read_request_head(conn)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nddd")
        time.sleep(4)
    server = RawServer(drip)
    try:
        reply = request(gateway.url, "GET", "/gap", headers=via(server))
        assert reply.status == 504 and reply.error_type() == "upstream_timeout"
    finally:
        server.close()


def test_transfer_encoding_other_than_chunked_is_read_to_the_close_not_by_length(gateway):
    body = b"0123456789-and-the-rest"
    with answering(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: identity\r\nContent-Length: 10\r\n\r\n" + body) as server:
        reply = request(gateway.url, "GET", "/te", headers=via(server))
        assert reply.status == 200 and reply.body == body


def test_upstream_interim_100_continue_is_skipped(gateway):
    with answering(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok") as server:
        reply = request(gateway.url, "POST", "/cont", body=b"x", headers=via(server))
        assert (reply.status, reply.body) == (201, b"ok")


@pytest.mark.parametrize("head", [
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
])
def test_a_transfer_coding_forkproxy_cannot_undo_or_an_unsolicited_101_is_502(gateway, head):
    payload = gzip.compress(b"data: 1\n\n")
    with answering(head + b"%x\r\n%s\r\n0\r\n\r\n" % (len(payload), payload)) as server:
        reply = request(gateway.url, "GET", "/te-gzip", headers=via(server))
        assert reply.status == 502 and reply.error_type() == "bad_upstream_response"


def test_a_write_the_kernel_takes_only_part_of_is_finished_in_order():
    """The upstream write's one-``send`` shortcut: a full send buffer leaves a remainder, sent after it."""
    from forkproxy.upstream.connections import _write_all

    ours, theirs = socket.socketpair()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    ours.settimeout(10)  # a timeout makes send() return what the buffer took, as the proxy's sockets do
    data = bytes(range(256)) * 4096  # 1 MiB, far over the buffer
    got = bytearray()
    reader = threading.Thread(target=lambda: [got.extend(chunk) for chunk in iter(lambda: theirs.recv(65536), b"")])
    reader.start()
    try:
        _write_all(ours, data)
    finally:
        ours.close()
        reader.join(10)
        theirs.close()
    assert bytes(got) == data


@contextmanager
def failing_before_the_head(kind):
    """The URL of an upstream that fails as ``kind`` says, before any usable response head."""
    if kind == "refused":
        yield f"http://127.0.0.1:{free_port()}"
        return
    hold = threading.Event()
    ends = {"closed": read_request_head,
            "silent": lambda conn: (read_request_head(conn), hold.wait(10)),
            "malformed": lambda conn: (read_request_head(conn),
                                       conn.sendall(b"HTTP/1.1 200 OK\r\nX-Secret 10.1.2.3\r\n\r\n"))}
    with _serving(ends[kind], hold) as url:
        yield url


@contextmanager
def _serving(handle, hold):
    """A raw upstream answering with ``handle``; ``hold`` is set before it closes, to free a held connection."""
    server = RawServer(handle)
    try:
        yield server.url
    finally:
        hold.set()
        server.close()


@pytest.mark.parametrize("kind, status, error_type, told", [
    ("refused", 502, "upstream_unreachable", "cannot connect to the upstream"),
    ("closed", 502, "upstream_unreachable", "the upstream closed the connection before a response head"),
    ("silent", 504, "upstream_timeout", "the upstream sent no response head in time"),
    ("malformed", 502, "bad_upstream_response", "the upstream sent a malformed response head"),
])
def test_a_failure_before_the_head_tells_the_client_its_kind_and_the_log_the_member_and_the_cause(
        gateway, kind, status, error_type, told):
    path = f"/before-head/{uuid.uuid4().hex}"
    with failing_before_the_head(kind) as url:
        reply = request(gateway.url, "GET", path, headers={"X-Test-Upstream": url})
        assert (reply.status, reply.error_type()) == (status, error_type)
        assert reply.json()["error"]["message"] == told  # no address, no OS error, none of the upstream's bytes
        gateway.wait_for_log(rf"GET {path} -> {status} {error_type}: {told} \(http://127\.0\.0\.1:\d+: \w+")


@contextmanager
def failing_in_the_body(kind):
    """The URL of an upstream that sends a response head, then fails in the body as ``kind`` says."""
    hold = threading.Event()
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nabc"

    def reset(conn):
        read_request_head(conn)
        conn.sendall(head)
        time.sleep(0.1)
        linger_reset(conn)
    ends = {"short": lambda conn: (read_request_head(conn), conn.sendall(head)),
            "silent": lambda conn: (read_request_head(conn), conn.sendall(head), hold.wait(10)),
            "reset": reset}
    with _serving(ends[kind], hold) as url:
        yield url


@pytest.mark.parametrize("kind, status, error_type, told, cause", [
    ("short", 502, "bad_upstream_response", "the upstream's body ended short of its length", r"IncompleteRead"),
    ("silent", 504, "upstream_timeout", "the upstream went silent while sending the body", r"\w+"),  # 3 s: timeout
    ("reset", 502, "bad_upstream_response", "the upstream broke off the body", r"ConnectionResetError: \[Errno"),
])
def test_a_failure_in_the_body_tells_the_client_its_kind_and_the_log_the_member_and_the_os_error(
        gateway, kind, status, error_type, told, cause):
    path = f"/in-body/{uuid.uuid4().hex}"
    with failing_in_the_body(kind) as url:
        reply = request(gateway.url, "GET", path, headers={"X-Test-Upstream": url})
        assert (reply.status, reply.error_type()) == (status, error_type)
        assert reply.json()["error"]["message"] == told  # no address, no OS error
        gateway.wait_for_log(rf"GET {path} -> {status} {error_type}: {re.escape(told)} "
                             rf"\(http://127\.0\.0\.1:\d+: {cause}")
