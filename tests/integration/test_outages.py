"""Catalog outages: Redis slow, frozen, restarted or gone. Known sandboxes keep serving within
stale_if_error, unknown ones get 503 with Retry-After, and the gateway recovers by itself."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import threading
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests.conftest import WAIT, Catalog, RedisServer
from tests.helpers import Client, RawUpstream, echo_handler, request


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


# ---- stale-while-revalidate and the breaker: a Redis outage costs cached sandboxes nothing


def get_calls(r: redis.Redis) -> int:
    stats = r.info("commandstats")
    return int(stats.get("cmdstat_get", {}).get("calls", 0))


async def warm(gw: Any, up_port: int, ids: list[str]) -> None:
    c = await Client.connect(gw.port)
    for i in ids:
        assert (await c.request(gw.host(up_port, i))).status == 200
    await c.close()


async def until_expired(gw: Any, ids: list[str]) -> None:
    """Until every record is past cache_ttl (the next request would have asked Redis before)."""
    cache = gw.gateway.catalog.cache
    async with asyncio.timeout(WAIT):
        while any(cache.fresh(i, asyncio.get_running_loop().time()) for i in ids):
            await asyncio.sleep(0.05)


async def test_expired_records_answer_while_one_refresh_per_sandbox_waits_on_a_frozen_redis(
    start_gateway: Any, own_redis: RedisServer
) -> None:
    """Redis frozen (SIGSTOP) with a redis_timeout (60 s) far beyond every wait of this test: 1,000
    requests for 50 sandboxes whose records are past cache_ttl all complete from the cache, and
    Redis, once thawed, has received exactly one GET per sandbox."""
    async with RawUpstream(echo_handler) as up:
        cat = Catalog(own_redis.client())
        ids = [f"fz{i}" for i in range(50)]
        for i in ids:
            cat.put(i, host="127.0.0.1", publish=False)
        gw = await start_gateway(redis_url=own_redis.url, cache_ttl=0.3, redis_timeout=60, stale_if_error=300)
        await warm(gw, up.port, ids)
        await until_expired(gw, ids)
        r = own_redis.client()
        r.config_resetstat()
        assert own_redis.proc is not None
        os.kill(own_redis.proc.pid, signal.SIGSTOP)
        try:

            async def client(k: int) -> list[int]:
                c = await Client.connect(gw.port)
                got = [(await c.request(gw.host(up.port, ids[(k + n) % 50]))).status for n in range(100)]
                await c.close()
                return got

            async with asyncio.timeout(WAIT):  # nothing here may wait for Redis (60 s)
                results = await asyncio.gather(*(client(k) for k in range(10)))
        finally:
            os.kill(own_redis.proc.pid, signal.SIGCONT)
        assert [s for got in results for s in got] == [200] * 1000
        cache = gw.gateway.catalog.cache
        async with asyncio.timeout(WAIT):  # thawed: the 50 refreshes are answered
            while not all(cache.fresh(i, asyncio.get_running_loop().time() - 0.2) for i in ids):
                await asyncio.sleep(0.02)
        assert get_calls(r) == 50


async def test_load_through_redis_killed_then_frozen(start_gateway: Any, own_redis: RedisServer) -> None:
    """Steady keep-alive load on 50 cached sandboxes while Redis is killed, restarted, frozen and
    thawed: no request fails. While Redis fails the worker stops asking it per request: no GET
    at all once the breaker is open (GETs started < sandboxes), a few backed-off PINGs, and an
    unknown sandbox is answered 503 catalog_unavailable without a Redis call."""
    async with RawUpstream(echo_handler) as up:
        ids = [f"ld{i}" for i in range(50)]
        for i in ids:
            Catalog(own_redis.client()).put(i, host="127.0.0.1", publish=False)
        gw = await start_gateway(redis_url=own_redis.url, cache_ttl=0.3, redis_timeout=0.2, stale_if_error=300)
        catalog = gw.gateway.catalog
        await warm(gw, up.port, ids)
        loop = asyncio.get_running_loop()
        running = True
        served = failed = 0

        async def client(k: int) -> None:
            nonlocal served, failed
            c = await Client.connect(gw.port)
            n = k
            while running:
                n += 1
                try:
                    r = await c.request(gw.host(up.port, ids[n % 50]))
                    served += r.status == 200
                    failed += r.status != 200
                except (OSError, asyncio.IncompleteReadError) as e:
                    failed += 1
                    print("failed:", repr(e))
                    c = await Client.connect(gw.port)
            await c.close()

        async def served_more(n: int) -> None:
            goal = served + n
            async with asyncio.timeout(WAIT):
                while served < goal:
                    await asyncio.sleep(0.02)

        async def unknown_is_503_without_a_read() -> None:
            misses = catalog.stats["misses"]
            r = await request(gw.port, gw.host(up.port, "nobody"))
            assert (r.status, r.header("X-Gateway-Reason")) == (503, b"catalog_unavailable")
            assert catalog.stats["misses"] == misses  # answered without asking Redis

        async def outage(name: str) -> None:
            async with asyncio.timeout(WAIT):  # the first failed read opens the breaker; those
                while not catalog.degraded or catalog.reading:  # already under way fail too
                    await asyncio.sleep(0.01)
            gets, errors, t0 = catalog.stats["misses"], catalog.stats["redis_errors"], loop.time()
            await served_more(1000)
            await unknown_is_503_without_a_read()
            await served_more(1000)
            took = loop.time() - t0
            pings = catalog.stats["redis_errors"] - errors
            print(f"{name}: 2000 requests in {took:.1f} s, {catalog.stats['misses'] - gets} GETs, {pings} PINGs")
            assert catalog.stats["misses"] == gets  # no GET at all while the breaker is open
            assert pings <= 6 + took / 1.0  # 0.1, 0.2, 0.4 ... then one per redis_backoff_max (2 s)

        clients = [asyncio.create_task(client(k)) for k in range(8)]
        try:
            await served_more(500)
            own_redis.stop()
            await outage("killed")
            own_redis.start()  # the same port, the records written again
            for i in ids:
                Catalog(own_redis.client()).put(i, host="127.0.0.1", publish=False)
            async with asyncio.timeout(WAIT):  # the watcher sees it answer: reads resume
                while catalog.degraded:
                    await asyncio.sleep(0.02)
            await served_more(500)
            assert own_redis.proc is not None
            os.kill(own_redis.proc.pid, signal.SIGSTOP)
            try:
                await outage("frozen")
            finally:
                os.kill(own_redis.proc.pid, signal.SIGCONT)
            async with asyncio.timeout(WAIT):
                while catalog.degraded:
                    await asyncio.sleep(0.02)
            await served_more(500)
        finally:
            running = False
            await asyncio.gather(*clients)
        assert failed == 0
