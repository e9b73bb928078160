"""A Proxy over an UpstreamPool built once at import from the environment, for the pool tests.

TEST_MEMBERS is a comma-separated list of members, each ``url[*weight][+backup]``;
TEST_BALANCE, TEST_MAX_FAILS, TEST_FAIL_TIMEOUT, TEST_MAX_FAIL_TIMEOUT set the pool;
TEST_TIMEOUT the response head's timeout, TEST_CA the CA bundle https:// members are checked against.
X-Test-Retry / X-Test-Retry-Methods build the retry policy (X-Test-Policy: raises, one whose own code
fails once a reply is in hand); X-Test-Stream streams.
"""
import os

from forkproxy import Proxy, RetryPolicy, Upstream, UpstreamPool


def member(spec):
    backup = spec.endswith("+backup")
    url, _, weight = spec.removesuffix("+backup").partition("*")
    return Upstream(url, weight=int(weight or 1), backup=backup)


POOL = UpstreamPool(
    [member(spec) for spec in os.environ["TEST_MEMBERS"].split(",")],
    balance=os.environ.get("TEST_BALANCE", "round_robin"),
    max_fails=int(os.environ.get("TEST_MAX_FAILS", 1)),
    fail_timeout=float(os.environ.get("TEST_FAIL_TIMEOUT", 10)),
    max_fail_timeout=float(os.environ.get("TEST_MAX_FAIL_TIMEOUT", 300)),
)


class RaisingPolicy(RetryPolicy):
    """A policy whose own code fails, as a hook's subclass may: first asked once a reply is in hand."""

    def retriable(self, status):
        raise RuntimeError("a bug in the policy")


class PoolGateway(Proxy):
    def retry_policy(self, req):
        if req.headers.get("X-Test-Policy") == "raises":
            return RaisingPolicy()
        methods = req.headers.get("X-Test-Retry-Methods")
        return RetryPolicy(max_attempts=int(req.headers.get("X-Test-Retry", 1)),
                           retry_methods=methods.split(",") if methods else None)

    def stream_request(self, req):
        return req.headers.get("X-Test-Stream") == "1"

    def after_forward(self, req, ures, res):
        res.headers["X-Seen-Upstream"] = ures.upstream or "none"
        res.headers["X-Seen-Attempts"] = str(ures.attempts)


app = PoolGateway(POOL, timeout=float(os.environ.get("TEST_TIMEOUT", 3)), connect_timeout=1,
                  ca_certs=os.environ.get("TEST_CA"))
