"""A Vite 7 dev server behind the gateway, used by headless Chromium: page, HMR socket, live edit.

Needs `node`, the npm packages in tests/e2e/vite-app (`make peers`: vite@7, playwright-core) and the
system Chromium (`apt-get install chromium`; no browser download).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.catalog import access_link
from tests import needs
from tests.conftest import ROOT, WAIT, Catalog, free_port

APP = ROOT / "tests" / "e2e" / "vite-app"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
NODE = shutil.which("node") or "node"
NODE_MIN = (20, 19)  # Vite 7's floor (Debian 12's nodejs is 18)

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def peers() -> None:
    """Node.js >= 20.19, the npm packages of the app, the system Chromium: or say which is missing."""
    node = needs.tool("node", "apt-get install nodejs npm (Node.js >= 20.19)")
    version = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=WAIT, check=False).stdout
    found = tuple(int(x) for x in version.strip().lstrip("v").split(".")[:2] if x.isdigit())
    if found < NODE_MIN:
        needs.missing(
            f"Node.js >= 20.19 for Vite 7 (found {version.strip() or node})",
            "Debian 12's nodejs is 18: use a newer one",
        )
    if not (APP / "node_modules" / "vite").exists() or not (APP / "node_modules" / "playwright-core").exists():
        needs.missing("the Vite app's npm packages", "make peers (npm install in tests/e2e/vite-app)")
    if not Path(CHROMIUM).exists():
        needs.missing(f"Chromium at {CHROMIUM}", "apt-get install chromium")


def wait_port(port: int) -> None:
    for _ in range(400):  # bounded: 20 s
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    pytest.fail(f"nothing listens on {port}")


@pytest.fixture
def vite(tmp_path: Path) -> Iterator[Any]:
    """Start a Vite dev server on a copy of the app: ``vite(allowed_hosts) -> (port, source file)``."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(allowed_hosts: str) -> tuple[int, Path]:
        app = tmp_path / f"app{len(procs)}"
        shutil.copytree(APP, app, ignore=shutil.ignore_patterns("node_modules"))
        (app / "node_modules").symlink_to(APP / "node_modules")
        port = free_port()
        env = {**os.environ, "VITE_ALLOWED_HOSTS": allowed_hosts}
        p = subprocess.Popen(
            [NODE, "node_modules/vite/bin/vite.js", "--host", "127.0.0.1", "--port", str(port), "--strictPort"],
            cwd=app, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        procs.append(p)
        wait_port(port)
        return port, app / "src" / "message.js"

    yield start
    for p in procs:
        p.terminate()
        try:
            p.wait(WAIT)
        except subprocess.TimeoutExpired:
            p.kill()


async def drive(url: str, source: Path, rules: str = "") -> dict[str, Any]:
    proc = await asyncio.create_subprocess_exec(
        NODE, str(APP / "drive.mjs"), url, str(source), rules, cwd=APP,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env={**os.environ, "CHROMIUM": CHROMIUM},
    )  # fmt: skip
    async with asyncio.timeout(90):
        out, err = await proc.communicate()
    lines = out.decode().strip().splitlines()
    assert lines, err.decode()[-2000:]
    result: dict[str, Any] = json.loads(lines[-1])
    assert proc.returncode == 0, result
    return result


async def test_vite_page_and_hmr_through_the_gateway(start_gateway: Any, catalog: Catalog, vite: Any) -> None:
    port, source = vite(".sandbox.localhost")
    catalog.put("vite", host="127.0.0.1")
    gp = free_port()  # Chromium may try ::1 first for *.localhost: listen on both loopbacks
    gw = await start_gateway(listen=(f"127.0.0.1:{gp}", f"[::1]:{gp}"), domains=("sandbox.localhost",))
    host = f"{port}-vite.sandbox.localhost:{gw.port}"
    result = await drive(f"http://{host}/", source)
    assert result["status"] == 200 and result["rendered"] == "hello from the sandbox"
    assert result["hmr"].startswith(f"ws://{host}/")  # the HMR socket went through the gateway
    assert result["updated"] == "updated through the gateway"


async def test_vite_without_allowed_hosts_works_with_mask_request_host(
    start_gateway: Any, catalog: Catalog, vite: Any
) -> None:
    port, source = vite("")  # Vite's default: only localhost may be the Host
    gw = await start_gateway(domains=("sandbox.test",))
    host = f"{port}-vite.sandbox.test:{gw.port}"
    catalog.put("vite", host="127.0.0.1")
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{gw.port}/", headers={"Host": host}) as r:
        assert r.status == 403  # without the mask Vite refuses the sandbox host ...
    catalog.put("masked", host="127.0.0.1", mask_request_host="localhost:${PORT}")
    masked = f"{port}-masked.sandbox.test:{gw.port}"
    result = await drive(f"http://{masked}/", source, "MAP *.sandbox.test 127.0.0.1")  # ... with it, all works
    assert result["status"] == 200 and result["rendered"] == "hello from the sandbox"
    assert result["hmr"].startswith(f"ws://{masked}/")
    assert result["updated"] == "updated through the gateway"


async def test_private_vite_opens_with_an_access_link(start_gateway: Any, catalog: Catalog, vite: Any) -> None:
    """The page, its modules and the HMR WebSocket of a private sandbox, on the cookie a link gave."""
    port, source = vite(".sandbox.localhost")
    catalog.put("secret", host="127.0.0.1", traffic_access_token="tok-of-vite")
    gp = free_port()
    gw = await start_gateway(listen=(f"127.0.0.1:{gp}", f"[::1]:{gp}"), domains=("sandbox.localhost",))
    host = f"{port}-secret.sandbox.localhost:{gw.port}"
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{gw.port}/", headers={"Host": host}) as r:
        assert r.status == 403  # private: nothing without the link
    link = access_link("tok-of-vite", "secret", port, f"sandbox.localhost:{gw.port}", 600, scheme="http")
    result = await drive(link, source)
    assert result["status"] == 200 and result["rendered"] == "hello from the sandbox"
    assert result["hmr"].startswith(f"ws://{host}/")  # the HMR socket went through on the cookie
    assert result["updated"] == "updated through the gateway"
