"""Lifecycle of one gateway process: listeners, the admin app, timers, signals and the drain.

SIGTERM drains (what an orchestrator sends before it removes an instance): ``/ready`` answers 503
at once so balancers stop sending new connections, the listeners stay open for ``drain_delay``
seconds (balancers need a few health-check intervals to notice), then close; in-flight requests get
up to ``shutdown_timeout`` seconds to finish, idle keep-alive connections are closed, and the
process exits 0. SIGINT (Ctrl-C) does the same without the delay.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
import signal
import socket

from gateway.admin import AdminServer
from gateway.catalog import connection
from gateway.catalog.cache import CatalogCache
from gateway.catalog.invalidation import InvalidationListener
from gateway.catalog.reader import Catalog
from gateway.config import Config
from gateway.http.context import Context
from gateway.http.downstream import ClientConnection
from gateway.http.resume import Resumer
from gateway.http.upstream import Pool

__all__ = ["Gateway"]

log = logging.getLogger("gateway")


def _raise_fd_limit() -> int:
    """Every client connection costs two descriptors (client and sandbox sides): take the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


def _listen_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.create_server((host, port), family=family, backlog=4096, reuse_port=False)
    sock.setblocking(False)
    return sock


class Gateway:
    """One serving process: call :meth:`start`, then :meth:`serve_until_signalled` or :meth:`stop`."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.ctx: Context = None  # type: ignore[assignment]
        self.catalog: Catalog = None  # type: ignore[assignment]
        self.pool: Pool = None  # type: ignore[assignment]
        self.servers: list[asyncio.Server] = []
        self.ports: list[int] = []
        self.admin: AdminServer | None = None
        self._tick_handle: asyncio.TimerHandle | None = None
        self._watch_task: asyncio.Task[None] | None = None
        self._listen_task: asyncio.Task[None] | None = None
        self.invalidation: InvalidationListener | None = None
        self._stopping: asyncio.Event | None = None
        self._fast = False

    async def start(self) -> None:
        cfg = self.config
        loop = asyncio.get_running_loop()
        fds = _raise_fd_limit()
        client = connection.connect(cfg)
        cache = CatalogCache(cfg.cache_ttl, cfg.negative_cache_ttl, cfg.stale_if_error, cfg.cache_max_entries)
        self.catalog = Catalog(client, cache, cfg.catalog_prefix, cfg.redis_timeout)
        self.pool = Pool(
            cfg.upstream_idle_timeout, cfg.pool_max_idle_per_upstream, cfg.pool_max_idle, cfg.max_response_head_size
        )
        ctx = self.ctx = Context(cfg, self.catalog, self.pool)
        if cfg.resume_url:
            ctx.resumer = Resumer(self.catalog, cfg.resume_url, cfg.resume_timeout)
        self.invalidation = InvalidationListener(cfg, client, self.catalog, ctx.sandbox_changed)
        for host, port in cfg.listen_addrs:
            sock = _listen_socket(host, port)
            real_port = sock.getsockname()[1]

            def factory(p: int = real_port) -> ClientConnection:
                return ClientConnection(ctx, p)

            self.servers.append(await loop.create_server(factory, sock=sock))
            self.ports.append(real_port)
        self.admin = AdminServer(self)
        await self.admin.start(*cfg.admin_addr)
        self._tick_handle = loop.call_later(1.0, self._tick)
        self._watch_task = loop.create_task(self._watch_catalog())
        self._listen_task = loop.create_task(self.invalidation.run())
        log.info(
            "gateway listening on %s (admin %s), domains %s, %d file descriptors",
            ", ".join(f"{h}:{p}" for (h, _), p in zip(cfg.listen_addrs, self.ports, strict=True)),
            self.admin.address,
            ", ".join(cfg.domains),
            fds,
        )

    def _tick(self) -> None:
        ctx = self.ctx
        now = ctx.clock = ctx.loop.time()
        try:
            self.pool.sweep()
            for c in list(ctx.connections):
                c.check_timeouts(now)
            idle = self.config.tunnel_idle_timeout
            if idle:
                for t in [t for t in ctx.tunnels if now - t.idle_since() > idle]:
                    t.close()
        except Exception:
            log.exception("timer tick failed")
        self._tick_handle = ctx.loop.call_later(1.0, self._tick)

    async def _watch_catalog(self) -> None:
        """PING Redis: quickly until first reached (readiness), then once a second (health)."""
        while True:
            ok = await self.catalog.ping()
            await asyncio.sleep(1.0 if ok else 0.25)

    @property
    def ready(self) -> bool:
        return self.catalog is not None and self.catalog.reached and not self.ctx.draining

    def request_stop(self, fast: bool = False) -> None:
        self._fast = self._fast or fast
        if self._stopping is not None:
            self._stopping.set()

    async def serve_until_signalled(self) -> None:
        loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, self.request_stop)
        loop.add_signal_handler(signal.SIGINT, self.request_stop, True)
        try:
            await self._stopping.wait()
        finally:
            loop.remove_signal_handler(signal.SIGTERM)
            loop.remove_signal_handler(signal.SIGINT)
        await self.drain(0.0 if self._fast else self.config.drain_delay)
        await self.stop()

    async def drain(self, delay: float) -> None:
        """Become unready, wait ``delay``, stop accepting, let in-flight work finish."""
        ctx = self.ctx
        ctx.draining = True
        log.info("draining: /ready is 503; listeners close in %.1f s", delay)
        if delay > 0:
            await asyncio.sleep(delay)
        for s in self.servers:
            s.close()
        for c in list(ctx.connections):
            c.check_timeouts(ctx.loop.time())  # idle keep-alive connections close now
        ctx.closed_one()  # maybe nothing is open already
        try:
            async with asyncio.timeout(self.config.shutdown_timeout):
                await ctx.drained.wait()
        except TimeoutError:
            pass
        left = len(ctx.connections) + len(ctx.tunnels)
        if left:
            log.warning("shutdown timeout: closing %d connections still open", left)
        for c in list(ctx.connections):
            c.reset()
        for t in list(ctx.tunnels):
            t.close()

    async def stop(self) -> None:
        if self._tick_handle is not None:
            self._tick_handle.cancel()
        for task in (self._watch_task, self._listen_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        for s in self.servers:
            s.close()
        if self.ctx is not None:
            for c in list(self.ctx.connections):
                c.reset()
        if self.pool is not None:
            self.pool.close_all()
        if self.admin is not None:
            await self.admin.stop()
        if self.ctx is not None and self.ctx.resumer is not None:
            await self.ctx.resumer.close()
        if self.catalog is not None:
            await self.catalog.close()
        log.info("gateway stopped")
