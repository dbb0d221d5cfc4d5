"""What every connection of one worker shares: settings, router, catalog, pool, the clock.

It is also where a catalog change meets the connections it concerns: when a sandbox's record is
deleted or names another execution or address, idle pooled connections to the old one close and
live upstream connections and tunnels are reset, so nothing keeps talking to a sandbox that is gone.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import re
from typing import TYPE_CHECKING

from gateway.access_log import AccessLog
from gateway.catalog.reader import Catalog, CatalogUnavailable
from gateway.config import Config
from gateway.hostname import HostRouter
from gateway.http.admission import Admission
from gateway.http.flow import Outbox
from gateway.http.headers import FieldRoles
from gateway.metrics import Metrics

if TYPE_CHECKING:
    from gateway.http.downstream import ClientConnection
    from gateway.http.h2tunnel import H2Tunnel
    from gateway.http.http2 import H2Connection
    from gateway.http.resume import Resumer
    from gateway.http.tunnel import TunnelEnd
    from gateway.http.upstream import Pool

__all__ = ["Context"]

log = logging.getLogger("gateway.catalog")


class Context:
    """Per-worker shared state. ``clock`` is a coarse time (loop.time() each second) for timeouts."""

    __slots__ = (
        "access_log",
        "admission",
        "catalog",
        "clock",
        "config",
        "connections",
        "drained",
        "draining",
        "fields",
        "health_path",
        "listening",
        "loop",
        "max_head",
        "max_per_sandbox",
        "metrics",
        "opening",
        "outbox",
        "own_cookie",
        "pool",
        "resumer",
        "rid_header",
        "rid_header_h2",
        "rid_in_response",
        "rid_n",
        "rid_prefix",
        "router",
        "trusted",
        "tunnels",
    )

    def __init__(self, config: Config, catalog: Catalog, pool: Pool) -> None:
        self.loop = asyncio.get_running_loop()
        self.config = config
        self.max_head = config.max_request_head_size
        self.catalog = catalog
        self.pool = pool
        self.outbox = Outbox(self.loop)  # every HTTP write of this worker's connections
        self.router = HostRouter(config.domains, shared_hosts=config.shared_hosts)
        self.fields = FieldRoles(
            config.traffic_token_header.encode(),
            config.sandbox_id_header.encode(),
            config.sandbox_port_header.encode(),
            [p.lower().encode() for p in config.upgrade_protocols],
            config.request_id_header.lower().encode(),
            [n.encode() for n in config.untrusted_fields],
        )
        self.admission = Admission(config, self.fields, self.router)  # private sandboxes only
        self.own_cookie = config.access_cookie.encode()  # a sandbox may not set it (headers.py)
        self.metrics = Metrics()
        self.health_path = config.health_path.encode()
        self.access_log: AccessLog | None = None  # set by the server (a worker's own writer)
        # Request IDs: a random prefix per process and a counter, unique across workers and restarts.
        self.rid_header = config.request_id_header.encode()
        self.rid_header_h2 = self.rid_header.lower()  # HTTP/2 field names are lower case
        self.rid_in_response = re.compile(b"\r\n" + re.escape(self.rid_header) + b":", re.IGNORECASE)
        self.rid_prefix = os.urandom(6).hex().encode() + b"-"
        self.rid_n = 0
        self.max_per_sandbox = config.max_sandbox_connections or 1 << 62
        self.trusted = tuple(ipaddress.ip_network(c, strict=False) for c in config.trusted_proxies)
        self.connections: set[ClientConnection | H2Connection] = set()
        self.tunnels: set[TunnelEnd | H2Tunnel] = set()  # client ends of open tunnels
        self.opening = 0  # accepted, not yet a connection: PROXY header or TLS handshake (tls_accept.py)
        self.resumer: Resumer | None = None
        self.clock = self.loop.time()
        self.draining = False  # SIGTERM came: /ready is 503, responses say Connection: close
        self.listening = True  # False once a drain closed the listeners
        self.drained = asyncio.Event()  # set once the listeners are closed and nothing is open any more

    def next_request_id(self) -> bytes:
        self.rid_n += 1
        return self.rid_prefix + b"%x" % self.rid_n

    def closed_one(self) -> None:
        """A client connection or tunnel ended, or an opening one became a connection or ended; once
        the listeners are closed, note when none is left.

        Not before: while ``drain_delay`` runs the listeners still accept, and a connection that
        arrives after a moment with none open must still get its ``shutdown_timeout``. A connection
        still in its TLS handshake counts (``opening``): it was accepted, and is served."""
        if not self.listening and not self.connections and not self.tunnels and not self.opening:
            self.drained.set()

    def sandbox_changed(self, sandbox_id: str) -> None:
        """A writer announced a change: drop the cached record, then check the open connections."""
        self.catalog.invalidate(sandbox_id)
        if self.resumer is not None:
            self.resumer.changed(sandbox_id)
        if sandbox_id in self.pool.links:
            self.loop.create_task(self._recheck(sandbox_id))

    async def _recheck(self, sandbox_id: str) -> None:
        try:
            e = await self.catalog.lookup(sandbox_id)
        except CatalogUnavailable:
            return  # cannot tell; the connections stay until Redis answers or they end
        r = e.record
        for conn in list(self.pool.links.get(sandbox_id, ())):
            if r is None or r.state != "running" or (conn.address, conn.execution_id) != (r.address, r.execution_id):
                conn.reset()
