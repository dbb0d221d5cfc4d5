"""No client and no sandbox can stall a worker (issue 9): hostile bytes from either side are
refused without a spin, pipelines drain and read on, idle sockets and silent sandboxes time out.

Real sockets, a real gateway, raw peers on both sides. Every wait is bounded (WAIT).
"""

from __future__ import annotations

import asyncio
from typing import Any

from tests.conftest import Catalog
from tests.helpers import WAIT, Client, RawUpstream, UpstreamConn, echo_handler, read_response, response

ATTACK = "POST / HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n\r\n-6\r\nX"


async def served(port: int, host: str, path: str = "/after") -> None:
    """A new client is answered by the sandbox: the worker is not stalled."""
    c = await Client.connect(port)
    r = await c.request(host, path)
    assert r.status == 200 and path.encode() in r.body
    await c.close()


async def test_the_70_bytes_that_froze_a_worker(start_gateway: Any, catalog: Catalog) -> None:
    async with RawUpstream(echo_handler) as up:
        catalog.put("abc", host="127.0.0.1")
        gw = await start_gateway()
        host = gw.host(up.port, "abc")
        attackers = [await Client.connect(gw.port) for _ in range(7)]
        for c in attackers:
            c.send(ATTACK.format(host=host).encode())
        for c in attackers:
            r = await read_response(c.reader)
            assert (r.status, r.header("X-Gateway-Reason")) == (400, b"invalid_framing")
            assert await c.closed()
            await c.close()
        await served(gw.port, host)
        assert b"X" not in bytes(up.received).split(b"\r\n\r\n", 1)[-1]


async def test_a_sandbox_cannot_freeze_the_worker_with_a_negative_chunk_size(
    start_gateway: Any, catalog: Catalog
) -> None:
    async def evil(c: UpstreamConn) -> None:
        head, _ = await c.read_request()
        if b"/evil" in head:
            c.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n-6\r\nX")
            await c.reader.read()
        else:
            c.send(response(200, head))
            await echo_handler(c)

    async with RawUpstream(evil) as up:
        catalog.put("abc", host="127.0.0.1")
        gw = await start_gateway()
        host = gw.host(up.port, "abc")
        c = await Client.connect(gw.port)
        c.send(f"GET /evil HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        # The response had begun (its head was valid): the client connection is reset, so the
        # broken body can never look complete.
        head = await asyncio.wait_for(c.reader.readuntil(b"\r\n\r\n"), WAIT)
        assert head.startswith(b"HTTP/1.1 200 OK\r\n")
        assert await c.closed()
        await c.close()
        await served(gw.port, host)


async def test_pipelined_batches_are_all_answered_then_reading_resumes(start_gateway: Any, catalog: Catalog) -> None:
    """The read gate used to stay closed after two requests arrived in one read; the connection
    hung until the idle timeout."""
    async with RawUpstream(echo_handler) as up:
        catalog.put("abc", host="127.0.0.1")
        gw = await start_gateway()
        host = gw.host(up.port, "abc")
        c = await Client.connect(gw.port)
        n = 0
        for batch in (2, 3, 8, 10_000, 1):
            c.send(b"".join(f"GET /{n + i} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode() for i in range(batch)))
            for i in range(batch):
                r = await c.read_response()
                assert r.status == 200 and f"GET /{n + i} HTTP/1.1".encode() in r.body, (batch, i)
            n += batch
        # And requests with bodies, pipelined behind each other, then one more.
        posts = b"".join(
            f"POST /p{i} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {i}\r\n\r\n".encode() + b"x" * i for i in range(20)
        )
        c.send(posts)
        for i in range(20):
            r = await c.read_response()
            assert f"POST /p{i} ".encode() in r.body and r.body.endswith(b"body=%d" % i)
        assert (await c.request(host, "/last")).status == 200
        await c.close()


async def test_silent_sockets_and_empty_lines_do_not_hold_slots(start_gateway: Any, catalog: Catalog) -> None:
    """request_head_timeout runs from the accept: sockets that send nothing, or only empty lines,
    are closed after it, not after client_idle_timeout, and the slots they held serve again."""
    async with RawUpstream(echo_handler) as up:
        catalog.put("abc", host="127.0.0.1")
        gw = await start_gateway(max_connections=4, request_head_timeout=1.0, client_idle_timeout=620.0)
        host = gw.host(up.port, "abc")
        silent = [await Client.connect(gw.port) for _ in range(2)]
        blank = [await Client.connect(gw.port) for _ in range(2)]
        full = await Client.connect(gw.port)  # the fifth connection: over the limit
        r = await read_response(full.reader)
        assert (r.status, r.header("X-Gateway-Reason")) == (503, b"overloaded")
        await full.close()

        async def empty_lines(c: Client) -> None:
            while not c.writer.is_closing():
                c.send(b"\r\n")
                await asyncio.sleep(0.1)  # the peer's pace (load shape), not a synchronisation

        feeders = [asyncio.create_task(empty_lines(c)) for c in blank]
        for c in silent + blank:
            assert await c.closed()  # closed without a byte: nothing was asked
        for t in feeders:
            t.cancel()
        for c in silent + blank:
            await c.close()
        await served(gw.port, host)


async def test_a_head_on_a_kept_alive_connection_has_its_own_timeout(start_gateway: Any, catalog: Catalog) -> None:
    async with RawUpstream(echo_handler) as up:
        catalog.put("abc", host="127.0.0.1")
        gw = await start_gateway(request_head_timeout=1.0, client_idle_timeout=620.0)
        host = gw.host(up.port, "abc")
        c = await Client.connect(gw.port)
        assert (await c.request(host, "/first")).status == 200
        c.send(f"GET /second HTTP/1.1\r\nHost: {host}\r\n".encode())  # and never the end
        r = await read_response(c.reader)
        assert (r.status, r.header("X-Gateway-Reason")) == (408, b"request_timeout")
        assert await c.closed()
        await c.close()


async def test_an_incomplete_head_in_small_pieces_is_served(start_gateway: Any, catalog: Catalog) -> None:
    async with RawUpstream(echo_handler) as up:
        catalog.put("abc", host="127.0.0.1")
        gw = await start_gateway()
        host = gw.host(up.port, "abc")
        c = await Client.connect(gw.port)
        head = f"GET /pieces HTTP/1.1\r\nHost: {host}\r\nX-Big: {'a' * 60000}\r\n\r\n".encode()
        for i in range(0, len(head), 500):
            c.send(head[i : i + 500])
            await c.writer.drain()
        r = await c.read_response()
        assert r.status == 200 and b"X-Big: " + b"a" * 60000 in r.body
        await c.close()


async def test_a_silent_sandbox_gets_504_and_the_client_connection_goes_on(
    start_gateway: Any, catalog: Catalog
) -> None:
    release = asyncio.Event()

    async def silent(c: UpstreamConn) -> None:
        head, _ = await c.read_request()
        if b"/hints" in head:  # 1xx do not reset the clock
            c.send(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n")
            await asyncio.sleep(0.3)  # the sandbox's pace (load shape), not a synchronisation
            c.send(b"HTTP/1.1 103 Early Hints\r\nLink: </b.css>\r\n\r\n")
        elif b"/drip" in head:  # a head a line at a time, never finished
            for i in range(100):
                c.send(b"HTTP/1.1 200 OK\r\n" if i == 0 else b"X-Drip: %d\r\n" % i)
                await asyncio.sleep(0.3)
        await release.wait()

    async def fine(c: UpstreamConn) -> None:
        await echo_handler(c)

    async with RawUpstream(silent) as up, RawUpstream(fine) as ok:
        catalog.put("abc", host="127.0.0.1")
        gw = await start_gateway(response_head_timeout=1.0)
        c = await Client.connect(gw.port)
        for path in ("/silent", "/hints", "/drip"):
            r = await asyncio.wait_for(c.request(gw.host(up.port, "abc"), path), WAIT)
            assert (r.status, r.header("X-Gateway-Reason")) == (504, b"upstream_response_timeout"), path
        # The client's connection is still good.
        assert (await c.request(gw.host(ok.port, "abc"), "/after")).status == 200
        release.set()
        await c.close()


async def test_1xx_responses_are_capped(start_gateway: Any, catalog: Catalog) -> None:
    async def flood(c: UpstreamConn) -> None:
        await c.read_request()
        for _ in range(1000):
            c.send(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n")
            await c.writer.drain()
        await c.reader.read()

    async with RawUpstream(flood) as up, RawUpstream(echo_handler) as ok:
        catalog.put("abc", host="127.0.0.1")
        gw = await start_gateway()
        host = gw.host(up.port, "abc")
        c = await Client.connect(gw.port)
        c.send(f"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        hints = 0
        while True:
            r = await read_response(c.reader, interim=True)
            if r.status != 103:
                break
            hints += 1
        assert hints == 16
        assert (r.status, r.header("X-Gateway-Reason")) == (502, b"upstream_invalid_response")
        await c.close()
        await served(gw.port, gw.host(ok.port, "abc"))


async def test_response_heads_are_capped_like_request_heads(start_gateway: Any, catalog: Catalog) -> None:
    many = b"".join(b"X-%d: v\r\n" % i for i in range(300))

    async def wide(c: UpstreamConn) -> None:
        head, _ = await c.read_request()
        if b"/many" in head:
            c.send(b"HTTP/1.1 200 OK\r\n" + many + b"Content-Length: 2\r\n\r\nok")
        else:
            c.send(b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 70000 + b"\r\nContent-Length: 2\r\n\r\nok")
        await c.reader.read()

    async with RawUpstream(wide) as up:
        catalog.put("abc", host="127.0.0.1")
        gw = await start_gateway()
        host = gw.host(up.port, "abc")
        for path in ("/many", "/big"):
            c = await Client.connect(gw.port)
            r = await c.request(host, path)
            assert (r.status, r.header("X-Gateway-Reason")) == (502, b"upstream_invalid_response"), path
            await c.close()
        gw2 = await start_gateway(max_response_header_count=400)
        c = await Client.connect(gw2.port)
        r = await c.request(host, "/many")
        assert r.status == 200 and r.body == b"ok" and b"X-299: v" in r.raw
        await c.close()
