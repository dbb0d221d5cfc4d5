"""Lifecycle of one gateway process: listeners, the admin app, timers, signals and the drain.

SIGTERM drains (what an orchestrator sends before it removes an instance): ``/ready`` answers 503
at once so balancers stop sending new connections, the listeners stay open for ``drain_delay``
seconds (balancers need a few health-check intervals to notice), then close; in-flight requests get
up to ``shutdown_timeout`` seconds to finish, idle keep-alive connections are closed, and the
process exits 0. SIGINT (Ctrl-C) does the same without the delay.

Closing a listening socket resets every connection in its accept queue: handshakes the kernel
completed that the loop has not accepted yet (a burst, a loop busy with other connections). The
clients of those connections had connected, sent their request and get ECONNRESET; nginx and
Envoy lose them the same way, and Linux's ``net.ipv4.tcp_migrate_req`` only moves them to another
listener of a SO_REUSEPORT group, which the last one to close has not. So a drain first stops new
handshakes (a socket filter drops SYNs: the client retransmits and then finds the port closed, or,
with workers, another worker's listener; a connection that never completed is not lost), goes on
accepting through the usual path (TLS, PROXY protocol) until every listener's queue is empty, and
only then closes (:meth:`Gateway.close_listeners`). On TLS listeners the handshakes (and PROXY
headers) of what was accepted are still to come then: the gateway accepts those connections itself
and counts them until TLS hands them over (http/tls_accept.py), so closing stops the accepting only
and the drain waits for them as for open connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import resource
import signal
import socket
import struct
import time
from typing import Any, Final

from gateway import collector, native
from gateway.access_log import AccessLog
from gateway.admin import AdminServer
from gateway.catalog import connection
from gateway.catalog.cache import CatalogCache
from gateway.catalog.invalidation import InvalidationListener
from gateway.catalog.reader import Catalog
from gateway.config import Config
from gateway.http.context import Context
from gateway.http.downstream import ClientConnection
from gateway.http.http2 import H2Connection
from gateway.http.resume import Resumer
from gateway.http.tls_accept import Acceptor
from gateway.http.upstream import Pool
from gateway.metrics import Snapshot, merge, write_snapshot
from gateway.policy import OwnListeners
from gateway.supervisor import ADMIN_ADDR_ENV
from gateway.tls import TlsCertificates
from gateway.watchdog import Heartbeat

__all__ = ["Gateway"]

log = logging.getLogger("gateway")

#: Seconds a drain waits for its listeners' accept queues to empty before it closes them anyway.
SETTLE_MAX: Final = 2.0
#: Test-only hook (an environment variable, never a setting, never reachable from the network): a
#: file path. While the file exists, a drain about to close the listeners holds its loop (as a loop
#: busy with other work would), after creating ``{path}.held.{pid}``; tests connect once every worker
#: holds.
TEST_HOLD_ENV: Final = "_GATEWAY_TEST_HOLD_CLOSE"

# A classic BPF socket filter (linux/filter.h) that drops segments with SYN set and ACK clear (new
# handshakes) and keeps every other: the byte at offset 13 of the TCP header holds the flags.
_DROP_SYN = struct.pack(
    "HBBI" * 5,
    0x30, 0, 0, 13,  # ldb [13]
    0x54, 0, 0, 0x12,  # and #(SYN|ACK)
    0x15, 0, 1, 0x02,  # jeq #SYN, drop, keep
    0x06, 0, 0, 0,  # drop: ret #0
    0x06, 0, 0, 0xFFFFFFFF,  # keep: ret #-1 (the whole segment)
)  # fmt: skip
_SO_ATTACH_FILTER: Final = 26


def refuse_new_handshakes(sock: socket.socket) -> bool:
    """Drop new SYNs to a listening socket (Linux); False where that is not possible.

    Handshakes under way still complete (their last ACK passes), and the queue keeps what it holds."""
    prog = ctypes.create_string_buffer(_DROP_SYN)
    fprog = struct.pack("HL", len(_DROP_SYN) // 8, ctypes.addressof(prog))  # struct sock_fprog
    try:
        sock.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_FILTER, fprog)
    except OSError as e:
        log.debug("cannot filter SYNs on a listener: %s", e)
        return False
    return True


def accept_queue(sock: socket.socket) -> int:
    """Connections in a listener's accept queue (TCP_INFO's ``tcpi_unacked`` of a listening socket
    on Linux; 0 where unknown or closed)."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 32)
    except (OSError, AttributeError):
        return 0
    return int(struct.unpack_from("I", info, 24)[0]) if len(info) >= 28 else 0


def _test_hold() -> None:
    path = os.environ.get(TEST_HOLD_ENV)
    if not path or not os.path.exists(path):
        return
    with open(f"{path}.held.{os.getpid()}", "w"):
        pass
    deadline = time.monotonic() + 30.0
    while os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.002)


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


def _listen_socket(host: str, port: int, backlog: int, reuse_port: bool = False) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.create_server((host, port), family=family, backlog=backlog, reuse_port=reuse_port)
    sock.setblocking(False)
    return sock


class Gateway:
    """One serving process: call :meth:`start`, then :meth:`serve_until_signalled` or :meth:`stop`."""

    def __init__(self, config: Config, worker_dir: str | None = None, settle: bool = False) -> None:
        """``worker_dir``: this process is one of several workers under a supervisor, which serves
        the admin app; the worker shares its listeners (SO_REUSEPORT) and writes its metrics and
        readiness to a file there every second. ``settle``: this gateway is the process (the CLI's),
        so startup's heap is frozen before it listens (collector.py; not for an in-process gateway
        in tests, whose host's objects it would freeze)."""
        self.config = config
        self.worker_dir = worker_dir
        self.settle = settle
        #: A worker's supervisor: when it is gone (SIGKILL, OOM killer) the worker drains and exits
        #: instead of serving on unsupervised, unseen by /ready and /metrics, holding the port.
        self.parent = os.getppid() if worker_dir is not None else 0
        self.tls: TlsCertificates | None = None
        self.acceptors: list[Acceptor] = []  # the TLS listeners' (tls_accept.py)
        self.ctx: Context = None  # type: ignore[assignment]
        self.catalog: Catalog = None  # type: ignore[assignment]
        self.pool: Pool = None  # type: ignore[assignment]
        self.servers: list[asyncio.Server] = []
        self.listen_socks: list[socket.socket] = []  # the data listeners, as bound
        self.ports: list[int] = []
        self.admin: AdminServer | None = None
        self._tick_handle: asyncio.TimerHandle | None = None
        self._watch_task: asyncio.Task[None] | None = None
        self._listen_task: asyncio.Task[None] | None = None
        self.invalidation: InvalidationListener | None = None
        self._stopping: asyncio.Event | None = None
        self._fast = False
        self.heartbeat: Heartbeat | None = None  # the loop proves it turns (watchdog.py)
        self.gc_clock: collector.PauseClock | None = None  # the collector's pauses (collector.py)

    async def start(self) -> None:
        cfg = self.config
        loop = asyncio.get_running_loop()
        fds = _raise_fd_limit()
        client = connection.connect(cfg)
        cache = CatalogCache(cfg.cache_ttl, cfg.negative_cache_ttl, cfg.stale_if_error, cfg.cache_max_entries)
        self.catalog = Catalog(client, cache, cfg.catalog_prefix, cfg.redis_timeout, cfg.redis_backoff_max)
        self.pool = Pool(
            cfg.upstream_idle_timeout,
            cfg.pool_max_idle_per_upstream,
            cfg.pool_max_idle,
            cfg.max_response_head_size,
            cfg.max_response_header_count,
        )
        ctx = self.ctx = Context(cfg, self.catalog, self.pool)
        if cfg.resume_url:
            ctx.resumer = Resumer(self.catalog, cfg.resume_url, cfg.resume_timeout)
        self.invalidation = InvalidationListener(cfg, client, self.catalog, ctx.sandbox_changed)
        ctx.access_log = AccessLog.open(cfg.access_log, cfg.access_log_query)
        if cfg.tls_certificates:
            self.tls = TlsCertificates(cfg.tls_certificates, cfg.tls_min_version, cfg.http2)
        if self.settle:  # before the first connection: none of them is frozen, none waits for this
            built = native.status()
            build = f"compiled ({len(built.compiled)} modules)" if built.compiled else "pure Python"
            log.info("data plane: %s", build)
            if built.stale:
                log.warning(
                    "sources changed since the data plane was compiled (make install rebuilds): %s",
                    ", ".join(built.stale),
                )
            t = time.perf_counter()
            n = collector.settle()
            log.info("startup heap frozen: %d objects left out of collections (%.0f ms)", n,
                     1000 * (time.perf_counter() - t))  # fmt: skip
        own: list[tuple[str, int]] = []  # every address the gateway listens on, never a sandbox's
        for lst in cfg.listeners:
            sock = _listen_socket(lst.host, lst.port, cfg.listen_backlog, reuse_port=self.worker_dir is not None)
            real_port = sock.getsockname()[1]
            self.listen_socks.append(sock)
            own.append((sock.getsockname()[0], real_port))
            self.ports.append(real_port)
            if lst.tls and self.tls is not None:
                # The gateway accepts TLS connections itself, so that a drain sees those still in
                # their handshake (or their PROXY header, read in clear before it): tls_accept.py.
                acceptor = Acceptor(ctx, sock, real_port, lst.proxy, self.tls.listener_context())
                acceptor.start()
                self.acceptors.append(acceptor)
                continue

            def factory(p: int = real_port, proxy: str = lst.proxy) -> ClientConnection:
                return ClientConnection(ctx, p, False, proxy)

            # backlog again: create_server(sock=...) calls listen() itself, with its own default
            # (100), which would silently shrink the queue the socket was created with.
            server = await loop.create_server(factory, sock=sock, backlog=cfg.listen_backlog)
            self.servers.append(server)
        if self.worker_dir is None:
            self.admin = AdminServer(self.status, lambda: merge([(self.snapshot(), True)]))
            await self.admin.start(*cfg.admin_addr, backlog=cfg.listen_backlog)
            own += self.admin.bound
        else:  # the supervisor serves the admin app, and says where (its port may have been 0)
            given = [a.rpartition(":") for a in os.environ.get(ADMIN_ADDR_ENV, "").split(",") if a]
            own += [(h, int(p)) for h, _, p in given] or [cfg.admin_addr]
        self.pool.own = OwnListeners.parse(own)
        self._tick_handle = loop.call_later(1.0, self._tick)
        self.heartbeat = Heartbeat(ctx.metrics.loop_lag, self.worker_dir)
        self.heartbeat.start()
        self.gc_clock = collector.PauseClock(ctx.metrics.gc_pause)
        self.gc_clock.start()
        self._watch_task = loop.create_task(self.catalog.watch())
        self._listen_task = loop.create_task(self.invalidation.run())
        log.info(
            "gateway listening on %s (admin %s), domains %s, %d file descriptors",
            ", ".join(f"{h}:{p}" for (h, _), p in zip(cfg.listen_addrs, self.ports, strict=True)),
            self.admin.address if self.admin else "in the supervisor",
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
            if ctx.access_log is not None:
                ctx.access_log.flush()
            if self.worker_dir is not None:
                write_snapshot(self.worker_dir, os.getpid(), self.snapshot())
                if os.getppid() != self.parent and not ctx.draining:
                    log.error("supervisor (pid %d) is gone: draining", self.parent)
                    self.request_stop()
        except Exception:
            log.exception("timer tick failed")
        self._tick_handle = ctx.loop.call_later(1.0, self._tick)

    def status(self) -> tuple[int, dict[str, Any]]:
        """Readiness for /ready: (HTTP status, body)."""
        body: dict[str, Any] = {"catalog": self.catalog.health()}
        if self.ctx.draining:
            body["status"] = "draining"
            return 503, body
        if not self.catalog.reached:
            body["status"] = "starting"
            return 503, body
        body["status"] = "ready"
        return 200, body

    def snapshot(self) -> Snapshot:
        """This worker's metrics (and readiness, for a supervisor) as plain data."""
        ctx = self.ctx
        cat = self.catalog
        pool = self.pool
        h2 = [c for c in ctx.connections if isinstance(c, H2Connection)]
        snap = ctx.metrics.snapshot(
            gauges={
                "downstream_connections": len(ctx.connections),
                "downstream_opening": ctx.opening,
                "http2_connections": len(h2),
                "http2_streams": sum(len(c.streams) for c in h2),
                "upstream_connections": pool.opened,
                "tunnels": len(ctx.tunnels),
                "pool_idle": pool.idle_count,
                "cached_records": len(cat.cache),
            },
            counters={
                "cache_hits": cat.hits,
                "cache_misses": cat.stats["misses"],
                "cache_stale": cat.stats["stale"],
                "redis_errors": cat.stats["redis_errors"],
            },
        )
        code, body = self.status()
        snap["ready"] = code == 200
        snap["status"] = body
        return snap

    def reload_tls(self) -> None:
        """SIGHUP: read the certificates again; new handshakes use them, open connections go on."""
        if self.tls is None:
            return
        try:
            self.tls.reload()
        except (OSError, ValueError) as e:
            log.error("TLS reload failed, keeping the previous certificates: %s", e)
        else:
            log.info("TLS certificates reloaded")

    def request_stop(self, fast: bool = False) -> None:
        self._fast = self._fast or fast
        if self._stopping is not None:
            self._stopping.set()

    async def serve_until_signalled(self) -> None:
        loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, self.request_stop)
        loop.add_signal_handler(signal.SIGINT, self.request_stop, True)
        loop.add_signal_handler(signal.SIGHUP, self.reload_tls)
        try:
            await self._stopping.wait()
        finally:
            loop.remove_signal_handler(signal.SIGTERM)
            loop.remove_signal_handler(signal.SIGINT)
            loop.remove_signal_handler(signal.SIGHUP)
        await self.drain(0.0 if self._fast else self.config.drain_delay)
        await self.stop()

    async def drain(self, delay: float) -> None:
        """Become unready, keep serving for ``delay``, stop accepting, let in-flight work finish.

        While ``delay`` runs nothing changes but ``/ready`` (503) and the responses (``Connection:
        close``, so clients move to another instance one request at a time): a balancer takes
        seconds to notice, and closing a keep-alive connection between requests races with the
        client's next one. Then the listeners close, idle keep-alive connections close, WebSocket
        tunnels get Close 1001, and everything in flight, whenever it arrived, has up to
        ``shutdown_timeout``."""
        ctx = self.ctx
        ctx.draining = True
        log.info("draining: /ready is 503; listeners close in %.1f s", delay)
        if delay > 0:
            await asyncio.sleep(delay)
        await self.close_listeners()
        ctx.listening = False
        now = ctx.clock = ctx.loop.time()
        for c in list(ctx.connections):
            c.check_timeouts(now)  # idle keep-alive connections close now
        tunnels = len(ctx.tunnels)
        going = 0
        for t in list(ctx.tunnels):
            try:
                going += t.go_away()
            except Exception:  # one odd tunnel must not cut the drain short for everyone else
                log.exception("closing a tunnel with 1001 failed; it ends at shutdown_timeout")
        log.info(
            "listeners closed: %d connections (and %d in their PROXY header or TLS handshake), %d tunnels "
            "(%d closing with 1001) get up to %.0f s",
            len(ctx.connections), ctx.opening, tunnels, going, self.config.shutdown_timeout,
        )  # fmt: skip
        ctx.closed_one()  # maybe nothing is open already
        try:
            async with asyncio.timeout(self.config.shutdown_timeout):
                await ctx.drained.wait()
        except TimeoutError:
            pass
        left = len(ctx.connections) + len(ctx.tunnels) + ctx.opening
        if left:
            log.warning("shutdown timeout: closing %d connections still open", left)
        for a in self.acceptors:
            a.abort()
        for c in list(ctx.connections):
            c.reset()
        for t in list(ctx.tunnels):
            t.close()

    async def close_listeners(self) -> None:
        """Close the data listeners without resetting a connection whose handshake completed: no new
        SYN is taken, what the accept queues hold is accepted as usual, then they close (module
        docstring). Bounded by :data:`SETTLE_MAX`.

        Left: a handshake whose SYN came before the filter and whose last ACK arrives after the
        queues were found empty (a round trip; on loopback none). The listeners are the same
        sockets the loop accepts on; nothing but the filter and the close is done to them."""
        _test_hold()
        loop = asyncio.get_running_loop()
        socks = [s for s in self.listen_socks if s.fileno() >= 0]
        filtered = [s for s in socks if refuse_new_handshakes(s)]
        waiting = sum(accept_queue(s) for s in socks)
        deadline = loop.time() + SETTLE_MAX
        await asyncio.sleep(0)  # one turn: the loop accepts what is ready
        while any(accept_queue(s) for s in socks) and loop.time() < deadline:  # noqa: ASYNC110  # kernel state: no event to wait on
            await asyncio.sleep(0.005)
        left = sum(accept_queue(s) for s in socks)
        for s in self.servers:
            s.close()
        for a in self.acceptors:
            a.stop_accepting()  # connections in their PROXY header or TLS handshake go on
        if waiting or left or len(filtered) < len(socks):
            log.info(
                "listeners closed: %d connections were waiting to be accepted, %d left after %.1f s%s",
                waiting, left, SETTLE_MAX, "" if len(filtered) == len(socks) else " (SYNs not filtered)",
            )  # fmt: skip

    async def stop(self) -> None:
        if self._tick_handle is not None:
            self._tick_handle.cancel()
        if self.heartbeat is not None:
            self.heartbeat.stop()
        if self.gc_clock is not None:
            self.gc_clock.stop()
        for task in (self._watch_task, self._listen_task):
            if task is not None:
                task.cancel()
                # Bounded: closing Redis connections of a dead or frozen server must not hang a stop.
                with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                    async with asyncio.timeout(2.0):
                        await task
        for s in self.servers:
            s.close()
        for a in self.acceptors:
            await a.close()  # what is still in its PROXY header or TLS handshake ends too
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
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2.0):
                    await self.catalog.close()
        if self.ctx is not None and self.ctx.access_log is not None:
            self.ctx.access_log.flush()
        if self.worker_dir is not None and self.ctx is not None:
            write_snapshot(self.worker_dir, os.getpid(), self.snapshot())  # final counts
        log.info("gateway stopped")
