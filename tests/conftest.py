import json
import time
from pathlib import Path

import pytest

from tests.support.gunicorn import Gunicorn
from tests.support.redis import BINARY as REDIS, RedisServer
from tests.support.servers import Upstream


@pytest.fixture(scope="session")
def upstream():
    server = Upstream()
    yield server
    server.close()


@pytest.fixture(scope="module")
def gateway(upstream):
    """The hooked test gateway under real gunicorn with one gevent worker."""
    g = Gunicorn("tests.apps.gateway:app", env={"TEST_UPSTREAM": upstream.url, "TEST_TIMEOUT": "3",
                                                "TEST_CONNECT_TIMEOUT": "1"}).start()
    yield g
    g.stop()


class Records:
    """The JSON lines tests/apps/streams.py writes from on_stream_end (tests/apps/tunnels.py: on_tunnel_end)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def for_path(self, path: str) -> list[dict]:
        if not self.path.exists():
            return []
        return [r for r in map(json.loads, self.path.read_text().splitlines()) if r["path"] == path]

    def wait_one(self, path: str, timeout: float = 10) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.for_path(path)
            if found:
                time.sleep(0.05)  # a second record would be a bug: give it the chance to show
                found = self.for_path(path)
                assert len(found) == 1, found
                return found[0]
            time.sleep(0.02)
        raise AssertionError(f"no hook record (on_stream_end, on_tunnel_end) for {path}")


@pytest.fixture(scope="module")
def gateways():
    """start(app, workers=1, **env): a gateway under gunicorn, stopped with the module."""
    started = []

    def start(app, workers=1, **env):
        g = Gunicorn(app, workers=workers, env=env).start()
        started.append(g)
        return g
    yield start
    for g in started:
        g.stop()


@pytest.fixture(scope="module")
def recorded_gateways(gateways, tmp_path_factory):
    """start(app, **env): a gateway whose end-of-stream/tunnel hooks write to ``g.records``."""
    def start(app, **env):
        records = Records(tmp_path_factory.mktemp("records") / "records.jsonl")
        g = gateways(app, TEST_RECORDS=str(records.path), **env)
        g.records = records
        return g
    return start


@pytest.fixture(scope="module")
def streams_factory(upstream, recorded_gateways):
    return lambda **env: recorded_gateways("tests.apps.streams:app", TEST_UPSTREAM=upstream.url, **env)


@pytest.fixture(scope="module")
def streams(streams_factory):
    """The streaming test gateway: idle timeout 2 s, events up to 64 KiB."""
    return streams_factory(TEST_IDLE="2", TEST_MAX_EVENT="65536", TEST_MAX_RESPONSE="1000")


@pytest.fixture(scope="module")
def redis_server():
    """A real redis-server on a free port, stopped with the module."""
    if REDIS is None:
        pytest.skip("redis-server is not installed (.ci/run installs it)")
    server = RedisServer()
    yield server
    server.close()
