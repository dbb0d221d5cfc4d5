"""Hypothesis strategies: HTTP/1.1 request and response streams built from the RFC 9112 grammar,
and the mutations attackers and broken peers make to them.

A stream is returned with its messages as built (head, body as sent), so a test knows the exact
boundaries a correct framer must find, and with the offsets of its framing tokens (Content-Length
values, chunk sizes, line ends) where most mutations are aimed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import strategies as st

TCHAR = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
#: What gets inserted or substituted: signs, whitespace, prefixes, Unicode digits, overlong
#: numbers, bare LF, bare CR, NUL, obs-fold, extra framing fields, extra heads.
MUTATIONS = [
    b"-", b"+", b" ", b"\t", b"0x", b"_", "\u0663".encode(), "\uff15".encode(), "\u00b2".encode(), b"1" * 17,
    b"f" * 17, b"9" * 25, b"\n", b"\r", b"\x00", b"\r\n ", b"\r\n\t", b";", b"=", b'"', b",", b"0",
    b"\r\n", b"\r\n\r\n", b"Transfer-Encoding: chunked\r\n", b"Content-Length: 3\r\n", b"Content-Length: 0\r\n",
    b"Transfer-Encoding: gzip, chunked\r\n", b"Connection: close\r\n", b"Host: h\r\n",
    b"Upgrade: websocket\r\nConnection: upgrade\r\n", b"HTTP/1.1 100 Continue\r\n\r\n", b"\xff",
    # duplicate and look-alike framing fields (issue 10)
    b"Transfer-Encoding: identity\r\n", b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
    b"Transfer_Encoding: chunked\r\n", b"Content_Length: 3\r\n", b"Transfer-Encoding: chunked, gzip\r\n",
    b"Content-Length: 3\r\nContent-Length: 3\r\n",
    # trailer fields and leading bytes
    b"Cookie: session=attacker\r\n", b"\r\r\n", b"\n\r",
]  # fmt: skip
#: Fields a trailer section may carry: fields that would mean something in the next request's head.
#: (llhttp itself refuses Content-Length and Transfer-Encoding there, and ends the connection after
#: a trailer Connection: close; those come as mutations.)
TRAILERS = [b"T-x: v", b"Cookie: session=attacker", b"Host: evil", b"X-Forwarded-For: 1.2.3.4", b"Upgrade: h2c"]
#: Before a request line: empty lines as RFC 9112 §2.2 allows (CRLF), and bare CR and LF, all
#: skipped, never part of the method.
LEADING = [b"\r\n", b"\n", b"\r\n\r\n", b"\r", b"\r\r\n", b"\n\r", b"\r\n\n\r"]
#: Framing fields that make a request ambiguous (RFC 9112 §6.1, §6.3; underscore spellings are
#: read as the real ones by CGI-style servers): each must be refused as invalid_framing.
AMBIGUOUS = [
    b"Transfer-Encoding: identity\r\nTransfer-Encoding: chunked", b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked",
    b"Transfer-Encoding: chunked\r\nTransfer-Encoding: identity", b"Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked",
    b"Transfer-Encoding: chunked, chunked", b"Transfer-Encoding: identity", b"Transfer_Encoding: chunked",
    b"Content_Length: 5", b"Content-Length: 5\r\nContent-Length: 5", b"Content-Length: 5\r\nTransfer-Encoding: chunked",
    b"Transfer-Encoding: chunked\r\nContent-Length: 0", b"Content-Length: 5, 5", b"Content-Length: +5",
]  # fmt: skip


@dataclass
class Stream:
    data: bytes
    messages: list[tuple[bytes, bytes]]  # (head, body as the gateway forwards it)
    hot: list[int] = field(default_factory=list)  # offsets of framing tokens
    starts: list[int] = field(default_factory=list)  # where each message's head begins
    #: Requests whose trailer section has a field (their sandbox connection is not pooled again).
    trailer_fields: list[int] = field(default_factory=list)


def _token(draw: st.DrawFn, alphabet: str = TCHAR, lo: int = 1, hi: int = 8) -> str:
    return draw(st.text(alphabet, min_size=lo, max_size=hi))


@st.composite
def fields(draw: st.DrawFn, many: bool = False) -> list[bytes]:
    n = draw(st.integers(260, 400)) if many else draw(st.integers(0, 4))
    out = []
    for i in range(n):
        name = f"X-{i}" if many else "X-" + _token(draw)
        value = draw(st.text("abcdefghijklmnopqrstuvwxyz0123456789 ,;=/:\"'", max_size=12)).strip()
        out.append(f"{name}: {value}".encode())
    return out


def _hex(draw: st.DrawFn, n: int) -> bytes:
    s = f"{n:x}"
    if draw(st.booleans()):
        s = s.upper()
    s = "0" * draw(st.integers(0, 3)) + s
    return s[-16:].encode()


@st.composite
def chunked_body(draw: st.DrawFn, hot: list[int], base: int, trailer_at: list[int] | None = None) -> bytes:
    """A chunked body; ``trailer_at`` gets the offset (in the body) where its trailer section begins."""
    out = bytearray()
    for data in draw(st.lists(st.binary(min_size=1, max_size=24), max_size=4)):
        hot.append(base + len(out))
        out += _hex(draw, len(data))
        if draw(st.booleans()):
            out += b";" + _token(draw).encode() + (b"=" + _token(draw).encode() if draw(st.booleans()) else b"")
        out += b"\r\n"
        out += data
        hot.append(base + len(out))
        out += b"\r\n"
    hot.append(base + len(out))
    out += b"0" * draw(st.integers(1, 2)) + b"\r\n"
    if trailer_at is not None:
        trailer_at.append(len(out))
    for _ in range(draw(st.integers(0, 2))):
        out += draw(st.sampled_from([b"T-" + _token(draw).encode() + b": v", *TRAILERS])) + b"\r\n"
    hot.append(base + len(out))
    out += b"\r\n"
    return bytes(out)


@st.composite
def requests(draw: st.DrawFn, many_fields: bool = False, leading: bool = True) -> Stream:
    """1-3 requests on one connection, valid by construction; with ``leading``, empty lines and
    bare CR/LF before some (skipped). Bodies are recorded as the gateway forwards them: as sent,
    trailer fields included."""
    data = bytearray()
    msgs: list[tuple[bytes, bytes]] = []
    hot: list[int] = []
    starts: list[int] = []
    trailed: list[int] = []
    for i in range(draw(st.integers(1, 3))):
        if leading and draw(st.booleans()):
            data += draw(st.sampled_from(LEADING))
        method = draw(st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]))
        target = "/" + draw(st.text("abcdefghij0123456789/?=&%-._~", max_size=10))
        lines = [f"{method} {target} HTTP/1.1".encode(), b"Host: 3000-demo.sandbox.localhost"]
        lines += draw(fields(many=many_fields))
        kind = draw(st.sampled_from(["none", "length", "chunked"]))
        body = b""
        start = len(data)
        if kind == "length":
            body = draw(st.binary(max_size=40))
            lines.append(b"Content-Length: " + b"0" * draw(st.integers(0, 2)) + str(len(body)).encode())
        elif kind == "chunked":
            lines.append(b"Transfer-Encoding: chunked")
        head = b"\r\n".join(lines) + b"\r\n\r\n"
        if kind != "none":
            hot.append(start + head.rfind(b": ") + 2)
        hot.append(start + len(head) - 2)
        starts.append(start)
        data += head
        if kind == "chunked":
            at: list[int] = []
            body = draw(chunked_body(hot, len(data), at))
            if len(body) - at[0] > 2:  # a trailer field, not only the empty line
                trailed.append(i)
        data += body
        msgs.append((head, body))
    return Stream(bytes(data), msgs, hot, starts, trailed)


@st.composite
def ambiguous(draw: st.DrawFn) -> tuple[Stream, int]:
    """A valid request stream with ambiguous framing fields added to one request's head: (the
    stream with the messages the gateway still serves, the index of the ambiguous request)."""
    s = draw(requests())
    i = draw(st.integers(0, len(s.messages) - 1))
    head, _ = s.messages[i]
    extra = draw(st.sampled_from(AMBIGUOUS))
    at = s.starts[i] + len(head) - 2  # before the head's final CRLF
    kept = [t for t in s.trailer_fields if t < i]
    return Stream(s.data[:at] + extra + b"\r\n" + s.data[at:], s.messages[:i], trailer_fields=kept), i


@st.composite
def responses(draw: st.DrawFn, many_fields: bool = False, many_interim: bool = False) -> Stream:
    """1-3 responses (with 1xx before them) to GET requests, valid by construction; a last one
    may run until the connection closes."""
    data = bytearray()
    msgs: list[tuple[bytes, bytes]] = []
    hot: list[int] = []
    count = draw(st.integers(1, 3))
    for i in range(count):
        for _ in range(draw(st.integers(18, 24)) if many_interim else draw(st.integers(0, 2))):
            interim = b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n"
            data += interim
            msgs.append((interim, b""))
        status = draw(st.sampled_from([200, 201, 204, 304, 404, 500]))
        lines = [f"HTTP/1.1 {status} Reason".encode(), *draw(fields(many=many_fields))]
        kinds = ["length", "chunked"] + (["close"] if i == count - 1 else [])
        kind = "none" if status in (204, 304) else draw(st.sampled_from(kinds))
        body = b""
        start = len(data)
        if kind == "length":
            body = draw(st.binary(max_size=40))
            lines.append(b"Content-Length: " + str(len(body)).encode())
        elif kind == "chunked":
            lines.append(b"Transfer-Encoding: chunked")
        head = b"\r\n".join(lines) + b"\r\n\r\n"
        if kind in ("length", "chunked"):
            hot.append(start + head.rfind(b": ") + 2)
        hot.append(start + len(head) - 2)
        data += head
        if kind == "chunked":
            body = draw(chunked_body(hot, len(data)))
        elif kind == "close":
            body = draw(st.binary(max_size=40))
        data += body
        msgs.append((head, body))
    return Stream(bytes(data), msgs, hot)


@st.composite
def mutated(draw: st.DrawFn, stream: st.SearchStrategy[Stream]) -> bytes:
    """A stream with 1-3 edits (insert, replace, delete), mostly at its framing tokens."""
    s = draw(stream)
    data = bytearray(s.data)
    for _ in range(draw(st.integers(1, 3))):
        if s.hot and draw(st.booleans()):
            at = min(draw(st.sampled_from(s.hot)) + draw(st.integers(-1, 2)), len(data))
        else:
            at = draw(st.integers(0, len(data)))
        at = max(at, 0)
        what = draw(st.sampled_from(MUTATIONS)) if draw(st.integers(0, 4)) else draw(st.binary(min_size=1, max_size=3))
        op = draw(st.sampled_from(["insert", "replace", "delete"]))
        if op == "insert":
            data[at:at] = what
        elif op == "replace":
            data[at : at + len(what)] = what
        else:
            del data[at : at + draw(st.integers(1, 3))]
    return bytes(data)
