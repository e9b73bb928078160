"""The upstream wire protocol without sockets: request heads out, strict response heads in, body framing."""
import io
from http.client import BadStatusLine, HTTPException, LineTooLong, RemoteDisconnected, UnknownProtocol

import pytest
from urllib3 import HTTPHeaderDict

from forkproxy.http.wire import RequestHead, StatusLine, body_framing, host_header, read_head


def _reader(data: bytes, buffer: int = 2048) -> io.BufferedReader:
    return io.BufferedReader(io.BytesIO(data), buffer)


def _head(data: bytes, buffer: int = 2048):
    fp = _reader(data, buffer)
    status, headers = read_head(fp)
    return status, list(headers.iteritems()), fp.read()


# -- the request head --------------------------------------------------------

def test_request_head_has_the_request_line_host_first_and_a_blank_line():
    head = RequestHead("GET", "/v1/x?q=1", "up.example:8080",
                       HTTPHeaderDict([("Accept", "*/*"), ("X-A", "1"), ("X-A", "2")]))
    assert head.data == (
        b"GET /v1/x?q=1 HTTP/1.1\r\nHost: up.example:8080\r\nAccept: */*\r\nX-A: 1\r\nX-A: 2\r\n\r\n")


def test_the_target_goes_out_byte_for_byte():
    target = "/a%2fb/c|d{e}?x=%7c&y=%zz"
    assert RequestHead("GET", target, "h", HTTPHeaderDict()).data.startswith(f"GET {target} HTTP/1.1\r\n".encode())


def test_header_values_go_out_as_latin_1():
    assert RequestHead("GET", "/", "h", HTTPHeaderDict({"X-Name": "caf\xe9"})).data == (
        b"GET / HTTP/1.1\r\nHost: h\r\nX-Name: caf\xe9\r\n\r\n")


def test_a_request_head_is_its_own_copy_and_takes_no_extra_headers():
    block = RequestHead("GET", "/", "h", HTTPHeaderDict())
    assert block.copy() is block
    block.update({})
    with pytest.raises(TypeError):
        block.update({"Proxy-Authorization": "x"})


@pytest.mark.parametrize("host, port, default, expected", [
    ("up.example", 80, 80, "up.example"),
    ("up.example", 8080, 80, "up.example:8080"),
    ("::1", 443, 443, "[::1]"),
    ("::1", 8443, 443, "[::1]:8443"),
])
def test_host_header_brackets_ipv6_and_leaves_out_the_default_port(host, port, default, expected):
    assert host_header(host, port, default) == expected


# -- the response head ---------------------------------------------------------

PLAIN = (b"HTTP/1.1 200 OK\r\nServer: up\r\nContent-Length:  5 \r\nX-Empty:\r\n"
         b"Set-Cookie: a=1\r\nSet-Cookie: b=2\r\n\r\nhello")


def test_a_plain_head_is_parsed_and_the_body_left_unread():
    status, pairs, rest = _head(PLAIN)
    assert status == StatusLine(11, 200, "OK")
    assert pairs == [("Server", "up"), ("Content-Length", "5"), ("X-Empty", ""),
                     ("Set-Cookie", "a=1"), ("Set-Cookie", "b=2")]
    assert rest == b"hello"


def test_a_head_larger_than_the_read_buffer_parses_the_same_line_by_line():
    assert _head(PLAIN, buffer=16) == _head(PLAIN)


@pytest.mark.parametrize("head", [
    b"HTTP/1.1 200 OK\r\nX-T: \t v a l \t\r\nX-U:w\t\r\nX-V: x\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nX-T:v a l\r\nX-U: w \r\nX-V:\tx\r\n\r\n",
])
def test_spaces_and_tabs_around_values_are_cut_the_same_by_both_parsers(head):
    one_pass, by_lines = _head(head), _head(head, buffer=16)
    assert one_pass == by_lines
    assert one_pass[1] == [("X-T", "v a l"), ("X-U", "w"), ("X-V", "x")]


def test_a_head_with_no_fields_is_read_in_one_pass_too():
    assert _head(b"HTTP/1.1 204 No Content\r\n\r\nnext") == (StatusLine(11, 204, "No Content"), [], b"next")


def test_bare_lf_line_ends_are_accepted():
    status, pairs, rest = _head(b"HTTP/1.0 404 Not Found\nA: 1\nB:2\n\nbody")
    assert status == StatusLine(10, 404, "Not Found") and pairs == [("A", "1"), ("B", "2")] and rest == b"body"


def test_interim_responses_are_skipped_but_101_is_final():
    status, pairs, rest = _head(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
                                b"HTTP/1.1 201 Created\r\nA: 1\r\n\r\n")
    assert status.status == 201 and pairs == [("A", "1")]
    assert _head(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n")[0].status == 101


@pytest.mark.parametrize("head, error", [
    (b"", RemoteDisconnected),
    (b"HTTP/1.1 200 OK\r\nA: 1\r\n", HTTPException),  # ends before its blank line
    (b"ICY 200 OK\r\n\r\n", BadStatusLine),
    (b"HTTP/2.0 200 OK\r\n\r\n", UnknownProtocol),
    (b"HTTP/1.1 20 OK\r\n\r\n", BadStatusLine),
    (b"HTTP/1.1 099 Low\r\n\r\n", BadStatusLine),
    (b"HTTP/1.1 abc OK\r\n\r\n", BadStatusLine),
    (b"HTTP/1.1 200 OK\r\nX: a\rInjected: 1\r\n\r\n", HTTPException),  # bare CR
    (b"HTTP/1.1 200 OK\r\nX: a\0b\r\n\r\n", HTTPException),  # NUL
    (b"HTTP/1.1 200 OK\r\nX: a\x01b\r\n\r\n", HTTPException),  # other controls: gunicorn refuses them
    (b"HTTP/1.1 200 OK\r\nX: a\x1b[31m\r\n\r\n", HTTPException),
    (b"HTTP/1.1 200 OK\r\nX: a\x7f\r\n\r\n", HTTPException),  # DEL
    (b"HTTP/1.1 200 OK\r\nX: a\r\n folded\r\n\r\n", HTTPException),  # obs-fold
    (b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n", HTTPException),
    (b"HTTP/1.1 200 OK\r\nX Y: z\r\n\r\n", HTTPException),  # space in a name
    (b"HTTP/1.1 200 OK\r\nX : z\r\n\r\n", HTTPException),  # space before the colon
    (b"HTTP/1.1 200 OK\r\n: z\r\n\r\n", HTTPException),  # empty name
    (b"HTTP/1.1 200 OK\r\n" + b"A: 1\r\n" * 101 + b"\r\n", HTTPException),  # too many headers
    (b"HTTP/1.1 200 OK\r\nA: " + b"x" * 70000 + b"\r\n\r\n", LineTooLong),
])
def test_malformed_heads_are_refused_in_both_parsers(head, error):
    for buffer in (2048, 8):
        with pytest.raises(error):
            read_head(_reader(head, buffer))


def test_a_tab_inside_a_header_value_is_a_valid_value_in_both_parsers():
    for buffer in (2048, 8):
        _, headers = read_head(_reader(b"HTTP/1.1 200 OK\r\nX: a\tb\r\n\r\n", buffer))
        assert headers["X"] == "a\tb"


# -- body framing ------------------------------------------------------------------

def _framing(head: bytes, method: str = "GET"):
    status, headers = read_head(_reader(head + b"\r\n"))
    return body_framing(method, status, headers)


@pytest.mark.parametrize("head, method, expected", [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n", "GET", (False, 5, False)),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\n", "GET", (False, 5, False)),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n", "GET", (True, None, False)),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: Chunked\r\nContent-Length: 9\r\n", "GET", (True, None, False)),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: identity\r\nContent-Length: 9\r\n", "GET", (False, None, True)),
    (b"HTTP/1.1 200 OK\r\n", "GET", (False, None, True)),  # to the close
    (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n", "GET", (False, 5, True)),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: Keep-Alive, CLOSE\r\n", "GET", (False, 5, True)),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: keep-alive\r\nConnection: close\r\n", "GET",
     (False, 5, True)),
    (b"HTTP/1.0 200 OK\r\nContent-Length: 5\r\n", "GET", (False, 5, True)),
    (b"HTTP/1.0 200 OK\r\nContent-Length: 5\r\nConnection: keep-alive\r\n", "GET", (False, 5, False)),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n", "HEAD", (False, 0, False)),
    (b"HTTP/1.1 204 No Content\r\n", "GET", (False, 0, False)),
    (b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n", "GET", (False, 0, False)),
])
def test_body_framing_follows_rfc_9112_section_6_3(head, method, expected):
    assert tuple(_framing(head, method)) == expected


@pytest.mark.parametrize("head", [
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n",  # would reach the client gzipped, unsaid
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, chunked\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: gzip\r\n",
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n",  # never asked for
])
def test_a_body_that_cannot_be_relayed_exactly_is_refused(head):
    with pytest.raises(HTTPException):
        _framing(head)


@pytest.mark.parametrize("value", [b"5, 6", b"-1", b"+5", b"0x5", b"5 5", b"", b"\xb2", b"5, \xb9"])
def test_conflicting_or_malformed_content_length_is_refused(value):
    with pytest.raises(HTTPException):
        _framing(b"HTTP/1.1 200 OK\r\nContent-Length: " + value + b"\r\n")


def test_interim_heads_are_skipped_up_to_a_bound_and_an_endless_run_of_them_is_a_bad_head():
    from forkproxy.http.wire import MAX_INTERIM_HEADS

    hint = b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n"
    final = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    status, headers, rest = _head(b"HTTP/1.1 100 Continue\r\n\r\n" + hint * (MAX_INTERIM_HEADS - 1) + final)
    assert (status.status, headers, rest) == (200, [("Content-Length", "2")], b"ok")
    with pytest.raises(HTTPException, match="interim"):
        read_head(_reader(hint * (MAX_INTERIM_HEADS + 1) + final))
