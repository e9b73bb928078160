"""The ``redis://`` store: counts shared by every forkproxy host that names the same Redis.

The official ``redis`` client, one connection pool per worker process (made
after the fork), socket timeouts at ``limits_timeout`` and no client-side
retries (a slow Redis must cost a request at most one timeout). The GCRA
step runs on the server, atomically, for all of a request's limits in one
round trip: a Lua script (``gcra.decide`` in Lua), loaded once and sent by
its SHA; redis-py's ``Script`` loads it again when the server answers
NOSCRIPT (a restart, SCRIPT FLUSH, a failover). The time is the server's
(``TIME``), so hosts whose clocks differ still agree, and a step of that
clock is met as ``gcra`` meets one (the TAT is stored with its stamp).

Each key is a hash (``fpl:`` and the key's digest) with one field per limit
(``rate/per``) holding ``"TAT stamp"``, so a charge by key finds all of the
key's limits in one HGETALL; the hash expires once none of its limits is
``live`` (the longest of their TATs and ``per`` since they were written).
"""
from __future__ import annotations

import os
from typing import Any, Sequence

from forkproxy.limits.gcra import HORIZON, Decision, Limit, key_digest

# gcra.current, gcra.live's keep-until and the write of one limit, shared by both scripts.
_PRELUDE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local H = %r
local function parse(value)
  if not value then return nil end
  local tat, stamp = string.match(value, '^(%%S+) (%%S+)$')
  return tonumber(tat), tonumber(stamp)
end
local function current(value)
  local tat, stamp = parse(value)
  if not tat or not stamp then return now, false end
  if stamp > now then tat = tat - (stamp - now) end
  return math.max(tat, now), stamp > now
end
local function write(key, field, tat, per)
  redis.call('HSET', key, field, string.format('%%.6f %%.6f', tat, now))
  local keep = math.ceil((math.max(tat, now + per) - now) * 1000) + 1000
  if redis.call('PTTL', key) < keep then redis.call('PEXPIRE', key, keep) end
end
""" % HORIZON

# KEYS: one per limit (repeated for limits of one key); ARGV: field, step, reach, per for each.
_TAKE = _PRELUDE + """
local tats, first, shifted, order, wait = {}, {}, {}, {}, 0
for i, key in ipairs(KEYS) do
  local field = ARGV[4*i-3]
  local id = key .. ' ' .. field
  if tats[id] == nil then
    first[id], shifted[id] = current(redis.call('HGET', key, field))
    tats[id] = first[id]
    order[#order + 1] = {key, field, id, tonumber(ARGV[4*i])}
  end
  tats[id] = tats[id] + tonumber(ARGV[4*i-2])
  wait = math.max(wait, tats[id] - tonumber(ARGV[4*i-1]) - now)
end
local allowed = wait <= 0
if not allowed then tats = first end
for _, o in ipairs(order) do
  if allowed or shifted[o[3]] then write(o[1], o[2], tats[o[3]], o[4]) end
end
local out = {allowed and 1 or 0, string.format('%.6f', math.max(wait, 0))}
for i, key in ipairs(KEYS) do
  out[#out + 1] = string.format('%.6f', tats[key .. ' ' .. ARGV[4*i-3]] - now)
end
return out
"""

# KEYS[1]: the key's hash; ARGV: amount, then field, interval, per of one limit, or '' for every live one.
_CHARGE = _PRELUDE + """
local amount = tonumber(ARGV[1])
local function charge(field, value, interval, per)
  local tat = current(value)
  write(KEYS[1], field, math.min(tat + math.min(amount * interval, H), now + H), per)
end
if ARGV[2] ~= '' then
  charge(ARGV[2], redis.call('HGET', KEYS[1], ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]))
  return 1
end
local taken, all = 0, redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  local rate, per = string.match(all[i], '^(%S+)/(%S+)$')
  rate, per = tonumber(rate), tonumber(per)
  local tat, stamp = parse(all[i + 1])
  if rate and per and tat and stamp and (tat >= now or stamp + per >= now) then
    charge(all[i], all[i + 1], math.min(per / rate, H), per)
    taken = taken + 1
  end
end
return taken
"""


class RedisStore:
    def __init__(self, url: str, timeout: float) -> None:
        self.url = url
        self.timeout = timeout
        self._client: Any = None
        self._pid = 0

    def _scripts(self) -> tuple[Any, Any]:
        if self._client is None or self._pid != os.getpid():
            import redis
            from redis.backoff import NoBackoff
            from redis.retry import Retry

            client = redis.Redis.from_url(self.url, socket_timeout=self.timeout,
                                          socket_connect_timeout=self.timeout, retry=Retry(NoBackoff(), 0),
                                          retry_on_timeout=False, health_check_interval=0)
            self._client, self._pid = client, os.getpid()
            self._take, self._charge = client.register_script(_TAKE), client.register_script(_CHARGE)
        return self._take, self._charge

    def take(self, limits: Sequence[Limit]) -> Decision:
        take, _ = self._scripts()
        args: list[str] = []
        for limit in limits:
            args += (_field(limit), repr(limit.step), repr(limit.reach), repr(limit.per))
        allowed, wait, *ahead = take(keys=[_key(limit.key) for limit in limits], args=args)
        return Decision(int(allowed) == 1, float(wait), tuple(float(a) for a in ahead))

    def charge(self, limit: Limit, amount: float) -> None:
        _, charge = self._scripts()
        charge(keys=[_key(limit.key)], args=[repr(amount), _field(limit), repr(limit.interval), repr(limit.per)])

    def charge_key(self, key: "str | bytes", amount: float) -> int:
        _, charge = self._scripts()
        return int(charge(keys=[_key(key)], args=[repr(amount), "", "", ""]))


def _key(key: "str | bytes") -> str:
    return "fpl:" + key_digest(key).hex()


def _field(limit: Limit) -> str:
    return f"{limit.rate!r}/{limit.per!r}"
