"""A hooked Proxy for the end-to-end tests; request headers steer the hooks.

X-Test-Upstream picks another upstream (the misbehaving raw servers),
X-Test-Retry / X-Test-Backoff / X-Test-Max-Backoff / X-Test-Retry-Methods
build the retry policy (X-Test-Policy: none, the hook returns None), and the path picks what before_forward does.
"""
import os

from forkproxy import Proxy, RetryPolicy
from forkproxy.errors import BadRequest, BadUpstreamResponse

SETTINGS = {
    key: float(os.environ[env])
    for key, env in (("timeout", "TEST_TIMEOUT"), ("connect_timeout", "TEST_CONNECT_TIMEOUT"))
    if env in os.environ
}
for key, env in (("max_request_body_bytes", "TEST_MAX_REQUEST"), ("max_response_body_bytes", "TEST_MAX_RESPONSE")):
    if env in os.environ:
        SETTINGS[key] = int(os.environ[env])
if "TEST_POOL_IDLE" in os.environ:
    SETTINGS["pool_idle_timeout"] = float(os.environ["TEST_POOL_IDLE"])


class TestGateway(Proxy):
    def pick_upstream(self, req):
        return req.headers.get("X-Test-Upstream") or self.upstream

    def rewrite_path(self, path):
        return path[len("/strip"):] if path.startswith("/strip/") else path

    def retry_policy(self, req):
        h = req.headers
        if h.get("X-Test-Policy") == "none":
            return None
        methods = h.get("X-Test-Retry-Methods")
        return RetryPolicy(
            max_attempts=int(h.get("X-Test-Retry", 1)),
            base_backoff_ms=int(h.get("X-Test-Backoff", 0)),
            max_backoff_ms=int(h.get("X-Test-Max-Backoff", 30000)),
            retry_methods=methods.split(",") if methods else None,
        )

    def before_forward(self, req, res, ureq):
        path = req.path
        if path.startswith("/short"):
            res.status = 418
            res.headers["X-Short"] = "yes"
            res.body = "short-circuited"
            return True
        if path.startswith("/hook-raise-os"):  # a hook calling an internal service that is down
            raise ConnectionRefusedError(111, "Connection refused by 10.1.2.3:8080")
        if path.startswith("/hook-raise"):
            raise RuntimeError("boom from before_forward")
        if path.startswith("/hook-proxy-error"):  # a hook answering with one of the proxy's errors
            raise BadRequest("model 'nope' is not served here")
        if path.startswith("/hook-crlf"):
            ureq.headers["X-Evil"] = "a\r\nInjected: 1"
        if path.startswith("/hook-bad-name"):
            ureq.headers["Transfer-Encoding "] = "chunked"  # a lenient upstream would read it as TE
        if path.startswith("/hook-res-crlf"):
            res.headers["X-Evil"] = "a\r\nInjected: 1"
            res.body = "x"
            return True
        if path.startswith("/hook-res-ctl"):
            res.headers["X-Ctl"] = "a\x01b"
            res.body = "x"
            return True
        if path.startswith("/hook-int-header"):  # a value that is not a str, as a count taken from a JSON body
            ureq.headers["X-Count"] = 5
        if path.startswith("/hook-dict-headers"):
            ureq.headers = {"X-Secret": "s3cret-value"}
        if path.startswith(("/hook-res-int-header", "/hook-res-dict-headers", "/hook-res-status-")):
            return _unsendable_reply(path.split("/")[1], res)  # a short-circuit whose reply cannot go out as it is
        if path.startswith("/hook-badpath"):
            ureq.path = "evil.example/x"
        if path.startswith("/hook-method-crlf"):  # a method taken from client input, unchecked
            ureq.method = "GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\nGET"
        if path.startswith("/hook-method-space"):
            ureq.method = "GET /smuggled"
        if path.startswith("/hook-body-not-bytes"):
            ureq.body = {"not": "bytes"}
        if path.startswith("/hook-copies-client-headers"):  # what users write to "pass everything on"
            ureq.headers = req.headers.copy()
            ureq.headers["X-Copied"] = "yes"
        if path.startswith("/swap-key"):
            ureq.headers["Authorization"] = "Bearer real-key"
        return False

    def after_forward(self, req, ures, res):
        res.headers["X-Seen-Status"] = str(ures.status)
        res.headers["X-Seen-Attempts"] = str(ures.attempts)
        res.headers["X-Seen-Retries"] = str(req.ivars.get("proxy_retry_count"))
        res.headers["X-Seen-Error"] = ures.error.type if ures.error else "none"
        res.headers["X-Seen-Upstream"] = ures.upstream or "none"
        res.headers["X-Worker-Pid"] = str(os.getpid())
        if req.path.startswith("/after-raise"):
            raise ValueError("boom from after_forward")
        if req.path.startswith("/after-proxy-error"):
            raise BadUpstreamResponse("the upstream's answer failed the gateway's check")


def _unsendable_reply(what, res):
    res.body = "x"
    if what == "hook-res-int-header":
        res.headers["X-Count"] = 5
    elif what == "hook-res-dict-headers":
        res.headers = {"X-Secret": "s3cret-value"}
    else:  # hook-res-status-<status>: a number, or a str as it is
        status = what.removeprefix("hook-res-status-")
        res.status = int(status) if status.isdigit() else status
    return True


app = TestGateway(os.environ["TEST_UPSTREAM"], **SETTINGS)

# The same behaviour with hooks registered on an instance instead of a subclass.
hooked = Proxy(os.environ["TEST_UPSTREAM"], **SETTINGS)


@hooked.hook
def before_forward(req, res, ureq):
    ureq.headers["X-Hooked"] = "instance"
    if req.path.startswith("/short"):
        res.status, res.body = 202, "instance short-circuit"
        return True
    return False


@hooked.hook
def after_forward(req, ures, res):
    res.headers["X-After"] = f"{ures.status}"
