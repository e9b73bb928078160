"""A traced LLM-style gateway for tests/test_tracing.py: its hooks put OpenTelemetry's GenAI attributes on req.span.

Upstreams: TEST_POOLS is a JSON object of named pools, each a list of members ``{"url", "name", "backup"?,
"meta"?}``; X-Test-Pool picks one, X-Test-Upstream a plain URL; else TEST_UPSTREAM. X-Test-Retry gives the
attempts (POST included). A request is streamed when its JSON body says ``"stream": true`` or X-Test-Stream is 1.
X-Test-Key is counted against a limit of one request a minute, named by its prefix ``team``.

The hooks, as an LLM gateway's would: ``before_forward`` sets ``gen_ai.operation.name`` and
``gen_ai.request.model`` from a JSON body; ``before_attempt`` (TEST_BEFORE_ATTEMPT=1) sets
``gen_ai.provider.name`` from the member's meta ``provider`` (else its name); ``on_stream_chunk`` keeps the answer
so far, the model and the usage of OpenAI-style chunks, and ``on_stream_end`` sets ``gen_ai.response.model`` and
``gen_ai.usage.*``; ``on_ws_message`` passes messages on (so that tunnels count them). TEST_RESUME=1 registers
``resume_stream``: it resumes at members whose meta has ``"resume": true``, with the answer so far as a prefill.
TEST_FIRST_BYTE sets first_byte_timeout, TEST_TRACING (``true``/``false``) the setting ``tracing`` (unset: None).

``GET /_modules`` (answered before the proxy): the names of the opentelemetry modules loaded in this worker.
"""
import json
import os
import sys

from forkproxy import Limit, Proxy, RetryPolicy, Upstream, UpstreamPool
from tests.support.openai_upstream import prefilled


def _pool(members):
    return UpstreamPool([Upstream(m["url"], name=m["name"], backup=m.get("backup", False), meta=m.get("meta"))
                         for m in members], fail_timeout=30)


POOLS = {name: _pool(members) for name, members in json.loads(os.environ.get("TEST_POOLS", "{}")).items()}


class Traced(Proxy):
    def pick_upstream(self, req):
        if "X-Test-Pool" in req.headers:
            return POOLS[req.headers["X-Test-Pool"]]
        return req.headers.get("X-Test-Upstream") or self.upstream

    def retry_policy(self, req):
        return RetryPolicy(max_attempts=int(req.headers.get("X-Test-Retry", 1)), retry_methods=("GET", "POST"))

    def stream_request(self, req):
        return req.headers.get("X-Test-Stream") == "1" or bool((_chat(req) or {}).get("stream"))

    def rate_limits(self, req):
        key = req.headers.get("X-Test-Key")
        return [Limit(f"team:{key}", 1, 60)] if key else []

    def before_forward(self, req, res, ureq):
        chat = _chat(req)
        if chat is not None:
            req.span.set_attributes({"gen_ai.operation.name": "chat", "gen_ai.request.model": chat.get("model", "")})
        return False

    def on_stream_chunk(self, chunk, out, stats):
        data = chunk.split(b"data: ", 1)[-1].strip()
        if data.startswith(b"{"):
            event = json.loads(data)
            stats.meta["model"] = event.get("model") or stats.meta.get("model")
            stats.meta["usage"] = event.get("usage") or stats.meta.get("usage")
            for choice in event.get("choices", ()):
                stats.meta["text"] = stats.meta.get("text", "") + (choice["delta"].get("content") or "")
        out.write(chunk)

    def on_stream_end(self, req, out, stats):
        usage = stats.meta.get("usage") or {}
        if stats.meta.get("model"):
            req.span.set_attribute("gen_ai.response.model", stats.meta["model"])
        if usage:
            req.span.set_attributes({"gen_ai.usage.input_tokens": usage["prompt_tokens"],
                                     "gen_ai.usage.output_tokens": usage["completion_tokens"]})

    def on_ws_message(self, msg, out, stats):
        out.send(msg.data)


def _chat(req):
    """The request's JSON object body, or None."""
    if not req.body.startswith(b"{"):
        return None
    return json.loads(req.body)


def before_attempt(req, ureq, upstream):
    req.span.set_attribute("gen_ai.provider.name", upstream.meta.get("provider", upstream.name))


def resume_stream(req, ureq, stats, upstream):
    return prefilled(ureq, stats, upstream)


proxy = Traced(os.environ.get("TEST_UPSTREAM", "http://127.0.0.1:9"), timeout=5, connect_timeout=1,
               first_byte_timeout=float(os.environ.get("TEST_FIRST_BYTE", 0)),
               tracing={"true": True, "false": False}.get(os.environ.get("TEST_TRACING", "")))
if os.environ.get("TEST_BEFORE_ATTEMPT") == "1":
    proxy.hook(before_attempt)
if os.environ.get("TEST_RESUME") == "1":
    proxy.hook(resume_stream)


def app(environ, start_response):
    """The proxy, and ``GET /_modules``: what of OpenTelemetry this worker imported."""
    if environ["PATH_INFO"] != "/_modules":
        return proxy(environ, start_response)
    body = json.dumps(sorted(name for name in sys.modules if name.split(".")[0] == "opentelemetry")).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]
