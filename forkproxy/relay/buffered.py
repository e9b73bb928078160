"""The buffered path: read a whole upstream body, never more than the cap."""
from __future__ import annotations

from forkproxy.errors import ProxyError, UpstreamBodyTooLarge
from forkproxy.upstream.failures import body_error
from forkproxy.upstream.reply import UpstreamReply


def read_body(reply: UpstreamReply, cap: int) -> bytes:
    """The body as sent (still encoded), or a ProxyError.

    The cap is checked against a declared length before reading and against
    the bytes read so far while reading, so an oversize body is never held.
    The connection goes back to the pool only after a complete, clean read.
    A failed read is raised from what failed underneath: the log names it
    and the member, the client's message neither.
    """
    try:
        return _read_capped(reply, cap)
    except ProxyError:
        reply.close()
        raise
    except Exception as exc:
        reply.close()
        raise body_error(exc) from exc
    finally:
        reply.release()


def _read_capped(reply: UpstreamReply, cap: int) -> bytes:
    declared = reply.framing.length
    if declared is not None:
        if cap and declared > cap:
            raise UpstreamBodyTooLarge(cap)
        return reply.read_sized()
    pieces, parts, size = reply.pieces(), [], 0
    while (got := pieces()) is not None:
        for part in got:
            size += len(part)
            if cap and size > cap:
                raise UpstreamBodyTooLarge(cap)
            parts.append(part)
    return b"".join(parts)
