"""Catalog changes reach the gateway at once: the invalidation channel, keyspace notifications,
resubscription after Redis restarts, and the connections to a sandbox that went away."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from tests.conftest import WAIT, Catalog, RedisServer
from tests.helpers import Client, RawUpstream, UpstreamConn, echo_handler, read_response, request, response
from tests.integration.test_catalog import get_calls
from tests.integration.test_websocket import send_101, upgraded_client


async def test_deleted_sandbox_gets_no_traffic_100ms_after_the_publish(gateway_process: Any, catalog: Catalog) -> None:
    """Steady traffic on several keep-alive connections; DEL + PUBLISH; no request sent later than
    100 ms after the publish may reach the old address (the cache TTL is a minute, so only the
    invalidation can explain it)."""
    reached: set[int] = set()

    async def app(c: UpstreamConn) -> None:
        while True:
            head, _ = await c.read_request()
            reached.add(int(head.split(b" ", 2)[1][1:]))
            c.send(response(200, b"old"))

    async with RawUpstream(app) as up:
        catalog.put("gone", host="127.0.0.1")
        gw = gateway_process(env={"GATEWAY_CACHE_TTL": "60", "GATEWAY_NEGATIVE_CACHE_TTL": "60"})
        host = gw.host(up.port, "gone")
        sent: dict[int, tuple[float, int, bytes | None]] = {}
        seq = 0
        stop_at: float | None = None
        published = asyncio.Event()

        async def client() -> None:
            nonlocal seq
            c = await Client.connect(gw.port)
            while stop_at is None or time.monotonic() < stop_at:
                seq += 1
                n = seq
                t = time.monotonic()
                r = await c.request(host, f"/{n}")
                sent[n] = (t, r.status, r.header("X-Gateway-Reason"))
            await c.close()

        async def writer() -> None:
            nonlocal stop_at
            async with asyncio.timeout(WAIT):  # traffic flows before the change
                while len(reached) < 50:
                    await asyncio.sleep(0.01)
            t_pub = time.monotonic()
            catalog.delete("gone")  # DEL, then PUBLISH on the invalidation channel
            stop_at = t_pub + 0.5
            published.set()
            sent[0] = (t_pub, 0, None)

        async with asyncio.timeout(WAIT * 2):
            await asyncio.gather(writer(), *(client() for _ in range(4)))
        t_pub = sent.pop(0)[0]
        late = [n for n, (t, _, _) in sent.items() if t > t_pub + 0.1]
        assert len(late) > 20, "too little traffic after the change to tell"
        assert not reached.intersection(late), "requests sent >100 ms after the publish reached the old address"
        assert all(sent[n][1:] == (502, b"sandbox_not_found") for n in late)


async def test_keyspace_notifications_need_no_publish(start_gateway: Any, own_redis: RedisServer) -> None:
    r = own_redis.client()
    r.config_set("notify-keyspace-events", "KA")  # the server announces key changes itself
    cat = Catalog(r)
    async with RawUpstream(echo_handler) as up:
        cat.put("ks", host="127.0.0.1", publish=False)
        cat.put("exp", host="127.0.0.1", publish=False, ex=1)
        gw = await start_gateway(redis_url=own_redis.url, cache_ttl=60, negative_cache_ttl=60)
        async with asyncio.timeout(WAIT):
            await gw.gateway.invalidation.subscribed.wait()
        assert (await request(gw.port, gw.host(up.port, "ks"))).status == 200
        assert (await request(gw.port, gw.host(up.port, "exp"))).status == 200
        cat.put("ks", host="127.0.0.1", publish=False, state="paused")  # a writer that never publishes
        async with asyncio.timeout(WAIT):
            while (await request(gw.port, gw.host(up.port, "ks"))).status != 409:
                await asyncio.sleep(0.01)
        async with asyncio.timeout(WAIT):  # the TTL ran out: Redis announces the expiry
            while (await request(gw.port, gw.host(up.port, "exp"))).status != 502:
                await asyncio.sleep(0.05)


async def test_resubscription_after_a_redis_restart_flushes_the_cache(
    start_gateway: Any, own_redis: RedisServer
) -> None:
    async with RawUpstream(echo_handler) as up:
        Catalog(own_redis.client()).put("rs", host="127.0.0.1")
        gw = await start_gateway(redis_url=own_redis.url, cache_ttl=60, stale_if_error=60)
        listener = gw.gateway.invalidation
        async with asyncio.timeout(WAIT):
            await listener.subscribed.wait()
        assert (await request(gw.port, gw.host(up.port, "rs"))).status == 200
        first = listener.subscriptions
        own_redis.stop()  # messages published now are lost to the gateway...
        own_redis.start()  # ... and this Redis came back empty (no persistence): the sandbox is gone
        async with asyncio.timeout(WAIT):
            while listener.subscriptions == first:
                await asyncio.sleep(0.02)
        r = await request(gw.port, gw.host(up.port, "rs"))
        assert (r.status, r.header("X-Gateway-Reason")) == (502, b"sandbox_not_found")


async def test_a_replaced_or_deleted_sandbox_loses_its_connections(start_gateway: Any, catalog: Catalog) -> None:
    held = asyncio.Event()

    ended: list[UpstreamConn] = []

    async def app(c: UpstreamConn) -> None:
        try:
            while True:
                head, _ = await c.read_request()
                if head.startswith(b"GET /hold "):
                    held.set()
                    await c.reader.read()  # never answers; returns at EOF
                    return
                if head.startswith(b"GET /ws "):
                    send_101(c)
                    await c.reader.read()
                    return
                c.send(response(200, b"ok"))
        finally:
            ended.append(c)

    async with RawUpstream(app) as up:
        catalog.put("rp", host="127.0.0.1", execution_id="one")
        gw = await start_gateway(cache_ttl=60)
        host = gw.host(up.port, "rp")
        busy = await Client.connect(gw.port)
        busy.send(f"GET /hold HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        async with asyncio.timeout(WAIT):
            await held.wait()
        tunnel = await upgraded_client(gw, host)
        assert (await request(gw.port, host)).status == 200  # leaves an idle pooled connection
        assert len(up.conns) == 3
        catalog.put("rp", host="127.0.0.1", execution_id="one", traffic_access_token=None)  # same sandbox
        assert (await request(gw.port, host)).status == 200  # reuses the idle connection
        assert len(up.conns) == 3

        catalog.put("rp", host="127.0.0.1", execution_id="two")  # replaced at the same address
        r = await read_response(busy.reader)
        assert (r.status, r.header("X-Gateway-Reason")) == (502, b"upstream_reset")
        assert await tunnel.closed()
        async with asyncio.timeout(WAIT):  # every connection to the old execution ends
            while len(ended) < 3:
                await asyncio.sleep(0.01)
        assert (await request(gw.port, host)).status == 200  # the new execution gets new ones
        assert len(up.conns) == 4
        await busy.close()

        tunnel = await upgraded_client(gw, host)
        catalog.delete("rp")
        assert await tunnel.closed()


async def test_refused_on_a_cached_address_reads_the_record_again(
    start_gateway: Any, catalog: Catalog, redis_server: RedisServer
) -> None:
    """The sandbox moved (resumed on another node) and the writer has not announced it yet: the
    refused connection makes the gateway read the record once more instead of answering 502."""
    async with RawUpstream(echo_handler, host="127.0.0.1") as old:
        port = old.port
        catalog.put("mv", host="127.0.0.1")
        gw = await start_gateway(cache_ttl=60, connect_wait=0.2)
        host = gw.host(port, "mv")
        assert (await request(gw.port, host)).status == 200
    assert gw.gateway.ctx is not None
    gw.gateway.pool.close_all()
    async with RawUpstream(echo_handler, host="127.0.0.2", port=port) as new:
        catalog.put("mv", host="127.0.0.2", publish=False)
        r_ = redis_server.client()
        r_.config_resetstat()
        r = await request(gw.port, host, "/after")
        assert r.status == 200 and b"GET /after " in r.body
        assert len(new.conns) == 1 and get_calls(r_) == 1
    # Refused again and the record still names that address: the port has no server (one read).
    r_.config_resetstat()
    r = await request(gw.port, host)
    assert (r.status, r.header("X-Gateway-Reason")) == (502, b"port_not_open")
    assert get_calls(r_) == 1
