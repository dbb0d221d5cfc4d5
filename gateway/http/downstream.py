"""The client side: one protocol per client connection, parsing requests with httptools (llhttp).

Every request is framed by the parser before a byte of it goes upstream: heads are parsed and
re-serialised by the header policy (headers.py), bodies are passed as the parser delimits them.
Anything the parser or the policy refuses is answered 400 (431 for oversized heads) with a reason
code, and the connection is closed, since after a framing error nobody can know where the next
request would begin (RFC 9112 §11.2).

Requests on one connection are answered in order. Pipelined requests (a head arriving while an
earlier response is still streaming) wait in a queue while reading pauses, so a pipeline costs at
most one read buffer. Each request is routed on its own: a load balancer sends requests for many
sandboxes down one connection.
"""

from __future__ import annotations

import asyncio
from typing import cast
import collections
import logging
import socket
import struct

import httptools

from gateway import errors
from gateway.errors import Reason
from gateway.http import flow, framing, tunnel
from gateway.http.context import Context
from gateway.http.headers import Peer, prepare_request
from gateway.http.proxy import Exchange
from gateway.http.upstream import UpstreamConnection

__all__ = ["ClientConnection"]

log = logging.getLogger("gateway.downstream")

_LINGER_RESET = struct.pack("ii", 1, 0)


class _Reject(Exception):
    """Raised from a parser callback to refuse the request with ``reason``."""

    def __init__(self, reason: Reason) -> None:
        super().__init__(reason.code)
        self.reason = reason


class _Stop(Exception):
    """Raised from a parser callback when nothing more on this connection will be served."""


def _parser_reason(e: httptools.HttpParserError) -> Reason:
    msg = str(e).lower()
    if "content-length" in msg or "transfer-encoding" in msg or "chunk" in msg:
        return errors.INVALID_FRAMING
    return errors.MALFORMED_REQUEST


class ClientConnection(asyncio.Protocol):
    """A connection from a client (a browser, an SDK, or a load balancer multiplexing many)."""

    __slots__ = (
        "active",
        "broken",
        "closing",
        "ctx",
        "eof",
        "gate",
        "head_size",
        "in_feed",
        "last_active",
        "listen_port",
        "parser",
        "parsing",
        "peer",
        "pumping",
        "queue",
        "tls",
        "transport",
        "write_paused",
    )

    def __init__(self, ctx: Context, listen_port: int, tls: bool = False) -> None:
        self.ctx = ctx
        self.listen_port = listen_port
        self.tls = tls
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.gate: flow.ReadGate = None  # type: ignore[assignment]
        self.peer: Peer = None  # type: ignore[assignment]
        self.parser = httptools.HttpRequestParser(self)
        self.active: Exchange | None = None  # the exchange whose response is being sent
        self.parsing: Exchange | None = None  # the exchange whose request is being parsed
        self.queue: collections.deque[Exchange] = collections.deque()
        self.in_feed = False
        self.pumping = False
        self.write_paused = False
        self.closing = False
        self.eof = False
        self.broken: Reason | None = None
        self.head_size = 0
        self.last_active = ctx.clock

    # ---- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = transport = cast(asyncio.Transport, transport)
        self.gate = flow.ReadGate(transport)
        flow.tune(transport)
        peername = transport.get_extra_info("peername")
        ip = peername[0] if isinstance(peername, tuple) else "unix"
        self.peer = Peer.make(ip, self.listen_port, self.tls, self.ctx.trusted)
        self.ctx.connections.add(self)

    def data_received(self, data: bytes) -> None:
        if self.closing or self.broken is not None:
            return
        self.in_feed = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as e:
            self._upgraded(data[e.args[0] :])
        except httptools.HttpParserCallbackError as e:
            cause = e.__context__
            if isinstance(cause, _Reject):
                self._protocol_error(cause.reason)
            elif not isinstance(cause, _Stop):
                log.error("request handling failed", exc_info=cause)
                self._protocol_error(errors.INTERNAL_ERROR)
                if cause is not None and not isinstance(cause, Exception):
                    raise cause from None
        except httptools.HttpParserError as e:
            if self.parsing is not None or not self.closing:
                self._protocol_error(_parser_reason(e))
        finally:
            self.in_feed = False
        x = self.active
        if x is not None and x.up is not None and not x.done:
            x.flush_up()

    def eof_received(self) -> bool:
        # A client may half-close after its request (RFC 9112 §9.6 allows it): answer, then close.
        self.eof = True
        if self.active is None and self.parsing is None and not self.queue:
            return False
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self.ctx.connections.discard(self)
        for x in (self.active, self.parsing, *self.queue):
            if x is not None:
                x.abort()
        self.queue.clear()
        self.active = self.parsing = None

    def pause_writing(self) -> None:
        self.write_paused = True
        x = self.active
        if x is not None and x.up is not None:
            x.up.gate.close(flow.PEER_BUSY)

    def resume_writing(self) -> None:
        self.write_paused = False
        x = self.active
        if x is not None and x.up is not None:
            x.up.gate.open(flow.PEER_BUSY)

    # ---- httptools callbacks

    def on_message_begin(self) -> None:
        if self.closing:
            raise _Stop
        self.parsing = Exchange(self)
        self.head_size = 0
        self.last_active = self.ctx.clock

    def on_url(self, url: bytes) -> None:
        x = self.parsing
        assert x is not None
        x.url += url
        self.head_size += len(url)
        if self.head_size > self.ctx.config.max_request_head_size:
            raise _Reject(errors.HEAD_TOO_LARGE)

    def on_header(self, name: bytes, value: bytes) -> None:
        x = self.parsing
        assert x is not None
        self.head_size += len(name) + len(value) + 4
        if x.head_done:
            x.trailers.append((name, value))
            if self.head_size > self.ctx.config.max_request_head_size:
                raise _Reject(errors.HEAD_TOO_LARGE)
            return
        x.headers.append((name, value))
        if self.head_size > self.ctx.config.max_request_head_size or len(x.headers) > self.ctx.config.max_header_count:
            raise _Reject(errors.HEAD_TOO_LARGE)

    def on_headers_complete(self) -> None:
        x = self.parsing
        assert x is not None
        if self.closing:
            raise _Stop
        x.head_done = True
        self.head_size = 0
        p = self.parser
        version = p.get_http_version()
        if version != "1.1" and version != "1.0":
            raise _Reject(errors.MALFORMED_REQUEST)
        x.method = p.get_method()
        x.http10 = version == "1.0"
        x.keep_alive = p.should_keep_alive()
        prep = prepare_request(x.headers, self.peer, x.http10, self.ctx.upgrade_protocols)
        if isinstance(prep, Reason):
            raise _Reject(prep)
        if p.should_upgrade() and prep.body != framing.NONE:
            # llhttp treats what follows an Upgrade head as the new protocol; a body there is
            # ambiguous (body or tunnel bytes?) and so refused, like any other framing doubt.
            raise _Reject(errors.INVALID_FRAMING)
        x.prep = prep
        if self.active is None:
            self.active = x
            x.start()
        else:
            self.queue.append(x)
            self.gate.close(flow.QUEUED)

    def on_body(self, body: bytes) -> None:
        x = self.parsing
        assert x is not None
        x.on_request_body(body)

    def on_message_complete(self) -> None:
        x = self.parsing
        assert x is not None
        self.parsing = None
        x.on_request_complete()
        if self.eof and self.active is None and not self.queue:
            self.close()

    # ---- exchanges

    def exchange_done(self, x: Exchange, keep_alive: bool) -> None:
        """``x``'s response is complete: serve the next request, or close."""
        if x is not self.active:
            return
        self.active = None
        self.last_active = self.ctx.clock
        if not keep_alive or self.closing:
            self.close()
            return
        if x.early:  # an Upgrade that was refused: what followed it is the next request
            data, x.early = x.early, b""
            self.gate.open(flow.UPGRADING)
            self.ctx.loop.call_soon(self.data_received, data)
        self._pump()

    def _pump(self) -> None:
        if self.pumping:
            return
        self.pumping = True
        try:
            while self.active is None and self.queue and not self.closing:
                x = self.active = self.queue.popleft()
                x.start()
        finally:
            self.pumping = False
        if self.active is None and not self.closing:
            self.gate.open(flow.QUEUED)
            if self.broken is not None:
                self._answer_broken()
            elif self.eof and self.parsing is None:
                self.close()

    def _protocol_error(self, reason: Reason) -> None:
        """The byte stream cannot be parsed further: answer what can be answered, then close."""
        self.broken = reason
        bad = self.parsing
        self.parsing = None
        if bad is not None:
            if bad is self.active:
                bad.fail(reason, close=True)
                return
            if bad in self.queue:
                self.queue.remove(bad)
            bad.abort()
        if self.active is None and not self.queue:
            self._answer_broken()

    def _answer_broken(self) -> None:
        reason = self.broken
        assert reason is not None
        if not self.closing:
            self.transport.write(errors.render(reason, close=True))
            self.close()

    def _upgraded(self, rest: bytes) -> None:
        """llhttp stopped after an Upgrade (or CONNECT) request; ``rest`` is what followed it."""
        x = self.parsing or self._last_exchange()
        if x is None or x.done or x.prep is None or x.prep.upgrade is None:
            # The Upgrade was dropped (or refused): the connection stays HTTP/1.1.
            if rest and not self.closing:
                self.data_received(rest)
            return
        x.early += rest
        self.gate.close(flow.UPGRADING)

    def _last_exchange(self) -> Exchange | None:
        if self.queue:
            return self.queue[-1]
        return self.active

    def become_tunnel(self, x: Exchange, up: UpstreamConnection, early: bytes) -> None:
        """The sandbox accepted the Upgrade: hand both transports to a byte tunnel."""
        self.active = None
        self.closing = True
        self.ctx.connections.discard(self)
        for q in self.queue:  # nothing may follow an Upgrade request on the same connection
            q.abort()
        self.queue.clear()
        tunnel.splice(self.ctx, self.transport, up.transport, early, client_write_paused=self.write_paused,
                      upstream_write_paused=up.write_paused)

    # ---- closing

    def close(self) -> None:
        """Close after what is buffered has been written."""
        if not self.closing:
            self.closing = True
            self.transport.close()

    def reset(self) -> None:
        """Reset the connection (RST): a response cut short must not look complete."""
        self.closing = True
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
            except OSError:
                pass
        self.transport.abort()

    def check_timeouts(self, now: float) -> None:
        """Called about once a second: slow request heads get 408, idle connections close."""
        cfg = self.ctx.config
        x = self.parsing
        if x is not None and not x.head_done:
            if now - self.last_active > cfg.request_head_timeout:
                self.parsing = None
                x.abort()
                if self.active is None and not self.queue:
                    self.transport.write(errors.render(errors.REQUEST_TIMEOUT, close=True))
                self.close()
        elif self.active is None and x is None and not self.queue:
            limit = cfg.client_idle_timeout if not self.ctx.draining else 0.0
            if now - self.last_active >= limit:
                self.close()
