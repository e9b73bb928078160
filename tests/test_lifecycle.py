"""Real signals to the real gunicorn: graceful stop, reload under load, a killed worker."""
import os
import re
import signal
import threading
import time
import uuid

from tests.conftest import Records
from tests.support.client import StreamClient, request
from tests.support.gunicorn import Gunicorn
from tests.support.servers import event_stream


def slow_routes(upstream, prefix):
    upstream.route(prefix + "/slow", lambda h, s: (time.sleep(1.5), h.reply(200, b"slow-done")))

    upstream.route(prefix + "/stream", event_stream(8, gap=0.25))


def test_sigterm_lets_in_flight_requests_and_streams_finish(upstream):
    prefix = f"/term-{uuid.uuid4().hex}"
    slow_routes(upstream, prefix)
    g = Gunicorn("forkproxy.app", env={"FORKPROXY_UPSTREAM": upstream.url, "FORKPROXY_GRACEFUL_TIMEOUT": "15"}).start()
    results = {}

    def buffered():
        results["buffered"] = request(g.url, "GET", prefix + "/slow").body

    def streamed():
        client = StreamClient(g.url, prefix + "/stream")
        client.read_head()
        results["stream"] = client.read_rest()  # raises if cut: the thread records nothing
    threads = [threading.Thread(target=buffered), threading.Thread(target=streamed)]
    try:
        for t in threads:
            t.start()
        time.sleep(0.4)
        g.proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(20)
        assert results.get("buffered") == b"slow-done"
        assert results.get("stream") == [b"data: %d\n\n" % i for i in range(8)]
        assert g.wait_exit(20) == 0
    finally:
        g.stop()


def test_sighup_reload_under_steady_load_fails_no_request(upstream):
    g = Gunicorn("forkproxy.app", workers=2, env={"FORKPROXY_UPSTREAM": upstream.url}).start()
    failures, done = [], []
    stop = threading.Event()

    def load():
        while not stop.is_set():
            try:
                reply = request(g.url, "GET", f"/hup/{uuid.uuid4().hex}", timeout=10)
                (done if reply.status == 200 else failures).append(reply.status)
            except Exception as exc:
                failures.append(repr(exc))
    threads = [threading.Thread(target=load) for _ in range(4)]
    try:
        for t in threads:
            t.start()
        time.sleep(1)
        old = set(g.worker_pids())
        g.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and (set(g.worker_pids()) & old or len(g.worker_pids()) < 2):
            time.sleep(0.1)
        time.sleep(1)
        stop.set()
        for t in threads:
            t.join(15)
        assert not set(g.worker_pids()) & old, "the old workers are still there"
        assert failures == [] and len(done) > 50
    finally:
        stop.set()
        g.stop()


def test_a_killed_worker_is_replaced_and_serving_resumes(upstream):
    g = Gunicorn("forkproxy.app", env={"FORKPROXY_UPSTREAM": upstream.url}).start()
    try:
        assert request(g.url, "GET", "/before").status == 200
        (old,) = g.worker_pids()
        os.kill(old, signal.SIGKILL)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and g.worker_pids() in ([], [old]):
            time.sleep(0.1)
        (new,) = g.worker_pids()
        assert new != old
        assert request(g.url, "GET", "/after").status == 200
    finally:
        g.stop()


def test_a_worker_killed_under_load_costs_only_its_in_flight_requests(upstream):
    g = Gunicorn("forkproxy.app", workers=2, env={"FORKPROXY_UPSTREAM": upstream.url}).start()
    outcomes = []
    stop = threading.Event()
    clients = 4

    def load():
        while not stop.is_set():
            try:
                ok = request(g.url, "GET", f"/kill/{uuid.uuid4().hex}", timeout=10).status == 200
            except Exception:
                ok = False
            outcomes.append((time.monotonic(), ok))
    threads = [threading.Thread(target=load) for _ in range(clients)]
    try:
        for t in threads:
            t.start()
        time.sleep(1)
        victim = g.worker_pids()[0]
        killed_at = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and (victim in g.worker_pids() or len(g.worker_pids()) < 2):
            time.sleep(0.1)
        time.sleep(1.5)
        stop.set()
        for t in threads:
            t.join(15)
        failed = [at for at, ok in outcomes if not ok]
        assert len(failed) <= clients, f"{len(failed)} failures: more than the requests in flight"
        assert all(at - killed_at < 1 for at in failed), "failures after the kill settled"
        assert sum(ok for at, ok in outcomes if at > killed_at + 1) > 20  # serving resumed
    finally:
        stop.set()
        g.stop()


def test_a_stream_that_outlives_graceful_timeout_is_still_billed_once(upstream, tmp_path):
    # gunicorn kills the greenlets left after graceful_timeout; on_stream_end must run all the same.
    path = f"/term-kill-{uuid.uuid4().hex}"
    upstream.route(path, _one_event_then_silence())
    records = Records(tmp_path / "records.jsonl")
    g = Gunicorn("tests.apps.streams:app", env={"TEST_UPSTREAM": upstream.url, "TEST_RECORDS": str(records.path),
                                                "TEST_IDLE": "30", "FORKPROXY_GRACEFUL_TIMEOUT": "1"}).start()
    try:
        client = StreamClient(g.url, path)
        client.read_head()
        assert client.next_chunk() == b"data: 0\n\n"
        g.proc.send_signal(signal.SIGTERM)
        record = records.wait_one(path, timeout=15)
        assert (record["chunk_count"], record["errored"], record["client_disconnected"]) == (1, True, False)
        assert g.wait_exit(20) == 0
        assert re.search(rf"GET {path}: stream cut after 1 units: worker stopping", g.log()), g.log()[-3000:]
        client.close()
    finally:
        g.stop()


def _one_event_then_silence():
    def route(h, s):
        h.start_chunked(content_type="text/event-stream")
        h.chunk(b"data: 0\n\n")
        time.sleep(8)  # longer than the graceful timeout, shorter than the idle timeout
    return route
