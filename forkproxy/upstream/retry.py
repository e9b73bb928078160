"""Retry policy as a value object, carried out by urllib3's own machinery.

``RetryPolicy`` is what hooks build and tests reason about; ``PolicyRetry``
is the ``urllib3.util.Retry`` that makes urllib3 retry exactly what the policy
allows and sleep exactly what it says.
"""
from __future__ import annotations

import random
import time
from typing import Any, Collection

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

    def to_urllib3(self) -> "PolicyRetry":
        if self.max_attempts <= 1:
            return _SINGLE_ATTEMPT  # nothing is ever retried, so one shared object serves every request
        return PolicyRetry(policy=self)

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


class RetryCount:
    """Retries made so far; shared by every Retry urllib3 derives via ``new()``.

    urllib3 raises instead of returning its last Retry when attempts run out,
    so the count has to live outside the Retry objects.
    """

    __slots__ = ("retries",)

    def __init__(self) -> None:
        self.retries = 0


class Failover(Exception):
    """Raised by ``PolicyRetry.increment`` out of urllib3's urlopen: make the next attempt elsewhere.

    urllib3's pool retries on its own host; the next attempt of a request may
    belong to another pool member, so each retry the policy allows leaves
    urlopen with the Retry that carries the request's retry state (as
    urllib3's PoolManager carries one across hosts on a redirect), and the
    transport sends the next attempt to the member the route picks.
    """

    def __init__(self, retry: "PolicyRetry", *, error: BaseException | None, response: Any) -> None:
        super().__init__(str(error) if error is not None else f"status {getattr(response, 'status', '?')}")
        self.retry = retry
        self.error = error
        self.response = response


class PolicyRetry(Retry):
    """urllib3 ``Retry`` driven by a ``RetryPolicy``.

    Stock urllib3 sleeps 0 before the first retry, retries 413/429/503 on
    Retry-After alone and retries read errors for every method it allows;
    here the policy decides all three. Every retry it allows is made by the
    transport, which may send it to another pool member (``Failover``).
    """

    def __init__(self, *, policy: RetryPolicy, count: RetryCount | None = None, **kw: Any) -> None:
        self.policy = policy
        self.count = count or RetryCount()
        kw.setdefault("total", max(policy.max_attempts, 1) - 1)
        kw.setdefault("redirect", False)
        kw.setdefault("raise_on_status", False)
        super().__init__(**kw)

    def new(self, **kw: Any) -> "PolicyRetry":
        kw.setdefault("policy", self.policy)
        kw.setdefault("count", self.count)
        return super().new(**kw)

    def increment(self, method: str | None = None, url: str | None = None, response: Any = None,
                  error: Exception | None = None, **kw: Any) -> "PolicyRetry":
        retry = super().increment(method, url, response=response, error=error, **kw)  # MaxRetryError when spent
        self.count.retries = len(retry.history)
        raise Failover(retry, error=error, response=response)

    def is_retry(self, method: str, status_code: int, has_retry_after: bool = False) -> bool:
        return status_code in self.policy.retry_on_status and self.policy.method_retriable(method)

    def _is_method_retryable(self, method: str) -> bool:
        """What urllib3 asks before retrying a read error: the request may have been processed."""
        return self.policy.retriable_after_sending(method)

    def get_backoff_time(self) -> float:
        return self.policy.sleep_ms(len(self.history) - 1) / 1000.0

    def sleep_for_retry(self, response: Any) -> bool:
        if response.status not in RETRY_AFTER_STATUSES:
            return False
        retry_after = self.get_retry_after(response)
        if retry_after is None:
            return False
        time.sleep(min(retry_after, self.policy.max_backoff_ms / 1000.0))
        return True

    def get_retry_after(self, response: Any) -> float | None:
        try:
            return super().get_retry_after(response)
        except Exception:  # an unparseable Retry-After falls back to the backoff
            return None


# No retry: increment() raises before it could count anything, so sharing is safe.
_SINGLE_ATTEMPT = PolicyRetry(policy=RetryPolicy())
