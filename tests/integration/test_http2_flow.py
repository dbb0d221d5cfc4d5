"""HTTP/2 flow control tied to backpressure: a gigabyte each way over one stream keeps the gateway's
memory flat, a sandbox that stops reading stops the stream's window (only that stream's), a client
that stops reading one stream holds back only that stream's sandbox."""

from __future__ import annotations

import asyncio
from typing import Any

from h2.settings import SettingCodes

from gateway.http import flow
from gateway.http.http2 import STREAM_WINDOW, H2Connection
from tests.conftest import WAIT, Catalog
from tests.h2client import H2Client
from tests.helpers import RawUpstream, UpstreamConn, echo_handler, response, rss_kib, until_sandbox_blocked

GIB = 1 << 30
BLOCK = b"x" * (1 << 20)
#: A client that takes big frames and opens big windows (fewer frames for the test's own Python).
FAST = {SettingCodes.MAX_FRAME_SIZE: 1 << 20, SettingCodes.INITIAL_WINDOW_SIZE: 1 << 24}


async def test_1gib_download_over_one_stream(gateway_process: Any, catalog: Catalog) -> None:
    async def source(c: UpstreamConn) -> None:
        await c.read_request()
        c.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        chunk = b"%x\r\n" % len(BLOCK) + BLOCK + b"\r\n"
        for _ in range(1024):
            c.writer.write(chunk)
            await c.writer.drain()
        c.send(b"0\r\n\r\n")

    async with RawUpstream(source) as up:
        catalog.put("big2", host="127.0.0.1")
        gw = gateway_process()
        before = rss_kib(gw.proc.pid)[0]
        c = await H2Client.connect(gw.port, settings=FAST)
        sid = c.start(gw.host(up.port, "big2"), "/down")
        r = c.responses[sid]
        got = 0
        async with asyncio.timeout(240):
            while not r.ended.is_set():
                r.data.clear()
                await asyncio.wait([asyncio.ensure_future(r.data.wait()), asyncio.ensure_future(r.ended.wait())],
                                   return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
                got += len(r.body)
                r.body.clear()  # the test client keeps nothing either
        got += len(r.body)
        assert r.status == 200 and r.reset is None and got == GIB
        rss, peak = rss_kib(gw.proc.pid)
        print(f"1 GiB down over one stream: gateway RSS {before} KiB at start, {rss} KiB after, peak {peak} KiB")
        assert peak < 100 * 1024, f"gateway peak RSS {peak} KiB"
        c.close()


async def test_1gib_upload_over_one_stream(gateway_process: Any, catalog: Catalog) -> None:
    received = 0

    async def sink(c: UpstreamConn) -> None:
        nonlocal received
        await c.read_head()
        while received < GIB:
            async with asyncio.timeout(WAIT):
                chunk = await c.reader.read(1 << 20)
            if not chunk:
                break
            received += len(chunk)
        c.send(response(200, b"got %d" % received))

    async with RawUpstream(sink) as up:
        catalog.put("big3", host="127.0.0.1")
        gw = gateway_process()
        before = rss_kib(gw.proc.pid)[0]
        c = await H2Client.connect(gw.port, settings=FAST)
        sid = c.start(gw.host(up.port, "big3"), "/up", method="POST", headers=[("content-length", str(GIB))], end=False)
        for _ in range(1024):
            await c.send_all(sid, BLOCK, end=False)
        c.conn.end_stream(sid)
        c.flush()
        r = await c.response(sid, timeout=60)
        assert r.status == 200 and bytes(r.body) == b"got %d" % GIB
        rss, peak = rss_kib(gw.proc.pid)
        print(f"1 GiB up over one stream: gateway RSS {before} KiB at start, {rss} KiB after, peak {peak} KiB")
        assert peak < 100 * 1024, f"gateway peak RSS {peak} KiB"
        c.close()


async def test_a_sandbox_that_stops_reading_stops_only_its_streams_window(start_gateway: Any, catalog: Catalog) -> None:
    """The gateway acknowledges an upload's DATA only as the sandbox connection drains: when the
    sandbox stops reading, the stream's window stays shut (the gateway holds a bounded amount),
    while another stream on the same connection is served."""
    stop = asyncio.Event()

    async def stalled(c: UpstreamConn) -> None:
        await c.read_head()
        await stop.wait()  # never reads the body

    async with RawUpstream(stalled) as slow, RawUpstream(echo_handler) as fast:
        catalog.put("stall", host="127.0.0.1")
        catalog.put("quick", host="127.0.0.1")
        gw = await start_gateway()
        c = await H2Client.connect(gw.port)
        sid = c.start(gw.host(slow.port, "stall"), "/up", method="POST", end=False)
        sent = 0
        async with asyncio.timeout(WAIT * 2):
            while True:  # send while the gateway gives window; it must stop giving
                window = c.conn.local_flow_control_window(sid)
                if window > 0:
                    n = min(window, c.conn.max_outbound_frame_size)
                    c.conn.send_data(sid, b"y" * n)
                    c.flush()
                    sent += n
                    continue
                c.changed.clear()
                try:
                    async with asyncio.timeout(1.0):  # a window update would come within this
                        await c.changed.wait()
                except TimeoutError:
                    break
        assert c.conn.local_flow_control_window(sid) == 0
        # What the gateway holds for the stream: bounded (a write buffer and a window), wherever the
        # rest of what was sent sits (kernel buffers, the sandbox's own reader).
        (conn,) = [x for x in gw.gateway.ctx.connections if isinstance(x, H2Connection)]
        x = conn.streams[sid].x
        assert x is not None and x.up is not None
        held = x.up.transport.get_write_buffer_size() + x.up_buf_size
        assert held <= flow.WRITE_HIGH + 2 * STREAM_WINDOW, held
        r = await c.request(gw.host(fast.port, "quick"), "/other")
        assert r.status == 200
        stop.set()
        c.close()


async def test_a_client_that_stops_reading_one_stream_blocks_only_that_sandbox(
    start_gateway: Any, catalog: Catalog
) -> None:
    """A stream whose window the client never reopens: its sandbox's writes stop (backpressure reaches
    it), and the other streams of the connection, a large download among them, go on."""
    written = 0

    async def endless(c: UpstreamConn) -> None:
        nonlocal written
        await c.read_request()
        c.send(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % GIB)
        while True:
            c.writer.write(BLOCK)
            written += len(BLOCK)
            await c.writer.drain()

    async def ten_mib(c: UpstreamConn) -> None:
        while True:
            await c.read_request()
            c.send(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (10 << 20))
            for _ in range(10):
                c.writer.write(BLOCK)
                await c.writer.drain()

    async with RawUpstream(endless) as stuck, RawUpstream(ten_mib) as other:
        catalog.put("stuck", host="127.0.0.1")
        catalog.put("other", host="127.0.0.1")
        gw = await start_gateway()
        c = await H2Client.connect(gw.port)
        sid = c.start(gw.host(stuck.port, "stuck"), "/forever")
        c.hold.add(sid)  # its window is never reopened (the connection's is)
        await until_sandbox_blocked(stuck.port, lambda: written)
        for _ in range(3):
            r2 = await c.request(gw.host(other.port, "other"), "/ten")
            assert r2.status == 200 and r2.reset is None and len(r2.body) == 10 << 20
        assert c.responses[sid].status == 200 and not c.responses[sid].ended.is_set()
        assert written < 64 << 20  # the stuck sandbox was held back, not read into memory
        c.close()
