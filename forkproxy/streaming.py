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
from typing import TYPE_CHECKING, Iterator

import gevent
import gevent.queue
import urllib3

from . import headers as header_rules
from .inbound import REQUEST_ID_HEADER
from .messages import Request, StreamStats, StreamWriter, describe
from .metrics import metrics
from .sse import EventFramer, EventTooLarge
from .upstream import body_error
from .urls import Upstream

if TYPE_CHECKING:
    from .proxy import Proxy

log = logging.getLogger("forkproxy")

_READ_SIZE = 64 * 1024
# An SSE comment line: ignored by every client, but it crosses the network,
# so intermediaries keep an idle stream open and a gone client shows.
HEARTBEAT = b": keep-alive\n\n"


def is_event_stream(headers: urllib3.HTTPHeaderDict) -> bool:
    return headers.get("content-type", "").lower().startswith("text/event-stream")


class StreamAborted(ConnectionResetError):
    """Ends a reply without its terminating chunk, so the client sees it cut.

    An ECONNRESET OSError is what gunicorn treats as a gone connection: it
    closes the socket quietly instead of logging a traceback.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(errno.ECONNRESET, reason)


class StreamRelay:
    """One streamed response: the upstream body, the hooks, the client."""

    def __init__(self, proxy: "Proxy", req: Request, resp: urllib3.BaseHTTPResponse, upstream: Upstream) -> None:
        self.proxy = proxy
        self.req = req
        self.resp = resp
        self.upstream = upstream
        self.sse = is_event_stream(resp.headers)
        # An event stream is framed (and seen by hooks) decoded; other bodies pass as sent.
        self.decode = self.sse and "content-encoding" in resp.headers
        self.stats = StreamStats(req)
        self.out = StreamWriter()

    def reply(self) -> tuple[int, list[tuple[str, str]], Iterator[bytes]]:
        drop = ("content-encoding",) if self.decode else ()
        # No CR, LF or NUL to check for: wire.read_head refused those already.
        pairs = header_rules.client_response_headers(self.resp.headers, keep_content_length=False,
                                                     drop=(*drop, REQUEST_ID_HEADER.lower()))
        pairs.append(("X-Accel-Buffering", "no"))
        pairs.append((REQUEST_ID_HEADER, self.req.request_id))
        self._set_idle_timeout()
        return self.resp.status, pairs, self._relay()

    # -- the relay ---------------------------------------------------------

    def _relay(self) -> Iterator[bytes]:
        proxy, out, stats = self.proxy, self.out, self.stats
        failure = None
        counters = metrics()
        if counters.enabled:
            counters.active_streams.inc()
        units = self._units()
        if self.sse and proxy.sse_heartbeat_secs:
            units = _with_heartbeats(units, proxy.sse_heartbeat_secs)
        try:
            yield b""  # the server sends status and headers now, not with the first unit
            for unit in units:
                if unit is HEARTBEAT:
                    yield unit
                    continue
                stats.byte_count += len(unit)
                stats.chunk_count += 1
                proxy.on_stream_chunk(unit, out, stats)
                pending = out.take()
                if pending:
                    yield b"".join(pending) if len(pending) > 1 else pending[0]
        except GeneratorExit:  # the server closed us: the client went away
            stats.client_disconnected = True
            out.discarding = True
            self._drop_upstream()
            self._end()
            raise
        except _UpstreamFailed as exc:
            failure = str(exc)
        except Exception as exc:
            failure = f"hook on_stream_chunk raised {type(exc).__name__}: {exc}"
            log.error("%s: %s", describe(self.req), failure, exc_info=True)
        if failure is not None:
            stats.errored = True
            self._drop_upstream()
            log.warning("%s: stream cut after %d units: %s", describe(self.req), stats.chunk_count, failure)
        else:
            self.resp.release_conn()
        self._end()
        pending = out.take()
        if pending:
            yield b"".join(pending)
        if failure is not None:
            raise StreamAborted(failure)

    def _end(self) -> None:
        stats = self.stats
        counters = metrics()
        if counters.enabled:
            counters.active_streams.dec()
            counters.stream_ended(stats.chunk_count, stats.byte_count)
            counters.answered(self.req.method, self.resp.status, self.upstream.origin,
                              "stream_cut" if stats.errored else None)
        try:
            self.proxy.on_stream_end(self.req, self.out, stats)
        except Exception as exc:
            log.error("%s: hook on_stream_end raised %s: %s", describe(self.req), type(exc).__name__, exc,
                      exc_info=True)

    def _units(self) -> Iterator[bytes]:
        """Units of the body; raises _UpstreamFailed when the upstream breaks."""
        try:
            if self.sse:
                framer = EventFramer(self.proxy.max_event_bytes)
                for data in self._reads():
                    yield from framer.feed(data)
                yield from framer.finish()
            elif self.resp.chunked:
                for chunk in self.resp.read_chunked(_READ_SIZE, decode_content=False):
                    if chunk:
                        yield chunk
            else:
                yield from self._reads()
        except EventTooLarge as exc:
            raise _UpstreamFailed(str(exc)) from exc
        except (urllib3.exceptions.HTTPError, OSError, ValueError) as exc:
            raise _UpstreamFailed(body_error(exc, self.upstream).message) from exc

    def _reads(self) -> Iterator[bytes]:
        read1, decode = self.resp.read1, self.decode
        while True:
            data = read1(_READ_SIZE, decode_content=decode)
            if not data:
                return
            yield data

    # -- the upstream connection --------------------------------------------

    def _set_idle_timeout(self) -> None:
        """From here on a read may wait ``stream_idle_timeout``, not ``timeout``."""
        conn = self.resp.connection
        sock = getattr(conn, "sock", None)
        if sock is not None:
            sock.settimeout(self.proxy.stream_idle_timeout or None)

    def _drop_upstream(self) -> None:
        """Close the upstream connection: it is mid-body and cannot be reused."""
        self.resp.close()
        self.resp.release_conn()


def _with_heartbeats(units: Iterator[bytes], interval: float) -> Iterator[bytes]:
    """``units``, with HEARTBEAT whenever none came for ``interval`` seconds.

    A blocked socket read cannot be given up and resumed, so the reads move
    to a greenlet of their own and this side waits on a queue with a timeout.
    """
    queue: gevent.queue.Queue = gevent.queue.Queue(maxsize=1)
    done = object()

    def pump() -> None:
        try:
            for unit in units:
                queue.put(unit)
            queue.put(done)
        except Exception as exc:
            queue.put(exc)

    reader = gevent.spawn(pump)
    try:
        while True:
            try:
                item = queue.get(timeout=interval)
            except gevent.queue.Empty:
                yield HEARTBEAT
                continue
            if item is done:
                return
            if isinstance(item, Exception):
                raise item
            yield item
    finally:
        reader.kill(block=False)


class _UpstreamFailed(Exception):
    """The upstream broke the stream; the message is the reason for the log."""
