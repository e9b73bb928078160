"""A Proxy for the failover tests: named members with their own data, backups, and ``before_attempt``.

TEST_MEMBERS is a JSON list of members, each ``{"url": ..., "name"?, "backup"?, "meta"?}`` (one pool), or
TEST_UPSTREAM one plain URL; TEST_MAX_FAILS, TEST_FAIL_TIMEOUT set the pool, TEST_TIMEOUT the head's timeout.
TEST_BEFORE_ATTEMPT=1 registers ``before_attempt``: it adds X-Member (the member's name), sets Authorization,
the body's model and a path prefix from the member's ``meta`` (keys ``key``, ``model``, ``path``), raises for the
member named in X-Test-Raise-For, and sets a header HTTP cannot carry for the one named in X-Test-Bad-For.
X-Test-Retry gives the attempts (retry_methods from X-Test-Retry-Methods), X-Test-Deadline sets req.deadline.
TEST_JUDGE=1 registers ``judge_reply``: X-Test-Verdicts maps an error code in a JSON body ({"error": {"code"}})
or a status to a verdict (``context_length_exceeded=fail_over,429=retry``); each reply it saw is listed in
X-Seen-Judged (name:status:body bytes).
"""
import json
import os

from forkproxy import Proxy, RetryPolicy, Upstream, UpstreamPool


def _pool():
    members = json.loads(os.environ["TEST_MEMBERS"])
    return UpstreamPool([Upstream(m["url"], backup=m.get("backup", False), name=m.get("name"), meta=m.get("meta"))
                         for m in members],
                        max_fails=int(os.environ.get("TEST_MAX_FAILS", 1)),
                        fail_timeout=float(os.environ.get("TEST_FAIL_TIMEOUT", 10)))


UPSTREAM = _pool() if "TEST_MEMBERS" in os.environ else os.environ["TEST_UPSTREAM"]


class FailoverGateway(Proxy):
    def retry_policy(self, req):
        methods = req.headers.get("X-Test-Retry-Methods")
        return RetryPolicy(max_attempts=int(req.headers.get("X-Test-Retry", 1)),
                           retry_methods=methods.split(",") if methods else None)

    def before_forward(self, req, res, ureq):
        ureq.headers["X-Shaped-By"] = "before_forward"
        req.ivars["attempted"], req.ivars["judged"] = [], []
        if "X-Test-Deadline" in req.headers:
            req.deadline = float(req.headers["X-Test-Deadline"])
        return False

    def after_forward(self, req, ures, res):
        res.headers["X-Seen-Upstream"] = ures.upstream or "none"
        res.headers["X-Seen-Name"] = ures.upstream_name or "none"
        res.headers["X-Seen-Attempts"] = str(ures.attempts)
        res.headers["X-Seen-Attempted"] = ",".join(req.ivars.get("attempted", ()))
        res.headers["X-Seen-Judged"] = ",".join(req.ivars.get("judged", ()))


def before_attempt(req, ureq, upstream):
    req.ivars["attempted"].append(upstream.name)
    if req.headers.get("X-Test-Raise-For") == upstream.name:
        raise RuntimeError(f"no key for {upstream.name}")
    if req.headers.get("X-Test-Bad-For") == upstream.name:
        ureq.headers["X-Bad"] = "one\r\nInjected: two"
    ureq.headers.add("X-Member", upstream.name)  # added, not set: a second value would show a shared copy
    meta = upstream.meta
    if "key" in meta:
        ureq.headers["Authorization"] = "Bearer " + meta["key"]
    if "model" in meta:
        body = json.loads(ureq.body)
        body["model"] = meta["model"]
        ureq.body = json.dumps(body)
    if "path" in meta:
        ureq.path = meta["path"] + ureq.path


def judge_reply(req, ures):
    req.ivars["judged"].append(f"{ures.upstream_name}:{ures.status}:{len(ures.body)}")
    rules = dict(rule.split("=") for rule in req.headers.get("X-Test-Verdicts", "").split(",") if rule)
    code = json.loads(ures.body).get("error", {}).get("code") if ures.body.startswith(b"{") else None
    return rules.get(code) or rules.get(str(ures.status))


app = FailoverGateway(UPSTREAM, timeout=float(os.environ.get("TEST_TIMEOUT", 3)), connect_timeout=1)
if os.environ.get("TEST_BEFORE_ATTEMPT") == "1":
    app.hook(before_attempt)
if os.environ.get("TEST_JUDGE") == "1":
    app.hook(judge_reply)
