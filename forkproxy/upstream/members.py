"""Upstreams: base URLs, pool members, pools, and one request's way through a pool.

Balancing and health are kept per pool and per worker process (as nginx keeps
them without a shared zone): a pool is a long-lived object, built once at
import, and each gunicorn worker holds its own copy of its state.
"""
from __future__ import annotations

import functools
import logging
import time
from typing import Callable, Collection, Iterable, NamedTuple

from urllib3.util import parse_url

from forkproxy.errors import NoLiveUpstream
from forkproxy.metrics import metrics
from forkproxy.upstream.balance import SmoothWeighted, least_busy
from forkproxy.upstream.health import Health, Rules

log = logging.getLogger("forkproxy")

BALANCES = ("round_robin", "least_busy")


class BaseURL(NamedTuple):
    """An upstream base URL split into what a connection pool needs."""

    scheme: str
    host: str
    port: int
    prefix: str
    host_port: str  # a member's name unless it was given one
    origin: str  # how ures.upstream and error messages name it

    def join(self, path: str) -> str:
        """The request target on the upstream: prefix + path."""
        return self.prefix + path


@functools.lru_cache(maxsize=256)
def parse_base_url(url: str) -> BaseURL:
    """Parse and check a base URL; the cache keeps this off the hot path."""
    try:
        parsed = parse_url(url)
    except Exception as exc:  # urllib3 raises LocationParseError and friends
        raise ValueError(f"not a valid upstream URL: {url!r} ({exc})") from None
    scheme = (parsed.scheme or "").lower()
    if scheme not in ("http", "https") or not parsed.host:
        raise ValueError(f"upstream URL must be http:// or https:// with a host: {url!r}")
    if parsed.query or parsed.fragment or parsed.auth:
        raise ValueError(f"upstream URL takes no query, fragment or credentials: {url!r}")
    port = parsed.port or (443 if scheme == "https" else 80)
    host = parsed.host.strip("[]")
    host_port = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return BaseURL(scheme, host, port, (parsed.path or "").rstrip("/"), host_port, f"{scheme}://{host_port}")


class Upstream:
    """One member of a pool: a base URL, its share of the traffic, whether it is a backup, its name, its data.

    ``name`` (host:port unless given) is how logs, metrics and
    ``ures.upstream_name`` name the member, so that two deployments on one
    origin (one model each) can be told apart. ``meta`` is the user's own
    per-member data (a key, a model), handed to ``before_attempt`` as it is.
    """

    __slots__ = ("url", "weight", "backup", "base", "name", "meta")

    def __init__(self, url: str, weight: int = 1, backup: bool = False, name: str | None = None,
                 meta: dict | None = None) -> None:
        if isinstance(weight, bool) or not isinstance(weight, int) or weight < 1:
            raise ValueError(f"Upstream weight must be a whole number of at least 1: {weight!r}")
        try:
            self.base = parse_base_url(url)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"Upstream url: {exc}") from None
        if name is not None and (not isinstance(name, str) or not name or not name.isprintable()):
            raise ValueError(f"Upstream name must be a non-empty string of printable characters: {name!r}")
        if meta is not None and not isinstance(meta, dict):
            raise ValueError(f"Upstream meta must be a dict: {meta!r:.100}")
        self.url, self.weight, self.backup = url, weight, bool(backup)
        self.name = self.base.host_port if name is None else name
        self.meta: dict = {} if meta is None else meta

    def __repr__(self) -> str:
        extra = (f", weight={self.weight}" if self.weight != 1 else "") + (", backup=True" if self.backup else "")
        extra += f", name={self.name!r}" if self.name != self.base.host_port else ""
        return f"Upstream({self.url!r}{extra})"


class UpstreamPool:
    """Members that share a request's traffic: balanced, watched (passive health), failed over."""

    def __init__(self, members: Iterable[Upstream | str], balance: str = "round_robin", max_fails: int = 1,
                 fail_timeout: float = 10, max_fail_timeout: float = 300,
                 fail_on_status: Collection[int] = (502, 503, 504)) -> None:
        self.members = [m if isinstance(m, Upstream) else Upstream(m) for m in _listed(members)]
        if not self.members:
            raise ValueError("UpstreamPool members: give at least one upstream")
        _names_unique(self.members)
        if balance not in BALANCES:
            raise ValueError(f"UpstreamPool balance must be one of {', '.join(BALANCES)}: {balance!r}")
        _at_least("max_fails", max_fails, 1, whole=True)
        _at_least("fail_timeout", fail_timeout, 0)
        _at_least("max_fail_timeout", max_fail_timeout, fail_timeout)
        self.balance = balance
        self.rules = Rules(max_fails, float(fail_timeout), float(max_fail_timeout))
        self.fail_on_status = frozenset(fail_on_status)
        self.health = [Health() for _ in self.members]
        self.in_flight = [0] * len(self.members)
        self.down = 0  # members not live: while none is, choosing skips the health checks
        self._order = SmoothWeighted([m.weight for m in self.members])
        self._primaries = [i for i, m in enumerate(self.members) if not m.backup]
        self._backups = [i for i, m in enumerate(self.members) if m.backup]
        self._announced = False

    def __repr__(self) -> str:
        return f"UpstreamPool({self.members!r}, balance={self.balance!r})"

    def route(self) -> "PoolRoute":
        return PoolRoute(self)

    # -- for PoolRoute -------------------------------------------------------

    def choose(self, tried: Collection[int], now: float) -> int | None:
        """The member for a request's next attempt; None once every member that may take one was tried for it.

        Primaries not tried yet come first, balanced; then the backups not
        tried yet, in their order (as nginx: a backup takes a request once
        every primary was tried for it or is down). ``NoLiveUpstream`` when
        no member may take a request.
        """
        if not self._announced:
            self._announce()
        primaries, backups = self.available(now)
        if not primaries and not backups:
            raise NoLiveUpstream("every upstream of the pool is marked down; none was contacted")
        fresh = [i for i in primaries if i not in tried] if tried else primaries
        if fresh:
            return self._balanced(fresh)
        return next((i for i in backups if i not in tried), None)

    def again(self, order: list[int], turn: int, now: float) -> int:
        """Once every member that may take the request was tried: the next of ``order`` that still may, from ``turn``."""
        primaries, backups = self.available(now)
        n = len(order)
        for k in range(n):
            i = order[(turn + k) % n]
            if i in primaries or i in backups:
                return i
        raise NoLiveUpstream("every upstream of the pool is marked down; none was contacted")

    def take(self, i: int, now: float) -> bool:
        """Member ``i`` is given an attempt: counted in flight; True when that attempt is its trial."""
        self.in_flight[i] += 1
        return self.health[i].chosen(now)

    def done(self, i: int) -> None:
        """An attempt of member ``i`` is over: no longer counted in flight."""
        self.in_flight[i] -= 1

    def untried_available(self, tried: Collection[int], now: float) -> bool:
        """Whether a member not in ``tried`` may take a request now."""
        primaries, backups = self.available(now)
        return any(i not in tried for i in primaries) or any(i not in tried for i in backups)

    def available(self, now: float) -> tuple[list[int], list[int]]:
        """The primaries and the backups that may take a request now (live, or due for their trial)."""
        if not self.down:
            return self._primaries, self._backups  # the common case: nobody is down
        health = self.health
        return ([i for i in self._primaries if health[i].available(now)],
                [i for i in self._backups if health[i].available(now)])

    def _balanced(self, candidates: list[int]) -> int:
        if len(candidates) == 1:
            return candidates[0]
        if self.balance == "least_busy":
            return least_busy(candidates, self.in_flight, self._order)
        return self._order.pick(candidates)

    def failed(self, i: int, reason: str, trial: bool, now: float) -> None:
        if len(self.members) == 1:
            return  # a pool of one is never marked down: there is nowhere else to go
        health = self.health[i]
        was_live = health.live
        period = health.failed(now, self.rules, trial)
        if period is not None:
            self.down += was_live
            log.warning("upstream %s marked down for %gs (time %d in a row): %s", self.members[i].name,
                        period, health.ejections, reason)
            self._report(i, live=False)

    def succeeded(self, i: int, trial: bool, now: float) -> None:
        down_for = self.health[i].succeeded(now, trial)
        if down_for is not None:
            self.down -= 1
            log.info("upstream %s live again after %.1fs down", self.members[i].name, down_for)
            self._report(i, live=True)

    def _announce(self) -> None:
        self._announced = True
        for i in range(len(self.members)):
            self._report(i, live=self.health[i].live, counted=False)

    def _report(self, i: int, *, live: bool, counted: bool = True) -> None:
        counters = metrics()
        if counters.enabled:
            counters.member_state(self.members[i].name, live, counted=counted)


@functools.lru_cache(maxsize=256)
def fixed_route(url: str) -> "FixedRoute":
    """The route to one base URL; it keeps no state, so one serves every request (and its ``Upstream``)."""
    return FixedRoute(Upstream(url))


class FixedRoute:
    """A request to one base URL: every attempt goes there, and no health is kept."""

    __slots__ = ("member",)

    def __init__(self, member: Upstream) -> None:
        self.member = member

    def next(self) -> Upstream:
        return self.member

    def repeat(self) -> Upstream:
        return self.member

    def can_fail_over(self) -> bool:
        return False

    def can_move_on(self) -> bool:
        return False

    def failed(self, reason: str) -> None:
        pass

    def abandoned(self) -> None:
        pass

    def judged(self) -> None:
        pass

    def answered(self, status: int) -> None:
        pass

    def done(self) -> None:
        pass

    def done_later(self) -> Callable[[], None] | None:
        return None  # nothing is counted in flight


class PoolRoute:
    """One request's way through a pool: the members tried so far, in order, and the one in use."""

    __slots__ = ("pool", "tried", "turn", "current", "trial")

    def __init__(self, pool: UpstreamPool) -> None:
        self.pool = pool
        self.tried: list[int] = []  # each member once, in the order first tried
        self.turn = 0  # once every member was tried: where in ``tried`` the next round goes on
        self.current = -1
        self.trial = False

    def next(self) -> Upstream:
        """The member for the next attempt: one not tried yet while one may take it, else the tried again in order."""
        now = time.monotonic()
        chosen = self.pool.choose(self.tried, now)
        if chosen is None:
            chosen = self.pool.again(self.tried, self.turn, now)
            self.turn = self.tried.index(chosen) + 1
        else:
            self.tried.append(chosen)
        return self._take(chosen, now)

    def repeat(self) -> Upstream:
        """The member tried last, once more."""
        return self._take(self.current, time.monotonic())

    def _take(self, i: int, now: float) -> Upstream:
        self.current, self.trial = i, self.pool.take(i, now)
        return self.pool.members[i]

    def can_fail_over(self) -> bool:
        """Whether a failed connect can move to a member not tried yet (it sent nothing)."""
        return self.pool.untried_available(self.tried, time.monotonic())

    def can_move_on(self) -> bool:
        """Whether a member other than the one tried last may take the request now (``"fail_over"``)."""
        primaries, backups = self.pool.available(time.monotonic())
        return any(i != self.current for i in primaries) or any(i != self.current for i in backups)

    def failed(self, reason: str) -> None:
        self.pool.failed(self.current, reason, self.trial, time.monotonic())

    def judged(self) -> None:
        """``judge_reply`` sent the request on: the member answered, so a trial makes it live; no failure counts."""
        self.pool.succeeded(self.current, self.trial, time.monotonic())

    def abandoned(self) -> None:
        """The attempt ended before anything was sent, not the member's doing: no verdict, no longer in flight."""
        self.pool.health[self.current].released(self.trial)
        self.done()

    def answered(self, status: int) -> None:
        if status in self.pool.fail_on_status:
            self.failed(f"answered {status}")
        else:
            self.pool.succeeded(self.current, self.trial, time.monotonic())

    def done(self) -> None:
        """The attempt's exchange is over (failed, or its reply read or abandoned)."""
        self.pool.done(self.current)

    def done_later(self) -> Callable[[], None] | None:
        """``done`` for the attempt under way, bound to its member: for its reply's release.

        A reply not relayed is drained only after the next member was chosen
        (``current`` has moved on), and must still come off its own member's count.
        """
        return functools.partial(self.pool.done, self.current)


def _names_unique(members: list[Upstream]) -> None:
    """Names are how logs and metrics tell members apart: two alike would be one there."""
    seen: set[str] = set()
    for member in members:
        if member.name in seen:
            raise ValueError(f"UpstreamPool members: the name {member.name!r} is given twice; "
                             "give each member its own name=")
        seen.add(member.name)


def _listed(members: Iterable[Upstream | str]) -> list[Upstream | str]:
    if isinstance(members, (str, Upstream)):
        raise ValueError("UpstreamPool members: give a list of upstreams, not one")
    return list(members)


def _at_least(name: str, value: float, minimum: float, whole: bool = False) -> None:
    kinds = (int,) if whole else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not value >= minimum:
        raise ValueError(f"UpstreamPool {name} must be {'a whole number' if whole else 'a number'} "
                         f"of at least {minimum:g}: {value!r}")
