"""The Framer: strict grammar, both directions, linear however the bytes are split (sans I/O)."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.http import framing
from gateway.http.framing import BODY, END, HEAD, HEAD_BODY, NEED, UPGRADE, Framer, FramingError, chunk
from tests import framing_driver as drive

GET = b"GET / HTTP/1.1\r\nHost: 3000-demo.sandbox.localhost\r\n\r\n"
POST_CHUNKED = b"POST / HTTP/1.1\r\nHost: 3000-demo.sandbox.localhost\r\nTransfer-Encoding: chunked\r\n\r\n"
BODY_BYTES = b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nX-Trailer: yes\r\n\r\n"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
CHUNKED_RESPONSE = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"


def test_the_70_bytes_that_froze_a_worker() -> None:
    """issue 9: ``int(x, 16)`` took ``-6`` and moved the read position backwards forever."""
    attack = POST_CHUNKED + b"-6\r\nX"
    assert len(attack) < 100
    with drive.bounded():
        assert drive.requests([attack]) == drive.Verdict((), "invalid_framing")
        assert drive.requests([attack[:-3], attack[-3:]]) == drive.Verdict((), "invalid_framing")
        # The same from a sandbox: one response stalled every tenant of the worker.
        assert drive.responses([CHUNKED_RESPONSE + b"-6\r\nX"]) == drive.Verdict((), "upstream_invalid_response")


@pytest.mark.parametrize(
    "size",
    [b"-6", b"+5", b" 5", b"5 ", b"\t5", b"0x5", b"5_0", b"\xd9\xa5", "\uff15".encode(), b"1" * 17, b"", b";a=b",
     b"5\x00", b"g", b"5 ;a=b"],
)  # fmt: skip
def test_chunk_size_is_1_to_16_hexdig(size: bytes) -> None:
    """RFC 9112 §7.1: chunk-size = 1*HEXDIG; anything Python's int() also takes is refused."""
    data = POST_CHUNKED + size + b"\r\nhello\r\n0\r\n\r\n"
    assert drive.requests([data]).end == "invalid_framing"
    assert drive.responses([CHUNKED_RESPONSE + size + b"\r\nhello\r\n0\r\n\r\n"]).end == "upstream_invalid_response"


@pytest.mark.parametrize(
    "body",
    [
        b"5\nhello\r\n0\r\n\r\n",  # bare LF after the size
        b"5\r\nhello\n0\r\n\r\n",  # bare LF after the data
        b"5\r\nhelloXX0\r\n\r\n",  # no CRLF after the data
        b"5\r\nhello\r\n0\r\n\n",  # bare LF ending the trailer section
        b"5\r\nhello\r\n0\r\nT: x\n\r\n",  # bare LF in a trailer
        b"5\r\nhello\r\n0\r\nT: x\ry\r\n\r\n",  # bare CR in a trailer
        b"5;a\rb\r\nhello\r\n0\r\n\r\n",  # bare CR in an extension
        b"1" * 8200,  # a size line that never ends
    ],
)
def test_chunked_lines_end_in_crlf(body: bytes) -> None:
    for split in (None, 3, 7):
        chunks = [POST_CHUNKED + body] if split is None else [POST_CHUNKED + body[:split], body[split:]]
        assert drive.requests(chunks).end == "invalid_framing", (body, split)


def test_16_hex_digits_are_fine_and_leading_zeros_too() -> None:
    data = POST_CHUNKED + b"0000000000000005\r\nhello\r\n0\r\n\r\n"
    assert drive.requests([data]) == drive.Verdict(((POST_CHUNKED, data[len(POST_CHUNKED) :]),), "idle")


def test_whole_body_then_next_request() -> None:
    data = POST_CHUNKED + BODY_BYTES + GET
    assert drive.requests([data]) == drive.Verdict(((POST_CHUNKED, BODY_BYTES), (GET, b"")), "idle", (0,))


@given(st.lists(st.integers(1, len(POST_CHUNKED + BODY_BYTES + GET) - 1), unique=True, max_size=10))
def test_any_split(cuts: list[int]) -> None:
    data = POST_CHUNKED + BODY_BYTES + GET
    bounds = [0, *sorted(cuts), len(data)]
    chunks = [data[a:b] for a, b in itertools.pairwise(bounds)]
    assert drive.requests(chunks) == drive.Verdict(((POST_CHUNKED, BODY_BYTES), (GET, b"")), "idle", (0,))


def test_a_connection_field_in_trailers_does_not_end_the_connection() -> None:
    """llhttp reads ``Connection: close`` in a trailer section as the connection's and refused the
    next message ("Data after Connection: close"), though the head (which the gateway decides from,
    RFC 9110 §6.5.1) kept the connection: a sandbox's next response on the pooled connection was a
    502, a client's next request a 400. Both directions, however the bytes are split."""
    trailed = b"5\r\nhello\r\n0\r\nConnection: close\r\n\r\n"
    for chunks in ([CHUNKED_RESPONSE + trailed + OK], [CHUNKED_RESPONSE + trailed, OK]):
        v = drive.responses(chunks)
        assert v == drive.Verdict(((CHUNKED_RESPONSE, trailed), (OK[:-2], b"ok")), "idle"), v
    for chunks in ([POST_CHUNKED + trailed + GET], [POST_CHUNKED + trailed, GET]):
        v = drive.requests(chunks)
        assert v == drive.Verdict(((POST_CHUNKED, trailed), (GET, b"")), "idle", (0,)), v


def test_dechunked_for_an_http10_client() -> None:
    v = drive.responses([CHUNKED_RESPONSE + BODY_BYTES], http10_client=True)
    assert v == drive.Verdict(((CHUNKED_RESPONSE, b"hello world"),), "idle", trailer_lines=(b"X-Trailer: yes",))


def test_events_and_offsets() -> None:
    fr = Framer(False, 65536, 128)
    data = GET + POST_CHUNKED + b"5\r\nhel"
    assert fr.next(data, 0) == HEAD and fr.head == GET and fr.end == len(GET)
    assert fr.next(data, fr.end) == HEAD_BODY and fr.head == POST_CHUNKED
    pos = fr.end
    assert fr.body(framing.CHUNKED, 0, data, pos) == BODY and fr.end == len(data)
    rest = b"lo\r\n0\r\n\r\n"
    assert fr.next(rest, 0) == END and fr.end == len(rest)
    assert fr.next(b"\r\n\r\n", 0) == NEED  # empty lines between messages are skipped
    upgrade = b"GET /ws HTTP/1.1\r\nHost: h\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n"
    assert fr.next(upgrade + b"\x81\x00", 0) == UPGRADE and fr.end == len(upgrade)


def test_a_body_llhttp_does_not_see_is_refused() -> None:
    """The analysis and llhttp must agree on whether a body follows: body() after a head llhttp
    ended, or no body() where llhttp expects one, is refused."""
    fr = Framer(False, 65536, 128)
    data = GET + b"hello"
    assert fr.next(data, 0) == HEAD
    with pytest.raises(FramingError) as e:
        fr.body(framing.LENGTH, 5, data, fr.end)  # llhttp sees "hello" as the start of a new message
    assert e.value.kind == framing.FRAMING
    fr = Framer(False, 65536, 128)
    head = b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\n"
    assert fr.next(head + b"hello", 0) == HEAD_BODY
    with pytest.raises(FramingError):
        fr.body(framing.NONE, 0, head + b"hello", fr.end)


def test_head_and_trailer_limits() -> None:
    many = b"GET / HTTP/1.1\r\nHost: h\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(200)) + b"\r\n"
    assert drive.requests([many], max_fields=128).end == "request_head_too_large"
    assert drive.requests([many], max_fields=256).messages == ((many, b""),)
    assert drive.requests([many[:100], many[100:]], max_fields=128).end == "request_head_too_large"
    big = b"GET / HTTP/1.1\r\nHost: h\r\nX: " + b"a" * 5000 + b"\r\n\r\n"
    assert drive.requests([big], max_head=4096).end == "request_head_too_large"
    assert drive.requests([big[:3000], big[3000:]], max_head=4096).end == "request_head_too_large"
    assert drive.requests([big[:5000]], max_head=4096).end == "request_head_too_large"  # no end yet
    trailers = b"".join(b"T-%d: %s\r\n" % (i, b"v" * 100) for i in range(100))
    data = POST_CHUNKED + b"0\r\n" + trailers + b"\r\n"
    assert drive.requests([data], max_head=4096).end == "request_head_too_large"
    assert drive.requests([data], max_head=65536).end == "idle"
    many_responses = b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(300)) + b"\r\n"
    assert drive.responses([many_responses]).end == "upstream_invalid_response"


def test_a_syntax_error_within_the_limit_is_one_however_split() -> None:
    """Problems are reported in the order of the bytes, so the verdict does not depend on reads."""
    big = b"GET / HTTP/1.1\r\nHost: h\r\nX-A: b\x00c\r\nX: " + b"a" * 5000 + b"\r\n\r\n"
    verdicts = {drive.requests([big[:i], big[i:]], max_head=4096).end for i in range(1, len(big), 97)}
    assert verdicts == {drive.requests([big], max_head=4096).end} == {"malformed_request"}


def test_an_incomplete_head_is_kept_not_copied_and_fed_once() -> None:
    """60 KB of head in 1-byte reads: one buffer grows, llhttp sees each byte once (linear)."""
    fed: list[int] = []
    fr = Framer(False, 65536, 128)
    real = fr.parser

    class Counting:
        def feed_data(self, data: bytes) -> None:
            fed.append(len(data))
            real.feed_data(data)

        def should_keep_alive(self) -> bool:
            return real.should_keep_alive()

    fr.parser = Counting()  # type: ignore[assignment]
    head = b"GET / HTTP/1.1\r\nHost: h\r\nX-Big: " + b"a" * 60000 + b"\r\n\r\n"
    acc = None
    for i in range(len(head) - 1):
        assert fr.next(head[i : i + 1], 0) == NEED
        if acc is None:
            acc = fr.acc
        assert fr.acc is acc and acc is not None and len(acc) == i + 1
    assert fr.next(head[-1:], 0) == HEAD and fr.head == head
    assert sum(fed) == len(head)


def test_a_repeated_head_is_not_parsed_again_but_a_changed_one_is() -> None:
    fr = Framer(False, 65536, 128)
    fed = _counting(fr)
    for _ in range(3):
        assert fr.next(GET, 0) == HEAD
    assert fed == [GET]
    close = b"GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"
    assert fr.next(close, 0) == HEAD
    with pytest.raises(FramingError):  # llhttp refuses data after Connection: close
        fr.next(close, 0)


def _counting(fr: Framer) -> list[bytes]:
    """What ``fr`` gives llhttp, piece by piece."""
    fed: list[bytes] = []
    real = fr.parser

    class Counting:
        def feed_data(self, data: bytes) -> None:
            fed.append(data)
            real.feed_data(data)

        def should_keep_alive(self) -> bool:
            return real.should_keep_alive()

        def get_status_code(self) -> int:
            return real.get_status_code()  # type: ignore[union-attr]

    fr.parser = Counting()  # type: ignore[assignment]
    return fed


def test_a_repeated_head_with_its_whole_body_is_not_parsed_again() -> None:
    """The same response head with as long a body in the same read: llhttp would count the body's
    bytes to the same end, so it sees the head once; anything else it sees again."""
    fr = Framer(True, 65536, 128)
    fed = _counting(fr)
    head = OK[:-2]
    data = OK * 3
    pos = 0
    for _ in range(3):
        assert fr.next(data, pos) == HEAD_BODY and fr.head == head and fr.status == 200
        assert fr.body(framing.LENGTH, 2, data, fr.end) == END and data[fr.end - 2 : fr.end] == b"ok"
        pos = fr.end
    assert fed == [head, b"ok"]
    # The body not all in this read: llhttp sees everything from the head on.
    assert fr.next(OK[:-1], 0) == HEAD_BODY
    assert fr.body(framing.LENGTH, 2, OK[:-1], fr.end) == BODY
    assert fr.next(b"k", 0) == END
    assert fed[2:] == [head, b"o", b"k"]
    # An interim response between is the message llhttp saw last: the final head is parsed again,
    # with its own status, and is the one replayed after it.
    hint = b"HTTP/1.1 103 Early Hints\r\n\r\n"
    assert fr.next(OK, 0) == HEAD_BODY and fr.body(framing.LENGTH, 2, OK, fr.end) == END
    n = len(fed)
    assert fr.next(hint + OK, 0) == HEAD and fr.status == 103
    assert fr.next(hint + OK, fr.end) == HEAD_BODY and fr.status == 200 and fr.head == head
    assert fr.body(framing.LENGTH, 2, hint + OK, fr.end) == END and fed[n:] == [hint, head, b"ok"]
    assert fr.next(OK, 0) == HEAD_BODY and fr.status == 200 and fr.body(framing.LENGTH, 2, OK, fr.end) == END
    assert len(fed) == n + 3


def test_a_repeated_head_framed_otherwise_is_parsed_after_all() -> None:
    """Should the caller's analysis frame a replayed head otherwise (it cannot, for the same bytes,
    but nothing here relies on that), llhttp parses the head and the usual agreement check runs."""
    for mode, length in ((framing.CHUNKED, 0), (framing.NONE, 0), (framing.LENGTH, 3)):
        fr = Framer(True, 65536, 128)
        fed = _counting(fr)
        data = OK + OK + b"x"
        assert fr.next(data, 0) == HEAD_BODY and fr.body(framing.LENGTH, 2, data, fr.end) == END
        assert fr.next(data, fr.end) == HEAD_BODY
        with pytest.raises(FramingError):
            fr.body(mode, length, data, fr.end)
        assert fed[2] == OK[:-2]  # the head was given to llhttp before the verdict
    # After a response to HEAD (no body whatever its fields say), the same head with its body.
    fr = Framer(True, 65536, 128)
    assert fr.next(OK, 0) == HEAD_BODY and fr.body(framing.LENGTH, 2, OK, fr.end) == END
    assert fr.next(OK[:-2], 0) == HEAD_BODY
    fr.skip_body()
    assert fr.next(OK, 0) == HEAD_BODY and fr.body(framing.LENGTH, 2, OK, fr.end) == END
    # A response that closes the connection is never replayed: llhttp refuses what follows.
    close = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok"
    fr = Framer(True, 65536, 128)
    assert fr.next(close * 2, 0) == HEAD_BODY and fr.body(framing.LENGTH, 2, close * 2, fr.end) == END
    with pytest.raises(FramingError):
        fr.next(close * 2, fr.end)


def test_responses_without_a_body_whatever_their_fields_say() -> None:
    """RFC 9112 §6.3: 204 and 304 have no body, nor the answer to HEAD; what follows is not body."""
    no_content = b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n"
    assert drive.responses([no_content]) == drive.Verdict(((no_content, b""),), "idle")
    assert drive.responses([no_content + b"hello"]) == drive.Verdict(((no_content, b""),), "upstream_invalid_response")
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"
    assert drive.responses([head + OK], method=b"HEAD").messages == ((head, b""), (OK[:-2], b""))


def test_1xx_responses_are_capped() -> None:
    hint = b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n"
    assert drive.responses([hint * 16 + OK]).messages[-1] == (OK[:-2], b"ok")
    assert drive.responses([hint * 17 + OK]).end == "upstream_invalid_response"
    assert drive.responses([b"HTTP/1.1 101 Switching\r\n\r\n"]).end == "upstream_invalid_response"


@pytest.mark.parametrize("status", [b"000", b"020", b"099"])
def test_a_status_code_below_100_is_refused(status: bytes) -> None:
    """RFC 9110 §15 (llhttp takes any three digits; below 100 it is final to llhttp and would be
    interim to the gateway): refused, and what came after it is not taken for the response."""
    odd = b"HTTP/1.1 " + status + b" X\r\nContent-Length: 0\r\n\r\n"
    assert drive.responses([odd + OK]) == drive.Verdict((), "upstream_invalid_response")


def test_status_codes_100_to_999_pass() -> None:
    for code in (b"100", b"599", b"600", b"999"):
        head = b"HTTP/1.1 " + code + b" X\r\n" + (b"" if code == b"100" else b"Content-Length: 0\r\n") + b"\r\n"
        assert drive.responses([head + OK]).messages[0] == (head, b"")


def test_close_delimited_and_upgrade_responses() -> None:
    head = b"HTTP/1.1 200 OK\r\n\r\n"
    assert drive.responses([head + b"abc", b"def"]) == drive.Verdict(((head, b"abcdef"),), "close")
    up = b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n"
    assert drive.responses([up + b"\x81\x00"]) == drive.Verdict(((up, b""),), "upgrade")


def test_chunk() -> None:
    assert b"".join(chunk(b"abc")) == b"3\r\nabc\r\n"
