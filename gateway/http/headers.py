"""The header policy: what is forwarded, what is removed, what is added (pure: no I/O).

Requests (client to sandbox):

- Hop-by-hop fields are removed: Connection and every field it names, Keep-Alive,
  Proxy-Connection, TE, Transfer-Encoding and Upgrade (RFC 9110 §7.6.1). The gateway frames the
  upstream message itself (framing.py) and adds its own Transfer-Encoding when the body is chunked.
- An Upgrade whose protocol is in ``upgrade_protocols`` is kept with ``Connection: upgrade``
  (RFC 9110 §7.8); any other is dropped and the request proceeds as plain HTTP (no h2c).
- ``Expect: 100-continue`` is answered by the gateway once the sandbox is connected and is not
  forwarded (RFC 9110 §10.1.1 lets a proxy answer it; the client learns of routing errors before
  it sends the body, and sandbox servers that ignore Expect never stall it).
- X-Forwarded-For gets the client address appended; X-Forwarded-Proto, -Host, -Port and
  Forwarded (RFC 7239) are set. From a peer in ``trusted_proxies`` incoming values are kept
  (For and Forwarded extended); from anyone else they are replaced, so a client cannot forge them.
- Host and every other field pass unchanged, in order, with the sender's spelling.

Responses (sandbox to client): hop-by-hop fields are removed the same way and the gateway states
its own framing and connection handling. Nothing else changes.

Framing checks that guard against request smuggling (RFC 9112 §6.1, §6.3) are also here: llhttp
already refuses Content-Length with Transfer-Encoding and repeated Content-Length, and this module
refuses any Transfer-Encoding but exactly ``chunked`` and Transfer-Encoding in HTTP/1.0.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Collection
from dataclasses import dataclass

from gateway import errors
from gateway.errors import Reason
from gateway.http import framing, hdrs

__all__ = [
    "Peer",
    "PreparedRequest",
    "PreparedResponse",
    "find_header",
    "prepare_request",
    "prepare_response",
    "request_line",
]

_REQUEST_SPECIAL = hdrs.HOP_BY_HOP | hdrs.FORWARDING | {hdrs.HOST, hdrs.CONTENT_LENGTH, hdrs.EXPECT}
_RESPONSE_SPECIAL = hdrs.HOP_BY_HOP | {hdrs.CONTENT_LENGTH}
_CONNECTION_OPTIONS = frozenset({b"close", b"keep-alive", b"upgrade"})
# Fields a Connection header may not remove: framing and routing are not hop-by-hop options,
# and honouring "Connection: content-length" would desynchronise the two hops.
_NEVER_DROPPED = frozenset({hdrs.HOST, hdrs.CONTENT_LENGTH})


@dataclass(frozen=True, slots=True)
class Peer:
    """Who is on the other end of a client connection, computed once per connection."""

    ip: str
    trusted: bool
    proto: bytes
    port: bytes

    @property
    def for_token(self) -> bytes:
        """The RFC 7239 §6 node for this peer: IPv6 in brackets, quoted."""
        return f'"[{self.ip}]"'.encode() if ":" in self.ip else self.ip.encode()

    @staticmethod
    def make(ip: str, listen_port: int, tls: bool, trusted: Collection[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> Peer:
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            is_trusted = False
        else:
            if addr.version == 6 and addr.ipv4_mapped is not None:
                addr = addr.ipv4_mapped
                ip = str(addr)
            is_trusted = any(addr in net for net in trusted)
        return Peer(ip, is_trusted, b"https" if tls else b"http", str(listen_port).encode())


class PreparedRequest:
    """A parsed request head, checked and filtered, ready to be written upstream."""

    __slots__ = (
        "body",
        "close",
        "content_length",
        "expect_continue",
        "host",
        "host_index",
        "lines",
        "upgrade",
    )

    def __init__(self) -> None:
        self.lines: list[bytes] = []
        self.host: bytes | None = None
        self.host_index = -1
        self.body = framing.NONE
        self.content_length = -1
        self.expect_continue = False
        self.upgrade: bytes | None = None
        self.close = False

    def head(self, request_line: bytes, host: bytes | None = None) -> bytes:
        """The upstream head; ``host`` replaces the Host value (the record's mask_request_host)."""
        lines = self.lines
        if host is not None and self.host_index >= 0:
            lines = lines.copy()
            lines[self.host_index] = b"Host: " + host + b"\r\n"
        return request_line + b"".join(lines)


def request_line(method: bytes, target: bytes) -> bytes:
    """The upstream request line; the target is passed byte for byte, the version is ours."""
    return method + b" " + target + b" HTTP/1.1\r\n"


def _tokens(value: bytes) -> list[bytes]:
    return [t.strip(b" \t").lower() for t in value.split(b",")]


def prepare_request(
    headers: list[tuple[bytes, bytes]],
    peer: Peer,
    http10: bool,
    upgrade_protocols: Collection[bytes],
) -> PreparedRequest | Reason:
    """Check and filter a request's header fields (see the module docstring for the policy)."""
    p = PreparedRequest()
    lines = p.lines
    host_count = 0
    te: bytes | None = None
    conn_tokens: list[bytes] = []
    upgrade: bytes | None = None
    xff: list[bytes] = []
    fwd: list[bytes] = []
    kept: set[bytes] = set()
    trusted = peer.trusted
    for name, value in headers:
        ln = name.lower()
        if ln not in _REQUEST_SPECIAL:
            lines.append(name + b": " + value + b"\r\n")
        elif ln == hdrs.HOST:
            host_count += 1
            p.host = value
            p.host_index = len(lines)
            lines.append(name + b": " + value + b"\r\n")
        elif ln == hdrs.CONTENT_LENGTH:
            # llhttp has validated it (digits only, one field); Content-Length is end-to-end.
            p.content_length = int(value)
            lines.append(name + b": " + value + b"\r\n")
        elif ln == hdrs.TRANSFER_ENCODING:
            if te is not None:
                return errors.INVALID_FRAMING
            te = value
        elif ln == hdrs.CONNECTION:
            conn_tokens += _tokens(value)
        elif ln == hdrs.UPGRADE:
            upgrade = value
        elif ln == hdrs.EXPECT:
            if value.strip(b" \t").lower() == b"100-continue":
                p.expect_continue = True
            else:
                lines.append(name + b": " + value + b"\r\n")
        elif ln in hdrs.FORWARDING:
            if trusted:
                if ln == hdrs.X_FORWARDED_FOR:
                    xff.append(value)
                elif ln == hdrs.FORWARDED:
                    fwd.append(value)
                else:
                    kept.add(ln)
                    lines.append(name + b": " + value + b"\r\n")
        # else: Keep-Alive, Proxy-Connection, TE: hop-by-hop, dropped.
    if host_count > 1:
        return errors.INVALID_HOST
    if te is not None:
        if http10 or te.strip(b" \t").lower() != b"chunked":
            return errors.INVALID_FRAMING
        p.body = framing.CHUNKED
    elif p.content_length > 0:
        p.body = framing.LENGTH
    if b"close" in conn_tokens:
        p.close = True
    if upgrade is not None and b"upgrade" in conn_tokens:
        proto = upgrade.split(b",")[0].strip(b" \t").split(b"/")[0].lower()
        if proto in upgrade_protocols:
            p.upgrade = upgrade
    extra = [t for t in conn_tokens if t and t not in _CONNECTION_OPTIONS and t not in _NEVER_DROPPED]
    if extra:
        _drop_named(p, extra)
    if p.body == framing.CHUNKED:
        lines.append(b"Transfer-Encoding: chunked\r\n")
    if p.upgrade is not None:
        lines.append(b"Connection: upgrade\r\nUpgrade: " + p.upgrade + b"\r\n")
    _forwarding(p, peer, xff, fwd, kept)
    lines.append(b"\r\n")
    return p


def _drop_named(p: PreparedRequest, names: list[bytes]) -> None:
    """Remove the fields the Connection header named (RFC 9110 §7.6.1)."""
    drop = set(names)
    kept: list[bytes] = []
    for i, line in enumerate(p.lines):
        if line.split(b":", 1)[0].lower() in drop:
            continue
        if i == p.host_index:
            p.host_index = len(kept)
        kept.append(line)
    p.lines[:] = kept


def _forwarding(p: PreparedRequest, peer: Peer, xff: list[bytes], fwd: list[bytes], kept: set[bytes]) -> None:
    """Add the forwarding fields; ``kept`` are the X-Forwarded-* names a trusted peer sent."""
    lines = p.lines
    ip = peer.ip.encode()
    host = p.host if p.host is not None else b""
    lines.append(b"X-Forwarded-For: " + b", ".join([*xff, ip]) + b"\r\n")
    node = b"for=" + peer.for_token
    if host:
        node += b";host=" + _quoted(host)
    node += b";proto=" + peer.proto
    lines.append(b"Forwarded: " + b", ".join([*fwd, node]) + b"\r\n")
    if hdrs.X_FORWARDED_PROTO not in kept:
        lines.append(b"X-Forwarded-Proto: " + peer.proto + b"\r\n")
    if hdrs.X_FORWARDED_HOST not in kept and host:
        lines.append(b"X-Forwarded-Host: " + host + b"\r\n")
    if hdrs.X_FORWARDED_PORT not in kept:
        lines.append(b"X-Forwarded-Port: " + peer.port + b"\r\n")


_TOKEN_CHARS = frozenset(b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


def _quoted(v: bytes) -> bytes:
    """An RFC 7239 value: a token as is, anything else as a quoted-string (RFC 9110 §5.6.4)."""
    if v and _TOKEN_CHARS.issuperset(v):
        return v
    return b'"' + v.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


def find_header(headers: list[tuple[bytes, bytes]], lname: bytes) -> bytes | None:
    """The first value of the field ``lname`` (lower case), for the rare paths that need one."""
    for n, v in headers:
        if n.lower() == lname:
            return v
    return None


class PreparedResponse:
    """A parsed response head, filtered, with the framing decided for both hops."""

    __slots__ = ("body_in", "body_out", "head", "keep_alive", "upstream_reusable")

    def __init__(self, head: bytes, body_in: int, body_out: int, keep_alive: bool, upstream_reusable: bool) -> None:
        self.head = head
        self.body_in = body_in
        self.body_out = body_out
        self.keep_alive = keep_alive
        self.upstream_reusable = upstream_reusable


def prepare_response(
    status: int,
    phrase: bytes,
    headers: list[tuple[bytes, bytes]],
    *,
    head_request: bool,
    client_http10: bool,
    client_keep_alive: bool,
    upstream_keep_alive: bool,
) -> PreparedResponse:
    """Filter a response head and decide framing both ways (RFC 9112 §6.3).

    ``client_keep_alive`` is what the client's request allowed; the result says whether the
    client connection stays open after this response.
    """
    lines = [b"HTTP/1.1 %d " % status + phrase + b"\r\n"]
    chunked = False
    has_length = False
    conn_tokens: list[bytes] = []
    upgrade: bytes | None = None
    for name, value in headers:
        ln = name.lower()
        if ln not in _RESPONSE_SPECIAL:
            lines.append(name + b": " + value + b"\r\n")
        elif ln == hdrs.CONTENT_LENGTH:
            has_length = True
            lines.append(name + b": " + value + b"\r\n")
        elif ln == hdrs.TRANSFER_ENCODING:
            chunked = _tokens(value)[-1] == b"chunked"
        elif ln == hdrs.CONNECTION:
            conn_tokens += _tokens(value)
        elif ln == hdrs.UPGRADE:
            upgrade = value
    if status == 101:
        body_in = body_out = framing.NONE
        keep_alive = False
        lines.append(b"Connection: upgrade\r\n")
        if upgrade is not None:
            lines.append(b"Upgrade: " + upgrade + b"\r\n")
    else:
        if head_request or status < 200 or status in (204, 304):
            body_in = framing.NONE
        elif chunked:
            body_in = framing.CHUNKED
        elif has_length:
            body_in = framing.LENGTH
        else:
            body_in = framing.CLOSE
        body_out = body_in
        if body_in == framing.CHUNKED or body_in == framing.CLOSE:
            body_out = framing.CLOSE if client_http10 else framing.CHUNKED
        if body_in == framing.CHUNKED and has_length:  # RFC 9112 §6.3 (3): chunked wins
            lines = [ln for ln in lines if not ln.lower().startswith(b"content-length:")]
        keep_alive = client_keep_alive and body_out != framing.CLOSE
        if body_out == framing.CHUNKED:
            lines.append(b"Transfer-Encoding: chunked\r\n")
        if status >= 200:
            if not keep_alive:
                lines.append(b"Connection: close\r\n")
            elif client_http10:
                lines.append(b"Connection: keep-alive\r\n")
    extra = [t for t in conn_tokens if t and t not in _CONNECTION_OPTIONS and t not in _NEVER_DROPPED]
    if extra:
        drop = set(extra)
        lines = [lines[0]] + [ln for ln in lines[1:] if ln.split(b":", 1)[0].lower() not in drop]
    lines.append(b"\r\n")
    reusable = upstream_keep_alive and b"close" not in conn_tokens and body_in != framing.CLOSE
    return PreparedResponse(b"".join(lines), body_in, body_out, keep_alive, reusable)
