"""Request smuggling and malformed input: refused with 400, the connection closed, nothing forwarded.

Each case is sent as raw bytes. The sandbox records what reaches it: for a bad head, nothing; for a
bad chunk, at most the head and the chunks before it, never the bad bytes or anything after them.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tests.conftest import Catalog
from tests.helpers import Client, RawUpstream, echo_handler, read_response

FRAMING, MALFORMED = "invalid_framing", "malformed_request"
#: Each case with the exact reason it is refused with (all 400, the connection closed).
HEAD_CASES = {
    "content-length with transfer-encoding": ("POST / HTTP/1.1\r\nHost: {host}\r\nContent-Length: 5\r\n"
        "Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: {host}\r\n\r\n", FRAMING),
    "transfer-encoding then content-length": ("POST / HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n"
        "Content-Length: 5\r\n\r\n0\r\n\r\n", FRAMING),
    "differing content-length": (
        "POST / HTTP/1.1\r\nHost: {host}\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!", FRAMING),
    "repeated content-length": (
        "POST / HTTP/1.1\r\nHost: {host}\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello", FRAMING),
    "content-length list": ("POST / HTTP/1.1\r\nHost: {host}\r\nContent-Length: 5, 5\r\n\r\nhello", FRAMING),
    "signed content-length": ("POST / HTTP/1.1\r\nHost: {host}\r\nContent-Length: +5\r\n\r\nhello", FRAMING),
    "hex content-length": ("POST / HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0x5\r\n\r\nhello", FRAMING),
    "te gzip, chunked": ("POST / HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        FRAMING),
    "te chunked, gzip": ("POST / HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n",
        FRAMING),
    "te chunked twice": ("POST / HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n"
        "Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", FRAMING),
    "te other then chunked": ("POST / HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunk5\r\n"
        "Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", FRAMING),
    "te identity then chunked (issue 10)": ("POST / HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: identity\r\n"
        "Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", FRAMING),
    "te chunked then identity": ("POST / HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n"
        "Transfer-Encoding: identity\r\n\r\n0\r\n\r\n", FRAMING),
    "te far apart": ("POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nHost: {host}\r\nX-A: 1\r\n"
        "Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", FRAMING),
    "transfer_encoding (underscore)": ("POST / HTTP/1.1\r\nHost: {host}\r\nTransfer_Encoding: chunked\r\n"
        "Content-Length: 5\r\n\r\nhello", FRAMING),
    "content_length (underscore)": ("POST / HTTP/1.1\r\nHost: {host}\r\nContent_Length: 5\r\n\r\nhello", FRAMING),
    "te chunked, chunked": (
        "POST / HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n", FRAMING),
    "te identity": ("POST / HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: identity\r\n\r\nhello", FRAMING),
    "te xchunked": ("POST / HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n", FRAMING),
    "te in http/1.0": ("POST / HTTP/1.0\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", FRAMING),
    "obs-fold": ("GET / HTTP/1.1\r\nHost: {host}\r\nX-A: b\r\n c\r\n\r\n", MALFORMED),
    "whitespace before colon": ("GET / HTTP/1.1\r\nHost: {host}\r\nX-A : b\r\n\r\n", MALFORMED),
    "whitespace before colon in transfer-encoding": ("POST / HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding : chunked\r\n"
        "\r\n0\r\n\r\n", MALFORMED),
    "nul in value": ("GET / HTTP/1.1\r\nHost: {host}\r\nX-A: b\x00c\r\n\r\n", MALFORMED),
    "cr in value": ("GET / HTTP/1.1\r\nHost: {host}\r\nX-A: b\rc\r\n\r\n", MALFORMED),
    "lf in value": ("GET / HTTP/1.1\r\nHost: {host}\r\nX-A: b\nX-B: c\r\n\r\n", MALFORMED),
    "empty field name": ("GET / HTTP/1.1\r\nHost: {host}\r\n: b\r\n\r\n", MALFORMED),
    "space in target": ("GET /a b HTTP/1.1\r\nHost: {host}\r\n\r\n", MALFORMED),
    "http/2.0 version": ("GET / HTTP/2.0\r\nHost: {host}\r\n\r\n", MALFORMED),
    "bare lf in the request line (issue 10)": ("GET /a\nHost:evil HTTP/1.1\r\nHost: {host}\r\n\r\n", MALFORMED),
    "bare lf ending the request line (issue 10)": ("GET / HTTP/1.1\nX-A: b\r\nHost: {host}\r\n\r\n", MALFORMED),
    "bare lf in a connect target": ("CONNECT {host}\n0:443 HTTP/1.1\r\nHost: {host}\r\n\r\n", MALFORMED),
    "http/0.9 request line": ("GET /\n\r\nGET /smuggled HTTP/1.1\r\nHost: {host}\r\n\r\n", MALFORMED),
    "two hosts": ("GET / HTTP/1.1\r\nHost: {host}\r\nHost: {host}\r\n\r\n", "invalid_host"),
    "body on an upgrade": ("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        "Content-Length: 5\r\n\r\nhello", FRAMING),
}  # fmt: skip
#: Chunked bodies after a valid head: every one is invalid_framing (RFC 9112 §7.1: 1*HEXDIG, CRLF).
CHUNK_CASES = {
    "bad chunk size": "zz\r\nhello\r\n0\r\n\r\n",
    "chunk size overflow": "fffffffffffffffff1\r\nhello\r\n0\r\n\r\n",
    "17 hex digits": "00000000000000005\r\nhello\r\n0\r\n\r\n",
    "space after chunk size": "5 \r\nhello\r\n0\r\n\r\n",
    "space before chunk size": " 5\r\nhello\r\n0\r\n\r\n",
    "negative chunk size": "-5\r\nhello\r\n0\r\n\r\n",
    "the 70 bytes of issue 9": "-6\r\nX",
    "signed chunk size": "+5\r\nhello\r\n0\r\n\r\n",
    "0x chunk size": "0x5\r\nhello\r\n0\r\n\r\n",
    "underscore in chunk size": "1_0\r\n0123456789abcdef\r\n0\r\n\r\n",
    "unicode digit chunk size": "\u0665\r\nhello\r\n0\r\n\r\n",
    "bad chunk extension": '5;a="b\r\nhello\r\n0\r\n\r\n',
    "lf in chunk extension": "5;a\nb\r\nhello\r\n0\r\n\r\n",
    "bare lf after chunk size": "5\nhello\r\n0\r\n\r\n",
    "missing crlf after chunk": "5\r\nhelloXX3\r\nabc\r\n0\r\n\r\n",
    "bare lf in trailer": "5\r\nhello\r\n0\r\nT: x\n\r\n",
}


async def refused(gw_port: int, raw: bytes) -> tuple[int, bytes | None]:
    c = await Client.connect(gw_port)
    c.send(raw)
    r = await read_response(c.reader)
    assert await c.closed()
    await c.close()
    return r.status, r.header("X-Gateway-Reason")


@pytest.mark.parametrize("case", list(HEAD_CASES))
async def test_bad_heads_are_refused_and_nothing_is_forwarded(start_gateway: Any, catalog: Catalog, case: str) -> None:
    async with RawUpstream(echo_handler) as up:
        catalog.put("abc", host="127.0.0.1")
        gw = await start_gateway()
        raw, reason = HEAD_CASES[case]
        got = await refused(gw.port, raw.format(host=gw.host(up.port, "abc")).encode("utf-8"))
        assert got == (400, reason.encode())
        assert bytes(up.received) == b""


@pytest.mark.parametrize("case", list(CHUNK_CASES))
async def test_bad_chunks_are_refused_before_they_are_forwarded(
    start_gateway: Any, catalog: Catalog, case: str
) -> None:
    async def hold(c: Any) -> None:  # reads what comes, never answers
        while await c.reader.read(65536):
            pass

    async with RawUpstream(hold) as up:
        catalog.put("abc", host="127.0.0.1")
        gw = await start_gateway()
        body = CHUNK_CASES[case].encode("utf-8")
        raw = f"POST / HTTP/1.1\r\nHost: {gw.host(up.port, 'abc')}\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
        status, reason = await refused(gw.port, raw + body)
        assert (status, reason) == (400, b"invalid_framing")
        assert b"hello" not in bytes(up.received) and b"abc" not in bytes(up.received)


async def test_pipelined_request_after_a_smuggling_attempt_is_not_served(start_gateway: Any, catalog: Catalog) -> None:
    async with RawUpstream(echo_handler) as up:
        catalog.put("abc", host="127.0.0.1")
        gw = await start_gateway()
        h = gw.host(up.port, "abc")
        c = await Client.connect(gw.port)
        c.send(
            f"GET /first HTTP/1.1\r\nHost: {h}\r\n\r\n"
            f"POST / HTTP/1.1\r\nHost: {h}\r\nContent-Length: 30\r\nTransfer-Encoding: chunked\r\n\r\n"
            f"0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: {h}\r\n\r\n".encode()
        )
        first = await c.read_response()
        assert first.status == 200 and b"/first" in first.body  # the request before it is answered
        second = await c.read_response()
        assert second.status == 400
        assert await c.closed()
        assert b"/smuggled" not in bytes(up.received)
        await c.close()


async def test_oversized_heads_get_431(start_gateway: Any, catalog: Catalog) -> None:
    async with RawUpstream(echo_handler) as up:
        catalog.put("abc", host="127.0.0.1")
        gw = await start_gateway(max_request_head_size=4096, max_header_count=20)
        h = gw.host(up.port, "abc")
        status, reason = await refused(gw.port, f"GET / HTTP/1.1\r\nHost: {h}\r\nX-Big: {'a' * 5000}\r\n\r\n".encode())
        assert (status, reason) == (431, b"request_head_too_large")
        many = "".join(f"X-{i}: v\r\n" for i in range(30))
        status, reason = await refused(gw.port, f"GET / HTTP/1.1\r\nHost: {h}\r\n{many}\r\n".encode())
        assert (status, reason) == (431, b"request_head_too_large")
        # A head that never ends is cut off at the limit too, without waiting for its end.
        c = await Client.connect(gw.port)
        c.send(f"GET / HTTP/1.1\r\nHost: {h}\r\nX-Endless: ".encode() + b"a" * 8000)
        assert (await read_response(c.reader)).status == 431
        await c.close()


async def test_bad_input_does_not_disturb_other_connections(start_gateway: Any, catalog: Catalog) -> None:
    async with RawUpstream(echo_handler) as up:
        catalog.put("abc", host="127.0.0.1")
        gw = await start_gateway()
        h = gw.host(up.port, "abc")
        good = await Client.connect(gw.port)
        assert (await good.request(h, "/1")).status == 200
        bad = [await Client.connect(gw.port) for _ in range(20)]
        cases = list(HEAD_CASES.values())
        for i, b in enumerate(bad):
            b.send(cases[i % len(cases)][0].format(host=h).encode("utf-8"))
        for i, b in enumerate(bad):
            r = await read_response(b.reader)
            assert (r.status, r.header("X-Gateway-Reason")) == (400, cases[i % len(cases)][1].encode())
            assert await b.closed()
            await b.close()
        assert (await good.request(h, "/2")).status == 200  # same connection, still served
        await good.close()


async def test_garbage_and_half_requests(start_gateway: Any) -> None:
    gw = await start_gateway()
    c = await Client.connect(gw.port)  # empty lines before a request are ignored (RFC 9112 §2.2)
    c.send(b"\r\n\r\nGET / HTTP/1.1\r\nHost: 80-x.example\r\n\r\n")
    assert (await read_response(c.reader)).header("X-Gateway-Reason") == b"unknown_domain"
    await c.close()
    for raw in (
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(256)),
        b"HELLO\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\n\x00\r\n\r\n",
    ):
        c = await Client.connect(gw.port)
        c.send(raw)
        r = await read_response(c.reader)
        assert r.status == 400 and r.header("X-Gateway-Reason") == b"malformed_request"
        await c.close()
    # A client that disappears mid-head costs nothing and answers nothing.
    c = await Client.connect(gw.port)
    c.send(b"GET / HTTP/1.1\r\nHost: x")
    await c.close()
    async with asyncio.timeout(5):
        while gw.gateway.ctx.connections:
            await asyncio.sleep(0.01)


async def test_a_repeated_head_is_served_and_a_changed_one_parsed_again(start_gateway: Any, catalog: Catalog) -> None:
    """A head that repeats the previous one byte for byte is not parsed twice (llhttp's verdict on
    those bytes is known); one that differs in a single byte is, and is refused when bad."""
    async with RawUpstream(echo_handler) as up:
        catalog.put("abc", host="127.0.0.1")
        gw = await start_gateway()
        h = gw.host(up.port, "abc")
        good = f"GET /same HTTP/1.1\r\nHost: {h}\r\nX-A: bc\r\n\r\n"
        bad = f"GET /same HTTP/1.1\r\nHost: {h}\r\nX-A: b\x00\r\n\r\n"  # same length, a NUL in the value
        c = await Client.connect(gw.port)
        # Pipelined, so the repeats arrive together; a POST between them moves llhttp through a body.
        post = f"POST /p HTTP/1.1\r\nHost: {h}\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nxyz\r\n0\r\n\r\n"
        c.send((good * 3 + post + good * 2 + bad + good).encode("latin-1"))
        for i in range(6):
            r = await c.read_response()
            assert r.status == 200, i
            assert (b"POST /p " in r.body) if i == 3 else (b"GET /same " in r.body)
        r = await c.read_response()
        assert r.status == 400 and r.header("X-Gateway-Reason") == b"malformed_request"
        assert await c.closed()
        assert bytes(up.received).count(b"GET /same ") == 5
        await c.close()


async def test_the_closed_helper_fails_when_a_second_response_arrives() -> None:
    """Client.closed() is what every case above relies on: it must not pass a connection through
    which a response nobody asked for arrived before the close."""
    two = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nsmuggled!"

    async def serve(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await r.readuntil(b"\r\n\r\n")
        w.write(two)
        await w.drain()
        w.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        c = await Client.connect(server.sockets[0].getsockname()[1])
        c.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await c.read_response()).body == b"ok"
        with pytest.raises(AssertionError, match="smuggled"):
            await c.closed()
        await c.close()
    finally:
        server.close()
