"""Streams that break: upstream failures, client departures, hook errors."""
import gzip
import json
import socket
import threading
import time
import uuid

import pytest

from tests.support.client import StreamClient, Truncated, request
from tests.support.gunicorn import rss_kib
from tests.support.servers import RawServer, event_stream, read_request_head, silent_after_one_event

HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"


def chunk(data):
    return b"%x\r\n%s\r\n" % (len(data), data)


def unique(prefix="/sf"):
    return f"{prefix}/{uuid.uuid4().hex}"


def raw_upstream(script):
    return RawServer(lambda conn: (read_request_head(conn), script(conn)))


def read_until_cut(g, path, **headers):
    client = StreamClient(g.url, path, headers=headers)
    client.read_head()
    got = []
    with pytest.raises(Truncated):
        while True:
            data = client.next_chunk()
            assert data is not None, "the reply ended cleanly; it should have been cut"
            got.append(data)
    return got


def error_event(data):
    """The error event an event stream failed for good ends with, parsed."""
    assert data.startswith(b"data: {") and data.endswith(b"}\n\n") and data.count(b"\n") == 2, data
    error = json.loads(data[len(b"data: "):])["error"]
    assert error["type"] == "upstream_stream_failed"
    return error


def assert_cut(g, path, got, expect_units):
    """Cut as an upstream failure: the error event, then what on_stream_end wrote, then no last chunk."""
    record = g.records.wait_one(path)
    assert record["errored"] and not record["client_disconnected"]
    assert record["chunk_count"] == expect_units
    end = b"event: end\ndata: %d\n\n" % expect_units
    assert got[-1].endswith(end)
    message = error_event(got[-1][:-len(end)])["message"]
    assert message == record["error"]["message"]  # the client-safe message of stats.error
    assert "127.0.0.1" not in message and "Errno" not in message
    g.wait_for_log(rf"GET {path}: stream cut after {expect_units} units")
    return record


def reset(conn):
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")


@pytest.mark.parametrize("how", ["reset", "close"])
def test_upstream_that_dies_mid_stream_cuts_the_client_reply(streams, how):
    def script(conn):
        conn.sendall(HEAD + chunk(b"data: 1\n\n") + chunk(b"data: 2\n\n"))
        time.sleep(0.2)
        if how == "reset":
            reset(conn)
    server = raw_upstream(script)
    path = unique()
    try:
        got = read_until_cut(streams, path, **{"X-Test-Upstream": server.url, "X-Final": "1"})
        assert b"".join(got).startswith(b"data: 1\n\ndata: 2\n\n")
        assert assert_cut(streams, path, got, 2)["error"]["type"] == "bad_upstream_response"
    finally:
        server.close()


@pytest.mark.parametrize("sent, stays", [
    (HEAD + chunk(b"data: 1\n\n") + b"zz\r\nnot hex\r\n", True),  # a chunk size that is not hex
    (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Length: 500\r\n\r\ndata: 1\n\n", False),
], ids=["malformed_chunk", "short_of_content_length"])
def test_broken_framing_mid_stream_cuts_the_reply(streams, sent, stays):
    hold = threading.Event()  # a bad chunk ends the stream at once, though the upstream stays connected
    server = raw_upstream(lambda conn: (conn.sendall(sent), stays and hold.wait(10)))
    path = unique()
    try:
        started = time.monotonic()
        got = read_until_cut(streams, path, **{"X-Test-Upstream": server.url, "X-Final": "1"})
        assert_cut(streams, path, got, 1)
        assert time.monotonic() - started < 1.5  # well before the 2 s idle timeout
    finally:
        hold.set()
        server.close()


def test_silence_longer_than_the_idle_timeout_cuts_the_reply(streams):
    hold = threading.Event()
    server = raw_upstream(lambda conn: (conn.sendall(HEAD + chunk(b"data: 1\n\n")), hold.wait(10)))
    path = unique()
    try:
        started = time.monotonic()
        got = read_until_cut(streams, path, **{"X-Test-Upstream": server.url, "X-Final": "1"})
        assert 1.5 < time.monotonic() - started < 6  # the idle timeout is 2 s
        assert assert_cut(streams, path, got, 1)["error"]["type"] == "upstream_timeout"
        streams.wait_for_log(rf"GET {path}: stream cut after 1 units: the upstream went silent while sending the body "
                             rf"\(http://127\.0\.0\.1:\d+: \w+")  # the member and the cause, for the log only
    finally:
        hold.set()
        server.close()


def test_an_event_over_max_event_bytes_cuts_the_reply(streams):
    def script(conn):
        conn.sendall(HEAD + chunk(b"data: small\n\n"))
        for _ in range(20):  # 80 KiB with no blank line, against a 64 KiB limit
            conn.sendall(chunk(b"data: " + b"x" * 4090 + b"\n"))
        time.sleep(1)
    server = raw_upstream(script)
    path = unique()
    try:
        got = read_until_cut(streams, path, **{"X-Test-Upstream": server.url, "X-Final": "1"})
        assert_cut(streams, path, got, 1)
        streams.wait_for_log(rf"GET {path}: stream cut after 1 units: incomplete event of \d+ bytes exceeds 65536")
    finally:
        server.close()


def test_expected_stream_failures_log_one_line_and_no_traceback(streams_factory):
    g = streams_factory(TEST_IDLE="5")
    server = raw_upstream(lambda conn: (conn.sendall(HEAD + chunk(b"data: 1\n\n")), reset(conn)))
    path = unique()
    try:
        read_until_cut(g, path, **{"X-Test-Upstream": server.url})
        g.records.wait_one(path)
        time.sleep(0.2)
        assert len([line for line in g.log().splitlines() if path in line and "stream cut" in line]) == 1
        assert "Traceback" not in g.log()
    finally:
        server.close()


def test_client_that_goes_away_closes_the_upstream_connection(streams):
    upstream_gone = threading.Event()
    sent = []

    def script(conn):
        conn.sendall(HEAD)
        try:
            for i in range(400):  # 20 s of events, unless the proxy hangs up
                conn.sendall(chunk(b"data: %d\n\n" % i))
                sent.append(i)
                time.sleep(0.05)
        except OSError:
            upstream_gone.set()
    server = raw_upstream(script)
    path = unique()
    try:
        client = StreamClient(streams.url, path, headers={"X-Test-Upstream": server.url, "X-Final": "1"})
        client.read_head()
        assert client.next_chunk() == b"data: 0\n\n"
        client.close()
        assert upstream_gone.wait(10), "the proxy kept the upstream connection open"
        record = streams.records.wait_one(path)
        assert record["client_disconnected"] and not record["errored"]
        assert record["error"] is None  # a client gone is no upstream failure: no error event, no stats.error
        assert len(sent) < 100
    finally:
        server.close()


@pytest.mark.parametrize("heartbeat", ["", "5"], ids=["reads-in-the-relay", "reads-behind-heartbeats"])
@pytest.mark.parametrize("leaving", ["close", "half-close"])
def test_a_client_that_leaves_a_silent_stream_ends_it_at_once(streams_factory, heartbeat, leaving):
    # Not at the next write (a heartbeat 5 s away), nor at stream_idle_timeout (60 s here): the upstream
    # stops working for nobody. A client that shuts down its sending side counts as gone, as nginx counts it.
    g = streams_factory(TEST_IDLE="60", TEST_MAX_EVENT="65536", TEST_MAX_RESPONSE="1000", TEST_HEARTBEAT=heartbeat)
    proxy_hung_up = threading.Event()
    server = silent_after_one_event(proxy_hung_up)
    path = unique()
    try:
        client = StreamClient(g.url, path, headers={"X-Test-Upstream": server.url})
        client.read_head()
        assert client.next_chunk() == b"data: 0\n\n"
        time.sleep(0.3)  # the relay waits for the upstream's next bytes
        if leaving == "close":
            client.close()
        else:
            client.sock.shutdown(socket.SHUT_WR)
        assert proxy_hung_up.wait(4), "the proxy kept the upstream connection of a client that left"
        record = g.records.wait_one(path)
        assert record["client_disconnected"] and not record["errored"] and record["error"] is None
        assert (record["chunk_count"], "Traceback" in g.log()) == (1, False)
    finally:
        server.close()


def test_a_client_that_sends_bytes_during_a_stream_keeps_its_stream(streams_factory, upstream):
    # Readable is not gone: a pipelined request waits for the stream's end, which arrives whole.
    g = streams_factory(TEST_IDLE="60", TEST_MAX_EVENT="65536", TEST_MAX_RESPONSE="1000")
    path = unique()
    upstream.route(path, event_stream(3, gap=0.3))
    client = StreamClient(g.url, path)
    client.read_head()
    assert client.next_chunk() == b"data: 0\n\n"
    client.sock.sendall(b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n")
    assert [client.next_chunk(), client.next_chunk()] == [b"data: 1\n\n", b"data: 2\n\n"]
    record = g.records.wait_one(path)
    assert not record["client_disconnected"] and not record["errored"] and record["chunk_count"] == 3


def test_a_raising_chunk_hook_cuts_the_stream_and_the_worker_serves_on(streams, upstream):
    path = unique()

    upstream.route(path, event_stream(4))
    got = read_until_cut(streams, path, **{"X-Mode": "raise", "X-Final": "1"})
    assert got == [b"data: 0\n\n", b"event: end\ndata: 2\n\n"]  # a hook that raised: no error event
    record = streams.records.wait_one(path)
    assert record["errored"] and record["chunk_count"] == 2
    streams.wait_for_log("RuntimeError: boom from on_stream_chunk")
    assert request(streams.url, "GET", unique("/after")).status == 200


def test_a_raising_on_stream_end_is_logged_and_leaves_the_stream_whole(streams, upstream):
    path = unique()
    upstream.route(path, event_stream(3))
    client = StreamClient(streams.url, path, headers={"X-End-Raise": "1", "X-Final": "1"})
    client.read_head()
    chunks = client.read_rest()  # raises Truncated if the reply was cut
    assert client.status == 200
    assert b"".join(chunks) == b"data: 0\n\ndata: 1\n\ndata: 2\n\nevent: end\ndata: 3\n\n"  # then the last chunk
    record = streams.records.wait_one(path)
    assert not record["errored"] and record["chunk_count"] == 3
    streams.wait_for_log(rf"GET {path}: hook 'on_stream_end' raised RuntimeError: boom from on_stream_end")
    assert "Traceback" in streams.log()
    assert request(streams.url, "GET", unique("/after")).status == 200


def test_failure_before_the_head_is_a_json_error_not_a_stream(streams):
    server = raw_upstream(reset)
    try:
        reply = request(streams.url, "GET", "/x", headers={"X-Test-Upstream": server.url, "X-Test-Stream": "1"})
        assert reply.status == 502 and reply.error_type() == "upstream_unreachable"
    finally:
        server.close()


# -- compressed event streams: every decode bounded, every failure lets the connection go

GZIP_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Encoding: gzip\r\n"
             b"Transfer-Encoding: chunked\r\n\r\n")


def sends_then_waits_for_close(body, closed):
    def script(conn):
        conn.sendall(body)
        conn.settimeout(10)
        try:
            while conn.recv(65536):
                pass
        except OSError:
            pass
        closed.set()
    return script


def test_a_gzip_bomb_in_an_event_stream_is_cut_at_max_event_bytes_without_expanding_in_memory(streams):
    bomb = gzip.compress(b"data: " + b"x" * (96 * 1024 * 1024), compresslevel=9)  # ~96 KiB on the wire
    closed = threading.Event()
    server = raw_upstream(sends_then_waits_for_close(GZIP_HEAD + chunk(bomb) + b"0\r\n\r\n", closed))
    worker = streams.worker_pids()[0]
    peak_before = rss_kib(worker, "VmHWM")
    path = unique()
    try:
        got = read_until_cut(streams, path, **{"X-Test-Upstream": server.url})
        assert len(got) == 1 and "exceeds 65536" in error_event(got[0])["message"]  # no event, the error event
        record = streams.records.wait_one(path)
        assert record["errored"] and record["chunk_count"] == 0
        streams.wait_for_log(rf"GET {path}: stream cut after 0 units: incomplete event of \d+ bytes exceeds 65536")
        assert closed.wait(5), "the upstream connection was left open"
        assert rss_kib(worker, "VmHWM") - peak_before < 16 * 1024  # a whole decode of one read is 64 MiB
    finally:
        server.close()


def test_a_compressed_event_stream_of_many_events_arrives_whole_across_bounded_decodes(streams):
    events = [b"data: %d %s\n\n" % (i, b"y" * 200) for i in range(3000)]  # 620 KiB from ~10 KiB
    packed = gzip.compress(b"".join(events), compresslevel=9)
    server = raw_upstream(lambda conn: conn.sendall(GZIP_HEAD + chunk(packed) + b"0\r\n\r\n"))
    path = unique()
    try:
        client = StreamClient(streams.url, path, headers={"X-Test-Upstream": server.url})
        assert client.read_head() == 200
        assert b"".join(client.read_rest()) == b"".join(events)
        record = streams.records.wait_one(path)
        assert (record["chunk_count"], record["errored"]) == (3000, False)
    finally:
        server.close()


def test_an_undecodable_compressed_event_stream_is_cut_and_its_connection_closed(streams):
    closed = threading.Event()
    garbage = chunk(b"\x1f\x8b\x08\x00not-gzip-at-all" * 10)
    server = raw_upstream(sends_then_waits_for_close(GZIP_HEAD + garbage, closed))
    path = unique()
    try:
        read_until_cut(streams, path, **{"X-Test-Upstream": server.url})
        assert streams.records.wait_one(path)["errored"]
        streams.wait_for_log(rf"GET {path}: stream cut after 0 units: .*undecodable gzip body")
        assert closed.wait(5), "the upstream connection was left open"
    finally:
        server.close()


def test_an_event_stream_with_more_codings_than_can_be_undone_is_502_and_its_connection_closed(streams):
    closed = threading.Event()
    head = GZIP_HEAD.replace(b"Content-Encoding: gzip", b"Content-Encoding: " + b", ".join([b"gzip"] * 6))
    server = raw_upstream(sends_then_waits_for_close(head + chunk(b"x"), closed))
    try:
        reply = request(streams.url, "GET", unique(), headers={"X-Test-Upstream": server.url})
        assert reply.status == 502 and reply.error_type() == "bad_upstream_response"
        assert closed.wait(5), "the upstream connection was left open"
    finally:
        server.close()


# -- out.fail, the error event, and what the stream hooks see of why


def test_out_fail_fails_the_stream_at_that_unit_with_an_error_event_before_on_stream_end(streams, upstream):
    path = unique()
    upstream.route(path, event_stream(4))
    got = read_until_cut(streams, path, **{"X-Mode": "fail", "X-Final": "1"})
    assert got[0] == b"data: 0\n\n" and len(got) == 2  # unit 2 is not sent
    record = assert_cut(streams, path, got, 2)
    assert record["error"] == {"type": "bad_upstream_response", "message": "the provider sent an in-band error"}
    streams.wait_for_log(rf"GET {path}: stream cut after 2 units: out.fail: the provider sent an in-band error")


def test_stream_hooks_see_the_upstream_status_head_and_member(streams, upstream):
    path = unique()
    upstream.route(path, event_stream(2))
    client = StreamClient(streams.url, path)
    client.read_head()
    client.read_rest()
    record = streams.records.wait_one(path)
    assert record["status"] == 200 and record["content_type"].startswith("text/event-stream")
    assert record["upstream"] == upstream.url.split("://")[1] and record["error"] is None


def test_a_failed_chunked_stream_that_is_no_event_stream_gets_no_error_event(streams):
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    server = raw_upstream(lambda conn: (conn.sendall(head + chunk(b"abc")), time.sleep(0.2), reset(conn)))
    path = unique()
    try:
        got = read_until_cut(streams, path, **{"X-Test-Upstream": server.url, "X-Test-Stream": "1", "X-Final": "1"})
        assert got == [b"abc", b"event: end\ndata: 1\n\n"]
        assert streams.records.wait_one(path)["error"]["type"] == "bad_upstream_response"
    finally:
        server.close()


def test_sse_error_event_false_cuts_an_event_stream_without_one(streams_factory, upstream):
    g = streams_factory(TEST_SSE_ERROR_EVENT="0")
    path = unique()
    upstream.route(path, event_stream(4))
    got = read_until_cut(g, path, **{"X-Mode": "fail", "X-Final": "1"})
    assert got == [b"data: 0\n\n", b"event: end\ndata: 2\n\n"]
    assert g.records.wait_one(path)["error"]["type"] == "bad_upstream_response"

