"""Throughput with 1 and with N workers: does ``--workers`` scale? A development tool, not a test.

Starts Redis, a small keep-alive sandbox app (uvloop, its own process), and the gateway with
``--workers 1`` then ``--workers N``; drives each with ``wrk -c64`` for a few seconds (a few rounds,
alternating) and prints requests/s, the gateway's CPU (user+sys of its whole process tree) and the
machine's idle CPU. On a 2-core machine the load generator and the app share the cores with the
gateway, so the ratio is bounded by what they leave; the CPU columns show where the time went.

    .venv/bin/python bench/workers.py [--workers 2] [--duration 8] [--rounds 3]
"""

from __future__ import annotations

import argparse
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
APP = r"""
import asyncio, os, sys, uvloop
class App(asyncio.Protocol):
    def connection_made(self, t): self.t = t; self.buf = b""
    def data_received(self, d):
        self.buf += d
        n = self.buf.count(b"\r\n\r\n")
        if n:
            self.buf = self.buf[self.buf.rfind(b"\r\n\r\n") + 4:]
            self.t.write(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n" * n)
async def main():
    s = await asyncio.get_running_loop().create_server(App, "127.0.0.1", int(sys.argv[1]), backlog=1024)
    await asyncio.Event().wait()
uvloop.run(main())
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tree_cpu(pid: int) -> float:
    """user+sys seconds of a process and its children (live ones)."""
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    pids = [pid]
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            pids += [int(x) for x in f.read().split()]
    except OSError:
        pass
    for p in pids:
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
        except OSError:
            pass
    return total


def idle() -> float:
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return (v[3] + v[4]) / os.sysconf("SC_CLK_TCK")


def run_gateway(workers: int, port: int, redis_url: str, log: str) -> subprocess.Popen[bytes]:
    admin = free_port()
    p = subprocess.Popen(
        [os.path.join(ROOT, ".venv", "bin", "gateway"), "serve", "--workers", str(workers), "--listen",
         f"127.0.0.1:{port}", "--admin-listen", f"127.0.0.1:{admin}", "--redis-url", redis_url, "--domain", "e2b.dev"],
        stdout=open(log, "w"), stderr=subprocess.STDOUT, env={**os.environ, "GATEWAY_DRAIN_DELAY": "0"},
        start_new_session=True,
    )  # fmt: skip
    for _ in range(300):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{admin}/ready", timeout=1) as r:
                if r.status == 200:
                    return p
        except OSError:
            pass
        time.sleep(0.1)
    p.kill()
    sys.exit(f"gateway --workers {workers} did not become ready; see {log}")


def wrk(port: int, host: str, duration: int) -> float:
    out = subprocess.run(
        ["wrk", "-t2", "-c64", f"-d{duration}s", "-H", f"Host: {host}", f"http://127.0.0.1:{port}/"],
        capture_output=True, text=True, timeout=duration + 30, check=False,
    ).stdout  # fmt: skip
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if not m or "Non-2xx" in out or "Socket errors" in out:
        sys.exit(f"wrk failed:\n{out}")
    return float(m.group(1))


def main(n: int, duration: int, rounds: int) -> None:
    if not shutil.which("wrk"):
        sys.exit("wrk is needed (apt-get install wrk)")
    tmp = tempfile.mkdtemp(prefix="bench-workers-")
    rport, app_port = free_port(), free_port()
    redis_exe = shutil.which("redis-server") or sys.exit("redis-server is needed")
    procs = [
        subprocess.Popen([redis_exe, "--port", str(rport), "--save", "", "--appendonly", "no", "--dir", tmp],
                         stdout=subprocess.DEVNULL),
        subprocess.Popen([sys.executable, "-c", APP, str(app_port)]),
    ]  # fmt: skip
    try:
        time.sleep(0.5)
        subprocess.run(["redis-cli", "-p", str(rport), "set", "sandbox:catalog:wk", '{"host":"127.0.0.1"}'],
                       check=True, stdout=subprocess.DEVNULL)  # fmt: skip
        host = f"{app_port}-wk.e2b.dev"
        results: dict[int, list[tuple[float, float, float]]] = {1: [], n: []}
        for r in range(rounds):
            for w in (1, n) if r % 2 == 0 else (n, 1):
                port = free_port()
                gw = run_gateway(w, port, f"redis://127.0.0.1:{rport}/0", os.path.join(tmp, f"gw{w}.log"))
                wrk(port, host, 2)  # warm up
                c0, i0, t0 = tree_cpu(gw.pid), idle(), time.monotonic()
                rps = wrk(port, host, duration)
                took = time.monotonic() - t0
                cpu = (tree_cpu(gw.pid) - c0) / took
                free = (idle() - i0) / took
                results[w].append((rps, cpu, free))
                os.killpg(gw.pid, signal.SIGTERM)
                gw.wait(30)
                print(f"round {r + 1}: {w} worker(s): {rps:,.0f} req/s, gateway {cpu:.2f} cores, "
                      f"idle {free:.2f} cores", file=sys.stderr)  # fmt: skip
        med = {w: sorted(v)[len(v) // 2] for w, v in results.items()}
        print(f"1 worker: {med[1][0]:,.0f} req/s ({med[1][1]:.2f} cores); {n} workers: {med[n][0]:,.0f} req/s "
              f"({med[n][1]:.2f} cores); ratio x{med[n][0] / med[1][0]:.2f}; "
              f"CPU per request x{(med[n][1] / med[n][0]) / (med[1][1] / med[1][0]):.2f}")  # fmt: skip
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--duration", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    main(a.workers, a.duration, a.rounds)
