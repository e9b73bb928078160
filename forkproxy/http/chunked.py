"""The chunked transfer coding (RFC 9112 section 7.1), decoded incrementally, free of I/O.

Fed whatever a socket read returned, it hands back the chunks that became
complete, so the streaming path can relay each upstream chunk as one unit
with one plain read per arrival. Anything that is not exactly the coding is
an error.
"""
from __future__ import annotations

import re

MAX_LINE = 4096  # a chunk-size line or a trailer line
_SIZE = re.compile(rb"([0-9A-Fa-f]{1,16})[ \t]*(?:;[^\r\n]*)?")
_PLAIN_SIZE = re.compile(rb"([0-9A-Fa-f]{1,16})\r\n")
_SIZE_LINE, _DATA, _DATA_END, _TRAILER, _DONE = range(5)


class ChunkError(ValueError):
    """The upstream broke the chunked coding."""


class Dechunker:
    """Feed raw body bytes; get whole chunks back (pieces of at most ``piece`` bytes for huge ones)."""

    __slots__ = ("piece", "_buf", "_state", "_left", "_parts", "_have", "_broken")

    def __init__(self, piece: int = 64 * 1024) -> None:
        self.piece = piece
        self._buf = b""
        self._state = _SIZE_LINE
        self._left = 0  # data bytes the current chunk still owes
        self._parts: list[bytes] = []  # the current chunk so far
        self._have = 0
        self._broken: ChunkError | None = None  # raised after the chunks that came before it

    @property
    def done(self) -> bool:
        return self._state == _DONE

    def raise_if_broken(self) -> None:
        """Raise the break a previous feed found after handing out the chunks before it."""
        if self._broken is not None:
            raise self._broken

    def feed(self, data: bytes) -> list[bytes]:
        """Complete chunks; chunks before a break in the coding come out first, the error next time."""
        self.raise_if_broken()
        single = self._single_chunk(data)
        if single is not None:
            return [single]
        out: list[bytes] = []
        try:
            self._feed(data, out)
        except ChunkError as err:
            if not out:
                raise
            self._broken = err
        return out

    def _single_chunk(self, data: bytes) -> bytes | None:
        """The common case of a stream, taken whole: a read holding exactly one chunk."""
        if self._buf or self._state != _SIZE_LINE:
            return None
        match = _PLAIN_SIZE.match(data)
        if match is None:
            return None
        size, start = int(match.group(1), 16), match.end()
        if not 0 < size <= self.piece or len(data) != start + size + 2 or not data.endswith(b"\r\n"):
            return None
        return data[start:start + size]

    def _feed(self, data: bytes, out: list[bytes]) -> None:
        buf = self._buf + data if self._buf else data
        pos, size = 0, len(buf)
        while pos < size:
            state = self._state
            if state == _DATA:
                pos = self._take(buf, pos, out)
            elif state == _DATA_END:
                if size - pos < 2:
                    break
                if buf[pos:pos + 2] != b"\r\n":
                    raise ChunkError("chunk data not followed by CRLF")
                self._state, pos = _SIZE_LINE, pos + 2
            elif state == _DONE:
                raise ChunkError("bytes after the end of the chunked body")
            else:
                end = buf.find(b"\r\n", pos)
                if end < 0:
                    if size - pos > MAX_LINE:
                        raise ChunkError("chunk-size or trailer line too long")
                    break
                self._line(buf, pos, end)
                pos = end + 2
        self._buf = buf[pos:]

    def finish(self) -> None:
        """At EOF: the coding must have ended."""
        self.raise_if_broken()
        if self._state != _DONE:
            raise ChunkError("the body ended inside the chunked coding")

    def _line(self, buf: bytes, start: int, end: int) -> None:
        if self._state == _TRAILER:
            if end == start:  # the blank line after the trailers ends the body
                self._state = _DONE
            return
        match = _SIZE.fullmatch(buf, start, end)
        if match is None:
            raise ChunkError(f"bad chunk-size line: {buf[start:end][:40]!r}")
        self._left = int(match.group(1), 16)
        self._state = _DATA if self._left else _TRAILER

    def _take(self, buf: bytes, pos: int, out: list[bytes]) -> int:
        take = buf[pos:pos + min(self._left, self.piece - self._have)]
        self._left -= len(take)
        self._parts.append(take)
        self._have += len(take)
        if self._left == 0 or self._have >= self.piece:
            out.append(self._parts[0] if len(self._parts) == 1 else b"".join(self._parts))
            self._parts, self._have = [], 0
            if self._left == 0:
                self._state = _DATA_END
        return pos + len(take)
