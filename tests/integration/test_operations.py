"""Deploy-day behaviour: workers under a supervisor, a drain that drops nothing, TLS with SNI and
reload, PROXY protocol, and the limits (connections, per-sandbox, minimum body rate)."""

from __future__ import annotations

import asyncio
import os
import signal
import ssl
import struct
import subprocess
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests import needs
from tests.conftest import WAIT, Catalog, free_port
from tests.helpers import Client, RawUpstream, UpstreamConn, echo_handler, read_response, request, response
from tests.integration.test_observability import scrape, value

# ---- workers


def children(pid: int) -> set[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return {int(x) for x in f.read().split()}


async def ready(admin_port: int) -> int:
    try:
        async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{admin_port}/ready") as r:
            return r.status
    except aiohttp.ClientError:
        return 0


async def test_workers_share_the_listener_and_are_restarted(gateway_process: Any, catalog: Catalog) -> None:
    async with RawUpstream(echo_handler) as up:
        catalog.put("wk", host="127.0.0.1")
        gw = gateway_process("--workers", "2")
        host = gw.host(up.port, "wk")
        workers = children(gw.proc.pid)
        assert len(workers) == 2
        results = await asyncio.gather(*(request(gw.port, host, f"/{i}") for i in range(40)))
        assert [r.status for r in results] == [200] * 40
        async with asyncio.timeout(WAIT):  # the workers report within a second; the supervisor sums
            while value(text := await scrape(gw.admin_port), "gateway_requests_total", code="2xx", protocol="http/1.1",
                        reason="sandbox") < 40:  # fmt: skip
                await asyncio.sleep(0.1)
        assert value(text, "gateway_workers") == 2
        victim = sorted(workers)[0]
        os.kill(victim, signal.SIGKILL)
        async with asyncio.timeout(WAIT * 2):  # replaced, and ready again
            while True:
                now = children(gw.proc.pid)
                if len(now) == 2 and victim not in now and await ready(gw.admin_port) == 200:
                    break
                await asyncio.sleep(0.1)
        assert value(await scrape(gw.admin_port), "gateway_worker_restarts_total") == 1
        results = await asyncio.gather(*(request(gw.port, host, f"/{i}") for i in range(20)))
        assert [r.status for r in results] == [200] * 20
        # counters of the dead worker are kept: the total never goes backwards
        async with asyncio.timeout(WAIT):
            while (
                value(
                    await scrape(gw.admin_port),
                    "gateway_requests_total",
                    code="2xx",
                    reason="sandbox",
                    protocol="http/1.1",
                )
                < 60
            ):
                await asyncio.sleep(0.1)
        gw.proc.send_signal(signal.SIGTERM)
        assert gw.proc.wait(WAIT * 2) == 0
        assert not any(Path(f"/proc/{p}").exists() for p in children_or_empty(workers))


def children_or_empty(pids: set[int]) -> set[int]:
    return {p for p in pids if Path(f"/proc/{p}").exists() and b"gateway" in Path(f"/proc/{p}/cmdline").read_bytes()}


async def test_workers_of_a_killed_supervisor_drain_and_exit(gateway_process: Any, catalog: Catalog) -> None:
    """SIGKILL (the OOM killer) leaves the supervisor no time to stop its workers: each notices on its
    next second's tick that its parent changed and drains, instead of serving on unseen, holding the
    port. A request in flight on a worker at that moment still gets its whole answer."""
    asked, release = asyncio.Event(), asyncio.Event()

    async def slow(conn: UpstreamConn) -> None:
        await conn.read_head()
        asked.set()
        await release.wait()
        conn.send(response(200, b"late but whole"))

    async with RawUpstream(slow) as up:
        catalog.put("orphan", host="127.0.0.1")
        gw = gateway_process("--workers", "2", env={"GATEWAY_SHUTDOWN_TIMEOUT": "30"})
        workers = children(gw.proc.pid)
        assert len(workers) == 2
        pending = asyncio.create_task(request(gw.port, gw.host(up.port, "orphan"), "/"))
        async with asyncio.timeout(WAIT):
            await asked.wait()
        gw.proc.kill()
        gw.proc.wait(WAIT)
        async with asyncio.timeout(WAIT * 2):  # the idle worker drains and exits within its tick
            while len(children_or_empty(workers)) == 2:
                await asyncio.sleep(0.05)
        release.set()
        async with asyncio.timeout(WAIT):
            r = await pending
        assert r.status == 200 and r.body == b"late but whole"
        async with asyncio.timeout(WAIT * 2):
            while children_or_empty(workers):
                await asyncio.sleep(0.05)


def test_workers_need_fixed_ports(tmp_path: Path) -> None:
    import sys

    from tests.conftest import ROOT, gateway_env

    p = subprocess.run(
        [sys.executable, "-m", "gateway", "serve", "--workers", "2", "--listen", "127.0.0.1:0",
         "--redis-url", "redis://127.0.0.1:1/0"],
        capture_output=True, text=True, timeout=WAIT * 3, cwd=ROOT, env=gateway_env(),
    )  # fmt: skip
    assert p.returncode == 2 and "port 0" in p.stderr


# ---- drain


@pytest.mark.parametrize("workers", ["1", "2"])
async def test_no_failed_request_across_a_sigterm(gateway_process: Any, catalog: Catalog, workers: str) -> None:
    """A client that sends steady traffic and stops when /ready says 503 (as a balancer does) sees
    no failure while the gateway drains and exits."""

    async def slowish(c: UpstreamConn) -> None:
        while True:
            await c.read_request()
            await asyncio.sleep(0.05)  # the sandbox's own pace: requests are in flight during the drain
            c.send(response(200, b"ok"))

    async with RawUpstream(slowish) as up:
        catalog.put("dr", host="127.0.0.1")
        gw = gateway_process("--workers", workers, env={"GATEWAY_DRAIN_DELAY": "1", "GATEWAY_SHUTDOWN_TIMEOUT": "5"})
        host = gw.host(up.port, "dr")
        in_rotation = True
        sent = failed = 0

        async def watcher() -> None:
            nonlocal in_rotation
            while in_rotation:
                if await ready(gw.admin_port) != 200:
                    in_rotation = False
                await asyncio.sleep(0.02)

        async def client(keep_alive: bool) -> None:
            nonlocal sent, failed
            c: Client | None = None
            while in_rotation:
                sent += 1
                try:
                    if c is None:
                        c = await Client.connect(gw.port)
                    r = await c.request(host, "/")
                    if r.status != 200:
                        failed += 1
                    if not keep_alive or r.header("Connection") == b"close":
                        await c.close()
                        c = None
                except (OSError, asyncio.IncompleteReadError) as e:
                    failed += 1
                    print("failed:", repr(e))
                    c = None
            if c is not None:
                await c.close()

        async def terminate() -> None:
            while sent < 50:
                await asyncio.sleep(0.01)
            gw.proc.send_signal(signal.SIGTERM)

        async with asyncio.timeout(WAIT * 3):
            await asyncio.gather(watcher(), terminate(), *(client(i % 2 == 0) for i in range(6)))
        assert sent >= 50 and failed == 0
        assert await asyncio.to_thread(gw.proc.wait, WAIT * 2) == 0


# ---- TLS


def make_cert(d: Path, name: str, cn: str) -> tuple[Path, Path]:
    cert, key = d / f"{name}.pem", d / f"{name}.key"
    subprocess.run(
        [needs.tool("openssl", "apt-get install openssl"), "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={cn}",
         "-addext", f"subjectAltName=DNS:{cn}", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return cert, key


def client_ctx(ca: Path, max_version: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca))
    if max_version is not None:
        ctx.maximum_version = max_version
    return ctx


async def tls_request(port: int, ctx: ssl.SSLContext, host: str, path: str = "/") -> Any:
    async with asyncio.timeout(WAIT):
        r, w = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname=host)
    w.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    resp = await read_response(r)
    peer = w.get_extra_info("ssl_object").getpeercert()
    w.close()
    return resp, peer


async def test_tls_with_sni(start_gateway: Any, catalog: Catalog, tmp_path: Path) -> None:
    main_cert, main_key = make_cert(tmp_path, "main", "*.sandbox.test")
    other_cert, other_key = make_cert(tmp_path, "other", "*.other.test")
    async with RawUpstream(echo_handler) as up:
        catalog.put("tls", host="127.0.0.1")
        gw = await start_gateway(
            listen=["127.0.0.1:0 tls"], domains=["sandbox.test", "other.test"],
            tls_certificates=[f"{main_cert}:{main_key}", f"{other_cert}:{other_key}"],
        )  # fmt: skip
        r, peer = await tls_request(gw.port, client_ctx(main_cert), f"{up.port}-tls.sandbox.test", "/s")
        assert r.status == 200 and b"X-Forwarded-Proto: https\r\n" in r.body
        assert b"proto=https" in r.body
        r, peer = await tls_request(gw.port, client_ctx(other_cert), f"{up.port}-tls.other.test")
        assert r.status == 200 and ("commonName", "*.other.test") in peer["subject"][0]
        with pytest.raises((ssl.SSLError, ConnectionResetError)):  # TLS 1.2 at least by default; here 1.3 only
            only13 = await start_gateway(
                listen=["127.0.0.1:0 tls"], domains=["sandbox.test"], tls_certificates=[f"{main_cert}:{main_key}"],
                tls_min_version="1.3",
            )  # fmt: skip
            await tls_request(only13.port, client_ctx(main_cert, ssl.TLSVersion.TLSv1_2), f"{up.port}-tls.sandbox.test")


async def test_tls_certificate_reload_on_sighup(gateway_process: Any, catalog: Catalog, tmp_path: Path) -> None:
    cert, key = make_cert(tmp_path, "live", "*.sandbox.test")
    first = tmp_path / "first.pem"
    first.write_bytes(cert.read_bytes())
    async with RawUpstream(echo_handler) as up:
        catalog.put("rl", host="127.0.0.1")
        tls_port = free_port()
        gw = gateway_process(
            "--listen", f"127.0.0.1:{tls_port} tls", "--domain", "sandbox.test",
            env={"GATEWAY_TLS_CERTIFICATES": f"{cert}:{key}"},
        )  # fmt: skip
        host = f"{up.port}-rl.sandbox.test"
        async with asyncio.timeout(WAIT):
            r1, w1 = await asyncio.open_connection("127.0.0.1", tls_port, ssl=client_ctx(first), server_hostname=host)
        w1.write(f"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        assert (await read_response(r1)).status == 200
        new_cert, new_key = make_cert(tmp_path, "renewed", "*.sandbox.test")
        cert.write_bytes(new_cert.read_bytes())
        key.write_bytes(new_key.read_bytes())
        gw.proc.send_signal(signal.SIGHUP)
        async with asyncio.timeout(WAIT):  # new handshakes get the renewed certificate
            while True:
                try:
                    r, _ = await tls_request(tls_port, client_ctx(new_cert), host)
                    break
                except ssl.SSLError:
                    await asyncio.sleep(0.05)
        assert r.status == 200
        w1.write(f"GET /again HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())  # the old connection goes on
        assert (await read_response(r1)).status == 200
        w1.close()
        # A broken file on the next reload keeps the current certificates.
        key.write_text("not a key")
        gw.proc.send_signal(signal.SIGHUP)
        r, _ = await tls_request(tls_port, client_ctx(new_cert), host)
        assert r.status == 200 and gw.proc.poll() is None


# ---- PROXY protocol


def proxy_v2(src: str, dst: str, sport: int, dport: int) -> bytes:
    import ipaddress

    a = ipaddress.ip_address(src)
    addrs = a.packed + ipaddress.ip_address(dst).packed + struct.pack("!HH", sport, dport)
    family = 0x21 if a.version == 6 else 0x11  # TCP over IPv6 / IPv4
    return b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x21, family]) + struct.pack("!H", len(addrs)) + addrs


async def test_proxy_protocol(start_gateway: Any, catalog: Catalog, tmp_path: Path) -> None:
    log = tmp_path / "access.log"
    async with RawUpstream(echo_handler) as up:
        catalog.put("pp", host="127.0.0.1")
        gw = await start_gateway(listen=["127.0.0.1:0 proxy", "127.0.0.1:0 proxy-optional"], access_log=str(log))
        required, optional = gw.gateway.ports
        host = gw.host(up.port, "pp")
        req = f"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
        for header, ip in ((b"PROXY TCP4 203.0.113.7 10.0.0.1 5555 443\r\n", "203.0.113.7"),
                           (proxy_v2("2001:db8::5", "2001:db8::1", 5555, 443), "2001:db8::5")):  # fmt: skip
            c = await Client.connect(required)
            c.send(header + req)
            r = await read_response(c.reader)
            assert r.status == 200 and f"X-Forwarded-For: {ip}\r\n".encode() in r.body
            await c.close()
        c = await Client.connect(required)
        c.send(b"PROXY TCP4 203.0.113.8 10.0.0.1 5555 443\r\n")  # the header may come in pieces
        c.send(req[:10])
        c.send(req[10:])
        assert b"X-Forwarded-For: 203.0.113.8\r\n" in (await read_response(c.reader)).body
        await c.close()
        c = await Client.connect(required)  # required: a connection without the header is refused
        c.send(req)
        r = await read_response(c.reader)
        assert (r.status, r.header("X-Gateway-Reason")) == (400, b"proxy_protocol_invalid")
        assert await c.closed()
        r = await request(optional, host)  # optional: a direct client is served as it is
        assert r.status == 200 and b"X-Forwarded-For: 127.0.0.1\r\n" in r.body
        c = await Client.connect(optional)
        c.send(b"PROXY TCP4 198.51.100.2 10.0.0.1 1 2\r\n" + req)
        assert b"X-Forwarded-For: 198.51.100.2\r\n" in (await read_response(c.reader)).body
        await c.close()
        async with asyncio.timeout(WAIT):
            while not log.exists() or log.read_text().count("\n") < 5:
                await asyncio.sleep(0.05)
        assert '"client_ip":"203.0.113.7"' in log.read_text() and '"client_ip":"2001:db8::5"' in log.read_text()


# ---- limits


async def test_connection_limits(start_gateway: Any, catalog: Catalog) -> None:
    release = asyncio.Event()

    async def hold(c: UpstreamConn) -> None:
        while True:
            await c.read_request()
            await release.wait()
            c.send(response(200, b"ok"))

    async with RawUpstream(hold) as up:
        catalog.put("lim", host="127.0.0.1")
        gw = await start_gateway(max_sandbox_connections=2, max_connections=4)
        host = gw.host(up.port, "lim")
        held = [await Client.connect(gw.port) for _ in range(2)]
        for c in held:
            c.send(f"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        async with asyncio.timeout(WAIT):
            while len(up.conns) < 2:
                await asyncio.sleep(0.01)
        third = await Client.connect(gw.port)
        r = await third.request(host)
        assert (r.status, r.header("X-Gateway-Reason"), r.header("Retry-After")) == (429, b"too_many_connections", b"1")
        other = await Client.connect(gw.port)  # connection 4 of 4
        fifth = await Client.connect(gw.port)
        r = await read_response(fifth.reader)
        assert (r.status, r.header("X-Gateway-Reason")) == (503, b"overloaded")
        assert await fifth.closed()
        release.set()
        assert [(await read_response(c.reader)).status for c in held] == [200, 200]
        assert (await third.request(host)).status == 200  # places are free again
        for c in (*held, third, other):
            await c.close()


async def test_minimum_body_rate(start_gateway: Any, catalog: Catalog) -> None:
    async with RawUpstream(echo_handler) as up:
        catalog.put("rate", host="127.0.0.1")
        gw = await start_gateway(min_body_rate=1000, body_rate_window=1.0)
        host = gw.host(up.port, "rate")
        # Slow but steady: 4 KiB/s for 3 s, three windows' worth, passes.
        c = await Client.connect(gw.port)
        c.send(f"POST /slow HTTP/1.1\r\nHost: {host}\r\nContent-Length: 12000\r\n\r\n".encode())
        for _ in range(12):
            c.send(b"x" * 1000)
            await asyncio.sleep(0.25)  # the client's pace (the load shape), not a synchronisation
        r = await read_response(c.reader)
        assert r.status == 200 and r.body.endswith(b"body=12000")
        await c.close()
        # Stalled: part of the body, then nothing. Ended within a couple of windows.
        c = await Client.connect(gw.port)
        c.send(f"POST /stall HTTP/1.1\r\nHost: {host}\r\nContent-Length: 100000\r\n\r\n".encode() + b"x" * 100)
        r = await read_response(c.reader)
        assert (r.status, r.header("X-Gateway-Reason")) == (408, b"body_timeout")
        assert await c.closed()


async def test_stalled_download_is_ended(start_gateway: Any, catalog: Catalog) -> None:
    async def big(c: UpstreamConn) -> None:
        await c.read_request()
        c.send(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (1 << 30))
        block = b"y" * (1 << 20)
        for _ in range(1024):
            c.writer.write(block)
            await c.writer.drain()

    async with RawUpstream(big) as up:
        catalog.put("dl", host="127.0.0.1")
        gw = await start_gateway(min_body_rate=100_000, body_rate_window=1.0)
        c = await Client.connect(gw.port)
        c.send(f"GET / HTTP/1.1\r\nHost: {gw.host(up.port, 'dl')}\r\n\r\n".encode())
        await c.reader.readuntil(b"\r\n\r\n")
        c.writer.transport.pause_reading()  # a client that stops reading
        ctx = gw.gateway.ctx
        async with asyncio.timeout(WAIT):  # the gateway gives up on it
            while ctx.connections:
                await asyncio.sleep(0.05)
        c.writer.transport.resume_reading()
        got = 0
        with pytest.raises((ConnectionResetError, asyncio.IncompleteReadError)):
            async with asyncio.timeout(WAIT):
                while True:
                    data = await c.reader.read(1 << 20)
                    if not data:
                        raise asyncio.IncompleteReadError(b"", None)
                    got += len(data)
        assert got < 1 << 30
        await c.close()


async def test_proxy_protocol_before_tls(start_gateway: Any, catalog: Catalog, tmp_path: Path) -> None:
    """TLS passthrough behind an L4 balancer: the PROXY header in clear, then the TLS handshake."""
    import socket

    cert, key = make_cert(tmp_path, "pt", "*.sandbox.test")
    async with RawUpstream(echo_handler) as up:
        catalog.put("pt", host="127.0.0.1")
        gw = await start_gateway(
            listen=["127.0.0.1:0 tls proxy", "127.0.0.1:0 tls proxy-optional"], domains=["sandbox.test"],
            tls_certificates=[f"{cert}:{key}"],
        )  # fmt: skip
        required, optional = gw.gateway.ports
        host = f"{up.port}-pt.sandbox.test"

        async def via(port: int, header: bytes) -> Any:
            s = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
            s.sendall(header)
            s.setblocking(False)
            async with asyncio.timeout(WAIT):
                r, w = await asyncio.open_connection(sock=s, ssl=client_ctx(cert), server_hostname=host)
            w.write(f"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
            resp = await read_response(r)
            w.close()
            return resp

        r = await via(required, b"PROXY TCP4 203.0.113.9 10.0.0.1 4444 443\r\n")
        assert r.status == 200 and b"X-Forwarded-For: 203.0.113.9\r\n" in r.body
        assert b"X-Forwarded-Proto: https\r\n" in r.body
        r = await via(required, proxy_v2("198.51.100.4", "10.0.0.1", 4444, 443))
        assert r.status == 200 and b"X-Forwarded-For: 198.51.100.4\r\n" in r.body
        with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)):
            await via(required, b"")  # no header: refused before TLS
        r = await via(optional, b"")
        assert r.status == 200 and b"X-Forwarded-For: 127.0.0.1\r\n" in r.body
        r = await via(optional, b"PROXY TCP4 203.0.113.10 10.0.0.1 4444 443\r\n")
        assert b"X-Forwarded-For: 203.0.113.10\r\n" in r.body


async def test_slow_heads_and_idle_clients(start_gateway: Any, catalog: Catalog) -> None:
    async with RawUpstream(echo_handler) as up:
        catalog.put("slow", host="127.0.0.1")
        gw = await start_gateway(request_head_timeout=1.0, client_idle_timeout=1.0)
        host = gw.host(up.port, "slow")
        # slowloris: a head that trickles in never completes in time, however steady the trickle
        c = await Client.connect(gw.port)
        c.send(f"GET / HTTP/1.1\r\nHost: {host}\r\n".encode())
        r = await read_response(c.reader)
        assert (r.status, r.header("X-Gateway-Reason")) == (408, b"request_timeout")
        assert await c.closed()
        # an idle keep-alive connection is closed after client_idle_timeout
        c = await Client.connect(gw.port)
        assert (await c.request(host)).status == 200
        assert await c.closed()
        # a head too large is 431, and the connection closes
        c = await Client.connect(gw.port)
        c.send(f"GET / HTTP/1.1\r\nHost: {host}\r\nX-Big: {'a' * 70000}\r\n\r\n".encode())
        r = await read_response(c.reader)
        assert (r.status, r.header("X-Gateway-Reason")) == (431, b"request_head_too_large")
        assert await c.closed()
