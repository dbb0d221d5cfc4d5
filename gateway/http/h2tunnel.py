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
  sandbox); other streams on the connection are untouched;
- a clean end on drain, as tunnel.py's: both directions' frame boundaries are followed (wsframes.py),
  and when the listeners close each side gets a Close 1001 between two frames (the sandbox's masked,
  as from a client); then nothing more is relayed and each side's closing handshake ends with its own
  Close (the client's: END_STREAM; the sandbox's: its connection closes).

Go's standard proxy cannot take over an HTTP/2 stream like this: E2B's edge has no WebSockets over
HTTP/2.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

import h2.errors

from gateway.http import flow, framing, h2map
from gateway.http.headers import analyze_response
from gateway.http.wsframes import FrameTracker, close_frame

if TYPE_CHECKING:
    from gateway.http.http2 import H2Stream
    from gateway.http.proxy import Exchange
    from gateway.http.upstream import UpstreamConnection

__all__ = ["H2Tunnel", "start"]

log = logging.getLogger("gateway.http2")


class H2Tunnel(asyncio.Protocol):
    """The sandbox side of a WebSocket over an HTTP/2 stream (a protocol on the sandbox connection)."""

    __slots__ = ("address", "away", "closed", "count_in", "count_out", "ctx", "eof", "exchange", "execution_id",
                 "from_sandbox", "from_the_client", "gate", "last", "sandbox_id", "stream", "transport")  # fmt: skip

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
        # A WebSocket: each direction's frames (headers only), for a Close 1001 between two frames.
        self.from_the_client: FrameTracker | None = None
        self.from_sandbox: FrameTracker | None = None
        self.away = _RELAYING

    # ---- the sandbox side

    def data_received(self, data: bytes) -> None:
        s = self.stream
        self.count_out += len(data)
        self.last = self.ctx.clock
        fr = self.from_sandbox
        if fr is not None:
            if self.away:
                data = self._going_away(fr, data, to_client=True)
                if not data:
                    return
            else:
                fr.feed(data)
        if s.ended:
            return
        if s.out:
            s.out += data
            s.pump()  # past STREAM_BUFFER waiting for the client's window, this side stops being read
        else:
            s.send_now(data)  # what fits the windows goes at once, the rest waits in ``out``
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
            if exc is not None or not (self.eof or self.away == _SENT):
                s._reset(h2.errors.ErrorCodes.CANCEL)
            else:
                s.end_pending = True
                s.pump()
            s.conn.flush_later()
        if s.ended:
            s._finish()
        # else: what the sandbox sent waits for the client's window; pump() ends the stream then
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
            fr = self.from_the_client
            if fr is not None:
                if self.away:
                    data = self._going_away(fr, data, to_client=False)
                    if not data:
                        return
                else:
                    fr.feed(data)
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
        """The gateway drains: Close 1001 to both sides, now or at the first moment both directions
        are between frames. False when it cannot (not a WebSocket, framing not followed, a closing
        handshake under way): the tunnel then ends when its ends close it or at ``shutdown_timeout``."""
        if self.away:
            return True
        if not self._may_go_away():
            return False
        self.away = _WANTED
        self._closes_if_between_frames()
        return True

    def _may_go_away(self) -> bool:
        a, b = self.from_the_client, self.from_sandbox
        if a is None or b is None or a.lost or b.lost or a.closed or b.closed:
            return False
        s = self.stream
        return not (self.closed or self.eof or s.ended or s.remote_ended or self.transport.is_closing())

    def _closes_if_between_frames(self) -> bool:
        a, b = self.from_the_client, self.from_sandbox
        assert a is not None and b is not None
        if not (a.at_boundary and b.at_boundary):
            return False
        s = self.stream
        s.out += close_frame()
        s.pump()
        s.conn.flush_now()
        self.transport.write(close_frame(masked=True))
        self.away = _SENT
        self.gate.open(self.gate.reasons)  # from now on read only to find the sandbox's Close
        s.resume_reading(s.paused)
        return True

    def _going_away(self, fr: FrameTracker, data: bytes, to_client: bool) -> bytes:
        """While a drain wants Close frames: relay up to the next boundary, send the Closes when both
        directions are at one; after them, read each side only for its Close. Returns what is still
        to relay now."""
        if self.away == _WANTED:
            used = fr.feed(data, until_boundary=True)
            head, rest = data[:used], data[used:]
            if head:
                self._relay(head, to_client)
            if not self._may_go_away():
                self.away = _RELAYING
                if rest:
                    fr.feed(rest)
                return rest
            if not self._closes_if_between_frames():
                if rest:
                    fr.feed(rest)
                return rest  # the other direction is inside a frame: relay on, try again later
            data = rest
        fr.feed(data)  # _SENT: dropped; its Close ends that side's handshake
        if fr.closed:
            if to_client:
                if not self.transport.is_closing():
                    self.transport.close()
            else:
                s = self.stream
                if not s.ended:
                    s.end_pending = True
                    s.pump()
                    s.conn.flush_later()
        return b""

    def _relay(self, data: bytes, to_client: bool) -> None:
        if to_client:
            s = self.stream
            if not s.ended:
                s.out += data
                s.pump()
        else:
            self.transport.write(data)

    def close(self) -> None:
        s = self.stream
        if not s.ended:
            s._reset(h2.errors.ErrorCodes.CANCEL)
        if not self.closed:
            self.transport.close()

    def reset(self) -> None:
        """The sandbox is gone or replaced."""
        self.client_gone()


_RELAYING, _WANTED, _SENT = 0, 1, 2  # H2Tunnel.away, as tunnel.py's


def start(stream: H2Stream, x: Exchange, up: UpstreamConnection, head: bytes, rest: bytes, websocket: bool) -> None:
    """The sandbox answered 101 to the stream's extended CONNECT: answer 200, join the two."""
    ctx = stream.ctx
    fields = h2map.response_fields(analyze_response(head, 101, False, False, False, ctx.own_cookie)[0], tunnel=True)
    if x.rid and ctx.rid_header and ctx.rid_in_response.search(head) is None:
        fields.append((ctx.rid_header_h2, x.rid))
    try:
        stream.fit(fields, "101 head")
    except framing.FramingError as e:  # (never sent: other streams share the connection, h2map.py)
        log.info("%s from %s: the stream is reset", e, up.address)
        up.close()
        stream._reset(h2.errors.ErrorCodes.INTERNAL_ERROR)
        return
    t = H2Tunnel(stream, up, x)
    if websocket:
        t.from_the_client = FrameTracker(masked=True)  # RFC 6455 §5.3: a client masks every frame
        t.from_sandbox = FrameTracker(masked=False)
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
