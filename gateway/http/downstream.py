"""The client side: one protocol per client connection.

The connection finds message boundaries itself (head end, Content-Length count, chunked framer)
and feeds httptools (llhttp) exactly the bytes of each request before any of them goes upstream:
llhttp validates the syntax, and its idea of where the message ends must match the gateway's.
Anything refused is answered 400 (431 for oversized heads) with a reason code and the connection
closes, since after a framing error nobody can know where the next request would begin
(RFC 9112 §11.2).

Requests on one connection are answered in order. Pipelined requests (a head arriving while an
earlier response is still streaming) wait in a queue while reading pauses, so a pipeline costs at
most one read buffer. Each request is routed on its own: a load balancer sends requests for many
sandboxes down one connection.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from typing import cast

import httptools

from gateway import errors
from gateway.errors import Reason
from gateway.http import flow, framing, proxy_protocol, tunnel
from gateway.http.context import Context
from gateway.http.headers import Peer, RequestHead, analyze_request
from gateway.http.proxy import Exchange
from gateway.http.upstream import UpstreamConnection

__all__ = ["ClientConnection"]

log = logging.getLogger("gateway.downstream")

_HEAD, _LENGTH, _CHUNKED = range(3)
#: After the listeners close on drain: seconds a connection accepted just before may take to send
#: its first request before it counts as idle and is closed (bounded by ``shutdown_timeout``).
FIRST_REQUEST_GRACE = 5.0


class _Reject(Exception):
    """The request is refused with ``reason``; the connection cannot continue."""

    def __init__(self, reason: Reason) -> None:
        super().__init__(reason.code)
        self.reason = reason


def _parser_reason(e: Exception) -> Reason:
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
        "fed",
        "framer",
        "gate",
        "in_feed",
        "last_active",
        "last_req",
        "listen_port",
        "llhttp_done",
        "parser",
        "parsing",
        "peer",
        "pending",
        "proxy",
        "pumping",
        "queue",
        "rate_mark",
        "remaining",
        "source",
        "state",
        "tls",
        "transport",
        "write_paused",
    )

    def __init__(
        self, ctx: Context, listen_port: int, tls: bool = False, proxy: str = "off", source: str | None = None
    ) -> None:
        """``source``: the client address a PROXY header named, read before the TLS handshake."""
        self.ctx = ctx
        self.listen_port = listen_port
        self.tls = tls
        self.proxy = proxy  # PROXY protocol: "off", or "required"/"optional" until the header is read
        self.source = source
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.gate: flow.ReadGate = None  # type: ignore[assignment]
        self.peer: Peer = None  # type: ignore[assignment]
        self.parser = httptools.HttpRequestParser(self)
        self.state = _HEAD
        self.pending = b""  # an incomplete head, already fed to llhttp
        self.fed = 0  # how much of ``pending`` llhttp has seen
        self.remaining = 0
        self.framer: framing.ChunkedFramer | None = None
        self.llhttp_done = False
        self.active: Exchange | None = None  # the exchange whose response is being sent
        self.parsing: Exchange | None = None  # the exchange whose body is being received
        self.queue: collections.deque[Exchange] = collections.deque()
        self.in_feed = False
        self.pumping = False
        self.write_paused = False
        self.closing = False
        self.eof = False
        self.broken: Reason | None = None
        self.last_active = ctx.clock
        self.last_req: RequestHead | None = None  # the previous request head, analysed
        # min_body_rate: (window start, body bytes then, the exchange) while a body is moving
        self.rate_mark: tuple[float, int, Exchange] | None = None

    # ---- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = t = cast(asyncio.Transport, transport)
        self.gate = flow.ReadGate(t)
        flow.tune(t)
        peername = t.get_extra_info("peername")
        ip = peername[0] if isinstance(peername, tuple) else "unix"
        self.peer = Peer.make(self.source or ip, self.listen_port, self.tls, self.ctx.trusted)
        ctx = self.ctx
        if len(ctx.connections) >= ctx.config.max_connections:
            # Past the limit a new connection costs little and says why; accepting it silently
            # and never reading would look like a hang to the client and to the balancer.
            self.closing = True
            t.write(errors.render(errors.OVERLOADED, close=True))
            t.close()
            return
        ctx.connections.add(self)

    def _proxy_header(self, data: bytes) -> bytes | None:
        """Read the PROXY protocol header the balancer sends first; the bytes after it, or None
        while more are needed or when the connection was refused."""
        buf = self.pending + data
        try:
            got = proxy_protocol.parse(buf)
        except proxy_protocol.ProxyProtocolError as e:
            if self.proxy == "optional" and not proxy_protocol.may_be_header(buf):
                self.proxy = "off"  # no header: a direct client
                self.pending = b""
                return buf
            log.info("PROXY protocol header refused from %s: %s", self.peer.ip, e)
            self.pending = b""
            self.closing = True
            self.transport.write(errors.render(errors.PROXY_PROTOCOL_INVALID, close=True))
            self.transport.close()
            return None
        if got is proxy_protocol.NEED_MORE:
            self.pending = buf
            return None
        info, used = got
        self.proxy = "off"
        self.pending = b""
        if info.source is not None:  # LOCAL (the balancer's own health check): the socket's peer
            self.peer = Peer.make(info.source[0], self.listen_port, self.tls, self.ctx.trusted)
        return buf[used:]

    def data_received(self, data: bytes) -> None:
        if self.closing or self.broken is not None:
            return
        if self.proxy != "off":
            rest = self._proxy_header(data)
            if not rest:
                return
            data = rest
        self.in_feed = True
        try:
            if self.pending:
                data = self.pending + data
                self.pending = b""
            pos = 0
            n = len(data)
            parser = self.parser
            while pos < n and not self.closing:
                st = self.state
                if st == _HEAD:
                    fed = self.fed
                    if not fed and data.startswith(b"\r\n", pos):  # empty lines before a request-line
                        pos += 2  # are ignored (RFC 9112 §2.2)
                        continue
                    end = data.find(b"\r\n\r\n", pos)
                    if end < 0:
                        rest = data[pos:] if pos else data
                        if len(rest) > self.ctx.max_head:
                            raise _Reject(errors.HEAD_TOO_LARGE)
                        if not fed:
                            self.last_active = self.ctx.clock
                        parser.feed_data(rest[fed:] if fed else rest)  # refuse bad syntax early
                        self.pending = rest
                        self.fed = len(rest)
                        break
                    end += 4
                    if end - pos > self.ctx.max_head:
                        raise _Reject(errors.HEAD_TOO_LARGE)
                    head = data if (pos == 0 and end == n) else data[pos:end]
                    self.fed = 0
                    pos = end
                    last = self.last_req
                    if not fed and last is not None and last.repeatable and self.llhttp_done and last.raw == head:
                        # The previous request on this connection had exactly these bytes and no
                        # body: llhttp, back at the start of a message, parsed them to a complete
                        # request then and would again now. The verdict is known; skip the parse.
                        self._head(head, False)
                        continue
                    try:
                        parser.feed_data(head[fed:] if fed else head)
                    except httptools.HttpParserUpgrade:
                        self.parser = parser = httptools.HttpRequestParser(self)  # HTTP unless 101
                        if self._head(head, True):
                            self._upgrade_pending(data[pos:])
                            break
                        continue
                    self._head(head, False)
                elif st == _LENGTH:
                    take = self.remaining if self.remaining < n - pos else n - pos
                    piece = data if (pos == 0 and take == n) else data[pos : pos + take]
                    parser.feed_data(piece)
                    pos += take
                    self.remaining -= take
                    x = self.parsing
                    assert x is not None
                    x.on_request_body(piece)
                    if not self.remaining:
                        self._message_end()
                else:
                    framer = self.framer
                    assert framer is not None
                    end = framer.scan(data, pos)
                    stop = n if end < 0 else end
                    piece = data if (pos == 0 and stop == n) else data[pos:stop]
                    parser.feed_data(piece)  # validates chunk syntax before anything is forwarded
                    pos = stop
                    x = self.parsing
                    assert x is not None
                    x.on_request_body(piece)
                    if end >= 0:
                        self._message_end()
        except _Reject as e:
            self._protocol_error(e.reason)
        except (httptools.HttpParserError, framing.FramingError) as e:
            self._protocol_error(_parser_reason(e))
        except Exception:
            log.exception("request handling failed")
            self._protocol_error(errors.INTERNAL_ERROR)
        self.in_feed = False
        x = self.active
        if x is not None and x.up_buf and x.up is not None:
            x.flush_up()

    def eof_received(self) -> bool:
        # A client may half-close after its request (RFC 9112 §9.6 allows it): answer, then close.
        self.eof = True
        return self.active is not None or self.parsing is not None or bool(self.queue)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self.ctx.connections.discard(self)
        self.ctx.closed_one()
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

    # ---- llhttp callbacks (it validates; the gateway frames)

    def on_message_begin(self) -> None:
        if self.state != _HEAD or self.parsing is not None:
            raise _Reject(errors.INVALID_FRAMING)  # llhttp sees a new message where we see a body
        self.llhttp_done = False

    def on_message_complete(self) -> None:
        self.llhttp_done = True

    # ---- messages

    def _head(self, raw: bytes, upgrade: bool) -> bool:
        """A complete request head: check it, start or queue its exchange. True: an Upgrade waits."""
        req = self.last_req
        if req is None or req.raw != raw:  # a head that repeats on a connection is analysed once
            if raw.count(b"\r\n") - 2 > self.ctx.config.max_header_count:
                raise _Reject(errors.HEAD_TOO_LARGE)
            r = analyze_request(raw, self.ctx.fields)
            if not isinstance(r, RequestHead):
                raise _Reject(r)
            self.last_req = req = r
        if upgrade and req.body != framing.NONE:
            # llhttp treats what follows an Upgrade head as the new protocol; a body there is
            # ambiguous (body or tunnel bytes?) and so refused, like any other framing doubt.
            raise _Reject(errors.INVALID_FRAMING)
        x = Exchange(self, req)
        self.last_active = self.ctx.clock
        if req.body == framing.LENGTH:
            self.state = _LENGTH
            self.remaining = req.content_length
            self.parsing = x
        elif req.body == framing.CHUNKED:
            self.state = _CHUNKED
            self.framer = framing.ChunkedFramer()
            self.parsing = x
        else:
            if not self.llhttp_done:
                raise _Reject(errors.INVALID_FRAMING)
            x.req_done = True
        if self.active is None:
            self.active = x
            x.start()
        else:
            self.queue.append(x)
            self.gate.close(flow.QUEUED)
        return upgrade and req.upgrade is not None and not x.done

    def _message_end(self) -> None:
        if not self.llhttp_done:
            raise _Reject(errors.INVALID_FRAMING)  # llhttp expects more of this message than we do
        x = self.parsing
        assert x is not None
        self.parsing = None
        self.state = _HEAD
        self.framer = None
        x.on_request_complete()
        if self.eof and self.active is None and not self.queue:
            self.close()

    def exchange_done(self, x: Exchange, keep_alive: bool) -> None:
        """``x``'s response is complete: serve the next request, or close."""
        if x is not self.active:
            return
        self.active = None
        self.last_active = self.ctx.clock
        if not keep_alive or self.closing:
            self.close()
            return
        if x.early is not None:  # an Upgrade the sandbox refused: what followed is the next request
            data, x.early = x.early, None
            self.gate.open(flow.UPGRADING)
            if data:
                self.ctx.loop.call_soon(self.data_received, data)
        if self.queue or self.broken is not None or self.eof:
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
        if not self.queue and not self.closing:
            # Nothing waits any more (the last one may be in progress): read on. It used to wait
            # for nothing to be active, but the last queued request ends in exchange_done, which
            # calls this only while more are queued: the connection never read again.
            self.gate.open(flow.QUEUED)
        if self.active is None and not self.closing:
            if self.broken is not None:
                self._answer_broken()
            elif self.eof and self.parsing is None:
                self.close()

    def _protocol_error(self, reason: Reason) -> None:
        """The byte stream cannot be parsed further: answer what can be answered, then close."""
        self.broken = reason
        self.pending = b""
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
            self.ctx.outbox.send(self.transport, errors.render(reason, close=True))
            self.close()

    def _upgrade_pending(self, rest: bytes) -> None:
        """An Upgrade request waits for the sandbox's answer; keep what followed it aside."""
        x = self.queue[-1] if self.queue else self.active
        assert x is not None
        x.early = rest
        self.gate.close(flow.UPGRADING)

    def become_tunnel(
        self, x: Exchange, up: UpstreamConnection, early: bytes, sandbox_early: bytes = b"", websocket: bool = False
    ) -> None:
        """The sandbox accepted the Upgrade: hand both transports to a byte tunnel."""
        self.active = None
        self.closing = True
        self.ctx.connections.discard(self)  # the tunnel now counts in ctx.tunnels
        self.ctx.outbox.flush()  # the 101 goes before any tunnel byte (updates write_paused too)
        tunnel.splice(
            self.ctx, self.transport, up, early, client_write_paused=self.write_paused, exchange=x,
            websocket=websocket, sandbox_early=sandbox_early,
        )  # fmt: skip

    # ---- closing

    def close(self) -> None:
        """Close after what is buffered has been written."""
        if not self.closing:
            self.closing = True
            self.ctx.outbox.flush()  # what is pending for this transport goes first
            self.transport.close()

    def reset(self) -> None:
        """Reset the connection (RST): a response cut short must not look complete."""
        self.closing = True
        self.ctx.outbox.flush()  # the bytes already answered reach the client before the RST
        flow.reset(self.transport)

    def check_timeouts(self, now: float) -> None:
        """Called about once a second (and when a drain closes the listeners): slow request heads
        get 408, idle connections close."""
        cfg = self.ctx.config
        if self.proxy != "off":  # still no PROXY header
            if now - self.last_active > cfg.request_head_timeout:
                self.close()
            return
        if self.state == _HEAD and self.fed and self.parsing is None:
            if now - self.last_active > cfg.request_head_timeout:
                if self.active is None and not self.queue:
                    self.ctx.outbox.send(self.transport, errors.render(errors.REQUEST_TIMEOUT, close=True))
                self.close()
        elif self.active is None and self.parsing is None and not self.queue:
            if self.ctx.listening:  # draining or not: never close between requests while accepting
                limit = cfg.client_idle_timeout
            elif self.last_req is not None:
                limit = 0.0  # the listeners are closed: an idle keep-alive connection closes
            else:  # accepted, its first request may be on its way (Go's Server.Shutdown waits too)
                limit = FIRST_REQUEST_GRACE
            if now - self.last_active >= limit:
                self.close()
        if cfg.min_body_rate:
            self._check_body_rate(now, cfg.min_body_rate, cfg.body_rate_window)

    def _check_body_rate(self, now: float, rate: int, window: float) -> None:
        """A body must average ``rate`` bytes/s over each ``window``: a large slow upload or
        download goes on, a stalled one ends (instead of one fixed deadline for the whole body).

        Request bodies count while the gateway is reading (not while it holds the client back
        because the sandbox is slow); response bodies count while the client is the bottleneck
        (its socket buffer is full)."""
        up = self.parsing
        x = self.active
        if up is not None and not self.gate.reasons:
            moved, which = up.body_bytes, up
        elif x is not None and x.resp_started and self.write_paused:
            moved, which = x.resp_bytes, x
        else:
            self.rate_mark = None
            return
        mark = self.rate_mark
        if mark is None or mark[2] is not which:
            self.rate_mark = (now, moved, which)
            return
        if now - mark[0] < window:
            return
        if moved - mark[1] >= rate * window:
            self.rate_mark = (now, moved, which)
            return
        self.rate_mark = None
        log.info("body slower than %d bytes/s for %.0f s from %s: ending it", rate, window, self.peer.ip)
        if which is up and not up.resp_started:
            self._protocol_error(errors.BODY_TIMEOUT)
        else:
            which.fail(errors.BODY_TIMEOUT)  # the response has begun: the connection is reset
            self.reset()
