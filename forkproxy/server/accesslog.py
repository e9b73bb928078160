"""Access-log lines for gunicorn, each atom computed only when the format names it.

gunicorn's own ``Logger.access`` builds every atom for every request (one
per request header, response header and environ key, plus a strftime)
before the format picks the few it shows; in a proxy that is a tenth of
the CPU a request costs. The lines are the same: ``Atoms`` answers the
format's keys exactly as gunicorn's atoms would, quotes escaped, ``-`` for
what is missing. Where the access log is gunicorn's own handler (stdout or a
file, message only), a line is written to its stream directly: a LogRecord,
caller lookup and handler chain per request cost as much again as the line.
Loaded by the gunicorn master, so it imports nothing of gevent or urllib3.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import time
import traceback
from collections.abc import Mapping
from typing import Any, Callable, Iterator

from gunicorn.glogging import Logger


def _status(resp: Any) -> Any:
    status = resp.status
    return status.split(None, 1)[0] if isinstance(status, str) else status


def _size(atoms: "Atoms") -> Any:
    sent = getattr(atoms.resp, "sent", None)
    return "-" if sent is None else str(sent)


def _micros(took: Any) -> int:
    return took.seconds * 1000000 + took.microseconds


_MISSING = object()
_ATOMS: dict[str, Callable[["Atoms"], Any]] = {
    "h": lambda a: a.env.get("REMOTE_ADDR", "-"),
    "l": lambda a: "-",
    "u": lambda a: a.logger._get_user(a.env) or "-",  # the basic-auth user
    "t": lambda a: time.strftime("[%d/%b/%Y:%H:%M:%S %z]"),
    "r": lambda a: f"{a.env['REQUEST_METHOD']} {a.env['RAW_URI']} {a.env['SERVER_PROTOCOL']}",
    "s": lambda a: _status(a.resp),
    "m": lambda a: a.env.get("REQUEST_METHOD"),
    "U": lambda a: a.env.get("PATH_INFO"),
    "q": lambda a: a.env.get("QUERY_STRING"),
    "H": lambda a: a.env.get("SERVER_PROTOCOL"),
    "b": _size,
    "B": lambda a: getattr(a.resp, "sent", None),
    "f": lambda a: a.env.get("HTTP_REFERER", "-"),
    "a": lambda a: a.env.get("HTTP_USER_AGENT", "-"),
    "T": lambda a: a.took.seconds,
    "D": lambda a: _micros(a.took),
    "M": lambda a: _micros(a.took) // 1000,
    "L": lambda a: "%d.%06d" % (a.took.seconds, a.took.microseconds),
    "p": lambda a: f"<{os.getpid()}>",
}


@functools.lru_cache(maxsize=256)
def _getter(key: str) -> Callable[["Atoms"], Any]:
    """How the atom ``key`` is found, worked out once per key: a format names the same few on every line."""
    if not key.startswith("{"):
        return _ATOMS.get(key, _missing)
    key = key.lower()
    name, kind = key[1:-2], key[-2:]
    if kind == "}e":
        if name.startswith("forkproxy."):  # forkproxy's own keys, lowercase as PEP 3333 has them: a miss is final
            return lambda a: a.env.get(name, _MISSING)
        return lambda a: a.environ_any_case(name)
    if kind == "}i":
        return lambda a: _last(getattr(a.req, "headers", a.req), name)
    if kind == "}o":
        return lambda a: _last(a.resp.headers, name)
    return _missing


def _missing(atoms: "Atoms") -> Any:
    return _MISSING


class _Recorder(dict):
    def __missing__(self, key: str) -> int:
        self[key] = 0  # formats as any conversion would want it
        return 0


@functools.lru_cache(maxsize=16)
def _getters_of(fmt: str) -> tuple[tuple[str, Callable[["Atoms"], Any]], ...] | None:
    """Each atom ``fmt`` names with its getter, found by formatting it once; None if it cannot be."""
    named = _Recorder()
    try:
        fmt % named
    except (TypeError, ValueError, KeyError):
        return None  # not a format of named atoms alone: gunicorn's own way, and its error, then
    return tuple((key, _getter(key)) for key in named)


def _escaped(found: Any) -> Any:
    if found is _MISSING:
        return "-"
    return found.replace('"', '\\"') if isinstance(found, str) else found


def _last(pairs: Any, name: str) -> Any:
    """The value of the last pair named ``name`` (any case), as gunicorn's dict of atoms keeps it."""
    found = _MISSING
    for key, value in pairs.items() if hasattr(pairs, "items") else pairs:
        if key.lower() == name:
            found = value
    return found


class Atoms(Mapping):
    """gunicorn's access-log atoms for one request, computed on demand."""

    __slots__ = ("logger", "resp", "req", "env", "took", "_lower_environ")

    def __init__(self, logger: Logger, resp: Any, req: Any, environ: dict, request_time: Any) -> None:
        self.logger, self.resp, self.req, self.env, self.took = logger, resp, req, environ, request_time
        self._lower_environ: dict | None = None

    def value(self, key: str) -> Any:
        """The atom unescaped, or None when there is none (as a JSON line wants it)."""
        found = _getter(key)(self)
        return None if found is _MISSING else found

    def __getitem__(self, key: str) -> Any:
        return _escaped(_getter(key)(self))

    def environ_any_case(self, name: str) -> Any:
        """gunicorn lowercases every environ key: one walk serves all of a line's misses."""
        found = self.env.get(name, _MISSING)
        if found is not _MISSING:
            return found
        if self._lower_environ is None:
            self._lower_environ = {key.lower(): value for key, value in self.env.items()}
        return self._lower_environ.get(name, _MISSING)

    def __iter__(self) -> Iterator[str]:
        return iter(_ATOMS)

    def __len__(self) -> int:
        return len(_ATOMS)


class AccessLogger(Logger):
    """gunicorn's Logger, its access lines built from ``Atoms``."""

    _judged: list[logging.Handler] | None = None  # the handler list the verdict below is for
    _streams: list[logging.StreamHandler] | None = None  # those handlers, if a line may go straight to them

    def access(self, resp: Any, req: Any, environ: dict, request_time: Any) -> None:
        if not self.access_log_enabled:
            return
        try:
            line = self.line(Atoms(self, resp, req, environ, request_time))
            streams = self._plain_streams()
            if streams is None:
                self.access_log.info(line)
            else:
                _write(streams, line + "\n")
        except Exception:
            self.error(traceback.format_exc())

    def _plain_streams(self) -> list[logging.StreamHandler] | None:
        """gunicorn's own access handlers, when writing to their streams is all logging would do.

        Judged again whenever the handler list changes (a config reload, a
        handler added at run time). Anything else configured (logconfig,
        syslog, a filter, another formatter or level) keeps the logging path.
        """
        log = self.access_log
        if log.handlers != self._judged:
            self._judged = list(log.handlers)
            plain = self._judged and all(
                type(h) in (logging.StreamHandler, logging.FileHandler) and getattr(h, "_gunicorn", False)
                and not h.filters and h.level <= logging.INFO
                and h.formatter is not None and h.formatter._fmt == self.access_fmt for h in self._judged)
            self._streams = self._judged if plain else None
        if log.filters or log.disabled or not log.isEnabledFor(logging.INFO):
            return None
        return self._streams

    def line(self, atoms: Atoms) -> str:
        fmt = self.cfg.access_log_format
        getters = _getters_of(fmt)
        if getters is None:
            return fmt % atoms
        return fmt % {key: _escaped(get(atoms)) for key, get in getters}


def _write(handlers: list[logging.StreamHandler], text: str) -> None:
    """What StreamHandler.emit does with a message-only format, under each handler's lock."""
    for handler in handlers:
        with handler.lock:
            stream = handler.stream
            if stream is None:  # a FileHandler closed and not yet reopened
                stream = handler.stream = handler._open()
            stream.write(text)
            stream.flush()


class JsonAccessLogger(AccessLogger):
    """One JSON object per access-log line (FORKPROXY_ACCESS_LOG_FORMAT=json)."""

    FIELDS = {"remote": "h", "time": "t", "method": "m", "path": "U", "query": "q", "protocol": "H",
              "status": "s", "bytes": "B", "seconds": "L", "user_agent": "a", "referer": "f",
              "request_id": "{forkproxy.request_id}e", "upstream": "{forkproxy.upstream}e",
              "upstream_status": "{forkproxy.upstream_status}e",
              "upstream_seconds": "{forkproxy.upstream_time}e", "retries": "{forkproxy.retries}e",
              "bytes_in": "{forkproxy.bytes_in}e"}
    NUMBERS = {"status": int, "bytes": int, "bytes_in": int, "retries": int, "upstream_status": int,
               "seconds": float, "upstream_seconds": float}

    def line(self, atoms: Atoms) -> str:
        record = {name: atoms.value(atom) for name, atom in self.FIELDS.items()}
        for name, kind in self.NUMBERS.items():
            try:
                record[name] = kind(record[name])
            except (TypeError, ValueError):
                record[name] = None
        return json.dumps(record)
