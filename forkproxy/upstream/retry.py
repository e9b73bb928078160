"""The retry policy, and what it decides for the attempt loop (no I/O).

``RetryPolicy`` is what hooks build and tests reason about. urllib3's
``Retry`` is the immutable count of a request's retries, driven through its
public methods: ``increment`` gives the next value (or ``MaxRetryError``
once the attempts are spent), ``history`` holds one entry per retry, and
``get_retry_after`` reads a ``Retry-After``. The rest cannot be said with a
Retry's settings, so it is the policy's own arithmetic here: a Retry sleeps
nothing before its first retry, doubles its backoff whatever the multiplier
and adds its jitter (the policy sleeps ``base * multiplier**n``, a random
part of it with jitter), honours Retry-After on any status it retries on
(the policy: 429 and 503 only, capped at ``max_backoff_ms``), and has one
``allowed_methods`` for both a status and a failure after sending (the
policy has one rule for each, ``may_retry``).
"""
from __future__ import annotations

import random
from typing import Any, Collection

from urllib3.exceptions import InvalidHeader, MaxRetryError
from urllib3.util.retry import Retry

IDEMPOTENT_METHODS = frozenset(("GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"))  # RFC 9110 section 9.2.2
RETRY_AFTER_STATUSES = frozenset((429, 503))


class RetryPolicy:
    """How often and how patiently to retry one request.

    What may be retried depends on what the upstream may have done with the
    request. A failed connect sent nothing: retried whatever the method. A
    status in ``retry_on_status`` is the upstream's own answer (429 and 503
    say it did not process the request): retried for every method when
    ``retry_methods`` is None, else for the methods it names. A failure after
    the request was sent (a reset, a close before the response head, a read
    timeout) may have followed its processing, so a completion could be made
    and billed twice: retried for idempotent methods when ``retry_methods``
    is None, and for any other method only when ``retry_methods`` names it.
    """

    def __init__(
        self,
        max_attempts: int = 1,
        base_backoff_ms: int = 0,
        backoff_multiplier: float = 2,
        retry_on_status: Collection[int] = (502, 503, 504),
        max_backoff_ms: int = 30000,
        jitter: bool = False,
        retry_methods: Collection[str] | None = None,
    ) -> None:
        # One expression: a policy is made per request, and this must cost next to nothing.
        if (type(max_attempts) is not int or max_attempts < 1 or type(base_backoff_ms) not in _NUMBERS
                or not base_backoff_ms >= 0 or type(backoff_multiplier) not in _NUMBERS
                or not backoff_multiplier >= 0 or type(max_backoff_ms) not in _NUMBERS or not max_backoff_ms >= 0):
            _refuse(max_attempts=max_attempts, base_backoff_ms=base_backoff_ms,
                    backoff_multiplier=backoff_multiplier, max_backoff_ms=max_backoff_ms)
        self.max_attempts = max_attempts
        self.base_backoff_ms = base_backoff_ms
        self.backoff_multiplier = backoff_multiplier
        self.retry_on_status = tuple(retry_on_status)
        self.max_backoff_ms = max_backoff_ms
        self.jitter = jitter
        self.retry_methods = None if retry_methods is None else frozenset(m.upper() for m in retry_methods)

    @property
    def base_backoff_secs(self) -> float:
        return self.base_backoff_ms / 1000.0

    @base_backoff_secs.setter
    def base_backoff_secs(self, secs: float) -> None:
        self.base_backoff_ms = int(round(secs * 1000))

    def backoff_for(self, n: int) -> int:
        """Milliseconds slept before retry ``n`` (0-based), before jitter."""
        ms = self.base_backoff_ms * self.backoff_multiplier ** n
        return int(min(ms, self.max_backoff_ms))

    def retriable(self, status: int) -> bool:
        return status == 0 or status in self.retry_on_status

    def method_retriable(self, method: str) -> bool:
        """Whether a retriable status is retried for ``method``."""
        return self.retry_methods is None or method.upper() in self.retry_methods

    def retriable_after_sending(self, method: str) -> bool:
        """Whether a failure after the request went out (it may have been processed) is retried."""
        methods = IDEMPOTENT_METHODS if self.retry_methods is None else self.retry_methods
        return method.upper() in methods

    def sleep_ms(self, n: int) -> float:
        """What is really slept before retry ``n``: jitter applied."""
        ms = self.backoff_for(n)
        return random.uniform(0, ms) if self.jitter else ms

    def __repr__(self) -> str:
        return (f"RetryPolicy(max_attempts={self.max_attempts}, base_backoff_ms={self.base_backoff_ms}, "
                f"backoff_multiplier={self.backoff_multiplier}, retry_on_status={self.retry_on_status}, "
                f"max_backoff_ms={self.max_backoff_ms}, jitter={self.jitter}, retry_methods={self.retry_methods})")


_NUMBERS = (int, float)


def _refuse(**values: float) -> None:
    """Name the first argument out of range."""
    for name, value in values.items():
        minimum = 1 if name == "max_attempts" else 0
        kinds = (int,) if name == "max_attempts" else _NUMBERS
        if type(value) not in kinds or not value >= minimum:
            kind = "a whole number" if name == "max_attempts" else "a number"
            raise ValueError(f"RetryPolicy {name} must be {kind} of at least {minimum}: {value!r}")


def may_retry(policy: RetryPolicy, method: str, status: int, sent: bool) -> bool:
    """Whether the policy lets an attempt that ended so be made again (whether attempts are left aside).

    ``status`` is the upstream's answer, 0 when none came; ``sent`` whether
    any of the request went out. A status is retried as ``retry_on_status``
    and ``retry_methods`` say; no answer after nothing was sent, whatever
    the method; no answer after the request went out (it may have been
    processed), for the methods ``retriable_after_sending`` allows.
    """
    if not policy.retriable(status):
        return False
    if status:
        return policy.method_retriable(method)
    return not sent or policy.retriable_after_sending(method)


def next_retry(policy: RetryPolicy, retry: Retry | None, method: str, *,
               response: Any = None, error: Exception | None = None) -> Retry | None:
    """urllib3's count of the retries made, one more; None when the policy's attempts are spent.

    ``retry`` is None before the first retry: most requests never make one,
    and they make no Retry either.
    """
    if retry is None:
        retry = Retry(total=policy.max_attempts - 1, redirect=False)
    try:
        return retry.increment(method, response=response, error=error)
    except MaxRetryError:
        return None


def pause(policy: RetryPolicy, retry: Retry, response: Any = None) -> float:
    """Seconds to wait before the retry ``retry`` counted last.

    The upstream's ``Retry-After`` on a 429 or 503, up to ``max_backoff_ms``
    (0 means at once); else the policy's backoff for retry n (jitter applied).
    An unparseable Retry-After falls back to the backoff.
    """
    if response is not None and response.status in RETRY_AFTER_STATUSES:
        try:
            after = retry.get_retry_after(response)
        except (InvalidHeader, ValueError, OverflowError):  # not a number, not a date, or a date out of range
            after = None
        if after is not None:
            return min(after, policy.max_backoff_ms / 1000.0)
    return policy.sleep_ms(len(retry.history) - 1) / 1000.0
