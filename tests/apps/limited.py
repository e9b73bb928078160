"""A rate-limited gateway for the end-to-end tests.

The client picks its limits (a test-only liberty): X-Key the key (or the
"key" of a JSON body, which may hold any code point; X-Bytes-Key: 1 makes
it bytes), X-Limit "rate/per[/burst[/cost]]" for requests (several, comma
separated, are several Limits on the one key), X-Budget "rate/per" for a
token budget that is only checked (cost 0) and charged afterwards with the
upstream's X-Tokens header (JSON: a number, Infinity, a huge integer) when
buffered, or the usage of the final SSE chunk when streamed. X-Charge
"limit" charges the budget's Limit itself instead of its key; any other
X-Charge "name" charges the key "name:KEY". X-Also "name" adds a second
request limit "name:KEY" (5/60) for the all-or-nothing test. Every reply
says which worker answered (X-Worker).

TEST_LIMITS_MAP_SIZE shrinks the local store's map (so a test fills it in
seconds); TEST_CLOCK_FILE holds seconds added to the local store's clock
(so a test steps it).
"""
import json
import os
import time

from forkproxy import Limit, Proxy
from forkproxy.limits import local
from forkproxy.sse import event_data

SETTINGS = {}
for key, env, kind in (("limits_timeout", "TEST_LIMITS_TIMEOUT", float),):
    if os.environ.get(env):
        SETTINGS[key] = kind(os.environ[env])
if os.environ.get("FORKPROXY_LIMITS_STORE"):
    SETTINGS["limits_store"] = os.environ["FORKPROXY_LIMITS_STORE"]  # as a gateway of one's own passes it on
if os.environ.get("TEST_FAIL_CLOSED"):
    SETTINGS["limits_fail_open"] = False
if os.environ.get("TEST_LIMITS_MAP_SIZE"):
    local.MAP_SIZE = int(os.environ["TEST_LIMITS_MAP_SIZE"])
if os.environ.get("TEST_CLOCK_FILE"):
    def stepped_clock(path=os.environ["TEST_CLOCK_FILE"]):
        with open(path) as file:
            return time.time() + float(file.read() or 0)
    local.clock = stepped_clock


def _spec(text):
    rate, per, burst, cost = ([float(part) for part in text.split("/")] + [None, None])[:4]
    return rate, per, burst, (1 if cost is None else cost)


def _key(req, prefix):
    body = req.json() if req.body else None
    key = prefix + ":" + (body["key"] if isinstance(body, dict) else req.headers.get("X-Key", "anonymous"))
    return key.encode("utf-8", "surrogatepass") if req.headers.get("X-Bytes-Key") else key


def _budget(req):
    rate, per, _, _ = _spec(req.headers["X-Budget"])
    return Limit(_key(req, "tok"), rate, per, cost=0)


class Limited(Proxy):
    def rate_limits(self, req):
        limits = []
        for spec in filter(None, req.headers.get("X-Limit", "").split(",")):
            rate, per, burst, cost = _spec(spec)
            limits.append(Limit(_key(req, "req"), rate, per, burst, cost))
        if "X-Also" in req.headers:
            limits.append(Limit(_key(req, req.headers["X-Also"]), 5, 60))
        if "X-Budget" in req.headers:
            limits.append(_budget(req))
        return limits

    def after_forward(self, req, ures, res):
        res.headers["X-Worker"] = str(os.getpid())
        if ures.status == 200:
            self._charge(req, json.loads(ures.headers.get("X-Tokens", "0")))

    def on_stream_chunk(self, chunk, out, stats):
        data = event_data(chunk)
        if data and data.startswith(b"{"):
            usage = json.loads(data).get("usage")
            if usage:
                stats.meta["usage"] = usage
        out.write(chunk)

    def on_stream_end(self, req, out, stats):
        usage = stats.meta.get("usage") or {}
        self._charge(req, usage.get("total_tokens", 0))

    def _charge(self, req, amount):
        how = req.headers.get("X-Charge")
        if how == "limit":
            self.charge(_budget(req), amount)
        elif how or "X-Budget" in req.headers:
            self.charge(_key(req, how or "tok"), amount)


app = Limited(os.environ["TEST_UPSTREAM"], **SETTINGS)
