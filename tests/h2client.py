"""A raw HTTP/2 test client on python-hyper's h2: many streams on one connection, bodies, trailers,
RFC 8441 extended CONNECT, and the means to misbehave (raw frames, no window updates)."""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass, field
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.settings

from tests.conftest import WAIT


@dataclass
class H2Response:
    status: int = 0
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    interim: list[list[tuple[bytes, bytes]]] = field(default_factory=list)
    body: bytearray = field(default_factory=bytearray)
    trailers: list[tuple[bytes, bytes]] | None = None
    reset: int | None = None  # the RST_STREAM error code, if the server reset the stream
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    head: asyncio.Event = field(default_factory=asyncio.Event)
    data: asyncio.Event = field(default_factory=asyncio.Event)

    def header(self, name: bytes) -> bytes | None:
        for n, v in self.headers:
            if n == name:
                return v
        return None

    def all(self, name: bytes) -> list[bytes]:
        return [v for n, v in self.headers if n == name]


class H2Client(asyncio.Protocol):
    def __init__(
        self, auto_ack: bool = True, settings: dict[int, int] | None = None, drain_aware: bool = False,
        strict: bool = False,
    ) -> None:  # fmt: skip
        """``drain_aware``: GOAWAY frames are kept from h2 (which would refuse every frame after one,
        python-hyper/h2#1181) and noted in ``goaways``: in-flight streams complete, as with browsers.
        ``strict``: h2 validates what it receives, as httpx's HTTP/2 does (RFC 9113 §8.2, §8.3; a
        field it refuses is a connection error there, ending every stream on the connection)."""
        self.drain_aware = drain_aware
        cfg = h2.config.H2Configuration(client_side=True, header_encoding=None, validate_outbound_headers=False,
                                        normalize_outbound_headers=False, validate_inbound_headers=strict)  # fmt: skip
        self.conn = h2.connection.H2Connection(cfg)
        self.window = 0  # connection window to open beyond 65,535 at the start
        if settings:
            self.conn.local_settings = h2.settings.Settings(client=True, initial_values=settings)
            self.conn.max_inbound_frame_size = self.conn.local_settings.max_frame_size
            self.window = max(0, settings.get(h2.settings.SettingCodes.INITIAL_WINDOW_SIZE, 0) - 65535)
        self.auto_ack = auto_ack
        self.hold: set[int] = set()  # streams whose window is never reopened
        self.responses: dict[int, H2Response] = {}
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.goaway: h2.events.ConnectionTerminated | None = None
        self.goaways: list[int] = []  # last-stream-IDs of every GOAWAY received (h2 reports the first)
        self.lost = asyncio.Event()
        self.events: list[h2.events.Event] = []
        self.received = 0  # bytes from the server
        #: Every frame received, as (type, flags, stream ID, payload length), read from the raw bytes.
        self.frames: list[tuple[int, int, int, int]] = []
        self.changed = asyncio.Event()  # set on every read

    @classmethod
    async def connect(
        cls, port: int, host: str = "127.0.0.1", ssl_ctx: ssl.SSLContext | None = None, server_hostname: str | None = None,
        **kw: Any,
    ) -> H2Client:  # fmt: skip
        loop = asyncio.get_running_loop()
        c = cls(**kw)
        async with asyncio.timeout(WAIT):
            await loop.create_connection(lambda: c, host, port, ssl=ssl_ctx, server_hostname=server_hostname)
        return c

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.conn.initiate_connection()
        if self.window:
            self.conn.increment_flow_control_window(self.window)
        self.flush()

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data and not self.transport.is_closing():
            self.transport.write(data)

    def send_raw(self, data: bytes) -> None:
        self.flush()
        self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        self.received += len(data)
        self.changed.set()
        if self.drain_aware:
            data = self._without_goaways(data)
        else:
            self._scan_goaways(data)
        try:
            events = self.conn.receive_data(data)
        except h2.exceptions.ProtocolError as e:  # type: ignore[attr-defined]
            self.events.append(e)  # type: ignore[arg-type]
            return
        for ev in events:
            self.events.append(ev)
            r = self.responses.get(getattr(ev, "stream_id", 0))
            if isinstance(ev, h2.events.ResponseReceived) and r is not None:
                r.headers = list(ev.headers)
                r.status = int(r.header(b":status") or 0)
                r.head.set()
            elif isinstance(ev, h2.events.InformationalResponseReceived) and r is not None:
                r.interim.append(list(ev.headers))
            elif isinstance(ev, h2.events.DataReceived):
                if r is not None:
                    r.body += ev.data
                    r.data.set()
                n = ev.flow_controlled_length
                if n and ev.stream_id in self.hold:  # as a browser not reading one stream: the connection's window only
                    self.conn.increment_flow_control_window(n)
                elif self.auto_ack and n:
                    self.conn.acknowledge_received_data(n, ev.stream_id)
            elif isinstance(ev, h2.events.TrailersReceived) and r is not None:
                r.trailers = list(ev.headers)
            elif isinstance(ev, h2.events.StreamEnded) and r is not None:
                r.ended.set()
            elif isinstance(ev, h2.events.StreamReset) and r is not None:
                r.reset = ev.error_code
                r.ended.set()
                r.head.set()
            elif isinstance(ev, h2.events.ConnectionTerminated):
                self.goaway = self.goaway or ev
        self.flush()

    def _without_goaways(self, data: bytes) -> bytes:
        buf = getattr(self, "_pending", b"") + data
        out = []
        while len(buf) >= 9:
            length = int.from_bytes(buf[:3], "big")
            if len(buf) < 9 + length:
                break
            self.frames.append((buf[3], buf[4], int.from_bytes(buf[5:9], "big") & 0x7FFFFFFF, length))
            if buf[3] == 7:
                self.goaways.append(int.from_bytes(buf[9:13], "big") & 0x7FFFFFFF)
            else:
                out.append(buf[: 9 + length])
            buf = buf[9 + length :]
        self._pending = buf
        return b"".join(out)

    def _scan_goaways(self, data: bytes) -> None:
        """h2 closes its state machine at the first GOAWAY; a drain sends two: read frames raw too
        (and noted in ``frames``, even those h2 refuses)."""
        buf = getattr(self, "_raw", b"") + data
        while len(buf) >= 9:
            length = int.from_bytes(buf[:3], "big")
            if len(buf) < 9 + length:
                break
            self.frames.append((buf[3], buf[4], int.from_bytes(buf[5:9], "big") & 0x7FFFFFFF, length))
            if buf[3] == 7:  # GOAWAY
                self.goaways.append(int.from_bytes(buf[9:13], "big") & 0x7FFFFFFF)
            buf = buf[9 + length :]
        self._raw = buf

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.set()
        for r in self.responses.values():
            r.head.set()
            r.ended.set()

    # ---- requests

    def start(
        self, authority: str, path: str = "/", method: str = "GET", headers: list[tuple[str, str]] | None = None,
        body: bytes | None = None, end: bool = True, scheme: str = "http", extra_pseudo: list[tuple[str, str]] | None = None,
    ) -> int:  # fmt: skip
        """Send a request's HEADERS (and body, unless ``end`` is False: then send more with send_body)."""
        sid = self.conn.get_next_available_stream_id()
        hs = [(":method", method), (":scheme", scheme), (":authority", authority), (":path", path)]
        if method == "CONNECT" and extra_pseudo is None:
            hs = [(":method", method), (":authority", authority)]
        hs += extra_pseudo or []
        hs += headers or []
        self.responses[sid] = H2Response()
        no_body = body is None and end
        self.conn.send_headers(sid, [(k.encode(), v.encode()) for k, v in hs], end_stream=no_body)
        if body is not None:
            self.send_body(sid, body, end=end)
        self.flush()
        return sid

    def send_body(self, sid: int, data: bytes, end: bool = False) -> None:
        """As much of ``data`` as the windows allow now (tests send what fits)."""
        max_frame = self.conn.max_outbound_frame_size
        while data:
            n = min(len(data), max_frame, self.conn.local_flow_control_window(sid))
            assert n > 0, "no window"
            self.conn.send_data(sid, data[:n])
            data = data[n:]
        if end:
            self.conn.end_stream(sid)
        self.flush()

    async def send_all(self, sid: int, data: bytes, end: bool = True) -> None:
        """Send ``data`` as the server's windows open."""
        view = memoryview(data)
        async with asyncio.timeout(WAIT * 3):
            while view:
                window = self.conn.local_flow_control_window(sid)
                if window <= 0:
                    self.changed.clear()
                    await self.changed.wait()
                    continue
                n = min(len(view), window, self.conn.max_outbound_frame_size)
                self.conn.send_data(sid, bytes(view[:n]))
                view = view[n:]
                self.flush()
                if self.transport.get_write_buffer_size() > 1 << 20:
                    await asyncio.sleep(0)  # let the loop write (a busy sender, not a synchronisation)
        if end:
            self.conn.end_stream(sid)
            self.flush()

    async def response(self, sid: int, timeout: float = WAIT) -> H2Response:
        r = self.responses[sid]
        async with asyncio.timeout(timeout):
            await r.ended.wait()
        return r

    async def request(self, authority: str, path: str = "/", **kw: Any) -> H2Response:
        return await self.response(self.start(authority, path, **kw))

    async def closed(self, timeout: float = WAIT) -> bool:
        async with asyncio.timeout(timeout):
            await self.lost.wait()
        return True

    def close(self) -> None:
        if not self.transport.is_closing():
            self.transport.close()


def error_codes(c: H2Client) -> list[int]:
    """The error codes of the GOAWAY frames received."""
    return [int(e.error_code) for e in c.events if isinstance(e, h2.events.ConnectionTerminated)]
