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


class EventTooLarge(Exception):
    """An incomplete event grew past the limit."""


class EventFramer:
    """Feed it reads; it hands back complete events, each with its blank line.

    An incomplete event is held as the list of reads it came in and joined
    once, when its blank line arrives: joining at every read would copy a
    1 MiB event hundreds of times over when it comes in 1.4 KB reads. Only a
    new read (and the last bytes held before it, where a blank line may
    start) is searched for the end of the event.
    """

    __slots__ = ("max_event_bytes", "_held", "_held_bytes", "_tail")

    def __init__(self, max_event_bytes: int = 0) -> None:
        self.max_event_bytes = max_event_bytes
        self._held: list[bytes] = []
        self._held_bytes = 0
        self._tail = b""  # the last bytes held: the start of a blank line cut by the read

    def feed(self, data: bytes) -> list[bytes]:
        if not self._held:
            if len(data) > 1 and data.find(b"\n\n") == len(data) - 2 and b"\r" not in data:
                return [data]  # the common case, taken whole: one LF-ended event in one read
            return self._split_held(data, 0)
        if not _ends_an_event(self._tail + data):
            self._hold(data)
            return []
        searched_from = max(self._held_bytes - len(self._tail), 0)
        buf = b"".join(self._held) + data
        self._clear()
        return self._split_held(buf, searched_from)

    def finish(self) -> list[bytes]:
        """The events left at end of stream; a last one without its blank line is completed."""
        buf = b"".join(self._held)
        self._clear()
        events, start = _split(buf, 0, at_eof=True)
        tail = buf[start:]
        if tail:
            events.append(tail + _blank_line_after(tail))
        return events

    @property
    def pending(self) -> int:
        return self._held_bytes

    def _split_held(self, buf: bytes, pos: int) -> list[bytes]:
        """Complete events of ``buf``; what follows the last one is held."""
        events, start = _split(buf, pos, at_eof=False)
        if start < len(buf):
            self._hold(buf[start:] if start else buf)
        return events

    def _hold(self, data: bytes) -> None:
        self._held.append(data)
        self._held_bytes += len(data)
        self._tail = (self._tail + data)[-3:] if len(data) < 3 else data[-3:]
        if self.max_event_bytes and self._held_bytes > self.max_event_bytes:
            raise EventTooLarge(f"incomplete event of {self._held_bytes} bytes exceeds {self.max_event_bytes}")

    def _clear(self) -> None:
        self._held, self._held_bytes, self._tail = [], 0, b""


def _blank_line_after(tail: bytes) -> bytes:
    """What completes a trailing event: one more line end of the kind its last line has, or two.

    The same kind matters for a bare CR: an LF after it would join it into
    one CRLF line end, and the event would still lack its blank line.
    """
    for line_end in (b"\r\n", b"\n", b"\r"):
        if tail.endswith(line_end):
            return line_end
    return b"\n\n"


def _ends_an_event(data: bytes) -> bool:
    """Whether ``data`` holds a blank line that surely ends an event."""
    match = _EVENT_END.search(data)
    return match is not None and not (match.end() == len(data) and data.endswith(b"\r"))


def _split(buf: bytes, pos: int, *, at_eof: bool) -> tuple[list[bytes], int]:
    """(complete events from the start of ``buf``, where the rest starts); no event end lies before ``pos``."""
    events: list[bytes] = []
    start = 0
    while True:
        match = _EVENT_END.search(buf, pos)
        if match is None:
            break
        end = match.end()
        if end == len(buf) and buf.endswith(b"\r") and not at_eof:
            break  # a CR at the very end may be the first half of CRLF
        events.append(buf[start:end])
        start = pos = end
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
