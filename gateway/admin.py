"""The admin listener (aiohttp): liveness and readiness for orchestrators and load balancers.

- ``GET /health``: 200 while the process serves (liveness: restart me if this fails).
- ``GET /ready``: 200 once the catalog's Redis has answered since start, 503 while draining.
  A later Redis outage does *not* make the gateway unready: every replica shares that Redis, so
  readiness failing everywhere would take the whole fleet out of the balancer while cached
  sandboxes can still be served. The JSON body reports the catalog as ``degraded`` instead.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from aiohttp import web

if TYPE_CHECKING:
    from gateway.server import Gateway

__all__ = ["AdminServer"]


class AdminServer:
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        app = web.Application()
        app.router.add_get("/health", self.health)
        app.router.add_get("/ready", self.ready)
        self.runner = web.AppRunner(app, access_log=None, handle_signals=False)
        self.address = ""

    async def start(self, host: str, port: int) -> None:
        await self.runner.setup()
        site = web.TCPSite(self.runner, host, port, reuse_address=True)
        await site.start()
        self.address = f"{host}:{port}"
        for addr in self.runner.addresses:  # the bound port, when port 0 asked for any
            if isinstance(addr, tuple):
                self.address = f"{host}:{addr[1]}"
                break

    async def stop(self) -> None:
        await self.runner.cleanup()

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def ready(self, request: web.Request) -> web.Response:
        g = self.gateway
        body: dict[str, Any] = {"catalog": g.catalog.health()}
        if g.ctx.draining:
            body["status"] = "draining"
            return web.json_response(body, status=503)
        if not g.catalog.reached:
            body["status"] = "starting"
            return web.json_response(body, status=503)
        body["status"] = "ready"
        return web.json_response(body)
