"""What happens when a hook raises: one policy for every hook, kept here.

A hook is user code, so an exception out of it is the hook's failure, never
the proxy's: it is logged once with its traceback and the request's id, it
ends only the request (or stream, or tunnel) it ran for, and the worker
goes on serving. What the client sees depends on whether the reply head
already went out:

- Before the head (``pick_upstream``, ``rewrite_path``, ``retry_policy``,
  ``before_forward``, ``rate_limits``, ``stream_request``, ``after_forward``):
  the client gets 500 ``hook_error``. A ``ProxyError`` raised on purpose is
  the one exception to that: it is how a hook answers with one of the
  proxy's own errors (``raise RateLimited(...)``, ``raise BadRequest(...)``),
  sent as that error's status and JSON, like any error the proxy makes.
- After the head (``on_stream_chunk``, ``on_stream_end``, ``on_ws_message``,
  ``on_tunnel_end``): the status cannot change any more. A failing
  ``on_stream_chunk`` cuts the stream (``stats.errored``), a failing
  ``on_ws_message`` closes the tunnel with 1011; the end hooks still run
  exactly once, and a failing end hook leaves the end as it was.

``charge`` raises ``ValueError`` for a bad amount like any library call: it
is the calling hook's exception, under the same rules.
"""
from __future__ import annotations

import logging
from typing import Any, Callable

from forkproxy.errors import HookError, ProxyError

log = logging.getLogger("forkproxy")


def call(hook: Callable, *args: Any) -> Any:
    """Run a hook that runs before the reply head; what it raises becomes a 500 ``hook_error``.

    A ``ProxyError`` passes unchanged: the hook answers with it.
    """
    try:
        return hook(*args)
    except ProxyError:
        raise
    except Exception as exc:
        raise HookError(f"hook {name_of(hook)!r} raised {type(exc).__name__}: {exc}") from exc


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
