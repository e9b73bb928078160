"""SSE framing, without sockets: every line-end style, any split; the error event a failed stream ends with."""
import json

import pytest

from forkproxy.errors import BadUpstreamResponse
from forkproxy.http.sse import EventFramer, EventTooLarge
from forkproxy.messages import StreamWriter
from forkproxy.relay.stream import error_event

STREAMS = {
    "lf": b"data: a\n\ndata: b\nid: 2\n\n",
    "crlf": b"data: a\r\n\r\ndata: b\r\nid: 2\r\n\r\n",
    "cr": b"data: a\r\rdata: b\rid: 2\r\r",
    "mixed": b"data: a\r\n\ndata: b\rid: 2\n\r\n",
}


def frame(stream, pieces):
    framer = EventFramer()
    out = []
    for piece in pieces:
        out += framer.feed(piece)
    return out + framer.finish()


@pytest.mark.parametrize("style", STREAMS)
def test_every_split_of_the_stream_gives_the_same_two_events(style):
    stream = STREAMS[style]
    whole = frame(stream, [stream])
    assert len(whole) == 2 and b"".join(whole) == stream
    for cut in range(1, len(stream)):
        assert frame(stream, [stream[:cut], stream[cut:]]) == whole, cut
    assert frame(stream, [bytes([b]) for b in stream]) == whole


def test_several_events_in_one_read_are_split():
    framer = EventFramer()
    assert framer.feed(b"data: 1\n\ndata: 2\n\ndata: 3\n\ndata: 4") == [b"data: 1\n\n", b"data: 2\n\n", b"data: 3\n\n"]
    assert framer.finish() == [b"data: 4\n\n"]


def test_cr_at_the_end_of_a_read_waits_for_a_possible_lf():
    framer = EventFramer()
    assert framer.feed(b"data: x\r\n\r") == []
    assert framer.feed(b"\ndata: y") == [b"data: x\r\n\r\n"]


def test_a_trailing_event_is_completed_at_eof():
    for tail, completed in [(b"data: z", b"data: z\n\n"), (b"data: z\n", b"data: z\n\n"),
                            (b"data: z\r\n", b"data: z\r\n\r\n"), (b"data: z\r\r", b"data: z\r\r"),
                            (b"data: z\r", b"data: z\r\r"), (b"data: y\ndata: z\r", b"data: y\ndata: z\r\r")]:
        framer = EventFramer()
        assert framer.feed(tail) == []
        assert framer.finish() == [completed], tail


def test_nothing_left_means_nothing_at_eof():
    framer = EventFramer()
    framer.feed(b"data: a\n\n")
    assert framer.finish() == []


def test_an_incomplete_event_over_the_limit_fails():
    framer = EventFramer(max_event_bytes=100)
    framer.feed(b"data: " + b"x" * 90)
    with pytest.raises(EventTooLarge):
        framer.feed(b"x" * 20)


def test_complete_events_are_not_held_against_the_limit():
    framer = EventFramer(max_event_bytes=100)
    events = framer.feed((b"data: " + b"x" * 80 + b"\n\n") * 50)
    assert len(events) == 50 and framer.pending == 0


def test_an_8_mib_event_in_1_4_kb_reads_is_joined_once_not_at_every_read():
    # Joining at every read copies ~25 GB here (seconds); joining once copies 8 MiB (milliseconds).
    import time
    framer = EventFramer(max_event_bytes=16 * 1024 * 1024)
    piece = b"data: " + b"z" * 1394 + b"\n"
    started = time.perf_counter()
    for _ in range(6000):
        assert framer.feed(piece) == []
    (event,) = framer.feed(b"\n")
    assert len(event) == 6000 * 1401 + 1 and event.startswith(piece) and framer.pending == 0
    assert time.perf_counter() - started < 1.0  # generous: about 0.04 s here, 7 s when quadratic


@pytest.mark.parametrize("style", STREAMS)
def test_every_three_way_split_gives_the_same_events(style):
    # The held part, its last bytes and the new read must together find every blank line.
    stream = STREAMS[style] * 2
    whole = frame(stream, [stream])
    for a in range(1, len(stream) - 1):
        for b in range(a + 1, len(stream)):
            assert frame(stream, [stream[:a], stream[a:b], stream[b:]]) == whole, (a, b)


def test_large_event_in_many_small_reads_is_linear_not_quadratic():
    framer = EventFramer()
    for _ in range(20000):
        assert framer.feed(b"data: " + b"y" * 44 + b"\n") == []
    (event,) = framer.feed(b"\n")
    assert len(event) == 20000 * 51 + 1


def test_event_data_joins_data_lines_and_skips_other_fields():
    from forkproxy.http.sse import event_data
    assert event_data(b"event: x\ndata: a\ndata:b\nid: 3\n\n") == b"a\nb"
    assert event_data(b"data: {\"k\": 1}\r\n\r\n") == b'{"k": 1}'
    assert event_data(b": keep-alive\n\n") is None
    assert event_data(b"data\n\n") == b""


def test_one_whole_event_per_read_keeps_its_bytes_and_the_state_clean():
    framer = EventFramer()
    for event in (b"data: 1\n\n", b"\n\n", b"data: x\ndata: y\n\n"):
        assert framer.feed(event) == [event]
    assert framer.feed(b"data: a\r\n\r\n") == [b"data: a\r\n\r\n"]  # CR line ends take the full path
    assert framer.feed(b"data: b\n") == [] and framer.feed(b"\n") == [b"data: b\n\n"]
    assert framer.finish() == []


def test_the_error_event_is_one_event_holding_only_the_client_safe_message():
    error = BadUpstreamResponse('the upstream said "no"\nthen more')
    event = error_event(error)
    assert frame(event, [event]) == [event]  # one event: the message's newline is escaped by JSON
    assert json.loads(event[len(b"data: "):]) == {
        "error": {"message": 'the upstream said "no"\nthen more', "type": "upstream_stream_failed"}}


def test_out_fail_keeps_its_message_and_leaves_something_for_the_relay_to_look_at():
    out = StreamWriter()
    out.fail("provider error")
    assert out.failure == "provider error" and out.take()  # the relay checks for a failure only when a unit wrote
