"""Header rules of a forwarding proxy, free of I/O.

RFC 9110 section 7.6.1: hop-by-hop fields, and every field a ``Connection``
header names, describe one transport link and must not travel further.
"""
from __future__ import annotations

import functools
import re
from typing import Iterable

from urllib3 import HTTPHeaderDict

HOP_BY_HOP = frozenset((
    "connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade",
    "proxy-authorization", "proxy-authenticate", "te", "trailer",
))

# Set by forkproxy itself on the way to the upstream.
_SET_TOWARDS_UPSTREAM = frozenset(("host", "content-length", "expect"))
# What forkproxy alone sets towards the upstream: whatever a hook put there is dropped
# once the hooks have run (Go's ReverseProxy strips hop-by-hop fields after its Director
# for the same reason): a hook's copy of the client's Transfer-Encoding beside
# forkproxy's Content-Length would desync the pooled connection.
_FORKPROXYS_OWN = HOP_BY_HOP | _SET_TOWARDS_UPSTREAM
# forkproxy sets these itself, after reading the client's Connection header: no
# Connection header can name them away.
_NOT_NAMED_AWAY = frozenset(("x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "x-real-ip",
                             "forwarded", "x-request-id"))
# Set by the server (gunicorn) on every reply: the upstream's would be a second
# copy of a single-valued header. nginx drops the same two by default.
_SET_BY_SERVER = frozenset(("date", "server"))

# CR, LF, NUL and the other controls but HTAB (gunicorn refuses them all in a reply), or
# anything latin-1 (the wire's encoding of header bytes) cannot carry.
_FORBIDDEN = re.compile("[\x00-\x08\x0a-\x1f\x7f\u0100-\U0010ffff]")
# A field name (RFC 9110 section 5.6.2), for every check of names in either direction.
TOKEN = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
TOKEN_RE = re.compile(TOKEN)


def is_hop_by_hop(name: str) -> bool:
    return name.lower() in HOP_BY_HOP


_NOT_IN_A_TARGET = re.compile("[\x00-\x20\x7f\u0100-\U0010ffff]")


def unfit_for_target(path: str) -> bool:
    """A space or control character would end the request line early (or smuggle another)."""
    return _NOT_IN_A_TARGET.search(path) is not None


def store_is_grouped_by_lower_name() -> bool:
    """Whether HTTPHeaderDict keeps ``_container`` as ``fields`` reads it (urllib3 2.x).

    A worker does not start when it does not (``server.capabilities``); in
    a process without gunicorn the public methods are used instead: the same
    fields, only slower.
    """
    probe = HTTPHeaderDict()
    probe.add("A", "1")
    probe.add("a", "2")
    return getattr(probe, "_container", None) == {"a": ["A", "1", "2"]}


_GROUPED_STORE = store_is_grouped_by_lower_name()


def _store(headers: HTTPHeaderDict) -> dict[str, list[str]] | None:
    """HTTPHeaderDict's own store: {lower-cased name: [name as first set, value, ...]}."""
    return headers._container if type(headers) is HTTPHeaderDict and _GROUPED_STORE else None


def fields(headers: HTTPHeaderDict) -> Iterable[tuple[str, list[str]]]:
    """(lower-cased name, [name as first set, value, value...]) per field, in order.

    Read straight from HTTPHeaderDict's store, which keeps exactly that:
    these rules run on every request, and its item views pay a lower() and a
    lookup per line. Any other mapping is read through ``items()``.
    """
    store = _store(headers)
    if store is not None:
        return store.items()
    grouped: dict[str, list[str]] = {}
    for name, value in headers.items():
        grouped.setdefault(name.lower(), [name]).append(value)
    return grouped.items()


def getlist(headers: HTTPHeaderDict, name: str) -> list[str]:
    """``headers.getlist(name)``, read from the store.

    HTTPHeaderDict raises and catches a KeyError for every absent name, and
    most names a request is asked about are absent.
    """
    store = _store(headers)
    if store is None:
        return headers.getlist(name)
    found = store.get(name.lower())
    return found[1:] if found else []


def get(headers: HTTPHeaderDict, name: str, default: str | None = None) -> str | None:
    """``headers.get(name, default)`` the same way: repeated lines joined by ", "."""
    store = _store(headers)
    if store is None:
        return headers.get(name, default)
    found = store.get(name.lower())
    return ", ".join(found[1:]) if found else default


def _pop(headers: HTTPHeaderDict, name: str) -> str | None:
    """``headers.pop(name, None)`` the same way."""
    store = _store(headers)
    if store is None:
        return headers.pop(name, None)
    found = store.pop(name.lower(), None)
    return ", ".join(found[1:]) if found else None


def header_dict(pairs: Iterable[tuple[str, str]]) -> HTTPHeaderDict:
    """``HTTPHeaderDict`` with ``add(name, value)`` for each pair, built in its store directly.

    Every request builds two of these (the client's headers, the upstream's);
    ``add`` spends four calls per line on checks that cannot fail here.
    """
    headers = HTTPHeaderDict()
    store = _store(headers)
    if store is None:
        for name, value in pairs:
            headers.add(name, value)
        return headers
    for name, value in pairs:
        key = name.lower()
        values = store.get(key)
        if values is None:
            store[key] = [name, value]
        else:
            values.append(value)
    return headers


def lines(headers: HTTPHeaderDict) -> list[tuple[str, str]]:
    """Every (name, value) line, repeated fields as repeated lines: ``headers.iteritems()``, faster."""
    return [(values[0], value) for _, values in fields(headers) for value in values[1:]]


def connection_named(headers: HTTPHeaderDict) -> frozenset[str]:
    """Lower-cased names listed in the ``Connection`` header(s)."""
    return _names_in(",".join(getlist(headers, "connection")))


@functools.lru_cache(maxsize=256)  # "keep-alive", "close", "": the same few values every time
def _names_in(value: str) -> frozenset[str]:
    return frozenset(token.strip().lower() for token in value.split(",")) - {""}


def _not_forwarded(headers: HTTPHeaderDict) -> frozenset[str]:
    """Hop-by-hop names plus every name the Connection header lists."""
    names = connection_named(headers)
    return HOP_BY_HOP if names <= HOP_BY_HOP else HOP_BY_HOP | names


def wants_upgrade(headers: HTTPHeaderDict) -> bool:
    return "upgrade" in headers and "upgrade" in connection_named(headers)  # most requests stop at the first test


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
    disagree with what is really sent. The client's lines keep their order;
    those forkproxy sets itself come after them. Built in one pass: this
    runs on every request.
    """
    skip = _not_forwarded(headers) | _SET_TOWARDS_UPSTREAM
    grouped = _store(headers) or dict(fields(headers))  # only read here
    ours = []
    replaced = set()
    if client_addr:
        chain = grouped.get("x-forwarded-for") if "x-forwarded-for" not in skip else None
        ours.append(("X-Forwarded-For", f"{', '.join(chain[1:])}, {client_addr}" if chain else client_addr))
        replaced.add("x-forwarded-for")
    if not peer_trusted:
        replaced.add("forwarded")  # RFC 7239's for/proto/host: only a trusted proxy may vouch for them
    for name, lname, own_view in (("X-Forwarded-Proto", "x-forwarded-proto", proto),
                                  ("X-Forwarded-Host", "x-forwarded-host", host),
                                  ("X-Real-IP", "x-real-ip", client_addr)):
        if not (peer_trusted and lname in grouped and lname not in skip):
            replaced.add(lname)
            if own_view:
                ours.append((name, own_view))
    skip |= replaced
    pairs = [(values[0], value) for lname, values in grouped.items() if lname not in skip for value in values[1:]]
    return header_dict(pairs + ours)


def drop_framing_set_by_hooks(headers: HTTPHeaderDict) -> None:
    """Remove, in place, the hop-by-hop and framing fields a hook may have put in ``headers``.

    Without a hook that touched them the names share nothing with
    forkproxy's own, and one set test is all this costs.
    """
    store = _store(headers)
    names = store.keys() if store is not None else {name.lower() for name in headers}
    if names.isdisjoint(_FORKPROXYS_OWN):
        return
    for name in (_not_forwarded(headers) - _NOT_NAMED_AWAY) | _SET_TOWARDS_UPSTREAM:
        _pop(headers, name)


def client_response_headers(
    headers: HTTPHeaderDict, *, keep_content_length: bool, drop: Iterable[str] = ()
) -> list[tuple[str, str]]:
    """The upstream's headers as a WSGI header list for the client.

    ``X-Accel-*`` would be acted on by an nginx in front of us, so an upstream
    must not be able to steer it. ``Content-Length`` is recomputed from the
    body the client really gets, except where the body is never sent.
    """
    skip = _not_forwarded(headers) | _SET_BY_SERVER.union(drop)
    if not keep_content_length:
        skip |= {"content-length"}
    return [
        (values[0], value)
        for lname, values in fields(headers)
        if lname not in skip and not lname.startswith("x-accel-")
        for value in values[1:]
    ]


FORBIDDEN_WHY = ("a name that is not a token, or a value that is not a str or holds CR, LF, NUL, another control "
                 "character or a non-latin-1 character")


def first_forbidden(pairs: Iterable[tuple[str, str]]) -> str | None:
    """The first header name with ``FORBIDDEN_WHY``, or None; a name that is not a str is named by its type.

    A hook may set any object as a value (or, bypassing the header dict, a
    name): one that is not a str is as unsendable as a CR in one.
    """
    search, token = _FORBIDDEN.search, TOKEN_RE.fullmatch
    for name, value in pairs:
        if not isinstance(name, str):
            return f"<{type(name).__name__}>"
        if not isinstance(value, str) or search(value) or not token(name):
            return name
    return None
