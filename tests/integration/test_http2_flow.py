"""HTTP/2 flow control tied to backpressure: a gigabyte each way over one stream keeps the gateway's
memory flat, a sandbox that stops reading stops the stream's window (only that stream's), a client
that stops reading one stream holds back only that stream's sandbox."""

from __future__ import annotations

import asyncio
import hashlib
import socket
from typing import Any

import h2.events
import pytest
from h2.settings import SettingCodes
from hyperframe.frame import WindowUpdateFrame

from gateway.http import flow
from gateway.http.http2 import STREAM_WINDOW, UNREAD_LIMIT, H2Connection
from tests import needs
from tests.conftest import WAIT, Catalog
from tests.h2client import H2Client, error_codes
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


def patterned(n_blocks: int, block: int = 1 << 20) -> bytes:
    """A body whose every ``block`` bytes differ (block numbers): bytes lost, repeated or reordered show."""
    return b"".join((b"%07d|" % i) * (block // 8) for i in range(n_blocks))


def serves(bodies: dict[bytes, bytes]) -> Any:
    """A sandbox app answering ``GET /name`` with ``bodies[name]`` (Content-Length), in writes of 64 KiB."""

    async def handler(c: UpstreamConn) -> None:
        while True:
            head, _ = await c.read_request()
            body = bodies[head.split(b" ", 2)[1].lstrip(b"/")]
            c.send(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body))
            view = memoryview(body)
            for i in range(0, len(body), 1 << 16):
                c.writer.write(view[i : i + (1 << 16)])
                await c.writer.drain()

    return handler


async def test_curl_downloads_256_mib_over_one_stream(start_gateway: Any, catalog: Catalog, tmp_path: Any) -> None:
    """A real client (curl, nghttp2) giving back the connection's window as it reads: the download
    completes byte for byte, its WINDOW_UPDATEs never taken for a flood."""
    curl = needs.tool("curl", "apt-get install curl")
    body = patterned(256)
    async with RawUpstream(serves({b"big": body})) as up:
        catalog.put("curlbig", host="127.0.0.1")
        gw = await start_gateway()
        out = tmp_path / "big"
        proc = await asyncio.create_subprocess_exec(
            curl, "-sS", "--http2-prior-knowledge", "-o", str(out), "-w", "%{http_version} %{http_code}",
            "-H", f"Host: {gw.host(up.port, 'curlbig')}", f"http://127.0.0.1:{gw.port}/big",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        async with asyncio.timeout(240):
            stdout, stderr = await proc.communicate()
        assert proc.returncode == 0, stderr
        assert stdout == b"2 200"
        got = out.read_bytes()
        assert len(got) == len(body) and hashlib.sha256(got).digest() == hashlib.sha256(body).digest()


async def test_a_window_update_per_data_frame_is_never_a_flood(start_gateway: Any, catalog: Catalog) -> None:
    """The chattiest legitimate client: Go's, which gives back window for the connection and the
    stream every 4 KiB its application reads: 16,384 of each for a 64 MiB download, here in one
    write (it acknowledged late: its window was large enough; the stream has ended).
    Far past the control budget in a second, and each gives back DATA the gateway sent: the
    connection goes on."""
    body = patterned(64)
    big = {SettingCodes.INITIAL_WINDOW_SIZE: 1 << 27}  # (the connection's opened as far by H2Client)
    async with RawUpstream(serves({b"big": body, b"small": b"ok"})) as up:
        catalog.put("wupf", host="127.0.0.1")
        gw = await start_gateway()
        host = gw.host(up.port, "wupf")
        c = await H2Client.connect(gw.port, auto_ack=False, settings=big)
        sid = c.start(host, "/big")
        r = await c.response(sid, timeout=120)
        assert r.status == 200 and r.reset is None and bytes(r.body) == body
        sizes = [e.flow_controlled_length for e in c.events if isinstance(e, h2.events.DataReceived)]
        assert len(sizes) >= 4096
        # As Go's client: both kinds every 4 KiB the application reads (four per 16 KiB frame).
        updates = [WindowUpdateFrame(0, window_increment=4096).serialize()
                   + WindowUpdateFrame(sid, window_increment=4096).serialize() for _ in range(sum(sizes) // 4096)]  # fmt: skip
        assert len(updates) >= 4 * 4096
        c.send_raw(b"".join(updates))
        r = await c.request(host, "/small")
        assert r.status == 200 and bytes(r.body) == b"ok"
        assert not c.goaways and c.goaway is None and not c.lost.is_set()
        c.close()


async def test_a_slow_and_a_fast_stream_interleave(start_gateway: Any, catalog: Catalog) -> None:
    """Two downloads on one connection: one whose window the client opens a few odd-sized bytes at a
    time, one read as fast as it comes. The fast one is not held back by the slow one, which resumes
    each time its window opens; both arrive byte for byte (what is sent straight and what waited for
    the window, in order, never past a window: h2 on either side would fail the connection)."""
    slow_body, fast_body = patterned(32, 1 << 16), patterned(32)
    async with RawUpstream(serves({b"slow": slow_body, b"fast": fast_body})) as up:
        catalog.put("sf2", host="127.0.0.1")
        gw = await start_gateway()
        host = gw.host(up.port, "sf2")
        c = await H2Client.connect(gw.port)
        slow = c.start(host, "/slow")
        c.hold.add(slow)  # its window is opened below, by hand (the connection's as data comes)
        rs = c.responses[slow]
        async with asyncio.timeout(WAIT):
            await rs.head.wait()
        fast = c.start(host, "/fast")
        rf = c.responses[fast]
        given = 0
        async with asyncio.timeout(120):
            while not rf.ended.is_set():  # the slow stream gets 7,001 bytes of window per fast read
                rf.data.clear()
                await asyncio.wait([asyncio.ensure_future(rf.data.wait()), asyncio.ensure_future(rf.ended.wait())],
                                   return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
                if given < len(slow_body) // 2:  # (half of it at most, however many reads)
                    c.conn.increment_flow_control_window(7001, slow)
                    c.flush()
                    given += 7001
        assert rf.status == 200 and rf.reset is None and bytes(rf.body) == fast_body
        assert not rs.ended.is_set() and 0 < len(rs.body) < len(slow_body)  # still slow
        async with asyncio.timeout(120):
            while not rs.ended.is_set():  # then the rest of it, a window of 5,000 bytes at a time
                rs.data.clear()
                c.conn.increment_flow_control_window(5000, slow)
                c.flush()
                await asyncio.wait([asyncio.ensure_future(rs.data.wait()), asyncio.ensure_future(rs.ended.wait())],
                                   return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
        assert rs.status == 200 and rs.reset is None and bytes(rs.body) == slow_body
        assert not c.goaways and c.goaway is None
        c.close()


async def test_only_streams_waiting_for_the_connection_window_are_resumed(start_gateway: Any, catalog: Catalog) -> None:
    """The streams a connection WINDOW_UPDATE resumes are those the connection's window holds back,
    in the order they began to wait; a stream waiting for its own window is not among them."""
    body = patterned(2)  # 2 MiB each
    async with RawUpstream(serves({b"a": body, b"b": body, b"c": body})) as up:
        catalog.put("cw", host="127.0.0.1")
        gw = await start_gateway()
        host = gw.host(up.port, "cw")
        # Windows of 1 MiB (each stream's, the connection's), not given back.
        c = await H2Client.connect(gw.port, auto_ack=False, settings={SettingCodes.INITIAL_WINDOW_SIZE: 1 << 20})
        sids = [c.start(host, "/" + n) for n in "abc"]
        (conn,) = [x for x in gw.gateway.ctx.connections if isinstance(x, H2Connection)]
        async with asyncio.timeout(WAIT):  # all three wait for the connection's window, which was spent
            while len(conn.blocked) < 3 or sum(len(c.responses[s].body) for s in sids) < 1 << 20:
                await asyncio.sleep(0.01)
        assert sorted(s.sid for s in conn.blocked) == sids
        assert sum(len(c.responses[s].body) for s in sids) == 1 << 20
        c.conn.increment_flow_control_window(3 * len(body))
        for sid in sids:
            c.conn.increment_flow_control_window(len(body), sid)
        c.flush()
        for sid in sids:
            r = await c.response(sid)
            assert r.status == 200 and bytes(r.body) == body
        assert not conn.blocked
        # Now the stream's own window is the one shut (65,535), the connection's wide open.
        c.conn.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: 65535})
        c.conn.increment_flow_control_window(1 << 30)
        c.flush()
        sid = c.start(host, "/a")
        async with asyncio.timeout(WAIT):
            while len(c.responses[sid].body) < 65535:
                c.changed.clear()
                await c.changed.wait()
        assert conn.streams[sid].out and not conn.blocked  # waits for its own window only
        c.conn.increment_flow_control_window(len(body), sid)
        c.flush()
        r = await c.response(sid)
        assert bytes(r.body) == body
        c.close()


async def test_data_a_client_asked_for_is_not_counted_as_unread(start_gateway: Any, catalog: Catalog) -> None:
    """A client that reads, more slowly than the gateway writes, and gives back the connection's
    window in large steps (httpx: 8 MiB at a time) makes the gateway send, in the read of that one
    WINDOW_UPDATE, what its streams held for the window: megabytes, while its transport is full.
    That is DATA the client asked for, held in memory already (the streams' buffers, which the
    sandboxes stop filling while the transport is full), not an answer that grows with what the
    client sends: it is not counted against the limit for a client that sends without reading
    (UNREAD_LIMIT), and the connection is not reset. Here, step by step: every stream holds
    STREAM_BUFFER for the connection's window, the client stops reading and gives back window until
    the gateway's transport is full (the sandboxes refill the streams meanwhile), then gives back
    4 MiB at once; the downloads all complete byte for byte."""
    n = 16
    body = patterned(8)
    async with RawUpstream(serves({b"big": body})) as up:
        catalog.put("slowread", host="127.0.0.1")
        gw = await start_gateway()
        host = gw.host(up.port, "slowread")
        loop = asyncio.get_running_loop()
        # Streams' windows wide open, the connection's 65,535 bytes and given back only below.
        c = H2Client(auto_ack=False, settings={SettingCodes.INITIAL_WINDOW_SIZE: 2**31 - 1})
        c.window = 0
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)  # (before connect: little in the kernel)
        sock.setblocking(False)
        async with asyncio.timeout(WAIT):
            await loop.sock_connect(sock, ("127.0.0.1", gw.port))
            await loop.create_connection(lambda: c, sock=sock)
        sids = [c.start(host, "/big") for _ in range(n)]
        (conn,) = [x for x in gw.gateway.ctx.connections if isinstance(x, H2Connection)]

        async def until(what: Any, why: str) -> None:
            async with asyncio.timeout(WAIT * 3):
                while not what():
                    assert not c.lost.is_set(), f"connection lost while waiting until {why}"
                    await asyncio.sleep(0.01)

        def all_held() -> bool:  # every stream waits for the connection's window with STREAM_BUFFER
            streams = [conn.streams.get(sid) for sid in sids]
            return all(s is not None and s.holding for s in streams) and len(conn.blocked) == n

        await until(all_held, "every stream holds STREAM_BUFFER")
        c.transport.pause_reading()  # the client reads no more for now
        given = 0
        while not conn.write_paused:  # window back, a MiB at a time, until the gateway's transport is full
            assert given < 256 << 20
            c.conn.increment_flow_control_window(1 << 20)
            c.flush()
            given += 1 << 20
            await until(lambda g=given: conn.increments >= g, "the gateway has the window")
            await until(lambda: conn.write_paused or all_held(), "the streams hold again")
        held = sum(len(conn.streams[sid].out) for sid in sids)
        assert held >= 2 * UNREAD_LIMIT, held  # (the sandboxes are not read while the transport is full)
        c.conn.increment_flow_control_window(4 << 20)  # at once, as httpx does
        c.flush()
        await until(lambda: conn.increments >= given + (4 << 20), "the gateway has the window")
        c.transport.resume_reading()
        c.conn.increment_flow_control_window(n * len(body))
        c.flush()
        for sid in sids:
            await c.response(sid, timeout=WAIT * 3)
        assert not c.lost.is_set() and c.goaway is None, f"the connection ended (GOAWAY {error_codes(c)})"
        for sid in sids:
            r = c.responses[sid]
            assert r.status == 200 and r.reset is None and bytes(r.body) == body
        c.close()


async def test_httpx_uploads_beside_downloads_on_one_connection(gateway_process: Any, catalog: Catalog) -> None:
    """httpx (httpcore's HTTP/2, one connection, prior knowledge) uploading on 8 streams while it
    downloads on 40: everything arrives. httpx reads as its tasks get to it, more slowly than the
    gateway writes, and gives the connection's window back 8 MiB at a time; the gateway took the
    DATA that released for answers the client did not read and reset the connection (ReadError
    on every stream, before _unread measured what is held for the client: http2._held). The uploads have no content-length (chunked to the sandbox, which answers
    after the last chunk): an answer that came before httpx's END_STREAM would make httpcore
    discard it (docs/operations.md, "HTTP/2 clients"), which is not what is tested here."""
    httpx = pytest.importorskip("httpx")
    up_size, down_size = 4 << 20, 8 << 20

    async def sink(c: UpstreamConn) -> None:
        while True:
            head, body = await c.read_request()
            assert b"transfer-encoding: chunked" in head.lower()
            n = pos = 0
            while size := int(body[pos : body.index(b"\r\n", pos)], 16):  # the chunks' sizes, summed
                n += size
                pos = body.index(b"\r\n", pos) + 2 + size + 2
            c.send(response(200, b"got %d" % n))

    down = b"d" * down_size
    async with RawUpstream(sink) as ups, RawUpstream(serves({b"d": down})) as downs:
        catalog.put("hxup", host="127.0.0.1")
        catalog.put("hxdown", host="127.0.0.1")
        gw = gateway_process()
        base = f"http://127.0.0.1:{gw.port}"
        limits = httpx.Limits(max_connections=1)
        async with httpx.AsyncClient(http1=False, http2=True, timeout=WAIT * 6, limits=limits) as client:

            async def chunks() -> Any:
                for _ in range(up_size >> 16):
                    yield b"u" * (1 << 16)

            async def upload() -> None:
                r = await client.post(base + "/up", content=chunks(), headers={"host": gw.host(ups.port, "hxup")})
                assert r.status_code == 200 and r.content == b"got %d" % up_size

            async def download() -> None:
                n = 0
                async with client.stream("GET", base + "/d", headers={"host": gw.host(downs.port, "hxdown")}) as r:
                    assert r.status_code == 200
                    async for chunk in r.aiter_raw():
                        n += len(chunk)
                assert n == down_size

            r = await client.get(base + "/d", headers={"host": gw.host(downs.port, "hxdown")})
            assert r.http_version == "HTTP/2" and len(r.content) == down_size
            async with asyncio.timeout(WAIT * 12):
                await asyncio.gather(*[upload() for _ in range(8)], *[download() for _ in range(40)])
            pool = client._transport._pool  # type: ignore[attr-defined]
            assert len(pool.connections) == 1  # all on one connection
