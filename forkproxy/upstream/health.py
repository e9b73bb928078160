"""Passive health of one pool member, free of I/O (the clock is handed in).

nginx's ``max_fails`` within ``fail_timeout`` mark a member down; as in
Envoy's outlier detection, each consecutive time it is marked down it stays
down twice as long, up to ``max_fail_timeout``. When its time is up it gets
one trial request: success makes it live (and forgets the doubling),
failure marks it down again.
"""
from __future__ import annotations

from typing import NamedTuple


class Rules(NamedTuple):
    max_fails: int
    fail_timeout: float
    max_fail_timeout: float


class Health:
    """One member's state: live (counting failures), down until a time, or out on its trial."""

    __slots__ = ("fails", "window_start", "down_since", "down_until", "ejections", "trial_out")

    def __init__(self) -> None:
        self.fails = 0
        self.window_start = 0.0
        self.down_since = 0.0
        self.down_until = 0.0  # 0: live
        self.ejections = 0  # consecutive times marked down
        self.trial_out = False

    @property
    def live(self) -> bool:
        return not self.down_until

    def available(self, now: float) -> bool:
        """May take a request now: live, or due for its one trial."""
        return not self.down_until or (now >= self.down_until and not self.trial_out)

    def chosen(self, now: float) -> bool:
        """The member was given a request; True when that request is its trial."""
        if self.down_until and now >= self.down_until:
            self.trial_out = True
            return True
        return False

    def failed(self, now: float, rules: Rules, trial: bool) -> float | None:
        """A failed attempt; the seconds it is now down for when this marked it down, else None."""
        if self.down_until:
            if not trial:
                return None  # a request sent before it was marked down: already counted against it
            self.trial_out = False
            return self._mark_down(now, rules)
        if not self.fails or now - self.window_start > rules.fail_timeout:
            self.fails, self.window_start = 0, now
        self.fails += 1
        if self.fails < rules.max_fails:
            return None
        self.down_since = now
        return self._mark_down(now, rules)

    def succeeded(self, now: float, trial: bool) -> float | None:
        """A good answer; the seconds it had been down when this trial made it live again, else None."""
        if not (self.down_until and trial):
            return None
        down_for = now - self.down_since
        self.fails = self.ejections = 0
        self.down_until = 0.0
        self.trial_out = False
        return down_for

    def released(self, trial: bool) -> None:
        """A request given to the member ended before anything was sent: a trial goes to the next request."""
        if trial:
            self.trial_out = False

    def _mark_down(self, now: float, rules: Rules) -> float:
        self.ejections += 1
        self.fails = 0
        period = min(rules.fail_timeout * 2 ** (self.ejections - 1), rules.max_fail_timeout)
        self.down_until = now + period
        return period
