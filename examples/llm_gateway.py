"""An LLM gateway in front of OpenAI-compatible APIs.

    LLM_UPSTREAM=https://api.openai.com LLM_UPSTREAM_KEY=sk-... LLM_CLIENT_KEYS=team-a-key,team-b-key \\
        gunicorn -c gunicorn.conf.py examples.llm_gateway:app

or against the bundled demo upstream, with those variables set for it: ``scripts/serve examples.llm_gateway:app``.
LLM_UPSTREAM and LLM_CLIENT_KEYS are required: without one the start stops with a line naming it.

- clients present their own key; an unknown one gets 401 in the proxy's error shape;
- the real upstream key is swapped in, so clients never hold it;
- requests are routed by model: LLM_ROUTES="gpt-=https://api.openai.com,llama=http://10.0.0.5:8000"
  (model-name prefix = upstream; anything else goes to LLM_UPSTREAM);
- 429/503 ("not processed") are retried with backoff before any byte reaches the client; a
  completion that may have been generated (reset or timeout after sending) is never sent twice;
- every request writes one JSON line to LLM_USAGE_LOG (default: stderr) with the model,
  the client, the completion events streamed and the usage block, even when the
  client hung up mid-stream;
- per client key: LLM_RPM requests a minute (default 600) and LLM_TPM tokens a minute
  (default 1,000,000; 0 turns either off), shared by every worker and, with
  LLM_LIMITS_STORE=redis://host:6379/0, by every host. Tokens are charged from the
  usage the upstream reports (the final chunk of a stream), so a client that spent its
  budget gets 429 with Retry-After until it refills.
"""
import hashlib
import json
import os
import re
import sys
import time

from forkproxy import Limit, Proxy, RetryPolicy, refuse_start
from forkproxy.sse import event_data

REQUIRED = {"LLM_UPSTREAM": "https://api.openai.com", "LLM_CLIENT_KEYS": "team-a-key,team-b-key"}  # with an example
UNAUTHORIZED = {"error": {"message": "invalid or missing API key", "type": "unauthorized"}}
RETRIES = RetryPolicy(max_attempts=3, base_backoff_ms=250, retry_on_status=(429, 503), jitter=True)  # one for all
# An event whose delta carries text: counted without parsing each event's JSON (most events are one token).
CONTENT = re.compile(rb'"delta":\s*\{[^}]*"content":\s*"[^"]')


def parse_routes(spec: str) -> list[tuple[str, str]]:
    routes = [tuple(part.split("=", 1)) for part in spec.split(",") if "=" in part]
    return sorted(routes, key=lambda r: -len(r[0]))  # longest prefix first


class LLMGateway(Proxy):
    upstream_key = ""
    client_ids: dict = {}  # each client key -> the short hash that names it in limits and usage lines
    routes: list = []
    usage_log = None
    requests_per_minute = 600
    tokens_per_minute = 1_000_000

    # -- before the upstream --------------------------------------------------

    def before_forward(self, req, res, ureq):
        key = req.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        client = self.client_ids.get(key)
        if client is None:
            res.status = 401
            res.headers["Content-Type"] = "application/json"
            res.body = json.dumps(UNAUTHORIZED)
            return True
        req.ivars["client"] = client
        req.ivars["started"] = time.time()
        ureq.headers["Authorization"] = f"Bearer {self.upstream_key}"
        body = req.json()
        if isinstance(body, dict):
            req.ivars["model"] = body.get("model", "")
            if body.get("stream") and "stream_options" not in body:
                body["stream_options"] = {"include_usage": True}  # ask for the usage chunk
                ureq.body = json.dumps(body)
        return False

    def rate_limits(self, req):
        client = req.ivars["client"]  # a hash of the key; forkproxy hashes keys again before storing them
        limits = []
        if self.requests_per_minute:
            limits.append(Limit("rpm:" + client, rate=self.requests_per_minute, per=60))
        if self.tokens_per_minute:  # checked now (cost 0), charged when the upstream says what was used
            limits.append(Limit("tpm:" + client, rate=self.tokens_per_minute, per=60, cost=0))
        return limits

    def bill(self, req, usage):
        if self.tokens_per_minute and usage and "client" in req.ivars:
            self.charge("tpm:" + req.ivars["client"], usage.get("total_tokens", 0))

    def pick_upstream(self, req):
        model = req.ivars.get("model") or ""
        return next((url for prefix, url in self.routes if model.startswith(prefix)), self.upstream)

    def stream_request(self, req):
        body = req.json()
        return isinstance(body, dict) and body.get("stream") is True

    def retry_policy(self, req):
        # 429 and 503 say the upstream did not process the request: safe to send again. A reset
        # or a read timeout after the body went out may follow a completion that was generated
        # and billed, so those are retried for idempotent methods only, never for this POST;
        # a 502 from the upstream says nothing about that either, so it is not listed.
        return RETRIES

    # -- the stream ------------------------------------------------------------

    def on_stream_chunk(self, chunk, out, stats):
        out.write(chunk)  # the client first: never hold an event back for bookkeeping
        data = event_data(chunk)
        if not data or data == b"[DONE]":
            return
        if CONTENT.search(data):
            stats.meta["completion_events"] = stats.meta.get("completion_events", 0) + 1
        if b'"usage"' in data:  # only the usage chunk (or one that names it) is parsed
            stats.meta["usage"] = usage_of(data) or stats.meta.get("usage")

    def on_stream_end(self, req, out, stats):
        self.bill(req, stats.meta.get("usage"))
        self.record(req, streamed=True, events=stats.meta.get("completion_events", 0),
                    usage=stats.meta.get("usage"), errored=stats.errored,
                    client_disconnected=stats.client_disconnected)

    # -- buffered replies --------------------------------------------------------

    def after_forward(self, req, ures, res):
        if "client" not in req.ivars:
            return  # refused before it was ours to bill
        usage = usage_of(res.body) if ures.status == 200 else None
        self.bill(req, usage)
        self.record(req, streamed=False, status=res.status, usage=usage,
                    error=ures.error.type if ures.error else None)

    def record(self, req, **fields):
        line = {"ts": round(time.time(), 3), "model": req.ivars.get("model"), "client": req.ivars.get("client"),
                "path": req.path, "retries": req.ivars.get("proxy_retry_count", 0),
                "seconds": round(time.time() - req.ivars.get("started", time.time()), 3), **fields}
        text = json.dumps(line) + "\n"
        if self.usage_log:
            os.write(self.usage_fd(), text.encode())  # one O_APPEND write per line: workers' lines never interleave
        else:
            sys.stderr.write(text)

    def usage_fd(self) -> int:
        """The usage log, opened once per worker process (after the fork) for appending."""
        if self._usage_fd is None or self._usage_pid != os.getpid():
            self._usage_fd = os.open(self.usage_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            self._usage_pid = os.getpid()
        return self._usage_fd

    _usage_fd: int | None = None
    _usage_pid = 0


def usage_of(body: bytes) -> dict | None:
    """The ``usage`` object of a completion or chunk, decoded alone: the rest of the body is not parsed.

    It is the body's last top-level field in OpenAI's shape; a body where it
    is not (or that is not JSON) is parsed whole.
    """
    at = body.rfind(b'"usage"')
    if at < 0:
        return None
    start = body.find(b"{", at)
    usage = None
    if start > 0 and body[at + len(b'"usage"'):start].strip() == b":":  # its value is this object
        try:
            usage, _ = _DECODER.raw_decode(body[start:].decode())
        except ValueError:
            pass
    if isinstance(usage, dict):
        return usage
    try:
        whole = json.loads(body)
    except ValueError:
        return None
    return whole.get("usage") if isinstance(whole, dict) else None


_DECODER = json.JSONDecoder()


def from_env(env=os.environ) -> LLMGateway:
    """The gateway the LLM_* variables describe; KeyError naming a required one that is unset or empty."""
    missing = [name for name in REQUIRED if not env.get(name, "").strip()]
    if missing:
        raise KeyError(missing[0])
    gateway = LLMGateway(env["LLM_UPSTREAM"], timeout=float(env.get("LLM_TIMEOUT", 120)),
                         limits_store=env.get("LLM_LIMITS_STORE", "local"))
    gateway.upstream_key = env.get("LLM_UPSTREAM_KEY", "")
    keys = {k.strip() for k in env.get("LLM_CLIENT_KEYS", "").split(",") if k.strip()}
    gateway.client_ids = {key: hashlib.sha256(key.encode()).hexdigest()[:12] for key in keys}  # hashed once, at start
    gateway.routes = parse_routes(env.get("LLM_ROUTES", ""))
    gateway.usage_log = env.get("LLM_USAGE_LOG")
    gateway.requests_per_minute = int(env.get("LLM_RPM", LLMGateway.requests_per_minute))
    gateway.tokens_per_minute = int(env.get("LLM_TPM", LLMGateway.tokens_per_minute))
    return gateway


try:
    app = from_env()
except KeyError as missing:
    name = missing.args[0]
    refuse_start(f"examples.llm_gateway: set {name}, e.g. {name}={REQUIRED[name]}")
