"""The request rate through a Redis outage: before, with Redis killed, and with Redis frozen.

A development tool, not a test (tests assert behaviour: tests/integration/test_outages.py). Starts
Redis, a small keep-alive sandbox app (uvloop, its own process) and one gateway worker with a short
``cache_ttl`` (1 s, so every record expires many times during each phase and the refresh path is
what is measured), writes 50 records, then drives the gateway with ``wrk`` rotating over the 50
sandboxes (a Lua script sets the Host per request) through these phases:

1. before: Redis up;
2. killed: Redis stopped (connections refused);
3. after: Redis restarted with the records;
4. frozen: Redis stopped with SIGSTOP (connections accepted, nothing answered);
5. thawed: SIGCONT.

For each phase it prints requests/s, failed requests (non-2xx and socket errors) and the gateway's
``gateway_redis_errors_total`` increase. Keep it brief on a shared machine (the default 5 s a phase).

    .venv/bin/python bench/outage.py [--duration 5] [--connections 32]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SANDBOXES = 50
APP = r"""
import asyncio, sys, uvloop
class App(asyncio.Protocol):
    def connection_made(self, t): self.t = t; self.buf = b""
    def data_received(self, d):
        self.buf += d
        n = self.buf.count(b"\r\n\r\n")
        if n:
            self.buf = self.buf[self.buf.rfind(b"\r\n\r\n") + 4:]
            self.t.write(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n" * n)
async def main():
    await asyncio.get_running_loop().create_server(App, "127.0.0.1", int(sys.argv[1]), backlog=1024)
    await asyncio.Event().wait()
uvloop.run(main())
"""
LUA = """
local i = 0
request = function()
  i = i + 1
  return wrk.format("GET", "/", {["Host"] = string.format("%d-ob%d.e2b.dev", APP_PORT, i % SANDBOXES)})
end
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_redis(exe: str, port: int, tmp: str) -> subprocess.Popen[bytes]:
    p = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                          "--dir", tmp], stdout=subprocess.DEVNULL)  # fmt: skip
    for _ in range(100):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.05)
    records = [(f"sandbox:catalog:ob{i}", json.dumps({"host": "127.0.0.1", "execution_id": "ob"}))
               for i in range(SANDBOXES)]  # fmt: skip
    subprocess.run(["redis-cli", "-p", str(port), "mset", *[x for kv in records for x in kv]],
                   check=True, stdout=subprocess.DEVNULL)  # fmt: skip
    return p


def redis_errors(admin: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=5) as r:
        text = r.read().decode()
    m = re.search(r"^gateway_redis_errors_total (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def wrk(port: int, script: str, duration: int, connections: int) -> tuple[float, int]:
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "-s", script, f"http://127.0.0.1:{port}/"],
        capture_output=True, text=True, timeout=duration + 30, check=False,
    ).stdout  # fmt: skip
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if not m:
        sys.exit(f"wrk failed:\n{out}")
    failed = 0
    if n := re.search(r"Non-2xx or 3xx responses: (\d+)", out):
        failed += int(n.group(1))
    if s := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out):
        failed += sum(int(x) for x in s.groups())
    return float(m.group(1)), failed


def main(duration: int, connections: int) -> None:
    if not shutil.which("wrk"):
        sys.exit("wrk is needed (apt-get install wrk)")
    exe = shutil.which("redis-server") or sys.exit("redis-server is needed")
    tmp = tempfile.mkdtemp(prefix="bench-outage-")
    rport, app_port, port, admin = free_port(), free_port(), free_port(), free_port()
    script = os.path.join(tmp, "rotate.lua")
    with open(script, "w") as f:
        f.write(LUA.replace("APP_PORT", str(app_port)).replace("SANDBOXES", str(SANDBOXES)))
    redis = start_redis(exe, rport, tmp)
    app = subprocess.Popen([sys.executable, "-c", APP, str(app_port)])
    env = {**os.environ, "GATEWAY_DRAIN_DELAY": "0", "GATEWAY_CACHE_TTL": "1", "GATEWAY_STALE_IF_ERROR": "300"}
    gw = subprocess.Popen(
        [os.path.join(ROOT, ".venv", "bin", "gateway"), "serve", "--listen", f"127.0.0.1:{port}", "--admin-listen",
         f"127.0.0.1:{admin}", "--redis-url", f"redis://127.0.0.1:{rport}/0", "--domain", "e2b.dev"],
        stdout=open(os.path.join(tmp, "gw.log"), "w"), stderr=subprocess.STDOUT, env=env,
    )  # fmt: skip
    try:
        for _ in range(300):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{admin}/ready", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.1)
        wrk(port, script, 2, connections)  # warm: every record cached
        rows = []

        def phase(name: str) -> None:
            e0 = redis_errors(admin)
            rps, failed = wrk(port, script, duration, connections)
            rows.append((name, rps, failed, redis_errors(admin) - e0))
            print(f"{name:>8}: {rps:>9,.0f} req/s, {failed} failed, {rows[-1][3]:.0f} Redis errors", file=sys.stderr)

        phase("before")
        redis.terminate()
        redis.wait(10)
        phase("killed")
        redis = start_redis(exe, rport, tmp)
        time.sleep(3)  # the breaker closes within redis_backoff_max (the load shape, not a sync)
        phase("after")
        os.kill(redis.pid, signal.SIGSTOP)
        phase("frozen")
        os.kill(redis.pid, signal.SIGCONT)
        time.sleep(3)
        phase("thawed")
        base = rows[0][1]
        print("| phase | req/s | vs before | failed | Redis errors |")
        print("|---|---|---|---|---|")
        for name, rps, failed, errors in rows:
            print(f"| {name} | {rps:,.0f} | {rps / base - 1:+.1%} | {failed} | {errors:.0f} |")
    finally:
        with_cont = redis.poll() is None
        if with_cont:
            os.kill(redis.pid, signal.SIGCONT)
        for p in (gw, app, redis):
            p.terminate()
        for p in (gw, app, redis):
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=int, default=5, help="seconds per phase (default 5)")
    ap.add_argument("--connections", type=int, default=32, help="wrk connections (default 32)")
    a = ap.parse_args()
    main(a.duration, a.connections)
