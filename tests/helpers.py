"""Test peers and clients written independently of the gateway's own HTTP code."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

WAIT = 10.0


@dataclass
class Response:
    status: int
    reason: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    raw: bytes
    trailers: list[tuple[bytes, bytes]] = field(default_factory=list)

    def header(self, name: str) -> bytes | None:
        n = name.lower().encode()
        for k, v in self.headers:
            if k.lower() == n:
                return v
        return None

    def all(self, name: str) -> list[bytes]:
        n = name.lower().encode()
        return [v for k, v in self.headers if k.lower() == n]

    def json(self) -> object:
        import json

        return json.loads(self.body)


def parse_head(head: bytes) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
    lines = head.rstrip(b"\r\n").split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    headers = []
    for line in lines[1:]:
        n, _, v = line.partition(b":")
        headers.append((n, v.strip(b" \t")))
    return int(parts[1]), parts[2] if len(parts) > 2 else b"", headers


async def read_response(reader: asyncio.StreamReader, method: bytes = b"GET", interim: bool = False) -> Response:
    """Read one response; with ``interim``, a 1xx is returned on its own."""
    async with asyncio.timeout(WAIT):
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            status, reason, headers = parse_head(head)
            if status >= 200 or status == 101 or interim:
                break
        raw = bytearray(head)
        h = {k.lower(): v for k, v in headers}
        body = bytearray()
        trailers: list[tuple[bytes, bytes]] = []
        if method == b"HEAD" or status < 200 or status in (204, 304):
            pass
        elif h.get(b"transfer-encoding", b"").lower().endswith(b"chunked"):
            while True:
                line = await reader.readuntil(b"\r\n")
                raw += line
                size = int(line.split(b";")[0], 16)
                if size == 0:
                    while True:
                        t = await reader.readuntil(b"\r\n")
                        raw += t
                        if t == b"\r\n":
                            break
                        n, _, v = t[:-2].partition(b":")
                        trailers.append((n, v.strip()))
                    break
                data = await reader.readexactly(size + 2)
                raw += data
                body += data[:-2]
        elif b"content-length" in h:
            data = await reader.readexactly(int(h[b"content-length"]))
            raw += data
            body += data
        else:
            data = await reader.read()
            raw += data
            body += data
    return Response(status, reason, headers, bytes(body), bytes(raw), trailers)


class Client:
    """A raw HTTP/1.1 client connection to the gateway."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, port: int, host: str = "127.0.0.1") -> Client:
        async with asyncio.timeout(WAIT):
            r, w = await asyncio.open_connection(host, port, limit=2**24)
        return cls(r, w)

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def request(
        self,
        host: str,
        path: str = "/",
        method: str = "GET",
        headers: dict[str, str] | None = None,
        body: bytes | None = None,
    ) -> Response:
        lines = [f"{method} {path} HTTP/1.1", f"Host: {host}"]
        for k, v in (headers or {}).items():
            lines.append(f"{k}: {v}")
        if body is not None:
            lines.append(f"Content-Length: {len(body)}")
        self.send(("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b""))
        return await read_response(self.reader, method.encode())

    async def read_response(self, method: bytes = b"GET", interim: bool = False) -> Response:
        return await read_response(self.reader, method, interim)

    async def closed(self) -> bool:
        """True once the gateway has closed the connection (EOF or reset) without sending anything
        more. Bytes that arrive before the close fail the test: a response nobody asked for (a
        second one smuggled through) must not pass unnoticed. A connection still open after WAIT
        fails it too (TimeoutError)."""
        extra = bytearray()
        try:
            async with asyncio.timeout(WAIT):
                while data := await self.reader.read(65536):
                    extra += data
        except (ConnectionResetError, BrokenPipeError):
            pass
        assert not extra, f"{len(extra)} bytes after the expected response: {bytes(extra[:300])!r}"
        return True

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()


async def request(port: int, host: str, path: str = "/", **kw: object) -> Response:
    c = await Client.connect(port)
    try:
        return await c.request(host, path, **kw)  # type: ignore[arg-type]
    finally:
        await c.close()


Handler = Callable[["UpstreamConn"], Awaitable[None]]


class UpstreamConn:
    """One connection accepted by a RawUpstream; records every byte it received."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: RawUpstream) -> None:
        self.reader = reader
        self.writer = writer
        self.server = server
        self.received = bytearray()

    async def read_head(self) -> bytes:
        async with asyncio.timeout(WAIT):
            head = await self.reader.readuntil(b"\r\n\r\n")
        self.received += head
        self.server.received += head
        return head

    async def read_exactly(self, n: int) -> bytes:
        async with asyncio.timeout(WAIT):
            data = await self.reader.readexactly(n)
        self.received += data
        self.server.received += data
        return data

    async def read_request(self) -> tuple[bytes, bytes]:
        """A request head and its Content-Length or chunked body (raw, as received)."""
        head = await self.read_head()
        _, _, headers = parse_head(b"HTTP/1.1 0 x\r\n" + head.split(b"\r\n", 1)[1])
        h = {k.lower(): v for k, v in headers}
        body = b""
        if b"content-length" in h:
            body = await self.read_exactly(int(h[b"content-length"]))
        elif h.get(b"transfer-encoding", b"").lower() == b"chunked":
            buf = bytearray()
            async with asyncio.timeout(WAIT):
                while True:
                    line = await self.reader.readuntil(b"\r\n")
                    buf += line
                    size = int(line.split(b";")[0], 16)
                    if size == 0:
                        while True:
                            t = await self.reader.readuntil(b"\r\n")
                            buf += t
                            if t == b"\r\n":
                                break
                        break
                    buf += await self.reader.readexactly(size + 2)
            self.received += buf
            self.server.received += buf
            body = bytes(buf)
        return head, body

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    def reset(self) -> None:
        sock = self.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()


class RawUpstream:
    """A sandbox app on loopback driven by a per-connection handler coroutine."""

    def __init__(self, handler: Handler, host: str = "127.0.0.1", port: int = 0) -> None:
        self.handler = handler
        self.server: asyncio.Server | None = None
        self.host = host
        self.port = port
        self.conns: list[UpstreamConn] = []
        self.received = bytearray()
        self.tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> RawUpstream:
        self.server = await asyncio.start_server(self._accept, self.host, self.port, limit=2**24)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _accept(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        c = UpstreamConn(r, w, self)
        self.conns.append(c)
        try:
            await self.handler(c)
        except (asyncio.IncompleteReadError, ConnectionError, TimeoutError):
            pass
        finally:
            w.close()

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        for c in self.conns:
            c.writer.close()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(WAIT):
                await self.server.wait_closed()


def response(status: int = 200, body: bytes = b"ok", headers: dict[str, str] | None = None) -> bytes:
    h = {"Content-Length": str(len(body))} | (headers or {})
    return (f"HTTP/1.1 {status} X\r\n" + "".join(f"{k}: {v}\r\n" for k, v in h.items()) + "\r\n").encode() + body


async def echo_handler(c: UpstreamConn) -> None:
    """Answers every request with its own head and body length, keeping the connection open."""
    while True:
        head, body = await c.read_request()
        c.send(response(200, head + b"\nbody=%d" % len(body)))


def rss_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process, KiB."""
    with open(f"/proc/{pid}/status") as f:
        vals = dict(line.split(":", 1) for line in f if line.startswith(("VmRSS", "VmHWM")))
    return int(vals["VmRSS"].split()[0]), int(vals["VmHWM"].split()[0])


def open_fds(pid: int | None = None) -> int:
    return len(os.listdir(f"/proc/{pid or os.getpid()}/fd"))


def recv_queue(dst_port: int) -> int:
    """Bytes waiting unread in sockets connected to 127.0.0.1:dst_port (the gateway's, here)."""
    most = 0
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            cols = line.split()
            if cols[3] == "01" and int(cols[2].split(":")[1], 16) == dst_port:  # ESTABLISHED to it
                most = max(most, int(cols[4].split(":")[1], 16))
    return most


async def until_sandbox_blocked(up_port: int, written: Callable[[], int], timeout: float = WAIT) -> None:
    """Wait until backpressure has reached the sandbox: its writes no longer progress although the
    gateway's socket to it holds unread bytes.

    Kernel socket buffers autotune differently per machine, so no fixed byte count is waited for;
    instead the sandbox's progress counter must stand still across several polls while bytes sit
    unread at the gateway. A gateway that kept reading would empty that queue (or let the sandbox
    finish), so the wait times out and the test fails.
    """
    still, last = 0, -1
    async with asyncio.timeout(timeout):
        while still < 5:
            await asyncio.sleep(0.05)
            now = written()
            still = still + 1 if now == last and recv_queue(up_port) > 0 else 0
            last = now
