"""The streaming path: relay an upstream body unit by unit as a WSGI iterable.

Each unit is one decoded chunk of a chunked body, one complete event of an
event stream, or one read of any other body. It goes through
``on_stream_chunk`` and whatever the hook wrote is yielded to the server at
once: nothing is held back. Reads are plain socket reads, which gevent makes
cooperative, so one worker relays thousands of streams.
"""
from __future__ import annotations

import errno
import logging
from http.client import HTTPException
from typing import TYPE_CHECKING, Any, Callable, Iterator

import gevent
import gevent.queue
import urllib3
from urllib3.exceptions import DecodeError
from urllib3.response import BaseHTTPResponse, MultiDecoder

from forkproxy.http import headers as header_rules
from forkproxy import hooks
from forkproxy.server import shutdown
from forkproxy.errors import BadUpstreamResponse
from forkproxy.server.inbound import REQUEST_ID_HEADER
from forkproxy.messages import Request, StreamStats, StreamWriter, describe
from forkproxy.metrics import metrics
from forkproxy.http.sse import EventFramer, EventTooLarge
from forkproxy.upstream.failures import body_error
from forkproxy.upstream.members import BaseURL
from forkproxy.upstream.reply import UpstreamReply

if TYPE_CHECKING:
    from forkproxy.proxy import Proxy

log = logging.getLogger("forkproxy")

# An SSE comment line: ignored by every client, but it crosses the network,
# so intermediaries keep an idle stream open and a gone client shows.
HEARTBEAT = b": keep-alive\n\n"
_DECODE_STEP = 64 * 1024  # the most one decode of a compressed event stream gives


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
    """One streamed response: the upstream body, the hooks, the client."""

    def __init__(self, proxy: "Proxy", req: Request, resp: UpstreamReply, upstream: BaseURL) -> None:
        self.proxy = proxy
        self.req = req
        self.resp = resp
        self.upstream = upstream
        self.sse = is_event_stream(resp.headers)
        # An event stream is framed (and seen by hooks) decoded; other bodies pass as sent.
        self.decoder = content_decoder(resp.headers) if self.sse else None
        self.stats = StreamStats(req)
        self.out = StreamWriter()
        self._units: Iterator[bytes] | None = None
        self.greenlet: gevent.Greenlet | None = None  # the request's, while the relay runs
        self.stopping = False  # the worker is stopping: shutdown.stop_all ended this stream

    def reply(self) -> tuple[int, list[tuple[str, str]], "StreamRelay"]:
        drop = ("content-encoding",) if self.decoder else ()
        # No CR, LF or NUL to check for: wire.read_head refused those already.
        pairs = header_rules.client_response_headers(self.resp.headers, keep_content_length=False,
                                                     drop=(*drop, REQUEST_ID_HEADER.lower()))
        pairs.append(("X-Accel-Buffering", "no"))
        pairs.append((REQUEST_ID_HEADER, self.req.request_id))
        pairs += self.req.rate_limit_headers
        self._set_idle_timeout()
        return self.resp.status, pairs, self

    # -- the WSGI iterable: the server iterates the relay, then closes it ------

    def __iter__(self) -> Iterator[bytes]:
        if self._units is None:
            self._units = self._relay()
        return self._units

    def close(self) -> None:
        """The server is done with the reply: a relay never iterated (its head was refused) lets go of the upstream."""
        if self._units is None:
            self.resp.close()
        else:
            self._units.close()

    def stop(self) -> None:
        """Called by ``shutdown.stop_all``: end the stream now, from another greenlet."""
        self.stopping = True
        if self.greenlet is not None:
            self.greenlet.kill(shutdown.WorkerStopping, block=False)

    # -- the relay ---------------------------------------------------------

    def _relay(self) -> Iterator[bytes]:
        proxy, out, stats = self.proxy, self.out, self.stats
        failure = None
        stop_reading = _nothing
        counters = metrics()
        if counters.enabled:
            counters.active_streams.inc()
        self.greenlet = gevent.getcurrent()
        shutdown.opened(self)
        try:
            yield b""  # the server sends status and headers now, not with the first unit
            next_units, stop_reading = self._unit_source()
            while (units := next_units()) is not None:
                for unit in units:
                    if unit is HEARTBEAT:
                        yield unit
                        continue
                    stats.byte_count += len(unit)
                    stats.chunk_count += 1
                    try:
                        proxy.on_stream_chunk(unit, out, stats)
                    except Exception as exc:
                        raise _HookFailed() from exc
                    pending = out.take()
                    if pending:
                        yield b"".join(pending) if len(pending) > 1 else pending[0]
        except GeneratorExit:  # the server closed us: the client went away, or the worker stopped us
            out.discarding = True
            stop_reading()
            if self.stopping:
                self._cut("worker stopping")
            else:
                stats.client_disconnected = True
                self.resp.close()
            self._end()
            raise
        except _HookFailed as exc:
            failure = hooks.log_failure(proxy.on_stream_chunk, describe(self.req), exc.__cause__)
        except _UpstreamFailed as exc:
            failure = str(exc)
        except BaseException as exc:
            # The worker is stopping (forkproxy's shutdown, or gunicorn killing what outlived
            # graceful_timeout), or something unforeseen broke: the stream still ends once, billed.
            stop_reading()
            out.discarding = True
            reason = "worker stopping" if self.stopping else f"{type(exc).__name__} {exc}".strip()
            self._cut(reason, exc_info=isinstance(exc, Exception))
            self._end()
            if isinstance(exc, (Exception, shutdown.WorkerStopping)):
                raise StreamAborted(reason) from exc  # gunicorn closes the connection quietly
            raise
        finally:
            stop_reading()
        if failure is not None:
            self._cut(failure)
        else:
            self.resp.release()
        self._end()
        pending = out.take()
        if pending:
            yield b"".join(pending)
        if failure is not None:
            raise StreamAborted(failure)

    def _cut(self, reason: str, exc_info: bool = False) -> None:
        self.stats.errored = True
        self.resp.close()
        log.warning("%s: stream cut after %d units: %s", describe(self.req), self.stats.chunk_count, reason,
                    exc_info=exc_info)

    def _end(self) -> None:
        shutdown.closed(self)
        stats = self.stats
        counters = metrics()
        if counters.enabled:
            counters.active_streams.dec()
            counters.stream_ended(stats.chunk_count, stats.byte_count)
            counters.answered(self.req.method, self.resp.status, self.upstream.origin,
                              "stream_cut" if stats.errored else None)
        hooks.call_after_head(self.proxy.on_stream_end, describe(self.req), self.req, self.out, stats)

    # -- reading units ---------------------------------------------------------
    #
    # Units come from a plain function called once per read, not from nested
    # generators: a stream waits in that read most of its life, and each
    # generator level would be one more C frame kept on the greenlet's stack.

    def _unit_source(self) -> tuple[Callable[[], list[bytes] | None], Callable[[], None]]:
        """(next_units, stop): next_units() gives the units of one read, None at the end."""
        next_units = self._framed_units()
        if self.sse and self.proxy.sse_heartbeat_secs:
            return _with_heartbeats(next_units, self.proxy.sse_heartbeat_secs)
        return next_units, _nothing

    def _framed_units(self) -> Callable[[], list[bytes] | None]:
        upstream, pieces = self.upstream, self._body_pieces()
        if self.sse:
            framer = EventFramer(self.proxy.max_event_bytes)

            def units() -> list[bytes] | None:
                got = pieces()
                if got is None:
                    return framer.finish() or None
                return [event for piece in got for event in framer.feed(piece)]
        else:
            units = pieces

        def checked() -> list[bytes] | None:
            try:
                return units()
            except EventTooLarge as exc:
                raise _UpstreamFailed(str(exc)) from exc
            except (urllib3.exceptions.HTTPError, HTTPException, OSError, ValueError) as exc:
                raise _UpstreamFailed(body_error(exc, upstream).message) from exc
        return checked

    def _body_pieces(self) -> Callable[[], list[bytes] | None]:
        """A function giving the body bytes of one read (whole chunks for a chunked body), None at the end.

        A compressed event stream is decoded here so the framer and the hooks
        see its events, at most ``_DECODE_STEP`` bytes per call: a small gzip
        body can expand a thousandfold, and what one read brought is decoded
        over as many calls as that takes, the framer checking each step
        against ``max_event_bytes``.
        """
        pieces, decoder = self.resp.pieces(waiting=self.sse), self.decoder
        if decoder is None:
            return pieces
        step = min(_DECODE_STEP, self.proxy.max_event_bytes)

        def undo(decode: Callable[..., bytes], *args: Any) -> bytes:
            try:
                return decode(*args)
            except Exception as exc:  # zlib.error, brotli.error, ...: the body is not what it claims
                raise DecodeError(f"undecodable {self.resp.headers['content-encoding']} body: {exc}") from exc

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

    # -- the upstream connection --------------------------------------------

    def _set_idle_timeout(self) -> None:
        """From here on a read may wait ``stream_idle_timeout``, not ``timeout``."""
        self.resp.set_read_timeout(self.proxy.stream_idle_timeout or None)


def _with_heartbeats(next_units: Callable[[], list[bytes] | None],
                     interval: float) -> tuple[Callable[[], list[bytes] | None], Callable[[], None]]:
    """``next_units`` that gives [HEARTBEAT] whenever no read finished for ``interval`` seconds.

    A blocked socket read cannot be given up and resumed, so the reads move
    to a greenlet of their own and the relay waits on a queue with a timeout.
    """
    queue: gevent.queue.Queue = gevent.queue.Queue(maxsize=1)

    def pump() -> None:
        try:
            while True:
                units = next_units()
                queue.put(units)
                if units is None:
                    return
        except Exception as exc:
            queue.put(exc)

    reader = gevent.spawn(pump)

    def paced() -> list[bytes] | None:
        try:
            item = queue.get(timeout=interval)
        except gevent.queue.Empty:
            return [HEARTBEAT]
        if isinstance(item, Exception):
            raise item
        return item
    return paced, lambda: reader.kill(block=False)


def _nothing() -> None:
    pass


class _HookFailed(Exception):
    """on_stream_chunk raised what is this exception's cause."""


class _UpstreamFailed(Exception):
    """The upstream broke the stream; the message is the reason for the log."""
