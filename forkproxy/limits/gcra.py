"""GCRA, the generic cell rate algorithm: rate limits as one number per key, no timers, no I/O.

Each key keeps its *theoretical arrival time* (TAT): when its bucket will be
full again. A request of ``cost`` moves the TAT on by ``cost`` emission
intervals (``per / rate`` seconds each); it is allowed when the new TAT is
at most ``burst`` intervals ahead of now. That is a token bucket of size
``burst`` refilling at ``rate / per``, kept as a single float that both
stores (LMDB, a Redis script) update in one atomic step. A charge after
the fact moves the TAT on without a check, so a budget may go below zero;
until the TAT is back within reach, every request is refused, ``cost=0``
ones included (they only check).

The same arithmetic runs in ``redis_store``'s Lua script; ``decide`` is its
Python twin for the local store and the reference the tests hold both to.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Sequence

MAX_PER = 86400.0  # a day: the longest window
# Times are epoch seconds (shared across processes and hosts), exact to ~0.2 us at today's
# epoch and to 1 us in the Redis script: counts and seconds shown are rounded with this slack.
_SLACK = 1e-3


class Limit:
    """``rate`` units per ``per`` seconds for ``key``, up to ``burst`` (default ``rate``) at once; this request takes ``cost``."""

    __slots__ = ("key", "rate", "per", "burst", "cost", "interval", "tolerance")

    def __init__(self, key: str, rate: float, per: float, burst: float | None = None, cost: float = 1) -> None:
        if not isinstance(key, str) or not key:
            raise ValueError(f"Limit key must be a non-empty str: {key!r}")
        for name, value, low in (("rate", rate, 0), ("per", per, 0)):
            if not _finite(value) or value <= low:
                raise ValueError(f"Limit {name} must be a number above 0: {value!r}")
        if per > MAX_PER:
            raise ValueError(f"Limit per must be at most {MAX_PER:g} seconds (a day): {per!r}")
        burst = rate if burst is None else burst
        if not _finite(burst) or burst < 1:
            raise ValueError(f"Limit burst must be a number of at least 1: {burst!r}")
        if not _finite(cost) or cost < 0:
            raise ValueError(f"Limit cost must be a number of at least 0: {cost!r}")
        self.key, self.rate, self.per, self.burst, self.cost = key, rate, per, burst, cost
        self.interval = per / rate  # seconds one unit takes to come back
        self.tolerance = burst * self.interval  # how far ahead of now the TAT may run

    @property
    def name(self) -> str:
        """What may be shown of the key: its prefix up to the first ``:`` (the rest may be a secret)."""
        prefix, colon, _ = self.key.partition(":")
        return prefix if colon and prefix else "limit"

    def __repr__(self) -> str:
        return f"<Limit {self.name} {self.rate:g}/{self.per:g}s burst={self.burst:g} cost={self.cost:g}>"


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class Decision(NamedTuple):
    """The outcome for all of a request's limits together."""

    allowed: bool
    retry_after: float  # seconds until the request would pass (0 when allowed)
    ahead: tuple[float, ...]  # per limit: how far its TAT is ahead of now afterwards (seconds)


def decide(limits: Sequence[Limit], tats: Sequence[float | None], now: float) -> tuple[Decision, list[float]]:
    """All limits take their cost, or none does. Returns the decision and the new TATs (unchanged if refused)."""
    moved, wait = [], 0.0
    for limit, tat in zip(limits, tats):
        start = now if tat is None or tat < now else tat
        new = start + limit.cost * limit.interval
        wait = max(wait, new - limit.tolerance - now)
        moved.append(new)
    allowed = wait <= 0
    after = moved if allowed else [now if t is None else max(t, now) for t in tats]
    return Decision(allowed, 0.0 if allowed else wait, tuple(t - now for t in after)), after


def charged(tat: float | None, interval: float, amount: float, now: float) -> float:
    """The TAT after ``amount`` units were taken after the fact (no check: it may run past the tolerance)."""
    start = now if tat is None or tat < now else tat
    return start + amount * interval


def headers(limits: Sequence[Limit], decision: Decision) -> list[tuple[str, str]]:
    """``RateLimit-Policy`` and ``RateLimit`` (IETF httpapi-ratelimit-headers) for the tightest limit.

    The tightest is the one with the smallest share of its burst left;
    ``r`` is what it has left now, ``t`` the seconds until it is full again.
    """
    best, best_share, best_left = 0, 2.0, 0
    for i, (limit, ahead) in enumerate(zip(limits, decision.ahead)):
        left = max(0, math.floor((limit.tolerance - ahead) / limit.interval + _SLACK))
        share = left / limit.burst
        if share < best_share:
            best, best_share, best_left = i, share, left
    limit, ahead = limits[best], decision.ahead[best]
    name = limit.name
    return [("RateLimit-Policy", f'"{name}";q={_whole(limit.burst)};w={_whole(limit.per)}'),
            ("RateLimit", f'"{name}";r={best_left};t={max(0, math.ceil(ahead - _SLACK))}')]


def retry_after_seconds(decision: Decision) -> int:
    """Whole seconds, rounded up (and at least 1: a client told 0 would come straight back)."""
    return max(1, math.ceil(decision.retry_after - _SLACK))


def _whole(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"
