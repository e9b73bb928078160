"""An LLM gateway over upstream pools: two deployments of one model, and a backup provider.

    LLM_MODEL=llama-3-70b LLM_DEPLOYMENTS=http://10.0.0.5:8000,http://10.0.0.6:8000 \\
    LLM_BACKUP=https://api.provider.example LLM_CLIENT_KEYS=team-a-key LLM_UPSTREAM_KEY=sk-... \\
        gunicorn -c gunicorn.conf.py examples.llm_pools:app

- requests for LLM_MODEL go to its pool: the deployments share the traffic by
  fewest requests and open streams in flight (``least_busy``: completions are
  long and of very different lengths, so turns alone would pile streams on one);
- a deployment that refuses connections, times out or answers 502/503/504 is
  marked down for 10 s (doubling while it keeps failing, up to 5 min) and the
  request moves to the other before any byte reached the client;
- the backup provider gets traffic only while both deployments are down;
- 429 and 503 are retried on another member; a completion that may have been
  generated (a reset or a timeout after the body went out) is never sent twice;
- other models go to LLM_BACKUP directly.
"""
import json
import os

from forkproxy import Proxy, RetryPolicy, Upstream, UpstreamPool

UNAUTHORIZED = {"error": {"message": "invalid or missing API key", "type": "unauthorized"}}


class PooledLLMGateway(Proxy):
    model = ""
    pool: UpstreamPool | None = None
    client_keys: frozenset = frozenset()
    upstream_key = ""

    def before_forward(self, req, res, ureq):
        key = req.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        if key not in self.client_keys:
            res.status, res.body = 401, json.dumps(UNAUTHORIZED)
            res.headers["Content-Type"] = "application/json"
            return True
        ureq.headers["Authorization"] = f"Bearer {self.upstream_key}"
        body = req.json()
        req.ivars["model"] = body.get("model", "") if isinstance(body, dict) else ""
        return False

    def pick_upstream(self, req):
        return self.pool if req.ivars.get("model") == self.model else self.upstream

    def stream_request(self, req):
        body = req.json()
        return isinstance(body, dict) and body.get("stream") is True

    def retry_policy(self, req):
        return RetryPolicy(max_attempts=3, base_backoff_ms=100, retry_on_status=(429, 503), jitter=True)


def from_env(env=os.environ) -> PooledLLMGateway:
    deployments = [url.strip() for url in env["LLM_DEPLOYMENTS"].split(",") if url.strip()]
    gateway = PooledLLMGateway(env["LLM_BACKUP"], timeout=float(env.get("LLM_TIMEOUT", 120)))
    gateway.model = env["LLM_MODEL"]
    gateway.pool = UpstreamPool([*deployments, Upstream(env["LLM_BACKUP"], backup=True)], balance="least_busy",
                                fail_timeout=float(env.get("LLM_FAIL_TIMEOUT", 10)))
    gateway.client_keys = frozenset(k.strip() for k in env.get("LLM_CLIENT_KEYS", "").split(",") if k.strip())
    gateway.upstream_key = env.get("LLM_UPSTREAM_KEY", "")
    return gateway


try:
    app = from_env()
except KeyError as missing:
    raise SystemExit(f"examples.llm_pools: set {missing.args[0]}, e.g. LLM_DEPLOYMENTS=http://10.0.0.5:8000") from None
