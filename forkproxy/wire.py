"""HTTP/1.1 towards the upstream: the request head out, the response head in.

A proxy must not pass on what it cannot frame exactly (RFC 9112 sections 2.2,
5 and 6), so the response head is read strictly: a bare CR or NUL inside a
line, obs-fold, a line without a colon, a name that is not a token or
conflicting Content-Length values refuse the whole response with an
HTTPException, which forkproxy reports as 502 bad_upstream_response. (The
email parser behind http.client would split a line at a bare CR, turning
``X: a\\rInjected: 1`` into two headers.)

The parsers here work on lines; the only I/O is ``readline`` on the reader
handed in, so they are tested without sockets.
"""
from __future__ import annotations

import re
from http.client import BadStatusLine, HTTPException, LineTooLong, RemoteDisconnected, UnknownProtocol
from typing import BinaryIO, Iterable, NamedTuple

from urllib3 import HTTPHeaderDict

MAX_LINE = 65536
MAX_HEADERS = 100
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_UNSAFE = re.compile(r"[\r\0]")
_NO_BODY_STATUSES = frozenset((204, 304))


def request_head(method: str, target: str, host: str, headers: Iterable[tuple[str, str]]) -> bytes:
    """The request line and header block, ready for the socket.

    ``host`` is sent unless ``headers`` carries a Host of its own. Names and
    values have been checked by then (headers.first_forbidden).
    """
    lines = [f"{method} {target} HTTP/1.1\r\n"]
    has_host = False
    for name, value in headers:
        lines.append(f"{name}: {value}\r\n")
        has_host = has_host or name.lower() == "host"
    if not has_host:
        lines.insert(1, f"Host: {host}\r\n")
    lines.append("\r\n")
    return "".join(lines).encode("latin-1")


def host_header(host: str, port: int, default_port: int) -> str:
    """Host as http.client writes it: IPv6 in brackets, the default port left out."""
    name = f"[{host}]" if ":" in host and not host.startswith("[") else host
    return name if port == default_port else f"{name}:{port}"


class StatusLine(NamedTuple):
    version: int  # 10 or 11
    status: int
    reason: str


def parse_status_line(line: bytes) -> StatusLine:
    if not line:
        raise RemoteDisconnected("upstream closed the connection without a response")
    if len(line) > MAX_LINE:
        raise LineTooLong("status line")
    text = line.decode("latin-1").rstrip("\r\n")
    version, _, rest = text.partition(" ")
    code, _, reason = rest.partition(" ")
    if not version.startswith("HTTP/"):
        raise BadStatusLine(text[:100])
    if version in ("HTTP/1.0", "HTTP/0.9"):
        number = 10
    elif version.startswith("HTTP/1."):
        number = 11
    else:
        raise UnknownProtocol(version)
    if len(code) != 3 or not code.isdigit() or code[0] == "0":
        raise BadStatusLine(text[:100])
    return StatusLine(number, int(code), reason.strip())


def parse_header_line(line: bytes) -> tuple[str, str]:
    """One header line (with its line end) as (name, value), or HTTPException."""
    if not line.endswith(b"\n"):
        raise HTTPException("response head ended before its blank line")
    text = line[:-2 if line.endswith(b"\r\n") else -1].decode("latin-1")
    if _UNSAFE.search(text):
        raise HTTPException("CR or NUL inside a response header line")
    if text[:1] in (" ", "\t"):
        raise HTTPException("obs-fold (a folded header line) in the response head")
    name, colon, value = text.partition(":")
    if not colon or not _TOKEN.fullmatch(name):
        raise HTTPException(f"malformed response header line: {text[:100]!r}")
    return name, value.strip(" \t")


def read_head(fp: BinaryIO) -> tuple[StatusLine, HTTPHeaderDict]:
    """The final response head; interim 1xx heads (100 Continue) are skipped."""
    while True:
        status = parse_status_line(fp.readline(MAX_LINE + 1))
        headers = read_header_block(fp)
        if not 100 <= status.status < 200 or status.status == 101:
            return status, headers


def read_header_block(fp: BinaryIO) -> HTTPHeaderDict:
    headers = HTTPHeaderDict()
    count = 0
    while True:
        line = fp.readline(MAX_LINE + 1)
        if len(line) > MAX_LINE:
            raise LineTooLong("header line")
        if line == b"\r\n" or line == b"\n":
            return headers
        count += 1
        if count > MAX_HEADERS:
            raise HTTPException(f"got more than {MAX_HEADERS} headers")
        headers.add(*parse_header_line(line))


class Framing(NamedTuple):
    """How the body after a response head ends (RFC 9112 section 6.3)."""

    chunked: bool
    length: int | None  # None: no length given (chunked, or read to the close)
    will_close: bool  # the connection cannot carry another request afterwards


def body_framing(method: str, status: StatusLine, headers: HTTPHeaderDict) -> Framing:
    """Chunked, a length, or to the close; a coding other than chunked is read to the close, never by length."""
    codings = headers.getlist("transfer-encoding")
    chunked = bool(codings) and ",".join(codings).strip().lower() == "chunked"
    tokens = {t.strip().lower() for v in headers.getlist("connection") for t in v.split(",")}
    will_close = "close" in tokens or (status.version == 10 and "keep-alive" not in tokens)
    length = None if codings else content_length(headers.getlist("content-length"))
    if status.status == 101:  # never asked for (upgrades are refused): nothing more can be read as HTTP
        return Framing(False, 0, True)
    if status.status in _NO_BODY_STATUSES or method == "HEAD":
        return Framing(False, 0, will_close)
    if codings and not chunked:
        will_close = True  # a coding we do not frame by: the body runs to the close
    if not chunked and length is None:
        will_close = True
    return Framing(chunked, length, will_close)


def content_length(values: list[str]) -> int | None:
    if not values:
        return None
    lengths = {v.strip() for value in values for v in value.split(",")}
    if len(lengths) != 1 or not next(iter(lengths)).isdigit():
        raise HTTPException(f"malformed or conflicting Content-Length: {values!r}")
    return int(lengths.pop())
