"""What forkproxy shares with the server that runs it (gunicorn, or any WSGI).

Nothing here imports gunicorn: gunicorn.conf.py calls ``configure_worker``
from inside a worker, and the rest only reads the WSGI environ.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
from datetime import timedelta
from typing import Any, Iterable, Iterator, NamedTuple, NoReturn

from forkproxy.server.trust import TrustedProxies

# WSGI environ keys gunicorn's access log can print as %({key}e)s.
ENV_UPSTREAM_STATUS = "forkproxy.upstream_status"
ENV_UPSTREAM_TIME = "forkproxy.upstream_time"
ENV_RETRIES = "forkproxy.retries"
ENV_REQUEST_ID = "forkproxy.request_id"
ENV_UPSTREAM = "forkproxy.upstream"
ENV_BYTES_IN = "forkproxy.bytes_in"  # a tunnel's bytes from the client (%(B)s has those to it)

_server_trusted: TrustedProxies | None = None
_access_logger: Any = None  # the worker's gunicorn logger, for lines gunicorn does not write itself


def default_trusted() -> TrustedProxies:
    """Peers trusted for X-Forwarded-*: gunicorn's ``forwarded_allow_ips``.

    Outside a configured gunicorn worker, gunicorn's own default applies.
    """
    global _server_trusted
    if _server_trusted is None:
        _server_trusted = TrustedProxies(os.environ.get("FORWARDED_ALLOW_IPS", "127.0.0.1,::1"))
    return _server_trusted


def configure_worker(worker: Any) -> None:
    """Check urllib3 and gunicorn; adopt the worker's settings (trusted peers, error log); watch for its stop.

    Run once per worker, from gunicorn.conf.py's ``post_worker_init``: the
    check is about the server's packages, so it runs where they serve and
    before a request does, not in every ``Proxy`` built in or out of a
    server. ``worker.cfg`` holds the final values however they were given
    (config file, flags, GUNICORN_CMD_ARGS), which the app cannot see otherwise.
    """
    global _server_trusted, _access_logger
    import gevent

    from forkproxy.server import capabilities, shutdown  # gevent, urllib3: only in the worker, after it patched
    from forkproxy.upstream import names

    try:
        capabilities.check()
    except capabilities.Unsupported as exc:
        refuse_start(str(exc))
    _server_trusted = TrustedProxies(worker.cfg.forwarded_allow_ips)
    _access_logger = worker.log
    _answer_refusals_in_json()
    _write_in_one_send()
    _date_once_a_second()
    _no_spawning_stacks()
    names.install(gevent.get_hub())
    shutdown.watch(worker)
    ours, theirs = logging.getLogger("forkproxy"), logging.getLogger("gunicorn.error")
    ours.handlers = list(theirs.handlers)
    ours.setLevel(theirs.level)
    ours.propagate = False
    _start_tracing(getattr(worker, "wsgi", None))


def _start_tracing(app: Any) -> None:
    """A Proxy's tracing, made now in the worker (not at its first request): ``tracing=True`` without the
    extra stops the start with one line."""
    from forkproxy.tracing import TracingUnavailable, for_worker

    setting = getattr(app, "tracing", False)
    if setting is False or not hasattr(app, "tracer"):  # not a Proxy, or tracing off
        return
    try:
        for_worker(setting)
    except TracingUnavailable as exc:
        refuse_start(str(exc))
    except Exception:  # OpenTelemetry refusing its own settings: traces off (Proxy.tracer says so once), never a boot loop
        logging.getLogger("forkproxy").exception("forkproxy: tracing could not start; traces are off")


def refuse_start(message: str) -> NoReturn:
    """Stop the start with one line: a worker that exits with 3 (gunicorn's boot error) stops the master too."""
    sys.stderr.write(f"forkproxy: {message}\n")
    sys.stderr.flush()
    raise SystemExit(3)


# The contract's type of a request gunicorn refuses before the app runs, by the status gunicorn chose.
_REFUSAL_TYPES = {431: "headers_too_large", 500: "internal_error"}


def refusal(status: int, reason: str, message: str) -> bytes:
    """The whole reply to a request gunicorn refused, in the contract's JSON error shape.

    gunicorn keeps its status (400 for a malformed request line or framing,
    414 for a line over ``limit_request_line`` as RFC 9112 asks, 431 for
    header fields over ``limit_request_fields`` / ``limit_request_field_size``)
    and its log line with the reason; only the page changes from HTML to JSON.
    """
    body = json.dumps({"error": {"message": message or reason,
                                 "type": _REFUSAL_TYPES.get(status, "bad_request")}}).encode()
    head = (f"HTTP/1.1 {status} {reason}\r\nConnection: close\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n")
    return head.encode("latin-1") + body


def _answer_refusals_in_json() -> None:
    """Have gunicorn write its refusals (bad request line, headers too large, ...) as JSON.

    gunicorn's worker answers them in ``handle_error``, which logs the
    reason, writes the access-log line, then calls ``gunicorn.util.write_error``
    (looked up at call time) for the HTML page: replacing that one function in
    this worker keeps gunicorn's status, log and access line. Done here, in
    the worker, so the master never loads anything of the proxy's.
    """
    from gunicorn import util  # its write_error and write_nonblock: checked at start (server/capabilities.py)

    def write_json_error(sock: Any, status_int: int, reason: str, mesg: str) -> None:
        util.write_nonblock(sock, refusal(int(status_int), reason, mesg))

    util.write_error = write_json_error


def _write_in_one_send() -> None:
    """Have gunicorn write each piece of a reply with one ``send`` when the socket takes it all, as it nearly
    always does.

    gunicorn writes every piece (a head, a body, each chunk of a stream)
    with ``sendall``, which under gevent asks the kernel for the socket's
    send buffer size first (``getsockopt``, a syscall) and reads the clock:
    per streamed unit that was one syscall in three. ``gunicorn.util.write``
    is looked up at call time, like ``write_error``; what one ``send`` left
    goes out through ``sendall`` as before.
    """
    from gunicorn import util  # its write: checked at start (server/capabilities.py)

    def write(sock: Any, data: bytes, chunked: bool = False) -> None:
        if chunked:
            data = b"%X\r\n%b\r\n" % (len(data), data)
        sent = sock.send(data)
        if sent < len(data):
            sock.sendall(memoryview(data)[sent:])

    util.write = write


def _no_spawning_stacks() -> None:
    """Spawn each connection's greenlet without recording the stack that spawned it, unless asked for.

    gevent records it by default (``track_greenlet_tree``) for debugging
    tools; every open connection (each held stream) would keep those
    frames for its whole life, and each spawn would pay for walking the
    stack. ``GEVENT_TRACK_GREENLET_TREE=1`` keeps gevent's default.
    """
    import gevent

    if "GEVENT_TRACK_GREENLET_TREE" not in os.environ:
        gevent.config.track_greenlet_tree = False


def _date_once_a_second() -> None:
    """Have gunicorn format its Date header once a second, not once per reply (as nginx does).

    ``gunicorn.util.http_date`` builds the text with ``email.utils`` on every
    reply: about 3% of a small proxied request's CPU. The text only changes
    when the second does; gunicorn looks the function up at call time.
    """
    from gunicorn import util  # its http_date: checked at start (server/capabilities.py)

    format_date, last = util.http_date, [-1, ""]

    def http_date(timestamp: float | None = None) -> str:
        if timestamp is not None:
            return format_date(timestamp)
        now = int(time.time())
        if now != last[0]:
            last[:] = now, format_date(now)
        return last[1]

    util.http_date = http_date


class _Served(NamedTuple):
    """What gunicorn's access log reads of a reply (``resp``) it did not send itself."""

    status: str
    sent: int
    headers: list


class _Received(NamedTuple):
    headers: list  # (name, value) pairs, as gunicorn's request has them


def log_access(environ: dict, status: str, sent: int, headers: Any, seconds: float) -> None:
    """One access-log line, in the configured format, for a reply made outside gunicorn's response (a tunnel)."""
    if _access_logger is None:
        return
    request = _Received([(name.upper(), value) for name, value in headers.items()])
    _access_logger.access(_Served(status, sent, []), request, environ, timedelta(seconds=seconds))


class close_connection_after:
    """A reply body after which the client connection is not reused.

    Used where unread request bytes are left on the connection (a refused
    upload): the reply goes out whole, then our side of the socket is shut so
    the client sees the end instead of sending its next request into it.
    """

    def __init__(self, body: Iterable[bytes], environ: dict) -> None:
        self._body = body
        self._sock = environ.get("gunicorn.socket")

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._body)

    def close(self) -> None:
        if self._sock is not None:
            try:
                self._sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
