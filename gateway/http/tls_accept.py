"""TLS listeners: the gateway accepts their connections itself and owns each until TLS hands it over.

asyncio calls a TLS protocol's ``connection_made`` only once the handshake is done, and says nothing
when a handshake fails: with ``create_server(ssl=...)`` a connection in its handshake belongs to no
one the gateway can see. A drain then found "nothing open" while handshakes of connections it had
accepted (its accept queue, a burst) were still under way, and the process exited under them. So
for every listener with ``tls`` an :class:`Acceptor` takes the sockets off the listener (``accept``
in the loop's reader callback, up to 64 a turn: no accepted socket ever waits in a future that a
cancellation could drop), runs one task per connection until ``connect_accepted_socket`` has handed
it, TLS done, to its ``ClientConnection``, and counts those tasks in ``Context.opening``: the drain
waits for them as for open connections (``Context.closed_one``).

PROXY protocol in front of TLS (``tls proxy``, ``tls proxy-optional``): an L4 balancer in TLS
passthrough mode (AWS NLB with a TCP listener, HAProxy ``mode tcp``) sends the PROXY header in clear,
then the client's TLS bytes. asyncio's TLS transports start the handshake with the first byte read,
and ``start_tls`` cannot be handed bytes already read, so the acceptor *peeks* (MSG_PEEK) until the
header is complete, consumes exactly the header's bytes, and only then gives the socket to TLS.
Nothing after the header is ever taken off the socket. With ``proxy-optional`` a connection whose
first bytes are not a PROXY header goes straight to TLS. The header must arrive within
``request_head_timeout``, and the handshake must complete within it too (``ssl_handshake_timeout``).

Waiting for the rest of a header: peeked bytes stay readable, so readability alone would wake the
loop again at once. The socket's receive low-water mark (``SO_RCVLOWAT``, which Linux's poll honours
for TCP) is set one byte past what is there, so the loop wakes when more has arrived, or at EOF or
an error; it is set back to 1 before TLS gets the socket. A wake-up that brings nothing new means
the peer is done (``POLLRDHUP``: the header can never complete, the connection ends) or the mark is
not honoured (another kernel): then a 5 ms poll, bounded like everything else by the timeout. Each
turn of the loop therefore sees more bytes or waits.

The drain (server.py ``close_listeners``) only stops the accepting (:meth:`Acceptor.stop_accepting`,
after the accept queue was emptied): a connection the acceptor holds goes on with its header and its
handshake within their bounds, then is served like any connection accepted before the drain
(``Connection: close``, GOAWAY). What is still opening when ``shutdown_timeout`` ends is cancelled
(:meth:`Acceptor.abort`); :meth:`Acceptor.close` (the stop) also waits for those tasks to end.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import select
import socket
import ssl
from typing import Final

from gateway.http import proxy_protocol
from gateway.http.context import Context
from gateway.http.downstream import ClientConnection

__all__ = ["Acceptor"]

log = logging.getLogger("gateway.downstream")

#: Connections accepted per wake-up of the listener at most: the loop turns between batches (the
#: listener is still readable, so the rest comes at the next turn).
_BATCH: Final = 64
#: After an accept failure other than a vanished connection (EMFILE, ENFILE, ENOBUFS): pause.
_RETRY: Final = 0.1
#: Poll interval for a header's rest where the receive low-water mark is not honoured.
_POLL: Final = 0.005
_HUNG_UP: Final = select.POLLHUP | select.POLLERR | getattr(select, "POLLRDHUP", 0)


async def _readable(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    fut: asyncio.Future[None] = loop.create_future()

    def ready() -> None:
        if not fut.done():
            fut.set_result(None)

    loop.add_reader(sock.fileno(), ready)
    try:
        await fut
    finally:
        loop.remove_reader(sock.fileno())


def _low_water(sock: socket.socket, n: int) -> bool:
    """Set SO_RCVLOWAT: readiness then needs ``n`` bytes (or EOF, or an error)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, n)
    except OSError:
        return False
    return True


def _hung_up(sock: socket.socket) -> bool:
    """Whether the peer has shut down its sending side (or the socket failed): no more bytes come."""
    p = select.poll()
    p.register(sock.fileno(), select.POLLIN | _HUNG_UP)
    return any(ev & _HUNG_UP for _, ev in p.poll(0))


async def _read_header(
    loop: asyncio.AbstractEventLoop, sock: socket.socket, mode: str
) -> tuple[proxy_protocol.ProxyInfo | None, bool]:
    """(what the header said or None, whether the connection may go on)."""
    seen = -1  # bytes peeked when the low-water mark was last set (-1: never set)
    try:
        while True:
            try:
                data = sock.recv(proxy_protocol.MAX_HEADER_LENGTH, socket.MSG_PEEK)
            except BlockingIOError:
                await _readable(loop, sock)
                continue
            if not data:
                return None, False  # closed before a header
            try:
                got = proxy_protocol.parse(data)
            except proxy_protocol.ProxyProtocolError as e:
                if mode == "optional" and not proxy_protocol.may_be_header(data):
                    return None, True  # a direct TLS client
                log.info("PROXY protocol header refused: %s", e)
                return None, False
            if got is proxy_protocol.NEED_MORE:
                if len(data) > seen and _low_water(sock, len(data) + 1):
                    seen = len(data)
                    await _readable(loop, sock)  # more bytes, EOF or an error
                elif _hung_up(sock):
                    return None, False  # the rest will never come
                else:
                    await asyncio.sleep(_POLL)  # the mark is not honoured here (module docstring)
                continue
            info, used = got
            sock.recv(used)  # exactly the header; the TLS bytes stay for the handshake
            return info, True
    finally:
        if seen >= 0:
            _low_water(sock, 1)  # TLS reads as usual


class Acceptor:
    """Accepts the connections of one TLS listener and takes each to its protocol (module docstring)."""

    def __init__(self, ctx: Context, listener: socket.socket, port: int, proxy: str, ssl_ctx: ssl.SSLContext) -> None:
        """``proxy``: the listener's PROXY protocol mode, "off", "required" or "optional"."""
        self.ctx = ctx
        self.loop = ctx.loop
        self.listener = listener
        self.port = port
        self.proxy = proxy
        self.ssl_ctx = ssl_ctx
        #: Connections accepted and not yet handed to their protocol (PROXY header, TLS handshake).
        self.opening: set[asyncio.Task[bool]] = set()
        self.accepting = False
        self._retry: asyncio.TimerHandle | None = None

    def start(self) -> None:
        self.accepting = True
        self.loop.add_reader(self.listener.fileno(), self._accept)

    def _accept(self) -> None:
        for _ in range(_BATCH):
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:  # reset by the client before it was taken: the next one
                continue
            except OSError as e:  # EMFILE and its kin: keep the listener, try again shortly
                log.warning("accept failed on %d: %s", self.port, e)
                self.loop.remove_reader(self.listener.fileno())
                self._retry = self.loop.call_later(_RETRY, self._resume)
                return
            sock.setblocking(False)
            t = self.loop.create_task(self._open(sock))
            self.opening.add(t)
            self.ctx.opening += 1
            t.add_done_callback(functools.partial(self._opened, sock))

    def _resume(self) -> None:
        self._retry = None
        if self.accepting:
            self.loop.add_reader(self.listener.fileno(), self._accept)

    async def _open(self, sock: socket.socket) -> bool:
        """Read the PROXY header if the listener wants one, then TLS; True once the protocol has it."""
        loop = self.loop
        cfg = self.ctx.config
        source = None
        try:
            if self.proxy != "off":
                async with asyncio.timeout(cfg.request_head_timeout):
                    info, ok = await _read_header(loop, sock, self.proxy)
                if not ok:
                    return False
                if info is not None and info.source is not None:
                    source = info.source[0]
            await loop.connect_accepted_socket(
                lambda: ClientConnection(self.ctx, self.port, True, "off", source),
                sock,
                ssl=self.ssl_ctx,
                ssl_handshake_timeout=cfg.request_head_timeout,
            )
        except (TimeoutError, OSError, ssl.SSLError) as e:
            log.debug("connection on %d ended before TLS completed: %r", self.port, e)
            return False
        return True

    def _opened(self, sock: socket.socket, t: asyncio.Task[bool]) -> None:
        self.opening.discard(t)
        self.ctx.opening -= 1
        handed = not t.cancelled() and t.exception() is None and t.result()
        if not t.cancelled() and t.exception() is not None:
            log.error("opening a connection on %d failed", self.port, exc_info=t.exception())
        if not handed:
            # The transport, if one was made, has closed the socket already (then this only marks it).
            with contextlib.suppress(OSError):
                sock.close()
        self.ctx.closed_one()

    def stop_accepting(self) -> None:
        """Close the listener; the connections already accepted go on (module docstring)."""
        if not self.accepting:
            return
        self.accepting = False
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        else:
            self.loop.remove_reader(self.listener.fileno())
        self.listener.close()

    def abort(self) -> None:
        """End the connections still reading their PROXY header or in their TLS handshake."""
        for t in list(self.opening):
            t.cancel()

    async def close(self) -> None:
        """Stop accepting, end what is still opening, and wait (bounded) until those tasks are done."""
        self.stop_accepting()
        self.abort()
        if self.opening:
            await asyncio.wait(list(self.opening), timeout=2.0)
