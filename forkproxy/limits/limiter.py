"""A request's limits against the store: hashed keys, one call per request, outages handled.

Keys are hashed (BLAKE2b, 128 bits) before they reach the store or a log
line: they are often API keys. What may be shown of one is its prefix up to
the first ``:`` (``Limit.name``). A store that fails (down, slower than
``limits_timeout``, refusing scripts) never fails a request unless
``limits_fail_open`` is False: the request goes through uncounted, the
store is left alone for a second (so an outage adds no latency to the
requests behind it), and the outage is logged once when it starts and once
when the store answers again.
"""
from __future__ import annotations

import hashlib
import logging
import time
from typing import Protocol, Sequence

from ..errors import LimitsUnavailable, RateLimited
from ..metrics import metrics
from .gcra import Decision, Limit, headers, retry_after_seconds
from .local import LocalStore
from .redis_store import RedisStore

log = logging.getLogger("forkproxy")

_REST_AFTER_FAILURE = 1.0  # seconds the store is not asked after it failed
_KNOWN = 65536  # keys whose hash and interval this process remembers (then it starts over)


class Store(Protocol):
    def take(self, ids: Sequence[str], limits: Sequence[Limit]) -> Decision: ...

    def charge(self, id_: str, interval: float | None, amount: float) -> None: ...


def open_store(spec: str, timeout: float) -> Store:
    """``local``, ``local:PATH``, or a ``redis://`` / ``rediss://`` URL (checked by config)."""
    if spec == "local" or spec.startswith("local:"):
        return LocalStore(spec[len("local:"):] or None, timeout)
    return RedisStore(spec, timeout)


def hashed(key: str) -> str:
    return "fpl:" + hashlib.blake2b(key.encode("utf-8"), digest_size=16).hexdigest()


class Limiter:
    def __init__(self, spec: str, timeout: float, fail_open: bool) -> None:
        self.store = open_store(spec, timeout)
        self.spec = spec.split("@")[-1]  # for log lines: no password
        self.fail_open = fail_open
        self._resting_until = 0.0
        self._outage_since: float | None = None  # while the store is failing
        self._uncounted = 0
        self._ids: dict[str, str] = {}  # key -> hashed id, for the keys seen lately
        self._intervals: dict[str, float] = {}  # hashed id -> emission interval, for charges

    def take(self, limits: Sequence[Limit]) -> list[tuple[str, str]]:
        """Take every limit's cost or none; the rate-limit headers for the reply. Raises RateLimited, LimitsUnavailable."""
        ids = [self._id(limit) for limit in limits]
        decision = self._ask(self.store.take, ids, limits)
        if decision is None:
            return []
        pairs = headers(limits, decision)
        if decision.allowed:
            return pairs
        wait = retry_after_seconds(decision)
        refused = [limit for limit, ahead in zip(limits, decision.ahead)
                   if ahead + limit.cost * limit.interval - limit.tolerance > 0]
        limit = refused[0] if refused else limits[0]
        counters = metrics()
        if counters.enabled:
            counters.rate_limited.labels(limit.name).inc()
        raise RateLimited(f"rate limit {limit.name!r} exceeded ({limit.rate:g} per {limit.per:g} s); "
                          f"retry in {wait} s", [("Retry-After", str(wait)), *pairs])

    def charge(self, key: str, amount: float) -> None:
        """Take ``amount`` from ``key``'s limit after the fact; a store failure is logged, never raised."""
        id_ = hashed(key)
        self._ask(self.store.charge, id_, self._intervals.get(id_), amount, refuse=False)

    def _id(self, limit: Limit) -> str:
        """The key's hash, remembered with the limit's interval (for charges) for the keys seen lately."""
        known = self._ids.get(limit.key)
        if known is None or self._intervals.get(known) != limit.interval:
            if len(self._ids) >= _KNOWN:
                self._ids.clear()
                self._intervals.clear()
            known = self._ids[limit.key] = hashed(limit.key)
            self._intervals[known] = limit.interval
        return known

    def _ask(self, call, *args, refuse: bool = True):
        if self._resting_until and time.monotonic() < self._resting_until:
            return self._failed(None, refuse)
        try:
            result = call(*args)
        except Exception as exc:  # down, timed out, refused the script, locked: all the same to a request
            self._resting_until = time.monotonic() + _REST_AFTER_FAILURE
            return self._failed(exc, refuse)
        since = self._outage_since
        if since is not None:
            log.warning("limits store %s answers again after %.1f s; %d requests went %s meanwhile", self.spec,
                        time.monotonic() - since, self._uncounted, "uncounted" if self.fail_open else "refused")
            self._outage_since, self._uncounted = None, 0
        return result

    def _failed(self, exc: Exception | None, refuse: bool):
        counters = metrics()
        if counters.enabled and exc is not None:
            counters.limits_store_errors.inc()
        if self._outage_since is None:
            why = f"{type(exc).__name__}: {exc}" if exc is not None else "unknown"
            self._outage_since = time.monotonic()
            log.error("limits store %s failed (%s); requests go %s until it answers", self.spec, why,
                      "through uncounted" if self.fail_open else "refused with 503")
        self._uncounted += 1
        if refuse and not self.fail_open:
            raise LimitsUnavailable("rate limits cannot be checked now (the limits store is unavailable)")
        return None
