"""WebSockets over HTTP/2 (RFC 8441): an extended CONNECT stream the sandbox accepted, relayed as bytes.

The stream's request went to the sandbox as an HTTP/1.1 ``Upgrade: websocket`` (h2map.py); when the
sandbox answers 101 the client gets ``200`` on its stream (RFC 8441 §5), and from then on the
stream's DATA frames and the sandbox connection's bytes are one tunnel, as tunnel.py joins two
sockets for HTTP/1.1: WebSocket frames pass unchanged both ways. What the tunnel keeps:

- backpressure both ways: the client's DATA is acknowledged (WINDOW_UPDATE) only while the sandbox
  connection takes it; the sandbox connection stops being read while the stream's window is shut
  and its buffer full, or the client's socket is;
- half-close: END_STREAM from the client becomes a write shutdown towards the sandbox, the
  sandbox's FIN becomes END_STREAM;
- a reset on either side resets the other (RST_STREAM CANCEL towards the client, RST towards the
  sandbox); other streams on the connection are untouched.

Go's standard proxy cannot take over an HTTP/2 stream like this: E2B's edge has no WebSockets over
HTTP/2.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import h2.errors

from gateway.http import flow, h2map
from gateway.http.headers import analyze_response

if TYPE_CHECKING:
    from gateway.http.http2 import H2Stream
    from gateway.http.proxy import Exchange
    from gateway.http.upstream import UpstreamConnection

__all__ = ["H2Tunnel", "start"]


class H2Tunnel(asyncio.Protocol):
    """The sandbox side of a WebSocket over an HTTP/2 stream (a protocol on the sandbox connection)."""

    __slots__ = ("address", "closed", "count_in", "count_out", "ctx", "eof", "exchange", "execution_id",
                 "gate", "last", "sandbox_id", "stream", "transport")  # fmt: skip

    def __init__(self, stream: H2Stream, up: UpstreamConnection, x: Exchange) -> None:
        self.stream = stream
        self.ctx = stream.ctx
        self.transport = up.transport
        self.gate = flow.ReadGate(up.transport)
        self.sandbox_id, self.address, self.execution_id = up.sandbox_id, up.address, up.execution_id
        self.exchange: Exchange | None = x
        self.closed = False
        self.eof = False
        self.count_in = 0  # bytes from the client
        self.count_out = 0  # bytes from the sandbox
        self.last = self.ctx.clock

    # ---- the sandbox side

    def data_received(self, data: bytes) -> None:
        s = self.stream
        self.count_out += len(data)
        self.last = self.ctx.clock
        if s.ended:
            return
        s.out += data
        s.pump()  # past STREAM_BUFFER waiting for the client's window, this side stops being read
        s.conn.flush_now()

    def eof_received(self) -> bool:
        """The sandbox finished sending: END_STREAM; the client may still send until it ends too."""
        self.eof = True
        s = self.stream
        if not s.ended:
            s.end_pending = True
            s.pump()
            s.conn.flush_later()
        return not s.remote_ended

    def connection_lost(self, exc: Exception | None) -> None:
        if self.closed:
            return
        self.closed = True
        ctx = self.ctx
        ctx.tunnels.discard(self)
        ctx.pool.unlink(self.sandbox_id, self)
        s = self.stream
        if not s.ended:
            if exc is not None or not self.eof:
                s._reset(h2.errors.ErrorCodes.CANCEL)
            else:
                s.end_pending = True
                s.pump()
            s.conn.flush_later()
        s._finish()
        x = self.exchange
        if x is not None:
            self.exchange = None
            x.tunnel_ended(self.count_in, self.count_out)

    def pause_writing(self) -> None:
        self.stream.pause_reading(flow.PEER_BUSY)  # the client's DATA stops being acknowledged

    def resume_writing(self) -> None:
        self.stream.resume_reading(flow.PEER_BUSY)

    # ---- the client side (called by the HTTP/2 connection)

    def from_client(self, data: bytes) -> None:
        if not self.closed and data:
            self.count_in += len(data)
            self.last = self.ctx.clock
            self.transport.write(data)

    def client_ended(self) -> None:
        """END_STREAM from the client: a write shutdown towards the sandbox (RFC 9293 §3.6)."""
        if self.closed:
            return
        if self.eof or not self.transport.can_write_eof():
            self.transport.close()
        else:
            self.transport.write_eof()

    def client_gone(self) -> None:
        """The client reset the stream, or its connection ended: reset the sandbox side."""
        if not self.closed:
            flow.reset(self.transport)

    # ---- what the worker asks of every tunnel (server.py, context.py)

    def idle_since(self) -> float:
        return self.last

    def go_away(self) -> bool:
        """Drain: not followed by frame boundaries here; the tunnel ends when its ends close it or at
        ``shutdown_timeout``."""
        return False

    def close(self) -> None:
        s = self.stream
        if not s.ended:
            s._reset(h2.errors.ErrorCodes.CANCEL)
        if not self.closed:
            self.transport.close()

    def reset(self) -> None:
        """The sandbox is gone or replaced."""
        self.client_gone()


def start(stream: H2Stream, x: Exchange, up: UpstreamConnection, head: bytes, rest: bytes, websocket: bool) -> None:
    """The sandbox answered 101 to the stream's extended CONNECT: answer 200, join the two."""
    ctx = stream.ctx
    fields = h2map.response_fields(analyze_response(head, 101, False, False, False)[0], tunnel=True)
    if x.rid and ctx.rid_header and ctx.rid_in_response.search(head) is None:
        fields.append((ctx.rid_header_h2, x.rid))
    t = H2Tunnel(stream, up, x)
    stream.tunnel = t
    stream.conn.h2.send_headers(stream.sid, fields)
    stream.conn.flush_now()
    transport = up.transport
    up.closed = True  # its protocol is replaced: its connection_lost will not run
    ctx.pool.opened -= 1
    ctx.pool.unlink(up.sandbox_id, up)
    ctx.pool.link(t.sandbox_id, t)
    ctx.tunnels.add(t)
    transport.set_protocol(t)
    transport.resume_reading()
    if up.write_paused:
        stream.pause_reading(flow.PEER_BUSY)
    if stream.conn.write_paused:
        t.gate.close(flow.PEER_BUSY)
    early = stream.early
    if early:
        stream.early = []
        for data in early:
            t.from_client(data)
    if rest:
        t.data_received(rest)
