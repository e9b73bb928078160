"""Request IDs, access-log lines (plain and JSON) and Prometheus metrics across workers."""
import json
import re
import time
import urllib.request
import uuid


from tests.support.client import StreamClient, request
from tests.support.gunicorn import Gunicorn
from tests.support.servers import event_stream, free_port


def test_an_incoming_request_id_is_kept_end_to_end(gateway, upstream):
    path = f"/rid/{uuid.uuid4().hex}"
    reply = request(gateway.url, "GET", path, headers={"X-Request-ID": "abc-123.x"})
    assert reply.all("X-Request-ID") == ["abc-123.x"]
    assert upstream.seen(path)[0].all("X-Request-ID") == ["abc-123.x"]
    gateway.wait_for_log(rf'"GET {path} HTTP/1.1" 200 .* id=abc-123\.x ')


def test_a_missing_or_unsafe_request_id_is_replaced_by_a_new_one(gateway, upstream):
    ids = set()
    for incoming in (None, 'bad "id" with spaces', "x" * 300):
        path = f"/rid/{uuid.uuid4().hex}"
        reply = request(gateway.url, "GET", path, headers={"X-Request-ID": incoming} if incoming else {})
        rid = reply.header("X-Request-ID")
        assert re.fullmatch(r"[0-9a-f]{32}", rid)
        assert upstream.seen(path)[0].header("X-Request-ID") == rid
        ids.add(rid)
    assert len(ids) == 3


def test_proxy_errors_carry_the_request_id_in_reply_and_log(gateway):
    reply = request(gateway.url, "GET", "/rid-err", headers={"X-Request-ID": "err-1",
                                                             "X-Test-Upstream": f"http://127.0.0.1:{free_port()}"})
    assert reply.status == 502 and reply.header("X-Request-ID") == "err-1"
    gateway.wait_for_log(r"\[err-1\] GET /rid-err -> 502 upstream_unreachable")


def test_streams_carry_the_request_id(streams, upstream):
    path = f"/rid-s/{uuid.uuid4().hex}"
    upstream.route(path, event_stream(1))
    client = StreamClient(streams.url, path, headers={"X-Request-ID": "stream-7"})
    client.read_head()
    client.read_rest()
    assert client.header("X-Request-ID") == "stream-7"


def test_json_access_log_lines(upstream):
    g = Gunicorn("forkproxy.app", env={"FORKPROXY_UPSTREAM": upstream.url,
                                       "FORKPROXY_ACCESS_LOG_FORMAT": "json"}).start()
    try:
        path = f"/jsonlog/{uuid.uuid4().hex}"
        request(g.url, "GET", path + "?a=1", headers={"X-Request-ID": "json-1"})
        line = g.wait_for_log(r'\{"remote".*"json-1".*\}').group(0)
        record = json.loads(line)
        assert record["path"] == path and record["query"] == "a=1" and record["method"] == "GET"
        assert (record["status"], record["upstream_status"], record["retries"]) == (200, 200, 0)
        assert record["upstream"] == f"127.0.0.1:{upstream.port}" and record["upstream_seconds"] >= 0
    finally:
        g.stop()


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        return resp.read().decode()


def sample(text: str, name: str, **labels) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_metrics_are_summed_across_two_workers(upstream):
    port = free_port()
    g = Gunicorn("forkproxy.app", workers=2, env={"FORKPROXY_UPSTREAM": upstream.url,
                                                  "FORKPROXY_METRICS_BIND": f"127.0.0.1:{port}",
                                                  "FORKPROXY_RETRY_ATTEMPTS": "2",
                                                  "FORKPROXY_RETRY_BACKOFF_MS": "1"}).start()
    try:
        prefix = f"/metrics-{uuid.uuid4().hex}"
        flaky = {"n": 0}

        def once_busy(h, s):
            flaky["n"] += 1
            h.reply(503 if flaky["n"] == 1 else 200, b"x")
        upstream.route(prefix + "/flaky", once_busy)
        upstream.route(prefix + "/sse", event_stream(3))
        for i in range(20):
            assert request(g.url, "GET", f"{prefix}/ok/{i}").status == 200
        assert request(g.url, "POST", f"{prefix}/ok", body=b"x").status == 200
        assert request(g.url, "GET", f"{prefix}/flaky").status == 200
        request(g.url, "GET", "/", headers={"Connection": "Upgrade", "Upgrade": "spdy/3"})
        for _ in range(2):
            request(g.url, "GET", prefix + "/sse")
        pids = set()
        deadline = time.monotonic() + 10
        text = ""
        while time.monotonic() < deadline:
            text = scrape(port)
            if sample(text, "forkproxy_requests_total") >= 25:
                break
            time.sleep(0.1)
        assert sample(text, "forkproxy_requests_total", method="GET", status="200",
                      upstream=f"127.0.0.1:{upstream.port}") == 23  # a member is named host:port
        assert sample(text, "forkproxy_requests_total", method="POST", status="200") == 1
        assert sample(text, "forkproxy_requests_total", status="501") == 1
        assert sample(text, "forkproxy_proxy_errors_total", type="upgrade_not_supported") == 1
        assert sample(text, "forkproxy_upstream_retries_total") == 1
        assert sample(text, "forkproxy_upstream_latency_seconds_count") == 24
        assert sample(text, "forkproxy_stream_units_total") == 6
        assert sample(text, "forkproxy_active_streams") == 0
        del pids
    finally:
        g.stop()
