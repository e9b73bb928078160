"""The objects handed to hooks: what came in, what goes out, both ways."""
from __future__ import annotations

import json
from typing import Any, Callable, Sequence
from urllib.parse import unquote

from urllib3 import HTTPHeaderDict

from forkproxy.errors import ProxyError
from forkproxy.tracing import NO_SPAN


def _as_bytes(data: bytes | str) -> bytes:
    """Body bytes; a str is UTF-8. Anything else is refused where it is set (in the hook that set it)."""
    if isinstance(data, bytes):
        return data
    if isinstance(data, str):
        return data.encode("utf-8")
    if isinstance(data, (bytearray, memoryview)):
        return bytes(data)
    raise TypeError(f"a body must be bytes or str, not {type(data).__name__}")


class Request:
    """The client's request as forkproxy received it."""

    rate_limit_headers: "Sequence[tuple[str, str]]" = ()  # RateLimit-Policy/RateLimit for the reply, once limited
    deadline: float = 0.0  # seconds from received to reply accepted (the setting; a hook may change it), 0 = none
    span: Any = NO_SPAN  # the request's OpenTelemetry span (SERVER): hooks set_attribute on it; a no-op when off
    _parsed: "tuple[bytes, Any] | None" = None  # (the body, its JSON) once json() parsed it

    def __init__(
        self,
        *,
        method: str,
        raw_path: str,
        headers: HTTPHeaderDict,
        body: bytes = b"",
        remote_addr: str = "",
        scheme: str = "http",
        environ: dict | None = None,
    ) -> None:
        self.method = method
        self.raw_path = raw_path
        path, _, self.query_string = raw_path.partition("?")
        self.path = unquote(path)
        self.headers = headers
        self.body = body
        self.remote_addr = remote_addr
        self.scheme = scheme
        self.environ = environ if environ is not None else {}
        self.ivars: dict[str, Any] = {}
        self.request_id = ""

    def json(self) -> Any:
        """The body parsed as JSON, or ``None`` when it is not JSON.

        Parsed once per body: hooks that each ask for it (``before_forward``,
        ``stream_request``, ``pick_upstream``) get the same object, so a
        change one makes to it is seen by the next (copy it to keep one's own).
        """
        body = self.body
        parsed = self._parsed
        if parsed is not None and parsed[0] is body:
            return parsed[1]
        try:
            value = json.loads(body)
        except ValueError:
            value = None
        self._parsed = (body, value)
        return value

    def __repr__(self) -> str:
        return f"<Request {self.method} {self.raw_path}>"


def describe(req: Request) -> str:
    """How a request is named in log lines: its ID, method and target."""
    return f"[{req.request_id}] {req.method} {req.raw_path}"


class Response:
    """What the client will get; hooks may change any field."""

    def __init__(self, status: int = 200, headers: HTTPHeaderDict | None = None, body: bytes | str = b"") -> None:
        self.status = status
        self.headers = headers if headers is not None else HTTPHeaderDict()
        self.body = body

    @property
    def body(self) -> bytes:
        return self._body

    @body.setter
    def body(self, data: bytes | str) -> None:
        self._body = _as_bytes(data)

    @classmethod
    def from_error(cls, error: ProxyError) -> "Response":
        headers = HTTPHeaderDict({"Content-Type": "application/json"})
        for name, value in error.headers:
            headers.add(name, value)
        return cls(error.status, headers, error.body())

    def __repr__(self) -> str:
        return f"<Response {self.status} {len(self._body)} bytes>"


class UpstreamRequest:
    """What the upstream will get; ``before_forward`` may change any field."""

    def __init__(self, method: str, path: str, headers: HTTPHeaderDict, body: bytes = b"") -> None:
        self.method = method
        self.path = path
        self.headers = headers
        self.body = body

    @property
    def body(self) -> bytes:
        return self._body

    @body.setter
    def body(self, data: bytes | str) -> None:
        self._body = _as_bytes(data)

    def __repr__(self) -> str:
        return f"<UpstreamRequest {self.method} {self.path}>"


class UpstreamResponse:
    """What the upstream answered; ``status == 0`` when no answer is used."""

    def __init__(
        self,
        status: int = 0,
        headers: HTTPHeaderDict | None = None,
        body: bytes = b"",
        error: ProxyError | None = None,
        attempts: int = 0,
        upstream: str = "",
        upstream_name: str = "",
    ) -> None:
        self.status = status
        self.headers = headers if headers is not None else HTTPHeaderDict()
        self.body = body
        self.error = error
        self.attempts = attempts
        self.upstream = upstream  # origin of the upstream that answered or was tried last
        self.upstream_name = upstream_name  # that member's name (host:port unless it was given one)

    def __repr__(self) -> str:
        return (f"<UpstreamResponse {self.status} from {self.upstream or '-'} attempts={self.attempts} "
                f"error={self.error!r}>")


class StreamStats:
    """Counters carried across one streamed response.

    ``req`` is the request being streamed, so that ``on_stream_chunk`` can
    see what ``before_forward`` put in ``req.ivars`` (the model, a tenant).
    ``status``, ``headers`` and ``upstream`` (the member's name) describe the
    upstream reply being relayed, and ``error`` is the ``ProxyError`` that
    failed the stream (None while it has not), so the hooks can see why.
    ``resumes`` counts the attempts that resumed it (``resume_stream``).
    """

    __slots__ = ("req", "byte_count", "chunk_count", "errored", "client_disconnected", "meta",
                 "status", "headers", "upstream", "error", "resumes")

    def __init__(self, req: Request | None = None) -> None:
        self.req = req
        self.byte_count = 0
        self.chunk_count = 0
        self.errored = False
        self.client_disconnected = False
        self.meta: dict[str, Any] = {}
        self.status = 0
        self.headers = HTTPHeaderDict()
        self.upstream = ""
        self.error: ProxyError | None = None
        self.resumes = 0

    def __repr__(self) -> str:
        return (f"<StreamStats units={self.chunk_count} bytes={self.byte_count} "
                f"errored={self.errored} client_disconnected={self.client_disconnected}>")


class StreamWriter:
    """``out`` of the stream hooks: bytes written here go to the client next.

    Writes are queued and handed to the server between units, so a hook stays
    plain blocking code; after the client is gone they are discarded.
    ``fail`` lets ``on_stream_chunk`` fail the upstream's stream at the unit
    it is handling, as if the upstream had broken it there.
    """

    __slots__ = ("_pending", "discarding", "failure")

    def __init__(self) -> None:
        self._pending: list[bytes] = []
        self.discarding = False
        self.failure: str | None = None  # the message given to fail, once it was called

    def fail(self, message: str) -> None:
        """Fail the stream at this unit: nothing written for it is sent, and the stream ends as an upstream failure."""
        self.failure = str(message)
        self._pending.append(b"")  # never empty now: the relay looks for a failure only where a unit wrote

    def write(self, data: bytes | str) -> None:
        if not self.discarding and data:
            self._pending.append(_as_bytes(data))

    @property
    def pending(self) -> bool:
        """Whether anything was written (or ``fail`` called) since the last ``take``."""
        return bool(self._pending)

    def take(self) -> list[bytes]:
        pending, self._pending = self._pending, []
        return pending


class TunnelStats:
    """What one tunnel carried, for ``on_tunnel_end`` (and ``on_ws_message``'s counting).

    ``closed_by`` is the side that ended it first: ``"client"``, ``"upstream"``,
    ``"idle"`` (``tunnel_idle_timeout`` with no byte either way) or ``"proxy"``
    (a message over the cap, a hook that failed, the worker stopping).
    """

    __slots__ = ("req", "bytes_from_client", "bytes_from_upstream", "messages_from_client",
                 "messages_from_upstream", "closed_by", "errored", "meta")

    def __init__(self, req: Request | None = None) -> None:
        self.req = req
        self.bytes_from_client = 0
        self.bytes_from_upstream = 0
        self.messages_from_client = 0
        self.messages_from_upstream = 0
        self.closed_by = ""
        self.errored = False
        self.meta: dict[str, Any] = {}

    def __repr__(self) -> str:
        return (f"<TunnelStats client={self.bytes_from_client}B/{self.messages_from_client}msg "
                f"upstream={self.bytes_from_upstream}B/{self.messages_from_upstream}msg "
                f"closed_by={self.closed_by or '-'} errored={self.errored}>")


class WebSocketMessage:
    """One complete WebSocket data message: ``data`` is str for text, bytes for binary."""

    __slots__ = ("data", "from_client")

    def __init__(self, data: str | bytes, from_client: bool) -> None:
        self.data = data
        self.from_client = from_client

    def __repr__(self) -> str:
        kind = "text" if isinstance(self.data, str) else "binary"
        return f"<WebSocketMessage {kind} {len(self.data)} from {'client' if self.from_client else 'upstream'}>"


class MessageWriter:
    """``out`` of ``on_ws_message``: each ``send`` passes a message on in the direction of the one handled.

    A str goes as a text message, bytes as binary; not calling it drops the message.
    """

    __slots__ = ("_send",)

    def __init__(self, send: Callable[[str | bytes], None]) -> None:
        self._send = send

    def send(self, data: str | bytes) -> None:
        if isinstance(data, (bytearray, memoryview)):
            data = bytes(data)
        if not isinstance(data, (str, bytes)):
            raise TypeError(f"out.send takes str or bytes, not {type(data).__name__}")
        self._send(data)
