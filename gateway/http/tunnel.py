"""The raw byte tunnel both connections become after a 101 (Switching Protocols).

After the sandbox accepts an Upgrade (RFC 9110 §7.8) the gateway stops speaking HTTP on both
connections: bytes pass unchanged in both directions, WebSocket frames included (never parsed, so
subprotocols, extensions such as permessage-deflate, ping payloads and message sizes are whatever
the two ends agreed). What the tunnel does keep:

- backpressure both ways: when one side's write buffer fills, the other side stops reading;
- half-close: a FIN from one side becomes a write shutdown towards the other (RFC 9293 §3.6);
- prompt close: when either side resets, the other is reset too;
- an idle timeout (``tunnel_idle_timeout``), off by default: WebSocket apps keep their own pings,
  a notebook kernel can rightly be silent for hours, and the load balancer in front already
  enforces its own idle limit. Operators who want one set it;
- a clean end on drain (:meth:`TunnelEnd.go_away`): for a WebSocket, each direction's frame
  boundaries are followed by reading frame headers only (wsframes.py). When the listeners close,
  the gateway sends the client a Close frame 1001 (going away) and the sandbox a masked Close 1001
  (as the client it is on that side, RFC 6455 §5.3), at the first moment both directions are
  between frames, then stops relaying: it finishes each side's closing handshake itself (that
  side's Close, or its FIN, ends it; ``shutdown_timeout`` bounds it). A tunnel whose framing it
  cannot follow, or whose ends already began closing, ends as before.

Only this module and flow.py pause and resume reading on transports.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from gateway.http import flow
from gateway.http.wsframes import FrameTracker, close_frame

if TYPE_CHECKING:
    from gateway.http.context import Context
    from gateway.http.proxy import Exchange
    from gateway.http.upstream import UpstreamConnection

__all__ = ["TunnelEnd", "splice"]

#: ``TunnelEnd.away``: relaying as usual; drain wants Close frames at the next frame boundary;
#: the Close frames are sent and the gateway ends each side's closing handshake itself.
RELAYING, WANTED, SENT = 0, 1, 2


class TunnelEnd(asyncio.Protocol):
    """One side of a tunnel: what it reads, its peer writes."""

    __slots__ = ("address", "away", "closed", "count", "ctx", "eof", "exchange", "execution_id", "frames", "gate",
                 "is_client", "last", "peer", "sandbox_id", "transport")  # fmt: skip

    def __init__(self, ctx: Context, transport: asyncio.Transport, is_client: bool) -> None:
        self.ctx = ctx
        self.is_client = is_client
        self.sandbox_id = self.address = self.execution_id = ""  # the sandbox side: where it leads
        self.transport = transport
        self.gate = flow.ReadGate(transport)
        self.peer: TunnelEnd = None  # type: ignore[assignment]
        self.eof = False
        self.closed = False
        self.last = ctx.clock  # when this side last sent bytes (the coarse clock)
        self.count = 0  # bytes this side sent
        self.exchange: Exchange | None = None  # on the client side: the request that became this tunnel
        self.frames: FrameTracker | None = None  # a WebSocket: the frames this side sends
        self.away = RELAYING

    def data_received(self, data: bytes) -> None:
        fr = self.frames
        if fr is not None:
            if self.away:
                self._going_away(data)
                return
            fr.feed(data)
        self.peer.transport.write(data)
        self.last = self.ctx.clock
        self.count += len(data)

    def idle_since(self) -> float:
        return max(self.last, self.peer.last)

    # ---- drain: WebSocket close 1001 at a frame boundary

    def go_away(self) -> bool:
        """The gateway is shutting down: end this WebSocket tunnel with Close 1001 on both sides,
        now or at the first moment both directions are between frames. False when it cannot
        (not a WebSocket, framing not followed, a closing handshake already under way): the
        tunnel then ends as before, when its ends close it or at ``shutdown_timeout``."""
        if self.away:
            return True
        if not self._may_go_away():
            return False
        self.away = self.peer.away = WANTED
        if self.frames is not None and self.peer.frames is not None:  # for mypy: _may_go_away said so
            self._send_closes_if_between_frames()
        return True

    def _may_go_away(self) -> bool:
        mine, theirs = self.frames, self.peer.frames
        if mine is None or theirs is None or mine.lost or theirs.lost or mine.closed or theirs.closed:
            return False
        return not any(end.closed or end.eof or end.transport.is_closing() for end in (self, self.peer))

    def _send_closes_if_between_frames(self) -> bool:
        mine, theirs = self.frames, self.peer.frames
        assert mine is not None and theirs is not None
        if not (mine.at_boundary and theirs.at_boundary):
            return False
        client, sandbox = (self, self.peer) if self.is_client else (self.peer, self)
        client.transport.write(close_frame())
        sandbox.transport.write(close_frame(masked=True))
        for end in (client, sandbox):
            end.away = SENT
            # From now on what either side sends is read only to find its Close, never relayed:
            # nothing holds reading back any more.
            end.gate.open(end.gate.reasons)
        return True

    def _going_away(self, data: bytes) -> None:
        fr = self.frames
        assert fr is not None
        if self.away == WANTED:
            used = fr.feed(data, until_boundary=True)
            if used:
                self.peer.transport.write(data[:used] if used < len(data) else data)
                self.count += used
                self.last = self.ctx.clock
            if not self._may_go_away():  # this side began closing itself, or its framing is lost
                self.away = self.peer.away = RELAYING
                rest = data[used:]
                if rest:
                    self.data_received(rest)
                return
            if not self._send_closes_if_between_frames():
                rest = data[used:]
                if rest:  # the other direction is inside a frame: relay on, try again later
                    fr.feed(rest)
                    self.peer.transport.write(rest)
                    self.count += len(rest)
                return
            data = data[used:]
        # SENT: what this side sent after our Close is dropped; its own Close ends its handshake.
        fr.feed(data)
        if fr.closed and not self.transport.is_closing():
            self.transport.close()

    # ----

    def eof_received(self) -> bool:
        self.eof = True
        if self.away == SENT:  # the side ended without (or after) its Close: the handshake is over
            return False
        peer = self.peer
        if peer.closed:
            return False
        if peer.transport.can_write_eof():
            peer.transport.write_eof()
        if peer.eof:  # both directions are finished
            peer.transport.close()
            return False
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if self.closed:
            return
        self.closed = True
        peer = self.peer
        if self.away == SENT and not peer.closed:
            return  # the other side finishes its own closing handshake; its end does the rest
        self.ctx.tunnels.discard(self if self.is_client else peer)
        sandbox_side = peer if self.is_client else self
        self.ctx.pool.unlink(sandbox_side.sandbox_id, sandbox_side)
        self.ctx.closed_one()
        if not peer.closed:
            if exc is not None:
                flow.reset(peer.transport)
            else:
                peer.transport.close()
        client = self if self.is_client else peer
        x = client.exchange
        if x is not None:
            client.exchange = None
            x.tunnel_ended(client.count, client.peer.count)

    def pause_writing(self) -> None:
        self.peer.gate.close(flow.PEER_BUSY)

    def resume_writing(self) -> None:
        self.peer.gate.open(flow.PEER_BUSY)

    def close(self) -> None:
        """Close both sides (shutdown)."""
        self.transport.close()
        self.peer.transport.close()

    def reset(self) -> None:
        """The sandbox is gone or replaced: reset both sides."""
        if not self.closed:
            flow.reset(self.transport)
        if not self.peer.closed:
            flow.reset(self.peer.transport)


def splice(
    ctx: Context,
    client: asyncio.Transport,
    up: UpstreamConnection,
    client_early: bytes,
    *,
    client_write_paused: bool,
    exchange: Exchange | None = None,
    websocket: bool = False,
    sandbox_early: bytes = b"",
) -> None:
    """Join a client and an upstream connection; ``client_early`` are bytes the client sent after
    its Upgrade head. The tunnel's sandbox side takes the upstream connection's place among the
    sandbox's open connections (reset when the sandbox goes away). ``websocket``: the protocol
    both sides switched to, whose frames are then followed; ``sandbox_early`` are the bytes the
    sandbox sent right after its 101 (already relayed to the client, read here for their frames)."""
    upstream = up.transport
    upstream_write_paused = up.write_paused
    a = TunnelEnd(ctx, client, True)
    b = TunnelEnd(ctx, upstream, False)
    if websocket:
        a.frames = FrameTracker(masked=True)  # RFC 6455 §5.3: a client masks every frame
        b.frames = FrameTracker(masked=False)
        b.frames.feed(sandbox_early)
    b.sandbox_id, b.address, b.execution_id = up.sandbox_id, up.address, up.execution_id
    a.peer, b.peer = b, a
    a.exchange = exchange
    ctx.tunnels.add(a)
    up.closed = True  # its protocol is replaced: its connection_lost will not run
    ctx.pool.opened -= 1
    ctx.pool.unlink(up.sandbox_id, up)
    ctx.pool.link(b.sandbox_id, b)
    client.set_protocol(a)
    upstream.set_protocol(b)
    # Start from a known state: reading on, except towards a side whose buffer is already full.
    client.resume_reading()
    upstream.resume_reading()
    if upstream_write_paused:
        a.gate.close(flow.PEER_BUSY)
    if client_write_paused:
        b.gate.close(flow.PEER_BUSY)
    if client_early:
        if a.frames is not None:
            a.frames.feed(client_early)
        upstream.write(client_early)
