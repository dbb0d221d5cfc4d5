"""The sandbox side: one protocol per upstream connection, and the keep-alive pool.

An :class:`UpstreamConnection` frames responses the same way the client side frames requests
(head end, Content-Length count, chunked framer, or until close) and feeds llhttp exactly each
message's bytes, so a response that llhttp would frame differently is refused (502) instead of
desynchronising a pooled connection.

Idle connections wait in the :class:`Pool`, keyed by (address, port, execution_id), for at most
``upstream_idle_timeout`` seconds: shorter than the keep-alive timeout of common app servers
(Node's 5 s, uvicorn's 5 s), so the gateway closes an idle connection before the sandbox does and
rarely writes into one the sandbox is closing.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Protocol, cast

import httptools

from gateway import errors
from gateway.errors import Reason
from gateway.http import flow, framing
from gateway.http.headers import ResponseHead
from gateway.policy import PoolKey

if TYPE_CHECKING:
    from gateway.http.proxy import Exchange

__all__ = ["Pool", "SandboxLink", "UpstreamConnection", "connect_failure"]

log = logging.getLogger("gateway.upstream")

_HEAD, _LENGTH, _CHUNKED, _CLOSE = range(4)


class SandboxLink(Protocol):
    """An open connection to a sandbox (pooled, busy, or a tunnel's sandbox side)."""

    address: str
    execution_id: str

    def reset(self) -> None: ...


class _Invalid(Exception):
    """The response cannot be framed; the exchange fails with upstream_invalid_response."""


class UpstreamConnection(asyncio.Protocol):
    """A connection to a sandbox port; serves one exchange at a time (no upstream pipelining)."""

    __slots__ = (
        "address",
        "closed",
        "dechunk",
        "exchange",
        "execution_id",
        "fed",
        "framer",
        "gate",
        "got_bytes",
        "idle_since",
        "key",
        "last_head",
        "llhttp_done",
        "parser",
        "pending",
        "pool",
        "remaining",
        "reusable",
        "reused",
        "sandbox_id",
        "state",
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
        self.parser = httptools.HttpResponseParser(self)
        self.exchange: Exchange | None = None
        self.state = _HEAD
        self.pending = b""
        self.fed = 0
        self.remaining = 0
        self.framer: framing.ChunkedFramer | None = None
        self.dechunk = False
        self.llhttp_done = False
        self.got_bytes = False
        self.reused = False
        self.reusable = True
        self.closed = False
        self.write_paused = False
        self.idle_since = 0.0
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
        self.pool.opened += 1
        self.pool.link(self.sandbox_id, self)

    def data_received(self, data: bytes) -> None:
        x = self.exchange
        if x is None:  # an idle connection must stay silent; whatever it says, it is done
            self.close()
            return
        self.got_bytes = True
        x.resp_bytes += len(data)
        try:
            if self.pending:
                data = self.pending + data
                self.pending = b""
            pos = 0
            n = len(data)
            parser = self.parser
            while pos < n:
                st = self.state
                if st == _HEAD:
                    end = data.find(b"\r\n\r\n", pos)
                    fed = self.fed
                    if end < 0:
                        rest = data[pos:] if pos else data
                        if len(rest) > self.pool.max_head:
                            raise _Invalid("response head too large")
                        parser.feed_data(rest[fed:] if fed else rest)
                        self.pending = rest
                        self.fed = len(rest)
                        break
                    end += 4
                    if end - pos > self.pool.max_head:
                        raise _Invalid("response head too large")
                    head = data if (pos == 0 and end == n) else data[pos:end]
                    self.fed = 0
                    pos = end
                    try:
                        parser.feed_data(head[fed:] if fed else head)
                    except httptools.HttpParserUpgrade:
                        self.exchange = None
                        x.on_upstream_upgrade(self, head, data[pos:])
                        return
                    status = parser.get_status_code()
                    if status < 200:
                        x.on_interim(head, status)
                        continue
                    body, length = x.on_response_head(self, head, status)
                    if body == framing.NONE or (body == framing.LENGTH and not length):
                        if not self.llhttp_done and x.req.method == b"HEAD":
                            # llhttp cannot be told a response answers HEAD (RFC 9110 §9.3.2):
                            # it waits for the body the fields describe. A new parser starts clean.
                            self.parser = parser = httptools.HttpResponseParser(self)
                            self.llhttp_done = True
                        self._complete(x, pos < n)
                        return
                    if body == framing.LENGTH:
                        if n - pos >= length:  # the whole body came with the head (small responses)
                            piece = data[pos:] if n - pos == length else data[pos : pos + length]
                            parser.feed_data(piece)
                            x.down_buf.append(piece)
                            self._complete(x, n - pos > length)
                            return
                        self.state = _LENGTH
                        self.remaining = length
                    elif body == framing.CHUNKED:
                        self.state = _CHUNKED
                        self.framer = framing.ChunkedFramer()
                        self.dechunk = x.body_out == framing.CLOSE
                    else:
                        self.state = _CLOSE
                elif st == _LENGTH:
                    take = self.remaining if self.remaining < n - pos else n - pos
                    piece = data if (pos == 0 and take == n) else data[pos : pos + take]
                    parser.feed_data(piece)
                    pos += take
                    self.remaining -= take
                    x.down_buf.append(piece)
                    if not self.remaining:
                        self._complete(x, pos < n)
                        return
                elif st == _CHUNKED:
                    framer = self.framer
                    assert framer is not None
                    segments: list[tuple[int, int]] | None = [] if self.dechunk else None
                    end = framer.scan(data, pos, segments)
                    stop = n if end < 0 else end
                    piece = data if (pos == 0 and stop == n) else data[pos:stop]
                    parser.feed_data(piece)
                    pos = stop
                    if segments is None:
                        x.down_buf.append(piece)
                    else:
                        x.down_buf += [data[a:b] for a, b in segments if b > a]
                    if end >= 0:
                        self._complete(x, pos < n)
                        return
                else:  # _CLOSE: everything until the sandbox closes is body
                    x.on_close_delimited(data[pos:] if pos else data)
                    break
        except (httptools.HttpParserError, framing.FramingError, _Invalid, ValueError) as e:
            x.on_upstream_error(errors.UPSTREAM_INVALID_RESPONSE, str(e) or type(e).__name__)
        if x.down_buf:
            x.flush_down()

    def _complete(self, x: Exchange, extra: bool) -> None:
        if not self.llhttp_done:
            raise _Invalid("llhttp and the gateway disagree on where the response ends")
        self.state = _HEAD
        self.framer = None
        if extra:  # bytes after a complete response, unasked for: the connection is not trustworthy
            self.reusable = False
        x.on_response_complete(self)

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
            x.client.gate.close(flow.PEER_BUSY)

    def resume_writing(self) -> None:
        self.write_paused = False
        x = self.exchange
        if x is not None:
            x.client.gate.open(flow.PEER_BUSY)

    # ---- llhttp callbacks (it validates; the gateway frames)

    def on_message_begin(self) -> None:
        if self.state != _HEAD:
            raise _Invalid("llhttp sees a new response where the gateway sees a body")
        self.llhttp_done = False

    def on_message_complete(self) -> None:
        self.llhttp_done = True

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
        "max_head",
        "max_idle",
        "max_per_key",
        "opened",
    )

    def __init__(self, idle_timeout: float, max_per_key: int, max_idle: int, max_head: int) -> None:
        self._loop = asyncio.get_running_loop()
        self._idle: dict[PoolKey, list[UpstreamConnection]] = {}
        self.idle_timeout = idle_timeout
        self.max_per_key = max_per_key
        self.max_idle = max_idle
        self.max_head = max_head
        self.idle_count = 0
        self.opened = 0
        self.links: dict[str, set[SandboxLink]] = {}  # sandbox ID -> its open upstream connections

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
        """The most recently used idle connection for ``key`` that is still fresh, or None."""
        conns = self._idle.get(key)
        if not conns:
            return None
        limit = self._loop.time() - self.idle_timeout
        while conns:
            c = conns.pop()
            self.idle_count -= 1
            if c.idle_since > limit and not c.closed:
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
            _, proto = await self._loop.create_connection(
                lambda: UpstreamConnection(self, key, sandbox_id, address, execution_id), address, port
            )
        return proto


def connect_failure(exc: BaseException) -> tuple[Reason, str]:
    """The reason code for a failed connect attempt (refused is handled by the caller's retry)."""
    if isinstance(exc, TimeoutError):
        return errors.UPSTREAM_CONNECT_TIMEOUT, "connect timed out"
    return errors.UPSTREAM_CONNECT_FAILED, f"{type(exc).__name__}: {exc}"
