"""An LLM gateway with a fallback chain: deployments of different providers, keys and models in one pool.

    LLM_CLIENT_KEYS=team-a-key,team-b-key \\
    LLM_PRIMARY=openai LLM_OPENAI_URL=https://api.openai.com/v1 LLM_OPENAI_KEY=sk-... LLM_OPENAI_MODEL=gpt-4o \\
    LLM_FALLBACK=together LLM_TOGETHER_URL=https://api.together.xyz/v1 LLM_TOGETHER_KEY=... \\
    LLM_TOGETHER_MODEL=meta-llama/Llama-3.3-70B-Instruct-Turbo LLM_TOGETHER_RESUME=1 \\
        gunicorn -c gunicorn.conf.py examples.llm_pools:app

Clients use the gateway as their OpenAI base URL (``http://gateway:8080/v1``) with a key of
LLM_CLIENT_KEYS, and never hold a provider's key. Every request goes through one
``UpstreamPool``: the primary members share the traffic (``least_busy``: completions are long
and of very different lengths), the fallback members are tried in their order once every
primary was tried for the request or is down. ``before_attempt`` gives each attempt its
member's key and model; the member's URL carries its provider's path (``/v1``, ``/openai/v1``).

Variables (a member NAME is listed in LLM_PRIMARY or LLM_FALLBACK; its variables are
``LLM_<NAME>_*`` with NAME upper-cased and ``-`` as ``_``):

| variable | meaning | default |
|---|---|---|
| LLM_CLIENT_KEYS | the keys clients may present (comma-separated) | required |
| LLM_PRIMARY | names of the primary members (comma-separated) | required |
| LLM_FALLBACK | names of the fallback members, in the order they are tried | none |
| LLM_<NAME>_URL | the member's provider base URL, with its path (``https://api.openai.com/v1``) | required |
| LLM_<NAME>_MODEL | the model asked of that member (whatever model the client named) | required |
| LLM_<NAME>_KEY | the member's API key, sent as ``Authorization: Bearer`` | none (no Authorization) |
| LLM_<NAME>_RESUME | 1: the member continues a trailing assistant message (prefill), so it may resume a stream | 0 |
| LLM_DEADLINE | seconds from a request received to its reply accepted, across every attempt and resume | 120 |
| LLM_FIRST_BYTE_TIMEOUT | seconds a stream may take for its first event after its head before it fails over | 10 |
| LLM_STREAM_IDLE_TIMEOUT | seconds a stream may be silent mid-way before it is resumed (or cut) | 15 |
| LLM_TIMEOUT | seconds for each attempt's head and each read of a buffered reply | 60 |
| LLM_MAX_ATTEMPTS | attempts per request: retries, failovers and resumes together | 4 |
| LLM_MAX_RETRY_AFTER | a 429 whose Retry-After is at most this many seconds is retried on its member | 2 |
| LLM_MAX_FAILS, LLM_FAIL_TIMEOUT | failures within LLM_FAIL_TIMEOUT s that mark a member down for that long | 2, 10 |
| LLM_USAGE_LOG | file that gets one JSON usage line per request | stderr |

What each fault does (``judge_reply`` decides on the reply head, ``on_stream_chunk`` on the events):

- 429 with a Retry-After of at most LLM_MAX_RETRY_AFTER: sent again to the same member once
  the wait is over (once per member: a second 429 fails over). A 429 without one, or a longer
  one: the next member now; the client should not wait for one provider's quota.
- 5xx, and 401/403 (the member's key refused: the client's was checked already): ``None``, so
  the RetryPolicy and the pool's ``fail_on_status`` decide: the next member, and the failure
  counts in the member's health (LLM_MAX_FAILS mark it down). These say something about the
  member, not the request; a "retry"/"fail_over" verdict would hide it from health, and the
  member that keeps failing would keep getting every first attempt.
- A reset or close before the head, no head within LLM_TIMEOUT, no first event within
  LLM_FIRST_BYTE_TIMEOUT: the next member (POST is opted in; see below).
- 400 ``context_length_exceeded``: ``"fail_over"``, the next member (its model may take a longer
  context). The verdict never counts in health: the request was judged, not the member.
- A content-filter 400, and every other 4xx but 401/403/429: passed on as it is. A refusal is
  the answer; routing around a provider's safety filter to another provider is not the
  gateway's call.
- An in-band error event (``data: {"error": ...}`` or ``event: error``) or an event whose data is
  not JSON: ``out.fail`` fails the stream there, and it is resumed. Before any event went out
  it is plain failover: ``first_byte_timeout`` holds the head back until the first events,
  and ``judge_reply`` sees them with it. A
  malformed event is failed, not passed on: OpenAI's SDKs parse every event and would raise on
  it, and dropping it could silently lose the text it carried.
- A stream cut or stalled mid-way (silent for LLM_STREAM_IDLE_TIMEOUT): ``resume_stream``
  continues it on the next member whose LLM_<NAME>_RESUME is 1, sending the text the client
  already has as a trailing assistant message (a "prefill"): the member writes only the rest,
  and the client gets the whole answer once. OpenAI's own API does not continue a prefill
  (Anthropic, Mistral's ``prefix``, DeepSeek's beta prefix and vLLM's
  ``continue_final_message`` do, each in its own way), so a member is not resumed to unless
  its variable says so; the client then gets a clean ``upstream_stream_failed`` error event.
  A stream that failed before any text went out needs no prefill: any member may take it.
- A stream without ``data: [DONE]`` whose answer finished (``finish_reason`` seen) gets the
  ``[DONE]`` appended, so clients that wait for it finish.
- No reply at all anywhere: LLM_DEADLINE ends the request with 504 ``upstream_timeout``. It
  counts from the request, for resumes too: a stream cut after it ends with the error event.

Double billing: POST is in the RetryPolicy's ``retry_methods``, so a completion whose request
reached a provider that then failed (reset, timeout, a cut stream) is sent again. The failed
attempt may have been generated, and billed, in full: a failover or resume can cost twice.
That is the price of an answer instead of an error; set LLM_MAX_ATTEMPTS=1 to never pay it.

Every request writes one JSON line to LLM_USAGE_LOG: the member that answered (the last one
relayed, for a resumed stream), its model, the provider's ``usage`` and the content events the
client got, for buffered and streamed replies, also when the client hung up. After a resume
the provider's usage covers its own part only (the cut attempt never reported one).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import time

from forkproxy import Proxy, RetryPolicy, Upstream, UpstreamPool, refuse_start
from forkproxy.sse import event_data

UNAUTHORIZED = {"error": {"message": "invalid or missing API key", "type": "unauthorized"}}
ERROR_EVENT = re.compile(rb"^event: ?error\r?$", re.MULTILINE)
EVENT_END = re.compile(rb"\r\n\r\n|\n\n|\r\r")  # the blank line that ends an SSE event
# Our key refused (the client's was checked) or the provider failing: the member's fault, not the request's,
# so the next member is tried and the failure counts in the member's health.
MEMBER_FAULTS = (401, 403, 500, 502, 503, 504)


class StreamFault(Exception):
    """A provider's event that must not reach the client; the message is client-safe (it ends the stream)."""


def read_event(event: bytes) -> dict | None:
    """The JSON of a provider's SSE event, None when it has none (a comment, ``[DONE]``).

    StreamFault for an in-band error (``event: error``, ``data: {"error": ...}``) or data that is not JSON.
    """
    data = event_data(event)
    if data is None or data == b"[DONE]":
        return None
    try:
        payload = json.loads(data)
    except ValueError:
        payload = None
    if not isinstance(payload, dict):
        raise StreamFault("the model provider sent an event that is not a JSON object")
    if ERROR_EVENT.search(event) or "error" in payload:
        raise StreamFault("the model provider reported an error mid-stream")
    return payload


def error_code(body: bytes) -> str | None:
    """The ``error.code`` of a provider's JSON error body."""
    try:
        error = json.loads(body).get("error")
    except (ValueError, AttributeError):
        return None
    return error.get("code") if isinstance(error, dict) else None


def retry_after(ures) -> float | None:
    """A ``Retry-After`` in seconds; None without one (an HTTP date too: it is a long wait)."""
    value = ures.headers.get("Retry-After", "").strip()
    return float(value) if value.isdigit() else None


class FallbackGateway(Proxy):
    client_keys: frozenset = frozenset()
    max_attempts = 4
    max_retry_after = 2.0
    usage_log: str | None = None

    # -- before the upstream ----------------------------------------------------

    def before_forward(self, req, res, ureq):
        key = req.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        if key not in self.client_keys:
            res.status, res.body = 401, json.dumps(UNAUTHORIZED)
            res.headers["Content-Type"] = "application/json"
            return True
        req.ivars["client"] = hashlib.sha256(key.encode()).hexdigest()[:12]
        req.ivars["started"] = time.monotonic()
        ureq.headers.pop("Authorization", None)  # the client's key never reaches a provider
        body = req.json()
        if isinstance(body, dict):
            req.ivars["model"] = body.get("model")
            if body.get("stream") and "stream_options" not in body:
                body["stream_options"] = {"include_usage": True}  # ask for the usage event
                ureq.body = json.dumps(body)
        return False

    def rewrite_path(self, path):
        return path.removeprefix("/v1") if path.startswith("/v1/") else path  # the member's URL has its own

    def before_attempt(self, req, ureq, upstream):
        if "key" in upstream.meta:
            ureq.headers["Authorization"] = "Bearer " + upstream.meta["key"]
        if isinstance(req.json(), dict):  # a completion: this member's model, on the copy this attempt sends
            body = json.loads(ureq.body)
            body["model"] = upstream.meta["model"]
            ureq.body = json.dumps(body)

    def stream_request(self, req):
        body = req.json()
        return isinstance(body, dict) and body.get("stream") is True

    def retry_policy(self, req):
        # POST opted in: a failover or resume after the request reached a provider can be billed twice.
        return RetryPolicy(max_attempts=self.max_attempts, base_backoff_ms=100,
                           max_backoff_ms=int(self.max_retry_after * 1000),
                           retry_on_status=MEMBER_FAULTS, retry_methods=("GET", "HEAD", "POST"))

    # -- verdicts on a reply head (with its error body, or a stream's first event) --

    def judge_reply(self, req, ures):
        if ures.status == 429:
            return self.judge_rate_limit(req, ures)
        if ures.status == 400:
            return "fail_over" if error_code(ures.body) == "context_length_exceeded" else "accept"
        if ures.status == 200 and "text/event-stream" in ures.headers.get("Content-Type", ""):
            try:  # a stream's first events, held back with the head (first_byte_timeout): nothing went out yet
                for event in EVENT_END.split(ures.body):
                    read_event(event)
            except StreamFault:
                return "fail_over"
        return None  # MEMBER_FAULTS: the RetryPolicy and the pool's health; anything else is accepted

    def judge_rate_limit(self, req, ures):
        """Wait a short Retry-After on the same member, once; otherwise move on now."""
        retried = req.ivars.setdefault("retried_429", set())
        wait = retry_after(ures)
        if wait is not None and wait <= self.max_retry_after and ures.upstream_name not in retried:
            retried.add(ures.upstream_name)
            return "retry"
        return "fail_over"

    # -- the stream ---------------------------------------------------------------

    def on_stream_chunk(self, chunk, out, stats):
        try:
            event = read_event(chunk)
        except StreamFault as fault:
            return out.fail(str(fault))  # never sent: the stream fails here and is resumed or ended cleanly
        out.write(chunk)
        if event is None:
            stats.meta["done"] = stats.meta.get("done") or event_data(chunk) == b"[DONE]"
            return
        for choice in event.get("choices") or ():
            self.delivered(choice, stats.meta)
        if event.get("usage"):
            stats.meta["usage"] = event["usage"]

    @staticmethod
    def delivered(choice: dict, meta: dict) -> None:
        """Count what one choice of an event gave the client, and keep its text for a resume."""
        delta = choice.get("delta") or {}
        if delta.get("content"):
            meta["text"] = meta.get("text", "") + delta["content"]
            meta["events"] = meta.get("events", 0) + 1
        if delta.get("tool_calls") or choice.get("index", 0) != 0:
            meta["text_only"] = False  # a prefill cannot continue tool calls or a second choice
        if choice.get("finish_reason"):
            meta["finished"] = True

    def resume_stream(self, req, ureq, stats, upstream):
        text = stats.meta.get("text", "")
        if not text:
            return True  # nothing of the answer went out: a plain failover, no prefill sent
        if not upstream.meta.get("resume") or not stats.meta.get("text_only", True):
            return False  # the client gets a clean upstream_stream_failed event
        body = json.loads(ureq.body)
        body["messages"] = [*body["messages"], {"role": "assistant", "content": text}]
        ureq.body = json.dumps(body)
        return True

    def on_stream_end(self, req, out, stats):
        meta = stats.meta
        if meta.get("finished") and not meta.get("done") and not stats.errored and not stats.client_disconnected:
            out.write(b"data: [DONE]\n\n")  # the provider forgot it; clients wait for it
        self.record(req, stats.upstream, streamed=True, status=stats.status, usage=meta.get("usage"),
                    events=meta.get("events", 0), resumes=stats.resumes, errored=stats.errored,
                    client_disconnected=stats.client_disconnected, error=stats.error and stats.error.type)

    # -- buffered replies -----------------------------------------------------------

    def after_forward(self, req, ures, res):
        if "client" not in req.ivars:
            return  # refused before it was ours to account
        usage = None
        if ures.status == 200:
            try:
                usage = json.loads(res.body).get("usage")
            except (ValueError, AttributeError):
                pass
        self.record(req, ures.upstream_name, streamed=False, status=res.status, usage=usage,
                    error=ures.error and ures.error.type)

    def record(self, req, member: str, **fields) -> None:
        """One usage line: who asked, which member answered with which model, and what it cost."""
        line = {"ts": round(time.time(), 3), "client": req.ivars["client"], "asked": req.ivars.get("model"),
                "upstream": member, "model": self.model_of(member), "retries": req.ivars.get("proxy_retry_count", 0),
                "seconds": round(time.monotonic() - req.ivars["started"], 3), **fields}
        text = json.dumps(line) + "\n"
        if self.usage_log:
            with open(self.usage_log, "a") as f:  # one write per line: lines from workers never interleave
                f.write(text)
        else:
            sys.stderr.write(text)

    def model_of(self, member: str) -> str | None:
        return next((m.meta["model"] for m in self.upstream.members if m.name == member), None)


# -- configuration from the environment ------------------------------------------------


def required(env, name: str, example: str) -> str:
    value = env.get(name, "").strip()
    if not value:
        refuse_start(f"examples.llm_pools: set {name}, e.g. {name}={example}")
    return value


def number(env, name: str, default: float, minimum: float = 0) -> float:
    text = env.get(name, "").strip() or str(default)
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value >= minimum:  # NaN too
        refuse_start(f"examples.llm_pools: {name} must be a number of at least {minimum:g}: {text!r}")
    return value


def names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def member(env, name: str, backup: bool) -> Upstream:
    """One deployment, from its LLM_<NAME>_* variables."""
    var = "LLM_" + re.sub(r"[^A-Za-z0-9]", "_", name).upper()
    meta = {"model": required(env, var + "_MODEL", "gpt-4o"), "resume": env.get(var + "_RESUME", "0") == "1"}
    if env.get(var + "_KEY"):
        meta["key"] = env[var + "_KEY"]
    return Upstream(required(env, var + "_URL", "https://api.openai.com/v1"), name=name, backup=backup, meta=meta)


def from_env(env=os.environ) -> FallbackGateway:
    primaries = names(required(env, "LLM_PRIMARY", "openai"))
    members = [member(env, name, False) for name in primaries]
    members += [member(env, name, True) for name in names(env.get("LLM_FALLBACK", ""))]
    pool = UpstreamPool(members, balance="least_busy", max_fails=int(number(env, "LLM_MAX_FAILS", 2, minimum=1)),
                        fail_timeout=number(env, "LLM_FAIL_TIMEOUT", 10), fail_on_status=MEMBER_FAULTS)
    timeout = number(env, "LLM_TIMEOUT", 60)
    gateway = FallbackGateway(pool, timeout=timeout, connect_timeout=min(5.0, timeout),
                              deadline=number(env, "LLM_DEADLINE", 120),
                              first_byte_timeout=number(env, "LLM_FIRST_BYTE_TIMEOUT", 10),
                              stream_idle_timeout=number(env, "LLM_STREAM_IDLE_TIMEOUT", 15))
    gateway.client_keys = frozenset(names(required(env, "LLM_CLIENT_KEYS", "team-a-key,team-b-key")))
    gateway.max_attempts = int(number(env, "LLM_MAX_ATTEMPTS", 4, minimum=1))
    gateway.max_retry_after = number(env, "LLM_MAX_RETRY_AFTER", 2)
    gateway.usage_log = env.get("LLM_USAGE_LOG")
    return gateway


try:
    app = from_env()
except ValueError as bad:  # a URL or setting forkproxy refused; its message names it
    refuse_start(f"examples.llm_pools: {bad}")
