"""A rate-limited gateway for the end-to-end tests.

The client picks its limits (a test-only liberty): X-Key the key, X-Limit
"rate/per[/burst]" for requests, X-Budget "rate/per" for a token budget that
is only checked (cost 0) and charged afterwards from the upstream's
X-Tokens header (buffered) or the usage of the final SSE chunk (streamed).
X-Also "name" adds a second request limit "name:KEY" (5/60) for the
all-or-nothing test. Every reply says which worker answered (X-Worker).
"""
import json
import os

from forkproxy import Limit, Proxy
from forkproxy.sse import event_data

SETTINGS = {}
for key, env, kind in (("limits_timeout", "TEST_LIMITS_TIMEOUT", float),):
    if os.environ.get(env):
        SETTINGS[key] = kind(os.environ[env])
if os.environ.get("FORKPROXY_LIMITS_STORE"):
    SETTINGS["limits_store"] = os.environ["FORKPROXY_LIMITS_STORE"]  # as a gateway of one's own passes it on
if os.environ.get("TEST_FAIL_CLOSED"):
    SETTINGS["limits_fail_open"] = False


def _spec(text):
    rate, per, *burst = (float(part) for part in text.split("/"))
    return rate, per, (burst[0] if burst else None)


class Limited(Proxy):
    def rate_limits(self, req):
        key = req.headers.get("X-Key", "anonymous")
        limits = []
        if "X-Limit" in req.headers:
            rate, per, burst = _spec(req.headers["X-Limit"])
            limits.append(Limit("req:" + key, rate, per, burst))
        if "X-Also" in req.headers:
            limits.append(Limit(req.headers["X-Also"] + ":" + key, 5, 60))
        if "X-Budget" in req.headers:
            rate, per, _ = _spec(req.headers["X-Budget"])
            limits.append(Limit("tok:" + key, rate, per, cost=0))
        return limits

    def after_forward(self, req, ures, res):
        res.headers["X-Worker"] = str(os.getpid())
        if "X-Budget" in req.headers and ures.status == 200:
            self.charge("tok:" + req.headers.get("X-Key", "anonymous"), int(ures.headers.get("X-Tokens", "0")))

    def on_stream_chunk(self, chunk, out, stats):
        data = event_data(chunk)
        if data and data.startswith(b"{"):
            usage = json.loads(data).get("usage")
            if usage:
                stats.meta["usage"] = usage
        out.write(chunk)

    def on_stream_end(self, req, out, stats):
        usage = stats.meta.get("usage") or {}
        if "X-Budget" in req.headers:
            self.charge("tok:" + req.headers.get("X-Key", "anonymous"), usage.get("total_tokens", 0))


app = Limited(os.environ["TEST_UPSTREAM"], **SETTINGS)
