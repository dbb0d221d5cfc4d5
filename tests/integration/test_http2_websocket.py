"""WebSockets over HTTP/2 (RFC 8441): an extended CONNECT stream becomes an HTTP/1.1 Upgrade to the
sandbox and then a byte tunnel on that stream, next to ordinary streams on the same connection."""

from __future__ import annotations

import asyncio
from typing import Any

import h2.errors
import h2.settings
from websockets.frames import Close, Frame, Opcode

from tests.conftest import WAIT, Catalog
from tests.h2client import H2Client, H2Response
from tests.helpers import RawUpstream, UpstreamConn, echo_handler
from tests.integration.test_websocket import EchoServer
from tests.integration.test_websocket import echo as echo_fixture

echo = echo_fixture  # the websockets echo peer the WebSocket tests use
WS = [("sec-websocket-version", "13")]


def connect_ws(c: H2Client, authority: str, path: str = "/", headers: list[tuple[str, str]] | None = None) -> int:
    return c.start(
        authority, path, method="CONNECT", extra_pseudo=[(":protocol", "websocket")],
        headers=WS + (headers or []), end=False,
    )  # fmt: skip


def frame(opcode: Opcode, data: bytes) -> bytes:
    """A client's frame: masked (RFC 6455 §5.3)."""
    return Frame(opcode, data).serialize(mask=True, extensions=[])


async def next_frame(r: H2Response, offset: int = 0) -> tuple[int, bytes, int]:
    """The server frame at ``offset`` in the stream's DATA so far: (opcode, payload, next offset)."""
    async with asyncio.timeout(WAIT):
        while True:
            buf = bytes(r.body[offset:])
            if len(buf) >= 2:
                n = buf[1] & 0x7F
                start = {126: 4, 127: 10}.get(n, 2)
                if len(buf) >= start:
                    if n >= 126:
                        n = int.from_bytes(buf[2:start], "big")
                    if len(buf) >= start + n:
                        return buf[0] & 0x0F, buf[start : start + n], offset + start + n
            r.data.clear()
            await r.data.wait()


async def test_extended_connect_websocket_echo(start_gateway: Any, catalog: Catalog, echo: EchoServer) -> None:
    async with RawUpstream(echo_handler) as plain:
        catalog.put("ws2", host="127.0.0.1")
        catalog.put("pl2", host="127.0.0.1")
        gw = await start_gateway()
        c = await H2Client.connect(gw.port)
        sid = connect_ws(c, gw.host(echo.port, "ws2"), "/chat", [("sec-websocket-protocol", "chat.v1")])
        r = c.responses[sid]
        async with asyncio.timeout(WAIT):
            await r.head.wait()
        settings = c.conn.remote_settings
        assert settings[h2.settings.SettingCodes.ENABLE_CONNECT_PROTOCOL] == 1  # RFC 8441 §3
        assert r.status == 200 and r.reset is None  # RFC 8441 §5: 200, not 101
        assert r.header(b"sec-websocket-accept") is None and r.header(b"upgrade") is None
        assert r.header(b"x-request-id") is not None
        c.send_body(sid, frame(Opcode.TEXT, b"hello over h2"))
        op, payload, off = await next_frame(r)
        assert (op, payload) == (Opcode.TEXT, b"hello over h2")
        # Another stream on the same connection meanwhile: an ordinary request.
        other = await c.request(gw.host(plain.port, "pl2"), "/plain")
        assert other.status == 200
        c.send_body(sid, frame(Opcode.BINARY, b"\x00" * 70_000))  # a bigger frame, both ways
        op, payload, off = await next_frame(r, off)
        assert (op, len(payload)) == (Opcode.BINARY, 70_000)
        c.send_body(sid, frame(Opcode.CLOSE, Close(1000, "done").serialize()))
        op, payload, off = await next_frame(r, off)
        assert op == Opcode.CLOSE
        c.send_body(sid, b"", end=True)
        await c.response(sid)  # the sandbox closed: END_STREAM
        assert r.reset is None
        headers = echo.request_headers[0]
        assert headers["Upgrade"] == "websocket" and headers["Sec-WebSocket-Key"]
        assert echo.subprotocols == ["chat.v1"] and r.header(b"sec-websocket-protocol") == b"chat.v1"
        async with asyncio.timeout(WAIT):
            while not echo.closes:
                await asyncio.sleep(0.01)
        assert echo.closes == [(1000, "done")]
        c.close()


async def test_a_reset_stream_resets_the_sandbox_side_only(start_gateway: Any, catalog: Catalog) -> None:
    closed = asyncio.Event()

    async def ws_server(c: UpstreamConn) -> None:
        head = await c.read_head()
        assert b"upgrade: websocket" in head.lower()
        c.send(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               b"Sec-WebSocket-Accept: x\r\n\r\n")  # fmt: skip
        try:
            async with asyncio.timeout(WAIT):
                while await c.reader.read(65536):
                    pass
        finally:
            closed.set()

    async with RawUpstream(ws_server) as up, RawUpstream(echo_handler) as plain:
        catalog.put("wsr", host="127.0.0.1")
        catalog.put("plr", host="127.0.0.1")
        gw = await start_gateway()
        c = await H2Client.connect(gw.port)
        sid = connect_ws(c, gw.host(up.port, "wsr"))
        async with asyncio.timeout(WAIT):
            await c.responses[sid].head.wait()
        assert c.responses[sid].status == 200
        c.conn.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
        c.flush()
        async with asyncio.timeout(WAIT):
            await closed.wait()  # the sandbox side ended
        r = await c.request(gw.host(plain.port, "plr"), "/after")
        assert r.status == 200  # the connection is fine
        c.close()


async def test_a_refused_upgrade_is_an_ordinary_response(start_gateway: Any, catalog: Catalog) -> None:
    async with RawUpstream(echo_handler) as up:  # answers 200 to everything, never 101
        catalog.put("nows", host="127.0.0.1")
        gw = await start_gateway()
        c = await H2Client.connect(gw.port)
        sid = connect_ws(c, gw.host(up.port, "nows"))
        r = await c.response(sid)
        assert r.status == 200 and b"upgrade: websocket" in bytes(r.body).lower()
        c.close()


async def test_private_sandbox_token_subprotocol_over_h2(
    start_gateway: Any, catalog: Catalog, echo: EchoServer
) -> None:
    """Admission holds over HTTP/2 too: the token subprotocol admits the WebSocket and is cut."""
    catalog.put("wsp", host="127.0.0.1", traffic_access_token="tk")
    gw = await start_gateway()
    c = await H2Client.connect(gw.port)
    sid = connect_ws(c, gw.host(echo.port, "wsp"), headers=[("sec-websocket-protocol", "chat.v1, e2b-token.tk")])
    r = c.responses[sid]
    async with asyncio.timeout(WAIT):
        await r.head.wait()
    assert r.status == 200
    sid2 = connect_ws(c, gw.host(echo.port, "wsp"), headers=[("sec-websocket-protocol", "chat.v1")])
    r2 = await c.response(sid2)
    assert (r2.status, r2.header(b"x-gateway-reason")) == (403, b"traffic_token_missing")
    assert echo.subprotocols == ["chat.v1"]  # the token never reached the app
    assert r.header(b"sec-websocket-protocol") == b"chat.v1"
    c.close()


async def test_what_the_sandbox_sent_before_closing_waits_for_the_clients_window(
    start_gateway: Any, catalog: Catalog
) -> None:
    """The client has ended its side of a WebSocket over HTTP/2 (END_STREAM: its Close was sent); the
    sandbox, seeing that, sends more than the client's stream window lets through and closes (its
    Close frame last). The client reads slowly: the rest waits at the gateway for the window after
    the sandbox's connection is gone, and the stream then ends with END_STREAM, all of it delivered.
    (It used to be dropped when the sandbox's connection closed: the client never saw the end.)"""
    payload = bytes(range(256)) * 400  # 102,400 bytes: past the 65,535 of the stream's window
    close = Frame(Opcode.CLOSE, Close(1000, "bye").serialize()).serialize(mask=False, extensions=[])

    async def ws_server(c: UpstreamConn) -> None:
        await c.read_head()
        c.send(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               b"Sec-WebSocket-Accept: x\r\n\r\n")  # fmt: skip
        async with asyncio.timeout(WAIT):
            while await c.reader.read(65536):  # until the client's side ends (the gateway's FIN)
                pass
        c.send(payload + close)
        await c.writer.drain()
        c.writer.close()

    async with RawUpstream(ws_server) as up:
        catalog.put("wsw", host="127.0.0.1")
        gw = await start_gateway()
        c = await H2Client.connect(gw.port)
        sid = connect_ws(c, gw.host(up.port, "wsw"))
        c.hold.add(sid)  # the stream's window is not given back (the connection's is)
        r = c.responses[sid]
        async with asyncio.timeout(WAIT):
            await r.head.wait()
        assert r.status == 200
        c.send_body(sid, b"", end=True)
        async with asyncio.timeout(WAIT):
            # (the window's worth came, after the tunnel began; then the sandbox's connection closed)
            while gw.gateway.ctx.tunnels or len(r.body) < 65_535:
                await asyncio.sleep(0.01)
        assert len(r.body) == 65_535 and r.reset is None and not r.ended.is_set()
        c.hold.discard(sid)
        c.conn.increment_flow_control_window(len(payload), sid)  # the client reads on
        c.flush()
        await c.response(sid)
        assert r.reset is None and bytes(r.body) == payload + close
        c.close()
