"""The admin listener (aiohttp): liveness, readiness and metrics for orchestrators and balancers.

- ``GET /health``: 200 while the process serves (liveness: restart me if this fails).
- ``GET /ready``: 200 once the catalog's Redis has answered since start, 503 while draining.
  A later Redis outage does *not* make the gateway unready: every replica shares that Redis, so
  readiness failing everywhere would take the whole fleet out of the balancer while cached
  sandboxes can still be served. The JSON body reports the catalog as ``degraded`` instead.
- ``GET /metrics``: Prometheus text format (gateway/metrics.py); with several workers, the sum of all.

The app does not know whether it runs inside the single serving process or in the supervisor of
several workers: it asks ``status()`` and ``snapshot()``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gateway.metrics import Snapshot, registry_for

__all__ = ["AdminServer"]


class AdminServer:
    def __init__(self, status: Callable[[], tuple[int, dict[str, Any]]], snapshot: Callable[[], Snapshot]) -> None:
        self.status = status
        self.registry = registry_for(snapshot)
        app = web.Application()
        app.router.add_get("/health", self.health)
        app.router.add_get("/ready", self.ready)
        app.router.add_get("/metrics", self.metrics)
        self.runner = web.AppRunner(app, access_log=None, handle_signals=False)
        self.address = ""
        self.bound: list[tuple[str, int]] = []  # (address, port) of every bound socket

    async def start(self, host: str, port: int, backlog: int = 4096) -> None:
        await self.runner.setup()
        # aiohttp's own default is 128: a balancer's burst of probes must not overflow it.
        site = web.TCPSite(self.runner, host, port, reuse_address=True, backlog=backlog)
        await site.start()
        self.address = f"{host}:{port}"
        self.bound = [(a[0], a[1]) for a in self.runner.addresses if isinstance(a, tuple)]
        for addr in self.bound:  # the bound port, when port 0 asked for any
            self.address = f"{host}:{addr[1]}"
            break

    async def stop(self) -> None:
        await self.runner.cleanup()

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def ready(self, request: web.Request) -> web.Response:
        code, body = self.status()
        return web.json_response(body, status=code)

    async def metrics(self, request: web.Request) -> web.Response:
        body = generate_latest(self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
