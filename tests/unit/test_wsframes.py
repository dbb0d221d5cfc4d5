"""The WebSocket frame tracker finds every frame boundary, however the bytes are split, never one
that is not there, and always advances (RFC 6455 §5.2).

Valid streams are written by the websockets library (an independent framer); arbitrary bytes are
checked against a small reference parser that reads the whole stream at once.
"""

from __future__ import annotations

import itertools
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from websockets.frames import Close, Frame, Opcode
from websockets.streams import StreamReader

from gateway.http.wsframes import GOING_AWAY, FrameTracker, close_frame

DATA_OPS = (Opcode.CONT, Opcode.TEXT, Opcode.BINARY)
CONTROL_OPS = (Opcode.PING, Opcode.PONG)
# Lengths around each header form: 7-bit, 16-bit and 64-bit lengths (§5.2).
SIZES = st.one_of(st.integers(0, 130), st.sampled_from([65535, 65536, 70000]))


@st.composite
def frames(draw: st.DrawFn) -> tuple[Frame, bool]:
    """A frame, and whether its RSV1 bit is set (permessage-deflate does: the tracker must not care)."""
    if draw(st.booleans()):
        size = draw(st.integers(0, 125))
        return Frame(draw(st.sampled_from(CONTROL_OPS)), b"p" * size), False
    return Frame(draw(st.sampled_from(DATA_OPS)), b"d" * draw(SIZES), fin=draw(st.booleans())), draw(st.booleans())


def encode(fs: list[tuple[Frame, bool]], masked: bool) -> tuple[bytes, set[int]]:
    """The wire bytes and every boundary position (0 and each frame's end)."""
    out = bytearray()
    bounds = {0}
    for f, rsv1 in fs:
        raw = bytearray(f.serialize(mask=masked))
        if rsv1:
            raw[0] |= 0x40
        out += raw
        bounds.add(len(out))
    return bytes(out), bounds


def pieces(data: bytes, cuts: list[int]) -> list[tuple[int, int]]:
    points = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    return list(itertools.pairwise(points))


@settings(max_examples=300)
@given(st.lists(frames(), max_size=12), st.booleans(), st.lists(st.integers(0, 1 << 20), max_size=20))
def test_boundaries_of_valid_streams_however_split(fs: list[tuple[Frame, bool]], masked: bool, cuts: list[int]) -> None:
    data, bounds = encode(fs, masked)
    t = FrameTracker(masked)
    for a, b in pieces(data, cuts):
        assert t.feed(data[a:b]) == b - a
        assert t.at_boundary == (b in bounds), (a, b)
    assert not t.lost and t.frames == len(fs) and t.at_boundary


@settings(max_examples=300)
@given(st.lists(frames(), max_size=12), st.booleans(), st.lists(st.integers(0, 1 << 20), max_size=20))
def test_until_boundary_stops_at_each_boundary(fs: list[tuple[Frame, bool]], masked: bool, cuts: list[int]) -> None:
    """Feeding with until_boundary visits exactly the boundaries, in order, and always advances."""
    data, bounds = encode(fs, masked)
    t = FrameTracker(masked)
    seen = {0}
    for a, b in pieces(data, cuts):
        pos = a
        while pos < b:
            used = t.feed(data[pos:b], until_boundary=True)
            if used == 0:  # at a boundary already (reported before): step over one byte
                assert t.at_boundary and pos in bounds
                assert t.feed(data[pos : pos + 1]) == 1
                pos += 1
                continue
            pos += used
            assert pos <= b
            if t.at_boundary:
                seen.add(pos)
            else:
                assert pos == b  # it stops early only at a boundary
    assert seen == bounds


def test_close_frames_are_what_websockets_reads() -> None:
    assert close_frame() == b"\x88\x02\x03\xe9"
    for masked in (False, True):
        reader = StreamReader()
        reader.feed_data(close_frame(GOING_AWAY, masked=masked))
        gen = Frame.parse(reader.read_exact, mask=masked)
        with pytest.raises(StopIteration) as done:
            next(gen)
        frame = done.value.value
        assert frame.opcode == Opcode.CLOSE and Close.parse(frame.data).code == GOING_AWAY
    masked = close_frame(masked=True, mask=b"\x01\x02\x03\x04")
    assert masked == b"\x88\x82\x01\x02\x03\x04" + bytes((0x03 ^ 1, 0xE9 ^ 2))


def test_close_is_noticed_and_direction_is_enforced() -> None:
    t = FrameTracker(masked=False)
    t.feed(Frame(Opcode.TEXT, b"hi").serialize(mask=False) + close_frame())
    assert t.closed and t.at_boundary
    t = FrameTracker(masked=False)  # a server must not mask
    t.feed(Frame(Opcode.TEXT, b"hi").serialize(mask=True))
    assert t.lost and not t.at_boundary
    t = FrameTracker(masked=True)  # a client must mask
    t.feed(Frame(Opcode.TEXT, b"hi").serialize(mask=False))
    assert t.lost


@pytest.mark.parametrize(
    "bad",
    [
        b"\x83\x00",  # reserved opcode 3
        b"\x8b\x00",  # reserved control opcode 0xB
        b"\x09\x00",  # a fragmented ping
        b"\x89\x7e\x00\x80",  # a ping longer than 125
        b"\x82\x7f" + struct.pack("!Q", 1 << 63),  # 64-bit length with the top bit set
    ],
)
def test_invalid_headers_make_it_lost(bad: bytes) -> None:
    t = FrameTracker(masked=False)
    assert t.feed(bad + b"\x81\x00") == len(bad) + 2
    assert t.lost and not t.at_boundary
    assert t.feed(b"\x81\x00") == 2 and t.lost  # and it stays lost: it never guesses again


def reference(data: bytes, masked: bool) -> tuple[set[int], bool]:
    """Boundaries of ``data`` read at once, and whether the stream broke §5.2 (an independent
    reading of the header rules, byte by byte)."""
    bounds = {0}
    pos = 0
    while pos + 2 <= len(data):
        b0, b1 = data[pos], data[pos + 1]
        op, fin, mask, n = b0 & 15, b0 >> 7, b1 >> 7, b1 & 127
        if op not in (0, 1, 2, 8, 9, 10) or mask != masked or (op >= 8 and (not fin or n > 125)):
            return bounds, True
        size = 2 + (2 if n == 126 else 8 if n == 127 else 0) + (4 if mask else 0)
        if pos + size > len(data):
            break
        if n == 126:
            n = int.from_bytes(data[pos + 2 : pos + 4], "big")
        elif n == 127:
            n = int.from_bytes(data[pos + 2 : pos + 10], "big")
            if n >> 63:
                return bounds, True
        pos += size + n
        if pos <= len(data):
            bounds.add(pos)
    return bounds, False


@settings(max_examples=1000)
@given(st.binary(max_size=200), st.booleans(), st.lists(st.integers(0, 400), max_size=10))
def test_arbitrary_bytes_never_misread(data: bytes, masked: bool, cuts: list[int]) -> None:
    """Garbage, truncated or hostile: the tracker consumes every byte, never raises, and reports
    a boundary only where a whole-stream reading finds one; once lost, never a boundary again."""
    bounds, broken = reference(data, masked)
    t = FrameTracker(masked)
    for a, b in pieces(data, cuts):
        assert t.feed(data[a:b]) == b - a
        assert t.at_boundary == (b in bounds), (a, b)
    assert t.lost == broken


@settings(max_examples=500)
@given(st.binary(min_size=1, max_size=64), st.booleans())
def test_until_boundary_always_advances_on_arbitrary_bytes(data: bytes, masked: bool) -> None:
    t = FrameTracker(masked)
    pos = 0
    steps = 0
    while pos < len(data):
        used = t.feed(data[pos:], until_boundary=True)
        if used == 0:
            assert t.at_boundary
            used = t.feed(data[pos : pos + 1])
        assert used > 0
        pos += used
        steps += 1
    assert steps <= len(data)
