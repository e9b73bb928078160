"""The streaming path: relay an upstream body unit by unit as a WSGI iterable.

Each unit is one decoded chunk of a chunked body, one complete event of an
event stream, or one read of any other body. It goes through
``on_stream_chunk`` and whatever the hook wrote is yielded to the server at
once: nothing is held back. Reads are plain socket reads, which gevent makes
cooperative, so one worker relays thousands of streams.

A stream ends once. How is one ``StreamEnd``, decided where its cause is
seen: the body's end, a failed read (``upstream_failed``), a raising
``on_stream_chunk`` (``hook_failed``), the server closing the iterable
(``client_gone``), ``shutdown.stop_all`` (``worker_stopping``), or anything
else ending the greenlet (``interrupted``). ``StreamRelay.finish`` does what
every end needs, in one place: the upstream connection released or closed,
the stats, the log line, the shutdown registry, metrics, ``on_stream_end``.

Two things read units before the relay runs or in place of its reply:
``prime`` reads a reply's first units before its head is accepted
(``first_byte_timeout``, and every resumed attempt), framed as the relay
frames them, so that the relay goes on from them; and when a read fails
after the head went out, the relay asks its ``resume`` (the lifecycle's,
``resume_stream``) for a reply to go on with, primed so.
"""
from __future__ import annotations

import errno
import json
import logging
import time
from http.client import HTTPException
from typing import Any, Callable, Iterator, Literal, NamedTuple

import gevent
import urllib3
from urllib3.exceptions import DecodeError
from urllib3.response import BaseHTTPResponse, MultiDecoder

from forkproxy.errors import BadUpstreamResponse, ProxyError, UpstreamTimeout
from forkproxy.hooks import call_after_head, log_failure
from forkproxy.http import headers as header_rules
from forkproxy.http.sse import EventFramer, EventTooLarge
from forkproxy.messages import Request, StreamStats, StreamWriter, describe
from forkproxy.metrics import metrics
from forkproxy.relay.heartbeat import HEARTBEAT, Units, paced
from forkproxy.server import shutdown
from forkproxy.server.inbound import REQUEST_ID_HEADER
from forkproxy.tracing import NO_TRACE
from forkproxy.upstream.body import ClientLeft
from forkproxy.upstream.failures import NoFirstUnit, body_error
from forkproxy.upstream.members import Upstream
from forkproxy.upstream.reply import UpstreamReply

log = logging.getLogger("forkproxy")

_DECODE_STEP = 64 * 1024  # the most one decode of a compressed event stream gives


class StreamHooks(NamedTuple):
    """The hooks a stream calls (the proxy's ``on_stream_chunk`` and ``on_stream_end``), handed to it."""

    on_chunk: Callable[[bytes, StreamWriter, StreamStats], None] | None  # None: not set, each unit as it came
    on_end: Callable[[Request, StreamWriter, StreamStats], None]


class StreamSettings(NamedTuple):
    idle_timeout: float  # ``stream_idle_timeout``: the longest wait for one read; 0 waits for ever
    max_event_bytes: int  # the largest event an event stream may hold
    heartbeat_secs: float  # an event stream's heartbeat after that long with no read; 0: none
    error_event: bool = True  # ``sse_error_event``: an event stream failed for good ends with an error event


class Primed(NamedTuple):
    """A reply whose first units were read before it was accepted, and the rest of its units to come."""

    reply: UpstreamReply
    member: Upstream
    units: list[bytes]  # its first units; [] when the body ended before one
    rest: Units | None  # the units after those, framed as they were; None: not framed yet (none read ahead)


Resume = Callable[[StreamStats], "Primed | None"]
"""``resume(stats)``: a reply to go on with after the stream's reply failed (``resume_stream``), or None."""

Reason = Literal["complete", "upstream_failed", "hook_failed", "client_gone", "worker_stopping", "interrupted"]


class StreamEnd(NamedTuple):
    """How a stream ended: its reason, for the log line what broke (``unforeseen``: with its traceback),
    and for an upstream failure the ``ProxyError`` the hooks see as ``stats.error``."""

    reason: Reason
    detail: str = ""
    unforeseen: Exception | None = None
    error: ProxyError | None = None


_COMPLETE = StreamEnd("complete")
_CLIENT_GONE = StreamEnd("client_gone")
_WORKER_STOPPING = StreamEnd("worker_stopping", "worker stopping")
# Ends seen where the relay yields no more: what on_stream_end writes is dropped.
_UNHEARD = ("client_gone", "worker_stopping", "interrupted")


def is_event_stream(headers: urllib3.HTTPHeaderDict) -> bool:
    return header_rules.get(headers, "content-type", "").lower().startswith("text/event-stream")


def content_decoder(headers: urllib3.HTTPHeaderDict) -> MultiDecoder | None:
    """A decoder for the body's Content-Encoding; None when there is none, or one urllib3 cannot undo."""
    codings = [c.strip().lower() for c in header_rules.get(headers, "content-encoding", "").split(",")]
    codings = [c for c in codings if c and c != "identity"]
    if not codings or not all(c in BaseHTTPResponse.CONTENT_DECODERS for c in codings):
        return None
    try:
        return MultiDecoder(",".join(codings))
    except DecodeError as exc:  # more codings than urllib3 will chain
        raise BadUpstreamResponse(f"event stream with an unusable Content-Encoding: {exc}") from None


class StreamAborted(ConnectionResetError):
    """Ends a reply without its terminating chunk, so the client sees it cut.

    An ECONNRESET OSError is what gunicorn treats as a gone connection: it
    closes the socket quietly instead of logging a traceback.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(errno.ECONNRESET, reason)


class StreamRelay:
    """One streamed response: the upstream body, the hooks, the client.

    ``primed``: the reply's first units, read before it was accepted.
    ``resume``: asked for a reply to go on with when the reply fails.
    ``trace``: the request's trace, told of the first unit and of the end.
    """

    def __init__(self, req: Request, reply: UpstreamReply, member: Upstream, hooks: StreamHooks,
                 settings: StreamSettings, primed: Primed | None = None, resume: Resume | None = None,
                 trace: Any = NO_TRACE) -> None:
        self.req = req
        self.trace = trace
        self.hooks = hooks
        self.settings = settings
        self.resume = resume
        self.sse = is_event_stream(reply.headers)
        # An event stream is framed (and seen by hooks) decoded; other bodies pass as sent.
        self.decoded = self.sse and content_decoder(reply.headers) is not None
        self.stats = StreamStats(req)
        self.out = StreamWriter()
        self.greenlet: gevent.Greenlet | None = None  # the request's, while the relay runs
        self.stopping = False  # the worker is stopping: shutdown.stop_all ended this stream
        self.end: StreamEnd | None = None  # how it ended, once it has
        self._units: Iterator[bytes] | None = None
        self._stop_reading: Callable[[], None] = _nothing
        self._follow(primed or Primed(reply, member, [], None))

    def head(self) -> tuple[int, list[tuple[str, str]]]:
        """The status and the upstream's fields as they go to the client, without forkproxy's own."""
        drop = ("content-encoding",) if self.decoded else ()
        # No CR, LF or NUL to check for: wire.read_head refused those already.
        return self.reply.status, header_rules.client_response_headers(
            self.reply.headers, keep_content_length=False, drop=(*drop, REQUEST_ID_HEADER.lower()))

    # -- the WSGI iterable: the server iterates the relay, then closes it ------

    def __iter__(self) -> Iterator[bytes]:
        if self._units is None:
            self._units = self._relay()
        return self._units

    def close(self) -> None:
        """The server is done with the reply: a relay never iterated (its head was refused) lets go of the upstream."""
        if self._units is None:
            self.reply.close()
        else:
            self._units.close()

    def stop(self) -> None:
        """Called by ``shutdown.stop_all``: end the stream now, from another greenlet."""
        self.stopping = True
        if self.greenlet is not None:
            self.greenlet.kill(shutdown.WorkerStopping, block=False)

    # -- the relay ---------------------------------------------------------

    def _relay(self) -> Iterator[bytes]:
        self._open()
        try:
            yield b""  # the server sends status and headers now, not with the first unit
            end: StreamEnd | None = None
            while end is None:  # once per upstream reply: the first, then each that resumed it
                next_units = self._unit_source()
                try:
                    units, self._first = self._first or next_units(), []
                    while units is not None:
                        data, cut = self._handled(units)
                        if data:
                            yield data
                        if cut is not None:
                            raise _Ended(cut)
                        units = next_units()
                    end = _COMPLETE
                except _Ended as ended:
                    end = None if self._resumed(ended.end) else ended.end
        except GeneratorExit:  # the server closed us: the client went away, or the worker stopped us
            self.finish(_WORKER_STOPPING if self.stopping else _CLIENT_GONE)
            raise
        except ClientLeft as left:  # seen while waiting for the upstream, before any write failed
            self.finish(_CLIENT_GONE)
            raise StreamAborted(str(left)) from None
        except BaseException as exc:
            # The worker is stopping (forkproxy's shutdown, or gunicorn killing what outlived
            # graceful_timeout), or something unforeseen broke: the stream still ends once, billed.
            end = _WORKER_STOPPING if self.stopping else _interrupted(exc)
            self.finish(end)
            if isinstance(exc, (Exception, shutdown.WorkerStopping)):
                raise StreamAborted(end.detail) from exc  # gunicorn closes the connection quietly
            raise
        self.finish(end)
        pending = self.out.take()  # what on_stream_end wrote
        if pending:
            yield b"".join(pending)
        if end is not _COMPLETE:
            raise StreamAborted(end.detail)

    def _handled(self, units: list[bytes]) -> tuple[bytes, StreamEnd | None]:
        """What the units of one read send to the client, in one write; and the end one of them made, if any.

        Each unit goes through ``on_stream_chunk`` alone (not set: as it
        came); what they wrote goes out together, up to a unit whose hook
        raised or failed the stream (``out.fail``). One write per read, not
        per unit: no unit waits for a later read, and a read that brought
        many costs one syscall.
        """
        stats, on_chunk, out = self.stats, self.hooks.on_chunk, self.out
        sent: list[bytes] = []
        for unit in units:
            if unit is HEARTBEAT:
                sent.append(unit)
                continue
            stats.byte_count += len(unit)
            stats.chunk_count += 1
            if stats.chunk_count == 1:
                self.trace.first_unit()
            if on_chunk is None:
                sent.append(unit)
                continue
            try:
                on_chunk(unit, out, stats)
            except Exception as exc:
                out.take()  # what the failing unit wrote is not sent
                return b"".join(sent), StreamEnd("hook_failed", log_failure(on_chunk, describe(self.req), exc))
            if out.pending:
                if out.failure is not None:
                    out.take()
                    return b"".join(sent), _failed_by_hook(out.failure)
                sent += out.take()
        return (sent[0] if len(sent) == 1 else b"".join(sent)), None

    def _resumed(self, end: StreamEnd) -> bool:
        """Whether the stream goes on after ``end`` with a reply ``resume`` gave; the failed reply is let go first.

        Only an upstream failure is resumed. When ``resume`` raises (a hook
        did), the stream ends as it would have, the hook's failure logged.
        """
        if end.reason != "upstream_failed" or self.resume is None:
            return False
        stats = self.stats
        log.warning("%s: stream broke after %d units from %s: %s; asking resume_stream", describe(self.req),
                    stats.chunk_count, self.member.name, end.detail)
        self._stop_reading()
        self._stop_reading = _nothing
        self.reply.close()  # its attempt is over: the member's in-flight count comes down
        self.out.failure = None
        stats.error = end.error  # the hook sees why
        try:
            primed = self.resume(stats)
        except Exception as exc:  # a hook raised (its own exception is the cause): the stream ends as it would have
            log.error("%s: resuming the stream failed: %s", describe(self.req), exc, exc_info=exc.__cause__ or exc)
            return False
        if primed is None:
            return False
        self._follow(primed)
        stats.error = None
        stats.resumes += 1
        return True

    def _follow(self, primed: Primed) -> None:
        """Relay ``primed``'s reply from here on (the first, or one that resumed the stream): its units, the
        first ones read already, and what ``stats`` says of the reply being relayed."""
        reply = primed.reply
        self.reply, self.member, self._first, self._rest = primed
        self.stats.status, self.stats.headers, self.stats.upstream = reply.status, reply.headers, primed.member.name
        # From here on a read may wait ``stream_idle_timeout``, not ``timeout``.
        reply.set_read_timeout(self.settings.idle_timeout or None)

    def _open(self) -> None:
        counters = metrics()
        if counters.enabled:
            counters.active_streams.inc()
        self.greenlet = gevent.getcurrent()
        shutdown.opened(self)

    def finish(self, end: StreamEnd) -> None:
        """The stream is over: the once-only work of every end, from how it ended."""
        if self.end is not None:
            return
        self.end = end
        self._stop_reading()
        stats, req, reason = self.stats, self.req, end.reason
        if reason in _UNHEARD:
            self.out.discarding = True
        if reason == "complete":
            self.reply.release()
        else:
            self.reply.close()
            if reason == "client_gone":
                stats.client_disconnected = True
            else:
                stats.errored, stats.error = True, end.error
                if reason == "upstream_failed" and self.sse and self.settings.error_event and end.error:
                    self.out.write(error_event(end.error))
                log.warning("%s: stream cut after %d units: %s", describe(req), stats.chunk_count, end.detail,
                            exc_info=end.unforeseen)
        shutdown.closed(self)
        counters = metrics()
        if counters.enabled:
            counters.active_streams.dec()
            counters.stream_ended(stats.chunk_count, stats.byte_count)
            counters.answered(req.method, self.reply.status, self.member.name,
                              "stream_cut" if stats.errored else None)
        call_after_head(self.hooks.on_end, describe(req), req, self.out, stats)
        self.trace.stream_ended(stats, end.error.type if end.error else None)  # after on_end: its attributes

    # -- reading units ---------------------------------------------------------
    #
    # Units come from a plain function called once per read, not from nested
    # generators: a stream waits in that read most of its life, and each
    # generator level would be one more C frame kept on the greenlet's stack.

    def _unit_source(self) -> Units:
        """A function giving the units of one read, None at the end; with heartbeats, if they are on."""
        next_units = self._rest or framed_units(self.reply, self.member, self.settings)
        self._rest = None
        self.reply.watch_client(self.req.environ.get("gunicorn.socket"))
        interval = self.settings.heartbeat_secs
        if self.sse and interval:
            next_units, self._stop_reading = paced(next_units, interval)
        return next_units


def prime(reply: UpstreamReply, member: Upstream, settings: StreamSettings, wait: float) -> Primed:
    """The reply's first units, read within ``wait`` seconds of now and framed as the relay frames them.

    A body that ends before one primes with none. No unit in time, or a
    body broken before one, is a failed attempt (``NoFirstUnit``): the
    request went out, the member answered with a head and nothing more.
    """
    try:
        rest = framed_units(reply, member, settings)
    except ProxyError as unusable:  # a Content-Encoding that cannot be undone: this member's reply, not the request's
        raise NoFirstUnit(unusable, unusable) from None
    until = time.monotonic() + wait
    while True:
        left = until - time.monotonic()
        if left <= 0:  # units came, but each read only part of one
            raise NoFirstUnit.late(wait, TimeoutError("no complete unit yet"))
        reply.set_read_timeout(left)
        try:
            units = rest()
        except _Ended as ended:
            error, cause = ended.end.error, ended.__cause__ or ended
            if isinstance(error, UpstreamTimeout):
                raise NoFirstUnit.late(wait, cause) from cause
            raise NoFirstUnit(error, cause) from cause
        if units is None:
            return Primed(reply, member, [], _ended)
        if units:
            return Primed(reply, member, units, rest)


def framed_units(reply: UpstreamReply, member: Upstream, settings: StreamSettings) -> Units:
    """A function giving the units of one read of ``reply``'s body, None at its end; a failed read raises ``_Ended``."""
    sse = is_event_stream(reply.headers)
    pieces = _body_pieces(reply, settings, content_decoder(reply.headers) if sse else None, sse)
    return _FramedUnits(pieces, EventFramer(settings.max_event_bytes) if sse else None, member.base.origin).next


class _FramedUnits:
    """A body's pieces cut into units: events of an event stream, else each piece as it came.

    Kept by the relay for the stream's life: slots, not closures (see upstream/body.py).
    """

    __slots__ = ("_pieces", "_framer", "_origin")

    def __init__(self, pieces: Units, framer: EventFramer | None, origin: str) -> None:
        self._pieces, self._framer, self._origin = pieces, framer, origin

    def next(self) -> list[bytes] | None:
        try:
            got = self._pieces()
            framer = self._framer
            if framer is None:
                return got
            if got is None:
                return framer.finish() or None
            if len(got) == 1:
                return framer.feed(got[0])
            return [event for piece in got for event in framer.feed(piece)]
        except EventTooLarge as exc:
            raise _Ended(StreamEnd("upstream_failed", str(exc), error=BadUpstreamResponse(str(exc)))) from exc
        except (urllib3.exceptions.HTTPError, HTTPException, OSError, ValueError) as exc:
            error = body_error(exc)
            detail = f"{error.message} ({self._origin}: {type(exc).__name__}: {exc})"
            raise _Ended(StreamEnd("upstream_failed", detail, error=error)) from exc


def _body_pieces(reply: UpstreamReply, settings: StreamSettings, decoder: MultiDecoder | None, sse: bool) -> Units:
    """A function giving the body bytes of one read (whole chunks for a chunked body), None at the end.

    A compressed event stream is decoded here so the framer and the hooks
    see its events, at most ``_DECODE_STEP`` bytes per call: a small gzip
    body can expand a thousandfold, and what one read brought is decoded
    over as many calls as that takes, the framer checking each step
    against ``max_event_bytes``.
    """
    pieces = reply.pieces(waiting=sse)
    if decoder is None:
        return pieces
    step = min(_DECODE_STEP, settings.max_event_bytes)

    def undo(decode: Callable[..., bytes], *args: Any) -> bytes:
        try:
            return decode(*args)
        except Exception as exc:  # zlib.error, brotli.error, ...: the body is not what it claims
            raise DecodeError(f"undecodable {reply.headers['content-encoding']} body: {exc}") from exc

    def decoded() -> list[bytes] | None:
        while not decoder.has_unconsumed_tail:
            got = pieces()
            if got is None:
                rest = undo(decoder.flush)
                return [rest] if rest else None
            data = got[0] if len(got) == 1 else b"".join(got)  # [] when a read held only chunk framing
            if data and (data := undo(decoder.decompress, data, step)):
                return [data]
        return [undo(decoder.decompress, b"", step)]
    return decoded


def error_event(error: ProxyError) -> bytes:
    """The last event of an event stream that failed for good: the client-safe message of what failed it."""
    body = {"error": {"message": error.message, "type": "upstream_stream_failed"}}
    return b"data: " + json.dumps(body).encode() + b"\n\n"


def _failed_by_hook(message: str) -> StreamEnd:
    """``out.fail(message)``: ``on_stream_chunk`` judged the upstream's stream broken, so a bad upstream response."""
    return StreamEnd("upstream_failed", f"out.fail: {message}", error=BadUpstreamResponse(message))


def _interrupted(exc: BaseException) -> StreamEnd:
    """The end of a stream something unforeseen ended: a bug (logged with its traceback), or a kill."""
    return StreamEnd("interrupted", f"{type(exc).__name__} {exc}".strip(), exc if isinstance(exc, Exception) else None)


def _nothing() -> None:
    pass


def _ended() -> None:
    """The units of a body that has ended: none."""
    return None


class _Ended(Exception):
    """Carries a stream's end from where its cause was seen (a read, the chunk hook) out of the relay loop."""

    def __init__(self, end: StreamEnd) -> None:
        super().__init__(end.detail)
        self.end = end
