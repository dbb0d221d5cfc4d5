"""A request leaves nothing for Python's cycle collector: its exchange and (over HTTP/2) its stream are
freed by reference counting the moment the request is over.

Why it matters: objects in a reference cycle live until a collection finds them, and the collector
runs more often the more such objects pile up, walking every young object each time. When each
HTTP/2 request left its stream and exchange in a cycle, collections cost about a sixth of the
gateway's Python time per request under h2load (``bench/hotpath.py --h2``: 71-79 µs per request
with the cycle, 61-65 without). The cost is time, measured in the benchmark; what these tests pin is
the cause: after requests that completed, failed and were reset, a collection finds none of the
gateway's per-request objects unreachable."""

from __future__ import annotations

import asyncio
import gc
import socket
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from gateway.http.http2 import H2Stream
from gateway.http.proxy import Exchange
from tests.conftest import WAIT, Catalog
from tests.h2client import H2Client
from tests.helpers import Client, RawUpstream, UpstreamConn, echo_handler

PER_REQUEST = (Exchange, H2Stream)


@contextmanager
def cycles_found() -> Iterator[list[str]]:
    """The names of the per-request objects the collector finds unreachable at the end of the block
    (the collector is off inside it, so nothing is collected before that)."""
    found: list[str] = []
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        yield found
        gc.collect()
        found += sorted(type(o).__name__ for o in gc.garbage if isinstance(o, PER_REQUEST))
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()


async def _held(c: UpstreamConn) -> None:
    """A sandbox that reads a request and never answers (its client gives up first)."""
    await c.read_request()
    await asyncio.Event().wait()


async def test_http2_requests_leave_no_cycles(start_gateway: Any, catalog: Catalog) -> None:
    async with RawUpstream(echo_handler) as up, RawUpstream(_held) as slow:
        catalog.put("gca", host="127.0.0.1")
        gw = await start_gateway()
        c = await H2Client.connect(gw.port)
        await c.request(gw.host(up.port, "gca"))  # (the connection's first request warms up caches)
        with cycles_found() as found:
            rs = await asyncio.gather(*(c.request(gw.host(up.port, "gca"), f"/{i}") for i in range(20)))
            assert [r.status for r in rs] == [200] * 20
            post = c.start(gw.host(up.port, "gca"), "/up", method="POST", body=b"x" * 5000,
                           headers=[("content-length", "5000")])  # fmt: skip
            assert (await c.response(post)).body.endswith(b"body=5000")
            missing = await c.request(gw.host(up.port, "nosuchsandbox"))  # the gateway's own answer
            assert missing.status == 502
            sid = c.start(gw.host(slow.port, "gca"), "/held")
            async with asyncio.timeout(WAIT):
                while not slow.received:  # the sandbox has the request: an exchange is under way
                    await asyncio.sleep(0.01)
            c.conn.reset_stream(sid)
            c.flush()
            after = await c.request(gw.host(up.port, "gca"), "/after")  # the reset was handled by then
            assert after.status == 200
        c.close()
    assert found == []


@pytest.mark.parametrize("end", ["client_resets", "connection_error"])
async def test_http2_connections_ending_with_streams_in_flight_leave_no_cycles(
    start_gateway: Any, catalog: Catalog, end: str
) -> None:
    """Streams still waiting for their sandboxes when the connection ends (the client resets it, or
    breaks the protocol: a DATA frame on stream 0, RFC 9113 §6.1) are ended with it, and freed."""
    async with RawUpstream(_held) as slow:
        catalog.put("gcc", host="127.0.0.1")
        gw = await start_gateway()
        c = await H2Client.connect(gw.port)
        with cycles_found() as found:
            for i in range(3):
                c.start(gw.host(slow.port, "gcc"), f"/held{i}")
            async with asyncio.timeout(WAIT):
                while len(slow.conns) < 3 or slow.received.count(b"GET /held") < 3:
                    await asyncio.sleep(0.01)
            if end == "client_resets":  # (after a FIN alone the gateway would still answer them)
                sock = c.transport.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                c.transport.abort()
            else:
                c.send_raw(b"\x00\x00\x01\x00\x00\x00\x00\x00\x00x")
            async with asyncio.timeout(WAIT):
                while gw.gateway.ctx.connections:  # (the gateway has ended the connection)
                    await asyncio.sleep(0.01)
        c.close()
    assert found == []


async def test_http11_requests_leave_no_cycles(start_gateway: Any, catalog: Catalog) -> None:
    async with RawUpstream(echo_handler) as up:
        catalog.put("gcb", host="127.0.0.1")
        gw = await start_gateway()
        c = await Client.connect(gw.port)
        await c.request(gw.host(up.port, "gcb"))
        with cycles_found() as found:
            for i in range(20):
                assert (await c.request(gw.host(up.port, "gcb"), f"/{i}")).status == 200
            r = await c.request(gw.host(up.port, "gcb"), "/up", method="POST", body=b"x" * 5000)
            assert r.body.endswith(b"body=5000")
            assert (await c.request(gw.host(up.port, "nosuchsandbox"))).status == 502
        await c.close()
    assert found == []
