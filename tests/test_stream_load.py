"""Many streams on one worker, big streams in flat memory, nothing leaked."""
import threading
import time
import uuid


from tests.support.client import StreamClient
from tests.support.gunicorn import open_fds, rss_kib
from tests.support.servers import RawServer, event_stream, read_request_head

MiB = 1024 * 1024


def test_hundreds_of_concurrent_streams_on_one_worker_each_get_every_event(streams, upstream):
    n, events = 300, 5
    prefix = f"/many/{uuid.uuid4().hex}"
    release = threading.Event()

    # every stream is open at once before any event flows
    upstream.route(prefix, event_stream(events, gap=0.02, before=lambda: release.wait(20)))
    results, errors = {}, []

    def consume(i):
        try:
            client = StreamClient(streams.url, f"{prefix}/{i}", timeout=30)
            client.read_head()
            results[i] = client.read_rest()
            client.close()
        except Exception as exc:  # reported below, with the count
            errors.append(repr(exc))
    threads = [threading.Thread(target=consume, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 20
    while len(upstream.seen(prefix)) < n and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(upstream.seen(prefix)) == n, "not all streams were open at once"
    assert len(streams.worker_pids()) == 1
    release.set()
    for t in threads:
        t.join(40)
    assert errors == []
    expected = [b"data: %d\n\n" % i for i in range(events)]
    assert len(results) == n and all(b"".join(r) == b"".join(expected) for r in results.values())


def test_a_200_mib_chunked_stream_passes_in_flat_memory_and_leaks_nothing(streams):
    piece = b"%x\r\n%s\r\n" % (64 * 1024, b"m" * 64 * 1024)

    def flood(conn):
        read_request_head(conn)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")
        for _ in range(200 * 16):
            conn.sendall(piece)
        conn.sendall(b"0\r\n\r\n")
    server = RawServer(flood)
    (worker,) = streams.worker_pids()
    path = f"/flood/{uuid.uuid4().hex}"
    try:
        client = StreamClient(streams.url, path, headers={"X-Test-Upstream": server.url, "X-Test-Stream": "1"},
                              timeout=60)
        client.read_head()
        time.sleep(0.2)
        before_rss, before_fds = rss_kib(worker), open_fds(worker)
        total = 0
        while (data := client.next_chunk()) is not None:
            total += len(data)
        client.close()
        peak = rss_kib(worker, "VmHWM")
        assert total == 200 * MiB
        assert peak - before_rss < 48 * 1024, f"worker grew {peak - before_rss} KiB while streaming"
        time.sleep(0.3)
        assert open_fds(worker) <= before_fds, "file descriptors left open after the stream"
    finally:
        server.close()
