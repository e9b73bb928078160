"""The floors under forkproxy's CPU per request, measured in one process: ``scripts/bench --floor``.

Against the bench's static nginx upstream, one gevent-patched process times
the CPU of one 100-byte GET made three ways, alternating blocks of each:

- ``raw socket``: fixed request bytes out, the response read back; no HTTP code at all;
- ``urllib3 pool``: forkproxy's connection pool alone: checkout, liveness poll,
  Timeout, ``urlopen``'s one try, the head written and strictly parsed, body, release;
- ``forkproxy call``: the whole WSGI call: request objects, header rules,
  hooks, the pool, the reply headers;
- ``forkproxy pool call``: the same through a 3-member ``UpstreamPool``
  (balancing, health, the route, the per-request Retry);
- ``forkproxy call, one local limit``: the same with one rate limit in the
  ``local`` store (LMDB in /dev/shm);
- ``naive call`` and ``werkzeug call``: the peers' WSGI apps from the bench,
  called the same way: app code only, no server.

With ``--capabilities``, the WSGI calls are instead ``Proxy(upstream)`` as
shipped and each variant of ``scripts/bench --capabilities`` but traces
(first_byte_timeout, a pool, before_attempt, judge_reply, resume_stream,
deadline, one local limit, on_stream_chunk, on_ws_message): each capability
on against off, to the microsecond, which the load bench's noise hides.

The minimum over blocks is printed (the least disturbed on a shared machine).
Under gunicorn every target also pays the server's own cost per request (the
empty app's figure in ``scripts/bench``): what a target such as "twice a
peer's requests/s" leaves for the proxy's own work can be read against these.
"""
from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import io  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import urllib3  # noqa: E402

from scripts.benchkit.harness import free_port, static_upstream  # noqa: E402

PATH = "/b/small"


class RawClient:
    """One keep-alive connection and a request written out by hand."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.request = f"GET {PATH} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAccept: */*\r\n\r\n".encode()
        self.sock = socket.create_connection(("127.0.0.1", port))

    def __call__(self) -> None:
        self.sock.sendall(self.request)
        got = b""
        while not got.endswith(b"s" * 100):
            more = self.sock.recv(4096)
            if not more:
                self.sock = socket.create_connection(("127.0.0.1", self.port))
                return self()
            got += more


def pool_exchange(port: int):
    from forkproxy.upstream.connections import ONE_TRY, Connections
    from forkproxy.http.wire import RequestHead

    connections = Connections("127.0.0.1", port, maxsize=4, block=False)
    timeout = urllib3.Timeout(connect=5, read=30)

    def exchange() -> None:
        headers = RequestHead("GET", PATH, connections.host_header, urllib3.HTTPHeaderDict({"Accept": "*/*"}))
        reply = connections.urlopen("GET", PATH, headers=headers, retries=ONE_TRY, redirect=False,
                                    assert_same_host=False, timeout=timeout, release_conn=False)
        reply.read_sized()
        reply.release()
    return exchange


def wsgi_call(app):
    def call() -> None:
        environ = {"REQUEST_METHOD": "GET", "SCRIPT_NAME": "", "PATH_INFO": PATH, "QUERY_STRING": "",
                   "RAW_URI": PATH, "SERVER_PROTOCOL": "HTTP/1.1", "SERVER_NAME": "127.0.0.1",
                   "SERVER_PORT": "8080", "REMOTE_ADDR": "127.0.0.1", "REMOTE_PORT": "5555",
                   "wsgi.url_scheme": "http", "wsgi.input": io.BytesIO(b""), "wsgi.errors": sys.stderr,
                   "HTTP_HOST": "127.0.0.1:8080", "HTTP_USER_AGENT": "wrk", "HTTP_ACCEPT": "*/*"}
        body = app(environ, lambda status, headers, exc_info=None: None)
        for _ in body:
            pass
    return call


def peer_calls(port: int) -> dict:
    from forkproxy import Proxy, Upstream, UpstreamPool

    url = f"http://127.0.0.1:{port}"
    os.environ["BENCH_UPSTREAM"] = url
    from scripts.benchkit import apps  # reads BENCH_UPSTREAM

    store = f"local:{tempfile.gettempdir() if not os.access('/dev/shm', os.W_OK) else '/dev/shm'}/forkproxy-floor.lmdb"
    os.environ["BENCH_LIMITS_STORE"] = store
    limited = apps._limited()
    pool = UpstreamPool([Upstream(url, name=f"member-{i}") for i in range(3)])  # one origin: names tell them apart
    return {"forkproxy call": wsgi_call(Proxy(url)), "forkproxy pool call": wsgi_call(Proxy(pool)),
            "forkproxy call, one local limit": wsgi_call(limited),
            "naive call": wsgi_call(apps.naive), "werkzeug call": wsgi_call(apps.werkzeug)}


def capability_calls(port: int) -> dict:
    """``Proxy(upstream)`` and each capability of ``scripts/bench --capabilities`` on (traces aside: they need
    an exporter), as WSGI calls."""
    from scripts.benchkit import capabilities

    directory = "/dev/shm" if os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()
    os.environ[capabilities.STORE] = f"local:{directory}/forkproxy-floor-capabilities.lmdb"
    made = capabilities.variants()
    return {capabilities.LABELS[name]: wsgi_call(make(f"http://127.0.0.1:{port}"))
            for name, make in made.items() if name != "tracing"}


def cpu_per_call(fn, count: int) -> float:
    start = time.process_time()
    for _ in range(count):
        fn()
    return (time.process_time() - start) / count * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--block", type=int, default=500, help="calls per timed block")
    parser.add_argument("--capabilities", action="store_true", help="Proxy as shipped against each capability on")
    args = parser.parse_args()
    if not shutil.which("nginx"):
        sys.exit("the static upstream needs nginx (Debian package nginx)")
    html = Path(tempfile.mkdtemp(prefix="floor-"))
    port = free_port()
    upstream = static_upstream(port, html)
    try:
        calls = capability_calls(port) if args.capabilities else peer_calls(port)
        ways = {"raw socket": RawClient(port), "urllib3 pool": pool_exchange(port), **calls}
        for fn in ways.values():
            cpu_per_call(fn, 300)  # warm: connections made, code paths taken once
        best = {name: float("inf") for name in ways}
        for _ in range(args.rounds):
            for name, fn in ways.items():
                best[name] = min(best[name], cpu_per_call(fn, args.block))
    finally:
        upstream.stop()
        shutil.rmtree(html, ignore_errors=True)
    print(f"CPU per 100-byte GET, one process (pid {os.getpid()}), minimum of {args.rounds} blocks:")
    for name, us in best.items():
        print(f"  {name:31s} {us:6.1f} us")


if __name__ == "__main__":
    main()
