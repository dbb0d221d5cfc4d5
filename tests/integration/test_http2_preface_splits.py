"""The preface sniff (downstream.py ``_h2_preface``) against reads split anywhere: a connection's first
bytes, cut at every offset into two reads (and, by hypothesis, anywhere into three), reach a real
gateway on loopback as that many reads, and the outcome is the one the bytes have in one read: an
HTTP/2 response for the preface, SETTINGS and a request's HEADERS; the HTTP/1.1 answer for a request
that begins with ``P`` (POST, PUT, PATCH) or looks like the preface and is not."""

from __future__ import annotations

import asyncio
import fcntl
import socket
import struct
import termios
from collections.abc import AsyncIterator
from typing import Any

import h2.config
import h2.connection
import h2.events
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import WAIT, Catalog, RunningGateway
from tests.helpers import RawUpstream, echo_handler

SIOCOUTQ = 0x5411  # (linux/sockios.h: bytes a socket has not yet had acknowledged)


def _h2_opening(authority: str) -> tuple[h2.connection.H2Connection, bytes]:
    """The preface, SETTINGS and a GET's HEADERS, as h2's client writes them (and that client)."""
    c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    c.initiate_connection()
    c.send_headers(1, [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", authority.encode()),
                       (b":path", b"/h2split")], end_stream=True)  # fmt: skip
    return c, c.data_to_send()


def _messages(authority: str) -> list[bytes]:
    h = authority.encode()
    return [
        _h2_opening(authority)[1],
        b"POST /split HTTP/1.1\r\nHost: " + h + b"\r\nContent-Length: 2\r\n\r\nhi",
        b"PUT /split HTTP/1.1\r\nHost: " + h + b"\r\nContent-Length: 2\r\n\r\nhi",
        b"PATCH /split HTTP/1.1\r\nHost: " + h + b"\r\nContent-Length: 2\r\n\r\nhi",
        b"PRI * HTTP/1.1\r\nHost: " + h + b"\r\n\r\n",  # the preface's first 9 bytes, then HTTP/1.1
        b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n",  # the preface but for "SM"
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\rX",  # the preface but for its last byte
    ]


class Split:
    """A gateway, a sandbox that echoes, and what each message gets when sent in one read."""

    def __init__(self, gw: RunningGateway, authority: str) -> None:
        self.gw = gw
        self.authority = authority
        self.messages = _messages(authority)
        self.expected: dict[bytes, tuple[Any, ...]] = {}

    def _server_unread(self, port: int) -> int | None:
        """Bytes unread in the gateway's socket of the connection from ``port`` (None: not found)."""
        for c in list(self.gw.gateway.ctx.connections):
            t = getattr(c, "transport", None)
            if t is None or t.is_closing():
                continue
            peer = t.get_extra_info("peername")
            if peer is not None and peer[1] == port:
                fd = t.get_extra_info("socket").fileno()
                return int(struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0])
        return None

    async def _until_read(self, sock: socket.socket) -> None:
        """Until the gateway has read everything sent so far (so the next part is a read of its own):
        the gateway's kernel has acknowledged it, and it is no longer waiting in the gateway's socket
        (or the gateway has answered or closed already). Bounded."""
        port = sock.getsockname()[1]
        seen = False
        async with asyncio.timeout(WAIT):
            while True:
                unread = self._server_unread(port)
                if unread is None and seen:
                    return  # the gateway has closed the connection: it read what made it close
                seen = seen or unread is not None
                outq = struct.unpack("i", fcntl.ioctl(sock.fileno(), SIOCOUTQ, b"\0\0\0\0"))[0]
                if outq == 0 and unread == 0:
                    return
                try:
                    if sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) is not None:
                        return  # an answer, or the gateway's close: it has read
                except BlockingIOError:
                    pass
                except OSError:
                    return  # reset by the gateway
                await asyncio.sleep(0.001)

    async def outcome(self, message: bytes, cuts: list[int]) -> tuple[Any, ...]:
        loop = asyncio.get_running_loop()
        sock = socket.socket()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        try:
            async with asyncio.timeout(WAIT):
                await loop.sock_connect(sock, ("127.0.0.1", self.gw.port))
            bounds = [0, *cuts, len(message)]
            for i in range(len(bounds) - 1):
                if i:
                    await self._until_read(sock)
                try:
                    await loop.sock_sendall(sock, message[bounds[i] : bounds[i + 1]])
                except (BrokenPipeError, ConnectionResetError):
                    break  # the gateway answered what it had (a 400) and closed: read that answer
            async with asyncio.timeout(WAIT):
                if message.startswith(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"):
                    return await self._h2_answer(sock)
                return await self._h1_answer(sock)
        finally:
            sock.close()

    async def _h2_answer(self, sock: socket.socket) -> tuple[Any, ...]:
        loop = asyncio.get_running_loop()
        c = _h2_opening(self.authority)[0]  # (the client's state: its request sent)
        status, body = 0, b""
        while True:
            data = await loop.sock_recv(sock, 65536)
            if not data:
                return ("h2", "closed", status, body)
            for ev in c.receive_data(data):
                if isinstance(ev, h2.events.ResponseReceived):
                    status = int(dict(ev.headers)[b":status"])
                elif isinstance(ev, h2.events.DataReceived):
                    body += ev.data
                elif isinstance(ev, h2.events.StreamEnded):
                    return ("h2", status, body.split(b"\r\n", 1)[0], body.endswith(b"body=0"))
                elif isinstance(ev, h2.events.StreamReset | h2.events.ConnectionTerminated):
                    return ("h2", "reset", status)

    async def _h1_answer(self, sock: socket.socket) -> tuple[Any, ...]:
        loop = asyncio.get_running_loop()
        buf = b""
        while b"\r\n\r\n" not in buf:
            try:
                data = await loop.sock_recv(sock, 65536)
            except ConnectionResetError:
                data = b""
            if not data:
                return ("http/1.1", "closed", buf[:12])
            buf += data
        head, _, body = buf.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        fields = {k.lower(): v for k, _, v in (line.partition(b": ") for line in lines[1:])}
        length = int(fields.get(b"content-length", b"0"))
        while len(body) < length:
            data = await loop.sock_recv(sock, 65536)
            if not data:
                break
            body += data
        status = int(lines[0].split(b" ")[1])
        return ("http/1.1", status, fields.get(b"x-gateway-reason"), body.split(b"\r\n", 1)[0], body[-6:])


@pytest.fixture
async def split(start_gateway: Any, catalog: Catalog) -> AsyncIterator[Split]:
    async with RawUpstream(echo_handler) as up:
        catalog.put("split", host="127.0.0.1")
        gw = await start_gateway()
        s = Split(gw, gw.host(up.port, "split"))
        for m in s.messages:
            s.expected[m] = await s.outcome(m, [])
        yield s


async def test_every_two_way_split(split: Split) -> None:
    """Each message cut at every offset into two reads: the outcome of the message in one read."""
    e = split.expected
    m = split.messages
    assert e[m[0]] == ("h2", 200, b"GET /h2split HTTP/1.1", True)
    for verb, msg in zip((b"POST", b"PUT", b"PATCH"), m[1:4], strict=True):
        assert e[msg] == ("http/1.1", 200, None, verb + b" /split HTTP/1.1", b"body=2")
    for msg in m[4:]:
        assert e[msg][:2] == ("http/1.1", 400) and e[msg][2] is not None, e[msg]
    for msg in m:
        for cut in range(1, len(msg)):
            assert await split.outcome(msg, [cut]) == e[msg], (msg[:cut], msg[cut:])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
async def test_three_way_splits(split: Split, data: st.DataObject) -> None:
    """Cut anywhere into three reads (the gateway and its sandbox are shared by the examples; each
    example is its own connection)."""
    msg = data.draw(st.sampled_from(split.messages))
    cuts = sorted(data.draw(st.sets(st.integers(1, len(msg) - 1), min_size=2, max_size=2)))
    assert await split.outcome(msg, cuts) == split.expected[msg], (msg, cuts)
