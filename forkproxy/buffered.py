"""The buffered path: read a whole upstream body, never more than the cap."""
from __future__ import annotations

import urllib3

from .errors import ProxyError, UpstreamBodyTooLarge
from .upstream import body_error
from .urls import Upstream

_READ_SIZE = 64 * 1024


def read_body(resp: urllib3.BaseHTTPResponse, cap: int, upstream: Upstream) -> bytes:
    """The body as sent (still encoded), or a ProxyError.

    The cap is checked against a declared length before reading and against
    the bytes read so far while reading, so an oversize body is never held.
    The connection goes back to the pool only after a complete, clean read.
    """
    try:
        body = _read_capped(resp, cap)
    except ProxyError:
        resp.close()
        raise
    except Exception as exc:
        resp.close()
        raise body_error(exc, upstream) from exc
    finally:
        resp.release_conn()
    return body


def _read_capped(resp: urllib3.BaseHTTPResponse, cap: int) -> bytes:
    declared = resp.length_remaining
    if declared is not None and not resp.chunked:
        if cap and declared > cap:
            raise UpstreamBodyTooLarge(cap)
        return resp.read()
    parts, size = [], 0
    for part in resp.stream(_READ_SIZE):
        size += len(part)
        if cap and size > cap:
            raise UpstreamBodyTooLarge(cap)
        parts.append(part)
    return b"".join(parts)
