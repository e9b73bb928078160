"""The ``redis://`` store: counts shared by every forkproxy host that names the same Redis.

The official ``redis`` client, one connection pool per worker process (made
after the fork), socket timeouts at ``limits_timeout`` and no client-side
retries (a slow Redis must cost a request at most one timeout). The GCRA
step runs on the server, atomically, for all of a request's limits in one
round trip: a Lua script (``gcra.decide`` in Lua), loaded once and sent by
its SHA; redis-py's ``Script`` loads it again when the server answers
NOSCRIPT (a restart, SCRIPT FLUSH, a failover). The time is the server's
(``TIME``), so hosts whose clocks differ still agree. Each key is a hash
(``tat``, ``iv``) that expires once its bucket is full again.
"""
from __future__ import annotations

import os
from typing import Any, Sequence

from .gcra import Decision, Limit

_TAKE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local wait, before, after = 0, {}, {}
for i, key in ipairs(KEYS) do
  local interval, tolerance, cost = tonumber(ARGV[3*i-2]), tonumber(ARGV[3*i-1]), tonumber(ARGV[3*i])
  local tat = tonumber(redis.call('HGET', key, 'tat')) or now
  if tat < now then tat = now end
  before[i] = tat
  after[i] = tat + cost * interval
  wait = math.max(wait, after[i] - tolerance - now)
end
local allowed = wait <= 0
local out = {allowed and 1 or 0, string.format('%.6f', math.max(wait, 0))}
for i, key in ipairs(KEYS) do
  local tat = before[i]
  if allowed then
    tat = after[i]
    if tonumber(ARGV[3*i]) > 0 then
      redis.call('HSET', key, 'tat', string.format('%.6f', tat), 'iv', ARGV[3*i-2])
      redis.call('PEXPIRE', key, math.ceil((tat - now) * 1000) + 1000)
    end
  end
  out[#out + 1] = string.format('%.6f', tat - now)
end
return out
"""

_CHARGE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local interval = tonumber(ARGV[1]) or tonumber(redis.call('HGET', KEYS[1], 'iv'))
if not interval then return 0 end
local tat = tonumber(redis.call('HGET', KEYS[1], 'tat')) or now
if tat < now then tat = now end
tat = tat + tonumber(ARGV[2]) * interval
redis.call('HSET', KEYS[1], 'tat', string.format('%.6f', tat), 'iv', tostring(interval))
redis.call('PEXPIRE', KEYS[1], math.ceil((tat - now) * 1000) + 1000)
return 1
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

    def take(self, ids: Sequence[str], limits: Sequence[Limit]) -> Decision:
        take, _ = self._scripts()
        args: list[Any] = []
        for limit in limits:
            args += (repr(limit.interval), repr(limit.tolerance), repr(float(limit.cost)))
        allowed, wait, *ahead = take(keys=list(ids), args=args)
        return Decision(int(allowed) == 1, float(wait), tuple(float(a) for a in ahead))

    def charge(self, id_: str, interval: float | None, amount: float) -> None:
        _, charge = self._scripts()
        charge(keys=[id_], args=["" if interval is None else repr(interval), repr(float(amount))])
