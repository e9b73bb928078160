"""Server-Sent Events framing, free of I/O.

An event ends with a blank line; lines end in LF, CRLF or CR (WHATWG HTML,
"Parsing an event stream"). The framer cuts the byte stream after each blank
line and keeps the bytes exactly as they came, so what goes out is what came in.
"""
from __future__ import annotations

import re

# A line end followed by a second one: the blank line that closes an event.
# A CR followed by LF is one line end (CRLF), never two.
_LINE_END = rb"(?:\r\n|\r(?!\n)|\n)"
_EVENT_END = re.compile(_LINE_END + _LINE_END)
_LINE_ENDS = (b"\r\n", b"\r", b"\n")


class EventTooLarge(Exception):
    """An incomplete event grew past the limit."""


class EventFramer:
    """Feed it reads; it hands back complete events, each with its blank line."""

    __slots__ = ("max_event_bytes", "_buf", "_scanned")

    def __init__(self, max_event_bytes: int = 0) -> None:
        self.max_event_bytes = max_event_bytes
        self._buf = b""
        self._scanned = 0  # bytes of _buf known to hold no event end

    def feed(self, data: bytes) -> list[bytes]:
        if not self._buf and len(data) > 1 and data.find(b"\n\n") == len(data) - 2 and b"\r" not in data:
            return [data]  # the common case, taken whole: one LF-ended event in one read
        buf = self._buf + data if self._buf else data
        events, start = self._split(buf, at_eof=False)
        self._buf = buf[start:]
        if self.max_event_bytes and len(self._buf) > self.max_event_bytes:
            raise EventTooLarge(f"incomplete event of {len(self._buf)} bytes exceeds {self.max_event_bytes}")
        return events

    def finish(self) -> list[bytes]:
        """The events left at end of stream; a last one without its blank line is completed."""
        events, start = self._split(self._buf, at_eof=True)
        tail, self._buf = self._buf[start:], b""
        if tail:
            events.append(tail + (b"\n" if tail.endswith(_LINE_ENDS) else b"\n\n"))
        return events

    @property
    def pending(self) -> int:
        return len(self._buf)

    def _split(self, buf: bytes, *, at_eof: bool) -> tuple[list[bytes], int]:
        events: list[bytes] = []
        start = 0
        pos = max(self._scanned - 3, 0)  # a blank line may straddle the old end
        while True:
            match = _EVENT_END.search(buf, pos)
            if match is None:
                break
            end = match.end()
            if end == len(buf) and buf.endswith(b"\r") and not at_eof:
                break  # a CR at the very end may be the first half of CRLF
            events.append(buf[start:end])
            start = pos = end
        self._scanned = len(buf) - start
        return events, start


_LINES = re.compile(rb"\r\n|\r|\n")


def event_data(event: bytes) -> bytes | None:
    """The data of one event: its ``data:`` lines joined with LF.

    ``None`` when the event carries no data (a comment or a bare ``id:``),
    so a hook can skip keep-alives without parsing them itself.
    """
    data = [
        value[1:] if value.startswith(b" ") else value
        for field, _, value in (line.partition(b":") for line in _LINES.split(event))
        if field == b"data"
    ]
    return b"\n".join(data) if data else None
