"""The data plane's own cost per request, without sockets: a development tool, not a test.

Drives a ClientConnection and an UpstreamConnection with in-memory transports through N
request/response pairs (a cached sandbox, a pooled upstream connection: the common case) and
prints the Python time per request. With ``--callgrind`` it runs itself under valgrind and prints
instructions per request, which unlike time is repeatable to the instruction on a noisy machine:
use it to compare two versions of the hot path.

    .venv/bin/python bench/hotpath.py [--real] [-n 100000]
    .venv/bin/python bench/hotpath.py --callgrind [--real] [--private header|cookie]
    .venv/bin/python bench/hotpath.py [--callgrind] --h2 [--real]
    .venv/bin/python bench/hotpath.py --profile tottime --h2 -n 20000   # cProfile of the loop

``--h2`` sends the requests as HTTP/2 streams, 16 at a time on one connection (as the referee's h2load
does), to 16 pooled upstream connections: the HTTP/2 front end's cost per request.

``--private`` makes the sandbox private and the request carry its token in the token field, or the
access cookie a link gave (http/admission.py), to see what a private sandbox's request costs more.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

import uvloop

from gateway.access_log import AccessLog
from gateway.catalog.cache import CatalogCache
from gateway.catalog.reader import Catalog
from gateway.catalog.record import SandboxRecord
from gateway.config import load_config
from gateway.http.context import Context
from gateway.http.downstream import ClientConnection
from gateway.http.upstream import Pool, UpstreamConnection
from gateway.policy import pool_key

SMALL_REQ = b"GET / HTTP/1.1\r\nHost: 18100-abc.e2b.dev\r\nUser-Agent: wrk\r\nAccept: */*\r\n\r\n"
SMALL_RESP = (
    b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Thu, 26 Nov 2026 08:36:27 GMT\r\nContent-Type: text/plain\r\n"
    b"Content-Length: 3\r\nConnection: keep-alive\r\n\r\nok\n"
)
REAL_REQ = (
    b"GET /real.html HTTP/1.1\r\nHost: 18100-abc.e2b.dev\r\n"
    b"User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0.0.0\r\n"
    b"Accept: text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,*/*;q=0.8\r\n"
    b"Accept-Language: en-US,en;q=0.9\r\nAccept-Encoding: gzip, deflate, br, zstd\r\n"
    b"Cookie: _ga=GA1.1.1234567890.1700000000; session=abcdef0123456789abcdef0123456789; theme=dark\r\n"
    b'Referer: https://x/index.html\r\nSec-Ch-Ua: "Chromium";v="126"\r\nSec-Ch-Ua-Mobile: ?0\r\n'
    b'Sec-Ch-Ua-Platform: "Linux"\r\nSec-Fetch-Dest: document\r\nSec-Fetch-Mode: navigate\r\n'
    b"Sec-Fetch-Site: same-origin\r\nUpgrade-Insecure-Requests: 1\r\nCache-Control: max-age=0\r\n\r\n"
)
REAL_RESP = (
    b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Thu, 26 Nov 2026 08:36:27 GMT\r\nContent-Type: text/html\r\n"
    b"Content-Length: 10\r\nLast-Modified: Thu, 26 Nov 2026 08:00:00 GMT\r\nConnection: keep-alive\r\n"
    b'ETag: "6745a0c0-400"\r\nCache-Control: private, max-age=0, must-revalidate\r\n'
    b"X-Request-Id: 5f0c6a1e-8a53-4d1b-9b8e-2f7c1d2e3a4b\r\nVary: Accept-Encoding, Origin\r\n"
    b"Set-Cookie: session=abcdef0123456789abcdef0123456789; Path=/; HttpOnly; SameSite=Lax\r\n"
    b"Strict-Transport-Security: max-age=31536000\r\nX-Content-Type-Options: nosniff\r\n"
    b"Access-Control-Allow-Origin: *\r\nAccept-Ranges: bytes\r\n\r\n0123456789"
)


class MemoryTransport:
    """Just enough of asyncio.Transport for the protocols; keeps the last write. With ``sock``, a
    real socket stands behind it (the pool polls an idle upstream connection's socket before reuse,
    and that system call belongs in the cost)."""

    def __init__(self, sock: socket.socket | None = None) -> None:
        self.last: Any = None
        self.sock = sock

    def write(self, data: bytes) -> None:
        self.last = data

    def writelines(self, data: list[bytes]) -> None:
        self.last = data

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "socket":
            return self.sock
        return ("127.0.0.1", 5555) if name == "peername" else default

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def is_closing(self) -> bool:
        return False

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass


BATCH = 16  # requests per loop iteration (wrk -c64 against one saturated worker sees about this)


class _NoCallSoon:
    def call_soon(self, *args: Any, **kwargs: Any) -> None:
        pass


PROFILE: str | None = None  # --profile: cProfile's sort key


def _profiler() -> Any:
    """A running cProfile over the measured loop (--profile), or None."""
    if PROFILE is None:
        return None
    import cProfile  # noqa: PLC0415

    prof = cProfile.Profile()
    prof.enable()
    return prof


def _report(prof: Any) -> None:
    if prof is not None:
        import pstats  # noqa: PLC0415

        prof.disable()
        pstats.Stats(prof).sort_stats(PROFILE or "tottime").print_stats(40)


def private_request(req: bytes, how: str) -> bytes:
    """``req`` to a private sandbox: with the token field, or with the access cookie among others."""
    if how == "header":
        return req[:-2] + b"e2b-traffic-access-token: tok\r\n\r\n"
    from gateway import access  # noqa: PLC0415 (the header case runs on builds before access links too)

    value = access.mint("tok", access.COOKIE, "abc", 18100, 2**35).encode()
    if b"\r\nCookie: " in req:
        return req.replace(b"theme=dark\r\n", b"theme=dark; e2b_access=" + value + b"\r\n")
    return req[:-2] + b"Cookie: e2b_access=" + value + b"\r\n\r\n"


def h2_batches(n: int, real: bool) -> list[bytes]:
    """The client's bytes: the preface and settings, then ``n`` requests as batches of 16 HEADERS."""
    import h2.config  # noqa: PLC0415
    import h2.connection  # noqa: PLC0415

    c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    c.initiate_connection()
    c.increment_flow_control_window(2**31 - 1 - 65535)
    head = REAL_REQ if real else SMALL_REQ
    lines = head.split(b"\r\n")[1:-2]
    fields = [(k.lower(), v) for k, _, v in (line.partition(b": ") for line in lines) if k.lower() != b"host"]
    headers = [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"18100-abc.e2b.dev"),
               (b":path", head.split(b" ")[1]), *fields]  # fmt: skip
    out = [c.data_to_send()]
    for _ in range(n // BATCH):
        for _ in range(BATCH):
            c.send_headers(c.get_next_available_stream_id(), headers, end_stream=True)
        out.append(c.data_to_send())
        c.streams.clear()  # the server's answers are not read back: forget the streams
    return out


async def run_h2(n: int, real: bool, ready: str | None) -> float:
    from gateway.http.headers import Peer  # noqa: PLC0415
    from gateway.http.http2 import H2Connection  # noqa: PLC0415

    env = {k: v for k, v in os.environ.items() if k.startswith("GATEWAY_")}  # to try settings
    cfg = load_config(None, env=env, overrides={"domains": ("e2b.dev",), "redis_url": "redis://unused"})
    loop = asyncio.get_running_loop()
    cache = CatalogCache(1e9, 1, 1, 100)
    cache.put("abc", SandboxRecord("127.0.0.1", "e1"), loop.time())
    catalog = Catalog(None, cache, "sandbox:catalog:", 1)  # type: ignore[arg-type]  # never asked
    pool = Pool(1e9, 64, 64, 65536)
    ctx = Context(cfg, catalog, pool)
    ups = []
    pairs = []  # silent sandboxes: their sockets never become readable (the pool polls before reuse)
    for _ in range(BATCH):
        up = UpstreamConnection(pool, pool_key("127.0.0.1", 18100, "e1"))
        pairs.append(socket.socketpair())
        up.connection_made(MemoryTransport(pairs[-1][0]))  # type: ignore[arg-type]
        pool.release(up)
        ups.append(up)
    conn = H2Connection(ctx, MemoryTransport(), Peer.make("127.0.0.1", 8080, False, ()))  # type: ignore[arg-type]
    ctx.outbox.loop = _NoCallSoon()  # type: ignore[assignment]
    flush = ctx.outbox.flush
    resp = REAL_RESP if real else SMALL_RESP
    batches = h2_batches(n + 100 * BATCH, real)
    conn.data_received(batches[0])

    def one(batch: bytes) -> None:
        conn.data_received(batch)
        for up in ups:
            if up.exchange is not None:
                up.data_received(resp)
        flush()

    for b in batches[1:101]:  # warm up
        one(b)
    if ready:
        open(ready + ".ready", "w").close()
        while not os.path.exists(ready + ".go"):
            time.sleep(0.01)
    prof = _profiler()
    t0 = time.perf_counter()
    for b in batches[101:]:
        one(b)
    per = (time.perf_counter() - t0) / n
    _report(prof)
    return per


async def run(n: int, real: bool, ready: str | None, private: str | None = None) -> float:
    env = {k: v for k, v in os.environ.items() if k.startswith("GATEWAY_")}  # to try settings (access log...)
    cfg = load_config(None, env=env, overrides={"domains": ("e2b.dev",), "redis_url": "redis://unused"})
    loop = asyncio.get_running_loop()
    cache = CatalogCache(1e9, 1, 1, 100)
    cache.put("abc", SandboxRecord("127.0.0.1", "e1", traffic_access_token="tok" if private else None), loop.time())
    catalog = Catalog(None, cache, "sandbox:catalog:", 1)  # type: ignore[arg-type]  # never asked
    pool = Pool(1e9, 10, 10, 65536)
    ctx = Context(cfg, catalog, pool)
    if "GATEWAY_ACCESS_LOG" in env:  # off unless asked: GATEWAY_ACCESS_LOG=/dev/null measures its cost
        ctx.access_log = AccessLog.open(cfg.access_log, cfg.access_log_query)
    up = UpstreamConnection(pool, pool_key("127.0.0.1", 18100, "e1"))
    quiet, _peer = socket.socketpair()  # a silent sandbox: its socket never becomes readable
    up.connection_made(MemoryTransport(quiet))  # type: ignore[arg-type]
    pool.release(up)
    client = ClientConnection(ctx, 8080)
    client.connection_made(MemoryTransport())  # type: ignore[arg-type]
    req, resp = (REAL_REQ, REAL_RESP) if real else (SMALL_REQ, SMALL_RESP)
    if private:
        req = private_request(req, private)
    # The loop flushes the outbox once per iteration, which under load holds many requests: here
    # once every BATCH requests (the protocols do not wait for their writes, so this is the same work).
    ctx.outbox.loop = _NoCallSoon()  # type: ignore[assignment]
    flush = ctx.outbox.flush
    for i in range(100):  # warm up
        client.data_received(req)
        up.data_received(resp)
        if i % BATCH == 0:
            flush()
    if ready:  # --callgrind: wait until valgrind counts
        open(ready + ".ready", "w").close()
        while not os.path.exists(ready + ".go"):
            time.sleep(0.01)
    prof = _profiler()
    t0 = time.perf_counter()
    for i in range(n):
        client.data_received(req)
        up.data_received(resp)
        if i % BATCH == 0:
            flush()
    per = (time.perf_counter() - t0) / n
    _report(prof)
    return per


def callgrind(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as d:
        mark = os.path.join(d, "m")
        cmd = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={d}/out",
               sys.executable, __file__, "-n", str(args.n), "--ready", mark] + (["--real"] if args.real else [])  # fmt: skip
        if args.h2:
            cmd.append("--h2")
        if args.private:
            cmd += ["--private", args.private]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 300
        while not os.path.exists(mark + ".ready"):
            if proc.poll() is not None or time.monotonic() > deadline:
                sys.exit(f"valgrind run failed: {proc.stderr.read() if proc.stderr else ''}")
            time.sleep(0.1)
        subprocess.run(["callgrind_control", "-i", "on", str(proc.pid)], check=True, capture_output=True)
        open(mark + ".go", "w").close()
        _, err = proc.communicate(timeout=600)
        total = next(int(line.split()[-1].replace(",", "")) for line in err.splitlines() if "Collected" in line)
        what = ("real" if args.real else "small") + (f", private by {args.private}" if args.private else "")
        what += ", HTTP/2" if args.h2 else ""
        print(f"{total / args.n:,.0f} instructions per request ({what})")
        if args.keep:
            shutil.copy(f"{d}/out", args.keep)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=100_000, help="requests (default 100000; --callgrind: 2000)")
    ap.add_argument("--real", action="store_true", help="the 14-header request and 15-header response")
    ap.add_argument("--callgrind", action="store_true", help="count instructions under valgrind")
    ap.add_argument("--private", choices=("header", "cookie"), help="a private sandbox, reached by token or cookie")
    ap.add_argument("--h2", action="store_true", help="HTTP/2 streams, 16 at a time on one connection")
    ap.add_argument("--keep", metavar="FILE", help="--callgrind: keep its output (callgrind_annotate FILE)")
    ap.add_argument("--profile", metavar="SORT", help="cProfile the measured loop, sorted by SORT (tottime, cumtime)")
    ap.add_argument("--ready", help=argparse.SUPPRESS)
    args = ap.parse_args()
    global PROFILE
    PROFILE = args.profile
    if args.callgrind:
        if args.n == 100_000:
            args.n = 2000
        callgrind(args)
        return
    if args.h2:
        per = uvloop.run(run_h2(args.n, args.real, args.ready))
    else:
        per = uvloop.run(run(args.n, args.real, args.ready, args.private))
    if args.ready:
        os._exit(0)  # stop counting here, not in interpreter shutdown
    print(
        f"{per * 1e6:.2f} µs of Python per request ({'real' if args.real else 'small'}{', HTTP/2' if args.h2 else ''}, n={args.n})"
    )


if __name__ == "__main__":
    main()
