"""A fake OpenAI-compatible provider that misbehaves on command, for the failover tests.

A real HTTP/1.1 server on 127.0.0.1 (an ephemeral port, one thread per
connection), started and stopped by the test::

    with OpenAIUpstream(name="openai", key="sk-1", tokens=60) as fake:
        fake.url                                   # "http://127.0.0.1:PORT"
        fake.next(Fault.status(429, retry_after=1), Fault.status(500))
        ...
        assert [c.fault for c in fake.calls] == ["status 429", "status 500", "ok"]

What it serves, under any path prefix (so providers can differ in paths):

- ``POST .../chat/completions``: the answer ``"tok0 tok1 ... tok{tokens-1}"``.
  Buffered: a ``chat.completion`` with ``usage``. With ``"stream": true``: an
  SSE stream, one ``chat.completion.chunk`` per token
  (``choices[0].delta.content`` is "tok0", " tok1", ...), a chunk with
  ``finish_reason`` "stop", a usage chunk when ``stream_options.include_usage``,
  then ``data: [DONE]``. A trailing assistant message is a prefill: the answer
  continues where the prefill ended, so prefill + reply is the whole answer (a
  prefill that is not a start of the answer gets the whole answer, so
  duplicated text shows). ``usage``: prompt_tokens = words in the messages,
  completion_tokens = tokens in this reply.
- ``GET .../models``: the ``models`` list.
- With ``key`` set, an Authorization other than ``Bearer <key>`` gets OpenAI's
  401 ``invalid_api_key`` (before any fault).
- Every completion and chunk has ``system_fingerprint`` = ``name``, so a test
  sees which provider wrote which event.

Commands (any time, from the test; a request takes the first that applies: a
fault queued by ``next``, the fault for its model, the standing fault, else a
normal answer):

- ``fake.next(*faults)``: the next ``len(faults)`` requests get one each, in order.
- ``fake.for_model(model, fault)``: every request for that model (``None`` removes it).
- ``fake.always(fault)``: every request (``None``: back to normal answers).
- ``fake.clear()``: forget the commands and the recorded calls.
- ``fake.tokens`` (answer length), ``fake.gap`` (seconds after each event): attributes.

Faults, built with the class methods of ``Fault``. In a stream, ``after`` counts
events: the tokens first, then the finish, the usage and the ``[DONE]`` event.

- ``Fault.ok()``: a normal answer, e.g. ``next(Fault.ok(), Fault.status(500))``.
- ``Fault.status(code, retry_after=None)``: OpenAI's error JSON for ``code``
  (429 ``rate_limit_exceeded``, 500 ``server_error``, 503 overloaded, any
  other), with ``Retry-After`` when given. "500 once" is
  ``next(Fault.status(500))``, "503 for good" ``always(Fault.status(503))``.
- ``Fault.context_length_exceeded()``: OpenAI's 400 ``context_length_exceeded``.
- ``Fault.content_filter()``: the 400 ``content_filter`` of Azure OpenAI.
- ``Fault.reset()``: reads the request, then resets the connection (RST) before any byte.
- ``Fault.silence()``: reads the request and never answers (until the client, or ``close``, ends it).
- ``Fault.slow_first_token(seconds)``: the head at once, the first event after
  ``seconds`` (a buffered request: the whole reply after ``seconds``).
- ``Fault.empty()``: a 200 event stream without one event (``Content-Length: 0``).
- ``Fault.cut(after)``: ``after`` events, then the connection closes without the final chunk.
- ``Fault.stall(after, seconds)``: ``after`` events, ``seconds`` of silence, then the rest.
- ``Fault.malformed(after)``: ``after`` events, an event whose data is not JSON, then the rest.
- ``Fault.no_done()``: the whole stream, ending cleanly, but without ``data: [DONE]``.
- ``Fault.error_event(after, named=False)``: ``after`` events, then
  ``data: {"error": {...}}`` (``named``: after an ``event: error`` line), and the
  stream ends cleanly without ``[DONE]``.
- ``Fault.flapping(fault=Fault.status(503), seconds=None)``: every other
  request gets ``fault`` (the first included) for ``seconds`` from the first one
  (``None``: for good); then normal answers. Use it with ``always`` or ``for_model``.

A stream fault other than ``slow_first_token`` on a buffered request is a 500
``fake_misuse``, so a mistaken test shows.

Recorded: ``fake.calls`` lists a ``Call`` per request, in arrival order (recorded
before it is answered): ``method``, ``path`` (with the query), ``headers``,
``body`` (the parsed JSON, or None), ``fault`` (what it got: "ok", "status 429",
"cut", ..., "invalid_api_key", "fake_misuse"), ``at`` (monotonic); and ``header(name)``, ``key`` (the bearer
token), ``model``, ``stream``, ``messages``, ``prefill`` (the content of a
trailing assistant message, or None).
"""
from __future__ import annotations

import json
import re
import socket
import struct
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from tests.support.servers import Handler, Seen, Server, reset as drop

CREATED = 1764633600


@dataclass
class Call:
    """One request as the fake received it, and the fault it got."""

    method: str
    path: str
    headers: list[tuple[str, str]]
    body: dict | None
    fault: str = "ok"
    at: float = field(default_factory=time.monotonic)

    @classmethod
    def of(cls, seen: Seen) -> Call:
        try:
            body = json.loads(seen.body) if seen.body else None
        except ValueError:
            body = None
        return cls(seen.method, seen.path, seen.headers, body if isinstance(body, dict) else None)

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)

    @property
    def key(self) -> str | None:
        auth = self.header("authorization")
        return auth.removeprefix("Bearer ") if auth else None

    @property
    def model(self) -> str | None:
        return (self.body or {}).get("model")

    @property
    def stream(self) -> bool:
        return bool((self.body or {}).get("stream"))

    @property
    def messages(self) -> list:
        return (self.body or {}).get("messages") or []

    @property
    def prefill(self) -> str | None:
        last = self.messages[-1] if self.messages else None
        if isinstance(last, dict) and last.get("role") == "assistant" and isinstance(last.get("content"), str):
            return last["content"]
        return None


@dataclass
class Exchange:
    """One request being answered: what a fault acts on."""

    fake: OpenAIUpstream
    handler: Handler
    call: Call

    def json(self, status: int, payload: dict, headers: list[tuple[str, str]] = ()) -> None:
        self.handler.reply(status, json.dumps(payload).encode(), list(headers), content_type="application/json")

    def pause(self, seconds: float | None) -> None:
        """Wait ``seconds`` (None: until the fake closes); a fake closing meanwhile drops this exchange."""
        if self.fake.closing.wait(seconds):
            raise ConnectionAbortedError("fake upstream closed")

    def send(self, event: bytes) -> None:
        self.handler.chunk(event)
        self.pause(self.fake.gap)

    def deltas(self) -> list[str]:
        """The answer's tokens, after the prefill when there is one."""
        full = " ".join(f"tok{i}" for i in range(self.fake.tokens))
        prefill = self.call.prefill or ""
        rest = full[len(prefill):] if full.startswith(prefill) else full
        return re.findall(r"\s*\S+", rest)

    def usage(self) -> dict:
        prompt = sum(len(m["content"].split()) for m in self.call.messages
                     if isinstance(m, dict) and isinstance(m.get("content"), str))
        completion = len(self.deltas())
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def base(self, kind: str) -> dict:
        return {"id": f"chatcmpl-{self.fake.name}", "object": kind, "created": CREATED,
                "model": self.call.model, "system_fingerprint": self.fake.name}

    def events(self) -> list[bytes]:
        """The whole stream of a normal answer, one SSE event each."""
        base = self.base("chat.completion.chunk")

        def chunk(delta: dict, finish: str | None) -> bytes:
            return sse({**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
        out = [chunk({"role": "assistant", "content": d} if i == 0 else {"content": d}, None)
               for i, d in enumerate(self.deltas())]
        out.append(chunk({}, "stop"))
        if ((self.call.body or {}).get("stream_options") or {}).get("include_usage"):
            out.append(sse({**base, "choices": [], "usage": self.usage()}))
        return out + [b"data: [DONE]\n\n"]


def sse(payload: dict) -> bytes:
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


def error(message: str, type_: str | None, code: str | None = None, param: str | None = None) -> dict:
    """OpenAI's error body."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def answer(ex: Exchange) -> None:
    """A normal answer: chat completions, models, else OpenAI's 404."""
    call, path = ex.call, ex.call.path.split("?")[0]
    if call.method == "POST" and path.endswith("/chat/completions"):
        return chat(ex)
    if call.method == "GET" and path.endswith("/models"):
        return ex.json(200, {"object": "list", "data": [
            {"id": m, "object": "model", "created": CREATED, "owned_by": ex.fake.name} for m in ex.fake.models]})
    ex.json(404, error(f"Invalid URL ({call.method} {path})", "invalid_request_error"))


def chat(ex: Exchange) -> None:
    if ex.call.body is None:
        return ex.json(400, error("We could not parse the JSON body of your request.", "invalid_request_error"))
    if ex.call.stream:
        return relay(ex)
    ex.json(200, {**ex.base("chat.completion"), "usage": ex.usage(), "choices": [{
        "index": 0, "finish_reason": "stop",
        "message": {"role": "assistant", "content": "".join(ex.deltas())}}]})


def relay(ex: Exchange, after: int | None = None, pause: float = 0.0, insert: bytes = b"",
          then: str = "continue") -> None:
    """Stream the answer's events: ``after`` of them, a pause, an inserted event, then
    the rest (``"continue"``), a clean end (``"end"``) or a close without the final chunk (``"close"``)."""
    events = ex.events()
    ex.handler.start_chunked(200, [("Cache-Control", "no-cache")], content_type="text/event-stream")
    for event in events[:after]:
        ex.send(event)
    ex.pause(pause)
    if insert:
        ex.send(insert)
    if then == "close":
        ex.handler.close_connection = True
        return
    if then == "continue" and after is not None:
        for event in events[after:]:
            ex.send(event)
    ex.handler.end_chunked()


def reset_connection(ex: Exchange) -> None:
    """RST at once: linger 0, then the last reference to the socket closed (no FIN first)."""
    conn = ex.handler.connection
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    ex.handler.close_connection = True
    ex.handler.rfile.close()
    conn.close()


STATUS_ERRORS = {
    429: ("Rate limit reached for requests per min (RPM): Limit 3, Used 3, Requested 1.", "requests",
          "rate_limit_exceeded"),
    500: ("The server had an error while processing your request. Sorry about that!", "server_error", None),
    503: ("The engine is currently overloaded, please try again later", "server_error", None),
}
CONTENT_FILTER = {"error": {
    "message": "The response was filtered due to the prompt triggering Azure OpenAI's content management policy. "
               "Please modify your prompt and retry.",
    "type": None, "param": "prompt", "code": "content_filter", "status": 400,
    "innererror": {"code": "ResponsibleAIPolicyViolation", "content_filter_result": {
        "hate": {"filtered": False, "severity": "safe"}, "self_harm": {"filtered": False, "severity": "safe"},
        "sexual": {"filtered": False, "severity": "safe"}, "violence": {"filtered": True, "severity": "high"}}}}}
IN_BAND_ERROR = error("The server had an error while processing your request. Sorry about that!", "server_error")


@dataclass(eq=False)
class Fault:
    """One way to answer a request; build it with the class methods."""

    name: str
    act: Callable[[Exchange], None] = field(repr=False)
    streamed_only: bool = False

    def resolve(self) -> Fault:
        """The fault this request gets (a flapping fault alternates)."""
        return self

    @classmethod
    def ok(cls) -> Fault:
        return cls("ok", answer)

    @classmethod
    def status(cls, code: int, retry_after: float | str | None = None) -> Fault:
        message, type_, err = STATUS_ERRORS.get(
            code, (f"Fake error {code}", "server_error" if code >= 500 else "invalid_request_error", None))
        headers = [("Retry-After", str(retry_after))] if retry_after is not None else []
        return cls(f"status {code}", lambda ex: ex.json(code, error(message, type_, err), headers))

    @classmethod
    def context_length_exceeded(cls) -> Fault:
        body = error("This model's maximum context length is 8192 tokens. However, your messages resulted in "
                     "8765 tokens. Please reduce the length of the messages.", "invalid_request_error",
                     "context_length_exceeded", param="messages")
        return cls("context_length_exceeded", lambda ex: ex.json(400, body))

    @classmethod
    def content_filter(cls) -> Fault:
        return cls("content_filter", lambda ex: ex.json(400, CONTENT_FILTER))

    @classmethod
    def reset(cls) -> Fault:
        return cls("reset", reset_connection)

    @classmethod
    def silence(cls) -> Fault:
        return cls("silence", lambda ex: ex.pause(None))

    @classmethod
    def slow_first_token(cls, seconds: float) -> Fault:
        def act(ex: Exchange) -> None:
            if ex.call.stream:
                return relay(ex, after=0, pause=seconds)
            ex.pause(seconds)
            answer(ex)
        return cls("slow_first_token", act)

    @classmethod
    def empty(cls) -> Fault:
        """A 200 event stream with no event at all (Content-Length: 0): an overloaded provider's empty answer."""
        return cls("empty", lambda ex: ex.handler.reply(200, b"", content_type="text/event-stream"),
                   streamed_only=True)

    @classmethod
    def cut(cls, after: int) -> Fault:
        return cls("cut", lambda ex: relay(ex, after, then="close"), streamed_only=True)

    @classmethod
    def stall(cls, after: int, seconds: float) -> Fault:
        return cls("stall", lambda ex: relay(ex, after, pause=seconds), streamed_only=True)

    @classmethod
    def malformed(cls, after: int) -> Fault:
        return cls("malformed", lambda ex: relay(ex, after, insert=b'data: {"choices": [{"delta": \n\n'),
                   streamed_only=True)

    @classmethod
    def no_done(cls) -> Fault:
        return cls("no_done", lambda ex: relay(ex, -1, then="end"), streamed_only=True)

    @classmethod
    def error_event(cls, after: int, named: bool = False) -> Fault:
        event = (b"event: error\n" if named else b"") + sse(IN_BAND_ERROR)
        return cls("error_event", lambda ex: relay(ex, after, insert=event, then="end"), streamed_only=True)

    @classmethod
    def flapping(cls, fault: Fault | None = None, seconds: float | None = None) -> Fault:
        return Flapping(fault or cls.status(503), seconds)


class Flapping(Fault):
    """Every other request gets ``fault`` (the first included), for ``seconds`` from the first."""

    def __init__(self, fault: Fault, seconds: float | None) -> None:
        super().__init__("flapping", answer)
        self.fault, self.seconds = fault, seconds
        self.turns, self.since = 0, None

    def resolve(self) -> Fault:
        now = time.monotonic()
        self.since = now if self.since is None else self.since
        self.turns += 1
        over = self.seconds is not None and now - self.since >= self.seconds
        return self.fault if self.turns % 2 and not over else Fault.ok()


class OpenAIUpstream:
    """The fake provider; see the module docstring for its commands."""

    def __init__(self, name: str = "fake", *, key: str | None = None, tokens: int = 60, gap: float = 0.0,
                 models: tuple[str, ...] = ("fake-model",)) -> None:
        self.name, self.key, self.tokens, self.gap, self.models = name, key, tokens, gap, models
        self.closing = threading.Event()
        self.connections: set[socket.socket] = set()  # kept by servers.Handler
        self._lock = threading.Lock()
        self._queue: deque[Fault] = deque()
        self._by_model: dict[str, Fault] = {}
        self._standing: Fault | None = None
        self._calls: list[Call] = []
        self.server = Server(("127.0.0.1", 0), Handler)
        self.server.upstream = self
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        # a short poll interval: close() then takes milliseconds, not half a second
        threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True).start()

    def __enter__(self) -> OpenAIUpstream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def next(self, *faults: Fault) -> None:
        with self._lock:
            self._queue.extend(faults)

    def for_model(self, model: str, fault: Fault | None) -> None:
        with self._lock:
            if fault is None:
                self._by_model.pop(model, None)
            else:
                self._by_model[model] = fault

    def always(self, fault: Fault | None) -> None:
        with self._lock:
            self._standing = fault

    def clear(self) -> None:
        with self._lock:
            self._queue.clear()
            self._by_model.clear()
            self._standing = None
            self._calls.clear()

    @property
    def calls(self) -> list[Call]:
        with self._lock:
            return list(self._calls)

    def close(self) -> None:
        """Stop as a provider going away does: no new connections, the open ones (idle, paused or silent) dropped."""
        self.closing.set()
        self.server.shutdown()
        self.server.server_close()
        for conn in list(self.connections):
            drop(conn)

    # the interface servers.Handler calls
    def record(self, seen: Seen) -> None:
        """Nothing: ``_serve`` records each request with the fault it got."""

    def route_for(self, path: str) -> Callable[[Handler, Seen], None]:
        return self._serve

    def _serve(self, handler: Handler, seen: Seen) -> None:
        call = Call.of(seen)
        with self._lock:
            fault = self._choose(call)
            call.fault = fault.name
            self._calls.append(call)
        fault.act(Exchange(self, handler, call))

    def _choose(self, call: Call) -> Fault:
        if self.key is not None and call.header("authorization") != f"Bearer {self.key}":
            return INVALID_KEY
        if self._queue:
            fault = self._queue.popleft().resolve()
        else:
            chosen = self._by_model.get(call.model) or self._standing
            fault = chosen.resolve() if chosen else Fault.ok()
        return misuse(fault) if fault.streamed_only and not call.stream else fault


INVALID_KEY = Fault("invalid_api_key", lambda ex: ex.json(
    401, error("Incorrect API key provided.", "invalid_request_error", "invalid_api_key")))


def misuse(fault: Fault) -> Fault:
    """A stream fault asked of a buffered request: a 500 that makes the mistaken test fail."""
    return Fault("fake_misuse", lambda ex: ex.json(
        500, error(f"fake: {fault.name} needs a streamed request", "fake_misuse")))


def prefilled(ureq, stats, upstream) -> bool:
    """A ``resume_stream`` for the test apps: resume at ``upstream`` when its meta says ``"resume"``, the text
    delivered so far (kept in ``stats.meta["text"]``) as the trailing assistant message this fake continues."""
    if not upstream.meta.get("resume"):
        return False
    body = json.loads(ureq.body)
    body["messages"].append({"role": "assistant", "content": stats.meta.get("text", "")})
    ureq.body = json.dumps(body)
    return True
