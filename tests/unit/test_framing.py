"""The chunked framer finds where a chunked body ends, however the bytes are split."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.http.framing import ChunkedFramer, FramingError, chunk

BODY = b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nX-Trailer: yes\r\n\r\n"
AFTER = b"GET /next HTTP/1.1\r\n"


def test_whole_body_then_next_request() -> None:
    f = ChunkedFramer()
    assert f.scan(BODY + AFTER, 0) == len(BODY)
    assert f.done


def test_data_segments_dechunk() -> None:
    segs: list[tuple[int, int]] = []
    ChunkedFramer().scan(BODY, 0, segs)
    assert b"".join(BODY[a:b] for a, b in segs) == b"hello world"


@given(st.lists(st.integers(1, len(BODY) + len(AFTER) - 1), unique=True, max_size=10))
def test_any_split(cuts: list[int]) -> None:
    data = BODY + AFTER
    bounds = [0, *sorted(cuts), len(data)]
    f = ChunkedFramer()
    consumed = 0
    for a, b in itertools.pairwise(bounds):
        piece = data[a:b]
        end = f.scan(piece, 0)
        if end >= 0:
            consumed += end
            break
        consumed += len(piece)
    assert consumed == len(BODY)


@pytest.mark.parametrize("bad", [b"zz\r\n", b"\r\n", b"1" * 20 + b"\r\n", b"x" * 9000])
def test_bad_sizes(bad: bytes) -> None:
    with pytest.raises(FramingError):
        ChunkedFramer().scan(bad, 0)


def test_chunk() -> None:
    assert b"".join(chunk(b"abc")) == b"3\r\nabc\r\n"
