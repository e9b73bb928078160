"""A streaming Proxy for the end-to-end tests; X-Mode picks what on_stream_chunk does.

Every streamed response appends one JSON line to $TEST_RECORDS from
on_stream_end, so tests can see what the hooks saw.
"""
import json
import os

from forkproxy import Proxy, RetryPolicy

SETTINGS = {}
for key, env, kind in (("stream_idle_timeout", "TEST_IDLE", float), ("max_event_bytes", "TEST_MAX_EVENT", int),
                       ("sse_heartbeat_secs", "TEST_HEARTBEAT", float), ("ca_certs", "TEST_CA", str),
                       ("max_response_body_bytes", "TEST_MAX_RESPONSE", int)):
    if os.environ.get(env):
        SETTINGS[key] = kind(os.environ[env])
if os.environ.get("TEST_SSE_ERROR_EVENT"):
    SETTINGS["sse_error_event"] = os.environ["TEST_SSE_ERROR_EVENT"] == "1"


class StreamGateway(Proxy):
    def pick_upstream(self, req):
        return req.headers.get("X-Test-Upstream") or self.upstream

    def retry_policy(self, req):
        return RetryPolicy(max_attempts=int(req.headers.get("X-Test-Retry", 1)))

    def stream_request(self, req):
        return req.headers.get("X-Test-Stream") == "1"

    def on_stream_chunk(self, chunk, out, stats):
        mode = stats.req.headers.get("X-Mode", "pass")
        stats.meta.setdefault("units", []).append([stats.chunk_count, stats.byte_count, len(chunk)])
        if mode == "prefix":
            out.write(b"[p]" + chunk)
        elif mode == "drop":
            if b"drop-me" not in chunk:
                out.write(chunk)
        elif mode == "fanout":
            out.write(chunk)
            out.write("copy:")
            out.write(chunk)
        elif mode == "raise" and stats.chunk_count == 2:
            raise RuntimeError("boom from on_stream_chunk")
        elif mode == "fail" and stats.chunk_count == 2:
            out.write(chunk)  # not sent: the unit out.fail fails goes nowhere
            out.fail("the provider sent an in-band error")
        elif mode == "discard":
            pass
        else:
            out.write(chunk)

    def after_forward(self, req, ures, res):
        res.headers["X-After-Forward"] = "ran"

    def on_stream_end(self, req, out, stats):
        if req.headers.get("X-Final"):
            out.write(f"event: end\ndata: {stats.chunk_count}\n\n")
        record = {"path": req.path, "chunk_count": stats.chunk_count, "byte_count": stats.byte_count,
                  "errored": stats.errored, "client_disconnected": stats.client_disconnected,
                  "units": stats.meta.get("units", [])[:50], "pid": os.getpid(),
                  "status": stats.status, "content_type": stats.headers.get("Content-Type"),
                  "upstream": stats.upstream,
                  "error": stats.error and {"type": stats.error.type, "message": stats.error.message}}
        with open(os.environ["TEST_RECORDS"], "a") as f:
            f.write(json.dumps(record) + "\n")
        if req.headers.get("X-End-Raise"):
            raise RuntimeError("boom from on_stream_end")


app = StreamGateway(os.environ["TEST_UPSTREAM"], **SETTINGS)
