"""A stream's read (``upstream.body.WaitingRead``) with real sockets in one process: how its bound is kept.

The worker's loop runs many greenlets; a read's bound must hold whatever the
others did in the same loop turn.
"""
import socket
import time

import pytest

gevent = pytest.importorskip("gevent")
import gevent.socket  # noqa: E402

from forkproxy.upstream.body import WaitingRead  # noqa: E402

busy = time.sleep  # this process is not monkey-patched: a real, blocking stall of the loop


@pytest.fixture
def upstream_and_reader():
    listener = gevent.socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    reader = gevent.socket.create_connection(listener.getsockname())
    upstream, _ = listener.accept()
    yield upstream, reader
    for sock in (reader, upstream, listener):
        sock.close()


def test_a_read_bound_counts_from_when_the_read_starts_not_from_the_loops_last_clock_reading(upstream_and_reader):
    _, reader = upstream_and_reader
    reader.settimeout(1.0)
    read = WaitingRead(reader, b"")
    gevent.sleep(0.05)  # resumed by a loop turn, whose clock reading is now
    busy(0.6)  # work of other greenlets in that same turn
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        read.read(10)
    assert time.monotonic() - started >= 0.9


@pytest.mark.parametrize("after_a_unit", [False, True], ids=["first read", "after a read that found a unit"])
def test_bytes_that_came_in_time_win_over_a_bound_due_in_the_same_loop_turn(upstream_and_reader, after_a_unit):
    upstream, reader = upstream_and_reader
    reader.settimeout(0.3)
    read = WaitingRead(reader, b"")
    if after_a_unit:  # the next read waits for readable, then reads
        upstream.send(b"unit")
        assert read.read(10) == b"unit"

    def sends_in_time_then_stalls_the_loop():
        upstream.send(b"x")
        busy(0.5)  # the loop polls again only after the bound is due

    gevent.spawn_later(0.1, sends_in_time_then_stalls_the_loop)
    assert read.read(10) == b"x"
