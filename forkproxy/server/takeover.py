"""Taking the client's connection over from gunicorn for a tunnel: the gunicorn internals it relies on.

gunicorn's gevent worker owns the client socket and, after a reply, writes
its end and reads the next request from it. A tunnel instead writes the 101
itself, joins the socket to the upstream's and, when it is over, has
gunicorn close the connection. No WSGI API says how; these internals do, each
read against gunicorn 27.0.1 (``GUNICORN_CHECKED``), and ``check`` proves at
start that the installed gunicorn still has them:

- ``environ["gunicorn.socket"]`` (``gunicorn.http.wsgi.default_environ``):
  the client's socket, the one thing a tunnel must have.
- The unreader behind ``environ["wsgi.input"]`` and its ``take_buffered()``
  (``gunicorn.http.unreader.Unreader``, gunicorn's own way to hand over
  bytes read ahead, for its h2c upgrade): the bytes the client sent right
  behind its request, which gunicorn may already have read from the socket.
  A sized or unframed body's reader keeps the unreader as ``.unreader``, a
  chunked one keeps its request as ``.req``, whose ``.unreader`` it is.
- ``StopIteration`` out of the WSGI call (``base_async.AsyncWorker.handle``
  catches it as "close this connection"; flask-sock relies on it too):
  gunicorn then writes nothing more on the connection, reads no next
  request from it, and closes it (``give_back``).

Without one of them a tunnel would lose bytes or corrupt the connection, so
there is no fallback: the start stops (``check``), and a request whose
environ lacks them is refused with 501 before any upstream is asked.
"""
from __future__ import annotations

from typing import Any, NoReturn

from forkproxy.errors import UpgradeNotSupported

GUNICORN_CHECKED = "27.0.1"


class TakeoverUnavailable(RuntimeError):
    """The installed gunicorn lacks an internal a tunnel relies on; the message is one line naming it."""


def client_socket(environ: dict) -> Any:
    """The client's socket, when gunicorn can hand the connection over; UpgradeNotSupported otherwise."""
    sock = environ.get("gunicorn.socket")
    if sock is None or environ.get("SERVER_PROTOCOL") != "HTTP/1.1" or _unreader(environ) is None:
        raise UpgradeNotSupported("a tunnel needs an HTTP/1.1 client connection served by gunicorn")
    return sock


def held_bytes(environ: dict) -> bytes:
    """What the client sent behind its request that gunicorn already read; call once the body is read."""
    return _unreader(environ).take_buffered()


def give_back() -> NoReturn:
    """Tell gunicorn's worker the tunnel took the connection: it writes and reads nothing more, and closes it."""
    raise StopIteration("the tunnel took the connection")


def check() -> None:
    """Raise TakeoverUnavailable (one line, naming gunicorn and its version) unless the internals are there.

    Requests parsed by the installed gunicorn's own parser (a sized body, a
    chunked one) must hand over the bytes behind them, and their environ must
    carry the socket. ``StopIteration`` cannot be probed without a worker:
    tests/test_tunnels.py proves it end to end (no next request is read).
    """
    import gunicorn
    from gunicorn.config import Config
    from gunicorn.http import wsgi
    from gunicorn.http.parser import RequestParser

    def missing(what: str) -> TakeoverUnavailable:
        return TakeoverUnavailable(f"gunicorn {gunicorn.__version__}: {what}; forkproxy's tunnels rely on it "
                                   f"(checked against gunicorn {GUNICORN_CHECKED})")

    cfg = Config()
    for framing, body in (("Content-Length: 2", b"ok"), ("Transfer-Encoding: chunked", b"2\r\nok\r\n0\r\n\r\n")):
        head = f"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n{framing}\r\n\r\n".encode()
        try:
            req = next(RequestParser(cfg, iter([head + body + b"behind"]), ("127.0.0.1", 0)))
            req.body.read()
            environ = wsgi.default_environ(req, None, cfg)
        except Exception as exc:  # the probe itself no longer fits this gunicorn
            raise missing(f"its request parser changed ({type(exc).__name__}: {exc})") from None
        if "gunicorn.socket" not in environ:
            raise missing('environ["gunicorn.socket"] is not set')
        if _unreader(environ) is None:
            raise missing(f"no unreader with take_buffered() behind wsgi.input ({framing})")
        held = held_bytes(environ)
        if held != b"behind":
            raise missing(f"take_buffered() behind a request with {framing} gave {held!r}")


def _unreader(environ: dict) -> Any:
    """gunicorn's unreader behind ``wsgi.input`` (see the module docstring); None when there is none."""
    reader = getattr(environ.get("wsgi.input"), "reader", None)
    unreader = getattr(reader, "unreader", None) or getattr(getattr(reader, "req", None), "unreader", None)
    return unreader if hasattr(unreader, "take_buffered") else None
