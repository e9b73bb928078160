"""The least a gevent relay can do: ``python -m scripts.benchkit.gevent_relay PORT UPSTREAM``.

One greenlet per connection reads the request head, sends it to the
upstream on a fresh connection, then writes each read of the reply to the
client as it came: no HTTP parsing, framing, WSGI, pool or hooks. It is the
floor of any gevent design under a streamed unit's latency and CPU
(``scripts/bench --units``), below gunicorn's.
"""
from gevent import monkey

monkey.patch_all()

import socket  # noqa: E402
import sys  # noqa: E402
from urllib.parse import urlsplit  # noqa: E402

from scripts.benchkit.sse import read_request_head, serve_with  # noqa: E402


def relay_to(upstream: tuple[str, int]):
    def handle(conn: socket.socket, _addr) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        got = read_request_head(conn, b"")
        if got is None:
            return conn.close()
        head, rest = got
        with socket.create_connection(upstream) as up, conn:
            up.sendall(head + b"\r\n\r\n" + rest)
            while data := up.recv(65536):
                conn.sendall(data)
    return handle


if __name__ == "__main__":
    where = urlsplit(sys.argv[2])
    serve_with(relay_to((where.hostname, where.port)), int(sys.argv[1]))
