"""GCRA, the generic cell rate algorithm: rate limits as one number per limit, no timers, no I/O.

Each limit keeps its *theoretical arrival time* (TAT): when its bucket will
be full again. A request of ``cost`` moves the TAT on by ``cost`` emission
intervals (``per / rate`` seconds each); it is allowed when the new TAT is
at most ``burst`` intervals ahead of now. That is a token bucket of size
``burst`` refilling at ``rate / per``, kept as a single float that both
stores (LMDB, a Redis script) update in one atomic step. A charge after
the fact moves the TAT on without a check, so a budget may go below zero;
until the TAT is back within reach, every request is refused, ``cost=0``
ones included (they only check).

A limit is its key together with its rate and ``per``: the same key with
another rate or ``per`` is another limit, with its own TAT.

Times are the wall clock (shared by processes and, in Redis, by hosts), and
a wall clock steps. Each TAT is stored with the time it was written (its
*stamp*): a TAT read before its stamp (the clock went back) is moved back by
as much, so what is left to wait is never more than it was when written. A
step forward only lets the bucket refill sooner.

The same arithmetic runs in ``redis_store``'s Lua script; ``decide`` and
``charged`` are its Python twins for the local store and the reference the
tests hold both to.
"""
from __future__ import annotations

import functools
import hashlib
import math
import re
from typing import Mapping, NamedTuple, Sequence, Tuple

MAX_PER = 86400.0  # a day: the longest window
MAX_CHARGE = 2 ** 53  # the largest amount a charge takes (integers are exact up to here)
# No TAT runs further ahead of now than this (~31,700 years): the arithmetic stays finite
# whatever the rate, cost or charges, and Retry-After only ever comes out shorter for it.
HORIZON = 1e12
# Times are epoch seconds (shared across processes and hosts), exact to ~0.2 us at today's
# epoch and to 1 us in the Redis script: counts and seconds shown are rounded with this slack.
_SLACK = 1e-3
# What of a key may be shown (a header, a metric label, a log line): a short printable prefix.
_SHOWABLE = re.compile(r"[!#-\[\]-~]{1,64}")


class Limit:
    """``rate`` units per ``per`` seconds for ``key``, up to ``burst`` (default ``rate``) at once; takes ``cost``.

    A key is any ``str`` or ``bytes``; every value is checked here (ValueError),
    so that no request can store a state that is not a finite number.
    """

    __slots__ = ("key", "rate", "per", "burst", "cost", "interval", "tolerance", "step", "reach")

    def __init__(self, key: "str | bytes", rate: float, per: float, burst: float | None = None,
                 cost: float = 1) -> None:
        if not isinstance(key, (str, bytes)):
            raise ValueError(f"Limit key must be a str or bytes: {type(key).__name__}")
        self.key = key
        self.rate, self.per = _positive("rate", rate), _positive("per", per)
        if self.per > MAX_PER:
            raise ValueError(f"Limit per must be at most {MAX_PER:g} seconds (a day): {per!r}")
        self.burst = self.rate if burst is None else _positive("burst", burst)
        self.cost = _number("cost", cost)
        if self.cost < 0:
            raise ValueError(f"Limit cost must be a finite number of at least 0: {cost!r}")
        self.interval = interval_of(self.rate, self.per)
        self.tolerance = min(self.burst * self.interval, HORIZON)  # how far ahead of now the TAT may run
        self.step = min(self.cost * self.interval, HORIZON)  # how far this request moves the TAT
        # How far ahead this request may leave the TAT: -1 (never) when its cost is over the burst.
        self.reach = self.tolerance if self.cost <= self.burst else -1.0

    @property
    def over_burst(self) -> bool:
        """Whether this request can never pass: it takes more than the bucket holds."""
        return self.reach < 0

    @property
    def name(self) -> str:
        """What may be shown of the key: its prefix up to the first ``:`` (the rest may be a secret)."""
        return showable_prefix(self.key)

    def __repr__(self) -> str:
        return f"<Limit {self.name} {self.rate:g}/{self.per:g}s burst={self.burst:g} cost={self.cost:g}>"


def interval_of(rate: float, per: float) -> float:
    """Seconds one unit takes to come back (the emission interval), within the horizon."""
    return min(per / rate, HORIZON)


def showable_prefix(key: "str | bytes") -> str:
    """A key's prefix up to its first ``:`` if it is short printable ASCII (no quote, no backslash), else ``limit``."""
    prefix, colon, _ = key.partition(":" if isinstance(key, str) else b":")
    return _shown(prefix) if colon else "limit"


@functools.lru_cache(maxsize=1024)
def _shown(prefix: "str | bytes") -> str:
    text = prefix.decode("latin-1") if isinstance(prefix, bytes) else prefix
    return text if _SHOWABLE.fullmatch(text) else "limit"


def key_digest(key: "str | bytes") -> bytes:
    """The key as stored and logged: BLAKE2b, 128 bits (keys are often API keys).

    A ``str`` is its UTF-8 bytes, lone surrogates included (``surrogatepass``),
    so ``"k"`` and ``b"k"`` are one key; ``bytes`` are hashed as they are.
    The short keys seen lately are remembered (a hash costs ~0.4 us, the
    lookup a tenth of that); long ones are not, so that memory stays small.
    """
    return _remembered_digest(key) if len(key) <= _REMEMBERED_KEY_CHARS else _digest(key)


def _digest(key: "str | bytes") -> bytes:
    raw = key.encode("utf-8", "surrogatepass") if isinstance(key, str) else key
    return hashlib.blake2b(raw, digest_size=16).digest()


_REMEMBERED_KEY_CHARS = 128
_remembered_digest = functools.lru_cache(maxsize=16384)(_digest)  # at most ~4 MB per process


def charge_amount(amount: object) -> float:
    """``amount`` checked for ``charge``: a finite number from 0 to 2**53 (else ValueError)."""
    if not isinstance(amount, (int, float)) or isinstance(amount, bool) or not 0 <= amount <= MAX_CHARGE:
        raise ValueError(f"charge amount must be a number from 0 to 2**53: {amount!r:.40}")
    return float(amount)


def _number(name: str, value: object) -> float:
    """``value`` as a finite float; a bool, a non-number, nan, inf or an int no float holds is a ValueError."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            number = float(value)
        except OverflowError:
            number = math.inf
        if math.isfinite(number):
            return number
    raise ValueError(f"Limit {name} must be a finite number: {value!r:.40}")


def _positive(name: str, value: object) -> float:
    number = _number(name, value)
    if number <= 0:
        raise ValueError(f"Limit {name} must be a finite number above 0: {value!r}")
    return number


State = Tuple[float, float]  # a limit as stored: its TAT, and the time it was written (its stamp)


def current(state: State | None, now: float) -> float:
    """The TAT as of ``now``: never before now, never further ahead than when it was written."""
    if state is None:
        return now
    tat, stamp = state
    if stamp > now:  # the clock went back: so does the TAT
        tat -= stamp - now
    return tat if tat > now else now


def live(state: State, per: float, now: float) -> bool:
    """Whether a stored limit must be kept: its bucket is not full again, or it was written less than ``per`` ago."""
    tat, stamp = state
    return tat >= now or stamp + per >= now


class Decision(NamedTuple):
    """The outcome for all of a request's limits together."""

    allowed: bool
    retry_after: float  # seconds until the request would pass (0 when allowed)
    ahead: tuple[float, ...]  # per limit: how far its TAT is ahead of now afterwards (seconds)


def decide(limits: Sequence[Limit], ids: Sequence[object], stored: Mapping[object, State | None],
           now: float) -> tuple[Decision, dict]:
    """All limits take their cost, or none does. Returns the decision and the TATs to write, by id.

    ``ids[i]`` is where ``limits[i]`` is stored: limits with one id (one key,
    rate and per) take their costs one after the other. Allowed, every limit
    is written (a ``cost=0`` one too: the store then knows it, for charges);
    refused, only those read before their stamp (moved back for good).
    """
    tats: dict = {}
    wait = 0.0
    for id_, limit in zip(ids, limits):
        tat = tats.get(id_)
        tat = (current(stored[id_], now) if tat is None else tat) + limit.step
        tats[id_] = tat
        if tat - limit.reach - now > wait:
            wait = tat - limit.reach - now
    if wait > 0:
        tats = {id_: current(stored[id_], now) for id_ in tats}
        writes = {id_: tats[id_] for id_, state in stored.items() if state is not None and state[1] > now}
    else:
        writes = tats
    return Decision(wait <= 0, wait, tuple([tats[id_] - now for id_ in ids])), writes


def charged(state: State | None, interval: float, amount: float, now: float) -> float:
    """The TAT after ``amount`` units were taken after the fact (no check: it may run past the tolerance)."""
    return min(current(state, now) + min(amount * interval, HORIZON), now + HORIZON)


def headers(limits: Sequence[Limit], decision: Decision) -> list[tuple[str, str]]:
    """``RateLimit-Policy`` and ``RateLimit`` (IETF httpapi-ratelimit-headers) for the tightest limit.

    The tightest is the one with the smallest share of its burst left;
    ``r`` is what it has left now, ``t`` the seconds until it is full again.
    """
    best, best_share, best_left = 0, 2.0, 0
    for i, (limit, ahead) in enumerate(zip(limits, decision.ahead)):
        room = (limit.tolerance - ahead) / limit.interval if limit.interval else limit.burst
        left = max(0, math.floor(room + _SLACK))
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
