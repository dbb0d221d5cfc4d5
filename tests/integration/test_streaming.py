"""Bodies stream with backpressure: gigabytes pass in bounded memory; a slow reader costs nothing.

The gateway runs as its own process here so its memory is measured alone (VmHWM, the peak RSS).
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tests.conftest import WAIT, Catalog
from tests.helpers import Client, RawUpstream, UpstreamConn, read_response, response, rss_kib, until_sandbox_blocked

pytestmark = pytest.mark.slow

GIB = 1 << 30
MIB = 1 << 20
BLOCK = bytes(range(256)) * 4096  # 1 MiB


async def test_2gib_upload(gateway_process: Any, catalog: Catalog) -> None:
    received = 0

    async def sink(c: UpstreamConn) -> None:
        nonlocal received
        head = await c.read_head()
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        while received < length:
            async with asyncio.timeout(WAIT):
                chunk = await c.reader.read(1 << 20)
            if not chunk:
                break
            received += len(chunk)
        c.send(response(200, b"got %d" % received))

    async with RawUpstream(sink) as up:
        catalog.put("big", host="127.0.0.1")
        gw = gateway_process()
        c = await Client.connect(gw.port)
        c.send(f"POST /up HTTP/1.1\r\nHost: {gw.host(up.port, 'big')}\r\nContent-Length: {2 * GIB}\r\n\r\n".encode())
        for _ in range(2 * 1024):
            c.writer.write(BLOCK)
            await c.writer.drain()
        r = await read_response(c.reader)
        assert r.status == 200 and r.body == b"got %d" % (2 * GIB)
        _, peak = rss_kib(gw.proc.pid)
        assert peak < 100 * 1024, f"gateway peak RSS {peak} KiB"
        await c.close()


async def test_2gib_download(gateway_process: Any, catalog: Catalog) -> None:
    async def source(c: UpstreamConn) -> None:
        await c.read_request()
        c.send(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (2 * GIB))
        for _ in range(2 * 1024):
            c.writer.write(BLOCK)
            await c.writer.drain()

    async with RawUpstream(source) as up:
        catalog.put("big", host="127.0.0.1")
        gw = gateway_process()
        c = await Client.connect(gw.port)
        c.send(f"GET /down HTTP/1.1\r\nHost: {gw.host(up.port, 'big')}\r\n\r\n".encode())
        async with asyncio.timeout(WAIT):
            head = await c.reader.readuntil(b"\r\n\r\n")
        assert b"Content-Length: %d" % (2 * GIB) in head
        got = 0
        async with asyncio.timeout(120):
            while got < 2 * GIB:
                data = await c.reader.read(1 << 20)
                assert data
                got += len(data)
        assert got == 2 * GIB
        _, peak = rss_kib(gw.proc.pid)
        assert peak < 100 * 1024, f"gateway peak RSS {peak} KiB"
        await c.close()


async def test_2gib_chunked_download(gateway_process: Any, catalog: Catalog) -> None:
    async def source(c: UpstreamConn) -> None:
        await c.read_request()
        c.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        chunk = b"%x\r\n" % len(BLOCK) + BLOCK + b"\r\n"
        for _ in range(2 * 1024):
            c.writer.write(chunk)
            await c.writer.drain()
        c.send(b"0\r\n\r\n")
        await c.writer.drain()

    async with RawUpstream(source) as up:
        catalog.put("big", host="127.0.0.1")
        gw = gateway_process()
        c = await Client.connect(gw.port)
        c.send(f"GET /down HTTP/1.1\r\nHost: {gw.host(up.port, 'big')}\r\n\r\n".encode())
        async with asyncio.timeout(WAIT):
            head = await c.reader.readuntil(b"\r\n\r\n")
        assert b"chunked" in head
        total = 0
        async with asyncio.timeout(120):
            while True:
                size = int((await c.reader.readuntil(b"\r\n"))[:-2].split(b";")[0], 16)
                if size == 0:
                    assert await c.reader.readexactly(2) == b"\r\n"
                    break
                left = size
                while left:
                    data = await c.reader.read(min(left, 1 << 20))
                    assert data
                    left -= len(data)
                total += size
                assert await c.reader.readexactly(2) == b"\r\n"
        assert total == 2 * GIB
        _, peak = rss_kib(gw.proc.pid)
        assert peak < 100 * 1024, f"gateway peak RSS {peak} KiB"
        await c.close()


async def test_slow_reader_does_not_grow_memory(gateway_process: Any, catalog: Catalog) -> None:
    written = 0

    async def source(c: UpstreamConn) -> None:
        nonlocal written
        await c.read_request()
        c.send(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % GIB)
        while written < GIB:
            c.writer.write(BLOCK)
            written += len(BLOCK)
            await c.writer.drain()

    async with RawUpstream(source) as up:
        catalog.put("big", host="127.0.0.1")
        gw = gateway_process()
        c = await Client.connect(gw.port)
        c.send(f"GET /down HTTP/1.1\r\nHost: {gw.host(up.port, 'big')}\r\n\r\n".encode())
        async with asyncio.timeout(WAIT):
            await c.reader.readuntil(b"\r\n\r\n")
        c.writer.transport.pause_reading()  # a client that stops reading
        # Backpressure means: the gateway stops reading from the sandbox, whose bytes pile up unread
        # in the gateway's socket while the sandbox's writes block. Wait for exactly that.
        await until_sandbox_blocked(up.port, lambda: written)
        rss, _ = rss_kib(gw.proc.pid)
        assert written < 128 * MIB, f"the sandbox could write {written // MIB} MiB into a stalled download"
        assert rss < 100 * 1024, f"gateway RSS {rss} KiB with a stalled reader"
        c.writer.transport.resume_reading()  # the reader comes back: everything arrives
        got = 0
        async with asyncio.timeout(120):
            while got < GIB:
                data = await c.reader.read(1 << 20)
                assert data
                got += len(data)
        assert got == GIB
        _, peak = rss_kib(gw.proc.pid)
        assert peak < 100 * 1024
        await c.close()
