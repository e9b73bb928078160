"""A Proxy for the first-byte and resume tests: one pool of OpenAI-style providers, every request streamed.

TEST_MEMBERS: a JSON list of members ``{"url", "name", "backup"?, "meta"?}``; TEST_FIRST_BYTE,
TEST_IDLE, TEST_DEADLINE, TEST_ATTEMPTS set ``first_byte_timeout``, ``stream_idle_timeout``, ``deadline`` and
the attempts (POST included: retry_methods). ``on_stream_chunk`` keeps the answer's text so far in
``stats.meta``; an ``event: error`` or ``data: {"error"...}`` event fails the stream (``out.fail``).
TEST_RESUME=1 registers ``resume_stream``: it resumes at members whose meta has ``"resume": true`` with the
text delivered so far as a trailing assistant message (a prefill), and records each member asked.
TEST_JUDGE=1 registers ``judge_reply``: it records the first unit it was shown and accepts.
``on_stream_end`` writes one SSE comment with what the stream saw, and the pool's in-flight counts and
health then: ``: end {json}``.
"""
import json
import os

from forkproxy import Proxy, RetryPolicy, Upstream, UpstreamPool
from tests.support.openai_upstream import prefilled

MEMBERS = json.loads(os.environ["TEST_MEMBERS"])
POOL = UpstreamPool([Upstream(m["url"], name=m["name"], backup=m.get("backup", False), meta=m.get("meta"))
                     for m in MEMBERS], fail_timeout=30)


class Resuming(Proxy):
    def retry_policy(self, req):
        return RetryPolicy(max_attempts=int(os.environ.get("TEST_ATTEMPTS", 3)), retry_methods=("POST",))

    def stream_request(self, req):
        return True

    def before_forward(self, req, res, ureq):
        req.ivars["asked"], req.ivars["judged"] = [], []
        return False

    def on_stream_chunk(self, chunk, out, stats):
        data = chunk.split(b"data: ", 1)[-1].strip()
        if chunk.startswith(b"event: error") or data.startswith(b'{"error"'):
            out.fail("the provider sent an error event")
            return
        if data.startswith(b"{"):
            for choice in json.loads(data).get("choices", ()):
                stats.meta["text"] = stats.meta.get("text", "") + (choice["delta"].get("content") or "")
        out.write(chunk)

    def on_stream_end(self, req, out, stats):
        seen = {"resumes": stats.resumes, "upstream": stats.upstream, "status": stats.status,
                "errored": stats.errored, "error": stats.error.type if stats.error else None,
                "asked": req.ivars["asked"], "judged": req.ivars["judged"], "chunks": stats.chunk_count,
                "in_flight": POOL.in_flight, "live": [h.live for h in POOL.health]}
        out.write(f": end {json.dumps(seen)}\n\n")


def resume_stream(req, ureq, stats, upstream):
    req.ivars["asked"].append(upstream.name)
    return prefilled(ureq, stats, upstream)


def judge_reply(req, ures):
    req.ivars["judged"].append(f"{ures.upstream_name}:{ures.status}:{ures.body[:40].decode(errors='replace')}")
    return "accept"


app = Resuming(POOL, timeout=5, connect_timeout=1,
               first_byte_timeout=float(os.environ.get("TEST_FIRST_BYTE", 0)),
               stream_idle_timeout=float(os.environ.get("TEST_IDLE", 5)),
               deadline=float(os.environ.get("TEST_DEADLINE", 0)))
if os.environ.get("TEST_RESUME") == "1":
    app.hook(resume_stream)
if os.environ.get("TEST_JUDGE") == "1":
    app.hook(judge_reply)
