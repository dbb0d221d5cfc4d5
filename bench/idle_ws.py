"""Memory per idle WebSocket: N tunnels held open through one gateway worker.

Starts Redis, a sandbox that answers every Upgrade with 101 and then stays silent, and the gateway
(one process); measures the gateway's RSS before and after N clients have upgraded, and prints
RSS per tunnel. Everything it starts is stopped at the end.

    .venv/bin/python bench/idle_ws.py [-n 10000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS"))


async def sandbox(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
        await reader.read()  # idle until the tunnel closes
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()


async def open_tunnel(port: int, host: str, keep: list[asyncio.StreamWriter]) -> None:
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(f"GET /ws HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n".encode())
    head = await r.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 101"):
        raise RuntimeError(head + await r.read(300))
    keep.append(w)


def run_sandbox(port_pipe: int) -> None:
    """The sandbox in its own process (its n sockets count against its own descriptor limit)."""

    async def serve() -> None:
        server = await asyncio.start_server(sandbox, "127.0.0.1", 0, backlog=4096)
        os.write(port_pipe, str(server.sockets[0].getsockname()[1]).encode())
        await asyncio.Event().wait()

    asyncio.run(serve())


async def main(n: int) -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and 2 * n + 64 > hard:
        n = (hard - 64) // 2
        print(f"the per-process limit of {hard} descriptors allows {n} tunnels through one gateway process "
              "(each holds a client and a sandbox socket)", file=sys.stderr)  # fmt: skip
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    tmp = tempfile.mkdtemp(prefix="idle-ws-")
    rport, gport, aport = free_port(), free_port(), free_port()
    redis_exe = shutil.which("redis-server") or sys.exit("redis-server is needed")
    procs = [subprocess.Popen([redis_exe, "--port", str(rport), "--save", "", "--appendonly", "no", "--dir", tmp],
                              stdout=subprocess.DEVNULL)]  # fmt: skip
    r_fd, w_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r_fd)
        run_sandbox(w_fd)
        os._exit(0)
    os.close(w_fd)
    sport = int(os.read(r_fd, 16))
    try:
        time.sleep(0.3)
        subprocess.run(["redis-cli", "-p", str(rport), "set", "sandbox:catalog:idle", '{"host":"127.0.0.1"}'],
                       check=True, stdout=subprocess.DEVNULL)  # fmt: skip
        gw = subprocess.Popen(
            [os.path.join(ROOT, ".venv", "bin", "gateway"), "serve", "--listen", f"127.0.0.1:{gport}",
             "--admin-listen", f"127.0.0.1:{aport}", "--redis-url", f"redis://127.0.0.1:{rport}/0", "--domain", "e2b.dev"],
            stdout=subprocess.DEVNULL, stderr=open(os.path.join(tmp, "gateway.log"), "w"),
            env={**os.environ, "GATEWAY_DRAIN_DELAY": "0", "GATEWAY_MAX_SANDBOX_CONNECTIONS": "0"},  # one sandbox, 10,000 sockets
        )  # fmt: skip
        procs.append(gw)
        host = f"{sport}-idle.e2b.dev"
        for _ in range(300):
            try:
                await open_tunnel(gport, host, [])
                break
            except (OSError, RuntimeError):
                await asyncio.sleep(0.1)
        warm: list[asyncio.StreamWriter] = []
        await asyncio.gather(*(open_tunnel(gport, host, warm) for _ in range(100)))
        for w in warm:
            w.close()
        await asyncio.sleep(2)  # let the gateway settle (closed tunnels freed) before the baseline
        before = rss_kib(gw.pid)
        keep: list[asyncio.StreamWriter] = []
        t0 = time.monotonic()
        try:
            for i in range(0, n, 500):
                await asyncio.gather(*(open_tunnel(gport, host, keep) for _ in range(min(500, n - i))))
        except RuntimeError:
            with open(os.path.join(tmp, "gateway.log")) as f:
                print("".join(f.readlines()[-5:]), file=sys.stderr)
            raise
        took = time.monotonic() - t0
        await asyncio.sleep(1)
        after = rss_kib(gw.pid)
        fds = len(os.listdir(f"/proc/{gw.pid}/fd"))
        print(f"{n} idle tunnels open in {took:.1f} s; gateway RSS {before / 1024:.1f} -> {after / 1024:.1f} MiB, "
              f"{(after - before) / n:.1f} KiB per tunnel ({fds} fds)")  # fmt: skip
        for w in keep:
            w.close()
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
    ap.add_argument("-n", type=int, default=10_000, help="tunnels to hold open (default 10000)")
    asyncio.run(main(ap.parse_args().n))
