"""What reaches the upstream and what comes back, through real gunicorn."""
import email.utils
import gzip
import socket
import time
import uuid

from tests.support.client import raw, request, status_of


def unique(prefix="/f"):
    return f"{prefix}/{uuid.uuid4().hex}"


def test_method_path_query_and_body_reach_the_upstream(gateway, upstream):
    path = unique() + "?a=1&b=%20x"
    reply = request(gateway.url, "PUT", path, body=b"payload-bytes", headers={"X-Custom": "v"})
    assert reply.status == 200
    (seen,) = upstream.seen(path.split("?")[0])
    assert (seen.method, seen.path, seen.body) == ("PUT", path, b"payload-bytes")
    assert seen.header("X-Custom") == "v"
    assert seen.header("Content-Length") == "13"


def test_host_comes_from_the_upstream_url_not_the_client(gateway, upstream):
    path = unique()
    request(gateway.url, "GET", path, headers={"Host": "client-chosen.example"})
    (seen,) = upstream.seen(path)
    assert seen.all("Host") == [f"127.0.0.1:{upstream.port}"]


def test_hop_by_hop_and_connection_named_headers_never_reach_the_upstream(gateway, upstream):
    path = unique()
    request(gateway.url, "GET", path, headers=[
        ("Connection", "keep-alive, X-Secret-Hop"), ("X-Secret-Hop", "1"), ("Keep-Alive", "timeout=5"),
        ("Proxy-Authorization", "Basic cHJveHk6cGFzcw=="), ("TE", "trailers"), ("Trailer", "X-T"),
        ("Proxy-Connection", "keep-alive"), ("Expect", "100-continue"), ("X-End-To-End", "kept"),
    ], body=b"")
    (seen,) = upstream.seen(path)
    names = {k.lower() for k, _ in seen.headers}
    for hop in ("x-secret-hop", "keep-alive", "proxy-authorization", "te", "trailer", "proxy-connection", "expect"):
        assert hop not in names, hop
    assert seen.header("X-End-To-End") == "kept"


def test_hop_by_hop_and_connection_named_headers_never_reach_the_client(gateway, upstream):
    path = unique("/hop-back")
    upstream.route(path, lambda h, s: h.reply(200, b"ok", headers=[
        ("Connection", "X-Upstream-Hop"), ("X-Upstream-Hop", "1"), ("Keep-Alive", "timeout=9"),
        ("Proxy-Authenticate", "Basic"), ("Upgrade", "h2c"), ("X-Accel-Redirect", "/internal/secret"),
        ("X-Accel-Buffering", "yes"), ("X-Normal", "kept"),
    ]))
    reply = request(gateway.url, "GET", path)
    names = {k.lower() for k, _ in reply.headers}
    for hop in ("x-upstream-hop", "keep-alive", "proxy-authenticate", "upgrade", "x-accel-redirect", "x-accel-buffering"):
        assert hop not in names, hop
    assert reply.header("X-Normal") == "kept"


def test_repeated_response_headers_stay_repeated(gateway, upstream):
    path = unique("/cookies")
    upstream.route(path, lambda h, s: h.reply(200, b"ok", headers=[
        ("Set-Cookie", "a=1; Path=/"), ("Set-Cookie", "b=2; Path=/"), ("Set-Cookie", "c=3, with comma")]))
    reply = request(gateway.url, "GET", path)
    assert reply.all("Set-Cookie") == ["a=1; Path=/", "b=2; Path=/", "c=3, with comma"]


def test_x_forwarded_for_gets_the_client_appended(gateway, upstream):
    path = unique()
    request(gateway.url, "GET", path, headers={"X-Forwarded-For": "203.0.113.7"})
    (seen,) = upstream.seen(path)
    assert seen.header("X-Forwarded-For") == "203.0.113.7, 127.0.0.1"


def test_trusted_peer_keeps_its_forwarded_proto_and_host(gateway, upstream):
    # gunicorn's default forwarded_allow_ips trusts 127.0.0.1, where the test client is.
    path = unique()
    request(gateway.url, "GET", path, headers={"X-Forwarded-Proto": "https", "X-Forwarded-Host": "api.example"})
    (seen,) = upstream.seen(path)
    assert seen.header("X-Forwarded-Proto") == "https"
    assert seen.header("X-Forwarded-Host") == "api.example"


def test_trusted_peer_that_sent_none_gets_the_proxys_own_view(gateway, upstream):
    path = unique()
    request(gateway.url, "GET", path, headers={"Host": "front.example:8443"})
    (seen,) = upstream.seen(path)
    assert seen.header("X-Forwarded-Proto") == "http"
    assert seen.header("X-Forwarded-Host") == "front.example:8443"


def test_content_encoding_passes_untouched(gateway, upstream):
    payload = gzip.compress(b"hello " * 1000)
    path = unique("/gz")
    upstream.route(path, lambda h, s: h.reply(200, payload, headers=[("Content-Encoding", "gzip")]))
    reply = request(gateway.url, "GET", path, headers={"Accept-Encoding": "gzip"})
    assert reply.header("Content-Encoding") == "gzip"
    assert reply.body == payload
    assert reply.header("Content-Length") == str(len(payload))


def test_redirects_are_passed_to_the_client_not_followed(gateway, upstream):
    path = unique("/redir")
    upstream.route(path, lambda h, s: h.reply(302, b"", headers=[("Location", "/elsewhere")]))
    reply = request(gateway.url, "GET", path)
    assert reply.status == 302
    assert reply.header("Location") == "/elsewhere"
    assert upstream.seen("/elsewhere") == []


def test_head_keeps_the_upstream_content_length(gateway, upstream):
    path = unique("/head")
    upstream.route(path, lambda h, s: h.reply(200, b"x" * 1234))
    reply = request(gateway.url, "HEAD", path)
    assert reply.status == 200
    assert reply.header("Content-Length") == "1234"
    assert reply.body == b""


def test_304_keeps_the_upstream_content_length(gateway, upstream):
    path = unique("/notmod")
    upstream.route(path, lambda h, s: h.reply(304, b"", headers=[("Content-Length", "777"), ("ETag", '"v1"')]))
    reply = request(gateway.url, "GET", path, headers={"If-None-Match": '"v1"'})
    assert reply.status == 304
    assert reply.header("Content-Length") == "777"
    assert reply.header("ETag") == '"v1"'


def test_absolute_form_target_uses_only_its_path(gateway, upstream):
    path = unique("/abs")
    reply = raw(gateway.url, f"GET http://evil.example{path}?q=1 HTTP/1.1\r\nHost: evil.example\r\n"
                             "Connection: close\r\n\r\n".encode())
    assert status_of(reply) == 200
    (seen,) = upstream.seen(path)
    assert seen.path == path + "?q=1"
    assert seen.header("Host") == f"127.0.0.1:{upstream.port}"


def test_double_slash_target_is_forwarded_as_the_path_it_is(gateway, upstream):
    marker = uuid.uuid4().hex
    reply = raw(gateway.url, f"GET //evil.example/{marker} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    assert status_of(reply) == 200
    (seen,) = upstream.seen(f"//evil.example/{marker}")
    assert seen.target == f"//evil.example/{marker}"
    assert seen.header("Host") == f"127.0.0.1:{upstream.port}"


def test_targets_that_are_not_paths_get_400(gateway):
    for target in ("@evil.example/x", "*", "evil.example:80"):
        reply = raw(gateway.url, f"OPTIONS {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        assert status_of(reply) == 400, (target, reply[:200])


def test_an_upgrade_to_a_protocol_not_in_allowed_upgrades_gets_501(gateway, upstream):
    path = unique("/ws")
    reply = request(gateway.url, "GET", path, headers={"Connection": "Upgrade", "Upgrade": "spdy/3"})
    assert reply.status == 501
    assert reply.error_type() == "upgrade_not_supported"
    assert upstream.seen(path) == []


def test_a_websocket_upgrade_an_upstream_answers_without_101_is_an_ordinary_reply(gateway, upstream):
    path = unique("/ws")
    reply = request(gateway.url, "GET", path, headers={"Connection": "Upgrade", "Upgrade": "websocket"})
    assert reply.status == 200
    (seen,) = upstream.seen(path)
    assert (seen.header("Upgrade"), seen.header("Connection")) == ("websocket", "Upgrade")


def test_rewrite_path_changes_what_the_upstream_sees(gateway, upstream):
    marker = uuid.uuid4().hex
    request(gateway.url, "GET", f"/strip/{marker}?k=v")
    (seen,) = upstream.seen(f"/{marker}")
    assert seen.path == f"/{marker}?k=v"


def test_before_forward_can_swap_credentials(gateway, upstream):
    path = unique("/swap-key")
    request(gateway.url, "GET", path, headers={"Authorization": "Bearer client-key"})
    (seen,) = upstream.seen(path)
    assert seen.all("Authorization") == ["Bearer real-key"]


def test_short_circuit_answers_without_calling_the_upstream(gateway, upstream):
    path = unique("/short")
    reply = request(gateway.url, "GET", path)
    assert (reply.status, reply.body, reply.header("X-Short")) == (418, b"short-circuited", "yes")
    assert reply.header("X-Seen-Status") == "0"  # after_forward ran, with no upstream response
    assert upstream.seen(path) == []


def test_the_client_gets_one_date_and_one_server_header(gateway, upstream):
    path = unique("/dates")
    upstream.route(path, lambda h, s: h.reply(200, b"ok"))  # http.server sends its own Date and Server
    reply = request(gateway.url, "GET", path)
    assert len(reply.all("Date")) == 1 and len(reply.all("Server")) == 1


def test_the_date_header_is_the_time_of_the_reply_to_the_second(gateway, upstream):
    # The worker formats Date once a second: a reply a second later must not carry the old one.
    path = unique("/date-now")
    upstream.route(path, lambda h, s: h.reply(200, b"ok"))
    dates = []
    for _ in range(2):
        before = int(time.time())
        date = email.utils.parsedate_to_datetime(request(gateway.url, "GET", path).header("Date")).timestamp()
        assert before <= date <= time.time()
        dates.append(date)
        time.sleep(1.1)
    assert dates[1] > dates[0]


def test_the_request_target_reaches_the_upstream_byte_for_byte(gateway, upstream):
    # Signed URLs (S3/SigV4 presigned links) and upstreams that route on the raw path break
    # on any re-encoding: %2f stays lower-case and escaped, | { } stay as sent.
    base = unique()
    target = base + "/a%2fb/c|d{e}?x=%7c&sig=AbC%2B%3D"
    assert request(gateway.url, "GET", target).status == 200
    (seen,) = upstream.seen(base)
    assert seen.target == target


def test_framing_and_hop_by_hop_headers_a_hook_copied_from_the_client_are_forkproxys_to_set(gateway, upstream):
    # `ureq.headers = req.headers.copy()` would send the client's Transfer-Encoding beside
    # forkproxy's Content-Length and the de-chunked body: a desync of the pooled connection.
    path = unique("/hook-copies-client-headers")
    reply = request(gateway.url, "POST", path, body=b"5\r\nhello\r\n0\r\n\r\n", headers=[
        ("Transfer-Encoding", "chunked"), ("Host", "client.example"), ("Connection", "keep-alive, X-Hop"),
        ("X-Hop", "1"), ("TE", "trailers"), ("Expect", "100-continue"), ("Upgrade", "h2c"),
        ("Keep-Alive", "timeout=5"), ("X-End-To-End", "kept")])
    assert reply.status == 200
    (seen,) = upstream.seen(path)
    assert seen.body == b"hello"
    assert seen.all("Content-Length") == ["5"]
    assert seen.all("Host") == [f"127.0.0.1:{upstream.port}"]
    names = {k.lower() for k, _ in seen.headers}
    for name in ("transfer-encoding", "x-hop", "te", "expect", "upgrade", "keep-alive"):
        assert name not in names, name
    assert seen.all("Connection") == []
    assert (seen.header("X-End-To-End"), seen.header("X-Copied")) == ("kept", "yes")
    assert request(gateway.url, "GET", unique()).status == 200  # the pooled connection is still in step


def test_a_reply_larger_than_the_sockets_buffers_to_a_client_slow_to_read_arrives_whole(gateway, upstream):
    """Each piece goes out in one send when the socket takes it all; what one send leaves, sendall finishes."""
    body = bytes(range(256)) * (3 * 4096)  # 3 MiB: more than a loopback socket's buffers hold
    upstream.route("/big-slow", lambda h, seen: h.reply(200, body, [("Content-Type", "application/octet-stream")]))
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=20) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        sock.sendall(b"GET /big-slow HTTP/1.1\r\nHost: x\r\n\r\n")
        time.sleep(0.5)  # the proxy's send fills the buffers and must finish the rest later
        data = b""
        while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < len(body):
            part = sock.recv(65536)
            assert part, "the reply ended short"
            data += part
    head, got = data.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 200") and got == body
