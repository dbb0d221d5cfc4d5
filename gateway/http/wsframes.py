"""WebSocket frame boundaries in a tunnel, and the close frame the gateway sends on drain (pure: no I/O).

A tunnel passes WebSocket bytes unchanged (tunnel.py). To end it cleanly when the gateway drains,
the gateway must send each side a Close frame (RFC 6455 §5.5.1) *between* two frames: a Close
written in the middle of a frame's payload would be read as payload and corrupt the stream. So each
direction of a WebSocket tunnel keeps a :class:`FrameTracker` that reads only frame headers
(RFC 6455 §5.2: 2 to 14 bytes) and skips payloads by their length, never looking inside them
(extensions such as permessage-deflate change payloads, not headers).

The tracker never guesses. A header that breaks §5.2 (a reserved opcode, a fragmented or long
control frame, a 64-bit length with its top bit set, a mask bit the direction forbids: clients
mask, servers do not, §5.3) makes it *lost*: it then knows no boundary for the rest of the
connection and the gateway falls back to closing the tunnel's TCP connections as before. A Close
frame already sent in a direction means a closing handshake is under way; the gateway then leaves
it to the two ends.

Every call to :meth:`FrameTracker.feed` consumes at least one byte of a non-empty input or stops at
a boundary it reports, so a loop over it always advances (tests/unit/test_wsframes.py checks this
with arbitrary bytes and arbitrary splits).
"""

from __future__ import annotations

import os
import struct
from typing import Final

__all__ = ["GOING_AWAY", "FrameTracker", "close_frame"]

#: RFC 6455 §7.4.1: "an endpoint is going away, such as a server going down".
GOING_AWAY: Final = 1001

OP_CLOSE: Final = 0x8
_KNOWN_OPCODES: Final = frozenset({0x0, 0x1, 0x2, 0x8, 0x9, 0xA})  # §5.2; the rest are reserved
_MAX_HEAD: Final = 14  # 2 + 8 (64-bit length) + 4 (masking key)
_INVALID: Final = (0, -1)


def close_frame(code: int = GOING_AWAY, masked: bool = False, mask: bytes | None = None) -> bytes:
    """A Close frame with ``code`` and no reason (§5.5.1). ``masked``: as a client sends it (to the
    sandbox, §5.3: every client frame is masked, with a fresh unpredictable key)."""
    payload = struct.pack("!H", code)
    if not masked:
        return bytes((0x80 | OP_CLOSE, len(payload))) + payload
    key = mask if mask is not None else os.urandom(4)
    body = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return bytes((0x80 | OP_CLOSE, 0x80 | len(payload))) + key + body


class FrameTracker:
    """Where frames begin and end in one direction of a WebSocket connection.

    ``masked``: the frames of this direction must be masked (what a client sends). State:
    ``remaining`` payload bytes of the current frame still to come, ``head`` the bytes of a frame
    header not yet complete, ``lost`` once the stream broke §5.2, ``closed`` once a Close frame was
    seen, and ``frames`` counts complete headers (for tests and curiosity).
    """

    __slots__ = ("closed", "frames", "head", "lost", "masked", "remaining")

    def __init__(self, masked: bool) -> None:
        self.masked = masked
        self.remaining = 0
        self.head = b""
        self.lost = False
        self.closed = False
        self.frames = 0

    @property
    def at_boundary(self) -> bool:
        """True between two frames (or before the first): a frame may be inserted here."""
        return not self.remaining and not self.head and not self.lost

    def feed(self, data: bytes, until_boundary: bool = False) -> int:
        """Advance over ``data``; returns how many bytes were consumed: all of them, or with
        ``until_boundary`` only up to the first frame boundary (0 when already at one).

        Runs for every read of a WebSocket tunnel, so the common cases are short: a read inside a
        payload is one subtraction, and a header that lies whole in ``data`` is read in place."""
        n = len(data)
        pos = 0
        while pos < n:
            rem = self.remaining
            if rem:
                if rem > n - pos:
                    self.remaining = rem - (n - pos)
                    return n  # the payload goes on past this input
                pos += rem
                self.remaining = 0
                if until_boundary:
                    return pos
                continue
            if self.lost:
                return n
            held = self.head
            if held:  # a header split across reads (rare): complete it from this read
                buf = held + data[pos : pos + _MAX_HEAD - len(held)]
                got = self._header(buf, 0)
                if got is None:
                    self.head = buf  # still incomplete: everything left is part of it
                    return n
                self.head = b""
                used = got[0] - len(held)  # > 0: a complete header is longer than what was held
            else:
                if until_boundary:
                    return pos
                got = self._header(data, pos)
                if got is None:
                    self.head = data[pos:]  # shorter than a header: kept for the next read
                    return n
                used = got[0]
            length = got[1]
            if length < 0:  # not a valid header: lost for good
                self.head = b""
                return n
            pos += used
            self.remaining = length
            if until_boundary and not length:
                return pos
        return pos

    def _header(self, buf: bytes, at: int) -> tuple[int, int] | None:
        """(header length, payload length) of the frame header at ``buf[at:]``, or None if
        ``buf`` ends before it does. When it is not a valid §5.2 header for this direction:
        ``lost``, and (0, -1)."""
        have = len(buf) - at
        if have < 2:
            return None
        b0 = buf[at]
        b1 = buf[at + 1]
        opcode = b0 & 0x0F
        mask = b1 & 0x80
        length = b1 & 0x7F
        if opcode not in _KNOWN_OPCODES or (mask != 0) != self.masked:
            self.lost = True
            return _INVALID
        if opcode & 0x8 and (not b0 & 0x80 or length > 125):  # control frames: §5.5
            self.lost = True
            return _INVALID
        size = 6 if mask else 2
        if length >= 126:
            size += 2 if length == 126 else 8
            if have < size:
                return None
            if length == 126:
                length = (buf[at + 2] << 8) | buf[at + 3]
            else:
                length = int.from_bytes(buf[at + 2 : at + 10], "big")
                if length >> 63:  # §5.2: the most significant bit MUST be 0
                    self.lost = True
                    return _INVALID
        elif have < size:
            return None
        self.frames += 1
        if opcode == OP_CLOSE:
            self.closed = True
        return size, length
