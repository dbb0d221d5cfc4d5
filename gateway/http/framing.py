"""Message framing: where a message's body ends, and chunked coding (pure: no I/O).

RFC 9112 §6.3 decides a body's length from the head. The gateway finds message boundaries itself
(head end, Content-Length count, :class:`ChunkedFramer`) and feeds llhttp exactly the bytes of
each message, so the two framers must agree: a message that llhttp ends earlier or later than the
gateway does is refused (the defence against request smuggling is two independent framers that
must agree, and the strict one, llhttp, sees every byte before it is forwarded).

Bodies pass unchanged where both hops allow it (Content-Length bodies, chunked bodies with their
chunk boundaries, extensions and trailers). Only where the hops differ does the gateway re-frame:
a close-delimited response becomes chunked for an HTTP/1.1 client so its connection can stay
open, and an HTTP/1.0 client, which cannot read chunked coding, gets the body de-chunked and
close-delimited.
"""

from __future__ import annotations

from typing import Final

__all__ = ["CHUNKED", "CLOSE", "LAST_CHUNK", "LENGTH", "NONE", "ChunkedFramer", "FramingError", "chunk"]

NONE: Final = 0  #: no body (a request without one, HEAD responses, 1xx, 204, 304)
LENGTH: Final = 1  #: Content-Length bytes
CHUNKED: Final = 2  #: chunked transfer coding
CLOSE: Final = 3  #: until the connection closes (responses only)

LAST_CHUNK: Final = b"0\r\n\r\n"
CRLF: Final = b"\r\n"
#: Longest chunk-size line (size, extensions) or trailer line the framer buffers.
MAX_LINE: Final = 8192

_SIZE, _DATA, _DATA_CRLF, _TRAILER, _DONE = range(5)


class FramingError(ValueError):
    """A chunked body the gateway cannot frame (llhttp would refuse it as well)."""


def chunk(data: bytes) -> tuple[bytes, bytes, bytes]:
    """``data`` as one chunk (RFC 9112 §7.1), as pieces for ``writelines``."""
    return b"%x\r\n" % len(data), data, CRLF


class ChunkedFramer:
    """Finds where a chunked body ends (RFC 9112 §7.1) as its bytes arrive.

    It does not validate: llhttp is fed the same bytes and refuses anything malformed. It only
    needs to be exact about where the last chunk and the trailer section end.
    """

    __slots__ = ("line", "remaining", "state")

    def __init__(self) -> None:
        self.state = _SIZE
        self.remaining = 0
        self.line = b""

    @property
    def done(self) -> bool:
        return self.state == _DONE

    def scan(self, buf: bytes, pos: int, data: list[tuple[int, int]] | None = None) -> int:
        """Consume ``buf[pos:]``; the offset just past the body's end, or -1 if it goes on.

        With ``data``, the ``(start, end)`` offsets of chunk data in ``buf`` are appended (to
        de-chunk a body for an HTTP/1.0 client).
        """
        n = len(buf)
        while pos < n:
            st = self.state
            if st == _DATA:
                take = min(self.remaining, n - pos)
                if data is not None:
                    data.append((pos, pos + take))
                pos += take
                self.remaining -= take
                if not self.remaining:
                    self.state = _DATA_CRLF
                    self.remaining = 2
            elif st == _DATA_CRLF:
                take = min(self.remaining, n - pos)
                pos += take
                self.remaining -= take
                if not self.remaining:
                    self.state = _SIZE
            elif st == _DONE:
                return pos
            else:
                j = buf.find(b"\n", pos)
                if j < 0:
                    self.line += buf[pos:]
                    if len(self.line) > MAX_LINE:
                        raise FramingError("chunk-size or trailer line too long")
                    return -1
                line = self.line + buf[pos:j] if self.line else buf[pos:j]
                self.line = b""
                pos = j + 1
                if len(line) > MAX_LINE:
                    raise FramingError("chunk-size or trailer line too long")
                if st == _SIZE:
                    size_field = line.split(b";", 1)[0].rstrip(b"\r")
                    if not size_field or len(size_field) > 16:
                        raise FramingError("bad chunk size")
                    try:
                        size = int(size_field, 16)
                    except ValueError:
                        raise FramingError("bad chunk size") from None
                    if size:
                        self.state = _DATA
                        self.remaining = size
                    else:
                        self.state = _TRAILER
                elif line in (b"", b"\r"):  # the empty line that ends the trailer section
                    self.state = _DONE
                    return pos
        return -1
