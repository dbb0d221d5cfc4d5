"""What the client gets when the sandbox side fails: a clear answer, or a visibly cut message."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest

from tests.conftest import WAIT, Catalog, free_port
from tests.helpers import Client, RawUpstream, UpstreamConn, echo_handler, read_response, response

BROWSER = {
    "User-Agent": "Mozilla/5.0 (X11; Linux x86_64) Chrome/126.0",
    "Accept": "text/html,application/xhtml+xml,*/*;q=0.8",
    "Sec-Fetch-Mode": "navigate",
}


def tcp_out_resets() -> int:
    with open("/proc/net/snmp") as f:
        rows = [line.split() for line in f if line.startswith("Tcp:")]
    return int(rows[1][rows[0].index("OutRsts")])


async def test_port_not_open_json_and_html(start_gateway: Any, catalog: Catalog) -> None:
    catalog.put("abc", host="127.0.0.1")
    gw = await start_gateway(connect_wait=0.2)
    port = free_port()
    c = await Client.connect(gw.port)
    r = await c.request(gw.host(port, "abc"), "/", headers={"Origin": "https://app.example"})
    assert r.status == 502 and r.header("X-Gateway-Reason") == b"port_not_open"
    assert r.header("Retry-After") == b"3"
    assert r.json() == {
        "reason": "port_not_open",
        "message": r.json()["message"],
        "sandboxId": "abc",  # type: ignore[index]
        "port": port,
    }
    assert r.header("Access-Control-Allow-Origin") == b"https://app.example"
    page = await c.request(gw.host(port, "abc"), "/", headers=BROWSER)
    assert (
        page.status == 502
        and page.header(
            "Content-Type",
        )
        == b"text/html; charset=utf-8"
    )
    assert b'<meta http-equiv="refresh" content="3">' in page.body and str(port).encode() in page.body
    await c.close()


async def test_refused_connections_are_retried_until_the_port_opens(start_gateway: Any, catalog: Catalog) -> None:
    catalog.put("abc", host="127.0.0.1")
    gw = await start_gateway(connect_wait=5.0)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # bound, not listening: connections are refused (RST)
    port = sock.getsockname()[1]
    resets = tcp_out_resets()
    task = asyncio.create_task(request_one(gw.port, gw.host(port, "abc")))
    async with asyncio.timeout(WAIT):  # the gateway has been refused at least once ...
        while tcp_out_resets() == resets:
            await asyncio.sleep(0.005)
    sock.listen()  # ... and now the app starts listening
    server = await asyncio.start_server(serve_once, sock=sock)
    r = await asyncio.wait_for(task, WAIT)
    assert r.status == 200 and r.body == b"late but here"
    server.close()


async def request_one(port: int, host: str) -> Any:
    c = await Client.connect(port)
    try:
        return await c.request(host, "/")
    finally:
        await c.close()


async def serve_once(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    await r.readuntil(b"\r\n\r\n")
    w.write(response(200, b"late but here"))
    await w.drain()


async def test_connect_timeout(start_gateway: Any, catalog: Catalog) -> None:
    # A listener whose accept queue is full drops SYNs: connecting hangs, as to a dead host.
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(0)
    port = sock.getsockname()[1]
    fillers = []
    for _ in range(4):
        s = socket.socket()
        s.setblocking(False)
        try:
            s.connect(("127.0.0.1", port))
        except BlockingIOError:
            pass
        fillers.append(s)
    catalog.put("abc", host="127.0.0.1")
    gw = await start_gateway(connect_timeout=0.3)
    c = await Client.connect(gw.port)
    r = await c.request(gw.host(port, "abc"), "/")
    assert r.status == 504 and r.header("X-Gateway-Reason") == b"upstream_connect_timeout"
    await c.close()
    for s in [*fillers, sock]:
        s.close()


@pytest.mark.parametrize("how", ["reset", "close"])
async def test_sandbox_gone_before_the_response(start_gateway: Any, catalog: Catalog, how: str) -> None:
    async def handler(c: UpstreamConn) -> None:
        await c.read_request()
        if how == "reset":
            c.reset()
        else:
            c.writer.close()

    async with RawUpstream(handler) as up:
        catalog.put("abc", host="127.0.0.1")
        gw = await start_gateway()
        c = await Client.connect(gw.port)
        r = await c.request(gw.host(up.port, "abc"), "/", method="POST", body=b"data")
        assert r.status == 502 and r.header("X-Gateway-Reason") == b"upstream_reset"
        r = await c.request(gw.host(up.port, "abc"), "/")  # the client connection is still usable
        assert r.status == 502
        await c.close()


@pytest.mark.parametrize(
    "partial",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 40,
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
        b"HTTP/1.0 200 OK\r\n\r\nclose-delimited",
    ],
    ids=["content-length", "chunked", "close-delimited"],
)
@pytest.mark.parametrize("http10", [False, True])
async def test_reset_mid_body_leaves_the_message_visibly_incomplete(
    start_gateway: Any, catalog: Catalog, partial: bytes, http10: bool
) -> None:
    sent = asyncio.Event()

    async def handler(c: UpstreamConn) -> None:
        await c.read_request()
        c.send(partial)
        await c.writer.drain()
        sent.set()
        await asyncio.sleep(0.05)  # let the partial body pass through before the reset
        c.reset()

    async with RawUpstream(handler) as up:
        catalog.put("abc", host="127.0.0.1")
        gw = await start_gateway()
        c = await Client.connect(gw.port)
        version = "1.0" if http10 else "1.1"
        c.send(f"GET / HTTP/{version}\r\nHost: {gw.host(up.port, 'abc')}\r\n\r\n".encode())
        got = b""
        error = None
        try:
            async with asyncio.timeout(WAIT):
                while chunk := await c.reader.read(65536):
                    got += chunk
        except ConnectionResetError as e:
            error = e
        assert sent.is_set()
        head, _, body = got.partition(b"\r\n\r\n")
        if b"Content-Length: 100" in head:
            assert len(body) < 100  # short: never a complete Content-Length body
        if b"chunked" in head.lower():
            assert not body.endswith(b"0\r\n\r\n")  # never the terminating chunk
        if b"chunked" not in head.lower() and b"Content-Length" not in head:
            assert error is not None  # close-delimited: only the reset tells the client
        await c.close()


async def test_stale_pooled_connection_is_retried_when_safe(start_gateway: Any, catalog: Catalog) -> None:
    # The first connection answers once, then drops the next request unanswered, as a server does
    # that closes an idle keep-alive connection just as a request arrives.
    async def handler(c: UpstreamConn) -> None:
        first = len(c.server.conns) == 1
        await c.read_request()
        c.send(response(200, b"one"))
        if first:
            await c.read_request()
            c.reset()
            return
        while True:
            head, body = await c.read_request()
            c.send(response(200, head.split(b" ")[1] + b" body=" + body))

    async with RawUpstream(handler) as up:
        catalog.put("abc", host="127.0.0.1")
        gw = await start_gateway()
        h = gw.host(up.port, "abc")
        c = await Client.connect(gw.port)
        assert (await c.request(h, "/first")).body == b"one"
        r = await c.request(h, "/again")  # idempotent: retried on a new connection
        assert r.status == 200 and r.body == b"one"
        assert len(up.conns) == 2
        await c.close()


async def test_stale_pooled_connection_is_not_retried_for_a_sent_post(start_gateway: Any, catalog: Catalog) -> None:
    async def handler(c: UpstreamConn) -> None:
        await c.read_request()
        c.send(response(200, b"one"))
        await c.read_request()
        c.reset()

    async with RawUpstream(handler) as up:
        catalog.put("abc", host="127.0.0.1")
        gw = await start_gateway()
        h = gw.host(up.port, "abc")
        c = await Client.connect(gw.port)
        assert (await c.request(h, "/first")).body == b"one"
        r = await c.request(h, "/pay", method="POST", body=b"amount=1")  # not idempotent, body sent
        assert r.status == 502 and r.header("X-Gateway-Reason") == b"upstream_reset"
        assert len(up.conns) == 1
        await c.close()


@pytest.mark.parametrize(
    "answer",
    [
        b"SSH-2.0-OpenSSH_9.2\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX: " + b"a" * 70000 + b"\r\n\r\n",
    ],
    ids=["not-http", "cl-and-te", "unasked-101", "huge-head"],
)
async def test_invalid_responses(start_gateway: Any, catalog: Catalog, answer: bytes) -> None:
    async def handler(c: UpstreamConn) -> None:
        await c.read_request()
        c.send(answer)
        await c.writer.drain()
        await c.reader.read()

    async with RawUpstream(handler) as up:
        catalog.put("abc", host="127.0.0.1")
        gw = await start_gateway()
        c = await Client.connect(gw.port)
        r = await c.request(gw.host(up.port, "abc"), "/")
        assert r.status == 502 and r.header("X-Gateway-Reason") == b"upstream_invalid_response"
        await c.close()


async def test_early_response_before_the_body_is_sent(start_gateway: Any, catalog: Catalog) -> None:
    async def handler(c: UpstreamConn) -> None:
        await c.read_head()  # a sandbox refusing an upload from its head, without reading the body
        c.send(response(413, b"too big", {"Connection": "close"}))
        await c.writer.drain()

    async with RawUpstream(handler) as up:
        catalog.put("abc", host="127.0.0.1")
        gw = await start_gateway()
        c = await Client.connect(gw.port)
        c.send(f"POST /up HTTP/1.1\r\nHost: {gw.host(up.port, 'abc')}\r\nContent-Length: 1000000\r\n\r\n".encode())
        c.send(b"x" * 1000)
        r = await read_response(c.reader)
        assert r.status == 413 and r.body == b"too big"
        await c.close()


async def test_upgrade_answered_without_101_stays_http(start_gateway: Any, catalog: Catalog) -> None:
    async with RawUpstream(echo_handler) as up:
        catalog.put("abc", host="127.0.0.1")
        gw = await start_gateway()
        h = gw.host(up.port, "abc")
        c = await Client.connect(gw.port)
        c.send(
            f"GET /ws HTTP/1.1\r\nHost: {h}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
            f"GET /after HTTP/1.1\r\nHost: {h}\r\n\r\n".encode()
        )
        r = await read_response(c.reader)
        assert r.status == 200 and b"Upgrade: websocket" in r.body
        r = await read_response(c.reader)
        assert r.status == 200 and b"GET /after " in r.body
        await c.close()
