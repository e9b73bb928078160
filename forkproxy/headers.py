"""Header rules of a forwarding proxy, free of I/O.

RFC 9110 section 7.6.1: hop-by-hop fields, and every field a ``Connection``
header names, describe one transport link and must not travel further.
"""
from __future__ import annotations

import re
from typing import Iterable, Iterator

from urllib3 import HTTPHeaderDict

HOP_BY_HOP = frozenset((
    "connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade",
    "proxy-authorization", "proxy-authenticate", "te", "trailer",
))

# Set by forkproxy itself on the way to the upstream.
_SET_TOWARDS_UPSTREAM = frozenset(("host", "content-length", "expect"))
# Set by the server (gunicorn) on every reply: the upstream's would be a second
# copy of a single-valued header. nginx drops the same two by default.
_SET_BY_SERVER = frozenset(("date", "server"))

# CR, LF, NUL, or anything latin-1 (the wire's encoding of header bytes) cannot carry.
_FORBIDDEN = re.compile("[\r\n\0\u0100-\U0010ffff]")


def is_hop_by_hop(name: str) -> bool:
    return name.lower() in HOP_BY_HOP


def has_forbidden_chars(text: str) -> bool:
    """CR, LF or NUL in a header would let one header smuggle another."""
    return _FORBIDDEN.search(text) is not None


def connection_named(headers: HTTPHeaderDict) -> frozenset[str]:
    """Lower-cased names listed in the ``Connection`` header(s)."""
    names = set()
    for value in headers.getlist("connection"):
        names.update(token.strip().lower() for token in value.split(","))
    names.discard("")
    return frozenset(names)


def _end_to_end(headers: HTTPHeaderDict) -> Iterator[tuple[str, str]]:
    dropped = connection_named(headers)
    for name, value in headers.items():
        lname = name.lower()
        if lname not in HOP_BY_HOP and lname not in dropped:
            yield name, value


def wants_upgrade(headers: HTTPHeaderDict) -> bool:
    return "upgrade" in connection_named(headers) and "upgrade" in headers


def upstream_request_headers(
    headers: HTTPHeaderDict,
    *,
    client_addr: str,
    proto: str,
    host: str,
    peer_trusted: bool,
) -> HTTPHeaderDict:
    """The headers the upstream gets, before any hook changes them.

    ``Host`` and ``Content-Length`` are left out: the transport derives them
    from the upstream URL and the final body, so a hook cannot make them
    disagree with what is really sent.
    """
    out = HTTPHeaderDict()
    for name, value in _end_to_end(headers):
        if name.lower() not in _SET_TOWARDS_UPSTREAM:
            out.add(name, value)
    if client_addr:
        chain = out.pop("x-forwarded-for", None)
        out["X-Forwarded-For"] = f"{chain}, {client_addr}" if chain else client_addr
    for name, own_view in (("X-Forwarded-Proto", proto), ("X-Forwarded-Host", host)):
        if not (peer_trusted and name in out):
            out.pop(name, None)
            if own_view:
                out[name] = own_view
    return out


def client_response_headers(
    headers: HTTPHeaderDict, *, keep_content_length: bool, drop: Iterable[str] = ()
) -> list[tuple[str, str]]:
    """The upstream's headers as a WSGI header list for the client.

    ``X-Accel-*`` would be acted on by an nginx in front of us, so an upstream
    must not be able to steer it. ``Content-Length`` is recomputed from the
    body the client really gets, except where the body is never sent.
    """
    skip = set(_SET_BY_SERVER).union(drop)
    if not keep_content_length:
        skip.add("content-length")
    return [
        (name, value)
        for name, value in _end_to_end(headers)
        if name.lower() not in skip and not name.lower().startswith("x-accel-")
    ]


def first_forbidden(pairs: Iterable[tuple[str, str]]) -> str | None:
    """The first header name whose name or value holds CR, LF, NUL or a non-latin-1 character."""
    search = _FORBIDDEN.search
    for name, value in pairs:
        if search(value) or search(name):
            return name
    return None
