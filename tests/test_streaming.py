"""The streaming path end to end: units, hooks, latency, retries, https, reuse."""
import gzip
import re
import threading
import time
import uuid

import pytest

from tests.support.client import StreamClient, request

SSE = "text/event-stream"


def unique(prefix="/s"):
    return f"{prefix}/{uuid.uuid4().hex}"


def sse_route(upstream, path, events, *, chunked=True, gap=0.0, content_type=SSE, headers=()):
    def route(h, s):
        if chunked:
            h.start_chunked(content_type=content_type, headers=list(headers))
            for e in events:
                h.chunk(e)
                time.sleep(gap)
            h.end_chunked()
        else:
            h.send_response(200)
            h.send_header("Content-Type", content_type)
            for k, v in headers:
                h.send_header(k, v)
            h.send_header("Connection", "close")
            h.end_headers()
            for e in events:
                h.wfile.write(e)
                h.wfile.flush()
                time.sleep(gap)
            h.close_connection = True
    upstream.route(path, route)


def stream(g, path, **headers):
    client = StreamClient(g.url, path, headers=headers)
    client.read_head()
    return client, client.read_rest()


THREE = [b"data: one\n\n", b"data: two\n\n", b"data: three\n\n"]


def test_three_events_pass_through_one_unit_each(streams, upstream):
    path = unique()
    sse_route(upstream, path, THREE)
    client, chunks = stream(streams, path)
    assert client.status == 200
    assert b"".join(chunks) == b"".join(THREE)
    assert b"".join(chunks) == b"".join(THREE)  # one write per read of the upstream: one or three here
    record = streams.records.wait_one(path)
    assert (record["chunk_count"], record["byte_count"]) == (3, sum(map(len, THREE)))
    assert record["units"] == [[1, 11, 11], [2, 22, 11], [3, 35, 13]]  # counted before each hook call
    assert not record["errored"] and not record["client_disconnected"]


def test_reply_is_chunked_marked_unbuffered_and_skips_after_forward(streams, upstream):
    path = unique()
    sse_route(upstream, path, THREE, chunked=False, headers=[("Content-Length", str(sum(map(len, THREE))))])
    client, chunks = stream(streams, path)
    assert client.header("Transfer-Encoding") == "chunked"
    assert client.header("Content-Length") is None
    assert client.header("X-Accel-Buffering") == "no"
    assert client.header("X-After-Forward") is None
    assert b"".join(chunks) == b"".join(THREE)


def test_an_event_stream_is_not_held_to_the_buffered_cap(streams, upstream):
    path = unique()
    events = [b"data: " + b"x" * 500 + b"\n\n"] * 10  # 5 KB against a 1000-byte buffered cap
    sse_route(upstream, path, events)
    _, chunks = stream(streams, path)
    assert b"".join(chunks) == b"".join(events)


def test_finaliser_writes_the_chunk_count(streams, upstream):
    path = unique()
    sse_route(upstream, path, THREE)
    _, chunks = stream(streams, path, **{"X-Final": "1"})
    assert chunks[-1] == b"event: end\ndata: 3\n\n"
    assert b"".join(chunks).startswith(b"".join(THREE))


def test_prefixing_transform(streams, upstream):
    path = unique()
    sse_route(upstream, path, THREE)
    _, chunks = stream(streams, path, **{"X-Mode": "prefix"})
    assert b"".join(chunks) == b"".join(b"[p]" + e for e in THREE)


def test_dropping_filter(streams, upstream):
    path = unique()
    sse_route(upstream, path, [b"data: keep\n\n", b"data: drop-me\n\n", b"data: keep too\n\n"])
    _, chunks = stream(streams, path, **{"X-Mode": "drop"})
    assert b"".join(chunks) == b"data: keep\n\ndata: keep too\n\n"
    assert streams.records.wait_one(path)["chunk_count"] == 3  # counted, then dropped


def test_fan_out_writes_go_out_together_after_the_unit(streams, upstream):
    path = unique()
    sse_route(upstream, path, [b"data: a\n\n"])
    _, chunks = stream(streams, path, **{"X-Mode": "fanout"})
    assert b"".join(chunks) == b"data: a\n\ncopy:data: a\n\n"


@pytest.mark.parametrize("style", ["\n", "\r\n", "\r"])
def test_events_split_across_reads_and_packed_in_one_read_are_reframed(streams, upstream, style):
    nl = style.encode()
    e1, e2, e3 = (b"data: %d" % i + nl + b"id: %d" % i + nl + nl for i in (1, 2, 3))
    path = unique()
    # e1 in three pieces, then e2 and e3 in one write
    sse_route(upstream, path, [e1[:4], e1[4:9], e1[9:], e2 + e3], gap=0.05)
    _, chunks = stream(streams, path)
    if style != "\r":
        assert chunks == [e1, e2 + e3]  # e1 waited for no later read; e2 and e3 came in one read: one write
    else:  # a last bare CR may be followed by LF: an event so ended is complete at the next byte, or at the end
        assert chunks == [e1 + e2, e3]


@pytest.mark.parametrize("last, completed", [(b"data: last", b"data: last\n\n"),
                                             (b"data: last\n", b"data: last\n\n"),
                                             (b"data: last\r\n", b"data: last\r\n\r\n"),
                                             (b"data: last\r", b"data: last\r\r")])
def test_trailing_event_without_its_blank_line_is_completed_at_eof(streams, upstream, last, completed):
    path = unique()
    sse_route(upstream, path, [b"data: a\n\n", last])
    _, chunks = stream(streams, path)
    assert chunks == [b"data: a\n\n", completed]
    assert _dispatched(completed) == [b"last"]


def _dispatched(stream_bytes: bytes) -> list[bytes]:
    """The data of each event an SSE client would dispatch from ``stream_bytes`` (WHATWG's line rules)."""
    events, data = [], None
    for line in re.split(rb"\r\n|\r|\n", stream_bytes)[:-1]:  # the piece after the last line end is no line
        if not line:
            if data is not None:
                events.append(data)
            data = None
        elif line.startswith(b"data:"):
            data = line[5:].lstrip(b" ") if data is None else data + b"\n" + line[5:].lstrip(b" ")
    return events


def test_each_upstream_chunk_of_a_chunked_body_is_one_unit(streams, upstream):
    path = unique()
    pieces = [b"alpha", b"b" * 3000, b"{\"json\": true}"]
    sse_route(upstream, path, pieces, content_type="application/octet-stream", gap=0.02)
    _, chunks = stream(streams, path, **{"X-Test-Stream": "1"})
    assert b"".join(chunks) == b"".join(pieces)
    assert [u[2] for u in streams.records.wait_one(path)["units"]] == [5, 3000, 14]


def test_a_plain_body_is_relayed_read_by_read(streams, upstream):
    path = unique()
    pieces = [b"first-part;", b"second-part;", b"third"]
    sse_route(upstream, path, pieces, chunked=False, content_type="text/plain", gap=0.1)
    _, chunks = stream(streams, path, **{"X-Test-Stream": "1"})
    assert b"".join(chunks) == b"".join(pieces)
    assert len(chunks) == 3


def test_each_event_reaches_the_client_before_the_upstream_sends_the_next(streams, upstream):
    path = unique()
    got_first, got_head = threading.Event(), threading.Event()
    waited = {}

    def route(h, s):
        h.start_chunked(content_type=SSE)
        waited["head"] = got_head.wait(5)  # headers reached the client with no unit yet
        h.chunk(b"data: first\n\n")
        waited["first"] = got_first.wait(5)  # ... and the first event before the second exists
        h.chunk(b"data: second\n\n")
        h.end_chunked()
    upstream.route(path, route)
    client = StreamClient(streams.url, path)
    assert client.read_head() == 200
    got_head.set()
    assert client.next_chunk() == b"data: first\n\n"
    got_first.set()
    assert client.read_rest() == [b"data: second\n\n"]
    assert waited == {"head": True, "first": True}


def test_streams_are_retried_until_the_head_is_accepted(streams, upstream):
    path = unique()
    calls = {"n": 0}

    def route(h, s):
        calls["n"] += 1
        if calls["n"] == 1:
            return h.reply(503, b"busy")
        h.start_chunked(content_type=SSE)
        h.chunk(b"data: ok\n\n")
        h.end_chunked()
    upstream.route(path, route)
    _, chunks = stream(streams, path, **{"X-Test-Retry": "2"})
    assert chunks == [b"data: ok\n\n"] and calls["n"] == 2


def test_upstream_connection_is_reused_after_a_complete_stream(streams, upstream):
    prefix = unique("/reuse")
    for i in range(3):
        sse_route(upstream, f"{prefix}/{i}", THREE)
        stream(streams, f"{prefix}/{i}")
    assert len({s.peer_port for s in upstream.seen(prefix)}) == 1


def test_compressed_event_stream_is_decoded_for_hooks_and_sent_plain(streams, upstream):
    path = unique()
    body = gzip.compress(b"".join(THREE))
    sse_route(upstream, path, [body[:10], body[10:]], headers=[("Content-Encoding", "gzip")])
    client, chunks = stream(streams, path, **{"X-Mode": "prefix"})
    assert client.header("Content-Encoding") is None
    assert b"".join(chunks) == b"".join(b"[p]" + e for e in THREE)


def test_heartbeats_keep_a_silent_event_stream_alive(streams_factory, upstream):
    g = streams_factory(TEST_HEARTBEAT="0.2")
    path = unique()
    sse_route(upstream, path, [b"data: a\n\n", b"data: b\n\n"], gap=0.9)
    _, chunks = stream(g, path)
    assert [c for c in chunks if not c.startswith(b":")] == [b"data: a\n\n", b"data: b\n\n"]
    assert chunks.count(b": keep-alive\n\n") >= 3
    assert g.records.wait_one(path)["chunk_count"] == 2  # heartbeats are not units


def test_buffered_replies_still_work_beside_streams(streams, upstream):
    reply = request(streams.url, "GET", unique("/plain"))
    assert reply.status == 200 and reply.header("X-After-Forward") == "ran"
