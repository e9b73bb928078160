"""Failures on the way to an upstream, mapped to the contract's errors (no I/O)."""
from __future__ import annotations

from http.client import HTTPException, IncompleteRead
from typing import Any

from urllib3.exceptions import (
    ConnectTimeoutError,
    NewConnectionError,
    ProtocolError,
    ReadTimeoutError,
    SSLError,
)

from ..errors import BadUpstreamResponse, ProxyError, UpstreamTimeout, UpstreamUnreachable
from .members import BaseURL


def head_error(exc: Any, upstream: BaseURL) -> ProxyError:
    """Map a failure before the response head to the contract's error."""
    where = upstream.origin
    if isinstance(exc, NewConnectionError):  # before ConnectTimeoutError: it is a subclass
        return UpstreamUnreachable(f"cannot connect to upstream {where}: {_reason(exc)}")
    if isinstance(exc, ConnectTimeoutError):
        return UpstreamTimeout(f"connect to upstream {where} timed out")
    if isinstance(exc, ReadTimeoutError):
        return UpstreamTimeout(f"upstream {where} sent no response head in time")
    if isinstance(exc, SSLError):
        return UpstreamUnreachable(f"TLS with upstream {where} failed: {_reason(exc)}")
    inner = exc.args[1] if isinstance(exc, ProtocolError) and len(exc.args) > 1 else exc
    if isinstance(inner, (ConnectionError, TimeoutError)) or type(inner) is OSError:
        return UpstreamUnreachable(f"upstream {where} closed the connection before a response head")
    if isinstance(inner, HTTPException):
        return BadUpstreamResponse(f"upstream {where} sent a malformed response head: {_reason(inner)}")
    return UpstreamUnreachable(f"upstream {where} failed before a response head: {_reason(exc)}")


def body_error(exc: BaseException, upstream: BaseURL) -> ProxyError:
    """Map a failure while reading a response body to the contract's error."""
    where = upstream.origin
    if isinstance(exc, ReadTimeoutError) or isinstance(exc, TimeoutError):
        return UpstreamTimeout(f"upstream {where} went silent while sending the body")
    inner = exc.args[1] if isinstance(exc, ProtocolError) and len(exc.args) > 1 else exc
    if isinstance(inner, IncompleteRead):
        return BadUpstreamResponse(f"upstream {where} body ended short of its length")
    return BadUpstreamResponse(f"upstream {where} broke off the body: {_reason(exc)}")


def _reason(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text.split(": ", 1)[-1] if isinstance(exc, NewConnectionError) else text
