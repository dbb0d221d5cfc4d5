"""PROXY protocol in front of TLS: the header is read off the raw socket, then TLS starts.

An L4 balancer in TLS passthrough mode (AWS NLB with a TCP listener, HAProxy ``mode tcp``) sends the
PROXY header in clear, then the client's TLS bytes. asyncio's TLS transports start the handshake
with the first byte read, and ``start_tls`` cannot be handed bytes already read, so for listeners
with both ``tls`` and ``proxy`` the gateway accepts the socket itself, *peeks* (MSG_PEEK) until the
header is complete, consumes exactly the header's bytes, and only then gives the socket to
``connect_accepted_socket`` with TLS. Nothing after the header is ever taken off the socket.
With ``proxy-optional`` a connection whose first bytes are not a PROXY header goes straight to TLS.
The header must arrive within ``request_head_timeout``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl

from gateway.http import proxy_protocol
from gateway.http.context import Context
from gateway.http.downstream import ClientConnection

__all__ = ["accept_loop"]

log = logging.getLogger("gateway.downstream")


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


async def _read_header(
    loop: asyncio.AbstractEventLoop, sock: socket.socket, mode: str
) -> tuple[proxy_protocol.ProxyInfo | None, bool]:
    """(what the header said or None, whether the connection may go on)."""
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
            # Peeked bytes stay readable, so waiting for readability would spin: the rest of a
            # header split across segments comes within a round trip.
            await asyncio.sleep(0.005)
            continue
        info, used = got
        sock.recv(used)  # exactly the header; the TLS bytes stay for the handshake
        return info, True


async def _serve_one(ctx: Context, sock: socket.socket, port: int, mode: str, ssl_ctx: ssl.SSLContext) -> None:
    loop = asyncio.get_running_loop()
    cfg = ctx.config
    try:
        async with asyncio.timeout(cfg.request_head_timeout):
            info, ok = await _read_header(loop, sock, mode)
        if not ok:
            sock.close()
            return
        source = info.source[0] if info is not None and info.source is not None else None
        await loop.connect_accepted_socket(
            lambda: ClientConnection(ctx, port, True, "off", source),
            sock,
            ssl=ssl_ctx,
            ssl_handshake_timeout=cfg.request_head_timeout,
        )
    except (TimeoutError, OSError, ssl.SSLError) as e:
        log.debug("connection on %d ended before TLS: %r", port, e)
        with contextlib.suppress(OSError):
            sock.close()


async def accept_loop(ctx: Context, listener: socket.socket, port: int, mode: str, ssl_ctx: ssl.SSLContext) -> None:
    """Accept connections until cancelled (drain/stop closes the listener)."""
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[None]] = set()
    try:
        while True:
            try:
                sock, _ = await loop.sock_accept(listener)
            except OSError as e:  # e.g. EMFILE: keep the loop alive, try again shortly
                log.warning("accept failed on %d: %s", port, e)
                await asyncio.sleep(0.1)
                continue
            sock.setblocking(False)
            t = loop.create_task(_serve_one(ctx, sock, port, mode, ssl_ctx))
            tasks.add(t)
            t.add_done_callback(tasks.discard)
    finally:
        listener.close()
        for t in tasks:
            t.cancel()
