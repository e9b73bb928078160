"""The chunked decoder, without sockets: every split, and every way to break it."""
import pytest

from forkproxy.http.chunked import ChunkError, Dechunker

BODY = b"5\r\nhello\r\n1;ext=1\r\n \r\nB \r\nhello world\r\n0\r\nX-Trailer: t\r\n\r\n"
CHUNKS = [b"hello", b" ", b"hello world"]


def decode(pieces):
    d = Dechunker()
    out = []
    for piece in pieces:
        out += d.feed(piece)
    d.finish()
    return out


def test_whole_body():
    assert decode([BODY]) == CHUNKS


def test_every_two_way_split_and_byte_by_byte_give_the_same_chunks():
    for cut in range(1, len(BODY)):
        assert b"".join(decode([BODY[:cut], BODY[cut:]])) == b"".join(CHUNKS), cut
    assert b"".join(decode([bytes([b]) for b in BODY])) == b"".join(CHUNKS)


def test_a_chunk_that_arrives_whole_is_one_unit():
    d = Dechunker()
    assert d.feed(b"3\r\nabc\r\n4\r\ndefg\r\n") == [b"abc", b"defg"]
    assert d.feed(b"0\r\n\r\n") == [] and d.done


def test_a_huge_chunk_comes_in_bounded_pieces():
    d = Dechunker(piece=1000)
    out = d.feed(b"%x\r\n" % 5000 + b"z" * 5000 + b"\r\n0\r\n\r\n")
    assert b"".join(out) == b"z" * 5000 and max(map(len, out)) <= 1000


@pytest.mark.parametrize("bad", [b"zz\r\n", b"-1\r\n", b"5\r\nhelloXX", b"0x5\r\n", b"5 5\r\n",
                                 b"12345678901234567\r\n", b"3\r\nabc\r\n0\r\n\r\nextra"])
def test_broken_codings_raise(bad):
    with pytest.raises(ChunkError):
        decode([bad])


def test_a_body_that_ends_inside_the_coding_is_an_error():
    d = Dechunker()
    d.feed(b"5\r\nhel")
    with pytest.raises(ChunkError):
        d.finish()


def test_an_endless_size_line_is_an_error():
    with pytest.raises(ChunkError):
        Dechunker().feed(b"1" * 5000)


def test_chunks_before_a_break_come_out_before_the_error():
    d = Dechunker()
    assert d.feed(b"3\r\nabc\r\nzz\r\n") == [b"abc"]
    with pytest.raises(ChunkError):
        d.feed(b"")


def test_a_read_holding_exactly_one_chunk_is_taken_whole_and_then_the_end():
    d = Dechunker(piece=10)
    assert d.feed(b"5\r\nhello\r\n") == [b"hello"]
    assert d.feed(b"b\r\nhello world\r\n") == [b"hello worl", b"d"]  # over the piece size: the full path
    assert d.feed(b"0\r\n\r\n") == [] and d.done
