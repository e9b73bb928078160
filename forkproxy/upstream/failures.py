"""How an attempt fails before a usable response head, typed where it fails; how a body read fails (no I/O).

The exchange raises one of these at the step that failed: the connect or
the TLS handshake (``SentNothing``), the wait for a response head
(``Unanswered``, ``HeadTimeout``) or the head itself (``BadHead``). What
may happen next depends on which: a request that sent nothing moves on to
another member whatever its method, one that went out may have been
processed. Each carries the contract's error the client is told, which names
no address and no OS error; what failed underneath is the error's
``__cause__`` (and the failure is raised from it), for the log.
"""
from __future__ import annotations

from http.client import IncompleteRead
from ssl import SSLCertVerificationError

from urllib3.util.ssl_match_hostname import CertificateError

from forkproxy.errors import BadUpstreamResponse, ProxyError, UpstreamTimeout, UpstreamUnreachable


class AttemptFailed(Exception):
    """An attempt that got no usable response head.

    Neither an OSError nor an HTTPException: urllib3's ``urlopen`` catches
    and wraps those, and lets this through as it is (closing the connection).
    """

    sent = True  # whether any of the request went out (the upstream may have processed it)

    def __init__(self, error: ProxyError, cause: BaseException) -> None:
        super().__init__(error.message)
        self.error = error
        error.__cause__ = cause  # the log line of the reply names it; the client's message does not

    @property
    def reason(self) -> str:
        """For the log line of a member marked down: what the client is told, and what failed underneath."""
        cause = self.error.__cause__
        return f"{self.error.message} ({type(cause).__name__}: {cause})"


class SentNothing(AttemptFailed):
    """The connect or the TLS handshake failed or timed out: no byte of the request went out."""

    sent = False

    @classmethod
    def refused(cls, cause: BaseException) -> "SentNothing":
        """Refused, unreachable, or a name that does not resolve."""
        return cls(UpstreamUnreachable("cannot connect to the upstream"), cause)

    @classmethod
    def timed_out(cls, cause: BaseException) -> "SentNothing":
        return cls(UpstreamTimeout("connect to the upstream timed out"), cause)

    @classmethod
    def tls(cls, cause: BaseException, *, timed_out: bool) -> "SentNothing":
        """A failed handshake: its message says TLS, and a timeout is the connect's (504), never the head's."""
        if timed_out:
            return cls(UpstreamTimeout("TLS handshake with the upstream timed out"), cause)
        if isinstance(cause, (SSLCertVerificationError, CertificateError)):
            refused = UpstreamUnreachable("TLS handshake with the upstream failed: its certificate was refused")
            return cls(refused, cause)
        return cls(UpstreamUnreachable("TLS handshake with the upstream failed"), cause)


class Unanswered(AttemptFailed):
    """The request went out and the connection closed or broke before a response head.

    ``nothing_read``: not one byte of a response arrived; ``body_unsent``:
    nothing of the body went out either. Together with the method they say
    whether sending it again on a fresh connection is safe.
    """

    def __init__(self, cause: BaseException, *, body_unsent: bool, nothing_read: bool) -> None:
        super().__init__(UpstreamUnreachable("the upstream closed the connection before a response head"), cause)
        self.body_unsent = body_unsent
        self.nothing_read = nothing_read


class HeadTimeout(AttemptFailed):
    """The request went out (or stalled going out) and no response head came within the timeout."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(UpstreamTimeout("the upstream sent no response head in time"), cause)


class BadHead(AttemptFailed):
    """A response head arrived that forkproxy must not pass on (``http.wire`` says why, in the cause)."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(BadUpstreamResponse("the upstream sent a malformed response head"), cause)


def body_error(exc: BaseException) -> ProxyError:
    """The contract's error for a failure while reading a response body (plain socket reads).

    Its message says what happened, never where or the OS error: the caller
    raises it from ``exc``, and the log line names the member and ``exc``.
    """
    if isinstance(exc, TimeoutError):
        return UpstreamTimeout("the upstream went silent while sending the body")
    if isinstance(exc, IncompleteRead):
        return BadUpstreamResponse("the upstream's body ended short of its length")
    return BadUpstreamResponse("the upstream broke off the body")


class NoFirstUnit(AttemptFailed):
    """A streamed reply's head came, but not its first unit: none within ``first_byte_timeout`` (504), or the
    body broke before one (502). The request went out: it may have been processed."""

    @classmethod
    def late(cls, seconds: float, cause: BaseException) -> "NoFirstUnit":
        return cls(UpstreamTimeout(f"the upstream sent no first unit within {seconds:g}s of its head"), cause)
