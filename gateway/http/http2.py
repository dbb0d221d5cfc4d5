"""HTTP/2 from clients (RFC 9113): h2c with prior knowledge on plain listeners, h2 by ALPN on TLS ones.

A load balancer talks h2c to the gateway, an SDK sends every sandbox's traffic over one connection
(the routing fields name the sandbox per stream), a browser loads a page of hundreds of modules over
one multiplexed connection. Sandboxes keep speaking HTTP/1.1: each stream becomes an
:class:`~gateway.http.proxy.Exchange` whose request is the HTTP/1.1 head h2map.py writes, so routing,
lookup, policy, admission and the header policy are the same code as for HTTP/1.1, and the pooled
upstream connections are shared by both. The streams are the exchanges' client side
(:class:`H2Stream`, client.py's interface): the sandbox's response head becomes HEADERS, its body DATA
(de-chunked; its trailers become trailing HEADERS), the gateway's own answers are the same responses
as over HTTP/1.1, and a failure after the response began resets only that stream.

The protocol work (frames, HPACK, stream states) is python-hyper's ``h2``; this module never writes a
frame of its own beyond serialising hyperframe's GOAWAY for a graceful drain (h2 closes its state
machine when it sends one, RFC 9113 §6.8 lets streams finish). h2 is pure Python and costs most of
an HTTP/2 request, so:

- h2 runs as h2conn.py configures and trims it (no validation pass that h2map.py makes anyway, HPACK
  blocks that repeat decoded and encoded once, h2's own work per request cut to what is used);
- a connection's frames leave in one write per loop iteration (through the worker's Outbox), except
  streaming body bytes, which go at once so backpressure holds.

Flow control is tied to backpressure (§5.2): request DATA is acknowledged (WINDOW_UPDATE) per stream
as it is passed to the sandbox connection, and not while that connection is full or still being
opened, so a 1 GiB upload costs at most a window per stream; the connection-level window is always
acknowledged at once, so a stream that waits never holds back the others. Responses are sent as the
client's windows allow; what waits is bounded per stream, and past that the sandbox connection of
that stream alone stops being read.

Defences: at most ``http2_max_concurrent_streams`` streams (more are refused with REFUSED_STREAM,
which clients retry); header lists bounded (HPACK's decoded size: a connection error, an HPACK bomb
costs no more; a head too large for ``max_request_head_size``: 431 on that stream); CONTINUATION
floods end at h2's 64 frames; streams the client resets (CVE-2023-44487, rapid reset) that were
cancelled in the read that opened them cost no exchange at all, and more than twice the stream limit
of resets (and of refusals past the limit) in a second end the connection with GOAWAY
ENHANCE_YOUR_CALM, as do more than :data:`CONTROL_BUDGET` PING/SETTINGS frames a second, counted
with them WINDOW_UPDATEs beyond what the client earned by what it received, unsolicited
acknowledgements and frames that ask for nothing (:meth:`H2Connection._unasked`); a connection
WINDOW_UPDATE resumes only the streams its window held back; a stream whose response cannot move
(``min_body_rate``) is reset; idle connections close after ``client_idle_timeout``; a client that
sends without reading what it is answered is reset (:meth:`H2Connection._unread`); the gateway's
HPACK encoder uses at most 4,096 bytes of table, whatever the client allows.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from time import monotonic
from typing import TYPE_CHECKING, Any, Final

import h2.errors
import h2.events
import h2.exceptions
import h2.settings
from hyperframe.frame import GoAwayFrame

from gateway import errors
from gateway.errors import Reason
from gateway.http import flow, framing, h2map
from gateway.http.client import H2
from gateway.http.h2conn import RememberingDecoder, ServerConnection, server_config
from gateway.http.headers import MAX_REQUEST_ID, Peer, RequestHead, analyze_request, analyze_response
from gateway.http.proxy import Exchange

if TYPE_CHECKING:
    from gateway.http.context import Context
    from gateway.http.h2tunnel import H2Tunnel
    from gateway.http.upstream import UpstreamConnection

__all__ = ["PREFACE", "H2Connection", "H2Stream"]

log = logging.getLogger("gateway.http2")

#: What a client speaking HTTP/2 with prior knowledge sends first (RFC 9113 §3.4).
PREFACE: Final = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
#: Each stream's receive window: request body bytes a client may send before the gateway has passed
#: them to the sandbox connection.
STREAM_WINDOW: Final = 256 * 1024
#: The connection's receive window (acknowledged at once: per-stream windows do the holding back).
CONNECTION_WINDOW: Final = 16 * 1024 * 1024
#: Response bytes held per stream while the client's window is shut, before the sandbox side of
#: that stream stops being read.
STREAM_BUFFER: Final = 256 * 1024
#: Unused free WINDOW_UPDATEs a connection keeps, of each kind (H2Connection._earned).
WINDOW_CREDIT_CAP: Final = 64 * 1000
#: DATA frames per stream a client may send after the gateway ended the stream, for free.
GONE_DATA: Final = 64
#: Bytes the gateway may answer a client with (to its own frames) while the client's transport is
#: full, before the connection is reset: a client must read what it asks for.
UNREAD_LIMIT: Final = 1024 * 1024
#: PING and SETTINGS frames a client may send per second (each costs an acknowledgement), with the
#: WINDOW_UPDATEs that give back no DATA frame the gateway sent and the frames that ask for nothing.
CONTROL_BUDGET: Final = 1000
#: GOAWAY's last-stream-ID when it only announces a drain (RFC 9113 §6.8).
_MAX_STREAM_ID: Final = 2**31 - 1

_OPEN, _NOTICE, _FINAL = 0, 1, 2  # H2Connection.goaway
#: The client's settings that change what header blocks it takes (H2Connection._limits).
_SIZES: Final = frozenset((h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE, h2.settings.SettingCodes.MAX_FRAME_SIZE))


class _Allowance:
    """Frames a client may send for free, earned by what the gateway did for it (streams opened,
    DATA sent) and kept up to ``cap``; the rest count against the control budget."""

    __slots__ = ("balance", "cap", "seen")

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.balance = 0
        self.seen = 0  # what had been earned when last looked at

    def spend(self, earned: int, n: int) -> int:
        """``n`` frames, ``earned`` the running total earned: how many were not free."""
        balance = min(self.balance + earned - self.seen, self.cap)
        self.seen = earned
        free = min(n, balance)
        self.balance = balance - free
        return n - free


def _held(conn: H2Connection) -> int:
    """Bytes in memory for a client: written and not yet taken by the kernel, queued in h2, waiting
    in its streams for its windows (only while its transport is full: H2Connection._unread)."""
    n = conn.transport.get_write_buffer_size() + conn.h2.queued()
    for s in conn.streams.values():
        n += len(s.out)
    return n


class H2Stream:
    """One stream of an HTTP/2 connection: the client side of one exchange (client.py)."""

    protocol = H2

    __slots__ = (
        "blocked",
        "bytes_mark",
        "chunked",
        "conn",
        "connect",
        "ctx",
        "early",
        "end_pending",
        "ended",
        "holding",
        "out",
        "paused",
        "peer",
        "remote_ended",
        "sent",
        "sid",
        "touched",
        "trailers",
        "tunnel",
        "unacked",
        "x",
    )

    def __init__(self, conn: H2Connection, sid: int) -> None:
        self.conn = conn
        self.ctx = conn.ctx
        self.peer = conn.peer
        self.sid = sid
        self.x: Exchange | None = None
        self.out = bytearray()  # response bytes waiting for the client's flow-control window
        self.end_pending = False  # the response is complete once ``out`` (and trailers) are sent
        self.ended = False  # END_STREAM or RST_STREAM sent
        self.remote_ended = False  # the client ended its side (or reset the stream)
        self.trailers: list[tuple[bytes, bytes]] | None = None
        self.paused = 0  # flow.py reason bits: request DATA is not acknowledged while any holds
        self.unacked = 0  # request DATA bytes received and not yet acknowledged
        self.holding = False  # the sandbox side is paused because ``out`` is full
        self.blocked = False  # in conn.blocked: ``out`` waits for the connection's window
        self.touched = False  # got request DATA in the current read
        self.chunked = False  # the request body goes to the sandbox in chunked coding
        self.tunnel: H2Tunnel | None = None  # an extended CONNECT that became a tunnel (h2tunnel.py)
        self.connect = False  # an extended CONNECT (RFC 8441): DATA waits for the tunnel
        self.early: list[bytes] = []  # DATA that came before the sandbox accepted
        self.sent = 0  # response DATA bytes sent
        self.bytes_mark: tuple[float, int] | None = None  # min_body_rate: (window start, bytes then)

    # ---- ClientSide (client.py)

    @property
    def write_paused(self) -> bool:
        return self.conn.write_paused

    @property
    def in_feed(self) -> bool:
        return self.conn.in_feed

    def pause_reading(self, reason: int) -> None:
        self.paused |= reason

    def resume_reading(self, reason: int) -> None:
        if self.paused & reason:
            self.paused &= ~reason
            if not self.paused and self.unacked:
                self.acknowledge()
                self.conn.flush_later()

    def send_continue(self, x: Exchange) -> None:
        if not self.ended:
            self.conn.h2.send_headers(self.sid, [(b":status", b"100")])
            self.conn.flush_now()

    def send_interim(self, x: Exchange, head: bytes, status: int) -> None:
        if not self.ended:
            out = analyze_response(head, status, False, False, True, self.ctx.own_cookie)[0]
            fields = h2map.response_fields(out)
            self.fit(fields, "1xx head")
            self.conn.h2.send_headers(self.sid, fields)
            self.conn.flush_later()

    def send_head(self, x: Exchange, up: UpstreamConnection, head: bytes, status: int) -> tuple[int, int]:
        """The response head as HEADERS (without END_STREAM unless no body can follow); returns the
        sandbox's body framing. The body reaches the client de-chunked (as for an HTTP/1.0 client:
        HTTP/2 has its own framing), its trailers as trailing HEADERS."""
        head_request = x.req.method == b"HEAD"
        conn = self.conn
        key = (head, head_request)
        got = conn.heads.get(key)
        if got is None:
            r = analyze_response(head, status, head_request, True, True, self.ctx.own_cookie)
            fields = tuple(h2map.response_fields(r[0]))
            ctx = self.ctx
            rid_name = ctx.rid_header_h2 if ctx.rid_header and ctx.rid_in_response.search(head) is None else None
            # The head must fit what the client takes with any request ID the gateway sends (at most
            # MAX_REQUEST_ID bytes): measured here, once per head, and refused before HPACK sees it.
            self.fit(fields, "response head", 0 if rid_name is None else 32 + len(rid_name) + MAX_REQUEST_ID)
            if len(conn.heads) >= 32:
                conn.heads.clear()
            conn.heads[key] = got = (r, fields, rid_name)
        r, fields, rid_name = got
        _, body_in, x.body_out, length, _, x.reusable = r
        x.keep_alive = True
        x.body_in = body_in
        x.resp_started = True
        x.status = status
        if self.ended:
            return body_in, length
        end = body_in == framing.NONE or (body_in == framing.LENGTH and not length)
        # The request ID: never indexed (a new value per response would churn the dynamic table)
        rid = (rid_name, x.rid) if rid_name is not None and x.rid else None
        conn.h2.send_headers(self.sid, fields, end_stream=end, never_indexed=rid)
        conn.flush_later()
        if end:
            self.end_pending = True
            self.ended = True
        return body_in, length

    def fit(
        self, fields: list[tuple[bytes, bytes]] | tuple[tuple[bytes, bytes], ...], what: str, room: int = 0
    ) -> None:
        """Raises framing.FramingError for a header block this client does not take (h2map.py), with
        ``room`` bytes more for fields added after: never sent; the exchange fails with 502 if
        nothing of the response was sent yet, else the stream is reset."""
        size = h2map.section_size(fields)
        if size < 0:
            raise framing.FramingError(
                framing.TOO_LARGE, f"{what} with a field name or value over {h2map.MAX_STRING} bytes"
            )
        size += room
        if size > self.conn.max_list:
            raise framing.FramingError(
                framing.TOO_LARGE,
                f"{what} of {size} bytes (RFC 9113 §6.5.2) is more than this client takes ({self.conn.max_list})",
            )

    def send_body(self, x: Exchange, pieces: list[bytes]) -> None:
        if self.ended:
            return
        if self.out:  # bytes already wait for the window: these go after them
            self._queue(pieces)
            self.pump()
        else:
            self.send_now(pieces[0] if len(pieces) == 1 else b"".join(pieces))
        self.conn.flush_now()

    def send_now(self, data: bytes) -> None:
        """Response bytes when none wait (``out`` empty): as DATA frames straight from ``data``, as
        far as the client's windows allow (never past them: RFC 9113 §6.9), the rest into ``out``
        for :meth:`pump` (not copied through the stream's buffer first, as send_last does)."""
        conn = self.conn
        h = conn.h2
        sid = self.sid
        n = len(data)
        window = h.local_flow_control_window(sid)
        frame = h.max_outbound_frame_size
        if data.__class__ is not bytes:
            data = bytes(data)
        if n <= window and n <= frame:  # the common case: one frame
            if n:
                h.send_data(sid, data)
                self.sent += n
                conn.data_frames += 1
            return
        pos = 0
        end = min(n, window)
        while pos < end:
            size = min(frame, end - pos)
            h.send_data(sid, data[pos : pos + size])
            pos += size
            conn.data_frames += 1
        self.sent += pos
        self.out += data[pos:] if pos else data
        self.pump()  # (nothing more fits: registers the wait, holds the sandbox side past STREAM_BUFFER)

    def send_last(self, x: Exchange, pieces: list[bytes]) -> None:
        if self.ended:
            self._finish()
            return
        if x.trailers:
            trailers = h2map.fields_of(x.trailers)
            self.fit(trailers, "trailer section")  # (the body went: the exchange resets the stream)
            self.trailers = trailers
        elif not self.out and not self.holding:  # the common case: all of the rest in one DATA frame
            data = pieces[0] if len(pieces) == 1 else b"".join(pieces)
            conn = self.conn
            h = conn.h2
            n = len(data)
            if n <= h.max_outbound_frame_size and (not n or n <= h.local_flow_control_window(self.sid)):
                h.send_data(self.sid, data if data.__class__ is bytes else bytes(data), end_stream=True)
                self.sent += n  # (its one frame is credited as its stream: H2Connection._connection_window)
                self.end_pending = self.ended = True
                conn.flush_later()
                self._finish()
                return
        if pieces:
            self._queue(pieces)
        self.end_pending = True
        self.pump()
        self.conn.flush_later()

    def answer(self, x: Exchange, out: bytes, keep_alive: bool) -> None:
        """The gateway's own response (errors.render's bytes): the same status, fields and body."""
        if not self.ended:
            i = out.find(b"\r\n\r\n") + 4
            body = out[i:]
            self.conn.h2.send_headers(self.sid, h2map.response_fields(out[:i]), end_stream=not body)
            if body:
                self.out += body
                self.end_pending = True
                self.pump()
            else:
                self.ended = True
            self.conn.flush_later()
        self.exchange_done(x, keep_alive)

    def exchange_done(self, x: Exchange, keep_alive: bool) -> None:
        if self.ended:
            self._finish()

    def reset(self) -> None:
        """A response cut short: RST_STREAM, so it can never look complete (only this stream)."""
        self._reset(h2.errors.ErrorCodes.INTERNAL_ERROR)

    def become_tunnel(
        self, x: Exchange, up: UpstreamConnection, head: bytes, rest: bytes, early: bytes, websocket: bool
    ) -> None:
        from gateway.http import h2tunnel  # noqa: PLC0415 (a rare path, and h2tunnel imports this module)

        h2tunnel.start(self, x, up, head, rest, websocket)

    # ---- sending

    def _queue(self, pieces: list[bytes]) -> None:
        out = self.out
        for p in pieces:
            out += p

    def pump(self) -> None:
        """Send what the client's windows allow; end the stream when all is sent."""
        if self.ended:
            return
        conn = self.conn
        h = conn.h2
        sid = self.sid
        out = self.out
        while out:
            window = h.local_flow_control_window(sid)
            if window <= 0:
                if not self.blocked and h.outbound_flow_control_window <= 0:
                    # the connection's window is the one shut: resumed by the connection's
                    # WINDOW_UPDATE (H2Connection._connection_window), with the others it holds
                    self.blocked = True
                    conn.blocked.append(self)
                break
            size = min(window, h.max_outbound_frame_size, len(out))
            if size == len(out):
                data = bytes(out)
                out.clear()
            else:
                data = bytes(out[:size])
                del out[:size]
            last = self.end_pending and not out and self.trailers is None
            h.send_data(sid, data, end_stream=last)
            self.sent += size
            conn.data_frames += 1
            if last:
                self.ended = True
        if not out and self.end_pending and not self.ended:
            if self.trailers is not None:
                h.send_headers(sid, self.trailers, end_stream=True)
            else:
                h.end_stream(sid)
            self.ended = True
        # Past STREAM_BUFFER waiting, the sandbox side of this stream (only) stops being read.
        x = self.x
        gate = x.up.gate if x is not None and x.up is not None else None
        if gate is None and self.tunnel is not None:
            gate = self.tunnel.gate
        if len(out) > STREAM_BUFFER:
            if not self.holding and gate is not None:
                self.holding = True
                gate.close(flow.WINDOW)
        elif self.holding:
            self.holding = False
            if gate is not None:
                gate.open(flow.WINDOW)
        if self.ended:
            self._finish()

    def unblock(self) -> None:
        """No longer waiting for the connection's window (the stream ended)."""
        if self.blocked:
            self.blocked = False
            self.conn.blocked.remove(self)  # (at most the connection's streams long)

    def acknowledge(self) -> None:
        """Give the client back the window of the request bytes passed on (WINDOW_UPDATE)."""
        n = self.unacked
        self.unacked = 0
        if n and not self.remote_ended and not self.ended:
            self.conn.h2.increment_flow_control_window(n, self.sid)

    def _reset(self, code: int) -> None:
        if not self.ended:
            self.ended = True
            self.out.clear()
            self.unblock()
            try:
                self.conn.h2.reset_stream(self.sid, code)
            except h2.exceptions.StreamClosedError:
                pass
            self.conn.flush_later()
        self._finish()

    def _finish(self) -> None:
        """Our side has ended: the stream no longer counts; a client still sending a request body
        the response did not need is asked to stop (RST_STREAM NO_ERROR, RFC 9113 §8.1)."""
        x = self.x
        if x is not None and not x.done:
            return  # the exchange goes on (e.g. a response ended while the request body streams)
        if self.tunnel is not None and not self.tunnel.closed:
            return
        conn = self.conn
        if conn.streams.pop(self.sid, None) is None:
            return
        if self.blocked:
            self.unblock()
        conn.h2.forget(self.sid)
        self.x = None  # (the exchange refers to its stream: no cycle left for the collector)
        if not self.remote_ended and not (self.tunnel is not None and self.tunnel.away):
            # (A WebSocket the drain closed: the client ends its side after its Close frame.)
            self.remote_ended = True
            try:
                conn.h2.reset_stream(self.sid, h2.errors.ErrorCodes.NO_ERROR)
            except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
                pass
            conn.flush_later()
        conn.stream_gone()


class H2Connection(asyncio.Protocol):
    """A client connection speaking HTTP/2: its streams, flow control, defences and drain."""

    __slots__ = (
        "accepted",
        "blocked",
        "closing",
        "conn_unacked",
        "control",
        "ctx",
        "data_frames",
        "flush_queued",
        "goaway",
        "goaway_at",
        "gone_credit",
        "h2",
        "heads",
        "in_feed",
        "increments",
        "last_active",
        "last_stream",
        "max_list",
        "max_streams",
        "opened",
        "peer",
        "peer_gone",
        "requests",
        "resets",
        "stream_credit",
        "streams",
        "touched",
        "transport",
        "unread",
        "window_credit",
        "window_start",
        "write_paused",
    )

    def __init__(self, ctx: Context, transport: asyncio.Transport, peer: Peer) -> None:
        self.ctx = ctx
        self.transport = transport
        self.peer = peer
        cfg = ctx.config
        self.max_streams = cfg.http2_max_concurrent_streams
        c = self.h2 = ServerConnection(server_config())
        # HPACK limits: a decoded header list past twice the head limit is a connection error (an
        # HPACK bomb ends there); one within it but past max_request_head_size is a 431 on its stream.
        c.decoder = RememberingDecoder(2 * ctx.max_head)  # type: ignore[assignment]
        settings = {
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: self.max_streams,
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
            h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: ctx.max_head,
            h2.settings.SettingCodes.ENABLE_CONNECT_PROTOCOL: 1,  # RFC 8441: WebSockets over streams
        }
        c.local_settings = h2.settings.Settings(client=False, initial_values=settings)
        c.initiate_connection()
        c.increment_flow_control_window(CONNECTION_WINDOW - 65535)
        # h2 treats one stream past the limit as a connection error; RFC 9113 §5.1.2 lets a server
        # refuse just that stream (REFUSED_STREAM, which clients retry): h2 enforces a higher bound
        # (its stream-ID checks stay), and _request refuses.
        c.local_settings = h2.settings.Settings(
            client=False, initial_values={**settings, h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 2**31 - 1}
        )
        self.streams: dict[int, H2Stream] = {}
        self.touched: list[H2Stream] = []
        self.blocked: collections.deque[H2Stream] = collections.deque()  # waiting for the connection's window
        # Frames a client may send without counting against CONTROL_BUDGET (_earned, _unasked).
        self.window_credit = _Allowance(WINDOW_CREDIT_CAP)  # connection WINDOW_UPDATEs
        self.stream_credit = _Allowance(WINDOW_CREDIT_CAP)  # streams' WINDOW_UPDATEs
        self.gone_credit = _Allowance(GONE_DATA * self.max_streams)  # DATA for streams that are gone
        self.increments = 0  # the client's connection WINDOW_UPDATEs, summed
        self.data_frames = 0  # DATA frames sent but send_last's one-frame responses (counted in ``opened``)
        self.heads: dict[tuple[bytes, bool], Any] = {}  # response heads mapped (per connection: HPACK is)
        self.requests: dict[tuple[int, bool], tuple[Any, h2map.Mapped | str, RequestHead | Reason | None]] = {}
        self.in_feed = False
        self.write_paused = False
        self.unread = 0  # bytes answered to the client's frames while its transport was full
        self.closing = False
        self.flush_queued = False
        self.peer_gone = False  # the client sent GOAWAY
        self.goaway = _OPEN
        self.goaway_at = 0.0
        self.last_stream = _MAX_STREAM_ID
        self.conn_unacked = 0
        self.opened = 0
        self.accepted = self.last_active = ctx.clock
        self.window_start = ctx.clock
        self.resets = 0  # streams the client reset before their response ended, this second
        self.control = 0  # PING and SETTINGS frames this second
        self.max_list = 0  # the largest field section the client takes (_limits)
        self._limits()

    def start(self, data: bytes) -> None:
        """Take over the transport (its protocol until now saw ``data`` and nothing else)."""
        self.transport.set_protocol(self)
        self.flush_later()
        if data:
            self.data_received(data)
        if self.ctx.draining and not self.closing:  # accepted during drain_delay: move on, please
            self._notice_goaway()

    # ---- the Outbox's view: a transport whose pending frames leave when it is flushed

    def is_closing(self) -> bool:
        return self.transport.is_closing()

    def write(self, data: bytes) -> None:
        """Write what h2 has queued (``data`` is the Outbox's empty marker)."""
        self.flush_queued = False
        out = self.h2.data_to_send()
        if out and not self.transport.is_closing():
            self.transport.write(out)

    def writelines(self, data: list[bytes]) -> None:
        self.write(b"")

    def flush_later(self) -> None:
        """Frames leave after this loop iteration, with every other stream's."""
        if not self.flush_queued:
            self.flush_queued = True
            self.ctx.outbox.write(self, b"")  # type: ignore[arg-type]

    def flush_now(self) -> None:
        self.ctx.outbox.send(self, b"")  # type: ignore[arg-type]

    # ---- asyncio.Protocol

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        held = _held(self) if self.write_paused else -1
        self.in_feed = True
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError as e:
            # h2 has queued a GOAWAY with the error code: send it and close (a connection error).
            log.info("HTTP/2 connection error from %s: %s", self.peer.ip, e)
            self.in_feed = False
            self._abort_streams()
            self._close_after_flush()
            return
        try:
            self._handle(events)
        except Exception:
            log.exception("HTTP/2 event handling failed")
            self.in_feed = False
            self._go_away(h2.errors.ErrorCodes.INTERNAL_ERROR)
            return
        self.in_feed = False
        h = self.h2
        if (h.idle_frames or h.stream_updates or h.gone_data) and self._unasked():
            return
        touched = self.touched
        if touched:
            self.touched = []
            for s in touched:
                s.touched = False
                x = s.x
                if x is not None and x.up is not None and x.up_buf:
                    x.flush_up()
                if not s.paused and s.unacked >= STREAM_WINDOW // 4:
                    s.acknowledge()
        if self.conn_unacked >= CONNECTION_WINDOW // 4:
            self.h2.increment_flow_control_window(self.conn_unacked)
            self.conn_unacked = 0
        if held >= 0 and self._unread(held):
            return
        if self.h2.queued() > flow.WRITE_HIGH:
            # Answers past the high-water mark from one read (many small requests, each answered
            # by the gateway): written now, so that pause_writing tells within this batch of reads
            # that the client does not read them (_unread), not after a loop iteration's reads.
            self.flush_now()
        else:
            self.flush_later()

    def _unread(self, held: int) -> bool:
        """A read handled while the client's transport was full: what it made the gateway answer
        (an error page, RST_STREAM, a PING's ACK...) waits in memory, not in the kernel. A client
        that sends without reading would make it grow, ten bytes of answer for each byte of
        request; past :data:`UNREAD_LIMIT` the connection is reset (the GOAWAY could not be read).
        The sandboxes' DATA is not counted: it stops at the high-water mark (pause_writing), and
        what the streams held for the client's windows (``out``) is in :func:`_held` before and
        after, so a WINDOW_UPDATE that sends megabytes of it (httpx gives the connection's window
        back 8 MiB at a time) moves bytes, it adds none. True: the connection is gone."""
        self.unread += _held(self) - held
        if self.unread <= UNREAD_LIMIT:
            return False
        log.info("HTTP/2 client %s sends without reading what it is answered: reset", self.peer.ip)
        self._go_away(h2.errors.ErrorCodes.ENHANCE_YOUR_CALM)
        flow.reset(self.transport)
        return True

    def eof_received(self) -> bool:
        """The client sends nothing more: streams whose request is complete may still be answered
        (as over HTTP/1.1, RFC 9112 §9.6), a tunnel is half-closed towards its sandbox, a request
        still being sent ends here."""
        self.peer_gone = True
        for s in list(self.streams.values()):
            if s.tunnel is not None:
                s.tunnel.client_ended()
            elif not s.remote_ended:
                s.remote_ended = True
                if s.x is not None:
                    s.x.abort()
                s._reset(h2.errors.ErrorCodes.CANCEL)
        return bool(self.streams)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        ctx = self.ctx
        ctx.connections.discard(self)
        ctx.closed_one()
        self._abort_streams()

    def _abort_streams(self) -> None:
        """The connection is over (or h2 can send nothing more on it): every stream ends here."""
        streams = list(self.streams.values())
        self.streams.clear()
        self.blocked.clear()
        for s in streams:
            s.ended = s.remote_ended = True
            if s.tunnel is not None:
                s.tunnel.client_gone()
            x = s.x
            if x is not None:
                x.abort()
                s.x = None  # (as _finish: no cycle left)

    def pause_writing(self) -> None:
        """The client is not reading as fast as the gateway writes: its streams' sandboxes stop
        being read (the client still is: its uploads, WINDOW_UPDATEs and resets go on, and some
        clients read only once their writer has made progress; what the gateway answers it
        meanwhile is capped, see :data:`UNREAD_LIMIT`)."""
        self.write_paused = True
        self.unread = 0
        for s in self.streams.values():
            x = s.x
            if x is not None and x.up is not None:
                x.up.gate.close(flow.PEER_BUSY)
            elif s.tunnel is not None:
                s.tunnel.gate.close(flow.PEER_BUSY)

    def resume_writing(self) -> None:
        self.write_paused = False
        for s in list(self.streams.values()):
            x = s.x
            if x is not None and x.up is not None:
                x.up.gate.open(flow.PEER_BUSY)
            elif s.tunnel is not None:
                s.tunnel.gate.open(flow.PEER_BUSY)

    # ---- events

    def _handle(self, events: list[h2.events.Event]) -> None:
        reset_now: set[int] | None = None
        for ev in events:  # streams cancelled in this very read are never started (rapid reset)
            if ev.__class__ is h2.events.StreamReset:
                if reset_now is None:
                    reset_now = set()
                reset_now.add(ev.stream_id)
        for ev in events:
            t = ev.__class__
            if t is h2.events.RequestReceived:
                self._request(ev, reset_now)  # type: ignore[arg-type]
            elif t is h2.events.DataReceived:
                self._data(ev)  # type: ignore[arg-type]
            elif t is h2.events.StreamEnded:
                self._ended(ev.stream_id)  # type: ignore[attr-defined]
            elif t is h2.events.WindowUpdated:
                if ev.stream_id:  # type: ignore[attr-defined]
                    self._stream_window(ev.stream_id)  # type: ignore[attr-defined]
                else:
                    self._connection_window(ev.delta)  # type: ignore[attr-defined]
            elif t is h2.events.StreamReset:
                self._reset_by_client(ev.stream_id)  # type: ignore[attr-defined]
            elif t is h2.events.TrailersReceived:
                self._trailers(ev)  # type: ignore[arg-type]
            elif t is h2.events.RemoteSettingsChanged:
                self._control()
                changed = ev.changed_settings  # type: ignore[attr-defined]
                if h2.settings.SettingCodes.INITIAL_WINDOW_SIZE in changed:
                    self._every_window()
                if _SIZES & changed.keys():
                    self._limits()
            elif t is h2.events.PingReceived:
                self._control()
            elif t is h2.events.PingAckReceived:
                self._control()  # (the gateway sends one PING, at a drain: the others ask for nothing)
                if self.goaway == _NOTICE and not self.ctx.listening:
                    self._final_goaway()
            elif t is h2.events.SettingsAcknowledged:
                self._control()  # (the gateway sends its SETTINGS once)
            elif t is h2.events.ConnectionTerminated:
                # h2 sends nothing after a GOAWAY either way (python-hyper/h2#1181): what the
                # client still waits for cannot be answered; it ends here.
                self.peer_gone = True
                self._abort_streams()
                self._close_after_flush()
            if self.closing:
                return

    def _request(self, ev: h2.events.RequestReceived, reset_now: set[int] | None) -> None:
        sid = ev.stream_id
        h = self.h2
        self.opened += 1
        self.last_active = self.ctx.clock
        if sid > self.last_stream:  # after the final GOAWAY: never processed, the client may retry
            h.reset_stream(sid, h2.errors.ErrorCodes.REFUSED_STREAM)
            return
        if reset_now is not None and sid in reset_now:
            self._count_reset()
            return
        if len(self.streams) >= self.max_streams:
            h.reset_stream(sid, h2.errors.ErrorCodes.REFUSED_STREAM)
            self._count_reset()  # past the limit it was told (§5.1.2), each a request for nothing
            return
        end = ev.stream_ended is not None
        headers = ev.headers
        # The decoder's remembered list for a repeated block (h2conn.py):
        # the same list object, so known by identity (the memo holds it: its id is not reused meanwhile).
        key = (id(headers), end)
        got = self.requests.get(key)
        if got is None or got[0] is not headers:
            mapped = h2map.request_head(headers, end)
            req: RequestHead | Reason | None = None
            if not isinstance(mapped, str):
                if len(mapped.raw) > self.ctx.max_head or mapped.fields > self.ctx.config.max_header_count:
                    req = errors.HEAD_TOO_LARGE
                else:
                    req = analyze_request(mapped.raw, self.ctx.fields)
            got = (headers, mapped, req)
            if isinstance(mapped, str) or mapped.ws_key is None:  # a WebSocket's key is its own
                if len(self.requests) >= 64:
                    self.requests.clear()
                self.requests[key] = got
        _, mapped, req = got
        if isinstance(mapped, str):
            log.info("malformed HTTP/2 request from %s: %s", self.peer.ip, mapped)
            h.reset_stream(sid, h2.errors.ErrorCodes.PROTOCOL_ERROR)
            return
        s = H2Stream(self, sid)
        self.streams[sid] = s
        s.chunked = mapped.chunked
        s.connect = mapped.protocol is not None
        if end:
            s.remote_ended = True
        if not isinstance(req, RequestHead):
            assert req is not None
            # Refused by the header policy: the same answer an HTTP/1.1 client gets, on this stream.
            s.x = x = Exchange(s, RequestHead(mapped.raw, b"GET", b"/"))
            x.fail(req)
            return
        if end and req.body != framing.NONE:  # content-length > 0 and no DATA to come (h2 does not check)
            log.info("HTTP/2 request from %s: content-length without DATA", self.peer.ip)
            s.x = None
            s._reset(h2.errors.ErrorCodes.PROTOCOL_ERROR)
            return
        s.x = x = Exchange(s, req)
        if end or mapped.protocol is not None:
            x.req_done = True
        x.start()

    def _data(self, ev: h2.events.DataReceived) -> None:
        n = ev.flow_controlled_length
        self.conn_unacked += n
        s = self.streams.get(ev.stream_id)
        if s is None:
            return
        self.last_active = self.ctx.clock
        s.unacked += n
        data = ev.data
        if s.tunnel is not None:
            s.tunnel.from_client(data)
        elif s.connect:
            x = s.x
            if x is not None and not x.done and data:
                s.early.append(data)  # after the sandbox's 101 (h2tunnel.start)
            return
        else:
            x = s.x
            if x is None or x.done or not data:
                return
            if s.chunked:
                x.on_request_framing(b"%x\r\n" % len(data))
                x.on_request_body(data)
                x.on_request_framing(b"\r\n")
            else:
                x.on_request_body(data)
        if not s.touched:
            s.touched = True
            self.touched.append(s)

    def _trailers(self, ev: h2.events.TrailersReceived) -> None:
        s = self.streams.get(ev.stream_id)
        if s is None or s.x is None or s.x.done:
            return
        section = h2map.trailer_section(ev.headers)
        if isinstance(section, str):
            log.info("malformed HTTP/2 trailers from %s: %s", self.peer.ip, section)
            s.x.abort()
            s._reset(h2.errors.ErrorCodes.PROTOCOL_ERROR)
            return
        if s.chunked:
            s.x.on_request_framing(b"0\r\n" + section)
            s.chunked = False
            if len(section) > 2:  # a field, not only the empty line
                s.x.on_request_trailers()
        elif ev.headers:
            # The request had content-length: its HTTP/1.1 body is framed by Content-Length, after
            # which no trailer section can follow (RFC 9112 §6), and the head went before the
            # trailers came. Dropped, as the header policy says (headers.py), logged and counted.
            self.ctx.metrics.trailers_dropped += 1
            log.info(
                "HTTP/2 request trailers from %s not forwarded (the request has content-length): %s",
                self.peer.ip,
                ", ".join(n.decode("latin-1") for n, _ in ev.headers[:16]),
            )

    def _ended(self, sid: int) -> None:
        s = self.streams.get(sid)
        if s is None:
            return
        s.remote_ended = True
        if s.tunnel is not None:
            s.tunnel.client_ended()
            return
        x = s.x
        if x is None or x.done or x.req_done:
            return
        req = x.req
        if req.body == framing.LENGTH and x.body_bytes != req.content_length:
            log.info("HTTP/2 request from %s: content-length and DATA differ", self.peer.ip)
            x.abort()
            s._reset(h2.errors.ErrorCodes.PROTOCOL_ERROR)
            return
        if s.chunked:
            x.on_request_framing(framing.LAST_CHUNK)
        x.on_request_complete()
        if not s.touched:
            s.touched = True
            self.touched.append(s)

    def _stream_window(self, sid: int) -> None:
        s = self.streams.get(sid)
        if s is not None and (s.out or s.end_pending):
            s.pump()
            self.flush_later()

    def _connection_window(self, delta: int) -> None:
        """A WINDOW_UPDATE for the connection (stream 0): the streams waiting for the connection's
        window send, in the order they began to wait, until it is spent again; the others are not
        looked at (a stream whose own window is shut waits for its own WINDOW_UPDATE).

        A client gives back window for DATA it received: those updates are free (:meth:`_earned`),
        however fast a gigabyte comes; any more (a flood of 1-byte updates for nothing received)
        count as control frames, as PING and SETTINGS do (:meth:`_control`)."""
        h = self.h2
        self.increments += delta
        if self.window_credit.spend(self._earned(), 1):
            self._control()
            if self.closing:
                return
        blocked = self.blocked
        if blocked:
            while blocked and h.outbound_flow_control_window > 0:
                s = blocked.popleft()
                s.blocked = False
                s.pump()
            self.flush_later()

    def _limits(self) -> None:
        """The largest field section (RFC 9113 §6.5.2) this client takes: its
        SETTINGS_MAX_HEADER_LIST_SIZE (advisory, §6.5.2, but python-hyper's h2 ends the connection
        past it, and sends 64 KiB), and at most what fits a HEADERS frame and the CONTINUATION
        frames nghttp2 takes (h2map.MAX_CONTINUATIONS). Response heads were measured against the old
        limit: measured again."""
        h = self.h2
        advertised = h.remote_settings.max_header_list_size
        frames = (1 + h2map.MAX_CONTINUATIONS) * h.max_outbound_frame_size
        self.max_list = frames if advertised is None else min(advertised, frames)
        self.heads.clear()

    def _every_window(self) -> None:
        """SETTINGS_INITIAL_WINDOW_SIZE changed every stream's window (RFC 9113 §6.9.2); SETTINGS
        frames count against the control budget."""
        for s in list(self.streams.values()):
            if s.out:
                s.pump()
        self.flush_later()

    def _reset_by_client(self, sid: int) -> None:
        s = self.streams.pop(sid, None)
        if s is None:
            return
        s.unblock()
        s.ended = s.remote_ended = True
        if s.tunnel is not None:
            s.tunnel.client_gone()
        x = s.x
        if x is not None and not x.done:
            x.abort()
            self._count_reset()
        s.x = None
        self.stream_gone()

    def _count_reset(self) -> None:
        """CVE-2023-44487: a client that opens and resets streams makes work it never waits for;
        so does one that opens streams past the limit its SETTINGS said (each refused). A client
        that opened streams before it saw the limit is refused that once, well within the budget."""
        self._new_second()
        self.resets += 1
        if self.resets > 2 * self.max_streams:
            log.info(
                "HTTP/2 rapid reset from %s: %d streams reset or refused within a second", self.peer.ip, self.resets
            )
            self._go_away(h2.errors.ErrorCodes.ENHANCE_YOUR_CALM)

    def _earned(self) -> int:
        """WINDOW_UPDATEs (of each kind: the connection's, the streams') a client has earned by
        what it received: one per stream, one per DATA frame (counted off the hot path: a response
        in one frame is counted as its stream), and one per 4 KiB of DATA. Clients give window
        back at thresholds: browsers, nghttp2 and h2 at a quarter or half of a window, .NET every
        8 KiB, Go every 4 KiB its application reads (so up to four of each kind per 16 KiB frame)."""
        sent = 65535 + self.increments - self.h2.outbound_flow_control_window  # (§6.9.2: 65,535 to begin)
        return self.opened + self.data_frames + max(0, sent) // 4096

    def _unasked(self) -> bool:
        """Frames that ask the gateway for nothing (ServerConnection._receive_frame names them):
        h2 parses and processes each, so a flood of them (CVE-2019-9513's PRIORITY frames,
        CVE-2019-9518's empty frames, RST_STREAM for streams long gone) is work without a request,
        and counts as control frames (:meth:`_control`). Free: a stream's WINDOW_UPDATE as the
        connection's (:meth:`_earned`), and :data:`GONE_DATA` DATA frames per stream, which a
        client sent before it learnt that the gateway had ended the stream (an early 401 or 413
        while the body is on its way; RFC 9113 §5.1). What is earned and not used is kept up to a
        cap, so that a long connection does not bank a flood. True: past the budget, the
        connection is going away."""
        h = self.h2
        n = h.idle_frames
        if h.stream_updates:
            n += self.stream_credit.spend(self._earned(), h.stream_updates)
        if h.gone_data:
            n += self.gone_credit.spend(GONE_DATA * self.opened, h.gone_data)
        h.idle_frames = h.stream_updates = h.gone_data = 0
        if n:
            self._control(n)
        return self.closing

    def _control(self, n: int = 1) -> None:
        """PING and SETTINGS each make the gateway answer: a flood of them is refused."""
        self._new_second()
        self.control += n
        if self.control > CONTROL_BUDGET:
            log.info("HTTP/2 control frame flood from %s", self.peer.ip)
            self._go_away(h2.errors.ErrorCodes.ENHANCE_YOUR_CALM)

    def _new_second(self) -> None:
        now = self.ctx.clock
        if now != self.window_start:
            self.window_start = now
            self.resets = self.control = 0

    # ---- streams ending, drain, timeouts

    def stream_gone(self) -> None:
        """A stream ended; once none is left, a connection going away closes."""
        if not self.streams:
            self.last_active = self.ctx.clock
            if self.peer_gone or self.goaway == _FINAL:
                self._close_after_flush()

    def _go_away(self, code: int) -> None:
        """A connection error of ours: GOAWAY with ``code``, then close; streams in progress end."""
        if self.closing:
            return
        self._abort_streams()
        try:
            self.h2.close_connection(error_code=code)
        except h2.exceptions.ProtocolError:
            pass
        self._close_after_flush()

    def _close_after_flush(self) -> None:
        if self.closing:
            return
        self.closing = True
        self.write(b"")
        self.ctx.outbox.flush()
        self.transport.close()

    def _goaway_frame(self, last: int) -> None:
        """GOAWAY NO_ERROR, written by hyperframe: h2's close_connection would close its state
        machine, and RFC 9113 §6.8 lets the streams below ``last`` finish."""
        out = self.h2.data_to_send() + GoAwayFrame(0, last_stream_id=last, error_code=0).serialize()
        if not self.transport.is_closing():
            self.transport.write(out)

    def _notice_goaway(self) -> None:
        """Drain, first step: no new streams please, those already on their way are still taken
        (last-stream-ID 2^31-1), and a PING to learn when the client has seen it."""
        self.goaway = _NOTICE
        self.goaway_at = self.ctx.clock
        self.flush_now()
        self._goaway_frame(_MAX_STREAM_ID)
        self.h2.ping(b"gw-drain")
        self.flush_now()

    def _final_goaway(self) -> None:
        """Drain, second step (a round trip later): streams past the last one started are refused."""
        self.goaway = _FINAL
        self.last_stream = self.h2.highest_inbound_stream_id
        self.flush_now()
        self._goaway_frame(self.last_stream)
        if not self.streams:
            self._close_after_flush()

    def close(self) -> None:
        """Close now, after a GOAWAY (shutdown)."""
        if not self.closing:
            if self.goaway != _FINAL:
                self.flush_now()
                self._goaway_frame(self.h2.highest_inbound_stream_id)
            self._close_after_flush()

    def reset(self) -> None:
        self.closing = True
        self.write(b"")
        flow.reset(self.transport)

    def check_timeouts(self, now: float) -> None:
        """About once a second, and when a drain closes the listeners."""
        if self.closing:
            return
        ctx = self.ctx
        cfg = ctx.config
        if ctx.draining:
            if self.goaway == _OPEN:
                self._notice_goaway()
            if self.goaway == _NOTICE and not ctx.listening and now - self.goaway_at >= 1.0:
                self._final_goaway()  # no PING answer in a second: go on
        streams = self.streams
        if not streams:
            if self.opened == 0:
                if now - self.accepted > cfg.request_head_timeout:
                    self.close()
            elif now - self.last_active >= (cfg.client_idle_timeout if ctx.listening else 0.0):
                self.close()
            return
        limit = cfg.response_head_timeout
        t = monotonic()
        for s in list(streams.values()):
            x = s.x
            if x is None:
                continue
            if limit and x.req_done and not x.resp_started and x.up is not None and t - (x.req_end or x.t0) > limit:
                log.info("no response head from %s in %.0f s", x.fwd.address if x.fwd else "?", limit)
                x.fail(errors.UPSTREAM_RESPONSE_TIMEOUT)
            elif cfg.min_body_rate:
                self._check_body_rate(s, x, now, cfg.min_body_rate, cfg.body_rate_window)

    def _check_body_rate(self, s: H2Stream, x: Exchange, now: float, rate: int, window: float) -> None:
        """As for HTTP/1.1: a request body counts while the gateway takes it (the stream is not held
        back), a response body while the client is the bottleneck (its window or socket is full)."""
        if not s.remote_ended and not x.done and not s.paused and s.tunnel is None:
            moved = x.body_bytes
        elif s.out and (s.holding or self.write_paused or self.h2.local_flow_control_window(s.sid) <= 0):
            moved = s.sent
        else:
            s.bytes_mark = None
            return
        mark = s.bytes_mark
        if mark is None:
            s.bytes_mark = (now, moved)
            return
        if now - mark[0] < window:
            return
        if moved - mark[1] >= rate * window:
            s.bytes_mark = (now, moved)
            return
        s.bytes_mark = None
        log.info("HTTP/2 body slower than %d bytes/s for %.0f s from %s: ending the stream", rate, window, self.peer.ip)
        if x.resp_started and not s.ended:
            s._reset(h2.errors.ErrorCodes.CANCEL)  # the client's doing, not the gateway's: CANCEL
        if not x.done:
            x.fail(errors.BODY_TIMEOUT)  # answered if nothing was sent yet
        if not s.ended:
            s._reset(h2.errors.ErrorCodes.CANCEL)
        self.flush_later()
