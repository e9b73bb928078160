"""HTTP/1.1 towards the upstream: the request head out, the response head in.

A proxy must not pass on what it cannot frame exactly (RFC 9112 sections 2.2,
5 and 6), so the response head is read strictly: a bare CR or NUL inside a
line, obs-fold, a line without a colon, a name that is not a token or
conflicting Content-Length values refuse the whole response with an
HTTPException, which forkproxy reports as 502 bad_upstream_response. (The
email parser behind http.client would split a line at a bare CR, turning
``X: a\\rInjected: 1`` into two headers.)

The parsers here work on bytes; the only I/O is reading (``peek``, ``read``,
``readline``) from the buffered reader handed in, so they are tested
without sockets.
"""
from __future__ import annotations

import re
from http.client import BadStatusLine, HTTPException, LineTooLong, RemoteDisconnected, UnknownProtocol
from typing import BinaryIO, NamedTuple

from urllib3 import HTTPHeaderDict

from forkproxy.http.handshake import check_switch
from forkproxy.http.headers import TOKEN, TOKEN_RE, connection_named, header_dict, getlist as header_getlist, lines as header_lines

MAX_LINE = 65536
MAX_HEADERS = 100
MAX_INTERIM_HEADS = 16  # 1xx heads before the final one: more is an upstream that never answers
# Control characters other than HTAB: CR, LF and NUL could smuggle a header, and gunicorn
# refuses every one of them in a reply header (its start_response would fail outside
# forkproxy's error handling), so a head holding one is refused here, as a 502.
_CONTROL = "[\x00-\x08\x0a-\x1f\x7f]"
_UNSAFE = re.compile(_CONTROL)
_UNSAFE_BYTES = re.compile(_CONTROL.encode())
# Every line of a plain header block, each matched from its start (a line that
# is not exactly one field leaves the count of matches short of the lines).
# Greedy to the line end (a lazy value costs twice as much); trailing SP/HTAB is cut after.
_FIELD_LINES = re.compile(rf"^({TOKEN}):[ \t]*([^\r\n]*)\r\n", re.M)
_NO_BODY_STATUSES = frozenset((204, 304))


class RequestHead:
    """A request's line and header lines, Host first, encoded once for every attempt.

    The target goes out byte for byte as given: urllib3's ``urlopen``
    re-encodes the URL it is handed (``%2f`` becomes ``%2F``, ``|`` becomes
    ``%7C``), which breaks signed URLs and upstreams that route on the raw
    path, so the pools write this head and use urlopen's URL only to name the
    request. Passed to urlopen as its ``headers``, which it copies: a head
    never changes, so its copy is itself, and retries resend the same bytes.

    ``upgrade`` (a tunnel's protocols, as the client asked) adds the one pair
    of hop-by-hop fields forkproxy forwards, and lets the reply be a 101.
    """

    __slots__ = ("data", "upgrade")

    def __init__(self, method: str, target: str, host: str, headers: HTTPHeaderDict,
                 upgrade: str | None = None) -> None:
        lines = [f"{method} {target} HTTP/1.1\r\nHost: {host}\r\n"]
        if upgrade is not None:
            lines.append(f"Connection: Upgrade\r\nUpgrade: {upgrade}\r\n")
        lines += [f"{name}: {value}\r\n" for name, value in header_lines(headers)]
        lines.append("\r\n")
        self.data = "".join(lines).encode("latin-1")
        self.upgrade = upgrade

    def copy(self) -> "RequestHead":
        return self

    def update(self, other: dict) -> None:
        if other:
            raise TypeError("a request head is final once encoded")


def host_header(host: str, port: int, default_port: int) -> str:
    """Host as http.client writes it: IPv6 in brackets, the default port left out."""
    name = f"[{host}]" if ":" in host and not host.startswith("[") else host
    return name if port == default_port else f"{name}:{port}"


class StatusLine(NamedTuple):
    version: int  # 10 or 11
    status: int
    reason: str


def parse_status_line(line: bytes) -> StatusLine:
    """A status line as read (line end included); b"" is a connection closed before any response."""
    if not line:
        raise RemoteDisconnected("upstream closed the connection without a response")
    if len(line) > MAX_LINE:
        raise LineTooLong("status line")
    return _status(line.decode("latin-1").rstrip("\r\n"))


def _status(text: str) -> StatusLine:
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
    """One header line (line end included) as (name, value), or HTTPException."""
    if not line.endswith(b"\n"):
        raise HTTPException("response head ended before its blank line")
    text = line[:-2 if line.endswith(b"\r\n") else -1].decode("latin-1")
    if _UNSAFE.search(text):
        raise HTTPException("a control character (CR, NUL, ...) inside a response header line")
    return _field(text)


def _field(text: str) -> tuple[str, str]:
    if text[:1] in (" ", "\t"):
        raise HTTPException("obs-fold (a folded header line) in the response head")
    name, colon, value = text.partition(":")
    if not colon or not TOKEN_RE.fullmatch(name):
        raise HTTPException(f"malformed response header line: {text[:100]!r}")
    return name, value.strip(" \t")


def read_head(fp: BinaryIO) -> tuple[StatusLine, HTTPHeaderDict]:
    """The final response head; interim 1xx heads (100 Continue, 103) are skipped, up to ``MAX_INTERIM_HEADS``.

    Each head is read within the read timeout, so without the bound an
    upstream sending 103s without end would hold the request for ever.
    """
    for _ in range(MAX_INTERIM_HEADS + 1):
        status, headers = _read_whole_head(fp) or _read_head_by_lines(fp)
        if not 100 <= status.status < 200 or status.status == 101:
            return status, headers
    raise HTTPException(f"more than {MAX_INTERIM_HEADS} interim 1xx heads")


def _read_whole_head(fp: BinaryIO) -> tuple[StatusLine, HTTPHeaderDict] | None:
    """The common case in one step: a plain CRLF head already in the reader's buffer.

    None leaves the reader untouched for the line-by-line parser, which also
    gives the precise error for whatever made this head unusual.
    """
    data = fp.peek(1)
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return None
    block = data[:end]
    if _UNSAFE_BYTES.search(block.replace(b"\r\n", b"")):
        return None
    text = block.decode("latin-1")
    first, _, fields = text.partition("\r\n")
    lines = fields + "\r\n" if fields else ""
    pairs = _FIELD_LINES.findall(lines)
    if len(pairs) != lines.count("\r\n") or len(pairs) > MAX_HEADERS:
        return None  # a line that is not a plain field: the line parser names it
    if " \r\n" in lines or "\t\r\n" in lines:
        pairs = [(name, value.rstrip(" \t")) for name, value in pairs]
    status = _status(first)
    fp.read(end + 4)
    return status, header_dict(pairs)


def _read_head_by_lines(fp: BinaryIO) -> tuple[StatusLine, HTTPHeaderDict]:
    status = parse_status_line(fp.readline(MAX_LINE + 1))
    headers = HTTPHeaderDict()
    count = 0
    while True:
        line = fp.readline(MAX_LINE + 1)
        if len(line) > MAX_LINE:
            raise LineTooLong("header line")
        if line == b"\r\n" or line == b"\n":
            return status, headers
        count += 1
        if count > MAX_HEADERS:
            raise HTTPException(f"got more than {MAX_HEADERS} headers")
        headers.add(*parse_header_line(line))


class Framing(NamedTuple):
    """How the body after a response head ends (RFC 9112 section 6.3)."""

    chunked: bool
    length: int | None  # None: no length given (chunked, or read to the close)
    will_close: bool  # the connection cannot carry another request afterwards


def body_framing(method: str, status: StatusLine, headers: HTTPHeaderDict, upgrade: str | None = None) -> Framing:
    """Chunked, a length, or to the close; HTTPException for a body forkproxy cannot relay exactly.

    A transfer coding other than chunked (``gzip, chunked``, or ``gzip`` to
    the close) would reach the client undone, with no header saying so:
    refused, as is a 101 that nobody asked for (``upgrade`` is what a tunnel
    asked for; a 101 must switch to one of those protocols), after which
    the connection carries the tunnel, never another response. ``identity``, which RFC 9112 no longer lists, is no
    coding: such a body runs to the close, never by a Content-Length.
    """
    codings = [c for c in _codings(header_getlist(headers, "transfer-encoding")) if c != "identity"]
    if status.status == 101:
        if upgrade is None:
            raise HTTPException("upstream switched protocols (101) though no upgrade was asked for")
        check_switch(upgrade, headers)
        return Framing(False, None, True)
    chunked = codings == ["chunked"]
    if codings and not chunked:
        raise HTTPException(f"transfer coding {', '.join(codings)!r} cannot be relayed (only chunked is undone)")
    tokens = connection_named(headers)
    will_close = "close" in tokens or (status.version == 10 and "keep-alive" not in tokens)
    has_te = "transfer-encoding" in headers
    length = None if has_te else content_length(header_getlist(headers, "content-length"))
    if status.status in _NO_BODY_STATUSES or method == "HEAD":
        return Framing(False, 0, will_close)
    if not chunked and length is None:
        will_close = True
    return Framing(chunked, length, will_close)


def _codings(values: list[str]) -> list[str]:
    return [c.strip().lower() for value in values for c in value.split(",") if c.strip()]


def content_length(values: list[str]) -> int | None:
    """One length, however often repeated; anything else is an error (RFC 9110 section 8.6)."""
    if not values:
        return None
    lengths = {v.strip() for value in values for v in value.split(",")}
    length = next(iter(lengths))
    if len(lengths) != 1 or not (length.isascii() and length.isdigit()):  # "\xb2".isdigit() is true
        raise HTTPException(f"malformed or conflicting Content-Length: {values!r}")
    return int(length)
