"""The sandbox side: one protocol per upstream connection, and the keep-alive pool.

An :class:`UpstreamConnection` frames responses with the same :class:`~gateway.http.framing.Framer`
the client side uses for requests (sandboxes run tenant code: every rule a client's bytes must
follow, a sandbox's must too), and feeds llhttp exactly each message's bytes, so a response that
llhttp would frame differently is refused (502, or a reset once the response has begun) instead of
desynchronising a pooled connection. Response heads are capped in size and field count like
request heads, and a response may bring at most :data:`MAX_INTERIM` 1xx heads before its final
one, of :data:`MAX_INTERIM_BYTES` together (each costs an analysis; an endless stream of them would
hold the client forever; and clients count them with the final head: see MAX_INTERIM_BYTES).

Idle connections wait in the :class:`Pool`, keyed by (address, port, execution_id), for at most
``upstream_idle_timeout`` seconds: shorter than the keep-alive timeout of common app servers
(Node's 5 s, uvicorn's 5 s), so the gateway closes an idle connection before the sandbox does and
rarely writes into one the sandbox is closing.
"""

from __future__ import annotations

import asyncio
import logging
import select
from typing import TYPE_CHECKING, Protocol, cast

from mypy_extensions import mypyc_attr

from gateway import errors
from gateway.errors import Reason
from gateway.http import flow, framing
from gateway.http.framing import BODY, END, HEAD, HEAD_BODY, NEED
from gateway.http.headers import ResponseHead
from gateway.policy import OwnListeners, PoolKey

if TYPE_CHECKING:
    from gateway.http.proxy import Exchange

__all__ = [
    "MAX_INTERIM",
    "MAX_INTERIM_BYTES",
    "OwnListener",
    "Pool",
    "SandboxLink",
    "UpstreamConnection",
    "connect_failure",
]

log = logging.getLogger("gateway.upstream")

#: 1xx responses (100 Continue, 103 Early Hints...) accepted before the final response head.
MAX_INTERIM = 16
#: Bytes of those 1xx heads together. Clients count a response's 1xx heads with its final head:
#: curl (7.88, Debian 12's) fails a transfer whose heads pass 128 KiB, and over HTTP/2 it fails the
#: connection with it (nghttp2's callback failure), every stream on it. Sixteen 1xx heads of up to
#: ``max_response_head_size`` each were 1 MiB; these and a final head of 64 KiB stay under 128 KiB.
#: (Early Hints are a few Link fields: browsers use the first 103 only.)
MAX_INTERIM_BYTES = 16384


class SandboxLink(Protocol):
    """An open connection to a sandbox (pooled, busy, or a tunnel's sandbox side)."""

    address: str
    execution_id: str

    def reset(self) -> None: ...


@mypyc_attr(native_class=False)  # (mypyc compiles no subclass of OSError)
class OwnListener(OSError):
    """The connection reached one of the gateway's own listeners (policy.OwnListeners)."""


class _Invalid(Exception):
    """The response cannot be framed; the exchange fails with upstream_invalid_response."""


class UpstreamConnection(asyncio.Protocol):
    """A connection to a sandbox port; serves one exchange at a time (no upstream pipelining)."""

    __slots__ = (
        "address",
        "closed",
        "exchange",
        "execution_id",
        "framer",
        "gate",
        "got_bytes",
        "idle_since",
        "key",
        "last_head",
        "poller",
        "pool",
        "reusable",
        "reused",
        "sandbox_id",
        "transport",
        "write_paused",
    )

    def __init__(
        self, pool: Pool, key: PoolKey, sandbox_id: str = "", address: str = "", execution_id: str = ""
    ) -> None:
        self.pool = pool
        self.key = key
        self.sandbox_id = sandbox_id
        self.address = address
        self.execution_id = execution_id
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.gate: flow.ReadGate = None  # type: ignore[assignment]
        self.framer = framing.Framer(True, pool.max_head, pool.max_fields)
        self.exchange: Exchange | None = None
        self.got_bytes = False
        self.reused = False
        self.reusable = True
        self.closed = False
        self.write_paused = False
        self.idle_since = 0.0
        # Whether the socket is readable, asked before an idle connection is reused (Pool.acquire).
        self.poller: select.poll | None = None
        # (raw head, request flags, analysis) of the previous response: the same resource answered
        # on the same connection within the same second (its Date) has the same head.
        # The last response head, its request flags, its analysis and the head for the client up to a
        # request ID value (None: no ID to add).
        self.last_head: tuple[bytes, int, ResponseHead, bytes | None] | None = None

    # ---- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = t = cast(asyncio.Transport, transport)
        self.gate = flow.ReadGate(t)
        flow.tune(t)
        sock = t.get_extra_info("socket")
        if sock is not None:
            self.poller = p = select.poll()
            p.register(sock.fileno(), select.POLLIN)
        self.pool.opened += 1
        self.pool.link(self.sandbox_id, self)

    def data_received(self, data: bytes) -> None:
        x = self.exchange
        if x is None:  # an idle connection must stay silent; whatever it says, it is done
            self.close()
            return
        self.got_bytes = True
        n = len(data)
        x.resp_bytes += n
        fr = self.framer
        try:
            pos = 0
            ev = fr.next(data, 0)
            while ev:
                if ev <= HEAD_BODY:  # HEAD or HEAD_BODY: a response head
                    pos = fr.end
                    head = fr.head
                    status = fr.status
                    if status < 200:
                        if ev == HEAD_BODY or status == 101:  # a 101 llhttp did not take for an upgrade
                            raise _Invalid("1xx response with a body, or 101 without Connection: upgrade")
                        x.interim += 1
                        x.interim_bytes += len(head)
                        if x.interim > MAX_INTERIM:
                            raise _Invalid(f"more than {MAX_INTERIM} 1xx responses")
                        if x.interim_bytes > MAX_INTERIM_BYTES:
                            raise _Invalid(f"1xx heads of more than {MAX_INTERIM_BYTES} bytes together")
                        x.on_interim(head, status)
                        ev = fr.next(data, pos) if pos < n else NEED
                        continue
                    body, length = x.client.send_head(x, self, head, status)
                    if ev == HEAD:  # llhttp ended the response with its head
                        if body != framing.NONE and not (body == framing.LENGTH and not length):
                            raise _Invalid("llhttp sees no body where the gateway sees one")
                    elif body == framing.NONE and x.req.method == b"HEAD":
                        fr.skip_body()
                    else:
                        if body == framing.CHUNKED and x.body_out == framing.CLOSE:
                            fr.segments = []  # de-chunked for an HTTP/1.0 client
                        ev = fr.body(body, length, data, pos)
                        continue
                    if pos < n:  # bytes after a complete response, unasked for: not trustworthy
                        self.reusable = False
                    x.on_response_complete(self)
                    return
                end = fr.end
                if ev == END:
                    if fr.segments is None:
                        x.down_buf.append(data[pos:end])
                    else:
                        self._dechunked(x, data)
                        fr.segments = None
                        if fr.trailers is not None:
                            x.trailers = fr.trailers
                            fr.trailers = None
                    if end < n:
                        self.reusable = False
                    x.on_response_complete(self)
                    return
                if ev == BODY:
                    if fr.segments is not None:
                        self._dechunked(x, data)
                    elif x.body_in == framing.CLOSE:  # everything until the sandbox closes is body
                        x.on_close_delimited(data[pos:end])
                    else:
                        x.down_buf.append(data[pos:end])
                    pos = end
                    ev = fr.next(data, pos) if pos < n else NEED
                    continue
                # UPGRADE: the sandbox accepted an Upgrade (101)
                self.exchange = None
                x.on_upstream_upgrade(self, fr.head, data[end:])
                return
        except (framing.FramingError, _Invalid) as e:
            x.on_upstream_error(errors.UPSTREAM_INVALID_RESPONSE, str(e) or type(e).__name__)
        if x.down_buf:
            x.flush_down()

    def _dechunked(self, x: Exchange, data: bytes) -> None:
        """The chunk data the framer found in ``data``, without the chunked coding (HTTP/1.0 client)."""
        segments = self.framer.segments
        assert segments is not None
        x.down_buf += [data[a:b] for a, b in segments if b > a]
        segments.clear()

    def eof_received(self) -> bool:
        x = self.exchange
        if x is not None:
            x.on_upstream_closed(self, None, eof=True)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.opened -= 1
        self.pool.unlink(self.sandbox_id, self)
        x = self.exchange
        if x is not None:
            self.exchange = None
            x.on_upstream_closed(self, exc, eof=False)
        else:
            self.pool.forget(self)

    def pause_writing(self) -> None:
        self.write_paused = True
        x = self.exchange
        if x is not None:
            x.client.pause_reading(flow.PEER_BUSY)

    def resume_writing(self) -> None:
        self.write_paused = False
        x = self.exchange
        if x is not None:
            x.client.resume_reading(flow.PEER_BUSY)

    # ---- pool side

    def close(self) -> None:
        """Close without waiting for anything (the exchange, if any, is already detached)."""
        self.exchange = None
        if not self.closed:
            self.closed = True
            self.transport.abort()

    def reset(self) -> None:
        """The sandbox this leads to is gone or replaced: reset (RST), whether idle or busy."""
        if not self.closed:
            flow.reset(self.transport)  # a busy exchange hears of it in connection_lost


class Pool:
    """Idle upstream connections per key, most recently used first, with caps and an idle timeout."""

    __slots__ = (
        "_idle",
        "_loop",
        "idle_count",
        "idle_timeout",
        "links",
        "max_fields",
        "max_head",
        "max_idle",
        "max_per_key",
        "opened",
        "own",
    )

    def __init__(
        self, idle_timeout: float, max_per_key: int, max_idle: int, max_head: int, max_fields: int = 256
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._idle: dict[PoolKey, list[UpstreamConnection]] = {}
        self.idle_timeout = idle_timeout
        self.max_per_key = max_per_key
        self.max_idle = max_idle
        self.max_head = max_head  # response heads: bytes and fields (then 502)
        self.max_fields = max_fields
        self.idle_count = 0
        self.opened = 0
        self.links: dict[str, set[SandboxLink]] = {}  # sandbox ID -> its open upstream connections
        self.own = OwnListeners()  # the gateway's own listeners (server.py), never connected to

    def link(self, sandbox_id: str, conn: SandboxLink) -> None:
        links = self.links.get(sandbox_id)
        if links is None:
            links = self.links[sandbox_id] = set()
        links.add(conn)

    def unlink(self, sandbox_id: str, conn: SandboxLink) -> None:
        links = self.links.get(sandbox_id)
        if links is not None:
            links.discard(conn)
            if not links:
                del self.links[sandbox_id]

    def acquire(self, key: PoolKey) -> UpstreamConnection | None:
        """The most recently used idle connection for ``key`` that is still fresh, or None.

        A connection whose socket is readable is not reused: an idle connection must be silent,
        and bytes (or a FIN) that arrived after its last response but have not been read yet
        (data_received closes it when they are) would otherwise be read as the next request's
        response. One poll(2) without waiting: the kernel's answer, not the event loop's, which
        may not have run the connection's read callback yet in this iteration."""
        conns = self._idle.get(key)
        if not conns:
            return None
        limit = self._loop.time() - self.idle_timeout
        while conns:
            c = conns.pop()
            self.idle_count -= 1
            if c.idle_since > limit and not c.closed:
                p = c.poller
                if p is None or not p.poll(0):
                    c.reused = True
                    c.got_bytes = False
                    return c
            c.close()
        return None

    def release(self, c: UpstreamConnection) -> None:
        if c.closed or not c.reusable or self.idle_count >= self.max_idle:
            c.close()
            return
        conns = self._idle.get(c.key)
        if conns is None:
            conns = self._idle[c.key] = []
        elif len(conns) >= self.max_per_key:
            c.close()
            return
        c.idle_since = self._loop.time()
        conns.append(c)
        self.idle_count += 1

    def forget(self, c: UpstreamConnection) -> None:
        """An idle connection closed by the sandbox leaves the pool."""
        conns = self._idle.get(c.key)
        if conns and c in conns:
            conns.remove(c)
            self.idle_count -= 1
            if not conns:
                del self._idle[c.key]

    def sweep(self) -> None:
        """Close connections idle longer than the timeout (called once a second)."""
        limit = self._loop.time() - self.idle_timeout
        for key in list(self._idle):
            conns = self._idle[key]
            keep = [c for c in conns if c.idle_since > limit and not c.closed]
            if len(keep) == len(conns):
                continue
            for c in conns:
                if c not in keep:
                    c.close()
            self.idle_count -= len(conns) - len(keep)
            if keep:
                self._idle[key] = keep
            else:
                del self._idle[key]

    def close_all(self) -> None:
        """Close every idle connection (shutdown)."""
        for conns in self._idle.values():
            for c in conns:
                c.close()
        self._idle.clear()
        self.idle_count = 0

    async def connect(
        self, address: str, port: int, key: PoolKey, timeout: float, sandbox_id: str = "", execution_id: str = ""
    ) -> UpstreamConnection:
        """A new connection (not from the pool); raises OSError or TimeoutError."""
        async with asyncio.timeout(timeout):
            t, proto = await self._loop.create_connection(
                lambda: UpstreamConnection(self, key, sandbox_id, address, execution_id), address, port
            )
        peer = t.get_extra_info("peername")
        local = t.get_extra_info("sockname")
        if self.own and peer and local and self.own.reached(peer[:2], local[0]):
            proto.close()
            raise OwnListener(f"{address}:{port} is this gateway's own listener")
        return proto


def connect_failure(exc: BaseException) -> tuple[Reason, str]:
    """The reason code for a failed connect attempt (refused is handled by the caller's retry)."""
    if isinstance(exc, TimeoutError):
        return errors.UPSTREAM_CONNECT_TIMEOUT, "connect timed out"
    if isinstance(exc, OwnListener):
        return errors.UPSTREAM_IS_GATEWAY, str(exc)
    return errors.UPSTREAM_CONNECT_FAILED, f"{type(exc).__name__}: {exc}"
