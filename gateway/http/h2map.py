"""HTTP/2 messages as HTTP/1.1 heads and back (RFC 9113 §8.2-8.3; pure: no I/O).

Sandboxes speak HTTP/1.1, so an HTTP/2 stream's request is written as the HTTP/1.1 head the
sandbox will get, and then goes through the very same checks as a request that arrived as HTTP/1.1:
llhttp validates the bytes, ``analyze_request`` applies the header policy, the router, the policy
and admission decide. Every header rule, the access checks and the forwarding fields therefore hold
over HTTP/2 without a second implementation. Going back, the sandbox's response head (analysed by
``analyze_response`` like any other) becomes an HTTP/2 field list.

Requests (RFC 9113 §8.3.1): ``:method``, ``:path`` (the request target, byte for byte) and
``:authority`` (the Host field; a Host field that names another authority is malformed) make the
request line and Host; ``:scheme`` must be there but is not forwarded (X-Forwarded-Proto says how
the client reached the gateway). Split ``cookie`` fields are joined with ``; `` (§8.2.3).
A request whose body length is not known from ``content-length`` gets ``Transfer-Encoding: chunked``
towards the sandbox, so its DATA frames and trailers can be passed on as they come. An extended
CONNECT (RFC 8441) becomes a ``GET`` with ``Upgrade``: for WebSockets, with the
``Sec-WebSocket-Key`` an HTTP/1.1 server needs (RFC 6455 §4.1), which HTTP/2 clients do not send.

Malformed requests (§8.1.1: a stream error of type PROTOCOL_ERROR): connection-specific fields
(``connection``, ``keep-alive``, ``proxy-connection``, ``transfer-encoding``, ``upgrade``; §8.2.2),
``te`` other than ``trailers``, upper-case field names (§8.2), NUL, CR or LF in a value or white
space around it (§8.2.1), pseudo-header fields that are unknown, repeated, missing or after a
regular field (§8.3). h2 itself is configured not to validate (what it checks is checked here, once,
while the head is built), which saves most of its per-request cost.

Responses (§8.3.2): ``:status`` from the status line; every field but the connection-specific ones,
names in lower case (HTTP/2 field names are, and a peer must treat upper case as malformed).

One client connection carries many sandboxes' streams, so a header block the client cannot take must
never be sent: what clients do then ends the connection, every stream on it. python-hyper's h2 (httpx)
treats a field section over its SETTINGS_MAX_HEADER_LIST_SIZE (64 KiB by default) as a connection
error; nghttp2 (curl, Node.js) does a name or value over 65,536 bytes and more than 8 CONTINUATION
frames after a HEADERS frame. :func:`section_size` measures a field list as §6.5.2 counts it, and the
stream compares it with what the client takes (http2.py) before anything is encoded: a block
encoded and not sent would leave the two HPACK tables apart (RFC 7541 §2.2), itself a connection error.
"""

from __future__ import annotations

import base64
import os
import re
from typing import Final

import httptools

__all__ = [
    "CONNECTION_SPECIFIC",
    "Mapped",
    "fields_of",
    "request_head",
    "response_fields",
    "section_size",
    "trailer_section",
]

#: The longest name or value nghttp2 decodes (NGHTTP2_HD_MAX_NV, its encoded length): past it, curl,
#: Node.js and nghttp end the connection with COMPRESSION_ERROR.
MAX_STRING: Final = 65536
#: CONTINUATION frames nghttp2 takes after a HEADERS frame (nghttp2 1.61, and the distributions'
#: patched 1.5x, for CVE-2024-28182); past them it ends the connection. A block that fits (1 + this)
#: frames needs no more: a field list's size (§6.5.2) is larger than its HPACK block, whose strings
#: are never longer than their bytes (h2conn.ShortestEncoder).
MAX_CONTINUATIONS: Final = 8
#: Fields that make a message malformed in HTTP/2 (RFC 9113 §8.2.2); dropped from responses.
CONNECTION_SPECIFIC: Final = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade"}
)
#: Not forwarded from a sandbox's 101 to an HTTP/2 client (RFC 8441 §5: no key, no accept in HTTP/2).
_TUNNEL_DROPPED: Final = frozenset({b"sec-websocket-accept", b"te", *CONNECTION_SPECIFIC})

_NAME: Final = re.compile(rb"[!#$%&'*+\-.^_`|~0-9a-z]+")  # a token, lower case (RFC 9113 §8.2)
_BAD_VALUE: Final = re.compile(rb"[\x00\r\n]|\A[ \t]|[ \t]\Z")
_METHOD: Final = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_TARGET: Final = re.compile(rb"[\x21-\x7e\x80-\xff]+")  # no white space, no control characters


class Mapped:
    """A request as the HTTP/1.1 head the sandbox gets, and what the mapping found."""

    __slots__ = ("chunked", "fields", "protocol", "raw", "ws_key")

    def __init__(self, raw: bytes, chunked: bool, protocol: bytes | None, ws_key: bytes | None, fields: int) -> None:
        self.raw = raw
        self.chunked = chunked  # DATA frames go to the sandbox in chunked coding
        self.protocol = protocol  # an extended CONNECT's :protocol (RFC 8441)
        self.ws_key = ws_key  # the Sec-WebSocket-Key made for the sandbox
        self.fields = fields  # field lines in the head


_PSEUDO: Final = frozenset((b":method", b":scheme", b":authority", b":path", b":protocol"))


class _Validate:
    """llhttp callbacks: none needed, the parser only has to accept the bytes."""


def _llhttp_accepts(raw: bytes) -> bool:
    """Whether llhttp takes ``raw`` as a request head, as it must for a head from an HTTP/1.1 client."""
    try:
        httptools.HttpRequestParser(_Validate()).feed_data(raw)
    except httptools.HttpParserUpgrade:
        return True
    except httptools.HttpParserError:
        return False
    return True


def request_head(headers: list[tuple[bytes, bytes]], end_stream: bool) -> Mapped | str:
    """The HTTP/1.1 head for an HTTP/2 request, or why the request is malformed.

    ``end_stream``: the HEADERS frame ended the stream (no body follows)."""
    host = None
    pseudo: dict[bytes, bytes] = {}  # RFC 9113 §8.3: each pseudo-header field at most once
    lines: list[bytes] = [b""]  # [0]: the Host line
    cookies: list[bytes] | None = None
    cookie_at = 0
    length = False
    regular = False
    for name, value in headers:
        if name[:1] == b":":
            if regular:
                return "a pseudo-header field after a regular field"
            if name not in _PSEUDO:
                return f"unknown pseudo-header field {name[:64]!r}"
            if name in pseudo:
                return f"two {name.decode()} fields"
            pseudo[name] = value
            continue
        regular = True
        if _NAME.fullmatch(name) is None:
            return f"field name {name[:64]!r} is not a lower-case token"
        if _BAD_VALUE.search(value) is not None:
            return f"field {name[:64]!r}: NUL, CR or LF in the value, or white space around it"
        if name in CONNECTION_SPECIFIC:
            return f"connection-specific field {name.decode()!r}"
        if name == b"te":
            if value.lower() != b"trailers":
                return "te other than trailers"
            continue  # hop-by-hop in HTTP/1.1 too: not forwarded
        if name == b"host":
            if host is not None:
                return "two host fields"
            host = value
            continue
        if name == b"cookie":
            if cookies is None:
                cookies = [value]
                cookie_at = len(lines)
                lines.append(b"")
            else:
                cookies.append(value)
            continue
        if name == b"content-length":
            length = True
        lines.append(name + b": " + value)
    get = pseudo.get
    method, scheme, authority, path, protocol = (
        get(b":method"),
        get(b":scheme"),
        get(b":authority"),
        get(b":path"),
        get(b":protocol"),
    )
    if method is None:
        return "no :method"
    if _METHOD.fullmatch(method) is None:
        return ":method is not a token"
    if authority is not None:
        if not authority or _TARGET.fullmatch(authority) is None:
            return ":authority is empty or holds white space or control characters"
        if host is not None and host.lower() != authority.lower():
            return "host and :authority name different authorities"
        host = authority
    ws_key = None
    chunked = False
    if method == b"CONNECT" and protocol is None:  # a plain CONNECT: the gateway refuses it (405)
        if authority is None or path is not None or scheme is not None:
            return "CONNECT needs :authority and no :scheme or :path"
        target = authority
    else:
        if scheme is None or path is None:
            return "no :scheme or no :path"
        if _TARGET.fullmatch(path) is None or (path[:1] != b"/" and not (path == b"*" and method == b"OPTIONS")):
            return ":path is not an origin-form target (or * for OPTIONS)"
        target = path
        if protocol is not None:
            if method != b"CONNECT":
                return ":protocol without CONNECT"
            if _METHOD.fullmatch(protocol) is None:
                return ":protocol is not a token"
            # RFC 8441 §5: the HTTP/1.1 request the sandbox understands. The key is the gateway's own:
            # HTTP/2 clients send none (the stream itself proves the handshake).
            method = b"GET"
            lines.append(b"connection: upgrade")
            lines.append(b"upgrade: " + protocol)
            if protocol.lower() == b"websocket":
                ws_key = base64.b64encode(os.urandom(16))
                lines.append(b"sec-websocket-key: " + ws_key)
        elif not end_stream and not length:
            chunked = True
            lines.append(b"transfer-encoding: chunked")
    if cookies is not None:
        lines[cookie_at] = b"cookie: " + b"; ".join(cookies)
    if host is not None:
        lines[0] = b"host: " + host
    else:
        del lines[0]
    raw = b"".join((method, b" ", target, b" HTTP/1.1\r\n", b"\r\n".join(lines), b"\r\n\r\n" if lines else b"\r\n"))
    if not _llhttp_accepts(raw):
        return "the request is not valid as HTTP/1.1"
    return Mapped(raw, chunked, protocol, ws_key, len(lines))


def trailer_section(headers: list[tuple[bytes, bytes]]) -> bytes | str:
    """Request trailers as the end of a chunked body (RFC 9112 §7.1.2), or why they are malformed.

    The section starts after the last chunk's ``0\\r\\n`` and ends with the empty line."""
    out = []
    for name, value in headers:
        if name[:1] == b":":
            return "a pseudo-header field in trailers"
        if _NAME.fullmatch(name) is None:
            return f"field name {name[:64]!r} is not a lower-case token"
        if _BAD_VALUE.search(value) is not None:
            return f"field {name[:64]!r}: NUL, CR or LF in the value, or white space around it"
        if name in CONNECTION_SPECIFIC or name == b"te":
            return f"connection-specific field {name.decode()!r}"
        out.append(name + b": " + value + b"\r\n")
    out.append(b"\r\n")
    return b"".join(out)


def fields_of(lines: list[bytes] | bytes) -> list[tuple[bytes, bytes]]:
    """Field lines (``name: value``, validated by llhttp) as an HTTP/2 field list, names in lower case,
    connection-specific fields dropped."""
    if isinstance(lines, bytes):
        lines = lines.split(b"\r\n")
    out = []
    for line in lines:
        if not line:
            continue
        name, _, value = line.partition(b":")
        name = name.lower()
        if name in CONNECTION_SPECIFIC or name == b"te":
            continue
        out.append((name, value.strip(b" \t")))
    return out


def section_size(fields: list[tuple[bytes, bytes]] | tuple[tuple[bytes, bytes], ...]) -> int:
    """A field list's size as SETTINGS_MAX_HEADER_LIST_SIZE counts it (RFC 9113 §6.5.2: each field's
    name and value in octets plus 32); -1 when a name or value is longer than :data:`MAX_STRING`,
    which no size makes acceptable."""
    size = 0
    for name, value in fields:
        if len(value) > MAX_STRING or len(name) > MAX_STRING:
            return -1
        size += len(name) + len(value) + 32
    return size


def response_fields(head: bytes, tunnel: bool = False) -> list[tuple[bytes, bytes]]:
    """An HTTP/1.1 response head (status line, fields, empty line) as an HTTP/2 field list.

    ``tunnel``: a 101 accepting an extended CONNECT, which is a 200 in HTTP/2 (RFC 8441 §5)."""
    end = head.find(b"\r\n")
    status = b"200" if tunnel else head[9:12]
    fields = fields_of(head[end + 2 : -4] if head.endswith(b"\r\n\r\n") else head[end + 2 :])
    if tunnel:
        fields = [f for f in fields if f[0] not in _TUNNEL_DROPPED]
    return [(b":status", status), *fields]
