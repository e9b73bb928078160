"""An https:// upstream streams like an http:// one, verified against a test CA."""
import time
import uuid

import pytest

from tests.support.client import StreamClient, request
from tests.support.servers import Upstream, behind_tls, event_stream

trustme = pytest.importorskip("trustme")


@pytest.fixture(scope="module")
def tls_upstream(tmp_path_factory):
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    ca_path = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_path))
    server = Upstream()  # reuse its routing and recording, behind TLS
    tls = behind_tls(server, cert)
    server.tls_url = tls.url
    server.ca_path = ca_path
    yield server
    tls.shutdown()
    tls.server_close()
    server.close()


@pytest.fixture(scope="module")
def tls_streams(streams_factory, tls_upstream):
    return streams_factory(TEST_CA=str(tls_upstream.ca_path))


def test_sse_over_https_streams_event_by_event(tls_streams, tls_upstream):
    path = f"/tls/{uuid.uuid4().hex}"

    tls_upstream.route(path, event_stream(3))
    client = StreamClient(tls_streams.url, path, headers={"X-Test-Upstream": tls_upstream.tls_url})
    assert client.read_head() == 200
    assert b"".join(client.read_rest()) == b"data: 0\n\ndata: 1\n\ndata: 2\n\n"
    assert tls_streams.records.wait_one(path)["chunk_count"] == 3


def test_sse_over_https_whose_first_event_comes_after_a_pause(tls_streams, tls_upstream):
    path = f"/tls-late/{uuid.uuid4().hex}"

    # the relay starts with nothing read past the head
    tls_upstream.route(path, event_stream(2, gap=0.05, before=lambda: time.sleep(0.3)))
    client = StreamClient(tls_streams.url, path, headers={"X-Test-Upstream": tls_upstream.tls_url})
    assert client.read_head() == 200
    assert b"".join(client.read_rest()) == b"data: 0\n\ndata: 1\n\n"
    assert tls_streams.records.wait_one(path)["errored"] is False


def test_buffered_over_https_and_connection_reuse(tls_streams, tls_upstream):
    prefix = f"/tls-buf/{uuid.uuid4().hex}"
    for i in range(5):
        reply = request(tls_streams.url, "GET", f"{prefix}/{i}", headers={"X-Test-Upstream": tls_upstream.tls_url})
        assert reply.status == 200
    assert len({s.peer_port for s in tls_upstream.seen(prefix)}) == 1


def test_an_untrusted_certificate_is_refused(streams, tls_upstream):
    # `streams` has no TEST_CA: the system store does not know the test CA.
    reply = request(streams.url, "GET", "/x", headers={"X-Test-Upstream": tls_upstream.tls_url})
    assert reply.status == 502 and reply.error_type() == "upstream_unreachable"
    assert "TLS" in reply.json()["error"]["message"]
