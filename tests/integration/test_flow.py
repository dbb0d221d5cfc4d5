"""The outbox (http/flow.py): held writes leave after the loop iteration, sent ones at once after
what is held, in order, and never to a transport that was closed meanwhile. Real sockets: one end
is the transport, the other a socket."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import pytest

from gateway.http.flow import Outbox
from tests.helpers import WAIT


@pytest.fixture
async def pair() -> AsyncIterator[tuple[asyncio.Transport, socket.socket]]:
    loop = asyncio.get_running_loop()
    a, b = socket.socketpair()
    b.setblocking(False)
    transport, _ = await loop.connect_accepted_socket(asyncio.Protocol, a)
    yield transport, b  # type: ignore[misc]
    transport.abort()
    b.close()


async def received(sock: socket.socket, n: int) -> bytes:
    """Exactly n bytes from sock (bounded wait)."""
    loop = asyncio.get_running_loop()
    got = b""
    async with asyncio.timeout(WAIT):
        while len(got) < n:
            chunk = await loop.sock_recv(sock, n - len(got))
            assert chunk, f"EOF after {got!r}"
            got += chunk
    return got


def nothing_yet(sock: socket.socket) -> bool:
    try:
        return not sock.recv(1, socket.MSG_PEEK)
    except BlockingIOError:
        return True


async def test_writes_leave_after_the_iteration_in_order(pair: tuple[asyncio.Transport, socket.socket]) -> None:
    t, other = pair
    ob = Outbox(asyncio.get_running_loop())
    ob.write(t, b"1")
    ob.write(t, [b"2", b"3"])
    ob.write(t, b"4")
    assert nothing_yet(other)  # held until the loop finishes what it is handling
    assert await received(other, 4) == b"1234"


async def test_a_sent_write_goes_at_once_after_what_is_held(pair: tuple[asyncio.Transport, socket.socket]) -> None:
    t, other = pair
    ob = Outbox(asyncio.get_running_loop())
    ob.write(t, b"head;")
    ob.send(t, [b"body", b";"])  # streaming bytes: now, but never before the held head
    assert not ob.pending
    assert await received(other, 10) == b"head;body;"


async def test_order_is_kept_per_transport_across_transports() -> None:
    loop = asyncio.get_running_loop()
    ob = Outbox(loop)
    socks = [socket.socketpair() for _ in range(2)]
    ts = [(await loop.connect_accepted_socket(asyncio.Protocol, a))[0] for a, _ in socks]
    for _, b in socks:
        b.setblocking(False)
    try:
        for i in range(50):
            ob.write(ts[i % 2], b"%02d," % i)
        ob.flush()  # an explicit flush (before a close) sends everything at once
        assert await received(socks[0][1], 75) == b"".join(b"%02d," % i for i in range(0, 50, 2))
        assert await received(socks[1][1], 75) == b"".join(b"%02d," % i for i in range(1, 50, 2))
    finally:
        for t in ts:
            t.abort()
        for _, b in socks:
            b.close()


async def test_a_write_to_a_transport_closed_meanwhile_is_dropped(
    pair: tuple[asyncio.Transport, socket.socket],
) -> None:
    t, other = pair
    loop = asyncio.get_running_loop()
    ob = Outbox(loop)
    ob.write(t, b"never")
    t.abort()
    ob.flush()  # no error: the transport is gone, like its own buffer
    other.setblocking(True)
    other.settimeout(WAIT)
    assert await loop.run_in_executor(None, other.recv, 10) == b""  # closed without the bytes
