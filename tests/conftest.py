import pytest

from tests.support.gunicorn import Gunicorn
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
