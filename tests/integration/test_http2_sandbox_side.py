"""HTTP/2 from the sandbox side: one client connection (a balancer's, an SDK's) carries streams to many
sandboxes, so nothing a sandbox answers may make the gateway send what the client's HTTP/2 stack takes
for a connection error: that would end every stream on it, other tenants' too.

Each hostile answer is given while a stream to another sandbox is open on the same connection; that
stream must then complete, and the connection must see no GOAWAY and no error in the client's HTTP/2
stack. The client validates what it receives (``strict``: h2's inbound checks, as httpx runs it), and
where a real client decides, curl and nghttp (nghttp2) are asked too."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
from collections.abc import AsyncIterator
from typing import Any

import h2.errors
import h2.events
import pytest
from h2.settings import SettingCodes

from gateway.http.http2 import STREAM_BUFFER, H2Connection
from gateway.http.upstream import MAX_INTERIM_BYTES
from tests import needs
from tests.conftest import WAIT, Catalog, RunningGateway
from tests.h2client import H2Client, H2Response
from tests.helpers import (
    Client,
    RawUpstream,
    UpstreamConn,
    echo_handler,
    read_response,
    response,
    until_sandbox_blocked,
)
from tests.integration.test_http2_websocket import connect_ws
from tests.integration.test_observability import scrape, value

HEADERS, CONTINUATION, DATA, GOAWAY = 1, 9, 0, 7
OK = response(200, b"ok")


def client_errors(c: H2Client) -> list[Exception]:
    """What the client's h2 refused (each a connection error there: h2 ends the connection)."""
    return [e for e in c.events if isinstance(e, Exception)]


def assert_intact(c: H2Client) -> None:
    assert not client_errors(c), client_errors(c)
    assert c.goaway is None and not c.goaways and not [f for f in c.frames if f[0] == GOAWAY]
    assert not c.lost.is_set()


async def settled(c: H2Client, sid: int) -> H2Response:
    """The stream's response, or a failure as soon as the client's h2 refused something."""
    r = c.responses[sid]
    async with asyncio.timeout(WAIT):
        while not r.ended.is_set() and not client_errors(c):
            c.changed.clear()
            await c.changed.wait()
    assert not client_errors(c), client_errors(c)
    return r


async def beside(c: H2Client, other: str, host: str, path: str, method: str = "GET", ws: bool = False) -> H2Response:
    """``path``'s response from the sandbox at ``host`` (``ws``: to an RFC 8441 WebSocket request),
    while a stream to another sandbox is open on the same connection (its body is sent after): that
    one completes, the connection is intact."""
    waiting = c.start(other, "/beside", method="POST", body=b"abc", end=False)
    r = await settled(c, connect_ws(c, host, path) if ws else c.start(host, path, method=method))
    c.send_body(waiting, b"def", end=True)
    r2 = await settled(c, waiting)
    assert r2.status == 200 and r2.reset is None and bytes(r2.body).startswith(b"POST /beside HTTP/1.1\r\n")
    assert_intact(c)
    return r


def answers(table: dict[bytes, bytes]) -> Any:
    """A sandbox app that answers each path with the exact bytes of ``table``."""

    async def handler(c: UpstreamConn) -> None:
        while True:
            head, _ = await c.read_request()
            path = head.split(b" ", 2)[1]
            c.send(table[path])
            await c.writer.drain()

    return handler


def fields(n: int, size: int, name: bytes = b"X-F") -> bytes:
    """``n`` field lines, each value ``size`` bytes."""
    return b"".join(b"%s%03d: %s\r\n" % (name, i, (b"%d" % i * size)[:size]) for i in range(n))


async def curl_h2c(url: str, host: str) -> subprocess.CompletedProcess[bytes]:
    """curl over h2c with prior knowledge (a real client's HTTP/2 stack: nghttp2): its status code."""
    curl = needs.tool("curl", "apt-get install curl")
    return await asyncio.to_thread(
        subprocess.run, [curl, "-sS", "--http2-prior-knowledge", "-o", "/dev/null", "-w", "%{http_code}",
                         "-H", f"Host: {host}", url],
        capture_output=True, timeout=WAIT, check=False,
    )  # fmt: skip


@contextlib.asynccontextmanager
async def two_sandboxes(
    start_gateway: Any, catalog: Catalog, table: dict[bytes, bytes]
) -> AsyncIterator[tuple[RunningGateway, str, str]]:
    """A gateway, the host of a sandbox answering with ``table`` and the host of another (an echo)."""
    async with RawUpstream(answers(table)) as hostile, RawUpstream(echo_handler) as other:
        catalog.put("hostile", host="127.0.0.1")
        catalog.put("other", host="127.0.0.1")
        gw = await start_gateway()
        yield gw, gw.host(hostile.port, "hostile"), gw.host(other.port, "other")


# ---- header blocks the client does not take


async def test_a_head_past_the_clients_header_list_size_is_refused_not_sent(
    start_gateway: Any, catalog: Catalog
) -> None:
    """RFC 9113 §6.5.2: SETTINGS_MAX_HEADER_LIST_SIZE is advisory, but h2 (httpx) treats a field
    section past it (64 KiB, its default) as a connection error. A sandbox's head of 250 fields of
    240 bytes (63 KiB as HTTP/1.1, 71 KiB as §6.5.2 counts it: 32 more a field) is refused with 502
    before anything is encoded; one of 200 such fields passes whole."""
    table = {
        b"/big": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n" + fields(250, 240) + b"\r\nok",
        b"/fits": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n" + fields(200, 240) + b"\r\nok",
    }
    async with two_sandboxes(start_gateway, catalog, table) as (gw, host, beside_host):
        c = await H2Client.connect(gw.port, strict=True)
        r = await beside(c, beside_host, host, "/big")
        assert (r.status, r.header(b"x-gateway-reason")) == (502, b"upstream_invalid_response")
        r = await beside(c, beside_host, host, "/fits")
        assert r.status == 200 and bytes(r.body) == b"ok"
        assert len([n for n, _ in r.headers if n.startswith(b"x-f")]) == 200
        c.close()


async def test_every_header_block_fits_the_clients_limit_even_once_lowered(
    start_gateway: Any, catalog: Catalog
) -> None:
    """A client that takes 4 KiB of fields (SETTINGS_MAX_HEADER_LIST_SIZE, lowered on an open
    connection after a head was sent and remembered): a final head or a 1xx head larger than that is
    a 502 (no 1xx reaches the client); trailers larger than that reset their stream (the body went
    before them), as does a 101 head for a WebSocket over HTTP/2 (the exchange is a tunnel by then);
    a 3 KiB head passes. A setting the client changes applies to heads already sent."""
    table = {
        b"/head": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n" + fields(20, 250) + b"\r\nok",
        b"/hint": b"HTTP/1.1 103 Early Hints\r\n" + fields(20, 250, b"Link-") + b"\r\n" + OK,
        b"/trailers": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n" + fields(20, 250) + b"\r\n",
        b"/small": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n" + fields(12, 250) + b"\r\nok",
        b"/ws": b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n" + fields(20, 250) + b"\r\n",
    }  # fmt: skip
    async with two_sandboxes(start_gateway, catalog, table) as (gw, host, beside_host):
        c = await H2Client.connect(gw.port, strict=True)
        r = await beside(c, beside_host, host, "/head")  # 5 KiB: within the default 64 KiB
        assert r.status == 200 and r.header(b"x-f019") is not None
        c.conn.update_settings({SettingCodes.MAX_HEADER_LIST_SIZE: 4096})
        c.flush()
        async with asyncio.timeout(WAIT):  # h2 applies it to its decoder once the gateway acknowledged
            while not [e for e in c.events if isinstance(e, h2.events.SettingsAcknowledged)]:
                c.changed.clear()
                await c.changed.wait()
        for path in ("/head", "/hint"):
            r = await beside(c, beside_host, host, path)
            assert (r.status, r.header(b"x-gateway-reason")) == (502, b"upstream_invalid_response"), path
            assert r.interim == [], path
        r = await beside(c, beside_host, host, "/trailers")
        assert r.reset == h2.errors.ErrorCodes.INTERNAL_ERROR and r.trailers is None
        # Counted (and logged) as the response cut short that it is, not as the sandbox's 200.
        text = await scrape(gw.admin_port)
        assert value(text, "gateway_requests_total", code="2xx", reason="upstream_invalid_response", protocol="h2") == 1
        r = await beside(c, beside_host, host, "/ws", ws=True)  # the 101 that would be a 200 (RFC 8441)
        assert r.reset == h2.errors.ErrorCodes.INTERNAL_ERROR and r.status == 0
        r = await beside(c, beside_host, host, "/small")
        assert r.status == 200 and r.header(b"x-f011") is not None
        c.close()


async def test_strings_huffman_coding_would_lengthen_go_uncoded(start_gateway: Any, catalog: Catalog) -> None:
    """RFC 7541 §5.2 lets the encoder choose Huffman coding per string. hpack always chose it, and
    bytes with long codes grow: 30,000 bytes of obs-text (0xff: 26 bits) became 97,500, past the
    65,536 bytes nghttp2 decodes in one string (NGHTTP2_HD_MAX_NV): curl and nghttp ended the
    connection with COMPRESSION_ERROR, every stream on it. Now a string is Huffman-coded only when that
    makes it shorter: the header block is no larger than the head the sandbox sent."""
    head = (
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Obs: "
        + b"\xff" * 30000
        + b"\r\nX-Esc: "
        + b"\\" * 20000
        + b"\r\n\r\n"
    )
    async with two_sandboxes(start_gateway, catalog, {b"/obs": head + b"ok", b"/other": OK}) as (gw, host, other):
        c = await H2Client.connect(gw.port, strict=True)
        r = await beside(c, other, host, "/obs")
        assert r.status == 200 and r.header(b"x-obs") == b"\xff" * 30000 and r.header(b"x-esc") == b"\\" * 20000
        sid = max(c.responses)
        block = sum(n for t, _, s, n in c.frames if t in (HEADERS, CONTINUATION) and s == sid)
        assert block <= len(head), (block, len(head))
        c.close()
        nghttp = needs.tool("nghttp", "apt-get install nghttp2-client")
        url = f"http://127.0.0.1:{gw.port}"
        out = await asyncio.to_thread(
            subprocess.run, [nghttp, "-nv", "-H", f":authority: {host}", f"{url}/obs", f"{url}/other"],
            capture_output=True, timeout=WAIT, check=False,
        )  # fmt: skip
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr
        assert out.stdout.count(b":status: 200") == 2 and b"COMPRESSION_ERROR" not in out.stdout
        out = await curl_h2c(f"{url}/obs", host)
        assert (out.returncode, out.stdout) == (0, b"200"), out.stderr


async def test_1xx_heads_share_one_budget(start_gateway: Any, catalog: Catalog) -> None:
    """Clients count a response's 1xx heads with its final head: curl 7.88 fails a transfer whose
    heads pass 128 KiB, and over HTTP/2 the connection with it (nghttp2's callback failure). Sixteen
    103s of 9 KiB each (144 KiB) were passed on. Now the 1xx heads of a response share
    MAX_INTERIM_BYTES (16 KiB): the first 103 goes, the second ends the response with 502, over both
    protocols and to curl."""
    hint = b"HTTP/1.1 103 Early Hints\r\n" + fields(36, 250, b"Link-") + b"\r\n"
    assert 2 * len(hint) > MAX_INTERIM_BYTES >= len(hint)
    async with two_sandboxes(start_gateway, catalog, {b"/hints": hint * 16 + OK}) as (gw, host, other):
        c = await H2Client.connect(gw.port, strict=True)
        r = await beside(c, other, host, "/hints")
        assert (r.status, r.header(b"x-gateway-reason"), len(r.interim)) == (502, b"upstream_invalid_response", 1)
        c.close()
        h1 = await Client.connect(gw.port)
        h1.send(f"GET /hints HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        first = await read_response(h1.reader, interim=True)
        final = await read_response(h1.reader, interim=True)
        assert first.status == 103 and (final.status, final.header("X-Gateway-Reason")) == (
            502, b"upstream_invalid_response"
        )  # fmt: skip
        await h1.close()
        out = await curl_h2c(f"http://127.0.0.1:{gw.port}/hints", host)
        assert (out.returncode, out.stdout) == (0, b"502"), out.stderr


# ---- bodies


async def test_tiny_chunks_make_few_frames(start_gateway: Any, catalog: Catalog) -> None:
    """200,000 chunks of one byte, sent as fast as the sandbox can: the body comes in DATA frames of
    many chunks each (counted on the wire: a frame per chunk would be nine bytes of frame header for
    each byte of body), while another sandbox's stream on the connection is served."""
    n = 200_000

    async def tiny(c: UpstreamConn) -> None:
        await c.read_request()
        c.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(n // 10_000):
            c.writer.write(b"1\r\nx\r\n" * 10_000)
            await c.writer.drain()
        c.send(b"0\r\n\r\n")

    async with two_sandboxes(start_gateway, catalog, {}) as (gw, _, other), RawUpstream(tiny) as up:
        catalog.put("tiny", host="127.0.0.1")
        c = await H2Client.connect(gw.port, strict=True)
        r = await beside(c, other, gw.host(up.port, "tiny"), "/")
        assert r.status == 200 and r.reset is None and bytes(r.body) == b"x" * n
        frames = [f for f in c.frames if f[0] == DATA and f[2] == max(c.responses)]
        assert len(frames) > 0 and len(frames) * 1000 <= n, len(frames)
        c.close()


async def test_a_sandbox_streaming_into_a_shut_window_is_held_at_stream_buffer(
    start_gateway: Any, catalog: Catalog
) -> None:
    """A stream whose window the client keeps shut, its sandbox sending small chunks as fast as it can:
    what waits for the client stays within STREAM_BUFFER and one read (the sandbox is not read
    meanwhile, its writes stop), another sandbox's stream goes on, and once the window opens the body
    arrives whole."""
    written = 0
    chunk = b"%x\r\n%s\r\n" % (100, b"y" * 100)

    async def fast(c: UpstreamConn) -> None:
        nonlocal written
        await c.read_request()
        c.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(400):  # 40 MB of body, in chunks of 100 bytes
            c.writer.write(chunk * 1000)
            written += 1000
            await c.writer.drain()
        c.send(b"0\r\n\r\n")

    async with two_sandboxes(start_gateway, catalog, {}) as (gw, _, other), RawUpstream(fast) as up:
        catalog.put("fast", host="127.0.0.1")
        c = await H2Client.connect(gw.port, strict=True)
        sid = c.start(gw.host(up.port, "fast"), "/")
        c.hold.add(sid)  # the stream's window is not reopened (the connection's is)
        await until_sandbox_blocked(up.port, lambda: written)
        (conn,) = [x for x in gw.gateway.ctx.connections if isinstance(x, H2Connection)]
        s = conn.streams[sid]
        assert s.holding and len(s.out) <= STREAM_BUFFER + (256 << 10), len(s.out)
        assert written < 400_000
        r2 = await c.request(other, "/meanwhile")
        assert r2.status == 200
        c.hold.discard(sid)
        c.conn.increment_flow_control_window(len(c.responses[sid].body), sid)  # what it held back
        c.flush()
        r = await settled(c, sid)
        assert r.status == 200 and r.reset is None and len(r.body) == 40_000_000
        assert_intact(c)
        c.close()


# ---- what the gateway passes on, and refuses


async def test_connection_specific_and_odd_fields_never_reach_a_strict_client(
    start_gateway: Any, catalog: Catalog
) -> None:
    """RFC 9113 §8.2.2: connection-specific fields make a response malformed; §8.2: names lower case;
    §8.2.1: no white space around a value. In the 103, the head and the trailers a sandbox sends,
    they are dropped, lowered and trimmed (and a 1xx keeps no Content-Length, RFC 9110 §8.6): h2 (strict) and nghttp take both, obs-text and empty values
    included. (A ``Connection: close`` in the trailers made llhttp refuse the sandbox's next
    response on the pooled connection: a 502 for that sandbox's next request.)"""
    head = (b"HTTP/1.1 200 OK\r\nConnection: keep-alive, x-named\r\nKeep-Alive: timeout=5\r\n"
            b"Transfer-Encoding: chunked\r\nUpgrade: h2c\r\nProxy-Connection: keep-alive\r\nTE: trailers\r\n"
            b"X-Named: 1\r\nX-UPPER: A\r\nX-Ws: \t a b \t\r\nX-Obs: caf\xe9\r\nX-Empty:\r\n\r\n")  # fmt: skip
    trailers = (b"Connection: close\r\nTransfer-Encoding: chunked\r\nKeep-Alive: 1\r\nTE: gzip\r\nUpgrade: x\r\n"
                b"Proxy-Connection: y\r\nX-UP: 1\r\nX-Sp:  a \r\n\r\n")  # fmt: skip
    hint = (b"HTTP/1.1 103 Early Hints\r\nConnection: x-named\r\nX-Named: 1\r\nKeep-Alive: 1\r\nUpgrade: h2c\r\n"
            b"TE: trailers\r\nProxy-Connection: x\r\nContent-Length: 5\r\nLINK:  </a.css>; rel=preload \r\n\r\n")  # fmt: skip
    table = {b"/odd": hint + head + b"2\r\nok\r\n0\r\n" + trailers, b"/next": OK}
    async with two_sandboxes(start_gateway, catalog, table) as (gw, host, other):
        c = await H2Client.connect(gw.port, strict=True)
        r = await beside(c, other, host, "/odd")
        assert r.status == 200 and bytes(r.body) == b"ok"
        assert [h for h in r.headers if h[0] != b"x-request-id"] == [
            (b":status", b"200"), (b"x-upper", b"A"), (b"x-ws", b"a b"), (b"x-obs", b"caf\xe9"), (b"x-empty", b""),
        ]  # fmt: skip
        assert r.trailers == [(b"x-up", b"1"), (b"x-sp", b"a")]
        assert r.interim == [[(b":status", b"103"), (b"link", b"</a.css>; rel=preload")]]
        # The sandbox connection goes on (its head said keep-alive; the trailer's Connection field is
        # not the connection's: framing.py), and its next answer is the next response.
        r = await beside(c, other, host, "/next")
        assert r.status == 200 and bytes(r.body) == b"ok"
        c.close()
        nghttp = needs.tool("nghttp", "apt-get install nghttp2-client")
        out = await asyncio.to_thread(
            subprocess.run, [nghttp, "-nv", "-H", f":authority: {host}", f"http://127.0.0.1:{gw.port}/odd"],
            capture_output=True, timeout=WAIT, check=False,
        )  # fmt: skip
        assert out.returncode == 0 and b"RST_STREAM" not in out.stdout, out.stdout[-2000:]
        assert b":status: 200" in out.stdout and b"x-sp: a" in out.stdout, out.stdout[-2000:]


RESET = h2.errors.ErrorCodes.INTERNAL_ERROR


@pytest.mark.parametrize(
    "answer,method,status,body,reset",
    [
        (b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\nxxxx", "GET", 502, None, None),
        (b"HTTP/1.1 101 Switching Protocols\r\n\r\nxxxx", "GET", 502, None, None),
        (b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\nhello", "GET", 204, b"", None),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", "HEAD", 200, b"", None),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nsmuggled!", "GET", 200, b"ok", None),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n\x1f\x8b\x08\x00", "GET", 502, None, None),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n4\r\n\x1f\x8b\x08\x00\r\n0\r\n\r\n", "GET", 502, None, None),
        (b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" * 17 + OK, "GET", 502, None, None),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n:status: 500\r\n\r\n", "GET", 200, None, RESET),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\nContent-Length: 9\r\n\r\n", "GET", 200, None, RESET),
    ],
    ids=["101-unasked", "101-bare", "204-with-body", "head-with-body", "bytes-after", "gzip-coding", "gzip-chunked",
         "17-hints", "pseudo-trailer", "length-trailer"],
)  # fmt: skip
async def test_hostile_answers_end_only_their_own_stream(
    start_gateway: Any, catalog: Catalog, answer: bytes, method: str, status: int, body: bytes | None, reset: int | None
) -> None:
    """Answers no request asked for (a 101 to a GET), framing fields and bytes a bodiless or complete
    response must not have, a transfer coding an HTTP/2 client has no notion of (RFC 9113 §8.2.2: the
    body would reach it still gzip-coded, nothing saying so; refused as nginx does), more 1xx than
    MAX_INTERIM, trailer fields llhttp refuses (a pseudo-header's name, a Content-Length): each ends in
    its own stream, with a 502 where nothing was sent yet, else a reset of that stream; the same
    sandbox's next answer is its own."""
    async with two_sandboxes(start_gateway, catalog, {b"/x": answer, b"/next": OK}) as (gw, host, other):
        c = await H2Client.connect(gw.port, strict=True)
        r = await beside(c, other, host, "/x", method=method)
        assert r.status == status and r.reset == reset
        if reset is None and body is None:
            assert r.header(b"x-gateway-reason") == b"upstream_invalid_response"
        elif body is not None:
            assert bytes(r.body) == body
        r = await beside(c, other, host, "/next")
        assert r.status == 200 and bytes(r.body) == b"ok"
        c.close()
