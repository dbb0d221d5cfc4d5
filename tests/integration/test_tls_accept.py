"""The PROXY header before TLS is read off a real socket (tls_accept.py): waiting for the rest of a
header split across segments wakes when more bytes arrive (the receive low-water mark), not on a
timer; a peer that stops sending mid-header is seen at once; where the mark is not honoured (a UNIX
socket here) a short poll still gets there. Drains and stops of TLS listeners: test_drain.py."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from typing import Any

import pytest

from gateway.http.tls_accept import _read_header
from tests.conftest import WAIT

HEADER = b"PROXY TCP4 203.0.113.7 10.0.0.1 4444 443\r\n"
TLS_START = b"\x16\x03\x01\x00\xc8"  # what would follow: a ClientHello's record header


class CountingSocket(socket.socket):
    """A socket that counts its recv calls (each one a turn of the header loop)."""

    recvs = 0

    def recv(self, *args: Any) -> bytes:
        self.recvs += 1
        return super().recv(*args)


@pytest.fixture
def tcp_pair() -> Iterator[tuple[socket.socket, CountingSocket]]:
    with socket.create_server(("127.0.0.1", 0)) as lst:
        client = socket.create_connection(lst.getsockname(), timeout=WAIT)
        conn, _ = lst.accept()
    server = CountingSocket(fileno=conn.detach())
    server.setblocking(False)
    yield client, server
    client.close()
    server.close()


async def until(cond: Any) -> None:
    async with asyncio.timeout(WAIT):
        while not cond():
            await asyncio.sleep(0.01)


def low_water(sock: socket.socket) -> int:
    return sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT)


async def test_the_rest_of_a_split_header_is_awaited_not_polled(tcp_pair: Any) -> None:
    """The first piece is peeked once; until the rest arrives the loop is not woken (with the old 5 ms
    poll it peeked about 60 times in the 0.3 s below); then the header is taken, exactly, and the
    socket's low-water mark is 1 again for TLS."""
    client, server = tcp_pair
    client.sendall(HEADER[:20])
    task = asyncio.create_task(_read_header(asyncio.get_running_loop(), server, "required"))
    await until(lambda: server.recvs >= 1)
    assert low_water(server) == 21  # one byte past what is there
    await asyncio.sleep(0.3)  # an observation window (nothing to wait for: nothing must happen)
    assert server.recvs == 1 and not task.done()
    client.sendall(HEADER[20:30])  # more, still not all
    await until(lambda: server.recvs >= 2)
    assert low_water(server) == 31 and not task.done()
    client.sendall(HEADER[30:] + TLS_START)
    info, ok = await asyncio.wait_for(task, WAIT)
    assert ok and info is not None and info.source == ("203.0.113.7", 4444)
    assert server.recvs == 4  # three peeks and the consuming read
    assert low_water(server) == 1
    assert server.recv(100, socket.MSG_PEEK) == TLS_START  # nothing after the header was taken


async def test_a_peer_that_stops_mid_header_ends_at_once(tcp_pair: Any) -> None:
    """Half a header, then the peer shuts down its side: no header can come, the connection ends
    now (it used to be peeked every 5 ms until request_head_timeout)."""
    client, server = tcp_pair
    client.sendall(HEADER[:20])
    task = asyncio.create_task(_read_header(asyncio.get_running_loop(), server, "required"))
    await until(lambda: server.recvs >= 1)
    client.shutdown(socket.SHUT_WR)
    assert await asyncio.wait_for(task, WAIT) == (None, False)
    assert server.recvs == 2 and low_water(server) == 1


async def test_where_the_low_water_mark_is_not_honoured_a_poll_gets_there() -> None:
    """A UNIX socket's poll ignores SO_RCVLOWAT: readability returns at once with nothing new, and the
    loop falls back to a bounded poll instead of spinning; the header completes, and a peer that
    stops mid-header is still seen."""
    a, b = socket.socketpair()
    server = CountingSocket(fileno=b.detach())
    server.setblocking(False)
    loop = asyncio.get_running_loop()
    with a, server:
        a.sendall(HEADER[:20])
        task = asyncio.create_task(_read_header(loop, server, "required"))
        await until(lambda: server.recvs >= 3)  # woken with nothing new: polling now
        a.sendall(HEADER[20:] + TLS_START)
        info, ok = await asyncio.wait_for(task, WAIT)
        assert ok and info is not None and info.source == ("203.0.113.7", 4444)
        assert server.recv(100, socket.MSG_PEEK) == TLS_START
    a, b = socket.socketpair()
    server = CountingSocket(fileno=b.detach())
    server.setblocking(False)
    with a, server:
        a.sendall(HEADER[:20])
        task = asyncio.create_task(_read_header(loop, server, "required"))
        await until(lambda: server.recvs >= 3)
        a.shutdown(socket.SHUT_WR)
        assert await asyncio.wait_for(task, WAIT) == (None, False)
