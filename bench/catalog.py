"""What the catalog costs a request: a cached lookup (µs of CPU), the latency a cold lookup adds
(p50/p99), and both again with 1,000,000 records in Redis. A development tool, not a test.

1. In process: the data plane's cached lookup (Host memo, cache dict, memoised routing decision)
   timed over many calls, with 1 and with 100,000 cached sandboxes; and ``Catalog.lookup`` with
   the cache off (one Redis GET through the gateway's own client), p50/p99.
2. End to end: a gateway process with ``cache_ttl = 60`` (warm) and one with ``cache_ttl = 0`` and
   ``stale_if_error = 0`` (every request waits for a Redis read), the same sequential requests over
   one keep-alive connection to a small sandbox app; the p50/p99 difference is what a cold lookup
   adds to a request.
3. Redis is then filled with 1,000,000 records (pipelined SETs) and 1 and 2 run again, the cold
   requests each naming a different sandbox among the million.

    .venv/bin/python bench/catalog.py [-n 5000] [--records 1000000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import redis
import uvloop

from gateway.catalog.cache import CatalogCache
from gateway.catalog.connection import connect
from gateway.catalog.reader import Catalog
from gateway.catalog.record import SandboxRecord
from gateway.config import load_config
from gateway.hostname import HostRouter
from gateway.policy import decide

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PREFIX = "sandbox:catalog:"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * p))]


class App(asyncio.Protocol):
    """The sandbox: answers every request head with a tiny response (keep-alive)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t = transport
        self.buf = b""

    def data_received(self, data: bytes) -> None:
        self.buf += data
        n = self.buf.count(b"\r\n\r\n")
        if n:
            self.buf = self.buf[self.buf.rfind(b"\r\n\r\n") + 4 :]
            self.t.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok" * n)  # type: ignore[attr-defined]


def run_app(port_pipe: int) -> None:
    async def serve() -> None:
        server = await asyncio.get_running_loop().create_server(App, "127.0.0.1", 0)
        os.write(port_pipe, str(server.sockets[0].getsockname()[1]).encode())
        await asyncio.Event().wait()

    uvloop.run(serve())


def record(i: int) -> bytes:
    # One execution for all: the cold requests share pooled connections, so only the GET differs.
    return json.dumps({"host": "127.0.0.1", "execution_id": "bench", "sandbox_no": i}).encode()


def fill(r: redis.Redis, start: int, stop: int) -> None:
    for lo in range(start, stop, 10_000):
        p = r.pipeline(transaction=False)
        for i in range(lo, min(stop, lo + 10_000)):
            p.set(f"{PREFIX}s{i}", record(i))
        p.execute()


def cached_lookup_us(n_cached: int, calls: int = 300_000) -> float:
    """CPU per cached lookup as the data plane does it (proxy.Exchange.start and _decide)."""
    router = HostRouter(["e2b.dev"])
    cache = CatalogCache(60, 1, 300, max(n_cached, 1))
    now = time.monotonic()
    for i in range(n_cached):
        cache.put(f"s{i}", SandboxRecord("127.0.0.1", f"e{i}"), now)
    hosts = [f"3000-s{random.randrange(n_cached)}.e2b.dev".encode() for _ in range(1000)]
    for h in hosts:  # decisions are memoised per entry, as in the data plane
        r = router.route(h)
        e = cache.entries[r.sandbox_id]  # type: ignore[union-attr]
        e.memo[3000] = decide(r, e.record, 0)  # type: ignore[arg-type]
    t0 = time.perf_counter()
    for k in range(calls):
        r = router.route(hosts[k % 1000])
        e = cache.entries.get(r.sandbox_id)  # type: ignore[union-attr]
        if e is None or e.fresh_until <= now:
            raise AssertionError
        d = e.memo.get(r.port)  # type: ignore[union-attr]
        assert d is not None
    return (time.perf_counter() - t0) / calls * 1e6


async def cold_lookups(redis_url: str, ids: list[str]) -> list[float]:
    """Catalog.lookup with the cache off: one GET each through the gateway's client (ms)."""
    cfg = load_config(None, env={}, overrides={"redis_url": redis_url})
    cat = Catalog(connect(cfg), CatalogCache(0, 0, 0, 10), PREFIX, cfg.redis_timeout)
    out = []
    for sid in ids[:200]:
        await cat.lookup(sid)  # warm the connection
    for sid in ids:
        t0 = time.perf_counter()
        e = await cat.lookup(sid)
        out.append((time.perf_counter() - t0) * 1e3)
        assert e.record is not None
    await cat.close()
    return out


async def requests(port: int, hosts: list[str]) -> list[float]:
    """Sequential requests over one connection; latency of each (ms)."""
    r, w = await asyncio.open_connection("127.0.0.1", port)
    out = []
    for h in hosts:
        t0 = time.perf_counter()
        w.write(f"GET / HTTP/1.1\r\nHost: {h}\r\n\r\n".encode())
        head = await r.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head
        await r.readexactly(2)
        out.append((time.perf_counter() - t0) * 1e3)
    w.close()
    return out


def gateway(port: int, redis_url: str, cache_ttl: float, log: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [os.path.join(ROOT, ".venv", "bin", "gateway"), "serve", "--listen", f"127.0.0.1:{port}",
         "--admin-listen", f"127.0.0.1:{free_port()}", "--redis-url", redis_url, "--domain", "e2b.dev"],
        stdout=subprocess.DEVNULL, stderr=open(log, "w"),
        env={**os.environ, "GATEWAY_DRAIN_DELAY": "0", "GATEWAY_CACHE_TTL": str(cache_ttl),
             "GATEWAY_NEGATIVE_CACHE_TTL": "0",
             # cold: no stale-while-revalidate either, so every request waits for its GET
             "GATEWAY_STALE_IF_ERROR": "0" if cache_ttl == 0 else "300"},
    )  # fmt: skip


async def wait_up(port: int, host: str) -> None:
    for _ in range(300):
        try:
            await requests(port, [host])
            return
        except (OSError, AssertionError, asyncio.IncompleteReadError):
            await asyncio.sleep(0.1)
    raise RuntimeError("gateway did not come up")


async def round_(label: str, n: int, total: int, url: str, app_port: int, warm_port: int, cold_port: int) -> None:
    ids = [f"s{random.randrange(total)}" for _ in range(n)]
    e2e_warm = await requests(warm_port, [f"{app_port}-s0.e2b.dev"] * n)
    e2e_cold = await requests(cold_port, [f"{app_port}-{sid}.e2b.dev" for sid in ids])
    e2e_warm += await requests(warm_port, [f"{app_port}-s0.e2b.dev"] * n)
    get = await cold_lookups(url, ids)
    w50, w99 = statistics.median(e2e_warm), pct(e2e_warm, 0.99)
    c50, c99 = statistics.median(e2e_cold), pct(e2e_cold, 0.99)
    print(f"\n## {label}")
    print(f"cached lookup (router memo + cache dict + memoised decision): {cached_lookup_us(1):.3f} µs "
          f"(1 cached sandbox), {cached_lookup_us(100_000):.3f} µs (100,000 cached)")  # fmt: skip
    print(f"Catalog.lookup, cache off (one GET via the gateway's client): p50 {statistics.median(get):.3f} ms, "
          f"p99 {pct(get, 0.99):.3f} ms")  # fmt: skip
    print(f"request through the gateway, warm cache: p50 {w50:.3f} ms, p99 {w99:.3f} ms")
    print(f"request through the gateway, cold (GET per request, {n} different sandboxes): "
          f"p50 {c50:.3f} ms, p99 {c99:.3f} ms")  # fmt: skip
    print(f"=> a cold lookup adds p50 {c50 - w50:+.3f} ms, p99 {c99 - w99:+.3f} ms")


async def main(n: int, records: int) -> None:
    tmp = tempfile.mkdtemp(prefix="bench-catalog-")
    rport = free_port()
    url = f"redis://127.0.0.1:{rport}/0"
    exe = shutil.which("redis-server") or sys.exit("redis-server is needed")
    procs = [subprocess.Popen([exe, "--port", str(rport), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                               "--dir", tmp], stdout=subprocess.DEVNULL)]  # fmt: skip
    r_fd, w_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r_fd)
        run_app(w_fd)
        os._exit(0)
    os.close(w_fd)
    app_port = int(os.read(r_fd, 16))
    try:
        r = redis.Redis(host="127.0.0.1", port=rport)
        for _ in range(100):
            try:
                r.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        fill(r, 0, 1000)
        warm_port, cold_port = free_port(), free_port()
        procs.append(gateway(warm_port, url, 60, os.path.join(tmp, "warm.log")))
        procs.append(gateway(cold_port, url, 0, os.path.join(tmp, "cold.log")))
        await wait_up(warm_port, f"{app_port}-s0.e2b.dev")
        await wait_up(cold_port, f"{app_port}-s0.e2b.dev")
        await round_(f"1,000 records in Redis (dbsize {r.dbsize()})", n, 1000, url, app_port, warm_port, cold_port)
        t0 = time.monotonic()
        fill(r, 1000, records)
        mem = r.info("memory")["used_memory_human"]
        print(f"\n(filled Redis to {r.dbsize():,} records in {time.monotonic() - t0:.0f} s, {mem})")
        await round_(f"{records:,} records in Redis", n, records, url, app_port, warm_port, cold_port)
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=5000, help="requests per measurement (default 5000)")
    ap.add_argument("--records", type=int, default=1_000_000, help="records to fill Redis with (default 1,000,000)")
    a = ap.parse_args()
    uvloop.run(main(a.n, a.records))
