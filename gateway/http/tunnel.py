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
  enforces its own idle limit. Operators who want one set it.

Only this module and flow.py pause and resume reading on transports.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from gateway.http import flow

if TYPE_CHECKING:
    from gateway.http.context import Context
    from gateway.http.proxy import Exchange
    from gateway.http.upstream import UpstreamConnection

__all__ = ["TunnelEnd", "splice"]


class TunnelEnd(asyncio.Protocol):
    """One side of a tunnel: what it reads, its peer writes."""

    __slots__ = ("address", "closed", "count", "ctx", "eof", "exchange", "execution_id", "gate", "is_client", "last",
                 "peer", "sandbox_id", "transport")  # fmt: skip

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

    def data_received(self, data: bytes) -> None:
        self.peer.transport.write(data)
        self.last = self.ctx.clock
        self.count += len(data)

    def idle_since(self) -> float:
        return max(self.last, self.peer.last)

    def eof_received(self) -> bool:
        self.eof = True
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
) -> None:
    """Join a client and an upstream connection; ``client_early`` are bytes the client sent after
    its Upgrade head. The tunnel's sandbox side takes the upstream connection's place among the
    sandbox's open connections (reset when the sandbox goes away)."""
    upstream = up.transport
    upstream_write_paused = up.write_paused
    a = TunnelEnd(ctx, client, True)
    b = TunnelEnd(ctx, upstream, False)
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
        upstream.write(client_early)
