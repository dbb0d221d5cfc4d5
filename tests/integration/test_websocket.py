"""WebSockets and other upgrades: after a 101 both connections are one raw byte tunnel."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from typing import Any

import pytest
import websockets
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.extensions.permessage_deflate import PerMessageDeflate

from tests.conftest import WAIT, Catalog
from tests.helpers import (
    Client,
    RawUpstream,
    UpstreamConn,
    open_fds,
    read_response,
    response,
    rss_kib,
    until_sandbox_blocked,
)

MIB = 1 << 20


class EchoServer:
    """A websockets server: echoes messages, records what it saw."""

    def __init__(self) -> None:
        self.request_headers: list[Any] = []
        self.subprotocols: list[str | None] = []
        self.extensions: list[list[Any]] = []
        self.closes: list[tuple[int | None, str | None]] = []
        self.port = 0

    async def handler(self, ws: ServerConnection) -> None:
        self.subprotocols.append(ws.subprotocol)
        self.extensions.append(list(ws.protocol.extensions))
        try:
            async for msg in ws:
                if msg == "close-please":
                    await ws.close(4001, "bye")
                    break
                await ws.send(msg)
        except websockets.ConnectionClosed:
            pass
        self.closes.append((ws.close_code, ws.close_reason))

    def process_request(self, conn: ServerConnection, request: Any) -> None:
        self.request_headers.append(request.headers)


@pytest.fixture
async def echo() -> AsyncIterator[EchoServer]:
    e = EchoServer()
    async with serve(
        e.handler, "127.0.0.1", 0, subprotocols=["chat.v2", "chat.v1"], max_size=32 * MIB,
        process_request=e.process_request,
    ) as server:  # fmt: skip
        e.port = server.sockets[0].getsockname()[1]
        yield e


async def test_websocket_fidelity(start_gateway: Any, catalog: Catalog, echo: EchoServer) -> None:
    catalog.put("abc", host="127.0.0.1")
    gw = await start_gateway()
    uri = f"ws://{gw.host(echo.port, 'abc')}/ws"
    async with connect(uri, host="127.0.0.1", port=gw.port, subprotocols=["chat.v1", "chat.v2"],
                       max_size=32 * MIB, open_timeout=WAIT) as ws:  # fmt: skip
        # The sandbox chose the subprotocol and the extension; the client got exactly that.
        assert ws.subprotocol == echo.subprotocols[0] is not None
        assert [type(e) for e in ws.protocol.extensions] == [PerMessageDeflate]
        assert [type(e) for e in echo.extensions[0]] == [PerMessageDeflate]
        big = os.urandom(16 * MIB)
        await ws.send(big)
        async with asyncio.timeout(WAIT * 3):
            assert await ws.recv() == big
        await ws.send("text ✓")
        assert await ws.recv() == "text ✓"
        pong = await ws.ping(b"payload-123")  # resolves only for a pong with this payload
        async with asyncio.timeout(WAIT):
            await pong
        await ws.send("close-please")
        with pytest.raises(websockets.ConnectionClosed):
            async with asyncio.timeout(WAIT):
                await ws.recv()
        assert (ws.close_code, ws.close_reason) == (4001, "bye")
    # A close from the client side arrives with its code too.
    async with connect(uri, host="127.0.0.1", port=gw.port, subprotocols=["chat.v1"], open_timeout=WAIT) as ws:
        await ws.send("hi")
        assert await ws.recv() == "hi"
        await ws.close(4002, "client done")
    async with asyncio.timeout(WAIT):
        while len(echo.closes) < 2:
            await asyncio.sleep(0.01)
    assert echo.closes[1] == (4002, "client done")


async def test_mask_request_host_applies_to_upgrades(start_gateway: Any, catalog: Catalog, echo: EchoServer) -> None:
    catalog.put("abc", host="127.0.0.1", mask_request_host="localhost:${PORT}")
    gw = await start_gateway()
    host = gw.host(echo.port, "abc")
    async with connect(f"ws://{host}/ws", host="127.0.0.1", port=gw.port, subprotocols=["chat.v1"],
                       open_timeout=WAIT, origin=f"http://{host}") as ws:  # fmt: skip
        await ws.send("x")
        assert await ws.recv() == "x"
    h = echo.request_headers[0]
    assert h["Host"] == f"localhost:{echo.port}"
    assert h["X-Forwarded-Host"] == host
    assert h["Origin"] == f"http://localhost:{echo.port}"  # the page's own origin follows the mask
    async with connect(f"ws://{host}/ws", host="127.0.0.1", port=gw.port, subprotocols=["chat.v1"],
                       open_timeout=WAIT, origin="http://elsewhere.example") as ws:  # fmt: skip
        await ws.send("x")
        assert await ws.recv() == "x"
    assert echo.request_headers[1]["Origin"] == "http://elsewhere.example"  # another origin: unchanged


async def raw_101(c: UpstreamConn) -> None:
    await c.read_head()
    send_101(c)


def send_101(c: UpstreamConn) -> None:
    c.send(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: x\r\n\r\n"
    )


UPGRADE = (
    "GET /ws HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: x\r\n\r\n"
)


async def upgraded_client(gw: Any, host: str, early: bytes = b"") -> Client:
    c = await Client.connect(gw.port)
    c.send(UPGRADE.format(host=host).encode() + early)
    r = await read_response(c.reader)
    assert r.status == 101 and r.header("Upgrade") == b"websocket"
    return c


async def test_tunnel_is_raw_bytes_both_ways_with_half_close(start_gateway: Any, catalog: Catalog) -> None:
    got_eof = asyncio.Event()

    async def sandbox(c: UpstreamConn) -> None:
        await raw_101(c)
        c.send(b"\x00not-a-frame\xff")  # bytes after the 101 that are no WebSocket frame at all
        data = b""
        async with asyncio.timeout(WAIT):
            while chunk := await c.reader.read(65536):
                data += chunk
        got_eof.set()  # the client's FIN arrived as a FIN ...
        c.send(b"reply after your FIN:" + data)  # ... and this direction still works
        await c.writer.drain()
        c.writer.close()

    async with RawUpstream(sandbox) as up:
        catalog.put("abc", host="127.0.0.1")
        gw = await start_gateway()
        c = await upgraded_client(gw, gw.host(up.port, "abc"), early=b"early-bytes|")
        c.send(b"more-bytes")
        c.writer.write_eof()
        async with asyncio.timeout(WAIT):
            await got_eof.wait()
            rest = await c.reader.read()  # until the sandbox's FIN
        assert rest == b"\x00not-a-frame\xffreply after your FIN:early-bytes|more-bytes"
        await c.close()


async def test_reset_on_one_side_closes_the_other(start_gateway: Any, catalog: Catalog) -> None:
    async def sandbox(c: UpstreamConn) -> None:
        await raw_101(c)
        await c.reader.readexactly(4)
        c.reset()

    async with RawUpstream(sandbox) as up:
        catalog.put("abc", host="127.0.0.1")
        gw = await start_gateway()
        c = await upgraded_client(gw, gw.host(up.port, "abc"))
        c.send(b"ping")
        with pytest.raises((ConnectionResetError, asyncio.IncompleteReadError)):
            async with asyncio.timeout(WAIT):
                data = await c.reader.read(100)
                assert data == b""
                raise asyncio.IncompleteReadError(b"", None)
        await c.close()
        async with asyncio.timeout(WAIT):
            while gw.gateway.ctx.tunnels:
                await asyncio.sleep(0.01)


async def test_refused_upgrade_stays_http_and_other_tokens_are_dropped(start_gateway: Any, catalog: Catalog) -> None:
    async def sandbox(c: UpstreamConn) -> None:
        while True:
            head, _ = await c.read_request()
            c.send(response(426 if b"/ws" in head else 200, head))

    async with RawUpstream(sandbox) as up:
        catalog.put("abc", host="127.0.0.1")
        gw = await start_gateway()
        host = gw.host(up.port, "abc")
        c = await Client.connect(gw.port)
        c.send(UPGRADE.format(host=host).encode() + f"GET /next HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        r = await read_response(c.reader)
        assert r.status == 426 and b"Upgrade: websocket" in r.body
        r = await read_response(c.reader)  # what followed the refused Upgrade is a request
        assert r.status == 200 and r.body.startswith(b"GET /next ")
        c.send(f"GET /h2 HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
               f"HTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA\r\n\r\n".encode())  # fmt: skip
        r = await read_response(c.reader)
        assert r.status == 200 and b"h2c" not in r.body and b"HTTP2-Settings" not in r.body  # no h2c tunnel
        await c.close()


async def test_101_without_upgrade_is_refused(start_gateway: Any, catalog: Catalog) -> None:
    async def sandbox(c: UpstreamConn) -> None:
        await c.read_head()
        c.send(b"HTTP/1.1 101 Switching Protocols\r\n\r\n")
        await c.reader.read()

    async with RawUpstream(sandbox) as up:
        catalog.put("abc", host="127.0.0.1")
        gw = await start_gateway()
        c = await Client.connect(gw.port)
        c.send(UPGRADE.format(host=gw.host(up.port, "abc")).encode())
        r = await read_response(c.reader)
        assert r.status == 502 and r.header("X-Gateway-Reason") == b"upstream_invalid_response"
        await c.close()


async def test_tunnel_idle_timeout(start_gateway: Any, catalog: Catalog) -> None:
    async def sandbox(c: UpstreamConn) -> None:
        await raw_101(c)
        await c.reader.read()

    async with RawUpstream(sandbox) as up:
        catalog.put("abc", host="127.0.0.1")
        gw = await start_gateway(tunnel_idle_timeout=0.5)
        c = await upgraded_client(gw, gw.host(up.port, "abc"))
        assert await c.closed()  # nobody spoke: closed by the gateway
        await c.close()


async def test_bad_upgrades_leak_nothing(gateway_process: Any, catalog: Catalog) -> None:
    async def sandbox(c: UpstreamConn) -> None:
        head = await c.read_head()
        if b"/garbage" in head:
            send_101(c)
            c.send(os.urandom(4096))  # garbage after the 101: just bytes to the client
            await c.writer.drain()
        elif b"/slow" in head:
            await c.reader.read()  # never answers: the client gives up mid-handshake
        elif b"/bad101" in head:
            c.send(b"HTTP/1.1 101 Switching Protocols\r\n\r\n")
            await c.reader.read()
        else:
            send_101(c)
            await c.reader.read()

    async with RawUpstream(sandbox) as up:
        catalog.put("abc", host="127.0.0.1")
        gw = gateway_process()
        host = gw.host(up.port, "abc")
        before = open_fds(gw.proc.pid)
        survivor = await upgraded_client(gw, host)  # a healthy tunnel that must not be disturbed
        for _ in range(20):
            c = await Client.connect(gw.port)  # gone mid-handshake
            c.send(UPGRADE.replace("/ws", "/slow").format(host=host).encode())
            await c.close()
            c = await Client.connect(gw.port)  # a body on an Upgrade request
            c.send(UPGRADE.format(host=host).replace("\r\n\r\n", "\r\nContent-Length: 3\r\n\r\nabc").encode())
            assert (await read_response(c.reader)).status == 400
            await c.close()
            c = await Client.connect(gw.port)  # a 101 without Upgrade
            c.send(UPGRADE.replace("/ws", "/bad101").format(host=host).encode())
            assert (await read_response(c.reader)).status == 502
            await c.close()
            c = await upgraded_client(gw, host)  # a tunnel, opened and closed
            await c.close()
        g = await Client.connect(gw.port)
        g.send(UPGRADE.replace("/ws", "/garbage").format(host=host).encode())
        assert (await read_response(g.reader)).status == 101
        async with asyncio.timeout(WAIT):
            await g.reader.readexactly(4096)
        await g.close()
        survivor.send(b"still here")
        await survivor.close()
        for c in up.conns:
            c.writer.close()
        async with asyncio.timeout(WAIT):  # every socket the gateway opened for them is closed again
            while open_fds(gw.proc.pid) > before:
                await asyncio.sleep(0.05)


async def test_tunnel_backpressure_keeps_memory_flat(gateway_process: Any, catalog: Catalog) -> None:
    written = 0

    async def flood(c: UpstreamConn) -> None:
        nonlocal written
        await raw_101(c)
        block = b"x" * MIB
        while written < 1024 * MIB:
            c.writer.write(block)
            written += MIB
            await c.writer.drain()

    async with RawUpstream(flood) as up:
        catalog.put("abc", host="127.0.0.1")
        gw = gateway_process()
        c = await upgraded_client(gw, gw.host(up.port, "abc"))
        c.writer.transport.pause_reading()  # a receiver that does not keep up
        await until_sandbox_blocked(up.port, lambda: written)
        rss, _ = rss_kib(gw.proc.pid)
        assert written < 128 * MIB and rss < 100 * 1024
        c.writer.transport.resume_reading()
        got = 0
        async with asyncio.timeout(60):
            while got < 1024 * MIB:
                data = await c.reader.read(MIB)
                assert data
                got += len(data)
        assert rss_kib(gw.proc.pid)[1] < 100 * 1024
        await c.close()
