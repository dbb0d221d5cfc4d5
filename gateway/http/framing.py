"""Message framing: how a body's end is known, and chunked coding (pure: no I/O).

RFC 9112 §6.3 decides a message's body length from its head. The gateway re-frames only where the
two hops differ: a chunked body is re-chunked as it passes (chunk boundaries carry no meaning,
RFC 9112 §7.1, so a proxy may change them), a close-delimited response becomes chunked for an
HTTP/1.1 client so its connection can stay open, and an HTTP/1.0 client, which cannot read
chunked coding, gets the body close-delimited. Content-Length bodies pass unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

from gateway.http import hdrs

__all__ = ["CHUNKED", "CLOSE", "LAST_CHUNK", "LENGTH", "NONE", "chunk_head", "last_chunk"]

NONE: Final = 0  #: no body (GET without one, HEAD, 1xx, 204, 304)
LENGTH: Final = 1  #: Content-Length bytes
CHUNKED: Final = 2  #: chunked transfer coding
CLOSE: Final = 3  #: until the connection closes (responses only)

LAST_CHUNK: Final = b"0\r\n\r\n"
CRLF: Final = b"\r\n"

# Trailer fields never passed on: framing and routing are settled by the head (RFC 9110 §6.5.1).
_NOT_IN_TRAILERS = hdrs.HOP_BY_HOP | {hdrs.CONTENT_LENGTH, hdrs.HOST}


def chunk_head(size: int) -> bytes:
    """The chunk-size line that goes before ``size`` bytes of data (RFC 9112 §7.1)."""
    return b"%x\r\n" % size


def last_chunk(trailers: Iterable[tuple[bytes, bytes]]) -> bytes:
    """The last chunk with the trailer section (RFC 9112 §7.1.2), framing fields left out."""
    lines = [b"0\r\n"]
    lines.extend(n + b": " + v + b"\r\n" for n, v in trailers if n.lower() not in _NOT_IN_TRAILERS)
    lines.append(b"\r\n")
    return b"".join(lines)
