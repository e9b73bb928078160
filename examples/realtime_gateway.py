"""A gateway for realtime model APIs (WebSocket sessions, OpenAI Realtime style).

    REALTIME_UPSTREAM=https://api.openai.com REALTIME_UPSTREAM_KEY=sk-... \\
    REALTIME_CLIENT_KEYS=team-a-key,team-b-key \\
        gunicorn -c gunicorn.conf.py examples.realtime_gateway:app

REALTIME_UPSTREAM and REALTIME_CLIENT_KEYS are required: without one the start stops with a line naming it.

- a client opens its session with its own key (``Authorization: Bearer ...``);
  an unknown one gets 401 in the proxy's error shape and no tunnel opens;
- the real upstream key is swapped in during the handshake, so clients never hold it;
- every message of the session goes through ``on_ws_message``: counted per
  direction, and the usage the upstream reports in its ``response.done``
  events summed;
- when the session ends, whoever ended it, one JSON line goes to
  REALTIME_USAGE_LOG (default: stderr): the client (a hash of its key), the
  path, messages and bytes both ways, the tokens used, who closed it.
"""
import hashlib
import json
import os
import sys
import time

from forkproxy import Proxy, refuse_start

REQUIRED = {"REALTIME_UPSTREAM": "https://api.openai.com", "REALTIME_CLIENT_KEYS": "team-a-key,team-b-key"}

UNAUTHORIZED = {"error": {"message": "invalid or missing API key", "type": "unauthorized"}}


class RealtimeGateway(Proxy):
    upstream_key = ""
    client_keys: frozenset = frozenset()
    usage_log = None

    def before_forward(self, req, res, ureq):
        key = req.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        if key not in self.client_keys:
            res.status = 401
            res.headers["Content-Type"] = "application/json"
            res.body = json.dumps(UNAUTHORIZED)
            return True
        req.ivars["client"] = hashlib.sha256(key.encode()).hexdigest()[:12]
        req.ivars["started"] = time.time()
        ureq.headers["Authorization"] = f"Bearer {self.upstream_key}"
        return False

    def on_ws_message(self, msg, out, stats):
        if not msg.from_client and isinstance(msg.data, str) and '"response.done"' in msg.data:
            usage = _usage(msg.data)
            for name in ("input_tokens", "output_tokens", "total_tokens"):
                stats.meta[name] = stats.meta.get(name, 0) + usage.get(name, 0)
        out.send(msg.data)  # every message passes unchanged

    def on_tunnel_end(self, req, stats):
        record = {
            "client": req.ivars.get("client"), "path": req.path, "closed_by": stats.closed_by,
            "errored": stats.errored, "seconds": round(time.time() - req.ivars.get("started", time.time()), 3),
            "messages_from_client": stats.messages_from_client,
            "messages_from_upstream": stats.messages_from_upstream,
            "bytes_from_client": stats.bytes_from_client, "bytes_from_upstream": stats.bytes_from_upstream,
            "usage": {name: stats.meta.get(name, 0) for name in ("input_tokens", "output_tokens", "total_tokens")},
        }
        line = json.dumps(record) + "\n"
        if self.usage_log:
            with open(self.usage_log, "a", encoding="utf-8") as f:
                f.write(line)
        else:
            sys.stderr.write(line)


def _usage(text: str) -> dict:
    try:
        event = json.loads(text)
    except ValueError:
        return {}
    usage = (event.get("response") or {}).get("usage") if isinstance(event, dict) else None
    return usage if isinstance(usage, dict) else {}


def from_env(env=os.environ) -> RealtimeGateway:
    """The gateway the REALTIME_* variables describe; KeyError naming a required one that is unset or empty."""
    missing = [name for name in REQUIRED if not env.get(name, "").strip()]
    if missing:
        raise KeyError(missing[0])
    gateway = RealtimeGateway(env["REALTIME_UPSTREAM"])
    gateway.upstream_key = env.get("REALTIME_UPSTREAM_KEY", "")
    gateway.client_keys = frozenset(k.strip() for k in env["REALTIME_CLIENT_KEYS"].split(",") if k.strip())
    gateway.usage_log = env.get("REALTIME_USAGE_LOG") or None
    return gateway


try:
    app = from_env()
except KeyError as missing:
    name = missing.args[0]
    refuse_start(f"examples.realtime_gateway: set {name}, e.g. {name}={REQUIRED[name]}")
