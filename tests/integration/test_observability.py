"""What the gateway tells operators: Prometheus metrics, the JSON access log, request IDs, and the
health answer on the serving port."""

from __future__ import annotations

import asyncio
import gc
import json
import re
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import WAIT, Catalog
from tests.helpers import Client, RawUpstream, UpstreamConn, echo_handler, request
from tests.integration.test_websocket import raw_101, upgraded_client


async def scrape(admin_port: int) -> str:
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{admin_port}/metrics") as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
        return await r.text()


def value(text: str, name: str, **labels: str) -> float:
    """One sample's value from the Prometheus text format (0 if absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        m = re.fullmatch(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)", line)
        if m and m.group(1) == name:
            got = ",".join(sorted((m.group(2) or "").split(","))) if m.group(2) else ""
            if got == want:
                return float(m.group(3))
    return 0.0


async def test_metrics(start_gateway: Any, catalog: Catalog) -> None:
    async with RawUpstream(echo_handler) as up, RawUpstream(raw_101) as ws:
        catalog.put("mx", host="127.0.0.1")
        gw = await start_gateway()
        for _ in range(5):
            assert (await request(gw.port, gw.host(up.port, "mx"), "/m")).status == 200
        assert (await request(gw.port, gw.host(3000, "nosuch"))).status == 502
        idle = await Client.connect(gw.port)  # an open client connection
        tunnel = await upgraded_client(gw, gw.host(ws.port, "mx"))
        text = await scrape(gw.admin_port)
        assert value(text, "gateway_requests_total", code="2xx", reason="sandbox", protocol="http/1.1") == 5
        assert value(text, "gateway_requests_total", code="5xx", reason="sandbox_not_found", protocol="http/1.1") == 1
        assert value(text, "gateway_requests_total", code="1xx", reason="sandbox", protocol="http/1.1") == 1  # the 101
        assert value(text, "gateway_request_duration_seconds_count") == 7
        assert value(text, "gateway_request_duration_seconds_bucket", le="+Inf") == 7
        assert value(text, "gateway_upstream_connect_duration_seconds_count") >= 2
        assert value(text, "gateway_downstream_connections") >= 1
        assert value(text, "gateway_tunnels") == 1
        assert value(text, "gateway_upstream_connections") >= 1
        assert value(text, "gateway_pool_idle_connections") >= 1
        assert value(text, "gateway_catalog_cache_hits_total") >= 4
        assert value(text, "gateway_catalog_cache_misses_total") >= 2
        assert value(text, "gateway_bytes_total", direction="in") > 5 * 50
        assert value(text, "gateway_bytes_total", direction="out") > 5 * 50
        for metric in ("gateway_catalog_stale_serves_total", "gateway_redis_errors_total", "gateway_workers"):
            assert metric in text
        assert "mx" not in text and "nosuch" not in text  # no per-sandbox label anywhere
        await tunnel.close()
        await idle.close()
        async with asyncio.timeout(WAIT):
            while value(text := await scrape(gw.admin_port), "gateway_tunnels") != 0:
                await asyncio.sleep(0.02)
        assert value(text, "gateway_tunnels_finished_total") == 1


def log_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


async def test_access_log_lines(start_gateway: Any, catalog: Catalog, tmp_path: Path) -> None:
    log = tmp_path / "access.log"
    async with RawUpstream(echo_handler) as up, RawUpstream(raw_101) as ws:
        catalog.put("al", host="127.0.0.1")
        gw = await start_gateway(access_log=str(log))
        r = await request(gw.port, gw.host(up.port, "al"), "/path/x?token=secret&a=1", method="POST", body=b"12345")
        assert r.status == 200
        rid = r.header("X-Request-ID")
        assert (await request(gw.port, gw.host(3000, "missing"), '/q"uote')).status == 502
        tunnel = await upgraded_client(gw, gw.host(ws.port, "al"))
        tunnel.send(b"abc")
        await tunnel.close()
        async with asyncio.timeout(WAIT):  # the tunnel's line comes when it ends; the log flushes each second
            while not log.exists() or sum(1 for x in log_lines(log) if x["type"] == "tunnel") < 1:
                await asyncio.sleep(0.05)
        lines = log_lines(log)
        first = lines[0]
        assert set(first) == {
            "time", "type", "request_id", "client_ip", "protocol", "method", "host", "path", "sandbox_id", "port", "status",
            "reason", "bytes_in", "bytes_out", "duration_ms", "upstream_connect_ms", "upstream_addr",
        }  # fmt: skip
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", first["time"])
        assert first["type"] == "request" and first["request_id"] == rid.decode()
        assert first["client_ip"] == "127.0.0.1" and first["method"] == "POST" and first["protocol"] == "http/1.1"
        assert first["host"] == gw.host(up.port, "al") and first["path"] == "/path/x"  # query dropped
        assert (first["sandbox_id"], first["port"], first["status"], first["reason"]) == ("al", up.port, 200, "sandbox")
        assert rid is not None
        # bytes_out: what the sandbox sent, i.e. what the client got minus the request ID line added
        assert first["bytes_in"] > 5 and first["bytes_out"] == len(r.raw) - len(b"X-Request-ID: \r\n" + rid)
        assert first["duration_ms"] > 0 and first["upstream_connect_ms"] >= 0
        assert first["upstream_addr"] == f"127.0.0.1:{up.port}"
        second = lines[1]
        assert (second["status"], second["reason"], second["path"]) == (502, "sandbox_not_found", '/q"uote')
        assert second["upstream_addr"] is None and second["upstream_connect_ms"] is None
        upgrade = [x for x in lines if x["type"] == "request" and x["status"] == 101]
        tun = [x for x in lines if x["type"] == "tunnel"]
        assert len(upgrade) == 1 and len(tun) == 1
        assert tun[0]["request_id"] == upgrade[0]["request_id"] and tun[0]["bytes_in"] == 3


async def test_a_tunnel_is_logged_with_its_own_duration(start_gateway: Any, catalog: Catalog, tmp_path: Path) -> None:
    """The tunnel line's duration runs from the Upgrade request to the tunnel's end (it once was
    the machine's uptime: the exchange's start had been zeroed when the 101 was counted)."""
    log = tmp_path / "access.log"
    async with RawUpstream(raw_101) as ws:
        catalog.put("tl", host="127.0.0.1")
        gw = await start_gateway(access_log=str(log))
        t0 = time.monotonic()
        tunnel = await upgraded_client(gw, gw.host(ws.port, "tl"))
        await asyncio.sleep(0.5)  # the tunnel's life (the load shape), not a synchronisation
        tunnel.send(b"abcd")
        await tunnel.close()
        async with asyncio.timeout(WAIT):
            while not log.exists() or not [x for x in log_lines(log) if x["type"] == "tunnel"]:
                await asyncio.sleep(0.05)
        took_ms = (time.monotonic() - t0) * 1000
        (tun,) = [x for x in log_lines(log) if x["type"] == "tunnel"]
        (req,) = [x for x in log_lines(log) if x["type"] == "request"]
        assert req["status"] == 101 and req["duration_ms"] < tun["duration_ms"]
        assert 500 <= tun["duration_ms"] <= took_ms
        assert tun["bytes_in"] == 4 and tun["request_id"] == req["request_id"]
        assert value(await scrape(gw.admin_port), "gateway_tunnels_finished_total") == 1


async def test_access_log_may_keep_the_query(start_gateway: Any, catalog: Catalog, tmp_path: Path) -> None:
    log = tmp_path / "access.log"
    async with RawUpstream(echo_handler) as up:
        catalog.put("aq", host="127.0.0.1")
        gw = await start_gateway(access_log=str(log), access_log_query=True)
        assert (await request(gw.port, gw.host(up.port, "aq"), "/p?a=1&b=%20")).status == 200
        async with asyncio.timeout(WAIT):
            while not log.exists() or not log.read_text():
                await asyncio.sleep(0.05)
        assert log_lines(log)[0]["path"] == "/p?a=1&b=%20"


async def test_request_ids(start_gateway: Any, catalog: Catalog) -> None:
    seen: list[bytes] = []

    async def app(c: UpstreamConn) -> None:
        while True:
            head, _ = await c.read_request()
            seen.append(head)
            c.send(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")

    async with RawUpstream(app) as up:
        catalog.put("ri", host="127.0.0.1")
        untrusted = await start_gateway()
        host = untrusted.host(up.port, "ri")
        r = await request(untrusted.port, host, headers={"X-Request-ID": "forged-by-client"})
        rid = r.header("X-Request-ID")
        assert rid is not None and rid != b"forged-by-client"
        assert seen[-1].count(b"X-Request-ID") == 1 and b"X-Request-ID: " + rid + b"\r\n" in seen[-1]
        r2 = await request(untrusted.port, host)
        assert r2.header("X-Request-ID") not in (None, rid)  # a new one per request
        trusted = await start_gateway(trusted_proxies=["127.0.0.0/8"])
        r = await request(trusted.port, host, headers={"x-request-id": "lb-1234"})
        assert r.header("X-Request-ID") == b"lb-1234"
        assert seen[-1].count(b"lb-1234") == 1 and b"X-Request-ID: lb-1234\r\n" in seen[-1]
        r = await request(trusted.port, untrusted.host(3000, "nosuch"), headers={"X-Request-ID": "lb-5"})
        assert r.status == 502 and r.header("X-Request-ID") == b"lb-5"  # the gateway's own answers too
        # Kept up to MAX_REQUEST_ID (200) bytes; a longer one is replaced (it goes back in every
        # response head, which over HTTP/2 must fit what the client takes: http2.py)
        r = await request(trusted.port, host, headers={"x-request-id": "a" * 200})
        assert r.header("X-Request-ID") == b"a" * 200
        r = await request(trusted.port, host, headers={"x-request-id": "a" * 201})
        assert r.header("X-Request-ID") not in (None, b"a" * 201) and b"a" * 201 not in seen[-1]
        off = await start_gateway(request_id_header="")
        r = await request(off.port, host)
        assert r.header("X-Request-ID") is None and b"X-Request-ID" not in seen[-1]


async def test_health_on_the_serving_port(start_gateway: Any) -> None:
    gw = await start_gateway()
    for host in ("127.0.0.1", "e2b.test", "[::1]:80"):
        r = await request(gw.port, host, "/health")
        assert r.status == 200 and r.json() == {"status": "ok"}, host
    r = await request(gw.port, "127.0.0.1", "/other")
    assert (r.status, r.header("X-Gateway-Reason")) == (400, b"missing_routing_header")
    custom = await start_gateway(health_path="/healthz")
    assert (await request(custom.port, "10.0.0.1", "/healthz")).status == 200
    assert (await request(custom.port, "10.0.0.1", "/health")).status == 400
    gw.gateway.ctx.draining = True
    r = await request(gw.port, "127.0.0.1", "/health")
    assert r.status == 503 and r.json() == {"status": "draining"}


async def test_collector_pauses_are_measured(start_gateway: Any) -> None:
    """Every run of Python's cycle collector stops the worker: each is observed into
    gateway_gc_pause_seconds (collector.PauseClock), from start to stop, and only then."""
    gw = await start_gateway()
    before = await scrape(gw.admin_port)
    gc.collect()  # a full collection, as the collector would run one
    after = await scrape(gw.admin_port)
    count = "gateway_gc_pause_seconds_count"
    assert value(after, count) >= value(before, count) + 1
    assert value(after, "gateway_gc_pause_seconds_sum") > value(before, "gateway_gc_pause_seconds_sum")
    clock = gw.gateway.gc_clock
    assert clock in gc.callbacks
    await gw.gateway.stop()
    assert clock not in gc.callbacks


@pytest.mark.parametrize("workers", ["1", "2"])
async def test_the_startup_heap_is_left_out_of_collections(gateway_process: Any, workers: str) -> None:
    """A serving process (each worker) freezes what startup built once it listens (collector.settle),
    and says so: tens of thousands of objects a full collection no longer walks. That collection is
    the first pause the metric shows, per worker."""
    gw = gateway_process("--workers", workers)
    async with asyncio.timeout(WAIT):  # (workers report their metrics each second)
        while value(await scrape(gw.admin_port), "gateway_gc_pause_seconds_count") < int(workers):
            await asyncio.sleep(0.1)
    gw.proc.send_signal(signal.SIGTERM)
    out = await asyncio.to_thread(gw.proc.communicate, timeout=WAIT * 3)
    frozen = [int(n) for n in re.findall(r"startup heap frozen: (\d+) objects", out[0])]
    assert len(frozen) == int(workers), out[0][-2000:]
    assert all(n > 10_000 for n in frozen), frozen
