"""Settings: their defaults, their checks, and how the environment sets them."""
from __future__ import annotations

import os
from urllib.parse import urlsplit
from typing import Any, Callable, Mapping

from forkproxy.http.headers import TOKEN_RE
from forkproxy.limits import paths as store_paths
from forkproxy.upstream.members import UpstreamPool, parse_base_url

MiB = 1024 * 1024

DEFAULTS: dict[str, Any] = {
    "timeout": 30.0,
    "connect_timeout": 10.0,
    "max_request_body_bytes": 1 * MiB,
    "max_response_body_bytes": 8 * MiB,
    "stream_idle_timeout": 60.0,
    "max_event_bytes": 1 * MiB,
    "sse_heartbeat_secs": 0.0,
    "ca_certs": None,
    "trusted_proxies": None,
    "pool_maxsize": 256,
    # Below the keep-alive timeouts upstream servers commonly close idle connections after
    # (Node.js and uvicorn: 5 s), so a pooled connection is dropped by us before it can be
    # closed under a request; gunicorn's 2 s is covered by the retry on a fresh connection.
    "pool_idle_timeout": 4.0,
    "allowed_upgrades": ("websocket",),
    "tunnel_idle_timeout": 300.0,
    "max_ws_message_bytes": 16 * MiB,
    "limits_store": "local",
    "limits_timeout": 0.05,
    "limits_fail_open": True,
}


class ConfigError(ValueError):
    """A setting with a value forkproxy cannot run with; the message is one line."""


def _number(kind: Callable[[Any], Any], *, minimum: float = 0, above: bool = False,
            meaning: str = "") -> Callable[[str, Any], Any]:
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


def _upstream(name: str, value: Any) -> Any:
    """A base URL, an ``UpstreamPool`` as it is, or a comma-separated list of URLs made a round-robin pool."""
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


_OFF = " (0 turns it off)"
_CHECKS: dict[str, Callable[[str, Any], Any]] = {
    "upstream": _upstream,
    "timeout": _number(float, above=True),
    "connect_timeout": _number(float, above=True),
    "max_request_body_bytes": _number(_whole, meaning=_OFF),
    "max_response_body_bytes": _number(_whole, meaning=_OFF),
    "stream_idle_timeout": _number(float, meaning=_OFF),
    "max_event_bytes": _number(_whole, minimum=1),
    "sse_heartbeat_secs": _number(float, meaning=_OFF),
    "ca_certs": _ca_certs,
    "pool_maxsize": _number(_whole, minimum=1),
    "pool_idle_timeout": _number(float, above=True),
    "allowed_upgrades": _protocols,
    "tunnel_idle_timeout": _number(float, above=True),
    "max_ws_message_bytes": _number(_whole, minimum=1),
    "limits_store": _limits_store,
    "limits_timeout": _number(float, above=True),
    "limits_fail_open": _flag,
}


def check_setting(name: str, value: Any, label: str | None = None) -> Any:
    """The value converted to its type, or ConfigError naming ``label``."""
    check = _CHECKS.get(name)
    return value if check is None else check(label or name, value)


def check_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    unknown = set(settings) - set(DEFAULTS) - {"upstream"}
    if unknown:
        raise TypeError(f"unknown setting(s): {', '.join(sorted(unknown))}; valid: {', '.join(sorted(DEFAULTS))}")
    checked = {name: check_setting(name, value) for name, value in settings.items()}
    if "limits_store" not in checked:  # the default names a file too: checked the same, at start
        checked["limits_store"] = check_setting("limits_store", DEFAULTS["limits_store"])
    return checked


# FORKPROXY_* variable -> setting name; the retry ones feed the app's policy.
ENVIRONMENT = {
    "FORKPROXY_UPSTREAM": "upstream",
    "FORKPROXY_TIMEOUT": "timeout",
    "FORKPROXY_CONNECT_TIMEOUT": "connect_timeout",
    "FORKPROXY_MAX_REQUEST_BODY_BYTES": "max_request_body_bytes",
    "FORKPROXY_MAX_RESPONSE_BODY_BYTES": "max_response_body_bytes",
    "FORKPROXY_STREAM_IDLE_TIMEOUT": "stream_idle_timeout",
    "FORKPROXY_MAX_EVENT_BYTES": "max_event_bytes",
    "FORKPROXY_SSE_HEARTBEAT_SECS": "sse_heartbeat_secs",
    "FORKPROXY_CA_CERTS": "ca_certs",
    "FORKPROXY_POOL_IDLE_TIMEOUT": "pool_idle_timeout",
    "FORKPROXY_TUNNEL_IDLE_TIMEOUT": "tunnel_idle_timeout",
    "FORKPROXY_LIMITS_STORE": "limits_store",
}
RETRY_ENVIRONMENT = {"FORKPROXY_RETRY_ATTEMPTS": 1, "FORKPROXY_RETRY_BACKOFF_MS": 100}


def settings_from_env(env: Mapping[str, str]) -> dict[str, Any]:
    """Settings named by FORKPROXY_* variables; the upstream must be there."""
    settings = {"upstream": check_setting("upstream", env.get("FORKPROXY_UPSTREAM"), "FORKPROXY_UPSTREAM")}
    for var, name in ENVIRONMENT.items():
        if name != "upstream" and env.get(var, "") != "":
            settings[name] = check_setting(name, env[var], var)
    return settings


_RETRY_CHECKS = {"FORKPROXY_RETRY_ATTEMPTS": _number(_whole, minimum=1), "FORKPROXY_RETRY_BACKOFF_MS": _number(_whole)}


def retry_from_env(env: Mapping[str, str]) -> tuple[int, int]:
    """(attempts, backoff ms) for the ready-made app's idempotent retries."""
    attempts, backoff = (
        _RETRY_CHECKS[var](var, env.get(var) or default) for var, default in RETRY_ENVIRONMENT.items()
    )
    return attempts, backoff
