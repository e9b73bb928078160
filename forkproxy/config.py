"""Settings, one record each: name, FORKPROXY_* variable, check, default, doc.

Everything else is derived from the records in ``SETTINGS``: ``DEFAULTS``
and ``check_settings`` (a ``Proxy``'s keywords), ``env_settings``
(``forkproxy.app`` and gunicorn.conf.py read their variables through it) and
``env_table``, the README's table of variables (a test holds the two
together). A setting belongs to one of three parts: ``PROXY`` (a ``Proxy``
keyword and attribute), ``APP`` (the ready-made app's own: its retries) or
``SERVER`` (gunicorn.conf.py).

The gunicorn master loads this module for gunicorn.conf.py, where urllib3 and
gevent must not be imported yet: the checks that need forkproxy's URL, header
or store-path rules import them when they run (at start, never per request).
"""
from __future__ import annotations

import os
from typing import Any, Callable, Mapping, NamedTuple
from urllib.parse import urlsplit

MiB = 1024 * 1024
PROXY, APP, SERVER = "proxy", "app", "server"

Check = Callable[[str, Any], Any]
"""``check(label, value)``: the value converted to its type, or ConfigError naming ``label``."""


class ConfigError(ValueError):
    """A setting with a value forkproxy cannot run with; the message is one line."""


class Setting(NamedTuple):
    name: str  # the keyword and attribute (PROXY, APP), or gunicorn.conf.py's name for it (SERVER)
    part: str  # PROXY, APP or SERVER
    env: str | None  # the FORKPROXY_* variable that sets it, if any
    check: Check
    default: Any
    doc: str  # what it means, as the README's table says it
    shown: str = ""  # the default as the README shows it, when the value itself would not read well
    required: bool = False  # no default: the start stops when it is missing

    def default_text(self) -> str:
        """The default as the README's table shows it."""
        if self.shown:
            return self.shown
        if isinstance(self.default, float) and self.default.is_integer():
            return str(int(self.default))
        return str(self.default)


# -- checks -------------------------------------------------------------------------


def _number(kind: Callable[[Any], Any], *, minimum: float = 0, above: bool = False,
            meaning: str = "") -> Check:
    """A check for a finite number of ``kind`` that is at least ``minimum`` (or above it)."""
    bound = f"above {minimum:g}" if above else f"at least {minimum:g}"
    why = f"must be {bound}{meaning}"

    def check(name: str, value: Any) -> Any:
        try:
            number = kind(value)
        except (TypeError, ValueError, OverflowError):
            raise ConfigError(f"{name}: not a number: {value!r}") from None
        if number != number or number in (float("inf"), float("-inf")):
            raise ConfigError(f"{name}: must be a finite number: {value!r}")
        if number < minimum or (above and number == minimum):
            raise ConfigError(f"{name}: {why}: {value!r}")
        return number
    return check


def _whole(value: Any) -> int:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        return int(value.strip())
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(value)
    return value


_OFF = " (0 turns it off)"
_SECONDS = _number(float, above=True)
_SECONDS_OR_OFF = _number(float, meaning=_OFF)
_BYTES_OR_OFF = _number(_whole, meaning=_OFF)
_COUNT = _number(_whole, minimum=1)


def _as_given(name: str, value: Any) -> Any:
    return value


def _text(name: str, value: Any) -> str:
    return str(value).strip()


def _upstream(name: str, value: Any) -> Any:
    """A base URL, an ``UpstreamPool`` as it is, or a comma-separated list of URLs made a round-robin pool."""
    from forkproxy.upstream.members import UpstreamPool, parse_base_url

    if isinstance(value, UpstreamPool):
        return value
    if not value:
        raise ConfigError(f"{name} is not set: give the upstream base URL, e.g. http://127.0.0.1:9000")
    urls = [part.strip() for part in str(value).split(",")]
    try:
        if len(urls) > 1:
            return UpstreamPool(urls)
        parse_base_url(urls[0])
    except ValueError as exc:
        raise ConfigError(f"{name}: {exc}") from None
    return urls[0]


def _ca_certs(name: str, value: Any) -> str | None:
    if value in (None, ""):
        return None
    if not os.path.isfile(value):
        raise ConfigError(f"{name}: no such CA bundle file: {value!r}")
    return str(value)


def _protocols(name: str, value: Any) -> tuple[str, ...]:
    """Upgrade protocol names, lower-cased: a tuple (or list) of tokens, or one comma-separated string."""
    from forkproxy.http.headers import TOKEN_RE

    items = value.split(",") if isinstance(value, str) else value
    try:
        names = tuple(str(item).strip().lower() for item in items)
    except TypeError:
        raise ConfigError(f"{name}: must be a tuple of protocol names: {value!r}") from None
    bad = [n for n in names if not TOKEN_RE.fullmatch(n)]
    if bad:
        raise ConfigError(f"{name}: not a protocol name: {bad[0]!r}")
    return names


def _limits_store(name: str, value: Any) -> str:
    """``local``, ``local:PATH`` (whose file only this user may write) or a redis:// / rediss:// URL with a host."""
    from forkproxy.limits import paths as store_paths

    text = str(value).strip()
    if text == "local" or (text.startswith("local:") and len(text) > len("local:")):
        try:
            store_paths.check(store_paths.store_path(text))
        except store_paths.UnsafeStorePath as exc:
            raise ConfigError(f"{name}: {exc}") from None
        return text
    parts = urlsplit(text)
    if parts.scheme not in ("redis", "rediss") or not parts.hostname:
        raise ConfigError(f"{name}: must be local or a redis:// or rediss:// URL: {_no_password(text)!r}")
    try:
        parts.port
    except ValueError:
        raise ConfigError(f"{name}: bad port in {_no_password(text)!r}") from None
    return text


def _no_password(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return url.replace(f":{parts.password}@", ":***@", 1)


def _flag(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name}: must be true or false: {value!r}")


def _tracing(name: str, value: Any) -> bool | None:
    """None (on when OpenTelemetry's own variables name an exporter), or a flag."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "auto")):
        return None
    return _flag(name, value)


# -- the records ------------------------------------------------------------------------

# In the order of the README's table of variables.
SETTINGS: tuple[Setting, ...] = (
    Setting("upstream", PROXY, "FORKPROXY_UPSTREAM", _upstream, None,
            "upstream base URL, `http://` or `https://`, optional fixed path prefix; a comma-separated list "
            "makes a round-robin pool", shown="required", required=True),
    Setting("timeout", PROXY, "FORKPROXY_TIMEOUT", _SECONDS, 30.0,
            "seconds to wait for the upstream (connect and each read)"),
    Setting("connect_timeout", PROXY, "FORKPROXY_CONNECT_TIMEOUT", _SECONDS, 10.0,
            "seconds for a TCP/TLS connect (never above the timeout)"),
    Setting("deadline", PROXY, "FORKPROXY_DEADLINE", _SECONDS_OR_OFF, 0.0,
            "seconds from a request received to its reply accepted, across every attempt, failover and backoff; "
            "0 = none"),
    Setting("max_request_body_bytes", PROXY, "FORKPROXY_MAX_REQUEST_BODY_BYTES", _BYTES_OR_OFF, 1 * MiB,
            "request body cap, 0 = none"),
    Setting("max_response_body_bytes", PROXY, "FORKPROXY_MAX_RESPONSE_BODY_BYTES", _BYTES_OR_OFF, 8 * MiB,
            "buffered response body cap, 0 = none"),
    Setting("retry_attempts", APP, "FORKPROXY_RETRY_ATTEMPTS", _COUNT, 1,
            "max attempts for idempotent methods (GET HEAD OPTIONS TRACE PUT DELETE)"),
    Setting("retry_backoff_ms", APP, "FORKPROXY_RETRY_BACKOFF_MS", _number(_whole), 100,
            "base backoff between attempts, doubling each retry"),
    Setting("ca_certs", PROXY, "FORKPROXY_CA_CERTS", _ca_certs, None,
            "CA bundle for https upstreams", shown="the system's"),
    Setting("stream_idle_timeout", PROXY, "FORKPROXY_STREAM_IDLE_TIMEOUT", _SECONDS_OR_OFF, 60.0,
            "longest silence inside a stream, seconds"),
    Setting("max_event_bytes", PROXY, "FORKPROXY_MAX_EVENT_BYTES", _COUNT, 1 * MiB,
            "largest incomplete SSE event held"),
    Setting("sse_heartbeat_secs", PROXY, "FORKPROXY_SSE_HEARTBEAT_SECS", _SECONDS_OR_OFF, 0.0,
            "SSE comment sent on a silent event stream, 0 = off"),
    Setting("first_byte_timeout", PROXY, "FORKPROXY_FIRST_BYTE_TIMEOUT", _SECONDS_OR_OFF, 0.0,
            "seconds a stream may take to send its first unit after its head (failover until then); 0 = off"),
    Setting("sse_error_event", PROXY, None, _flag, True,
            "whether an event stream that fails for good ends with an `upstream_stream_failed` error event"),
    Setting("trusted_proxies", PROXY, None, _as_given, None,
            "IPs/CIDRs allowed to set `X-Forwarded-Proto`/`-Host`, `Forwarded` and `X-Real-IP`",
            shown="gunicorn's `forwarded_allow_ips`"),
    Setting("pool_maxsize", PROXY, None, _COUNT, 256,
            "idle upstream connections kept per upstream per worker"),
    # Below the keep-alive timeouts upstream servers commonly close idle connections after
    # (Node.js and uvicorn: 5 s), so a pooled connection is dropped by us before it can be
    # closed under a request; gunicorn's 2 s is covered by the resend on a fresh connection.
    Setting("pool_idle_timeout", PROXY, "FORKPROXY_POOL_IDLE_TIMEOUT", _SECONDS, 4.0,
            "seconds an idle pooled upstream connection is kept"),
    Setting("allowed_upgrades", PROXY, None, _protocols, ("websocket",),
            "protocols a client may open a tunnel to; `()` turns tunnels off"),
    Setting("tunnel_idle_timeout", PROXY, "FORKPROXY_TUNNEL_IDLE_TIMEOUT", _SECONDS, 300.0,
            "seconds a tunnel may stay silent both ways"),
    Setting("max_ws_message_bytes", PROXY, None, _COUNT, 16 * MiB,
            "largest WebSocket message held for `on_ws_message`"),
    Setting("limits_store", PROXY, "FORKPROXY_LIMITS_STORE", _limits_store, "local",
            "where rate-limit counts live: `local` (or `local:PATH`), or a `redis://` / `rediss://` URL"),
    Setting("limits_timeout", PROXY, None, _SECONDS, 0.05,
            "seconds the rate-limit store may take to answer"),
    Setting("tracing", PROXY, "FORKPROXY_TRACING", _tracing, None,
            "OpenTelemetry traces (needs `forkproxy[otel]`): `true`, `false`; unset: on when "
            "`OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_TRACES_EXPORTER` is set", shown="auto"),
    Setting("limits_fail_open", PROXY, None, _flag, True,
            "whether a request goes through uncounted when the store fails (else 503)"),
    Setting("bind", SERVER, "FORKPROXY_BIND", _text, "127.0.0.1:8080", "gunicorn bind address"),
    Setting("metrics_bind", SERVER, "FORKPROXY_METRICS_BIND", _text, "",
            "address for Prometheus metrics", shown="off"),
    Setting("access_log_format", SERVER, "FORKPROXY_ACCESS_LOG_FORMAT", _text, "text",
            "`json` for JSON access-log lines"),
    Setting("graceful_timeout", SERVER, "FORKPROXY_GRACEFUL_TIMEOUT", _number(_whole), 30,
            "seconds in-flight requests get on SIGTERM/SIGHUP"),
    Setting("worker_connections", SERVER, "FORKPROXY_WORKER_CONNECTIONS", _COUNT, 10000,
            "simultaneous client connections per worker"),
    Setting("access_log", SERVER, "FORKPROXY_ACCESS_LOG", _text, "-",
            "where access-log lines go: a file, or `-` for stdout", shown="stdout"),
    Setting("log_level", SERVER, "FORKPROXY_LOG_LEVEL", _text, "info", "gunicorn's log level"),
)
_PROXY = {s.name: s for s in SETTINGS if s.part == PROXY}


def defaults(part: str) -> dict[str, Any]:
    """Each setting of ``part`` that has a default, with it."""
    return {s.name: s.default for s in SETTINGS if s.part == part and not s.required}


DEFAULTS: dict[str, Any] = defaults(PROXY)  # a Proxy's keywords but ``upstream``, which has none


def check_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    """A ``Proxy``'s keywords, each checked and converted; TypeError for a name that is no setting."""
    unknown = set(settings) - set(_PROXY)
    if unknown:
        raise TypeError(f"unknown setting(s): {', '.join(sorted(unknown))}; valid: {', '.join(sorted(DEFAULTS))}")
    checked = {name: _PROXY[name].check(name, value) for name, value in settings.items()}
    if "limits_store" not in checked:  # the default names a file too: checked the same, at start
        checked["limits_store"] = _PROXY["limits_store"].check("limits_store", DEFAULTS["limits_store"])
    return checked


def env_settings(env: Mapping[str, str], part: str) -> dict[str, Any]:
    """The settings of ``part`` that FORKPROXY_* variables give, checked; ConfigError naming the variable.

    An unset or empty variable is left out (its default applies), except
    a required one, whose absence is the error.
    """
    found = {}
    for setting in SETTINGS:
        if setting.part != part or setting.env is None:
            continue
        value = env.get(setting.env)
        if value or setting.required:
            found[setting.name] = setting.check(setting.env, value)
    return found


def env_table() -> str:
    """The README's table of FORKPROXY_* variables, in the order of ``SETTINGS``."""
    where = {PROXY: "", APP: "", SERVER: " (gunicorn.conf.py)"}
    rows = ["| variable | meaning | default |", "|---|---|---|"]
    rows += [f"| `{s.env}` | {s.doc}{where[s.part]} | {s.default_text()} |" for s in SETTINGS if s.env]
    return "\n".join(rows)
