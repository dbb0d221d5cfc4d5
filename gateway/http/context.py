"""What every connection of one worker shares: settings, router, catalog, pool, the clock."""

from __future__ import annotations

import asyncio
import ipaddress
from typing import TYPE_CHECKING

from gateway.catalog.reader import Catalog
from gateway.config import Config
from gateway.hostname import HostRouter

if TYPE_CHECKING:
    from gateway.http.downstream import ClientConnection
    from gateway.http.tunnel import TunnelEnd
    from gateway.http.upstream import Pool

__all__ = ["Context"]


class Context:
    """Per-worker shared state. ``clock`` is a coarse time (loop.time() each second) for timeouts."""

    __slots__ = (
        "catalog",
        "clock",
        "config",
        "connections",
        "drained",
        "draining",
        "loop",
        "max_head",
        "pool",
        "router",
        "trusted",
        "tunnels",
        "upgrade_protocols",
    )

    def __init__(self, config: Config, catalog: Catalog, pool: Pool) -> None:
        self.loop = asyncio.get_running_loop()
        self.config = config
        self.max_head = config.max_request_head_size
        self.catalog = catalog
        self.pool = pool
        self.router = HostRouter(config.domains)
        self.upgrade_protocols = frozenset(p.lower().encode() for p in config.upgrade_protocols)
        self.trusted = tuple(ipaddress.ip_network(c, strict=False) for c in config.trusted_proxies)
        self.connections: set[ClientConnection] = set()
        self.tunnels: set[TunnelEnd] = set()  # client ends of open tunnels
        self.clock = self.loop.time()
        self.draining = False
        self.drained = asyncio.Event()  # set once draining and nothing is open any more

    def closed_one(self) -> None:
        """A client connection or tunnel ended; while draining, note when none is left."""
        if self.draining and not self.connections and not self.tunnels:
            self.drained.set()
