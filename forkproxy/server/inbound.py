"""Reading the client's request out of a WSGI environ."""
from __future__ import annotations

import functools
import os
import re
from urllib.parse import quote

from urllib3 import HTTPHeaderDict

from forkproxy.errors import BadRequest, PayloadTooLarge
from forkproxy.http.headers import header_dict
from forkproxy.messages import Request
from forkproxy.http.targets import target_path

_READ_SIZE = 64 * 1024
REQUEST_ID_HEADER = "X-Request-ID"
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+=@-]{1,200}")


def request_id(incoming: str | None) -> str:
    """The client's (or nginx's) request ID when it is a sane token, else a new one.

    Anything else (too long, spaces, quotes) is replaced rather than passed
    on, since the ID lands in every log line and upstream request.
    """
    if incoming and _REQUEST_ID.fullmatch(incoming):
        return incoming
    return os.urandom(16).hex()


def request_target(environ: dict) -> str:
    """The request target as the client sent it, where the server kept it."""
    target = environ.get("RAW_URI") or environ.get("REQUEST_URI")
    if target:
        return target
    path = quote(environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", ""), safe="/;=,@:!$&'()*+~")
    query = environ.get("QUERY_STRING")
    return f"{path}?{query}" if query else path


@functools.lru_cache(maxsize=1024)  # the same few names come every time
def _header_name(key: str) -> str:
    """HTTP_X_API_KEY -> X-Api-Key."""
    return key[5:].replace("_", "-").title()


def headers_from_environ(environ: dict) -> HTTPHeaderDict:
    headers = header_dict((_header_name(key), value) for key, value in environ.items() if key.startswith("HTTP_"))
    for key, name in (("CONTENT_TYPE", "Content-Type"), ("CONTENT_LENGTH", "Content-Length")):
        if environ.get(key):
            headers[name] = environ[key]
    return headers


def request_from_environ(environ: dict) -> tuple[Request, BadRequest | None]:
    """The request without its body, and the refusal of a non-path target.

    A refused request still gets a ``Request`` (its ``raw_path`` the target as
    sent) so that ``after_forward`` can audit it like any other.
    """
    target = request_target(environ)
    try:
        raw_path, refused = target_path(target), None
    except BadRequest as err:
        raw_path, refused = target, err
    req = Request(
        method=environ["REQUEST_METHOD"].upper(),
        raw_path=raw_path,
        headers=headers_from_environ(environ),
        remote_addr=environ.get("REMOTE_ADDR", ""),
        scheme=environ.get("wsgi.url_scheme", "http"),
        environ=environ,
    )
    return req, refused


def declared_length(environ: dict) -> int | None:
    raw = environ.get("CONTENT_LENGTH")
    if not raw:
        return None
    try:
        length = int(raw)
    except ValueError:
        raise BadRequest(f"malformed Content-Length: {raw[:40]!r}") from None
    if length < 0:
        raise BadRequest(f"malformed Content-Length: {raw[:40]!r}")
    return length


def read_request_body(environ: dict, cap: int, timeout: float = 0) -> bytes:
    """The whole request body, refused early when it is over ``cap`` (0 = no cap).

    A declared length over the cap is refused before any body byte is read; a
    chunked upload is read up to cap+1 bytes and no further. A body that ends
    short of its declared length means the client went away mid-body, and one
    that stalls for ``timeout`` seconds is given up on: neither reaches the
    upstream.
    """
    length = declared_length(environ)
    chunked = "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower()
    if length is None and not chunked:
        return b""
    if length is not None and cap and length > cap:
        raise PayloadTooLarge(cap)
    if length == 0:
        return b""
    with _read_deadline(environ.get("gunicorn.socket"), timeout):
        return _read_exactly(environ["wsgi.input"], length, timeout) if length is not None \
            else _read_chunked(environ["wsgi.input"], cap, timeout)


def _read_exactly(stream, length: int, timeout: float) -> bytes:
    body = _read(stream, length, timeout)
    if len(body) < length:
        raise BadRequest(f"request body ended after {len(body)} of {length} bytes")
    return body


def _read_chunked(stream, cap: int, timeout: float) -> bytes:
    parts, size = [], 0
    while True:
        part = _read(stream, _READ_SIZE, timeout)
        if not part:
            return b"".join(parts)
        size += len(part)
        if cap and size > cap:
            raise PayloadTooLarge(cap)
        parts.append(part)


class _read_deadline:
    """Bounds each socket read of the body: a stalled upload must not hold a greenlet forever."""

    def __init__(self, sock, timeout: float) -> None:
        self.sock = sock if timeout else None
        self.timeout = timeout

    def __enter__(self) -> None:
        if self.sock is not None:
            self.previous = self.sock.gettimeout()
            self.sock.settimeout(self.timeout)

    def __exit__(self, *exc) -> None:
        if self.sock is not None:
            try:
                self.sock.settimeout(self.previous)
            except OSError:
                pass


def _read(stream, size: int, timeout: float) -> bytes:
    try:
        return stream.read(size)
    except TimeoutError:
        raise BadRequest(f"request body stalled for {timeout:g} s") from None
    except Exception as exc:  # a socket error, or the server's own (gunicorn's NoMoreData, bad chunk)
        refused = BadRequest("malformed or incomplete request body")
        refused.detail = f"{type(exc).__name__}: {exc}"  # the log line's: an OS error is never the client's
        raise refused from None
