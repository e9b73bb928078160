"""A new upstream connection is made on a greenlet of its own (``connections._on_own_stack``): what the request
sees of it. The connect here stands for one waiting on the network; the real ones run in every end-to-end test."""
import contextvars

import pytest

gevent = pytest.importorskip("gevent")
from gevent.exceptions import InvalidSwitchError  # noqa: E402
from greenlet import GreenletExit, getcurrent  # noqa: E402

from forkproxy.server.shutdown import WorkerStopping  # noqa: E402
from forkproxy.upstream.connections import _on_own_stack  # noqa: E402
from forkproxy.upstream.failures import SentNothing  # noqa: E402


def waiting_connect(seen: list):
    """A connect that takes 0.3 s, noting whether it ran on a greenlet of its own and how it ended."""
    def connect(conn):
        seen.append(("own greenlet", getcurrent() is not conn))
        try:
            gevent.sleep(0.3)
            seen.append("finished")
        except GreenletExit:
            seen.append("ended")
            raise
    return connect


def start(connect) -> gevent.Greenlet:
    """A request whose connect is running: it passes its own greenlet as the connection."""
    requester = gevent.spawn(lambda: _on_own_stack(connect, gevent.getcurrent()))
    gevent.sleep(0.05)
    return requester


def test_a_request_interrupted_while_its_connect_waits_ends_the_connect_first():
    """A worker stopping kills a request while its connect waits: the connect must not run on later."""
    seen = []
    requester = start(waiting_connect(seen))
    requester.kill(WorkerStopping, block=True, timeout=2)  # as shutdown.stop_all ends a request
    assert requester.dead and isinstance(requester.value, WorkerStopping)  # a GreenletExit: gevent's value
    gevent.sleep(0.4)  # past when the connect would have finished
    assert seen == [("own greenlet", True), "ended"]


def test_a_stray_switch_into_a_request_whose_connect_runs_is_refused_and_the_connect_ended():
    seen = []
    requester = start(waiting_connect(seen))
    gevent.get_hub().loop.run_callback(requester.switch, "a stray value")
    with pytest.raises(InvalidSwitchError):
        requester.get(timeout=2)
    gevent.sleep(0.4)
    assert seen == [("own greenlet", True), "ended"]


def test_what_the_connect_raises_reaches_the_request():
    def refused(conn):
        gevent.sleep(0.01)
        raise SentNothing.refused(ConnectionRefusedError(111, "refused"))

    with pytest.raises(SentNothing):
        gevent.spawn(_on_own_stack, refused, None).get(timeout=2)


def test_the_connect_sees_the_requests_contextvars():
    trace_id = contextvars.ContextVar("trace_id", default="unset")
    seen = []

    def request():
        trace_id.set("abc")
        _on_own_stack(lambda conn: seen.append(trace_id.get()), None)

    gevent.spawn(request).get(timeout=2)
    assert seen == ["abc"]
