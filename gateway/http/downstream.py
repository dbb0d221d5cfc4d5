"""The client side: one protocol per client connection.

The connection drives a :class:`~gateway.http.framing.Framer` (the same one the sandbox side
uses): it finds where each request ends and feeds llhttp exactly its bytes before any of them goes
upstream, so llhttp validates the syntax and its idea of where the message ends must match the
gateway's. Anything refused is answered 400 (431 for oversized heads) with a reason code and the
connection closes, since after a framing error nobody can know where the next request would begin
(RFC 9112 §11.2).

Requests on one connection are answered in order. Pipelined requests (a head arriving while an
earlier response is still streaming) wait in a queue while reading pauses, so a pipeline costs at
most one read buffer; reading resumes once the queue is empty. Each request is routed on its own:
a load balancer sends requests for many sandboxes down one connection.

Timeouts (RFC 9112 §9.8 leaves them to the server): a connection that has not sent a complete
request head within ``request_head_timeout`` of its accept is closed (408 if a head had begun), so
idle sockets and sockets sending only empty lines cost nothing for long; a keep-alive connection
waits ``client_idle_timeout`` for its next request, whose head then has ``request_head_timeout``
from the end of the previous response or from its first byte, whichever is later. Empty lines
between requests start nothing and reset nothing.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from time import monotonic
from typing import cast

from gateway import errors
from gateway.errors import Reason
from gateway.http import flow, framing, proxy_protocol, tunnel
from gateway.http.client import H1
from gateway.http.context import Context
from gateway.http.framing import BODY, END, HEAD, HEAD_BODY, NEED, UPGRADE
from gateway.http.headers import Peer, RequestHead, analyze_request, analyze_response
from gateway.http.http2 import PREFACE, H2Connection
from gateway.http.proxy import Exchange
from gateway.http.upstream import UpstreamConnection

__all__ = ["ClientConnection"]

log = logging.getLogger("gateway.downstream")

#: Seconds a connection answered before its request body ended keeps reading (and discarding) what
#: the client still sends, after its response and a FIN, before it closes: closed at once, the
#: socket would answer those bytes with a reset, which can destroy the response before the client
#: read it (nginx's lingering close, lingering_timeout 5 s, is the model).
LINGER = 5.0

#: After the listeners close on drain: seconds a connection accepted just before may take to send
#: its first request before it counts as idle and is closed (bounded by ``shutdown_timeout``).
FIRST_REQUEST_GRACE = 5.0


class _Reject(Exception):
    """The request is refused with ``reason``; the connection cannot continue."""

    def __init__(self, reason: Reason) -> None:
        super().__init__(reason.code)
        self.reason = reason


CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"

#: How a request the framer refuses is answered.
_REASONS = {
    framing.TOO_LARGE: errors.HEAD_TOO_LARGE,
    framing.SYNTAX: errors.MALFORMED_REQUEST,
    framing.FRAMING: errors.INVALID_FRAMING,
}


class ClientConnection(asyncio.Protocol):
    """A connection from a client (a browser, an SDK, or a load balancer multiplexing many).

    It is the :class:`~gateway.http.client.ClientSide` of its exchanges, one at a time."""

    protocol = H1

    __slots__ = (
        "active",
        "broken",
        "closing",
        "ctx",
        "eof",
        "framer",
        "fresh",
        "gate",
        "head_began",
        "in_feed",
        "last_active",
        "last_req",
        "linger_until",
        "listen_port",
        "parsing",
        "peer",
        "pending",
        "proxy",
        "pumping",
        "queue",
        "rate_mark",
        "source",
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
        self.framer = framing.Framer(False, ctx.max_head, ctx.config.max_header_count)
        self.pending = b""  # an incomplete PROXY protocol header
        self.active: Exchange | None = None  # the exchange whose response is being sent
        self.parsing: Exchange | None = None  # the exchange whose body is being received
        self.queue: collections.deque[Exchange] = collections.deque()
        self.in_feed = False
        self.pumping = False
        self.write_paused = False
        self.closing = False
        self.eof = False
        self.fresh = ctx.config.http2  # no request byte yet: it may be an HTTP/2 preface
        self.broken: Reason | None = None
        self.last_active = ctx.clock  # accepted, or the last response ended
        self.head_began = 0.0  # when the first byte of the head being received arrived
        self.last_req: RequestHead | None = None  # the previous request head, analysed
        self.linger_until = 0.0  # closing: the client's unread body is drained until then (LINGER)
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
        if self.tls and self.fresh and self.proxy == "off":
            ssl_object = t.get_extra_info("ssl_object")
            if ssl_object is not None and ssl_object.selected_alpn_protocol() == "h2":
                self._become_h2(b"")

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
        if self.fresh:
            # ``pending``: a first read held as the preface's start (it may be a POST's ``P``)
            if (self.pending or data[:1] == b"P") and not self.tls and self._h2_preface(data):
                return
            self.fresh = False
        self.in_feed = True
        fr = self.framer
        try:
            pos = 0
            n = len(data)
            while pos < n and not self.closing:
                ev = fr.next(data, pos)
                if ev == HEAD:  # a request without body (llhttp and the analysis must agree)
                    pos = fr.end
                    req = self.last_req  # a head that repeats on a connection is analysed once
                    if req is None or req.raw != fr.head:
                        req = self._analysed(fr.head)
                    if req.body != framing.NONE:
                        raise _Reject(errors.INVALID_FRAMING)
                    self._exchange(req)
                    continue
                if ev == HEAD_BODY:
                    pos = fr.end
                    req = self._analysed(fr.head)
                    ev = fr.body(req.body, req.content_length, data, pos)  # llhttp agrees, or raises
                    self._exchange(req)
                if BODY <= ev <= END:
                    end = fr.end
                    piece = data[pos:end]
                    pos = end
                    x = self.parsing
                    assert x is not None
                    x.on_request_body(piece)
                    if ev == END:
                        if fr.trailer and x.req.body == framing.CHUNKED:
                            x.on_request_trailers()
                        self._message_end()
                elif ev == UPGRADE:
                    pos = fr.end
                    req = self._analysed(fr.head)
                    if req.body != framing.NONE:
                        # llhttp treats what follows an Upgrade head as the new protocol; a body
                        # there is ambiguous (body or tunnel bytes?): refused like any framing doubt.
                        raise _Reject(errors.INVALID_FRAMING)
                    x = self._exchange(req)
                    if req.upgrade is not None and not x.done:  # wait for the sandbox's answer
                        self._upgrade_pending(data[pos:])
                        break
                elif ev == NEED:
                    acc = fr.acc
                    if acc is not None and len(acc) <= n - pos:  # a head began in this read
                        self.head_began = self.ctx.clock
                    break
        except _Reject as e:
            self._protocol_error(e.reason)
        except framing.FramingError as fe:  # (not `e` again: mypyc types a name once per function)
            self._protocol_error(_REASONS[fe.kind])
        except Exception:
            log.exception("request handling failed")
            self._protocol_error(errors.INTERNAL_ERROR)
        self.in_feed = False
        x = self.active
        if x is not None and x.up_buf and x.up is not None:
            x.flush_up()

    def _h2_preface(self, data: bytes) -> bool:
        """HTTP/2 with prior knowledge (RFC 9113 §3.3): a connection whose first bytes are the
        preface becomes an HTTP/2 connection; True when ``data`` was taken (or is the start of the
        preface: kept until the rest arrives). ``Upgrade: h2c`` stays refused (headers.py)."""
        buf = self.pending + data
        if buf[: len(PREFACE)] == PREFACE[: len(buf)]:
            if len(buf) < len(PREFACE):
                self.pending = buf
                return True
            self.pending = b""
            self._become_h2(buf)
            return True
        if self.pending:  # a prefix of the preface, then something else: HTTP/1.1 after all
            self.pending = b""
            self.fresh = False
            self.data_received(buf)
            return True
        return False

    def _become_h2(self, data: bytes) -> None:
        """Hand the transport to an HTTP/2 connection (with the bytes read so far)."""
        self.closing = True
        self.fresh = False
        ctx = self.ctx
        ctx.connections.discard(self)
        c = H2Connection(ctx, self.transport, self.peer)
        ctx.connections.add(c)
        c.start(data)

    def eof_received(self) -> bool:
        if self.closing:  # lingering: the client has stopped sending; close now
            return False
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

    # ---- messages

    def _analysed(self, raw: bytes) -> RequestHead:
        """A complete request head, checked against the header policy."""
        req = self.last_req
        if req is None or req.raw != raw:  # a head that repeats on a connection is analysed once
            r = analyze_request(raw, self.ctx.fields)
            if not isinstance(r, RequestHead):
                raise _Reject(r)
            self.last_req = req = r
        return req

    def _exchange(self, req: RequestHead) -> Exchange:
        """Start the request's exchange, or queue it behind the one in progress."""
        x = Exchange(self, req)
        if req.body != framing.NONE:
            self.parsing = x
        else:
            x.req_done = True
        if self.active is None:
            self.active = x
            x.start()
        else:
            self.queue.append(x)
            self.gate.close(flow.QUEUED)
        return x

    def _message_end(self) -> None:
        """The request body ended where both framers say it does."""
        x = self.parsing
        assert x is not None
        self.parsing = None
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
        self, x: Exchange, up: UpstreamConnection, head: bytes, rest: bytes, early: bytes, websocket: bool
    ) -> None:
        """The sandbox accepted the Upgrade (its 101 ``head``, then ``rest``, tunnel bytes already
        sent): pass them on and hand both transports to a byte tunnel; ``early`` is what the
        client sent after its Upgrade request."""
        out = analyze_response(head, 101, False, False, False, self.ctx.own_cookie)[0]
        if x.rid and self.ctx.rid_in_response.search(head) is None:
            out = b"".join((out[:-2], self.ctx.rid_header, b": ", x.rid, b"\r\n\r\n"))
        x.down_buf.append(out)
        if rest:
            x.down_buf.append(rest)
        x.flush_down()
        sandbox_early = rest if websocket else b""
        self.active = None
        self.closing = True
        self.ctx.connections.discard(self)  # the tunnel now counts in ctx.tunnels
        self.ctx.outbox.flush()  # the 101 goes before any tunnel byte (updates write_paused too)
        tunnel.splice(
            self.ctx, self.transport, up, early, client_write_paused=self.write_paused, exchange=x,
            websocket=websocket, sandbox_early=sandbox_early,
        )  # fmt: skip

    # ---- the ClientSide of an exchange (client.py)

    def pause_reading(self, reason: int) -> None:
        self.gate.close(reason)

    def resume_reading(self, reason: int) -> None:
        self.gate.open(reason)

    def send_continue(self, x: Exchange) -> None:
        self.ctx.outbox.send(self.transport, CONTINUE)

    def send_interim(self, x: Exchange, head: bytes, status: int) -> None:
        """Not to HTTP/1.0 clients, which do not understand 1xx (RFC 9110 §15.2)."""
        if not x.req.http10:
            x.down_buf.append(analyze_response(head, status, False, False, True, self.ctx.own_cookie)[0])

    def send_head(self, x: Exchange, up: UpstreamConnection, head: bytes, status: int) -> tuple[int, int]:
        """The final response head: queue it for the client; returns (body framing, length)."""
        req = x.req
        head_request = req.method == b"HEAD"
        keep_alive = req.keep_alive and x.req_done and not self.ctx.draining
        flags = head_request | req.http10 << 1 | keep_alive << 2
        last = up.last_head
        if last is not None and last[1] == flags and last[0] == head:
            r = last[2]
            rid_pre = last[3]
        else:
            r = analyze_response(head, status, head_request, req.http10, keep_alive, self.ctx.own_cookie)
            # The client learns the request ID to quote, unless the sandbox set one itself.
            name = self.ctx.rid_header
            rid_pre = None
            if name and self.ctx.rid_in_response.search(head) is None:
                rid_pre = r[0][:-2] + name + b": "
            up.last_head = (head, flags, r, rid_pre)
        out, body_in, x.body_out, length, x.keep_alive, x.reusable = r
        x.body_in = body_in
        x.resp_started = True
        x.status = status
        if rid_pre is not None and x.rid:
            out = b"".join((rid_pre, x.rid, b"\r\n\r\n"))
        x.down_buf.append(out)
        return body_in, length

    def send_body(self, x: Exchange, pieces: list[bytes]) -> None:
        self.ctx.outbox.send(self.transport, pieces[0] if len(pieces) == 1 else pieces)

    def send_last(self, x: Exchange, pieces: list[bytes]) -> None:
        """Held for the end of the loop iteration (flow.Outbox): most responses end in one read."""
        self.ctx.outbox.write(self.transport, pieces[0] if len(pieces) == 1 else pieces)

    def answer(self, x: Exchange, out: bytes, keep_alive: bool) -> None:
        """The gateway's own response, after any 1xx already queued."""
        x.down_buf.append(out)
        x.flush_down()
        self.exchange_done(x, keep_alive)

    # ---- closing

    def close(self) -> None:
        """Close after what is buffered has been written.

        While a request body is still expected (the response came first), the connection lingers:
        the response and a FIN go out, and what the client still sends is read and discarded for
        up to :data:`LINGER` seconds or until it closes its side."""
        if not self.closing:
            self.closing = True
            self.ctx.outbox.flush()  # what is pending for this transport goes first
            t = self.transport
            if self.parsing is not None and not self.eof and t.can_write_eof():
                self.linger_until = self.ctx.clock + LINGER
                t.write_eof()
                self.gate.open_all()
                return
            t.close()

    def reset(self) -> None:
        """Reset the connection (RST): a response cut short must not look complete."""
        self.closing = True
        self.ctx.outbox.flush()  # the bytes already answered reach the client before the RST
        flow.reset(self.transport)

    def check_timeouts(self, now: float) -> None:
        """Called about once a second (and when a drain closes the listeners): slow request heads
        get 408, idle connections close."""
        cfg = self.ctx.config
        if self.closing:
            if self.linger_until and now >= self.linger_until:
                self.linger_until = 0.0
                self.transport.close()
            return
        if self.proxy != "off":  # still no PROXY header
            if now - self.last_active > cfg.request_head_timeout:
                self.close()
            return
        if self.active is None and self.parsing is None and not self.queue:  # waiting for a head
            began = self.framer.acc is not None
            if self.last_req is None or began:
                # The first head counts from the accept; a later one from the end of the previous
                # response or its own first byte, whichever is later.
                since = self.last_active if self.last_req is None else max(self.last_active, self.head_began)
                limit = cfg.request_head_timeout
                if not began and not self.ctx.listening:  # drain: a first request may be on its way
                    limit = min(limit, FIRST_REQUEST_GRACE)  # (Go's Server.Shutdown waits too)
                if now - since > limit:
                    if began:
                        self.ctx.outbox.send(self.transport, errors.render(errors.REQUEST_TIMEOUT, close=True))
                    self.close()
            else:  # between requests: never closed while the listeners accept, draining or not
                limit = cfg.client_idle_timeout if self.ctx.listening else 0.0
                if now - self.last_active >= limit:
                    self.close()
        x = self.active
        limit = cfg.response_head_timeout
        # The sandbox has had the whole request and sent no final response head (1xx do not count).
        if (
            limit and x is not None and x.req_done and not x.resp_started and x.up is not None
            and monotonic() - (x.req_end or x.t0) > limit
        ):  # fmt: skip
            log.info("no response head from %s in %.0f s", x.fwd.address if x.fwd else "?", limit)
            x.fail(errors.UPSTREAM_RESPONSE_TIMEOUT)
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
