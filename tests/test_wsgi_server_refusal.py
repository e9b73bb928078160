"""A reply head the WSGI server refuses is still a JSON 502, and the upstream connection is let go.

forkproxy refuses every header gunicorn would; this is the net below those
rules, driven in-process with a start_response that refuses the first head as
gunicorn's does, against a real upstream on loopback.
"""
import io
import sys
import threading
import types

from forkproxy import Proxy
from tests.support.servers import RawServer, read_request_head


def environ(path="/x"):
    return {"REQUEST_METHOD": "GET", "SCRIPT_NAME": "", "PATH_INFO": path, "QUERY_STRING": "", "RAW_URI": path,
            "SERVER_PROTOCOL": "HTTP/1.1", "SERVER_NAME": "127.0.0.1", "SERVER_PORT": "8080",
            "REMOTE_ADDR": "127.0.0.1", "wsgi.url_scheme": "http", "wsgi.input": io.BytesIO(b""),
            "wsgi.errors": sys.stderr}


class RefusingFirstHead:
    def __init__(self):
        self.calls = []

    def __call__(self, status, headers, exc_info=None):
        self.calls.append((status, headers, exc_info))
        if len(self.calls) == 1:
            raise ValueError("InvalidResponseHeader('X-New-Rule')")


def test_a_refused_stream_head_becomes_a_json_502_and_closes_the_upstream_connection():
    closed = threading.Event()

    def serve(conn):
        read_request_head(conn)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        conn.settimeout(10)
        if conn.recv(1) == b"":
            closed.set()
    server = RawServer(serve)
    try:
        start_response = RefusingFirstHead()
        body = b"".join(Proxy(server.url)(environ(), start_response))
        status, headers, exc_info = start_response.calls[1]
        assert status.startswith("502 ") and exc_info is not None
        assert ("Content-Type", "application/json") in headers
        assert b'"bad_upstream_response"' in body
        assert closed.wait(5), "the upstream connection was left open"
    finally:
        server.close()


def test_a_refused_reply_head_carries_the_request_id_and_is_counted_once_as_the_502_it_became(monkeypatch):
    from forkproxy import lifecycle
    answered = []
    monkeypatch.setattr(lifecycle, "metrics", lambda: types.SimpleNamespace(
        enabled=True, answered=lambda *counted: answered.append(counted), upstream_done=lambda *_: None))
    server = RawServer(lambda conn: (read_request_head(conn), conn.sendall(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Length: 0\r\n\r\n")))
    try:
        start_response = RefusingFirstHead()
        b"".join(Proxy(server.url)(dict(environ(), HTTP_X_REQUEST_ID="req-42"), start_response))
        status, headers, _ = start_response.calls[1]
        assert status.startswith("502 ") and ("X-Request-ID", "req-42") in headers
        assert [(method, status, error) for method, status, _, error in answered] == [
            ("GET", 502, "bad_upstream_response")]
    finally:
        server.close()
