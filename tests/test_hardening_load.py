"""Resource bounds and sustained load: nothing lost, nothing duplicated, memory flat."""
import socket
import threading
import time
import uuid
from collections import Counter

import pytest

from tests.support.client import StreamClient, raw, request, status_of
from tests.support.gunicorn import Gunicorn, open_fds, rss_kib
from tests.support.servers import event_stream


@pytest.fixture(scope="module")
def edge(upstream):
    g = Gunicorn("tests.apps.gateway:app", env={"TEST_UPSTREAM": upstream.url, "TEST_MAX_REQUEST": "100000",
                                                "TEST_TIMEOUT": "10"}).start()
    yield g
    g.stop()


def test_thousands_of_idle_keep_alive_connections_do_not_stop_service(edge):
    (worker,) = edge.worker_pids()
    request(edge.url, "GET", "/warm")
    before = open_fds(worker)
    idle = []
    try:
        for _ in range(2000):
            s = socket.create_connection(("127.0.0.1", edge.port))
            idle.append(s)
        started = time.monotonic()
        assert request(edge.url, "GET", "/through-the-crowd").status == 200
        assert time.monotonic() - started < 2
    finally:
        for s in idle:
            s.close()
    deadline = time.monotonic() + 10
    while open_fds(worker) > before + 5 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert open_fds(worker) <= before + 5


def test_many_slow_upstreams_on_one_worker_leave_fast_requests_fast(edge, upstream):
    prefix = f"/slowpool/{uuid.uuid4().hex}"
    upstream.route(prefix + "/slow", lambda h, s: (time.sleep(2), h.reply(200, b"slow")))
    slow_results, fast_times = [], []

    def slow(i):
        slow_results.append(request(edge.url, "GET", f"{prefix}/slow/{i}", timeout=20).status)
    threads = [threading.Thread(target=slow, args=(i,)) for i in range(100)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    for i in range(20):
        started = time.monotonic()
        assert request(edge.url, "GET", f"{prefix}/fast/{i}").status == 200
        fast_times.append(time.monotonic() - started)
    for t in threads:
        t.join(30)
    assert slow_results == [200] * 100
    assert max(fast_times) < 1.0, fast_times


def test_memory_stays_flat_while_refusing_oversize_bodies(edge):
    (worker,) = edge.worker_pids()
    head = b"POST /big HTTP/1.1\r\nHost: x\r\nContent-Length: 50000000\r\nConnection: close\r\n\r\n"
    chunk = b"%x\r\n%s\r\n" % (50000, b"c" * 50000)
    chunked = b"POST /big HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n" + chunk * 4
    for _ in range(20):  # warm up allocator pools
        raw(edge.url, head)
    before = rss_kib(worker)
    for i in range(300):
        reply = raw(edge.url, head if i % 2 else chunked, timeout=10)
        assert status_of(reply) == 413
    assert rss_kib(worker) - before < 10 * 1024


@pytest.mark.slow
def test_sustained_mixed_load_loses_and_duplicates_nothing(edge, upstream):
    prefix = f"/mixed/{uuid.uuid4().hex}"
    upstream.route(prefix + "/sse", event_stream(5))
    sent, failures = Counter(), []
    stop = threading.Event()

    def worker(n):
        i = 0
        while not stop.is_set():
            rid = f"{n}-{i}"
            i += 1
            try:
                kind = i % 3
                if kind == 0:
                    ok = request(edge.url, "GET", f"{prefix}/get/{rid}").status == 200
                elif kind == 1:
                    ok = request(edge.url, "POST", f"{prefix}/post/{rid}", body=rid.encode() * 100).status == 200
                else:
                    client = StreamClient(edge.url, f"{prefix}/sse/{rid}")
                    client.read_head()
                    ok = b"".join(client.read_rest()).count(b"\n\n") == 5
                    client.close()
                if ok:
                    sent[rid] += 1
                else:
                    failures.append(rid)
            except Exception as exc:
                failures.append(f"{rid}: {exc!r}")
    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    time.sleep(5)
    stop.set()
    for t in threads:
        t.join(20)
    received = Counter(s.path.rsplit("/", 1)[1] for s in upstream.seen(prefix))
    assert failures == []
    assert len(sent) > 200
    assert received == sent  # every request reached the upstream exactly once
