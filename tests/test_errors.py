"""Every proxy-made error of the contract, as JSON, with the worker still serving."""
import re
import socket
import threading
import time
import uuid

import pytest

from tests.support.client import request
from tests.support.servers import RawServer, answering, free_port, read_request_head


def unique(prefix="/e"):
    return f"{prefix}/{uuid.uuid4().hex}"


def via(server_url):
    return {"X-Test-Upstream": server_url}


def assert_error(reply, status, type_):
    assert reply.status == status, reply
    assert reply.error_type() == type_
    assert reply.json()["error"]["message"]


def test_refused_connect_is_502_upstream_unreachable(gateway):
    reply = request(gateway.url, "GET", "/x", headers=via(f"http://127.0.0.1:{free_port()}"))
    assert_error(reply, 502, "upstream_unreachable")
    assert reply.header("X-Seen-Error") == "upstream_unreachable"  # after_forward saw the error
    assert reply.header("X-Seen-Status") == "0"


def test_unknown_host_is_502_upstream_unreachable(gateway):
    reply = request(gateway.url, "GET", "/x", headers=via("http://no-such-host.invalid:80"))
    assert_error(reply, 502, "upstream_unreachable")


def test_no_response_head_in_time_is_504(gateway):
    hold = threading.Event()
    server = RawServer(lambda conn: (read_request_head(conn), hold.wait(10)))
    try:
        started = time.monotonic()
        reply = request(gateway.url, "GET", "/slow", headers=via(server.url))
        assert_error(reply, 504, "upstream_timeout")
        assert 2.5 < time.monotonic() - started < 8  # the gateway's timeout is 3 s
    finally:
        hold.set()
        server.close()


def test_connect_not_done_in_time_is_504():
    pytest.importorskip("gevent")
    # A listener that never accepts, with its backlog full: further SYNs go unanswered.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    fillers = []
    for _ in range(8):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(listener.getsockname())
        fillers.append(s)
    time.sleep(0.2)
    probe = socket.socket()
    probe.settimeout(0.5)
    try:
        probe.connect(listener.getsockname())
        pytest.skip("this kernel accepts SYNs past a full backlog")
    except (TimeoutError, OSError):
        pass
    finally:
        probe.close()
    from tests.support.gunicorn import Gunicorn
    from tests.support.servers import Upstream
    up = Upstream()
    g = Gunicorn("tests.apps.gateway:app", env={"TEST_UPSTREAM": up.url, "TEST_CONNECT_TIMEOUT": "0.5",
                                                "TEST_TIMEOUT": "5"}).start()
    try:
        started = time.monotonic()
        reply = request(g.url, "GET", "/x", headers=via(f"http://127.0.0.1:{listener.getsockname()[1]}"))
        assert_error(reply, 504, "upstream_timeout")
        assert time.monotonic() - started < 4
    finally:
        g.stop()
        up.close()
        for s in fillers:
            s.close()
        listener.close()


def test_connection_closed_before_head_is_502_upstream_unreachable(gateway):
    server = RawServer(lambda conn: read_request_head(conn))
    try:
        assert_error(request(gateway.url, "GET", "/x", headers=via(server.url)), 502, "upstream_unreachable")
    finally:
        server.close()


def test_reset_before_head_is_502_upstream_unreachable(gateway):
    def reset(conn):
        read_request_head(conn)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    server = RawServer(reset)
    try:
        assert_error(request(gateway.url, "GET", "/x", headers=via(server.url)), 502, "upstream_unreachable")
    finally:
        server.close()


@pytest.mark.parametrize("head", [
    b"HTTP/1.1 abc Nope\r\nContent-Length: 0\r\n\r\n",
    b"SPAM\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nX-Long: " + b"a" * 70000 + b"\r\n\r\n",
    b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(150)) + b"\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 7\r\n\r\nhello",  # ambiguous length
    b"HTTP/1.1 200 OK\r\nContent-Length: five\r\n\r\nhello",
    b"HTTP/1.1 200 OK\r\nContent-Length: \xb2\r\n\r\nhello",  # a latin-1 digit Python calls a digit
    b"HTTP/1.1 200 OK\r\nBad Header: x\r\n\r\n",  # a space inside a name
    b"HTTP/1.1 200 OK\r\nNoColon\r\n\r\n",
    b"HTTP/2.0 200 OK\r\nContent-Length: 0\r\n\r\n",
])
def test_malformed_head_is_502_bad_upstream_response(gateway, head):
    with answering(head) as server:
        assert_error(request(gateway.url, "GET", "/x", headers=via(server.url)), 502, "bad_upstream_response")


def test_body_shorter_than_its_content_length_is_502_bad_upstream_response(gateway):
    with answering(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly-this") as server:
        assert_error(request(gateway.url, "GET", "/x", headers=via(server.url)), 502, "bad_upstream_response")


def test_bad_chunk_framing_is_502_bad_upstream_response(gateway):
    with answering(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nZZZ\r\n") as server:
        assert_error(request(gateway.url, "GET", "/x", headers=via(server.url)), 502, "bad_upstream_response")


@pytest.mark.parametrize("header", [b"X-Folded: a\r\n b", b"X-Nul: a\x00b", b"X-Cr: a\rInjected: 1",
                                    b"X-Ctl: a\x01b", b"X-Esc: \x1b[2J", b"X-Del: a\x7f"])
def test_upstream_header_with_a_control_character_is_502(gateway, header):
    with answering(b"HTTP/1.1 200 OK\r\n" + header + b"\r\nContent-Length: 2\r\n\r\nok") as server:
        reply = request(gateway.url, "GET", "/x", headers=via(server.url))
        assert_error(reply, 502, "bad_upstream_response")
        assert not any(k.lower() == "injected" for k, _ in reply.headers)


def test_body_read_silent_for_timeout_is_504(gateway):
    hold = threading.Event()
    server = RawServer(lambda conn: (read_request_head(conn),
                                     conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc"), hold.wait(10)))
    try:
        assert_error(request(gateway.url, "GET", "/x", headers=via(server.url)), 504, "upstream_timeout")
    finally:
        hold.set()
        server.close()


def test_hook_that_raises_is_500_and_the_worker_keeps_serving(gateway):
    pids = set()
    for path in ("/hook-raise/1", "/after-raise/1"):
        reply = request(gateway.url, "GET", path)
        assert_error(reply, 500, "hook_error")
    gateway.wait_for_log(r"RuntimeError: boom from before_forward")
    gateway.wait_for_log(r"ValueError: boom from after_forward")
    assert "Traceback" in gateway.log()
    for _ in range(3):
        reply = request(gateway.url, "GET", unique())
        assert reply.status == 200
        pids.add(reply.header("X-Worker-Pid"))
    assert len(pids) == 1 and len(gateway.worker_pids()) == 1


def test_a_hook_that_raises_tells_the_client_its_name_and_type_and_only_the_log_its_text(gateway, upstream):
    path = unique("/hook-raise-os")
    reply = request(gateway.url, "GET", path)
    assert_error(reply, 500, "hook_error")
    assert reply.json()["error"]["message"] == ("hook 'before_forward' raised ConnectionRefusedError; "
                                                "the proxy's log has the details")
    gateway.wait_for_log(rf"GET {path} -> 500 hook_error: .*\(ConnectionRefusedError: \[Errno 111\] "
                         r"Connection refused by 10\.1\.2\.3:8080\)\nTraceback")
    assert upstream.seen(path) == []


def test_a_pick_upstream_url_that_cannot_be_used_is_500_hook_error_that_never_echoes_it(gateway):
    url = "http://user:s3cret@10.1.2.3:8080/v1?x=1"
    reply = request(gateway.url, "GET", "/unusable", headers=via(url))
    assert_error(reply, 500, "hook_error")
    assert reply.json()["error"]["message"] == "pick_upstream gave an unusable upstream"
    gateway.wait_for_log(r"GET /unusable -> 500 hook_error: pick_upstream gave an unusable upstream \(.*credentials")


def test_a_retry_policy_hook_returning_no_retry_policy_is_500_hook_error_naming_it_and_nothing_is_sent(
        gateway, upstream):
    path = unique("/no-policy")
    reply = request(gateway.url, "GET", path, headers={"X-Test-Policy": "none"})
    assert_error(reply, 500, "hook_error")
    assert "retry_policy" in reply.json()["error"]["message"]
    assert upstream.seen(path) == []


def test_a_proxy_error_raised_by_a_hook_is_the_answer(gateway, upstream):
    path = unique("/hook-proxy-error")
    reply = request(gateway.url, "GET", path)
    assert_error(reply, 400, "bad_request")
    assert reply.json()["error"]["message"] == "model 'nope' is not served here"
    assert reply.header("X-Seen-Error") == "bad_request"  # after_forward ran once, on the hook's error
    assert upstream.seen(path) == []
    reply = request(gateway.url, "GET", unique("/after-proxy-error"))
    assert_error(reply, 502, "bad_upstream_response")
    assert reply.json()["error"]["message"] == "the upstream's answer failed the gateway's check"
    gateway.wait_for_log(r"GET /after-proxy-error/\w+ -> 502 bad_upstream_response: the upstream's answer")
    assert request(gateway.url, "GET", unique()).status == 200


def test_hook_set_header_with_crlf_is_500_and_never_sent(gateway, upstream):
    path = unique("/hook-crlf")
    assert_error(request(gateway.url, "GET", path), 500, "hook_error")
    assert upstream.seen(path) == []
    reply = request(gateway.url, "GET", unique("/hook-res-crlf"))
    assert_error(reply, 500, "hook_error")
    assert not any(k.lower() == "injected" for k, _ in reply.headers)


def test_hook_set_header_name_that_is_not_a_token_is_500_and_never_sent(gateway, upstream):
    path = unique("/hook-bad-name")
    reply = request(gateway.url, "GET", path)
    assert_error(reply, 500, "hook_error")
    assert "Transfer-Encoding " in reply.json()["error"]["message"]
    assert upstream.seen(path) == []


def test_hook_made_path_without_leading_slash_is_500(gateway, upstream):
    assert_error(request(gateway.url, "GET", unique("/hook-badpath")), 500, "hook_error")


def test_errors_are_logged_with_their_reason(gateway):
    request(gateway.url, "GET", "/logged", headers=via(f"http://127.0.0.1:{free_port()}"))
    gateway.wait_for_log(r"GET /logged -> 502 upstream_unreachable: cannot connect")


@pytest.mark.parametrize("path", ["/hook-method-crlf", "/hook-method-space"])
def test_hook_set_method_that_is_not_a_token_is_500_and_nothing_is_sent(gateway, upstream, path):
    target = unique(path)
    reply = request(gateway.url, "GET", target)
    assert_error(reply, 500, "hook_error")
    assert "method" in reply.json()["error"]["message"]
    time.sleep(0.2)
    assert upstream.seen(target) == [] and upstream.seen("/smuggled") == []


def test_hook_set_body_that_is_neither_bytes_nor_str_is_500_and_never_sent(gateway, upstream):
    path = unique("/hook-body-not-bytes")
    reply = request(gateway.url, "POST", path, body=b"x")
    assert_error(reply, 500, "hook_error")
    assert "raised TypeError" in reply.json()["error"]["message"]
    gateway.wait_for_log(r"TypeError: a body must be bytes or str")  # the log says what was wrong with it
    assert upstream.seen(path) == []


def test_a_streamed_reply_with_a_control_character_in_its_head_is_502_and_its_connection_closed(gateway):
    closed = threading.Event()

    def serve(conn):
        read_request_head(conn)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nX-Ctl: a\x01b\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n7\r\ndata: 1\r\n")
        conn.settimeout(10)
        if conn.recv(1) == b"":
            closed.set()
    server = RawServer(serve)
    try:
        assert_error(request(gateway.url, "GET", "/x", headers=via(server.url)), 502, "bad_upstream_response")
        assert closed.wait(5), "the upstream connection was left open"
        assert request(gateway.url, "GET", unique()).status == 200
    finally:
        server.close()


def test_hook_set_response_header_with_a_control_character_is_500(gateway):
    reply = request(gateway.url, "GET", unique("/hook-res-ctl"))
    assert_error(reply, 500, "hook_error")
    assert "Traceback" not in reply.body.decode()


@pytest.mark.parametrize("path, kind", [("/hook-int-header", "upstream request header 'X-Count'"),
                                        ("/hook-dict-headers", "ureq.headers must be an HTTPHeaderDict, not a dict"),
                                        ("/hook-res-int-header", "response header 'X-Count'"),
                                        ("/hook-res-dict-headers", "res.headers must be an HTTPHeaderDict, not a dict"),
                                        ("/hook-res-status-abc", "res.status must be an int, not a str"),
                                        ("/hook-res-status-1000", "res.status must be from 100 to 999"),
                                        ("/hook-res-status-99", "res.status must be from 100 to 999")])
def test_a_hook_set_field_of_the_wrong_kind_is_500_hook_error_naming_its_kind_never_its_value(gateway, upstream,
                                                                                              path, kind):
    target = unique(path)
    reply = request(gateway.url, "GET", target)
    assert_error(reply, 500, "hook_error")
    message = reply.json()["error"]["message"]
    assert message.startswith(kind) and "s3cret" not in message and "abc" not in message
    assert upstream.seen(target) == []
    gateway.wait_for_log(rf"GET {target} -> 500 hook_error: {re.escape(kind)}")
