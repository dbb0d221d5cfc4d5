"""Catalog outages: Redis slow, frozen, restarted or gone. Known sandboxes keep serving within
stale_if_error, unknown ones get 503 with Retry-After, and the gateway recovers by itself."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests.conftest import WAIT, Catalog, RedisServer
from tests.helpers import RawUpstream, echo_handler, request


class SlowProxy:
    """A TCP proxy in front of Redis that can hold every reply back by ``delay`` seconds."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.delay = 0.0
        self.port = 0
        self.server: asyncio.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []

    async def __aenter__(self) -> SlowProxy:
        self.server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _accept(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        try:
            ur, uw = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            cw.close()
            return
        self.writers += [cw, uw]

        async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter, slow: bool) -> None:
            with contextlib.suppress(ConnectionError, asyncio.CancelledError):
                while data := await r.read(65536):
                    if slow and self.delay:
                        await asyncio.sleep(self.delay)  # the injected fault: a slow Redis
                    w.write(data)
            w.close()

        await asyncio.gather(pipe(cr, uw, False), pipe(ur, cw, True))

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        for w in self.writers:
            w.close()


async def test_slow_redis(start_gateway: Any, own_redis: RedisServer) -> None:
    cat = Catalog(own_redis.client())
    async with RawUpstream(echo_handler) as up, SlowProxy(own_redis.port) as proxy:
        cat.put("known", host="127.0.0.1")
        gw = await start_gateway(
            redis_url=f"redis://127.0.0.1:{proxy.port}/0", cache_ttl=0, redis_timeout=0.1, stale_if_error=60
        )
        assert (await request(gw.port, gw.host(up.port, "known"))).status == 200
        proxy.delay = 2.0  # every reply now comes 20 redis_timeouts late
        for _ in range(3):  # a record read before: served from the cache, stale
            assert (await request(gw.port, gw.host(up.port, "known"))).status == 200
        cat.put("fresh", host="127.0.0.1")
        r = await request(gw.port, gw.host(up.port, "fresh"))
        assert (r.status, r.header("X-Gateway-Reason"), r.header("Retry-After")) == (503, b"catalog_unavailable", b"1")
        assert gw.gateway.catalog.health()["status"] == "degraded"
        proxy.delay = 0.0
        async with asyncio.timeout(WAIT):  # Redis is quick again: new sandboxes route
            while (await request(gw.port, gw.host(up.port, "fresh"))).status != 200:
                await asyncio.sleep(0.05)


async def test_redis_restart(start_gateway: Any, own_redis: RedisServer) -> None:
    async with RawUpstream(echo_handler) as up:
        Catalog(own_redis.client()).put("known", host="127.0.0.1")
        gw = await start_gateway(redis_url=own_redis.url, cache_ttl=0, redis_timeout=0.1, stale_if_error=60)
        assert (await request(gw.port, gw.host(up.port, "known"))).status == 200
        own_redis.stop()
        for _ in range(3):
            assert (await request(gw.port, gw.host(up.port, "known"))).status == 200
        r = await request(gw.port, gw.host(up.port, "other"))
        assert (r.status, r.header("X-Gateway-Reason")) == (503, b"catalog_unavailable")
        own_redis.start()  # same port; the control plane writes its records again
        cat = Catalog(own_redis.client())
        cat.put("known", host="127.0.0.1")
        cat.put("other", host="127.0.0.1")
        async with asyncio.timeout(WAIT):  # reconnects by itself
            while (await request(gw.port, gw.host(up.port, "other"))).status != 200:
                await asyncio.sleep(0.05)
        assert (await request(gw.port, gw.host(up.port, "known"))).status == 200
        assert gw.gateway.catalog.health()["status"] == "ok"


async def test_stale_records_route_only_for_stale_if_error(start_gateway: Any, own_redis: RedisServer) -> None:
    async with RawUpstream(echo_handler) as up:
        Catalog(own_redis.client()).put("known", host="127.0.0.1")
        gw = await start_gateway(redis_url=own_redis.url, cache_ttl=0.1, redis_timeout=0.1, stale_if_error=1.0)
        host = gw.host(up.port, "known")
        assert (await request(gw.port, host)).status == 200
        own_redis.stop()
        assert (await request(gw.port, host)).status == 200  # within the window
        async with asyncio.timeout(WAIT):  # the window closes: the record is no longer trusted
            while (r := await request(gw.port, host)).status == 200:
                await asyncio.sleep(0.05)
        assert (r.status, r.header("X-Gateway-Reason")) == (503, b"catalog_unavailable")


async def test_event_loop_never_waits_for_a_blocked_redis(start_gateway: Any, own_redis: RedisServer) -> None:
    """DEBUG SLEEP blocks the Redis server itself; requests are answered while it sleeps."""
    async with RawUpstream(echo_handler) as up:
        cat = Catalog(own_redis.client())
        cat.put("cached", host="127.0.0.1")
        cat.put("stale", host="127.0.0.1")
        gw = await start_gateway(redis_url=own_redis.url, redis_timeout=0.1, stale_if_error=60)
        stale = gw.host(up.port, "stale")
        assert (await request(gw.port, stale)).status == 200
        assert (await request(gw.port, gw.host(up.port, "cached"))).status == 200
        gw.gateway.catalog.cache.entries["stale"].fresh_until = 0  # expired: the next request asks Redis

        asleep = redis.Redis(host="127.0.0.1", port=own_redis.port, socket_timeout=WAIT)
        asleep.ping()
        sleeper = threading.Thread(target=lambda: asleep.execute_command("DEBUG", "SLEEP", "4"))
        sleeper.start()
        probe = redis.Redis(host="127.0.0.1", port=own_redis.port, socket_timeout=0.2, retry=Retry(NoBackoff(), 0))
        async with asyncio.timeout(WAIT):  # wait until Redis really is asleep
            while True:
                try:
                    await asyncio.to_thread(probe.ping)
                except redis.TimeoutError:
                    break
                await asyncio.sleep(0.01)
        assert (await request(gw.port, gw.host(up.port, "cached"))).status == 200  # no Redis needed
        assert (await request(gw.port, stale)).status == 200  # Redis asked, timed out, stale served
        r = await request(gw.port, gw.host(up.port, "unknown"))
        assert (r.status, r.header("X-Gateway-Reason")) == (503, b"catalog_unavailable")
        assert sleeper.is_alive(), "Redis woke up before the gateway answered: nothing was shown"
        await asyncio.to_thread(sleeper.join, WAIT)
