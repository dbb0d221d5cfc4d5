"""The WebSocket peers of the ``ws`` scenario (websockets on uvloop, from the project's venv).

    ws.py echo PORT                  echo every message, any path, on 127.0.0.1:PORT
    ws.py load PORT HOST [--conns 16] [--window 8] [--size 128] [--seconds 8]

``load`` opens the connections to 127.0.0.1:PORT with ``Host: HOST``, keeps ``window`` messages in
flight on each until the time is up, and prints one JSON line: messages echoed, seconds, p50/p99 of
the send-to-echo round trip in ms, failed connections, the first error.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import time

import uvloop
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve


async def echo(port: int) -> None:
    async def handler(ws: ServerConnection) -> None:
        async for message in ws:
            await ws.send(message)

    async with serve(handler, "127.0.0.1", port, compression=None, max_size=None, ping_interval=None):
        await asyncio.Event().wait()


async def load(a: argparse.Namespace) -> None:
    message = "x" * a.size
    rtts: list[float] = []
    errors: list[str] = []
    deadline = time.monotonic() + a.seconds

    async def one() -> None:
        sent: collections.deque[float] = collections.deque()
        try:
            async with connect(f"ws://{a.host}/ws", host="127.0.0.1", port=a.port, compression=None, max_size=None,
                               ping_interval=None, open_timeout=5, close_timeout=2) as ws:  # fmt: skip
                for _ in range(a.window):
                    sent.append(time.perf_counter())
                    await ws.send(message)
                while True:
                    got = await ws.recv()
                    now = time.perf_counter()
                    rtts.append(now - sent.popleft())
                    if got != message:
                        raise ValueError("the echo differs from the message")
                    if time.monotonic() >= deadline:
                        return
                    sent.append(now)
                    await ws.send(message)
        except Exception as e:  # counted and reported: the other connections go on
            errors.append(f"{type(e).__name__}: {e}")

    t0 = time.monotonic()
    try:
        async with asyncio.timeout(a.seconds + 15):
            await asyncio.gather(*(one() for _ in range(a.conns)))
    except TimeoutError:
        errors.append("the load did not finish in time")
    seconds = time.monotonic() - t0
    rtts.sort()

    def pct(q: float) -> float | None:
        return round(rtts[min(len(rtts) - 1, int(q * len(rtts)))] * 1e3, 3) if rtts else None

    print(json.dumps({"messages": len(rtts), "seconds": round(seconds, 3), "p50_ms": pct(0.5), "p99_ms": pct(0.99),
                      "errors": len(errors), "error": errors[0] if errors else None}), flush=True)  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="mode", required=True)
    sub.add_parser("echo").add_argument("port", type=int)
    lp = sub.add_parser("load")
    lp.add_argument("port", type=int)
    lp.add_argument("host")
    lp.add_argument("--conns", type=int, default=16)
    lp.add_argument("--window", type=int, default=8)
    lp.add_argument("--size", type=int, default=128)
    lp.add_argument("--seconds", type=float, default=8.0)
    a = ap.parse_args()
    uvloop.run(echo(a.port) if a.mode == "echo" else load(a))


if __name__ == "__main__":
    main()
