"""The writer API for control planes (gateway.catalog) and the ``gateway catalog`` CLI, against a
real Redis and a running gateway that must see every change at once."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from typing import Any

import pytest
import redis.asyncio as aioredis

from gateway.catalog import CatalogWriter, RecordError, SandboxRecord, parse_record
from tests.conftest import ROOT, WAIT, RedisServer, gateway_env
from tests.helpers import RawUpstream, echo_handler, request


async def until(send: Any, status: int) -> Any:
    """The writer's PUBLISH reaches the gateway through Redis: ask again until it has (bounded)."""
    async with asyncio.timeout(WAIT):
        while (r := await send()).status != status:
            await asyncio.sleep(0.01)
    return r


async def test_writer_put_get_delete_scan(start_gateway: Any, redis_server: RedisServer) -> None:
    client = aioredis.Redis(host="127.0.0.1", port=redis_server.port)
    w = CatalogWriter(client)
    async with RawUpstream(echo_handler) as up:
        gw = await start_gateway(cache_ttl=60, negative_cache_ttl=60)
        host = gw.host(up.port, "wr1")
        assert (await request(gw.port, host)).status == 502  # remembered as missing for a minute
        rec = SandboxRecord("127.0.0.1", "exec-1", ports=frozenset({up.port}), traffic_access_token="t")
        await w.put("wr1", rec, ttl=120)
        assert await w.get("wr1") == rec
        assert 0 < await client.ttl("sandbox:catalog:wr1") <= 120
        # The stored JSON is the contract's: a plain object any gateway (or E2B's proxy) reads.
        raw = await client.get("sandbox:catalog:wr1")
        assert json.loads(raw) == {"host": "127.0.0.1", "execution_id": "exec-1", "traffic_access_token": "t",
                                   "ports": [up.port]}  # fmt: skip
        # put published the change: the gateway forgets "missing" at once, despite its TTL
        r = await until(lambda: request(gw.port, host, headers={"e2b-traffic-access-token": "t"}), 200)
        assert r.status == 200
        await w.put("wr2", SandboxRecord("10.1.2.3", state="paused"))
        listed = {sid: rec async for sid, rec in w.scan(count=10)}
        assert listed["wr1"] == rec and listed["wr2"] == SandboxRecord("10.1.2.3", state="paused")
        await client.set("sandbox:catalog:wr3", b"not json")
        listed = {sid: rec async for sid, rec in w.scan()}
        assert isinstance(listed["wr3"], RecordError)
        assert await w.delete("wr1") is True
        assert await w.delete("wr1") is False
        assert await w.get("wr1") is None
        r = await until(lambda: request(gw.port, host, headers={"e2b-traffic-access-token": "t"}), 502)
        assert (r.status, r.header("X-Gateway-Reason")) == (502, b"sandbox_not_found")
        for sid in ("wr2", "wr3"):
            await client.delete("sandbox:catalog:" + sid)
    await client.aclose()


async def test_writer_refuses_what_breaks_the_contract(redis_server: RedisServer) -> None:
    client = aioredis.Redis(host="127.0.0.1", port=redis_server.port)
    w = CatalogWriter(client)
    with pytest.raises(ValueError, match="sandbox ID"):
        await w.put("Not-An-Id", SandboxRecord("127.0.0.1"))
    with pytest.raises(RecordError):
        await w.put("ok1", SandboxRecord("not an address!"))
    with pytest.raises(RecordError):
        await w.put("ok1", SandboxRecord("127.0.0.1", state="sleeping"))
    assert await client.exists("sandbox:catalog:ok1") == 0
    await client.aclose()


def cli(redis_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", "catalog", "--redis-url", redis_url, *args],
        capture_output=True, text=True, timeout=WAIT * 3, cwd=ROOT, env=gateway_env(),
    )  # fmt: skip


async def test_cli_put_get_ls_rm(start_gateway: Any, redis_server: RedisServer) -> None:
    url = redis_server.url
    async with RawUpstream(echo_handler) as up:
        gw = await start_gateway(cache_ttl=60, negative_cache_ttl=60)
        host = gw.host(up.port, "cli1")
        assert (await request(gw.port, host)).status == 502
        p = await asyncio.to_thread(
            cli, url, "put", "cli1", "--host", "127.0.0.1", "--token", "tk", "--ttl", "300",
            "--mask-host", "localhost:${PORT}", "--ports", f"{up.port},8080", "--execution-id", "x1",
        )  # fmt: skip
        assert p.returncode == 0, p.stderr
        stored = parse_record(redis_server.client().get("sandbox:catalog:cli1") or b"")
        assert stored == SandboxRecord(
            "127.0.0.1", "x1", "running", "tk", "localhost:${PORT}", frozenset({up.port, 8080})
        )
        assert 0 < redis_server.client().ttl("sandbox:catalog:cli1") <= 300
        r = await until(lambda: request(gw.port, host, "/c", headers={"e2b-traffic-access-token": "tk"}), 200)
        assert r.status == 200 and f"localhost:{up.port}".encode() in r.body  # announced and applied
        p = await asyncio.to_thread(cli, url, "get", "cli1")
        assert p.returncode == 0 and json.loads(p.stdout)["ports"] == sorted([up.port, 8080])
        p = await asyncio.to_thread(cli, url, "put", "cli2", "--host", "10.0.0.9", "--state", "paused")
        assert p.returncode == 0, p.stderr
        p = await asyncio.to_thread(cli, url, "ls")
        rows = {row["sandboxId"]: row for row in map(json.loads, p.stdout.splitlines())}
        assert rows["cli2"]["state"] == "paused" and rows["cli1"]["host"] == "127.0.0.1"
        p = await asyncio.to_thread(cli, url, "rm", "cli1")
        assert p.returncode == 0
        r = await until(lambda: request(gw.port, host, headers={"e2b-traffic-access-token": "tk"}), 502)
        assert r.status == 502
        p = await asyncio.to_thread(cli, url, "rm", "cli1")
        assert p.returncode == 1 and "no record" in p.stderr
        p = await asyncio.to_thread(cli, url, "get", "cli1")
        assert p.returncode == 1
        assert (await asyncio.to_thread(cli, url, "rm", "cli2")).returncode == 0


async def test_cli_bad_input_and_unreachable_redis(redis_server: RedisServer) -> None:
    from tests.conftest import free_port

    p = await asyncio.to_thread(cli, redis_server.url, "put", "BAD", "--host", "127.0.0.1")
    assert p.returncode == 2 and "sandbox ID" in p.stderr
    p = await asyncio.to_thread(cli, redis_server.url, "put", "ok", "--host", "127.0.0.1", "--ports", "0")
    assert p.returncode == 2
    p = await asyncio.to_thread(cli, redis_server.url, "put", "ok", "--host", "bad host!")
    assert p.returncode == 2 and "address" in p.stderr
    p = await asyncio.to_thread(cli, f"redis://127.0.0.1:{free_port()}/0", "ls")
    assert p.returncode == 3 and "unreachable" in p.stderr
