"""An API gateway in front of internal JSON services.

    API_ROUTES="/users=http://127.0.0.1:7001,/orders=http://127.0.0.1:7002/v2" API_TOKENS=token-a,token-b \\
        gunicorn -c gunicorn.conf.py examples.api_gateway:app

or against the bundled demo upstream, with those variables set for it: ``scripts/serve examples.api_gateway:app``.
API_ROUTES and API_TOKENS are required: without one the start stops with a line naming it.

- auth gate: a request without a known bearer token gets 401 before any upstream is called;
- path-prefix routing: /users/42 goes to the users service as /42 (rewrite_path strips the
  prefix; the service's own base path, like /v2 above, is kept); an unknown prefix is 404;
- audit log: after_forward writes one JSON line per request — allowed, refused or failed —
  to API_AUDIT_LOG (default: stderr).
"""
import json
import os
import sys
import time

from forkproxy import Proxy, refuse_start

REQUIRED = {"API_ROUTES": "/users=http://127.0.0.1:7001", "API_TOKENS": "token-a,token-b"}  # with an example


def parse_routes(spec: str) -> list[tuple[str, str]]:
    routes = [(prefix.rstrip("/"), url) for prefix, _, url in (p.partition("=") for p in spec.split(",")) if url]
    return sorted(routes, key=lambda r: -len(r[0]))


def error(res, status: int, message: str, type_: str) -> bool:
    res.status = status
    res.headers["Content-Type"] = "application/json"
    res.body = json.dumps({"error": {"message": message, "type": type_}})
    return True


class ApiGateway(Proxy):
    routes: list = []
    tokens: frozenset = frozenset()
    audit_log = None

    def route_for(self, path: str):
        return next(((p, url) for p, url in self.routes if path == p or path.startswith(p + "/")), None)

    def pick_upstream(self, req):
        return req.ivars["route"][1]

    def rewrite_path(self, path):
        for prefix, _ in self.routes:
            if path == prefix or path.startswith(prefix + "/") or path.startswith(prefix + "?"):
                rest = path[len(prefix):]
                return rest if rest.startswith("/") else "/" + rest
        return path

    def before_forward(self, req, res, ureq):
        token = req.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        if token not in self.tokens:
            return error(res, 401, "missing or unknown bearer token", "unauthorized")
        route = self.route_for(req.path)
        if route is None:
            return error(res, 404, f"no service serves {req.path}", "not_found")
        req.ivars["route"] = route
        req.ivars["caller"] = token[:6] + "..."  # enough to tell callers apart, not to reuse
        ureq.headers.pop("Authorization", None)  # internal services trust the gateway, not the token
        ureq.headers["X-Gateway-Caller"] = req.ivars["caller"]
        return False

    def after_forward(self, req, ures, res):
        line = {
            "ts": round(time.time(), 3), "method": req.method, "path": req.raw_path, "client": req.remote_addr,
            "caller": req.ivars.get("caller"), "service": (req.ivars.get("route") or (None,))[0],
            "status": res.status, "upstream_status": ures.status,
            "error": ures.error.type if ures.error else None, "retries": req.ivars.get("proxy_retry_count", 0),
        }
        text = json.dumps(line) + "\n"
        if self.audit_log:
            with open(self.audit_log, "a") as f:
                f.write(text)
        else:
            sys.stderr.write(text)


def from_env(env=os.environ) -> ApiGateway:
    """The gateway the API_* variables describe; KeyError naming a required one that is unset or empty."""
    missing = [name for name in REQUIRED if not env.get(name, "").strip()]
    if missing:
        raise KeyError(missing[0])
    routes = parse_routes(env["API_ROUTES"])
    gateway = ApiGateway(routes[0][1] if routes else "http://127.0.0.1:9")
    gateway.routes = routes
    gateway.tokens = frozenset(t.strip() for t in env.get("API_TOKENS", "").split(",") if t.strip())
    gateway.audit_log = env.get("API_AUDIT_LOG")
    return gateway


try:
    app = from_env()
except KeyError as missing:
    name = missing.args[0]
    refuse_start(f"examples.api_gateway: set {name}, e.g. {name}={REQUIRED[name]}")
