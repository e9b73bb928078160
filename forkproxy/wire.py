"""urllib3's connection classes, with a strict and fast response-head parser.

http.client hands a response head to the email parser, which is slow and lax:
it splits a line at a bare CR (``X: a\\rInjected: 1`` becomes two headers),
keeps NULs, and urllib3 then unfolds obs-fold lines. A proxy must not pass any
of that on (RFC 9112 sections 2.2 and 5), so ``StrictResponse.begin`` reads the
head itself and refuses it with an HTTPException, which forkproxy reports as
502 bad_upstream_response. The body is still read by http.client.
"""
from __future__ import annotations

import http.client
import re
import socket
from http.client import HTTPException, HTTPMessage, LineTooLong, UnknownProtocol

from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

MAX_LINE = 65536
READ_BUFFER = 2048
MAX_HEADERS = 100
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_UNSAFE = re.compile(r"[\r\0]")
_NO_BODY_STATUSES = frozenset((204, 304))


def read_head(fp) -> HTTPMessage:
    """Header lines up to the blank line, as the HTTPMessage urllib3 expects."""
    msg = HTTPMessage()
    pairs = msg._headers  # filled directly: the email parser is what we skip
    while True:
        line = fp.readline(MAX_LINE + 1)
        if len(line) > MAX_LINE:
            raise LineTooLong("header line")
        if line in (b"\r\n", b"\n"):
            return msg
        if not line.endswith(b"\n"):
            raise HTTPException("response head ended before its blank line")
        if len(pairs) >= MAX_HEADERS:
            raise HTTPException(f"got more than {MAX_HEADERS} headers")
        text = line[:-2 if line.endswith(b"\r\n") else -1].decode("latin-1")
        if _UNSAFE.search(text):
            raise HTTPException("CR or NUL inside a response header line")
        if text[:1] in (" ", "\t"):
            raise HTTPException("obs-fold (a folded header line) in the response head")
        name, colon, value = text.partition(":")
        if not colon or not _TOKEN.fullmatch(name):
            raise HTTPException(f"malformed response header line: {text[:100]!r}")
        pairs.append((name, value.strip(" \t")))


class StrictResponse(http.client.HTTPResponse):
    """http.client's response with ``begin`` reading the head strictly."""

    def __init__(self, sock, debuglevel: int = 0, method: str | None = None, url: str | None = None) -> None:
        super().__init__(sock, debuglevel, method, url)
        # A smaller read buffer than io's 8 KiB: an open stream keeps it for its
        # whole life, while bodies and stream reads larger than it bypass it anyway.
        self.fp.close()
        self.fp = sock.makefile("rb", READ_BUFFER)

    def begin(self) -> None:
        if self.headers is not None:
            return
        while True:
            version, status, reason = self._read_status()
            if status != http.client.CONTINUE:
                break
            read_head(self.fp)  # an interim 100 response: skip its headers
        self.code = self.status = status
        self.reason = reason.strip()
        if version in ("HTTP/1.0", "HTTP/0.9"):
            self.version = 10
        elif version.startswith("HTTP/1."):
            self.version = 11
        else:
            raise UnknownProtocol(version)
        self.headers = self.msg = read_head(self.fp)
        self._frame_body(status)

    def _frame_body(self, status: int) -> None:
        """Chunked, a length, or to the close (RFC 9112 section 6.3)."""
        codings = self.msg.get_all("transfer-encoding")
        self.chunked = bool(codings) and ",".join(codings).strip().lower() == "chunked"
        self.chunk_left = None
        self.will_close = self._check_close()
        self.length = None if codings else _content_length(self.msg.get_all("content-length"))
        if codings and not self.chunked:
            self.will_close = True  # a coding we do not frame by: the body runs to the close
        if status in _NO_BODY_STATUSES or 100 <= status < 200 or self._method == "HEAD":
            self.length = 0
        if not self.will_close and not self.chunked and self.length is None:
            self.will_close = True


def _content_length(values: list[str] | None) -> int | None:
    if not values:
        return None
    lengths = {v.strip() for value in values for v in value.split(",")}
    if len(lengths) != 1 or not next(iter(lengths)).isdigit():
        raise HTTPException(f"malformed or conflicting Content-Length: {values!r}")
    return int(lengths.pop())


class _Alive:
    """``is_connected`` as one non-blocking peek instead of a poll.

    urllib3 checks a pooled connection before reusing it; under gevent its
    zero-timeout poll costs more than the rest of the request. Only a peek
    that would block means idle and open: b"" is the upstream's close, and
    bytes nobody asked for would be read as the next response. A zero
    timeout is what makes gevent's recv not wait.
    """

    @property
    def is_connected(self) -> bool:
        sock = self.sock
        if sock is None:
            return False
        timeout = sock.gettimeout()
        sock.settimeout(0)
        try:
            sock.recv(1, socket.MSG_PEEK)
            return False
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:
            return False
        finally:
            sock.settimeout(timeout)


class StrictConnection(_Alive, HTTPConnection):
    response_class = StrictResponse


class StrictTLSConnection(HTTPSConnection):
    # A TLS socket cannot be peeked at below the record layer: keep urllib3's check.
    response_class = StrictResponse


class StrictPool(HTTPConnectionPool):
    ConnectionCls = StrictConnection


class StrictTLSPool(HTTPSConnectionPool):
    ConnectionCls = StrictTLSConnection


POOL_CLASSES = {"http": StrictPool, "https": StrictTLSPool}
