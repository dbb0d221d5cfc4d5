"""The sandbox side: one protocol per upstream connection, and the keep-alive pool.

Each :class:`UpstreamConnection` parses responses with httptools (llhttp) and hands the events to
the exchange it serves. Idle connections wait in the :class:`Pool`, keyed by (address, port,
execution_id), for at most ``upstream_idle_timeout`` seconds: shorter than the keep-alive timeout
of common app servers (Node's 5 s, uvicorn's 5 s), so the gateway closes an idle connection before
the sandbox does and rarely writes into one the sandbox is closing.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, cast

import httptools

from gateway import errors
from gateway.errors import Reason
from gateway.http import flow
from gateway.policy import PoolKey

if TYPE_CHECKING:
    from gateway.http.proxy import Exchange

__all__ = ["Pool", "UpstreamConnection"]

log = logging.getLogger("gateway.upstream")


class _HeadDone(Exception):
    """Raised from a parser callback to end a bodiless response httptools would wait on."""


class _TooLarge(Exception):
    pass


class UpstreamConnection(asyncio.Protocol):
    """A connection to a sandbox port; serves one exchange at a time (no upstream pipelining)."""

    __slots__ = (
        "closed",
        "exchange",
        "gate",
        "got_bytes",
        "head_done",
        "head_size",
        "headers",
        "idle_since",
        "key",
        "max_head",
        "parser",
        "phrase",
        "pool",
        "reusable",
        "reused",
        "trailers",
        "transport",
        "write_paused",
    )

    def __init__(self, pool: Pool, key: PoolKey) -> None:
        self.pool = pool
        self.key = key
        self.max_head = pool.max_head
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.gate: flow.ReadGate = None  # type: ignore[assignment]
        self.parser = httptools.HttpResponseParser(self)
        self.exchange: Exchange | None = None
        self.headers: list[tuple[bytes, bytes]] = []
        self.trailers: list[tuple[bytes, bytes]] = []
        self.phrase = b""
        self.head_done = False
        self.head_size = 0
        self.got_bytes = False
        self.reused = False
        self.reusable = True
        self.closed = False
        self.write_paused = False
        self.idle_since = 0.0

    # ---- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = transport = cast(asyncio.Transport, transport)
        self.gate = flow.ReadGate(transport)
        flow.tune(transport)
        self.pool.opened += 1

    def data_received(self, data: bytes) -> None:
        x = self.exchange
        if x is None:  # an idle connection must stay silent; whatever it says, it is done
            self.close()
            return
        self.got_bytes = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as e:
            x.on_upstream_upgrade(data[e.args[0] :])
            return
        except httptools.HttpParserCallbackError as e:
            cause = e.__context__
            if isinstance(cause, _HeadDone):
                # No body follows a HEAD response; anything after its head is garbage.
                self.parser = httptools.HttpResponseParser(self)
                if not data.endswith(b"\r\n\r\n"):
                    self.reusable = False
                x.on_response_complete(self)
            elif isinstance(cause, _TooLarge):
                x.on_upstream_error(errors.UPSTREAM_INVALID_RESPONSE, "response head too large")
            else:
                x.on_upstream_error(errors.INTERNAL_ERROR, f"{cause!r}")
                if cause is not None and not isinstance(cause, Exception):
                    raise cause from None
                log.error("response handling failed", exc_info=cause)
        except httptools.HttpParserError as e:
            x.on_upstream_error(errors.UPSTREAM_INVALID_RESPONSE, str(e))
        if self.exchange is not None:
            self.exchange.flush_down()
        elif x.down_buf:
            x.flush_down()

    def eof_received(self) -> bool:
        x = self.exchange
        if x is not None:
            x.on_upstream_closed(None, eof=True)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.opened -= 1
        x = self.exchange
        if x is not None:
            self.exchange = None
            x.on_upstream_closed(exc, eof=False)
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

    # ---- httptools callbacks

    def on_message_begin(self) -> None:
        self.headers = []
        self.phrase = b""
        self.head_done = False
        self.head_size = 0

    def on_status(self, phrase: bytes) -> None:
        self.phrase += phrase
        self.head_size += len(phrase)
        if self.head_size > self.max_head:
            raise _TooLarge

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.head_done:
            self.trailers.append((name, value))
            return
        self.headers.append((name, value))
        self.head_size += len(name) + len(value) + 4
        if self.head_size > self.max_head:
            raise _TooLarge

    def on_headers_complete(self) -> None:
        self.head_done = True
        x = self.exchange
        assert x is not None
        if x.on_response_head(self):
            raise _HeadDone

    def on_body(self, body: bytes) -> None:
        x = self.exchange
        assert x is not None
        x.on_response_body(body)

    def on_message_complete(self) -> None:
        x = self.exchange
        assert x is not None
        x.on_response_complete(self)

    # ---- pool side

    def close(self) -> None:
        """Close without waiting for anything (the exchange, if any, is already detached)."""
        self.exchange = None
        if not self.closed:
            self.closed = True
            self.transport.abort()

    def detach(self) -> None:
        """The exchange is over: back to the pool if the connection can serve another."""
        self.exchange = None
        self.trailers = []
        if self.write_paused or self.gate.reasons:
            self.reusable = False
        self.pool.release(self)


class Pool:
    """Idle upstream connections per key, most recently used first, with caps and an idle timeout."""

    __slots__ = ("_idle", "_loop", "idle_count", "idle_timeout", "max_head", "max_idle", "max_per_key", "opened")

    def __init__(self, idle_timeout: float, max_per_key: int, max_idle: int, max_head: int) -> None:
        self._loop = asyncio.get_running_loop()
        self._idle: dict[PoolKey, list[UpstreamConnection]] = {}
        self.idle_timeout = idle_timeout
        self.max_per_key = max_per_key
        self.max_idle = max_idle
        self.max_head = max_head
        self.idle_count = 0
        self.opened = 0

    def acquire(self, key: PoolKey) -> UpstreamConnection | None:
        conns = self._idle.get(key)
        if not conns:
            return None
        limit = self._loop.time() - self.idle_timeout
        while conns:
            c = conns.pop()
            self.idle_count -= 1
            if not c.closed and c.idle_since > limit:
                if not conns:
                    del self._idle[key]
                c.reused = True
                c.got_bytes = False
                return c
            c.close()
        del self._idle[key]
        return None

    def release(self, c: UpstreamConnection) -> None:
        if c.closed or not c.reusable or self.idle_count >= self.max_idle:
            c.close()
            return
        conns = self._idle.setdefault(c.key, [])
        if len(conns) >= self.max_per_key:
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
            for c in conns:
                if c not in keep:
                    c.close()
            self.idle_count -= len(conns) - len(keep)
            if keep:
                self._idle[key] = keep
            else:
                del self._idle[key]

    def drop(self, predicate: object = None) -> None:
        """Close every idle connection (shutdown)."""
        for conns in self._idle.values():
            for c in conns:
                c.close()
        self._idle.clear()
        self.idle_count = 0

    async def connect(self, address: str, port: int, key: PoolKey, timeout: float) -> UpstreamConnection:
        """A new connection (not from the pool); raises OSError or TimeoutError."""
        async with asyncio.timeout(timeout):
            _, proto = await self._loop.create_connection(lambda: UpstreamConnection(self, key), address, port)
        return proto


def connect_failure(exc: BaseException) -> tuple[Reason, str]:
    """The reason code for a failed connect attempt (refused is handled by the caller's retry)."""
    if isinstance(exc, TimeoutError):
        return errors.UPSTREAM_CONNECT_TIMEOUT, "connect timed out"
    return errors.UPSTREAM_CONNECT_FAILED, f"{type(exc).__name__}: {exc}"
