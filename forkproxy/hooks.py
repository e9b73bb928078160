"""The hooks: one spec each, and what happens when one raises.

``HOOKS`` is the single source of the hooks' names, signatures and defaults,
of when each runs and what forkproxy does with its outcome (``then``), and
of which side of the reply head it runs on, which decides the error policy.
``HOOK_NAMES`` and the README's hook table (``hook_table``; a test holds the
README to it, and ``Proxy``'s methods to the signatures) come from it.

The error policy: a hook is user code, so an exception out of it is the
hook's failure, never the proxy's. It is logged once with its traceback and
the request's id, it ends only the request (or stream, or tunnel) it ran
for, and the worker goes on serving. What the client sees depends on whether
the reply head already went out:

- Before the head (``call``): the client gets 500 ``hook_error``. A
  ``ProxyError`` raised on purpose is the one exception to that: it is how a
  hook answers with one of the proxy's own errors (``raise
  RateLimited(...)``, ``raise BadRequest(...)``), sent as that error's
  status and JSON, like any error the proxy makes.
- After the head (``call_after_head``): the status cannot change any more;
  each spec's ``if_raises`` says what follows. The end hooks still run
  exactly once, and a failing end hook leaves the end as it was.

``charge`` raises ``ValueError`` for a bad amount like any library call: it
is the calling hook's exception, under the same rules.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, NamedTuple

from forkproxy.errors import HookError, ProxyError

log = logging.getLogger("forkproxy")

BEFORE_HEAD, AFTER_HEAD = "before the head", "after the head"
_HOOK_ERROR = "500 `hook_error` (a `ProxyError` it raises is the answer)"


class HookSpec(NamedTuple):
    name: str
    params: tuple[str, ...]  # after ``self``; a function registered with ``@proxy.hook`` takes the same
    returns: str | None  # what it returns, as the README writes it; None: nothing
    default: str  # what ``Proxy``'s own method does, as the README's table says it
    when: str  # when it runs, as the README's table says it
    then: str  # what forkproxy does with its outcome
    phase: str  # BEFORE_HEAD or AFTER_HEAD: ``call`` or ``call_after_head``
    if_raises: str  # what the client sees when it raises

    def signature(self) -> str:
        shown = f"{self.name}({', '.join(self.params)})"
        return f"{shown} -> {self.returns}" if self.returns else shown


HOOKS: tuple[HookSpec, ...] = (
    HookSpec("pick_upstream", ("req",), "str", "`self.upstream`",
             "per request: base URL (scheme, host, port, optional prefix)",
             "a URL is checked as a base URL (500 `hook_error` when it is not one); an `UpstreamPool` picks "
             "the member of each attempt", BEFORE_HEAD, _HOOK_ERROR),
    HookSpec("rewrite_path", ("path",), "str", "`path`",
             "the raw path+query as received; must return a path starting with `/`",
             "the result is `ureq.path`, checked with the rest of `ureq` after `before_forward`",
             BEFORE_HEAD, _HOOK_ERROR),
    HookSpec("retry_policy", ("req",), "RetryPolicy", "one attempt", "per request",
             "the policy decides the attempts, their backoff and which failures are retried",
             BEFORE_HEAD, _HOOK_ERROR),
    HookSpec("before_forward", ("req", "res", "ureq"), "bool", "`False`",
             "body received, before any upstream call; `True` sends `res` instead",
             "`ureq` is checked (a token method, a path starting with `/` without spaces or controls, headers "
             "HTTP can carry; else 500 `hook_error` and nothing is sent), then forkproxy sets Host and "
             "Content-Length and drops hop-by-hop fields; `True` skips limits and upstream, and `after_forward` "
             "still runs", BEFORE_HEAD, _HOOK_ERROR),
    HookSpec("before_attempt", ("req", "ureq", "upstream"), None, "nothing",
             "before every attempt (the first, retries, failovers), on a fresh copy of the `ureq` "
             "`before_forward` left; `upstream` is the attempt's `Upstream` (see Failover)",
             "what it changed goes to that attempt only, checked as `before_forward`'s `ureq` is (else 500 "
             "`hook_error` and nothing is sent)", BEFORE_HEAD, _HOOK_ERROR),
    HookSpec("judge_reply", ("req", "ures"), "str | None", "`None`",
             "on every upstream reply head before it is accepted, `ures.body` read when its status is 400 or more "
             "(see Failover)",
             "`\"accept\"` takes it, `\"retry\"` sends again to the same member, `\"fail_over\"` moves on to the "
             "next member, `None` leaves it to the retry policy; anything else is 500 `hook_error`",
             BEFORE_HEAD, _HOOK_ERROR),
    HookSpec("after_forward", ("req", "ures", "res"), None, "nothing",
             "once for every request not streamed — also after a short-circuit or a proxy-made error "
             "(`ures.status == 0`, `ures.error` set)",
             "headers it set are checked (500 `hook_error` when one cannot go out); Content-Length becomes "
             "the body's (not for HEAD, 204, 304), hop-by-hop fields are dropped, X-Request-ID and the "
             "RateLimit fields are added", BEFORE_HEAD, _HOOK_ERROR),
    HookSpec("stream_request", ("req",), "bool", "`False`", "`True` = relay the reply on the streaming path",
             "`True` streams any reply that may have a body; an event stream is streamed anyway",
             BEFORE_HEAD, _HOOK_ERROR),
    HookSpec("on_stream_chunk", ("chunk", "out", "stats"), None, "`out.write(chunk)`", "once per stream unit",
             "what it wrote goes to the client at once; nothing written, nothing sent for the unit",
             AFTER_HEAD, "the stream is cut (`stats.errored`), `on_stream_end` still runs"),
    HookSpec("resume_stream", ("req", "ureq", "stats", "upstream"), "bool", "not set: `False`",
             "when a stream fails after its head went out, while attempts and the deadline allow (see Failover); "
             "`ureq` is a copy of the request `before_forward` left, `upstream` the next live member",
             "`True` sends `ureq` to `upstream` (through `before_attempt`) and relays that reply's units after "
             "those sent, its head not passed on; a reply that fails before its first unit asks again for the "
             "next member; `False` ends the stream as failed",
             AFTER_HEAD, "the stream ends as failed (`stats.errored`), `on_stream_end` still runs"),
    HookSpec("on_stream_end", ("req", "out", "stats"), None, "nothing",
             "once per streamed response, `out` still writable",
             "what it wrote is sent, then the reply ends and its access-log line is written",
             AFTER_HEAD, "logged; the stream ends as it would have"),
    HookSpec("on_ws_message", ("msg", "out", "stats"), None, "not set: bytes are copied",
             "once per WebSocket data message in a tunnel (see Tunnels)",
             "what it sent is framed by forkproxy; a message it did not send is dropped",
             AFTER_HEAD, "the tunnel closes with 1011, `on_tunnel_end` still runs"),
    HookSpec("on_tunnel_end", ("req", "stats"), None, "nothing", "once per tunnel, after it closed, whoever closed it",
             "the tunnel's access-log line is written", AFTER_HEAD, "logged; the tunnel's end stays as it was"),
    HookSpec("rate_limits", ("req",), "list[Limit]", "`[]`",
             "after `before_forward`, before any upstream call (see Rate limits)",
             "the limits are taken together: 429 when one is spent, RateLimit fields on the reply otherwise",
             BEFORE_HEAD, _HOOK_ERROR),
)
HOOK_NAMES: tuple[str, ...] = tuple(spec.name for spec in HOOKS)


def hook_table() -> str:
    """The README's hook table."""
    rows = ["| hook | default | when |", "|---|---|---|"]
    rows += [f"| `{_cell(spec.signature())}` | {spec.default} | {spec.when} |" for spec in HOOKS]
    return "\n".join(rows)


def _cell(text: str) -> str:
    """``text`` in a Markdown table cell: a ``|`` (``str | None``) is escaped."""
    return text.replace("|", "\\|")


def call(hook: Callable, *args: Any) -> Any:
    """Run a hook that runs before the reply head; what it raises becomes a 500 ``hook_error``.

    The client is told the hook's name and the exception's type; its text
    and traceback go to the log line. A ``ProxyError`` passes unchanged:
    the hook answers with it.
    """
    try:
        return hook(*args)
    except ProxyError:
        raise
    except Exception as exc:  # its text may hold an address, an OS error or a secret: the log's, not the client's
        raise HookError(f"hook {name_of(hook)!r} raised {type(exc).__name__}; the proxy's log has the details") from exc


def call_after_head(hook: Callable, where: str, *args: Any) -> Exception | None:
    """Run a hook that runs once the reply head went out; log and return what it raised, if anything.

    ``where`` names the request in the log line (``messages.describe``).
    """
    try:
        hook(*args)
    except Exception as exc:
        log_failure(hook, where, exc)
        return exc
    return None


def log_failure(hook: Callable, where: str, exc: BaseException) -> str:
    """The one log line (with traceback) of a hook that raised after the head; its reason, for the end's line."""
    reason = f"hook {name_of(hook)!r} raised {type(exc).__name__}: {exc}"
    log.error("%s: %s", where, reason, exc_info=exc)
    return reason


def name_of(hook: Callable) -> str:
    return getattr(hook, "__name__", None) or repr(hook)
