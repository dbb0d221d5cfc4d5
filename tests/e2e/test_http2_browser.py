"""Headless Chromium over the TLS listener with ALPN h2 (a test certificate, trusted by its key): the
page and its modules come over one HTTP/2 connection, its WebSocket over an RFC 8441 stream."""

from __future__ import annotations

import base64
import hashlib
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import WSMsgType, web

from gateway.http.http2 import H2Connection
from tests import needs
from tests.conftest import Catalog, free_port
from tests.e2e.browser import browse, browser  # noqa: F401 (the fixture)
from tests.integration.test_operations import make_cert

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("browser")]
MODULES = 40

PAGE = (
    "<!doctype html><title>h2</title><p id=ws></p>"
    + "".join(f'<script type="module" src="/m{i}.js"></script>' for i in range(MODULES))
    + """<script type="module">
const ws = new WebSocket(location.origin.replace("https", "wss") + "/ws");
ws.onopen = () => ws.send("over h2?");
ws.onmessage = (e) => { document.getElementById("ws").textContent = e.data; };
</script>"""
)


def spki(cert: Path) -> str:
    """base64(SHA-256(SubjectPublicKeyInfo)): what Chromium's --ignore-certificate-errors-spki-list takes."""
    openssl = needs.tool("openssl", "apt-get install openssl")
    pub = subprocess.run(
        [openssl, "x509", "-pubkey", "-noout"], input=cert.read_bytes(), capture_output=True, check=True, timeout=30
    ).stdout
    der = subprocess.run(
        [openssl, "pkey", "-pubin", "-outform", "der"], input=pub, capture_output=True, check=True, timeout=30
    ).stdout
    return base64.b64encode(hashlib.sha256(der).digest()).decode()


@pytest.fixture
async def app() -> AsyncIterator[int]:
    async def page(request: web.Request) -> web.StreamResponse:
        return web.Response(text=PAGE, content_type="text/html")

    async def module(request: web.Request) -> web.StreamResponse:
        n = request.match_info["n"]
        return web.Response(text=f"window.loaded = (window.loaded || 0) + 1; // {n}", content_type="text/javascript")

    async def ws(request: web.Request) -> web.StreamResponse:
        s = web.WebSocketResponse()
        await s.prepare(request)
        async for msg in s:
            if msg.type == WSMsgType.TEXT:
                await s.send_str("echo: " + msg.data)
        return s

    a = web.Application()
    a.add_routes([web.get("/", page), web.get("/m{n}.js", module), web.get("/ws", ws)])
    runner = web.AppRunner(a)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield port
    await runner.cleanup()


async def test_chromium_loads_a_page_over_h2_on_the_tls_listener(
    start_gateway: Any, catalog: Catalog, tmp_path: Path, app: int
) -> None:
    cert, key = make_cert(tmp_path, "h2b", "*.sandbox.test")
    catalog.put("web", host="127.0.0.1")
    gw = await start_gateway(listen=["127.0.0.1:0 tls"], domains=["sandbox.test"], tls_certificates=[f"{cert}:{key}"])
    url = f"https://{app}-web.sandbox.test:{gw.port}/"
    h2_streams_seen: list[int] = []

    tunnels: list[str] = []

    async def count(_: str) -> None:
        ctx = gw.gateway.ctx
        h2_streams_seen.append(sum(1 for c in ctx.connections if isinstance(c, H2Connection)))
        tunnels.extend(type(t).__name__ for t in ctx.tunnels)

    out = await browse(
        [
            {"op": "goto", "url": url, "name": "page"},
            {"op": "wait", "js": f"window.loaded === {MODULES}"},
            {"op": "wait", "js": "document.getElementById('ws').textContent !== ''"},
            {"op": "signal", "name": "loaded"},
            {"op": "eval", "name": "protocols", "js": "[performance.getEntriesByType('navigation')[0].nextHopProtocol,"
             " ...performance.getEntriesByType('resource').map((e) => e.nextHopProtocol)]"},
            {"op": "eval", "name": "ws", "js": "document.getElementById('ws').textContent"},
        ],
        on_signal=count,
        resolverRules="MAP *.sandbox.test 127.0.0.1",
        spki=spki(cert),
    )  # fmt: skip
    assert out["steps"]["page"]["status"] == 200
    protocols = out["steps"]["protocols"]
    assert len(protocols) >= 1 + MODULES and set(protocols) == {"h2"}, protocols
    assert out["steps"]["ws"] == "echo: over h2?"
    assert h2_streams_seen == [1]  # the page, its modules and its WebSocket: one connection
    assert tunnels == ["H2Tunnel"]  # the WebSocket is an RFC 8441 stream on it


async def test_chromium_uses_http11_when_http2_is_off(
    start_gateway: Any, catalog: Catalog, tmp_path: Path, app: int
) -> None:
    cert, key = make_cert(tmp_path, "h1b", "*.sandbox.test")
    catalog.put("web", host="127.0.0.1")
    gw = await start_gateway(
        listen=["127.0.0.1:0 tls"], domains=["sandbox.test"], tls_certificates=[f"{cert}:{key}"], http2=False
    )
    out = await browse(
        [
            {"op": "goto", "url": f"https://{app}-web.sandbox.test:{gw.port}/", "name": "page"},
            {"op": "wait", "js": f"window.loaded === {MODULES}"},
            {"op": "wait", "js": "document.getElementById('ws').textContent !== ''"},
            {"op": "eval", "name": "protocols", "js": "performance.getEntriesByType('resource').map((e) => e.nextHopProtocol)"},
        ],
        resolverRules="MAP *.sandbox.test 127.0.0.1",
        spki=spki(cert),
    )  # fmt: skip
    assert set(out["steps"]["protocols"]) == {"http/1.1"}
