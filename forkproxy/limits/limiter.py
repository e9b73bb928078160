"""A request's limits against the store: one call per request, outages handled, charges never lost silently.

Keys are hashed (``gcra.key_digest``) before they reach the store or a log
line: they are often API keys. What may be shown of one is its prefix up to
the first ``:`` (``Limit.name``). A store that fails (down, slower than
``limits_timeout``, refusing scripts) never fails a request unless
``limits_fail_open`` is False: the request goes through uncounted, the
store is left alone for a second (so an outage adds no latency to the
requests behind it), and the outage is logged once when it starts and once
when the store answers again. A local store full of live limits is no
outage: only the request with a new limit goes uncounted (or gets 503), the
store is asked again by the next one, and it is logged once a minute.
"""
from __future__ import annotations

import logging
import time
from typing import Callable, Protocol, Sequence, TypeVar

from forkproxy.errors import LimitsUnavailable, RateLimited
from forkproxy.metrics import metrics
from forkproxy.limits.gcra import Decision, Limit, headers, retry_after_seconds, showable_prefix
from forkproxy.limits.local import LocalStore, StoreFull
from forkproxy.limits.paths import store_path
from forkproxy.limits.redis_store import RedisStore

log = logging.getLogger("forkproxy")

_REST_AFTER_FAILURE = 1.0  # seconds the store is not asked after it failed
_FULL_LOG_EVERY = 60.0  # seconds between log lines about a full store
T = TypeVar("T")


class Store(Protocol):
    def take(self, limits: Sequence[Limit]) -> Decision: ...

    def charge(self, limit: Limit, amount: float) -> None: ...

    def charge_key(self, key: "str | bytes", amount: float) -> int: ...


def open_store(spec: str, timeout: float) -> Store:
    """``local``, ``local:PATH`` or a ``redis://`` / ``rediss://`` URL (checked by config); ``timeout`` bounds Redis."""
    if spec == "local" or spec.startswith("local:"):
        return LocalStore(store_path(spec))
    return RedisStore(spec, timeout)


class Limiter:
    def __init__(self, spec: str, timeout: float, fail_open: bool) -> None:
        self.store = open_store(spec, timeout)
        self.spec = spec.split("@")[-1]  # for log lines: no password
        self.fail_open = fail_open
        self._resting_until = 0.0
        self._outage_since: float | None = None  # while the store is failing
        self._uncounted = 0
        self._full_logged = -_FULL_LOG_EVERY

    def take(self, limits: Sequence[Limit]) -> list[tuple[str, str]]:
        """Take every limit's cost or none; the headers for the reply. Raises RateLimited, LimitsUnavailable."""
        decision = self._ask(self.store.take, limits)
        if decision is not None and decision.allowed:
            return headers(limits, decision)
        pairs = [] if decision is None else headers(limits, decision)
        over = next((limit for limit in limits if limit.over_burst), None)
        if over is not None:  # refused whatever the store said, or if it said nothing
            raise _refusal(over, f"a cost of {over.cost:g} is over its burst of {over.burst:g}, so this request "
                           "can never pass", pairs)
        if decision is None:
            if self.fail_open:
                return pairs
            raise LimitsUnavailable("rate limits cannot be checked now (the limits store is unavailable)")
        wait = retry_after_seconds(decision)
        limit = next((limit for limit, ahead in zip(limits, decision.ahead)
                      if ahead + limit.step - limit.reach > 0), limits[0])
        raise _refusal(limit, f"exceeded ({limit.rate:g} per {limit.per:g} s); retry in {wait} s",
                       [("Retry-After", str(wait)), *pairs])

    def charge(self, target: "Limit | str | bytes", amount: float) -> None:
        """Take ``amount`` from a limit, or from every live limit of a key, after the fact.

        A store failure is logged, never raised; a key with no limit in the
        store is logged (its prefix) and counted as a dropped charge.
        """
        if isinstance(target, Limit):
            self._ask(self.store.charge, target, amount)
            return
        found = self._ask(self.store.charge_key, target, amount)
        if found == 0:
            name = showable_prefix(target)
            log.warning("charge of %g to a %r key dropped: no limit of that key in the limits store (never "
                        "limited, or not for longer than its per)", amount, name)
            counters = metrics()
            if counters.enabled:
                counters.limits_charges_dropped.labels(name).inc()

    def _ask(self, call: Callable[..., T], *args: object) -> T | None:
        """The store's answer, or None when it failed (logged and counted here)."""
        if self._resting_until and time.monotonic() < self._resting_until:
            return self._failed(None)
        try:
            result = call(*args)
        except StoreFull as exc:  # this request's new limit has no room: no outage, the next request asks again
            return self._full(exc)
        except Exception as exc:  # down, timed out, refused the script, locked: all the same to a request
            self._resting_until = time.monotonic() + _REST_AFTER_FAILURE
            return self._failed(exc)
        since = self._outage_since
        if since is not None:
            log.warning("limits store %s answers again after %.1f s; %d requests went %s meanwhile", self.spec,
                        time.monotonic() - since, self._uncounted, "uncounted" if self.fail_open else "refused")
            self._outage_since, self._uncounted = None, 0
        return result

    def _failed(self, exc: Exception | None) -> None:
        _count_store_error(exc)
        if self._outage_since is None:
            why = f"{type(exc).__name__}: {exc}" if exc is not None else "unknown"
            self._outage_since = time.monotonic()
            log.error("limits store %s failed (%s); requests go %s until it answers", self.spec, why, self._going)
        self._uncounted += 1
        return None

    def _full(self, exc: StoreFull) -> None:
        _count_store_error(exc)
        now = time.monotonic()
        if now - self._full_logged >= _FULL_LOG_EVERY:
            self._full_logged = now
            log.error("limits store %s is full (%s): requests with a new key go %s until keys expire; "
                      "stored keys stay limited", self.spec, exc, self._going)
        return None

    @property
    def _going(self) -> str:
        return "through uncounted" if self.fail_open else "refused with 503"


def _refusal(limit: Limit, why: str, pairs: list[tuple[str, str]]) -> RateLimited:
    """The 429 naming ``limit`` (its prefix only), counted in the metrics."""
    counters = metrics()
    if counters.enabled:
        counters.rate_limited.labels(limit.name).inc()
    return RateLimited(f"rate limit {limit.name!r} {why}", pairs, limit.name)


def _count_store_error(exc: Exception | None) -> None:
    counters = metrics()
    if counters.enabled and exc is not None:
        counters.limits_store_errors.inc()
