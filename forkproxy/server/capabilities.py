"""What forkproxy relies on inside urllib3 and gunicorn, checked when a worker starts.

forkproxy overrides or reads a few internals of the two, listed in
``INTERNALS`` with the module that relies on each and why (the tunnel's
gunicorn internals are ``server.takeover``'s, checked by its own ``check``).
A release that changed one would fail later, on some request, or behave
differently without a word. ``check`` looks at the installed classes (it
connects, changes and keeps nothing) and raises ``Unsupported``: one line
naming the package, its version and what it lacks. ``server.worker``
runs it in each worker before it serves, and the worker's exit code stops
gunicorn's master. setup.py pins the releases forkproxy is tested with; CI
runs the suite against the newest ones too.

It runs after the app was imported: a name a module imports outright (say
``urllib3.response.MultiDecoder``) that a release removed fails that import
first, with gunicorn's own error.
"""
from __future__ import annotations

import ast
import builtins
import importlib
import inspect
import linecache
import textwrap
from typing import Any, Callable, NamedTuple

Lack = Callable[[Any], "str | None"]
"""What is wrong with an internal that was found, or None when it is as forkproxy relies on it."""


class Unsupported(RuntimeError):
    """The installed urllib3 or gunicorn lacks what forkproxy relies on; the message is one line."""


def _found(obj: Any) -> str | None:
    """Being there is all that is relied on."""
    return None


def _takes(*params: str) -> Lack:
    """A callable whose parameters include ``params`` (by name: the callers pass some as keywords)."""
    def lack(obj: Any) -> str | None:
        try:
            have = inspect.signature(obj).parameters
        except (TypeError, ValueError):
            return "cannot be inspected"
        gone = [name for name in params if name not in have]
        return f"no longer takes {', '.join(gone)}" if gone else None
    return lack


def _assigns(*attributes: str) -> Lack:
    """A function whose source assigns these attributes (``x.name = ...``): instance state no class shows."""
    def lack(obj: Any) -> str | None:
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(obj)))
        except (OSError, TypeError):
            return None  # installed without its sources: only the end-to-end tests can tell
        assigned = {target.attr for node in ast.walk(tree) if isinstance(node, (ast.Assign, ast.AnnAssign))
                    for target in (node.targets if isinstance(node, ast.Assign) else [node.target])
                    if isinstance(target, ast.Attribute)}
        gone = [name for name in attributes if name not in assigned]
        return f"no longer sets {', '.join(gone)}" if gone else None
    return lack


def _lets_through(dotted: str) -> Lack:
    """A function with no ``except`` clause that would catch the exception class ``dotted`` names."""
    def lack(func: Any) -> str | None:
        module, _, name = dotted.rpartition(".")
        ours = getattr(importlib.import_module(module), name)
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(func)))
        except (OSError, TypeError):
            return None  # installed without its sources: only the end-to-end tests can tell
        for handler in (node for node in ast.walk(tree) if isinstance(node, ast.ExceptHandler)):
            caught = _names(handler.type, func.__globals__) if handler.type is not None else (BaseException,)
            if any(isinstance(kind, type) and issubclass(ours, kind) for kind in caught):
                return f"catches {name} in its except {ast.unparse(handler.type) if handler.type else ''}".rstrip()
        return None
    return lack


def _names(node: ast.expr, namespace: dict) -> tuple[Any, ...]:
    """What an ``except`` clause's names stand for in the function's module (a tuple, a name, a dotted name)."""
    if isinstance(node, ast.Tuple):
        return tuple(found for element in node.elts for found in _names(element, namespace))
    if isinstance(node, ast.Name):
        return (namespace.get(node.id, getattr(builtins, node.id, None)),)
    if isinstance(node, ast.Attribute):
        return tuple(getattr(owner, node.attr, None) for owner in _names(node.value, namespace))
    return ()


def _grouped_store(obj: Any) -> str | None:
    from forkproxy.http.headers import store_is_grouped_by_lower_name

    return None if store_is_grouped_by_lower_name() else "keeps no _container of {lower name: [name, value, ...]}"


class Internal(NamedTuple):
    """One internal forkproxy relies on, and how to tell that the installed release still has it."""

    package: str  # urllib3 or gunicorn
    module: str  # where it lives
    name: str  # dotted below ``module``
    why: str  # which forkproxy module relies on it, and for what
    lack: Lack = _found

    def missing(self) -> str | None:
        """What the installed release lacks of it, or None."""
        obj: Any = importlib.import_module(self.module)
        for part in self.name.split("."):
            obj = getattr(obj, part, _GONE)
            if obj is _GONE:
                return f"{self.name} is missing"
        wrong = self.lack(obj)
        return f"{self.name} {wrong}" if wrong else None


_GONE = object()
_POOL = "urllib3.connectionpool"
_RETRY = "urllib3.util.retry"
_LOGGER = "gunicorn.glogging"

INTERNALS: tuple[Internal, ...] = (
    Internal("urllib3", _POOL, "HTTPConnectionPool._make_request",
             "upstream/connections.py overrides it: the one exchange on a connection; urlopen passes these by name",
             _takes("conn", "method", "url", "body", "headers", "retries", "timeout")),
    Internal("urllib3", _POOL, "HTTPConnectionPool._get_conn",
             "upstream/connections.py overrides it to drop a connection idle past pool_idle_timeout",
             _takes("timeout")),
    Internal("urllib3", _POOL, "HTTPConnectionPool._put_conn",
             "upstream/connections.py overrides it to note when a connection went idle; a reply returns its "
             "connection with it", _takes("conn")),
    Internal("urllib3", "urllib3", "HTTPHeaderDict",
             "http/headers.py reads the store itself: header rules run on every request", _grouped_store),
    Internal("urllib3", _POOL, "HTTPConnectionPool.urlopen",
             "upstream/connections.py: an exchange's AttemptFailed leaves urlopen as it is, the connection closed",
             _lets_through("forkproxy.upstream.failures.AttemptFailed")),
    Internal("urllib3", _RETRY, "Retry.__init__", "upstream/retry.py counts a request's retries in a Retry",
             _takes("total", "redirect")),
    Internal("urllib3", _RETRY, "Retry.__init__", "upstream/retry.py: a retry's backoff is its number in history",
             _assigns("history")),
    Internal("urllib3", _RETRY, "Retry.increment",
             "upstream/retry.py: the next count, or MaxRetryError once the attempts are spent",
             _takes("method", "response", "error")),
    Internal("urllib3", _RETRY, "Retry.get_retry_after", "upstream/retry.py: a 429's or 503's wait",
             _takes("response")),
    Internal("gunicorn", _LOGGER, "Logger.__init__",
             "server/accesslog.py writes lines to the logger's access_log under its cfg's format",
             _assigns("access_log", "cfg")),
    Internal("gunicorn", _LOGGER, "Logger._set_handler",
             "server/accesslog.py writes a line straight to gunicorn's own handlers, which it marks _gunicorn",
             _assigns("_gunicorn")),
    Internal("gunicorn", _LOGGER, "Logger.access_fmt", "server/accesslog.py tells gunicorn's handlers by it"),
    Internal("gunicorn", _LOGGER, "Logger.access_log_enabled", "server/accesslog.py skips a line when off"),
    Internal("gunicorn", _LOGGER, "Logger._get_user",
             "server/accesslog.py: the %(u)s atom, as gunicorn's own lines have it", _takes("environ")),
    Internal("gunicorn", "gunicorn.util", "write_error",
             "server/worker.py replaces it in each worker: gunicorn's refusals (bad request line, headers too "
             "large) go out as the contract's JSON", _takes("sock", "status_int", "reason", "mesg")),
    Internal("gunicorn", "gunicorn.util", "write_nonblock", "server/worker.py writes the JSON refusal with it",
             _takes("sock", "data")),
    Internal("gunicorn", "gunicorn.util", "write",
             "server/worker.py replaces it in each worker: a reply's pieces go out in one send, not sendall's "
             "three syscalls", _takes("sock", "data", "chunked")),
    Internal("gunicorn", "gunicorn.util", "http_date",
             "server/worker.py replaces it in each worker: the Date header formatted once a second",
             _takes("timestamp")),
    Internal("gunicorn", "gunicorn.workers.base", "Worker.handle_exit",
             "server/shutdown.py polls worker.alive, which it clears on SIGTERM", _assigns("alive")),
)


def check() -> None:
    """Raise ``Unsupported`` with one line naming each package, its version and what it lacks; else nothing."""
    from forkproxy.server import takeover

    cached = set(linecache.cache)
    try:
        problems = [f"{item.package} {_version(item.package)}: {wrong} ({item.why})"
                    for item in INTERNALS if (wrong := item.missing())]
        try:
            takeover.check()
        except takeover.TakeoverUnavailable as exc:
            problems.append(str(exc))
    finally:  # the sources read to check them: ~90 KiB a worker would keep for nothing
        for path in set(linecache.cache) - cached:
            linecache.cache.pop(path, None)
    if problems:
        raise Unsupported("; ".join(problems))


def _version(package: str) -> str:
    return getattr(importlib.import_module(package), "__version__", "(version unknown)")
