"""The HTTP side of a tunnel, free of I/O: which upgrades go through, and whether a 101 is the one asked for.

A request names the protocols it wants in ``Upgrade`` (RFC 9110 section
7.8); the upstream's 101 must switch to one of them, or the client would be
handed a protocol it never asked for (Go's ReverseProxy refuses the same).
"""
from __future__ import annotations

from http.client import HTTPException

from urllib3 import HTTPHeaderDict

from forkproxy.errors import UpgradeNotSupported
from forkproxy.http.headers import client_response_headers, connection_named, getlist

WEBSOCKET = "websocket"
# The one extension message hooks can undo (wsproto implements it); others are not offered then.
_DEFLATE = "permessage-deflate"


def _names(value: str) -> list[str]:
    """Protocol names (without their ``/version``), lower-cased, in the order given."""
    return [token.strip().split("/", 1)[0].strip().lower() for token in value.split(",") if token.strip()]


def requested_upgrade(headers: HTTPHeaderDict, allowed: tuple[str, ...]) -> str:
    """The client's ``Upgrade`` value, when every protocol it names is allowed; else UpgradeNotSupported."""
    value = ", ".join(getlist(headers, "upgrade")).strip()
    names = _names(value)
    refused = [name for name in names if name not in allowed] if names else ["(none named)"]
    if refused:
        offered = ", ".join(allowed) if allowed else "none: tunnels are off"
        raise UpgradeNotSupported(f"upgrade to {refused[0]!r} is not allowed (allowed_upgrades: {offered})")
    return value


def check_switch(asked: str, headers: HTTPHeaderDict) -> str:
    """The protocol a 101 switched to, if the request named it; HTTPException (a 502) otherwise."""
    switched = ", ".join(getlist(headers, "upgrade")).strip()
    names = _names(switched)
    if "upgrade" not in connection_named(headers) or len(names) != 1:
        raise HTTPException(f"upstream answered 101 without naming one protocol it switched to: {switched!r}")
    if names[0] not in _names(asked):
        raise HTTPException(f"upstream switched to {switched!r} though the client asked for {asked!r}")
    return names[0]


def client_head(reason: str, headers: HTTPHeaderDict, extra: tuple[tuple[str, str], ...] = ()) -> bytes:
    """The 101 head the client gets, written by forkproxy itself rather than by the server.

    The upstream's fields pass by the rules of every reply
    (``client_response_headers``: no hop-by-hop field, no ``X-Accel-*``, no
    Date or Server of the upstream's); the head adds its Connection and
    Upgrade, and ``extra``: forkproxy's own fields (its Date, X-Request-ID),
    which replace any the upstream sent by those names.
    """
    own = tuple(name.lower() for name, _ in extra)
    pairs = client_response_headers(headers, keep_content_length=False, drop=own)
    out = [f"HTTP/1.1 101 {reason or 'Switching Protocols'}\r\nConnection: Upgrade\r\n"]
    out += [f"Upgrade: {value}\r\n" for value in getlist(headers, "upgrade")]
    out += [f"{name}: {value}\r\n" for name, value in (*pairs, *extra)]
    out.append("\r\n")
    return "".join(out).encode("latin-1")


def only_deflate_offered(headers: HTTPHeaderDict) -> None:
    """Keep, in place, only the permessage-deflate offers of ``Sec-WebSocket-Extensions``.

    With message hooks each message is decoded on the way through, which
    forkproxy can do for permessage-deflate only; an upstream must not
    accept an extension that would leave the frames unreadable.
    """
    offers = [offer.strip() for value in getlist(headers, "sec-websocket-extensions")
              for offer in value.split(",") if offer.strip()]
    kept = [offer for offer in offers if offer.split(";", 1)[0].strip().lower() == _DEFLATE]
    headers.discard("Sec-WebSocket-Extensions")
    if kept:
        headers["Sec-WebSocket-Extensions"] = ", ".join(kept)


def accepted_deflate(headers: HTTPHeaderDict) -> str | None:
    """The permessage-deflate parameters a 101 accepted, None for none; HTTPException for any other extension."""
    accepted = [part.strip() for value in getlist(headers, "sec-websocket-extensions")
                for part in value.split(",") if part.strip()]
    if not accepted:
        return None
    if len(accepted) > 1 or accepted[0].split(";", 1)[0].strip().lower() != _DEFLATE:
        raise HTTPException(f"upstream accepted WebSocket extensions that were not offered: {accepted!r}")
    return accepted[0]
