"""Failures on the way to an upstream, mapped to the contract's errors (no I/O)."""
from __future__ import annotations

from http.client import HTTPException, IncompleteRead
from ssl import SSLCertVerificationError
from typing import Any

from urllib3.exceptions import (
                                ConnectTimeoutError,
                                NewConnectionError,
                                ProtocolError,
                                ReadTimeoutError,
                                SSLError,
                                )
from urllib3.util.ssl_match_hostname import CertificateError

from forkproxy.errors import BadUpstreamResponse, ProxyError, UpstreamTimeout, UpstreamUnreachable
from forkproxy.upstream.members import BaseURL


class TLSHandshakeError(ConnectTimeoutError):
    """A TLS handshake that failed or timed out: no byte of the request went out, so it is a failed connect.

    A ``ConnectTimeoutError``, as urllib3's own ``NewConnectionError`` is,
    because that is what urllib3's retries and the failover treat as "sent
    nothing": retried and moved on from whatever the method. ``cause`` is
    what the handshake raised, for the log.
    """

    def __init__(self, cause: BaseException, *, timed_out: bool) -> None:
        super().__init__(f"TLS handshake {'timed out' if timed_out else 'failed'}: {type(cause).__name__}: {cause}")
        self.cause = cause
        self.timed_out = timed_out


def head_error(exc: Any, upstream: BaseURL) -> ProxyError:
    """Map a failure before the response head to the contract's error."""
    where = upstream.origin
    if isinstance(exc, TLSHandshakeError):  # before ConnectTimeoutError: it is a subclass
        return _tls_error(exc)
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


def _tls_error(exc: TLSHandshakeError) -> ProxyError:
    """What the client is told of a failed handshake: not the upstream's address, not the OS's words.

    The access log line names the member; the line that marks it down has what the handshake raised.
    """
    if exc.timed_out:
        return UpstreamTimeout("TLS handshake with the upstream timed out")
    if isinstance(exc.cause, (SSLCertVerificationError, CertificateError)):
        return UpstreamUnreachable("TLS handshake with the upstream failed: its certificate was refused")
    return UpstreamUnreachable("TLS handshake with the upstream failed")


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
