"""HTTP/2 defences, each against the gateway as a client would attack it: too many streams, big and
compressed header lists, rapid reset (CVE-2023-44487), CONTINUATION floods, SETTINGS and PING floods,
floods of frames that ask for nothing (CVE-2019-9513, CVE-2019-9518), a client that sends without
reading, zero-window stalls, idle connections; and a sandbox's failure resets only its own stream."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from typing import Any

import h2.errors
import pytest
from h2.settings import SettingCodes
from hpack import Encoder
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    HeadersFrame,
    PingFrame,
    PriorityFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

from gateway.http.http2 import PREFACE, H2Connection
from tests.conftest import WAIT, Catalog
from tests.h2client import H2Client, error_codes
from tests.helpers import RawUpstream, UpstreamConn, echo_handler, response

CALM = h2.errors.ErrorCodes.ENHANCE_YOUR_CALM


def request_block(authority: str, path: str = "/", extra: list[tuple[bytes, bytes]] | None = None) -> bytes:
    e = Encoder()
    return e.encode([(b":method", b"GET"), (b":scheme", b"http"), (b":authority", authority.encode()),
                     (b":path", path.encode()), *(extra or [])])  # fmt: skip


async def still_serves(port: int, authority: str) -> None:
    """Another connection is not disturbed."""
    c = await H2Client.connect(port)
    r = await c.request(authority, "/still")
    assert r.status == 200
    c.close()


def answers_when(release: asyncio.Event) -> Any:
    """A sandbox that reads a request, and answers it once ``release`` is set."""

    async def slow(c: UpstreamConn) -> None:
        await c.read_request()
        await release.wait()
        c.send(response(200, b"late"))

    return slow


async def test_streams_past_the_limit_are_refused(start_gateway: Any, catalog: Catalog) -> None:
    """At most http2_max_concurrent_streams streams (default 100, as E2B): one more is refused
    (REFUSED_STREAM, which a client may retry) and the connection goes on."""
    release = asyncio.Event()
    slow = answers_when(release)

    async with RawUpstream(slow) as up:
        catalog.put("lim", host="127.0.0.1")
        gw = await start_gateway()
        host = gw.host(up.port, "lim")
        c = await H2Client.connect(gw.port)
        async with asyncio.timeout(WAIT):
            while c.conn.remote_settings.max_concurrent_streams != 100:
                c.changed.clear()
                await c.changed.wait()
        c.conn.remote_settings[SettingCodes.MAX_CONCURRENT_STREAMS] = 1000  # pretend not to know the limit
        c.conn.remote_settings.acknowledge()
        sids = [c.start(host, f"/s{i}") for i in range(101)]
        extra = c.responses[sids[-1]]
        async with asyncio.timeout(WAIT):
            await extra.ended.wait()
        assert extra.reset == h2.errors.ErrorCodes.REFUSED_STREAM
        async with asyncio.timeout(WAIT):
            while len(up.conns) < 100:
                await asyncio.sleep(0.01)
        release.set()
        for sid in sids[:100]:
            r = await c.response(sid)
            assert r.status == 200 and bytes(r.body) == b"late"
        assert len(up.conns) == 100
        c.close()


async def test_a_client_that_keeps_opening_streams_past_the_limit_is_sent_away(
    start_gateway: Any, catalog: Catalog
) -> None:
    """Each stream past the limit is refused, and costs the gateway a header block for nothing: a
    client that goes on (500 more in one write while its 100 wait) gets GOAWAY ENHANCE_YOUR_CALM,
    as for a rapid reset; other connections are served."""
    release = asyncio.Event()
    slow = answers_when(release)

    async with RawUpstream(slow) as up:
        catalog.put("lim2", host="127.0.0.1")
        gw = await start_gateway()
        host = gw.host(up.port, "lim2")
        c = await H2Client.connect(gw.port)
        sids = [c.start(host, f"/s{i}") for i in range(100)]
        async with asyncio.timeout(WAIT):
            while len(up.conns) < 100:
                await asyncio.sleep(0.01)
        block = request_block(host)
        c.send_raw(b"".join(HeadersFrame(sids[-1] + 2 * i, data=block, flags=["END_HEADERS", "END_STREAM"]).serialize()
                            for i in range(1, 501)))  # fmt: skip
        assert await c.closed()
        assert error_codes(c) == [CALM]
        release.set()
        await still_serves(gw.port, host)


async def test_header_lists_are_bounded(start_gateway: Any, catalog: Catalog) -> None:
    """Past max_request_head_size: 431 on that stream. Past twice that once decoded (an HPACK
    bomb: one 4 kB table entry referenced 100 times in 100 bytes): GOAWAY ENHANCE_YOUR_CALM."""
    async with RawUpstream(echo_handler) as up:
        catalog.put("hb", host="127.0.0.1")
        gw = await start_gateway()
        host = gw.host(up.port, "hb")
        c = await H2Client.connect(gw.port)
        r = await c.request(host, "/", headers=[("x-big", "v" * 70_000)])
        assert (r.status, r.header(b"x-gateway-reason")) == (431, b"request_head_too_large")
        r = await c.request(host, "/ok")
        assert r.status == 200
        c.close()
        c = await H2Client.connect(gw.port)
        e = Encoder()
        block = e.encode([(b":method", b"GET"), (b":scheme", b"http"), (b":authority", host.encode()),
                          (b":path", b"/"), (b"x-bomb", b"b" * 4000)])  # fmt: skip
        block += bytes([0x80 | 62]) * 100  # the entry just added, 100 times more
        assert len(block) < 5000
        c.send_raw(HeadersFrame(1, data=block, flags=["END_HEADERS", "END_STREAM"]).serialize())
        assert await c.closed()
        assert error_codes(c) == [CALM]
        assert b"x-bomb" not in up.received
        await still_serves(gw.port, host)


async def test_rapid_reset_costs_bounded_work_and_ends_in_enhance_your_calm(
    start_gateway: Any, catalog: Catalog
) -> None:
    """CVE-2023-44487: thousands of HEADERS + RST_STREAM pairs. Those cancelled in the read that
    opened them start nothing; more than twice the stream limit in a second end the connection with
    GOAWAY ENHANCE_YOUR_CALM. The sandbox sees a bounded number of requests, other clients nothing."""
    async with RawUpstream(echo_handler) as up:
        catalog.put("rr", host="127.0.0.1")
        gw = await start_gateway()
        host = gw.host(up.port, "rr")
        c = await H2Client.connect(gw.port)
        for _ in range(1000):  # all in one write
            sid = c.start(host, "/flood")
            c.conn.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
        c.flush()
        assert await c.closed()
        assert CALM in error_codes(c)
        assert up.received.count(b"/flood") == 0
        # The same, with each pair in its own write: the streams start before their reset arrives.
        c = await H2Client.connect(gw.port)
        sent = 0
        async with asyncio.timeout(WAIT * 2):
            while not c.lost.is_set() and sent < 5000:
                sid = c.start(host, "/flood2")
                await asyncio.sleep(0)  # its own write and read, not a synchronisation
                if c.lost.is_set() or c.goaway is not None:
                    break
                c.conn.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
                c.flush()
                sent += 1
            await c.closed()
        assert CALM in error_codes(c)
        assert sent < 5000
        assert up.received.count(b"/flood2") <= 2 * 100 + 100  # the budget, and what was in flight
        await still_serves(gw.port, host)


async def test_continuation_flood_ends_the_connection(start_gateway: Any, catalog: Catalog) -> None:
    async with RawUpstream(echo_handler) as up:
        catalog.put("cf", host="127.0.0.1")
        gw = await start_gateway()
        host = gw.host(up.port, "cf")
        c = await H2Client.connect(gw.port)
        block = request_block(host)
        frames = [HeadersFrame(1, data=block[:5]).serialize()]
        frames += [ContinuationFrame(1, data=b"").serialize() for _ in range(10_000)]  # never END_HEADERS
        c.send_raw(b"".join(frames))
        assert await c.closed()
        assert error_codes(c) == [h2.errors.ErrorCodes.PROTOCOL_ERROR]
        big = await H2Client.connect(gw.port)  # large CONTINUATION frames: bounded the same way
        big.send_raw(HeadersFrame(1, data=block[:5]).serialize()
                     + b"".join(ContinuationFrame(1, data=b"a" * 16_000).serialize() for _ in range(100)))  # fmt: skip
        assert await big.closed()
        await still_serves(gw.port, host)


async def test_settings_and_ping_floods_end_the_connection(start_gateway: Any, catalog: Catalog) -> None:
    async with RawUpstream(echo_handler) as up:
        catalog.put("sf", host="127.0.0.1")
        gw = await start_gateway()
        host = gw.host(up.port, "sf")
        for flood in (
            b"".join(SettingsFrame(0, settings={SettingCodes.ENABLE_PUSH: 0}).serialize() for _ in range(5000)),
            b"".join(PingFrame(0, opaque_data=b"12345678").serialize() for _ in range(5000)),
        ):
            c = await H2Client.connect(gw.port)
            c.send_raw(flood)
            assert await c.closed()
            assert error_codes(c) == [CALM]
        await still_serves(gw.port, host)


async def test_connection_window_update_flood_ends_in_enhance_your_calm(start_gateway: Any, catalog: Catalog) -> None:
    """WINDOW_UPDATE frames for the connection (stream 0) that give back no DATA the gateway sent
    (1 byte each, thousands in one write) count as control frames: GOAWAY ENHANCE_YOUR_CALM, as a
    PING flood. The same after a response: the DATA frames it took buy that many updates, no more."""
    async with RawUpstream(echo_handler) as up:
        catalog.put("wuf", host="127.0.0.1")
        gw = await start_gateway()
        host = gw.host(up.port, "wuf")
        flood = b"".join(WindowUpdateFrame(0, window_increment=1).serialize() for _ in range(5000))
        c = await H2Client.connect(gw.port)
        c.send_raw(flood)
        assert await c.closed()
        assert error_codes(c) == [CALM]
        c = await H2Client.connect(gw.port)
        r = await c.request(host, "/first")
        assert r.status == 200 and r.reset is None  # (its DATA frame, acknowledged by h2's client or not)
        c.send_raw(flood)
        assert await c.closed()
        assert error_codes(c) == [CALM]
        await still_serves(gw.port, host)


def _unknown_frame(sid: int) -> bytes:
    return b"\x00\x00\x00\x20\x00" + sid.to_bytes(4, "big")  # type 0x20: no extension the gateway knows


# Frames that ask for nothing, 5,000 in one write; ``sid``: an open request stream (a POST whose
# body has not ended, to a sandbox that has not answered), ``gone``: a stream that ended, ``reset``:
# one the gateway reset (a request with a Connection field).
UNASKED = {
    "priority": lambda sid, gone, reset: PriorityFrame(sid + 2, depends_on=0, stream_weight=16).serialize(),
    "empty-data": lambda sid, gone, reset: DataFrame(sid, data=b"").serialize(),
    "stream-window-update": lambda sid, gone, reset: WindowUpdateFrame(sid, window_increment=1).serialize(),
    "unknown-frame-type": lambda sid, gone, reset: _unknown_frame(sid),
    "rst-stream-of-an-ended-stream": lambda sid, gone, reset: RstStreamFrame(gone, error_code=0).serialize(),
    "data-of-a-reset-stream": lambda sid, gone, reset: DataFrame(reset, data=b"x").serialize(),
    "unsolicited-ping-ack": lambda sid, gone, reset: PingFrame(0, flags=["ACK"], opaque_data=b"12345678").serialize(),
    "unsolicited-settings-ack": lambda sid, gone, reset: SettingsFrame(0, flags=["ACK"]).serialize(),
}


@pytest.mark.parametrize("kind", sorted(UNASKED))
async def test_a_flood_of_frames_that_ask_for_nothing_ends_in_enhance_your_calm(
    kind: str, start_gateway: Any, catalog: Catalog
) -> None:
    """Frames h2 must parse and process that ask the gateway for nothing: PRIORITY (CVE-2019-9513),
    empty DATA (CVE-2019-9518), a stream's WINDOW_UPDATE for no DATA sent, an extension's frame,
    frames for streams that are gone. Each alone is allowed; thousands a second are a flood that
    costs the worker without a request: GOAWAY ENHANCE_YOUR_CALM, as for a PING flood, and other
    connections are served."""
    release = asyncio.Event()

    async def holds(c: UpstreamConn) -> None:
        head, _ = await c.read_request()
        if b"/hold" in head:
            await release.wait()
        else:
            c.send(response(200, b"ok"))

    async with RawUpstream(holds) as up:
        catalog.put("unasked", host="127.0.0.1")
        gw = await start_gateway()
        host = gw.host(up.port, "unasked")
        c = await H2Client.connect(gw.port)
        gone = c.start(host, "/done")
        assert (await c.response(gone)).status == 200
        reset = c.start(host, "/bad", method="POST", headers=[("connection", "x")], end=False)
        assert (await c.response(reset)).reset == h2.errors.ErrorCodes.PROTOCOL_ERROR
        sid = c.start(host, "/hold", method="POST", end=False)
        frame = UNASKED[kind](sid, gone, reset)
        c.send_raw(frame * 5000)
        assert await c.closed()
        assert error_codes(c) == [CALM]
        release.set()
        await still_serves(gw.port, host)


async def test_data_on_its_way_when_the_gateway_ends_a_stream_is_never_a_flood(
    start_gateway: Any, catalog: Catalog
) -> None:
    """A balancer's connection carries uploads an app refuses at once (401 before the body): the
    gateway ends each stream, and DATA the client had sent meanwhile arrives for a stream that is
    gone (RFC 9113 §5.1: to be expected). 1,500 such streams, and a frame on its way for each, all
    in one read: the connection goes on."""

    async def refuses(c: UpstreamConn) -> None:
        while True:
            await c.read_head()
            c.send(response(401, b"no"))

    async with RawUpstream(refuses) as up:
        catalog.put("early", host="127.0.0.1")
        gw = await start_gateway()
        host = gw.host(up.port, "early")
        c = await H2Client.connect(gw.port)
        ended: list[int] = []
        for _ in range(75):
            sids = [c.start(host, "/up", method="POST", headers=[("content-length", "5000")], end=False)
                    for _ in range(20)]  # fmt: skip
            for sid in sids:
                r = await c.response(sid)
                assert r.status == 401
            ended += sids
        # What was on its way for all of them, arriving together (a balancer's burst):
        c.send_raw(b"".join(DataFrame(sid, data=b"d" * 1000).serialize() for sid in ended))
        r = await c.request(host, "/after")
        assert r.status == 401 and r.reset is None
        assert not c.goaways and c.goaway is None and not c.lost.is_set()
        c.close()


async def test_window_updates_for_data_received_are_never_a_flood(start_gateway: Any, catalog: Catalog) -> None:
    """What browsers do: give back window for each stream's DATA after the stream ended, and the
    connection's. 1,500 streams' worth in one write, past the control budget, and each gives back
    what the gateway sent: the connection goes on."""
    async with RawUpstream(echo_handler) as up:
        catalog.put("late", host="127.0.0.1")
        gw = await start_gateway()
        host = gw.host(up.port, "late")
        c = await H2Client.connect(gw.port)
        ended: list[tuple[int, int]] = []
        for _ in range(75):
            sids = [c.start(host, "/n") for _ in range(20)]
            for sid in sids:
                r = await c.response(sid)
                assert r.status == 200 and r.reset is None
                ended.append((sid, len(r.body)))
        c.send_raw(b"".join(WindowUpdateFrame(sid, window_increment=n).serialize()
                            + WindowUpdateFrame(0, window_increment=n).serialize() for sid, n in ended))  # fmt: skip
        r = await c.request(host, "/after")
        assert r.status == 200 and r.reset is None
        assert not c.goaways and c.goaway is None and not c.lost.is_set()
        c.close()


async def test_a_client_that_sends_without_reading_is_reset(start_gateway: Any, catalog: Catalog) -> None:
    """Each small request the gateway answers itself (here: a host it does not serve, asked for
    as a page) is a hundred times its size in answer. A client that sends them and reads nothing,
    with windows that let everything be sent, would fill the worker's memory at that rate: once
    the client's transport is full, what the gateway answers it is counted, and past 1 MiB the
    connection is reset (requests ~40 bytes each, pages ~4 KB: 30,000 of them would be 120 MB).
    The client is still read meanwhile (some clients read only once their writer progresses);
    another connection is served."""
    gw = await start_gateway()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", gw.port))
    sock.setblocking(False)
    e = Encoder()
    n = 30_000
    head = [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"x.example.org"), (b":path", b"/"),
            (b"accept", b"text/html"), (b"sec-fetch-mode", b"navigate")]  # fmt: skip
    first = e.encode(head)
    again = e.encode(head)  # (the same fields, indexed: the same bytes for every request after the first)
    out = [PREFACE, SettingsFrame(0, settings={SettingCodes.INITIAL_WINDOW_SIZE: 2**31 - 1}).serialize(),
           WindowUpdateFrame(0, window_increment=2**31 - 1 - 65535).serialize(),
           HeadersFrame(1, data=first, flags=["END_HEADERS", "END_STREAM"]).serialize()]  # fmt: skip
    frame = HeadersFrame(3, data=again, flags=["END_HEADERS", "END_STREAM"]).serialize()
    out += [frame[:5] + (2 * i + 1).to_bytes(4, "big") + frame[9:] for i in range(1, n)]
    loop = asyncio.get_running_loop()
    sending = asyncio.ensure_future(loop.sock_sendall(sock, b"".join(out)))
    try:
        async with asyncio.timeout(WAIT * 3):  # until the gateway has let the connection go
            while not [x for x in gw.gateway.ctx.connections if isinstance(x, H2Connection)]:
                await asyncio.sleep(0.01)
            while [x for x in gw.gateway.ctx.connections if isinstance(x, H2Connection)]:
                await asyncio.sleep(0.01)
        answered = 0
        with contextlib.suppress(ConnectionResetError, BrokenPipeError):
            async with asyncio.timeout(WAIT):
                while data := await loop.sock_recv(sock, 1 << 20):
                    answered += data.count(b"<!doctype html>")  # (a page split over two reads: missed)
        assert 0 < answered < n // 2
    finally:
        sending.cancel()
        sock.close()
    async with RawUpstream(echo_handler) as up:
        catalog.put("unread", host="127.0.0.1")
        await still_serves(gw.port, gw.host(up.port, "unread"))


async def test_a_clients_header_table_size_does_not_size_the_gateways_memory(
    start_gateway: Any, catalog: Catalog
) -> None:
    """SETTINGS_HEADER_TABLE_SIZE is what the client's HPACK decoder can hold; the gateway's encoder
    indexes response fields in a table of that size, which is the gateway's memory. A client that
    allows 1 GiB and asks for responses whose fields never repeat (its own sandbox's, here 300 of
    8 KB) must not make the gateway keep them: its table stays at 4,096 bytes, and the client
    decodes every response (the encoder said which size it uses, RFC 7541 §6.3)."""
    n = 0

    async def unique(c: UpstreamConn) -> None:
        nonlocal n
        while True:
            await c.read_request()
            n += 1
            value = b"%06d" % n * 1400
            c.send(b"HTTP/1.1 200 OK\r\nX-Unique: " + value + b"\r\nContent-Length: 2\r\n\r\nok")

    async with RawUpstream(unique) as up:
        catalog.put("hts", host="127.0.0.1")
        gw = await start_gateway()
        host = gw.host(up.port, "hts")
        c = await H2Client.connect(gw.port, settings={SettingCodes.HEADER_TABLE_SIZE: 1 << 30})
        c.conn.decoder.max_allowed_table_size = 1 << 30  # (h2 sets it on a change acknowledged, not at the start)
        for _ in range(30):
            sids = [c.start(host, "/u") for _ in range(10)]
            for sid in sids:
                r = await c.response(sid)
                assert r.status == 200 and r.reset is None and bytes(r.body) == b"ok"
                value = r.header(b"x-unique")
                assert value is not None and len(value) == 8400 and value == value[:6] * 1400
        assert len({r.header(b"x-unique") for r in c.responses.values()}) == 300
        (conn,) = [x for x in gw.gateway.ctx.connections if isinstance(x, H2Connection)]
        table = conn.h2.encoder.e.header_table
        assert table.maxsize == 4096 and table._current_size <= 4096
        assert c.goaway is None
        c.close()


async def test_zero_window_stall_ends_the_stream_not_the_connection(start_gateway: Any, catalog: Catalog) -> None:
    """A client that lets a response fill its window and never reopens it: after min_body_rate's
    window the stream is reset and its sandbox connection closed; the connection serves on."""
    closed = asyncio.Event()

    async def big(c: UpstreamConn) -> None:
        await c.read_request()
        c.send(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (8 << 20))
        try:
            for _ in range(8):
                c.writer.write(b"z" * (1 << 20))
                await c.writer.drain()
            await c.reader.read(1)
        finally:
            closed.set()

    async with RawUpstream(big) as up, RawUpstream(echo_handler) as small:
        catalog.put("zw", host="127.0.0.1")
        catalog.put("sm", host="127.0.0.1")
        gw = await start_gateway(min_body_rate=1024, body_rate_window=1.0)
        c = await H2Client.connect(gw.port, settings={SettingCodes.INITIAL_WINDOW_SIZE: 0})
        c.conn.increment_flow_control_window(1 << 20)  # the connection's window is open, the streams' are not
        sid = c.start(gw.host(up.port, "zw"), "/big")
        r = c.responses[sid]
        async with asyncio.timeout(WAIT):
            await r.head.wait()
        assert r.status == 200
        r = await c.response(sid, timeout=WAIT)
        assert r.reset == h2.errors.ErrorCodes.CANCEL and len(r.body) == 0
        async with asyncio.timeout(WAIT):
            await closed.wait()
        sid2 = c.start(gw.host(small.port, "sm"), "/after")
        c.conn.increment_flow_control_window(1 << 16, sid2)
        c.flush()
        r2 = await c.response(sid2)
        assert r2.status == 200
        c.close()


async def test_idle_connections_close(start_gateway: Any, catalog: Catalog) -> None:
    """After client_idle_timeout without a stream (GOAWAY NO_ERROR, then close); a connection that
    never opens one closes after request_head_timeout."""
    async with RawUpstream(echo_handler) as up:
        catalog.put("idle", host="127.0.0.1")
        gw = await start_gateway(client_idle_timeout=1.0, request_head_timeout=1.0)
        c = await H2Client.connect(gw.port)
        r = await c.request(gw.host(up.port, "idle"), "/")
        assert r.status == 200
        assert await c.closed(timeout=WAIT)
        assert c.goaways == [1]
        silent = await H2Client.connect(gw.port)
        assert await silent.closed(timeout=WAIT)


async def test_a_sandbox_failure_resets_only_its_stream(start_gateway: Any, catalog: Catalog) -> None:
    async def breaks(c: UpstreamConn) -> None:
        head, _ = await c.read_request()
        if b"/cut" in head:
            c.send(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly part")
            await c.writer.drain()
            c.reset()
        else:
            c.send(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nxx")  # invalid

    async with RawUpstream(breaks) as up, RawUpstream(echo_handler) as ok:
        catalog.put("br", host="127.0.0.1")
        catalog.put("fine", host="127.0.0.1")
        gw = await start_gateway()
        c = await H2Client.connect(gw.port)
        cut = c.start(gw.host(up.port, "br"), "/cut")
        bad = c.start(gw.host(up.port, "br"), "/bad")
        good = c.start(gw.host(ok.port, "fine"), "/good")
        r = await c.response(cut)
        assert r.reset == h2.errors.ErrorCodes.INTERNAL_ERROR and bytes(r.body) == b"only part"
        r = await c.response(bad)
        assert (r.status, r.header(b"x-gateway-reason")) == (502, b"upstream_invalid_response")
        r = await c.response(good)
        assert r.status == 200
        assert not c.lost.is_set()
        c.close()


async def test_closed_streams_are_forgotten(start_gateway: Any, catalog: Catalog) -> None:
    """A long-lived connection (a load balancer's) does not keep every stream it ever carried: h2's
    stream table stays bounded over 600 requests, 20 at a time, and a frame for a stream closed
    long ago is still answered as for a closed stream (RST_STREAM STREAM_CLOSED), the rest going on."""
    async with RawUpstream(echo_handler) as up:
        catalog.put("many", host="127.0.0.1")
        gw = await start_gateway()
        host = gw.host(up.port, "many")
        c = await H2Client.connect(gw.port)
        sizes = []
        for _ in range(30):
            sids = [c.start(host, "/n") for _ in range(20)]
            for sid in sids:
                r = await c.response(sid)
                assert r.status == 200
            (conn,) = [x for x in gw.gateway.ctx.connections if isinstance(x, H2Connection)]
            sizes.append(len(conn.h2.streams))
        assert max(sizes) <= 2 * 20 + 64, sizes
        assert 1 not in conn.h2.streams  # forgotten, and remembered as closed:
        c.send_raw(RstStreamFrame(1, error_code=0).serialize())  # (allowed on a closed stream)
        c.send_raw(WindowUpdateFrame(1, window_increment=1).serialize())  # (so is this, RFC 9113 §5.1)
        r = await c.request(host, "/after")
        assert r.status == 200 and c.goaway is None
        c.close()
