"""One request and its response: route, look up, connect, relay, and answer every failure.

An :class:`Exchange` is created when a request head begins and lives until its response is
complete. The common case is synchronous from the request head to the upstream write: the Host
is memoised by the router, the sandbox is in the catalog cache and an idle connection waits in
the pool. Only a catalog miss or a new connection costs a task.

Failure rules (reason codes in errors.py):

- before any response byte reached the client, the gateway answers itself (JSON, or HTML for a
  browser navigation);
- after that, the client connection is reset, so a truncated body can never look complete;
- a request that fails on a *reused* pooled connection before any response byte is retried once on
  a new connection when that is safe: the method is idempotent and its body was kept for replay,
  or no body byte had been sent.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from gateway import errors
from gateway.catalog.cache import Entry
from gateway.catalog.reader import CatalogUnavailable
from gateway.errors import Reason
from gateway.hostname import Route, authority_matches
from gateway.http import flow, framing, hdrs
from gateway.http.headers import PreparedRequest, PreparedResponse, find_header, prepare_response, request_line
from gateway.http.upstream import UpstreamConnection, connect_failure
from gateway.policy import Forward, decide

if TYPE_CHECKING:
    from gateway.http.downstream import ClientConnection

__all__ = ["Exchange"]

log = logging.getLogger("gateway.proxy")

IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})
#: Request body bytes held while the upstream connection is being set up, before reading pauses.
BUFFER_LIMIT = 256 * 1024
#: Request bytes kept for a replay on a new connection when a reused one fails.
REPLAY_LIMIT = 64 * 1024
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class Exchange:
    """A request from the client and the response to it."""

    __slots__ = (
        "client",
        "ctx",
        "done",
        "down_buf",
        "early",
        "fwd",
        "head",
        "head_done",
        "headers",
        "http10",
        "keep_alive",
        "method",
        "pending_head",
        "prep",
        "req_done",
        "resp",
        "resp_101",
        "resp_started",
        "retried",
        "route",
        "sent",
        "sent_body",
        "task",
        "trailers",
        "up",
        "up_buf",
        "up_buf_size",
        "url",
    )

    def __init__(self, client: ClientConnection) -> None:
        self.client = client
        self.ctx = client.ctx
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.trailers: list[tuple[bytes, bytes]] = []
        self.head_done = False
        self.method = b""
        self.http10 = False
        self.keep_alive = True
        self.prep: PreparedRequest = None  # type: ignore[assignment]  # set with the head
        self.route: Route | None = None
        self.fwd: Forward | None = None
        self.up: UpstreamConnection | None = None
        self.up_buf: list[bytes] = []
        self.up_buf_size = 0
        self.head = b""
        self.pending_head = False
        self.sent: list[bytes] | None = None
        self.sent_body = 0
        self.req_done = False
        self.resp: PreparedResponse | None = None
        self.resp_101 = False
        self.resp_started = False
        self.down_buf: list[bytes] = []
        self.done = False
        self.task: asyncio.Task[None] | None = None
        self.retried = False
        self.early = b""

    # ---- request side (called by ClientConnection)

    def start(self) -> None:
        """Route the request and send it on; called once it is this connection's turn."""
        prep = self.prep
        if self.method == b"CONNECT":
            self.fail(errors.METHOD_NOT_ALLOWED, close=True)
            return
        host = prep.host
        if host is None:
            self.fail(errors.INVALID_HOST, "The request has no Host header.")
            return
        if self.url[:1] != b"/" and authority_matches(self.url, host) is False:
            self.fail(errors.INVALID_HOST, "The absolute-form request target names another host than Host.")
            return
        r = self.ctx.router.route(host)
        if type(r) is not Route:
            assert isinstance(r, Reason)
            self.fail(r)
            return
        self.route = r
        e = self.ctx.catalog.cached(r.sandbox_id)
        if e is None:
            self.task = self.ctx.loop.create_task(self._lookup(r.sandbox_id))
        else:
            self._forward(e)

    async def _lookup(self, sandbox_id: str) -> None:
        try:
            e = await self.ctx.catalog.lookup(sandbox_id)
        except CatalogUnavailable:
            self.task = None
            self.fail(errors.CATALOG_UNAVAILABLE)
            return
        self.task = None
        if not self.done:
            self._forward(e)

    def _forward(self, e: Entry) -> None:
        record = e.record
        route = self.route
        assert route is not None
        if record is None:
            self.fail(errors.SANDBOX_NOT_FOUND if e.invalid is None else errors.CATALOG_RECORD_INVALID)
            return
        d = decide(route, record, self.ctx.config.node_port)
        if not isinstance(d, Forward):
            self.fail(d)
            return
        self.fwd = d
        self.head = self.prep.head(request_line(self.method, self.url), d.host)
        up = self.ctx.pool.acquire(d.key)
        if up is not None:
            self._attach(up)
        else:
            self.task = self.ctx.loop.create_task(self._connect(d))

    async def _connect(self, d: Forward) -> None:
        ctx = self.ctx
        cfg = ctx.config
        loop = ctx.loop
        deadline = loop.time() + cfg.connect_wait
        delay = 0.025
        while True:
            try:
                up = await ctx.pool.connect(d.address, d.port, d.key, cfg.connect_timeout)
            except ConnectionRefusedError:
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
        self.task = None
        if self.done:
            up.close()
            return
        self._attach(up)

    def _attach(self, up: UpstreamConnection) -> None:
        self.up = up
        up.exchange = self
        client = self.client
        if client.write_paused:
            up.gate.close(flow.PEER_BUSY)
        if up.reused:
            self.sent = []
        if self.prep.expect_continue and not self.http10 and not self.up_buf_size and not self.req_done:
            client.transport.write(CONTINUE)
        self.pending_head = True
        if not client.in_feed:
            self.flush_up()
        client.gate.open(flow.BUFFERING)

    def on_request_body(self, data: bytes) -> None:
        if self.done:
            return
        if self.prep.body == framing.CHUNKED:
            self.up_buf += (framing.chunk_head(len(data)), data, framing.CRLF)
        else:
            self.up_buf.append(data)
        self.up_buf_size += len(data)
        if self.up is None and self.up_buf_size > BUFFER_LIMIT:
            self.client.gate.close(flow.BUFFERING)

    def on_request_complete(self) -> None:
        self.req_done = True
        if not self.done and self.prep.body == framing.CHUNKED:
            self.up_buf.append(framing.last_chunk(self.trailers) if self.trailers else framing.LAST_CHUNK)

    def flush_up(self) -> None:
        """Write what the request has for the upstream (head first); called after each client read."""
        up = self.up
        if up is None:
            return
        buf = self.up_buf
        body = self.up_buf_size
        if self.pending_head:
            self.pending_head = False
            buf.insert(0, self.head)
        if not buf:
            return
        self.up_buf = []
        self.up_buf_size = 0
        sent = self.sent
        if sent is not None:
            if sum(map(len, sent)) + sum(map(len, buf)) <= REPLAY_LIMIT:
                sent += buf
            else:
                self.sent = None
        self.sent_body += body
        if len(buf) == 1:
            up.transport.write(buf[0])
        else:
            up.transport.writelines(buf)

    # ---- response side (called by UpstreamConnection)

    def on_response_head(self, up: UpstreamConnection) -> bool:
        """A response head arrived; True means "this message has no body, stop parsing it"."""
        status = up.parser.get_status_code()
        if status < 200:
            if status == 101:
                self.resp_101 = True
            elif status != 100 and not self.http10:  # 100 was ours to send; 1.0 clients get no 1xx
                r = prepare_response(
                    status, up.phrase, up.headers, head_request=False, client_http10=False,
                    client_keep_alive=True, upstream_keep_alive=True,
                )
                self.down_buf.append(r.head)
            return False
        ctx = self.ctx
        r = prepare_response(
            status,
            up.phrase,
            up.headers,
            head_request=self.method == b"HEAD",
            client_http10=self.http10,
            client_keep_alive=self.keep_alive and self.req_done and not ctx.draining,
            upstream_keep_alive=up.parser.should_keep_alive(),
        )
        self.resp = r
        self.resp_started = True
        self.down_buf.append(r.head)
        return self.method == b"HEAD"

    def on_response_body(self, data: bytes) -> None:
        r = self.resp
        if r is None or not data:
            return
        if r.body_out == framing.CHUNKED:
            self.down_buf += (framing.chunk_head(len(data)), data, framing.CRLF)
        else:
            self.down_buf.append(data)

    def on_response_complete(self, up: UpstreamConnection) -> None:
        r = self.resp
        if r is None or self.resp_101:
            return  # an interim (1xx) response ended; the final one follows
        if r.body_out == framing.CHUNKED:
            self.down_buf.append(framing.last_chunk(up.trailers) if up.trailers else framing.LAST_CHUNK)
        self._finish(up, r)

    def _finish(self, up: UpstreamConnection, r: PreparedResponse) -> None:
        self.done = True
        self.flush_down()
        if not (r.upstream_reusable and self.req_done and not self.up_buf):
            up.reusable = False
        self.up = None
        up.detach()
        self.client.exchange_done(self, r.keep_alive and self.req_done)

    def flush_down(self) -> None:
        buf = self.down_buf
        if buf:
            self.down_buf = []
            t = self.client.transport
            if len(buf) == 1:
                t.write(buf[0])
            else:
                t.writelines(buf)

    def on_upstream_upgrade(self, rest: bytes) -> None:
        """The sandbox answered 101: from now on both connections are one byte tunnel."""
        up = self.up
        if up is None or self.done:
            return
        upgrade = find_header(up.headers, hdrs.UPGRADE)
        if not self.resp_101 or self.prep.upgrade is None or upgrade is None:
            self.on_upstream_error(errors.UPSTREAM_INVALID_RESPONSE, "101 without an Upgrade it was asked for")
            return
        r = prepare_response(
            101, up.phrase, up.headers, head_request=False, client_http10=False,
            client_keep_alive=False, upstream_keep_alive=False,
        )
        self.down_buf.append(r.head)
        if rest:
            self.down_buf.append(rest)
        self.flush_down()
        self.done = True
        self.up = None
        up.exchange = None
        early, self.early = self.early, b""
        self.client.become_tunnel(self, up, early)

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
            self.client.reset()
        else:
            self.fail(reason)

    def on_upstream_closed(self, exc: Exception | None, eof: bool) -> None:
        """The upstream connection ended (FIN, reset or error) while this exchange used it."""
        up = self.up
        if up is None or self.done:
            return
        r = self.resp
        if eof and r is not None and r.body_in == framing.CLOSE:
            if r.body_out == framing.CHUNKED:
                self.down_buf.append(framing.LAST_CHUNK)
            up.reusable = False
            self._finish(up, r)
            return
        self.up = None
        up.close()
        if self.resp_started:
            self.done = True
            self.flush_down()
            self.client.reset()
        elif (
            up.reused
            and not up.got_bytes
            and not self.retried
            and self.sent is not None
            and (self.method in IDEMPOTENT or self.sent_body == 0)
        ):
            self._retry()
        else:
            self.fail(errors.UPSTREAM_RESET)

    def _retry(self) -> None:
        """Send the request again on a new connection (the reused one was stale)."""
        assert self.fwd is not None and self.sent is not None
        self.retried = True
        replay = self.sent[1:]  # [0] is the head, which _attach queues again
        self.up_buf = replay + self.up_buf
        self.up_buf_size = 0
        self.sent_body = 0
        self.sent = None
        self.task = self.ctx.loop.create_task(self._connect(self.fwd))

    # ---- endings

    def fail(self, reason: Reason, detail: str | None = None, close: bool = False) -> None:
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
            client.reset()
            return
        h = self.headers
        keep = self.keep_alive and not close and not self.ctx.draining
        route = self.route
        self.down_buf.append(
            errors.render(
                reason,
                sandbox_id=route.sandbox_id if route else None,
                port=route.port if route else None,
                detail=detail,
                as_html=errors.wants_html(
                    find_header(h, hdrs.SEC_FETCH_MODE), find_header(h, hdrs.ACCEPT), find_header(h, hdrs.USER_AGENT)
                ),
                origin=find_header(h, hdrs.ORIGIN),
                head_only=self.method == b"HEAD",
                close=not keep,
            )
        )
        self.flush_down()
        client.exchange_done(self, keep)

    def abort(self) -> None:
        """The client is gone: drop everything, close the upstream connection."""
        self.done = True
        task = self.task
        if task is not None:
            self.task = None
            task.cancel()
        up = self.up
        if up is not None:
            self.up = None
            up.close()

