"""The WSGI targets the benchmark runs beside forkproxy, under the same gunicorn config.

- ``empty``: answers 100 bytes without any upstream: the ceiling of gunicorn + gevent.
- ``pool_floor``: forkproxy's urllib3 pool exchange and nothing else (no header rules, request IDs,
  hooks or reply headers but the length), and an event stream relayed read by read: the floor of the
  design, gunicorn + gevent + urllib3's pool. On /b/idle it is an event stream of its own that sends
  one event and waits for ever, no upstream: what the server alone keeps per open stream.
- ``werkzeug``: werkzeug's ProxyMiddleware, a Python peer.
- ``naive``: a minimal urllib3 proxy, what one writes in an afternoon.
- ``ws_messages``: forkproxy with a pass-through message hook (tunnels parsed by wsproto).
- ``limited``: forkproxy with one rate limit set far above the load (the store BENCH_LIMITS_STORE names), or none.
"""
import os

import urllib3

UPSTREAM = os.environ.get("BENCH_UPSTREAM", "http://127.0.0.1:9")
_BODY = b"x" * 100


def empty(environ, start_response):
    environ["wsgi.input"].read()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "100")])
    return [_BODY]


def _pool_floor():
    from urllib.parse import urlsplit

    from forkproxy.upstream.connections import ONE_TRY, Connections
    from forkproxy.http.wire import RequestHead

    where = urlsplit(UPSTREAM)
    connections = Connections(where.hostname, where.port, maxsize=256, block=False)
    timeout = urllib3.Timeout(connect=5, read=30)

    def app(environ, start_response):
        method, target = environ["REQUEST_METHOD"], environ["RAW_URI"]
        if target == "/b/idle":
            start_response("200 OK", [("Content-Type", "text/event-stream")])
            return _idle_stream()
        body = environ["wsgi.input"].read() or None
        framing = urllib3.HTTPHeaderDict({"Content-Length": str(len(body))} if body else {})
        head = RequestHead(method, target, connections.host_header, framing)
        reply = connections.urlopen(method, target, body=body, headers=head, retries=ONE_TRY, redirect=False,
                                    assert_same_host=False, timeout=timeout, release_conn=False)
        if reply.headers.get("content-type", "").startswith("text/event-stream"):
            start_response(f"{reply.status} OK", [("Content-Type", "text/event-stream")])
            return _relayed(reply, environ.get("gunicorn.socket"))
        data = reply.read_sized()
        reply.release()
        start_response(f"{reply.status} OK", [("Content-Length", str(len(data)))])
        return [data]
    return app


def _relayed(reply, client):
    """The upstream's body as its reads give it, dechunked: no framing, hooks or checks (a client that
    leaves is noticed while the read waits, as forkproxy does)."""
    next_pieces = reply.pieces(waiting=True)
    reply.watch_client(client)
    while (pieces := next_pieces()) is not None:
        yield from pieces
    reply.release()


def _idle_stream():
    import gevent.event

    yield b"data: open\n\n"
    gevent.event.Event().wait()


pool_floor = _pool_floor()


def _werkzeug():
    from werkzeug.middleware.http_proxy import ProxyMiddleware

    def not_found(environ, start_response):
        start_response("404 Not Found", [("Content-Length", "0")])
        return [b""]
    # the bench's paths start /b/, the LLM workloads' /v1/
    return ProxyMiddleware(not_found, {"b": {"target": UPSTREAM}, "v1": {"target": UPSTREAM}})


werkzeug = _werkzeug()

_pool = None
_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-authorization",
        "proxy-authenticate", "host", "content-length"}


def naive(environ, start_response):
    global _pool
    if _pool is None:
        _pool = urllib3.PoolManager(maxsize=256)
    headers = {k[5:].replace("_", "-").title(): v for k, v in environ.items() if k.startswith("HTTP_")}
    headers = {k: v for k, v in headers.items() if k.lower() not in _HOP}
    if environ.get("CONTENT_TYPE"):
        headers["Content-Type"] = environ["CONTENT_TYPE"]
    length = int(environ.get("CONTENT_LENGTH") or 0)
    body = environ["wsgi.input"].read(length) if length else None
    url = UPSTREAM + environ.get("RAW_URI", environ["PATH_INFO"])
    resp = _pool.request(environ["REQUEST_METHOD"], url, body=body, headers=headers, redirect=False,
                         retries=False, preload_content=False, decode_content=False)
    out = [(k, v) for k, v in resp.headers.items() if k.lower() not in _HOP]
    if resp.headers.get("content-type", "").startswith("text/event-stream"):
        start_response(f"{resp.status} {resp.reason}", out)
        return resp.stream(65536)
    data = resp.read()
    resp.release_conn()
    start_response(f"{resp.status} {resp.reason}", out + [("Content-Length", str(len(data)))])
    return [data]


def _ws_messages():
    """forkproxy with a pass-through ``on_ws_message``: every tunnel parsed into messages and re-framed."""
    from forkproxy import Proxy

    class Messages(Proxy):
        def on_ws_message(self, msg, out, stats):
            out.send(msg.data)
    return Messages(UPSTREAM)


ws_messages = _ws_messages()


def _limited():
    """forkproxy with one limit far above any load in the store BENCH_LIMITS_STORE names; without it, none."""
    from forkproxy import Limit, Proxy

    class Limited(Proxy):
        def rate_limits(self, req):
            return [Limit("rpm:bench-client", rate=1e9, per=60)]
    store = os.environ.get("BENCH_LIMITS_STORE")
    return Limited(UPSTREAM, limits_store=store) if store else Proxy(UPSTREAM)


limited = _limited()
