"""Reading the catalog from a real Redis: records, modes, cache, single-flight, outages."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
from typing import Any

import pytest
import redis

from tests.conftest import WAIT, Catalog, RedisServer
from tests.helpers import Client, RawUpstream, echo_handler, request


def get_calls(r: redis.Redis) -> int:
    stats = r.info("commandstats")
    return int(stats.get("cmdstat_get", {}).get("calls", 0))


async def test_missing_and_invalid_records(
    start_gateway: Any, catalog: Catalog, caplog: pytest.LogCaptureFixture
) -> None:
    gw = await start_gateway()
    r = await request(gw.port, gw.host(3000, "nosuch"))
    assert r.status == 502 and r.header("X-Gateway-Reason") == b"sandbox_not_found"
    assert r.json() == {
        "reason": "sandbox_not_found",
        "message": "No running sandbox has this ID.",
        "sandboxId": "nosuch",
        "port": 3000,
    }
    catalog.put_raw("broken", b'{"execution_id": "no address"}')
    with caplog.at_level(logging.WARNING, logger="gateway.catalog"):
        r = await request(gw.port, gw.host(3000, "broken"))
    assert r.status == 502 and r.header("X-Gateway-Reason") == b"catalog_record_invalid"
    assert "sandbox:catalog:broken" in caplog.text and "orchestrator_ip" in caplog.text


async def test_e2b_records_in_direct_and_node_mode(start_gateway: Any, redis_server: RedisServer) -> None:
    # Written exactly as E2B's API writes them: JSON with orchestrator_ip, set with EX.
    record = {
        "orchestrator_id": "node-1",
        "orchestrator_ip": "127.0.0.1",
        "execution_id": "9f1c2b",
        "sandbox_started_at": "2026-11-26T08:00:00Z",
        "sandbox_max_length_in_hours": 1,
    }
    r = redis_server.client()
    r.set("sandbox:catalog:e2bsbx", json.dumps(record), ex=3600)
    try:
        async with RawUpstream(echo_handler) as app, RawUpstream(echo_handler) as node:
            direct = await start_gateway()
            resp = await request(direct.port, direct.host(app.port, "e2bsbx"), "/d")
            assert resp.status == 200 and b"GET /d " in resp.body
            # Node mode: every port of the sandbox goes to the node's proxy, Host unchanged.
            gw = await start_gateway(node_port=node.port)
            host = gw.host(3000, "e2bsbx")
            resp = await request(gw.port, host, "/n")
            assert resp.status == 200 and f"Host: {host}\r\n".encode() in resp.body
            assert len(node.conns) == 1 and len(app.conns) == 1
    finally:
        r.delete("sandbox:catalog:e2bsbx")


async def test_500_concurrent_first_requests_cause_one_redis_get(start_gateway: Any, own_redis: RedisServer) -> None:
    async with RawUpstream(echo_handler) as up:
        Catalog(own_redis.client()).put("burst", host="127.0.0.1")
        gw = await start_gateway(redis_url=own_redis.url, redis_timeout=5, pool_max_idle_per_upstream=600)
        r = own_redis.client()
        r.config_resetstat()
        host = gw.host(up.port, "burst")
        assert own_redis.proc is not None
        os.kill(own_redis.proc.pid, signal.SIGSTOP)  # the first GET cannot finish before all 500 wait
        try:
            clients = [await Client.connect(gw.port) for _ in range(500)]
            for c in clients:
                c.send(f"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
            ctx = gw.gateway.ctx
            async with asyncio.timeout(WAIT):
                while sum(1 for c in ctx.connections if c.active is not None) < 500:
                    await asyncio.sleep(0.01)
        finally:
            os.kill(own_redis.proc.pid, signal.SIGCONT)
        results = await asyncio.gather(*(c.read_response() for c in clients))
        assert [x.status for x in results] == [200] * 500
        assert get_calls(r) == 1
        for c in clients:
            await c.close()


async def test_cache_ttl_and_negative_entries(start_gateway: Any, catalog: Catalog, redis_server: RedisServer) -> None:
    async with RawUpstream(echo_handler) as up:
        gw = await start_gateway(cache_ttl=60, negative_cache_ttl=60)
        r = redis_server.client()
        host = gw.host(up.port, "later")
        r.config_resetstat()
        for _ in range(5):
            assert (await request(gw.port, host)).status == 502
        assert get_calls(r) == 1  # "no such sandbox" is remembered
        catalog.put("later", publish=False, host="127.0.0.1")  # a writer that does not announce it
        assert (await request(gw.port, host)).status == 502  # ... for negative_cache_ttl
        gw2 = await start_gateway(cache_ttl=0, negative_cache_ttl=0, stale_if_error=0)
        assert (await request(gw2.port, gw2.host(up.port, "later"))).status == 200
        r.config_resetstat()
        for _ in range(3):
            assert (await request(gw2.port, gw2.host(up.port, "later"))).status == 200
        assert get_calls(r) == 3  # with no TTL every request reads


async def test_execution_id_separates_pooled_connections(start_gateway: Any, catalog: Catalog) -> None:
    async with RawUpstream(echo_handler) as up:
        catalog.put("abc", host="127.0.0.1", execution_id="first")
        gw = await start_gateway(cache_ttl=0, stale_if_error=0)  # every request reads the record
        c = await Client.connect(gw.port)
        host = gw.host(up.port, "abc")
        await c.request(host)
        await c.request(host)
        assert len(up.conns) == 1
        catalog.put("abc", host="127.0.0.1", execution_id="second")  # same address, a new sandbox
        await c.request(host)
        assert len(up.conns) == 2  # it never inherits the previous execution's connection
        await c.close()


async def test_redis_down_and_nothing_cached(start_gateway: Any) -> None:
    from tests.conftest import free_port

    gw = await start_gateway(wait=False, redis_url=f"redis://127.0.0.1:{free_port()}/0", redis_timeout=0.1)
    r = await request(gw.port, gw.host(3000, "abc"))
    assert r.status == 503 and r.header("X-Gateway-Reason") == b"catalog_unavailable"
    assert r.header("Retry-After") == b"1"


async def test_redis_frozen_cached_sandbox_keeps_serving(start_gateway: Any, own_redis: RedisServer) -> None:
    async with RawUpstream(echo_handler) as up:
        Catalog(own_redis.client()).put("abc", host="127.0.0.1")
        gw = await start_gateway(redis_url=own_redis.url, cache_ttl=0.2, redis_timeout=0.2, stale_if_error=60)
        host = gw.host(up.port, "abc")
        assert (await request(gw.port, host)).status == 200
        assert own_redis.proc is not None
        os.kill(own_redis.proc.pid, signal.SIGSTOP)  # Redis hangs: no answers, no errors
        try:
            async with asyncio.timeout(WAIT):  # past the cache TTL, the record is served stale
                while gw.gateway.catalog.cache.fresh("abc", asyncio.get_running_loop().time()):
                    await asyncio.sleep(0.05)
            for _ in range(3):
                r = await request(gw.port, host)
                assert r.status == 200
            r = await request(gw.port, gw.host(up.port, "unknown"))
            assert r.status == 503 and r.header("X-Gateway-Reason") == b"catalog_unavailable"
        finally:
            os.kill(own_redis.proc.pid, signal.SIGCONT)


async def test_readiness_waits_for_redis_and_survives_its_outage(start_gateway: Any, own_redis: RedisServer) -> None:
    import aiohttp

    port = own_redis.port
    own_redis.stop()
    gw = await start_gateway(wait=False, redis_url=f"redis://127.0.0.1:{port}/0", redis_timeout=0.1)
    async with aiohttp.ClientSession() as s:
        url = f"http://127.0.0.1:{gw.admin_port}"
        async with s.get(url + "/health") as r:
            assert r.status == 200
        async with s.get(url + "/ready") as r:
            assert r.status == 503 and (await r.json())["status"] == "starting"
        own_redis.start()  # Redis comes up after the gateway: it reconnects by itself
        async with asyncio.timeout(WAIT):
            while True:
                async with s.get(url + "/ready") as r:
                    if r.status == 200:
                        body = await r.json()
                        break
                await asyncio.sleep(0.05)
        assert body["catalog"]["status"] == "ok"
        own_redis.stop()
        async with asyncio.timeout(WAIT):
            while True:
                async with s.get(url + "/ready") as r:
                    assert r.status == 200  # a shared Redis outage must not empty the balancer
                    body = await r.json()
                if body["catalog"]["status"] == "degraded":
                    break
                await asyncio.sleep(0.05)


class FastApp(asyncio.Protocol):
    """A sandbox app cheap enough for tens of thousands of requests: 200 "ok" to every head."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t = transport
        self.buf = b""

    def data_received(self, data: bytes) -> None:
        self.buf += data
        n = self.buf.count(b"\r\n\r\n")
        if n:
            self.buf = self.buf[self.buf.rfind(b"\r\n\r\n") + 4 :]
            self.t.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok" * n)  # type: ignore[attr-defined]


async def test_a_warm_pass_over_20000_sandboxes_makes_no_redis_get(
    gateway_process: Any, own_redis: RedisServer
) -> None:
    """A fleet in rotation with the default cache_ttl: the first pass reads each record once, the
    second pass (every sandbox again, in another order) makes no GET at all."""
    n = 20_000
    server = await asyncio.get_running_loop().create_server(FastApp, "127.0.0.1", 0)
    app_port = server.sockets[0].getsockname()[1]
    r = own_redis.client()
    pipe = r.pipeline(transaction=False)
    for i in range(n):  # one sandbox execution per record; one address, so pooled connections are shared
        pipe.set(f"sandbox:catalog:f{i}", json.dumps({"host": "127.0.0.1", "execution_id": "fleet"}))
    pipe.execute()
    gw = gateway_process("--redis-url", own_redis.url)  # the default cache_ttl

    async def rotation(order: list[int]) -> list[int]:
        async def conn(part: list[int]) -> list[int]:
            c = await Client.connect(gw.port)
            statuses: list[int] = []
            for k in range(0, len(part), 100):  # pipelined, 100 at a time
                batch = part[k : k + 100]
                c.send(b"".join(f"GET / HTTP/1.1\r\nHost: {app_port}-f{i}.e2b.test\r\n\r\n".encode() for i in batch))
                statuses += [(await c.read_response()).status for _ in batch]
            await c.close()
            return statuses

        parts = await asyncio.gather(*(conn(order[j::8]) for j in range(8)))
        return [s for p in parts for s in p]

    try:
        order = list(range(n))
        r.config_resetstat()
        async with asyncio.timeout(WAIT * 6):
            assert await rotation(order) == [200] * n
        assert get_calls(r) == n  # cold: one GET per sandbox
        r.config_resetstat()
        order.reverse()
        async with asyncio.timeout(WAIT * 6):
            assert await rotation(order) == [200] * n
        assert get_calls(r) == 0  # warm: none
    finally:
        server.close()
