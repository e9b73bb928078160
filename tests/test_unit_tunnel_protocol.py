"""The pure parts of tunnels: which upgrades pass, whether a 101 is the one asked for, the message relay,
and taking a connection over from gunicorn.

The relay is driven by two wsproto peers standing in for the client and the
upstream, so frames are real frames and nothing touches a socket. The
takeover is driven by gunicorn's own request parser over a socket pair.
"""
from __future__ import annotations

import io
import socket
import time
import tracemalloc
from http.client import HTTPException

import gevent
import pytest
from gevent.event import Event
from urllib3 import HTTPHeaderDict
from wsproto.connection import Connection, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Ping, Pong, TextMessage
from wsproto.extensions import PerMessageDeflate

from forkproxy.http import handshake
from forkproxy.errors import UpgradeNotSupported
from forkproxy.messages import TunnelStats
from forkproxy.http.wire import RequestHead, StatusLine, body_framing
from forkproxy.relay.wsmessages import MessageRelay
from forkproxy.server import takeover


def h(**fields) -> HTTPHeaderDict:
    out = HTTPHeaderDict()
    for name, value in fields.items():
        out.add(name.replace("_", "-"), value)
    return out


# -- handshake ------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["websocket", "WebSocket", "websocket/13"])
def test_an_allowed_protocol_is_asked_for_as_the_client_named_it(value):
    assert handshake.requested_upgrade(h(Upgrade=value), ("websocket",)) == value


@pytest.mark.parametrize("value, allowed", [
    ("h2c", ("websocket",)), ("websocket, spdy/3", ("websocket",)), ("websocket", ()), ("", ("websocket",)),
])
def test_an_upgrade_naming_any_protocol_not_allowed_is_refused(value, allowed):
    with pytest.raises(UpgradeNotSupported):
        handshake.requested_upgrade(h(Upgrade=value), allowed)


def test_a_101_must_switch_to_a_protocol_the_client_named():
    assert handshake.check_switch("websocket", h(Connection="Upgrade", Upgrade="WebSocket")) == "websocket"
    assert handshake.check_switch("foo/1, websocket", h(Connection="upgrade", Upgrade="websocket")) == "websocket"
    for bad in (h(Connection="Upgrade", Upgrade="h2c"), h(Connection="Upgrade"), h(Upgrade="websocket"),
                h(Connection="Upgrade", Upgrade="websocket, h2c")):
        with pytest.raises(HTTPException):
            handshake.check_switch("websocket", bad)


def test_a_101_is_refused_unless_a_tunnel_asked_for_it():
    switched = h(Connection="Upgrade", Upgrade="websocket")
    status = StatusLine(11, 101, "Switching Protocols")
    with pytest.raises(HTTPException):
        body_framing("GET", status, switched)
    framing = body_framing("GET", status, switched, upgrade="websocket")
    assert framing.will_close and framing.length is None and not framing.chunked


def test_the_upstream_request_carries_connection_and_upgrade_only_for_a_tunnel():
    plain = RequestHead("GET", "/ws", "up", h(Accept="*/*")).data
    tunnel = RequestHead("GET", "/ws", "up", h(Accept="*/*"), upgrade="websocket").data
    assert b"Upgrade" not in plain
    assert tunnel == b"GET /ws HTTP/1.1\r\nHost: up\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nAccept: */*\r\n\r\n"


def test_the_clients_101_follows_the_rules_of_every_reply_with_one_request_id():
    head = handshake.client_head("Switching Protocols", h(
        Connection="Upgrade, X-Hop", Upgrade="websocket", X_Hop="1", Keep_Alive="timeout=5",
        X_Accel_Redirect="/internal", X_Accel_Buffering="yes", X_Request_ID="upstreams", Date="then", Server="up",
        Sec_WebSocket_Accept="abc=", Sec_WebSocket_Protocol="chat.v2"), (("Date", "now"), ("X-Request-ID", "r1")))
    assert head == (b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
                    b"Sec-WebSocket-Accept: abc=\r\nSec-WebSocket-Protocol: chat.v2\r\n"
                    b"Date: now\r\nX-Request-ID: r1\r\n\r\n")


def test_message_hooks_offer_only_permessage_deflate_and_accept_nothing_else():
    headers = h(Sec_WebSocket_Extensions="x-webkit-deflate-frame, permessage-deflate; client_max_window_bits")
    handshake.only_deflate_offered(headers)
    assert headers["Sec-WebSocket-Extensions"] == "permessage-deflate; client_max_window_bits"
    only_other = h(Sec_WebSocket_Extensions="x-custom")
    handshake.only_deflate_offered(only_other)
    assert "Sec-WebSocket-Extensions" not in only_other
    assert handshake.accepted_deflate(h()) is None
    assert handshake.accepted_deflate(h(Sec_WebSocket_Extensions="permessage-deflate; server_no_context_takeover")) \
        == "permessage-deflate; server_no_context_takeover"
    with pytest.raises(HTTPException):
        handshake.accepted_deflate(h(Sec_WebSocket_Extensions="x-custom"))


# -- the message relay ----------------------------------------------------------------


class Peers:
    """A client and an upstream (wsproto, the real framing) talking through one MessageRelay."""

    def __init__(self, hook=None, max_bytes=1 << 20, deflate=None):
        self.stats = TunnelStats()
        self.seen = []

        def default(msg, out, stats):
            self.seen.append((msg.data, msg.from_client))
            out.send(msg.data)
        self.relay = MessageRelay(hook or default, self.stats, max_bytes, deflate)
        extensions = (lambda: [_finalized(deflate)]) if deflate else (lambda: [])
        self.client = Connection(ConnectionType.CLIENT, extensions())
        self.upstream = Connection(ConnectionType.SERVER, extensions())

    def from_client(self, *events):
        data = b"".join(self.client.send(e) for e in events)
        return self._deliver(self.relay.receive(True, data), self.client, self.upstream)

    def from_upstream(self, *events):
        data = b"".join(self.upstream.send(e) for e in events)
        return self._deliver(self.relay.receive(False, data), self.upstream, self.client)

    @staticmethod
    def _deliver(out, sender, receiver):
        """(events the other peer got, events the sender got back)."""
        back, onward = out
        for peer, data in ((sender, back), (receiver, onward)):
            if data:
                peer.receive_data(data)
        return list(receiver.events()), list(sender.events())


def _finalized(params):
    extension = PerMessageDeflate()
    extension.finalize(params)
    return extension


def test_text_and_binary_messages_pass_as_they_are_and_are_counted():
    peers = Peers()
    got, back = peers.from_client(TextMessage("hi"), BytesMessage(b"\x00\x01"))
    assert [(type(e), e.data) for e in got] == [(TextMessage, "hi"), (BytesMessage, b"\x00\x01")] and back == []
    got, _ = peers.from_upstream(TextMessage("there"))
    assert [e.data for e in got] == ["there"]
    assert (peers.stats.messages_from_client, peers.stats.messages_from_upstream) == (2, 1)
    assert peers.seen == [("hi", True), (b"\x00\x01", True), ("there", False)]


def test_a_fragmented_message_reaches_the_hook_whole():
    peers = Peers()
    got, _ = peers.from_client(TextMessage("one ", message_finished=False), TextMessage("two"))
    assert [e.data for e in got] == ["one two"]
    assert peers.seen == [("one two", True)]


def test_a_message_split_across_reads_is_handed_over_once_complete():
    peers = Peers()
    data = peers.client.send(BytesMessage(b"z" * 1000))
    for i in range(0, len(data) - 1, 7):
        assert peers.relay.receive(True, data[i:min(i + 7, len(data) - 1)]) == (b"", b"")
    back, onward = peers.relay.receive(True, data[-1:])
    peers.upstream.receive_data(onward)
    assert back == b"" and [e.data for e in peers.upstream.events()] == [b"z" * 1000]


def test_the_hook_may_change_drop_or_multiply_messages():
    def hook(msg, out, stats):
        if msg.data == "drop":
            return
        out.send(msg.data.upper())
        out.send(b"copy")
    peers = Peers(hook)
    got, _ = peers.from_client(TextMessage("drop"), TextMessage("up"))
    assert [e.data for e in got] == ["UP", b"copy"]


def test_ping_pong_pass_through_untouched():
    peers = Peers()
    got, _ = peers.from_client(Ping(b"p1"))
    assert [(type(e), e.payload) for e in got] == [(Ping, b"p1")]
    got, _ = peers.from_upstream(Pong(b"p1"))
    assert [(type(e), e.payload) for e in got] == [(Pong, b"p1")]
    assert peers.seen == []


def test_a_close_passes_on_and_its_answer_comes_back():
    peers = Peers()
    got, _ = peers.from_client(CloseConnection(4002, "done"))
    assert [(e.code, e.reason) for e in got] == [(4002, "done")]
    got, _ = peers.from_upstream(CloseConnection(4002, "done"))
    assert [(e.code, e.reason) for e in got] == [(4002, "done")]
    assert peers.relay.closed_first == "client" and peers.relay.close_code is None


def test_a_message_over_the_cap_closes_both_sides_with_1009_before_it_is_whole():
    peers = Peers(max_bytes=100)
    got, back = peers.from_client(TextMessage("x" * 100))
    assert [e.data for e in got] == ["x" * 100]
    got, back = peers.from_client(BytesMessage(b"y" * 60, message_finished=False),
                                  BytesMessage(b"y" * 60))
    assert [(type(e), e.code) for e in got] == [(CloseConnection, 1009)]
    assert [(type(e), e.code) for e in back] == [(CloseConnection, 1009)]
    assert peers.relay.close_code == 1009 and len(peers.seen) == 1


def test_text_over_the_cap_is_measured_in_utf8_bytes():
    peers = Peers(max_bytes=100)
    got, _ = peers.from_client(TextMessage("é" * 51))  # 51 characters, 102 bytes
    assert [(type(e), e.code) for e in got] == [(CloseConnection, 1009)]


@pytest.mark.parametrize("over", [0, 1])
def test_multibyte_text_arriving_in_pieces_is_capped_at_its_exact_utf8_size(over):
    peers = Peers(max_bytes=4096)
    text = "€" * 1365 + "y" * (1 + over)  # 4096 (+1) bytes in 1366 (+1) characters
    data = peers.client.send(TextMessage(text))
    for i in range(0, len(data), 7):  # wsproto hands each read's part on, characters cut in two
        _, onward = peers.relay.receive(True, data[i:i + 7])
        peers.upstream.receive_data(onward)
    got = [(type(e), e.code if isinstance(e, CloseConnection) else e.data) for e in peers.upstream.events()]
    assert got == ([(CloseConnection, 1009)] if over else [(TextMessage, text)])


def test_a_hook_that_raises_closes_both_sides_with_1011_and_keeps_the_error():
    def hook(msg, out, stats):
        raise ValueError("bad")
    peers = Peers(hook)
    got, back = peers.from_client(TextMessage("x"))
    assert [e.code for e in got] == [1011] and [e.code for e in back] == [1011]
    assert isinstance(peers.relay.hook_failure, ValueError)


def test_a_frame_wsproto_refuses_closes_both_sides_with_its_code():
    peers = Peers()
    unmasked = Connection(ConnectionType.SERVER).send(TextMessage("not masked"))  # a client must mask
    back, onward = peers.relay.receive(True, unmasked)
    peers.client.receive_data(back)
    peers.upstream.receive_data(onward)
    assert [e.code for e in peers.client.events()] == [1002]
    assert [e.code for e in peers.upstream.events()] == [1002]


def test_permessage_deflate_is_undone_for_the_hook_and_redone_on_the_way():
    params = "permessage-deflate; client_max_window_bits=15"
    peers = Peers(lambda msg, out, stats: out.send(msg.data + "!"), deflate=params)
    got, _ = peers.from_client(TextMessage("compress me " * 50))
    assert [e.data for e in got] == ["compress me " * 50 + "!"]
    got, _ = peers.from_upstream(TextMessage("and back " * 50))
    assert [e.data for e in got] == ["and back " * 50 + "!"]


def test_a_hook_blocked_on_a_message_one_way_leaves_the_other_way_alone():
    """The two directions run in two greenlets; a hook blocked on a client message (I/O would
    block it) neither takes over what the upstream's direction does meanwhile nor sends into it."""
    upstream_handled = Event()

    def hook(msg, out, stats):
        if msg.from_client:
            upstream_handled.wait(5)
        out.send(msg.data)
    peers = Peers(hook)
    held = gevent.spawn(peers.relay.receive, True, peers.client.send(TextMessage("c1")) +
                        peers.client.send(TextMessage("c2")))
    gevent.sleep(0)  # it is in the hook now
    back, to_client = peers.relay.receive(False, peers.upstream.send(TextMessage("u1")))
    upstream_handled.set()
    client_back, to_upstream = held.get(timeout=5)
    peers.client.receive_data(to_client + client_back)
    peers.upstream.receive_data(to_upstream + back)
    assert [(type(e), e.data) for e in peers.client.events()] == [(TextMessage, "u1")]
    assert [(type(e), e.data) for e in peers.upstream.events()] == [(TextMessage, "c1"), (TextMessage, "c2")]


def _fragmented(kind, piece, size: int) -> tuple[bytes, str | bytes]:
    """(frames, message): a client's message of about ``size`` bytes, one ``piece`` a frame (wsproto's framing)."""
    client = Connection(ConnectionType.CLIENT)
    count = size // len(piece.encode() if isinstance(piece, str) else piece)
    first, middle = (client.send(kind(piece, message_finished=False)) for _ in range(2))
    return first + middle * (count - 2) + client.send(kind(piece)), piece * count


def _relay_all(relay: MessageRelay, data: bytes) -> None:
    for i in range(0, len(data), 16 * 1024):  # read by read, as a tunnel does (reads smaller than the message)
        relay.receive(True, data[i:i + 16 * 1024])


@pytest.mark.parametrize("kind, piece", [(BytesMessage, b"z" * 16), (TextMessage, "é" * 8), (TextMessage, "€" * 4),
                                         (TextMessage, "x" * 4096)])
def test_a_message_held_for_the_hook_costs_about_its_own_size_whatever_its_frames(kind, piece):
    size = 256 * 1024  # in 12- to 16-byte frames (some 20,000, each an object or two in wsproto), or 4 KiB ones
    data, whole = _fragmented(kind, piece, size)
    seen = []
    relay = MessageRelay(lambda msg, out, stats: seen.append(msg.data == whole), TunnelStats(), 16 << 20)
    tracemalloc.start()
    try:
        _relay_all(relay, data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert seen == [True]
    assert peak < 3 * size, f"{peak / size:.1f} times the message's size"


def test_the_cap_check_costs_the_same_per_byte_for_a_big_text_message_as_for_a_small_one():
    def cpu_seconds(size: int) -> float:
        data, _ = _fragmented(TextMessage, "é" * 512, size)  # 1 KiB frames
        relay = MessageRelay(lambda msg, out, stats: None, TunnelStats(), size)  # at the cap: checked all along
        started = time.process_time()
        _relay_all(relay, data)
        assert relay.close_code is None
        return time.process_time() - started
    small = min(cpu_seconds(256 << 10) for _ in range(5))
    big = cpu_seconds(4 << 20)
    assert big / 16 < 4 * small, f"a byte of 4 MiB costs {big / 16 / small:.1f} times a byte of 256 KiB"


# -- taking the connection over from gunicorn ---------------------------------------


def _served(request: bytes, behind: bytes = b"") -> tuple[dict, socket.socket]:
    """The environ gunicorn's worker makes for ``request``, read from a socket with ``behind`` sent after it."""
    from gunicorn.config import Config
    from gunicorn.http import get_parser, wsgi

    server, client = socket.socketpair()
    client.sendall(request + behind)
    cfg = Config()
    req = next(get_parser(cfg, server, ("127.0.0.1", 1)))
    environ = wsgi.default_environ(req, server, cfg)
    environ["wsgi.input"].read()  # forkproxy reads a tunnel request's body before the upstream is asked
    client.close()
    return environ, server


@pytest.mark.parametrize("framing, body", [("", b""), ("Content-Length: 5\r\n", b"hello"),
                                           ("Transfer-Encoding: chunked\r\n", b"5\r\nhello\r\n0\r\n\r\n")])
def test_the_bytes_behind_an_upgrade_request_are_handed_over_whatever_its_body(framing, body):
    head = f"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n{framing}\r\n"
    environ, server = _served(head.encode() + body, b"frames sent right behind")
    with server:
        assert takeover.client_socket(environ) is server
        assert takeover.held_bytes(environ) == b"frames sent right behind"


@pytest.mark.parametrize("change", ["HTTP/1.0", "no socket", "wsgi.input replaced"])
def test_a_connection_the_server_cannot_hand_over_is_refused_before_any_upstream_is_asked(change):
    version = "HTTP/1.0" if change == "HTTP/1.0" else "HTTP/1.1"
    environ, server = _served(f"GET /ws {version}\r\nHost: x\r\nUpgrade: websocket\r\n\r\n".encode())
    if change == "no socket":
        del environ["gunicorn.socket"]
    elif change == "wsgi.input replaced":  # a middleware's: gunicorn's read-ahead is out of reach
        environ["wsgi.input"] = io.BytesIO()
    with server, pytest.raises(UpgradeNotSupported):
        takeover.client_socket(environ)


def test_the_installed_gunicorn_has_every_internal_a_tunnel_relies_on():
    takeover.check()


def test_a_gunicorn_without_take_buffered_stops_the_start_with_one_line_naming_it(monkeypatch):
    import gunicorn
    from gunicorn.http.unreader import Unreader

    monkeypatch.delattr(Unreader, "take_buffered")
    with pytest.raises(takeover.TakeoverUnavailable) as raised:
        takeover.check()
    message = str(raised.value)
    assert "\n" not in message and f"gunicorn {gunicorn.__version__}" in message and "take_buffered" in message
