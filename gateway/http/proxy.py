"""One request and its response: route, look up, connect, relay, and answer every failure.

An :class:`Exchange` is created when a request head is complete and lives until its response is
complete. The common case is synchronous from the request head to the upstream write: the Host
is memoised by the router, the sandbox is in the catalog cache and an idle connection waits in
the pool. Only a catalog miss or a new connection costs a task.

Failure rules (reason codes in errors.py):

- before any response byte reached the client, the gateway answers itself (JSON, or HTML for a
  browser navigation);
- after that, the client connection is reset, so a truncated body can never look complete;
- a request that fails on a *reused* pooled connection before any response byte is retried once on
  a new connection when that is safe: the method is idempotent and the request was kept for
  replay, or no body byte had been sent.
"""

from __future__ import annotations

import asyncio
import logging
from bisect import bisect_left
from time import monotonic
from typing import TYPE_CHECKING

from gateway import errors
from gateway.catalog.cache import Entry
from gateway.catalog.reader import CatalogUnavailable
from gateway.errors import Reason
from gateway.hostname import Route, authority_matches, parse_routing_fields
from gateway.http import flow, framing, hdrs
from gateway.http.admission import Answer
from gateway.http.client import H2
from gateway.http.headers import RequestHead, find_header, raw_fields, upgrade_accepted
from gateway.http.upstream import UpstreamConnection, connect_failure
from gateway.policy import Forward, decide

if TYPE_CHECKING:
    from gateway.http.client import ClientSide

__all__ = ["Exchange"]

log = logging.getLogger("gateway.proxy")

IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})
#: Request body bytes held while the upstream connection is being set up, before reading pauses.
BUFFER_LIMIT = 256 * 1024
#: Request bytes kept for a replay on a new connection when a reused one fails.
REPLAY_LIMIT = 64 * 1024


class Exchange:
    """A request from the client and the response to it."""

    # Most fields keep these class-level defaults for most requests; an instance only stores what
    # it changes (cheaper to create than a slotted object that must set every field).
    route: Route | None = None
    fwd: Forward | None = None
    fresh = False  # the record was read from Redis for this request (not from the cache)
    up: UpstreamConnection | None = None
    up_buf_size = 0
    head = b""
    sent: list[bytes] | None = None  # the first write to a reused connection, for a replay
    sent_body = 0
    req_done = False
    resp_started = False
    body_in = framing.NONE
    body_out = framing.NONE
    keep_alive = False  # the client connection stays open after the response
    reusable = False  # the upstream connection can serve another request
    req_trailers = False  # the request had trailer fields: its upstream connection is not pooled again
    done = False
    task: asyncio.Task[None] | None = None
    retried = False
    early: bytes | None = None  # after an Upgrade request: what the client sent next
    admitted: RequestHead | None = None  # the head sent to a private sandbox, when admission cut from it
    trailers: list[bytes] | None = None  # a de-chunked response's trailer lines (for an HTTP/2 client)
    interim = 0  # 1xx responses received
    interim_bytes = 0  # their heads' bytes
    req_end = 0.0  # monotonic() when a request body ended (a request without one ends at t0)
    ended = False  # counted and logged (the tunnel it may become is counted again when it closes)
    # For the access log and metrics:
    status = 0  # the sandbox's final status, once its head arrived
    rid = b""  # the request ID
    body_bytes = 0  # request body bytes received
    resp_bytes = 0  # bytes the sandbox sent for this exchange (counted by the upstream connection)
    connect_time: float | None = None  # seconds to open a new upstream connection

    def __init__(self, client: ClientSide, req: RequestHead) -> None:
        self.client = client
        self.ctx = client.ctx
        self.req = req
        self.up_buf: list[bytes] = []  # request bytes waiting for the upstream connection
        self.down_buf: list[bytes] = []  # response pieces for the client, sent after each read
        self.t0 = monotonic()  # not loop.time(): uvloop caches it per iteration, in ms

    # ---- request side (called by ClientConnection)

    def start(self) -> None:
        """Route the request and send it on; called once it is this connection's turn.

        The common case (a known Host, a fresh catalog entry, an idle pooled connection) runs
        without a task and without leaving this method and :meth:`_forward`.
        """
        req = self.req
        ctx = self.ctx
        host = req.host
        if host is None or req.target[:1] != b"/" or req.method == b"CONNECT":
            if not self._check_unusual():
                return
            assert host is not None
        r = ctx.router.route(host)
        if type(r) is not Route:
            if r is None:  # a shared host: the routing fields name the sandbox
                if req.route_id is None and req.route_port is None and self._is_health_check():
                    self._answer_health()
                    return
                r = parse_routing_fields(req.route_id, req.route_port)
            if not isinstance(r, Route):
                self.fail(r)
                return
        self.route = r
        catalog = ctx.catalog
        e = catalog.cache.entries.get(r.sandbox_id)
        if e is None or e.fresh_until <= ctx.loop.time():
            # Expired or unknown: a record still inside its stale window answers while it is re-read.
            e = catalog.revalidate(r.sandbox_id, e)
            if e is None:
                self.task = ctx.loop.create_task(self._lookup(r.sandbox_id))
                return
        else:
            catalog.hits += 1
        self._forward(e)

    def _is_health_check(self) -> bool:
        req = self.req
        path = req.target.split(b"?", 1)[0]
        return path == self.ctx.health_path and req.method in (b"GET", b"HEAD")

    def _answer_health(self) -> None:
        """A balancer probing the serving port (it cannot reach the admin port): 200 while this
        instance takes traffic, 503 once it drains, like /ready."""
        ctx = self.ctx
        self.done = True
        draining = ctx.draining
        body = b'{"status":"draining"}\n' if draining else b'{"status":"ok"}\n'
        keep = self.req.keep_alive and not draining and self.req_done
        out = b"".join((
            b"HTTP/1.1 503 Service Unavailable\r\n" if draining else b"HTTP/1.1 200 OK\r\n",
            b"Content-Type: application/json\r\nCache-Control: no-store\r\nContent-Length: ",
            str(len(body)).encode(), b"\r\n", b"" if keep else b"Connection: close\r\n", b"\r\n",
            b"" if self.req.method == b"HEAD" else body,
        ))  # fmt: skip
        self._end(503 if draining else 200, "health", len(out))
        self.client.answer(self, out, keep)

    def _check_unusual(self) -> bool:
        """CONNECT, a missing Host, an absolute-form target: False if the request was answered."""
        req = self.req
        if req.method == b"CONNECT":
            self.fail(errors.METHOD_NOT_ALLOWED, close=True)
            return False
        if req.host is None:
            self.fail(errors.INVALID_HOST, "The request has no Host header.")
            return False
        if req.target[:1] != b"/" and authority_matches(req.target, req.host) is False:
            self.fail(errors.INVALID_HOST, "The absolute-form request target names another host than Host.")
            return False
        return True

    async def _lookup(self, sandbox_id: str) -> None:
        try:
            e = await self.ctx.catalog.lookup(sandbox_id)
        except CatalogUnavailable:
            self.task = None
            self.fail(errors.CATALOG_UNAVAILABLE)
            return
        self.task = None
        self.fresh = True
        if not self.done:
            self._forward(e)

    def _decide(self, e: Entry) -> Forward | Reason:
        """The routing decision for this port of the sandbox, memoised with the cache entry."""
        route = self.route
        assert route is not None
        d = e.memo.get(route.port)
        if d is None:
            record = e.record
            if record is None:
                d = errors.SANDBOX_NOT_FOUND if e.invalid is None else errors.CATALOG_RECORD_INVALID
            else:
                cfg = self.ctx.config
                d = decide(route, record, cfg.node_port, cfg.token_exempt_ports)
            e.memo[route.port] = d
        return d

    def _forward(self, e: Entry) -> None:
        d = e.memo.get(self.route.port)  # type: ignore[union-attr]  # _decide, inline when memoised
        if d is None:
            d = self._decide(e)
        if d.__class__ is not Forward:
            assert isinstance(d, Reason)
            if d is errors.SANDBOX_PAUSED and self.ctx.resumer is not None:
                self.task = self.ctx.loop.create_task(self._resume())
            else:
                self.fail(d)
            return
        assert isinstance(d, Forward)
        req = self.req
        ctx = self.ctx
        if d.token is not None:  # a private sandbox (admission.py)
            got = ctx.admission.admit(req, d.token, self.route, self.client.peer)  # type: ignore[arg-type]
            if type(got) is Answer:
                self._answer(got)
                return
            if got is not req:
                self.admitted = req = got  # type: ignore[assignment]
        self.fwd = d
        # The head for the sandbox: the policy's, plus the request ID (X-Request-ID: kept from
        # trusted proxies, else generated). Inline: this runs for every request.
        name = ctx.rid_header
        if name:
            rid = req.request_id
            if rid is None or not self.client.peer.trusted:
                ctx.rid_n = n = ctx.rid_n + 1  # ctx.next_request_id(), inline
                rid = ctx.rid_prefix + b"%x" % n
            self.rid = rid
            # The head up to the ID's value, kept while the head (and the Host sent) repeats.
            pre = req.rid_pre
            if pre is None or pre[0] is not d.host:
                head = req.upstream_head(self.client.peer, d.host)
                pre = req.rid_pre = (d.host, head[:-2] + name + b": ")
            self.head = b"".join((pre[1], rid, b"\r\n\r\n"))
        else:
            self.head = req.upstream_head(self.client.peer, d.host)
        up = ctx.pool.acquire(d.key)
        if up is not None:
            self._attach(up)
            return
        # max_sandbox_connections bounds the connections open to one sandbox (requests in progress,
        # idle pooled ones and tunnels): checked only when a new one would be opened, so reusing a
        # pooled connection costs nothing extra.
        links = ctx.pool.links.get(self.route.sandbox_id)  # type: ignore[union-attr]
        if links is not None and len(links) >= ctx.max_per_sandbox:
            self.fail(errors.TOO_MANY_CONNECTIONS)
            return
        self.task = ctx.loop.create_task(self._connect(d))

    def _answer(self, a: Answer) -> None:
        """Admission to a private sandbox answered instead: a 403, a link's 303, a preflight's 204."""
        self.fail(a.reason, a.detail, extra_headers=a.headers)

    def _new_rid(self) -> bytes:
        """This request's ID: the one a trusted proxy sent, else a new one."""
        rid = self.req.request_id
        if rid is None or not self.client.peer.trusted:
            rid = self.ctx.next_request_id()
        self.rid = rid
        return rid

    def _end(
        self, status: int, reason: str, out_bytes: int | None = None, tunnel: tuple[int, int] | None = None
    ) -> None:
        """The one place where an exchange, or the tunnel it became, is counted and logged.

        Without ``tunnel``: the exchange is over (once; later calls do nothing). With ``tunnel``
        (bytes in, bytes out): the tunnel this exchange became after its 101 has closed; its
        duration runs from the request, like the exchange's."""
        if tunnel is None and self.ended:
            return
        ctx = self.ctx
        m = ctx.metrics
        req = self.req
        seconds = monotonic() - self.t0
        if tunnel is None:
            self.ended = True
            bytes_in = len(req.raw) + self.body_bytes
            bytes_out = self.resp_bytes if out_bytes is None else out_bytes
            if self.client.protocol is H2:
                if reason == "sandbox":
                    m.h2_sandbox_status[status] += 1
                else:
                    m.h2_requests[status, reason] += 1
            elif reason == "sandbox":
                m.sandbox_status[status] += 1
            else:
                m.requests[status, reason] += 1
            h = m.duration
            h.counts[bisect_left(h.bounds, seconds)] += 1
            h.sum += seconds
        else:
            bytes_in, bytes_out = tunnel
            m.tunnels_total += 1
        m.bytes_in += bytes_in
        m.bytes_out += bytes_out
        log = ctx.access_log
        if log is not None:
            route = self.route
            fwd = self.fwd
            part = req.log_part
            if part is None:
                part = req.log_part = log.head_part(req.method, req.host, req.target)
            log.log(
                "request" if tunnel is None else "tunnel", self.rid, self.client.peer.ip, self.client.protocol, part,
                route.sandbox_id if route else None, route.port if route else None, status, reason,
                bytes_in, bytes_out, seconds, self.connect_time, fwd.upstream if fwd else None,
            )  # fmt: skip

    async def _resume(self) -> None:
        """The sandbox is paused: have it resumed (once for all waiting requests), then go on."""
        route = self.route
        assert route is not None and self.ctx.resumer is not None
        answer = await self.ctx.resumer.resume(route.sandbox_id, route.port)
        self.task = None
        if isinstance(answer, Reason):
            self.fail(answer)
        elif not self.done:
            self._forward(answer)

    async def _connect(self, d: Forward) -> None:
        ctx = self.ctx
        cfg = ctx.config
        loop = ctx.loop
        route = self.route
        assert route is not None
        deadline = loop.time() + cfg.connect_wait
        delay = 0.025
        while True:
            t = monotonic()
            try:
                up = await ctx.pool.connect(
                    d.address, d.port, d.key, cfg.connect_timeout, route.sandbox_id, d.execution_id
                )
            except ConnectionRefusedError:
                if not self.fresh:
                    # Refused at a cached address: the sandbox may have moved (resumed on another
                    # node). One fresh read before anything else.
                    moved = await self._reread()
                    if moved is None:
                        return
                    if moved is not d:
                        d = moved
                        continue
                if loop.time() + delay > deadline:
                    self.task = None
                    self.fail(errors.PORT_NOT_OPEN)
                    return
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.2)
                continue
            except (OSError, TimeoutError) as e:
                reason, detail = connect_failure(e)
                log.info("connect to %s:%d failed: %s", d.address, d.port, detail)
                self.task = None
                self.fail(reason)
                return
            break
        self.connect_time = took = monotonic() - t
        ctx.metrics.connect.observe(took)
        self.task = None
        if self.done:
            up.close()
            return
        self._attach(up)

    async def _reread(self) -> Forward | None:
        """Read the record again; the decision to use now (the same object if nothing moved),
        or None when the request was answered (the sandbox is gone, or Redis is down)."""
        route = self.route
        d = self.fwd
        assert route is not None and d is not None
        self.fresh = True
        catalog = self.ctx.catalog
        catalog.invalidate(route.sandbox_id)
        try:
            e = await catalog.lookup(route.sandbox_id)
        except CatalogUnavailable:
            return d  # keep trying the address we have
        new = self._decide(e)
        if not isinstance(new, Forward):
            self.task = None
            self.fail(new)
            return None
        if (new.address, new.port, new.execution_id) == (d.address, d.port, d.execution_id):
            return d
        log.info("sandbox %s moved to %s", route.sandbox_id, new.address)
        self.fwd = new
        head = (self.admitted or self.req).upstream_head(self.client.peer, new.host)
        name = self.ctx.rid_header
        if name:
            head = b"".join((head[:-2], name, b": ", self.rid or self._new_rid(), b"\r\n\r\n"))
        self.head = head
        return new

    def _attach(self, up: UpstreamConnection) -> None:
        self.up = up
        up.exchange = self
        client = self.client
        if client.write_paused:
            up.gate.close(flow.PEER_BUSY)
        req = self.req
        if req.expect_continue and not req.http10 and not self.up_buf_size and not self.req_done:
            client.send_continue(self)
        if not self.up_buf and self.req_done:  # a request without body: the head is all of it
            if up.reused:
                self.sent = [self.head]
            self.ctx.outbox.write(up.transport, self.head)
            return
        self.up_buf.insert(0, self.head)
        if not client.in_feed:
            self.flush_up()
        client.resume_reading(flow.BUFFERING)

    def on_request_body(self, data: bytes) -> None:
        self.body_bytes += len(data)
        if self.done:
            return
        self.up_buf.append(data)
        self.up_buf_size += len(data)
        if self.up is None and self.up_buf_size > BUFFER_LIMIT:
            self.client.pause_reading(flow.BUFFERING)

    def on_request_framing(self, data: bytes) -> None:
        """Bytes of the body's framing towards the sandbox (an HTTP/2 request's chunk lines)."""
        if not self.done:
            self.up_buf.append(data)
            self.up_buf_size += len(data)

    def on_request_trailers(self) -> None:
        """The request's trailer section had a field, forwarded as the client sent it (RFC 9110
        §6.5). The sandbox connection that carried it is closed after the response, never pooled:
        a server that carries trailer fields into its next request (aiohttp did) would give them
        to another client's request (issue 10). Both client sides call this: an HTTP/1.1
        connection at the end of a chunked body, an HTTP/2 stream at its trailing HEADERS."""
        self.req_trailers = True

    def on_request_complete(self) -> None:
        self.req_done = True
        self.req_end = monotonic()  # response_head_timeout runs from here

    def flush_up(self) -> None:
        """Write what the request has for the upstream; called after each client read."""
        up = self.up
        buf = self.up_buf
        if up is None or not buf:
            return
        self.up_buf = []
        if up.reused and buf[0] is self.head:
            # Keep the first write (head and what body came with it) for a replay on a new
            # connection, in case this reused one turns out to be closed by the sandbox.
            self.sent = buf if self.up_buf_size <= REPLAY_LIMIT else None
        self.sent_body += self.up_buf_size
        self.up_buf_size = 0
        self.ctx.outbox.send(up.transport, buf[0] if len(buf) == 1 else buf)

    # ---- response side (called by UpstreamConnection)
    #
    # What the client side does with a response (an HTTP/1.1 head and bytes, or HEADERS and DATA
    # frames on a stream) is its own business (client.py); here is what every protocol shares.

    def on_interim(self, head: bytes, status: int) -> None:
        """A 1xx response other than 101: the client side passes it on (not 100, which was the
        gateway's to send)."""
        if status != 100:
            self.client.send_interim(self, head, status)

    def on_close_delimited(self, data: bytes) -> None:
        """Body bytes of a response that ends when the sandbox closes."""
        if self.body_out == framing.CHUNKED:
            self.down_buf += framing.chunk(data)
        else:
            self.down_buf.append(data)

    def on_response_complete(self, up: UpstreamConnection) -> None:
        """The response ended where its framing says: finish it, free both connections."""
        buf = self.down_buf
        if self.body_out == framing.CHUNKED and self.body_in != framing.CHUNKED:
            buf.append(framing.LAST_CHUNK)
        self.done = True
        try:
            self.client.send_last(self, buf)
        except framing.FramingError as e:  # its end cannot reach this client: the response is cut
            self.done = False  # (not over: it fails now, with nothing more of it sent)
            self.down_buf = []
            self.on_upstream_error(errors.UPSTREAM_INVALID_RESPONSE, str(e))
            return
        self.down_buf = []
        self.up = None
        up.exchange = None
        self._end(self.status, "sandbox")
        if (
            self.reusable and self.req_done and not self.up_buf and up.reusable and not up.write_paused
            and not up.gate.reasons and not self.req_trailers
        ):  # fmt: skip
            up.pool.release(up)
        else:
            up.close()
        self.client.exchange_done(self, self.keep_alive and self.req_done)

    def flush_down(self) -> None:
        buf = self.down_buf
        if buf:
            self.down_buf = []
            self.client.send_body(self, buf)

    def on_upstream_upgrade(self, up: UpstreamConnection, head: bytes, rest: bytes) -> None:
        """The sandbox answered 101: from now on both connections are one byte tunnel."""
        if self.done or self.up is not up:
            up.close()
            return
        offered = self.req.upgrade
        protocol = None if offered is None else upgrade_accepted(offered, head)
        if protocol is None:
            self.on_upstream_error(errors.UPSTREAM_INVALID_RESPONSE, "101 to a protocol the request did not offer")
            return
        self.done = True
        self.up = None
        early = self.early or b""
        self.early = None
        self.status = 101
        self._end(101, "sandbox")
        websocket = protocol == b"websocket"  # RFC 6455 §4.2.2: frames follow
        self.client.become_tunnel(self, up, head, rest, early, websocket)

    def tunnel_ended(self, bytes_in: int, bytes_out: int) -> None:
        """The tunnel this exchange became has closed: count and log it."""
        self._end(101, "sandbox", tunnel=(bytes_in, bytes_out))

    def on_upstream_error(self, reason: Reason, detail: str) -> None:
        """The sandbox sent something that is not a valid response."""
        log.info("invalid response from %s: %s", self.fwd.address if self.fwd else "?", detail)
        up = self.up
        if up is not None:
            self.up = None
            up.close()
        if self.resp_started:
            self.done = True
            self.flush_down()
            self._end(self.status, reason.code)
            self.client.reset()
        else:
            self.fail(reason)

    def on_upstream_closed(self, up: UpstreamConnection, exc: Exception | None, eof: bool) -> None:
        """The upstream connection ended (FIN, reset or error) while this exchange used it."""
        if self.up is not up or self.done:
            return
        if eof and self.resp_started and self.body_in == framing.CLOSE:
            up.reusable = False
            self.on_response_complete(up)
            return
        self.up = None
        up.close()
        if self.resp_started:
            self.done = True
            self.flush_down()
            self._end(self.status, errors.UPSTREAM_RESET.code)
            self.client.reset()
        elif up.reused and not up.got_bytes and not self.retried and self._replayable():
            self._retry()
        else:
            self.fail(errors.UPSTREAM_RESET)

    def _replayable(self) -> bool:
        """Whether the request can be sent again: no byte of its body was sent, or all that was
        sent is kept and the method is idempotent (RFC 9110 §9.2.2)."""
        sent = self.sent
        if sent is None:
            return False
        if not self.sent_body:
            return True
        kept_body = sum(map(len, sent)) - len(self.head)
        return self.req.method in IDEMPOTENT and kept_body == self.sent_body

    def _retry(self) -> None:
        """Send the request again on a new connection (the reused one was stale)."""
        assert self.fwd is not None and self.sent is not None
        self.retried = True
        replay = self.sent[1:]  # [0] is the head, which _attach queues again
        self.up_buf = replay + self.up_buf
        self.up_buf_size = sum(map(len, self.up_buf))
        self.sent_body = 0
        self.sent = None
        self.task = self.ctx.loop.create_task(self._connect(self.fwd))

    # ---- endings

    def fail(
        self,
        reason: Reason,
        detail: str | None = None,
        close: bool = False,
        extra_headers: tuple[tuple[bytes, bytes], ...] = (),
    ) -> None:
        """Answer with the gateway's own response (or reset, if the sandbox's already began)."""
        if self.done:
            return
        self.done = True
        task = self.task
        if task is not None and task is not asyncio.current_task():
            task.cancel()
        self.task = None
        up = self.up
        if up is not None:
            self.up = None
            up.close()
        client = self.client
        if self.resp_started:
            self.flush_down()
            self._end(self.status, reason.code)
            client.reset()
            return
        req = self.req
        h = raw_fields(req.raw)
        # Answered before the request's body was complete (a refusal after Expect: 100-continue, a
        # routing error while the body is on its way): whether the client sends the rest is its
        # choice (RFC 9110 §10.1.1), so nobody could tell where its next request begins. Closed.
        keep = req.keep_alive and not close and not self.ctx.draining and self.req_done
        route = self.route
        as_html = errors.wants_html(
            find_header(h, hdrs.SEC_FETCH_MODE), find_header(h, hdrs.ACCEPT), find_header(h, hdrs.USER_AGENT)
        )
        out = errors.render(
            reason,
            sandbox_id=route.sandbox_id if route else None,
            port=route.port if route else None,
            detail=detail,
            as_html=as_html,
            origin=find_header(h, hdrs.ORIGIN),
            head_only=req.method == b"HEAD",
            close=not keep,
            extra_headers=extra_headers,
            hints=self._page_hints(extra_headers) if as_html else None,
            favicon=errors.is_favicon(req.method, req.target),
        )
        name = self.ctx.rid_header
        if name:
            end = out.find(b"\r\n\r\n")
            out = b"".join((out[:end], b"\r\n", name, b": ", self.rid or self._new_rid(), out[end:]))
        self._end(reason.status, reason.code, len(out))
        client.answer(self, out, keep)

    def _page_hints(self, extra_headers: tuple[tuple[bytes, bytes], ...]) -> dict[str, str]:
        """What a person's error page says about addresses: the form a sandbox URL takes here (this
        scheme, the first domain, this request's port), the link parameter, the token field."""
        cfg = self.ctx.config
        host = self.req.host or b""
        port = host.rsplit(b":", 1)[1].decode() if host.rfind(b":") > host.rfind(b"]") else ""
        hints = {
            "expected": f"{self.client.peer.proto.decode()}://{{port}}-{{sandboxId}}.{cfg.domains[0]}"
            + (f":{port}" if port else "") + "/",
            "param": cfg.access_link_param,
            "header": cfg.traffic_token_header,
        }  # fmt: skip
        for name, value in extra_headers:
            if name == b"Location":
                hints["location"] = value.decode("latin-1")
        return hints

    def abort(self) -> None:
        """The client is gone: drop everything, close the upstream connection."""
        if not self.done:
            self._end(499, "client_closed")
        self.done = True
        task = self.task
        if task is not None:
            self.task = None
            task.cancel()
        up = self.up
        if up is not None:
            self.up = None
            up.close()
