"""HTTP/2 from clients: h2c with prior knowledge on the plain listener (curl, h2load, a raw h2 client),
many sandboxes on one connection, the RFC 9113 §8.3 mapping both ways, the gateway's own answers."""

from __future__ import annotations

import asyncio
import json
import subprocess
from typing import Any

import h2.errors

from tests import needs
from tests.conftest import WAIT, Catalog, RunningGateway
from tests.h2client import H2Client
from tests.helpers import Client, RawUpstream, UpstreamConn, echo_handler, response


async def test_h2c_prior_knowledge_and_http11_share_the_port(start_gateway: Any, catalog: Catalog) -> None:
    """A connection that starts with the preface is HTTP/2, any other HTTP/1.1, on the same port."""
    async with RawUpstream(echo_handler) as up:
        catalog.put("h2a", host="127.0.0.1")
        gw: RunningGateway = await start_gateway()
        host = gw.host(up.port, "h2a")
        c = await H2Client.connect(gw.port)
        r = await c.request(host, "/x?y=1", headers=[("user-agent", "t/1")])
        assert r.status == 200 and r.reset is None
        assert r.body.startswith(b"GET /x?y=1 HTTP/1.1\r\n")  # the echo upstream's first line
        assert r.header(b"x-request-id") is not None
        c.close()
        h1 = await Client.connect(gw.port)
        r1 = await h1.request(host, "/")
        assert r1.status == 200
        await h1.close()


async def test_curl_http2_prior_knowledge(start_gateway: Any, catalog: Catalog) -> None:
    curl = needs.tool("curl", "apt-get install curl")
    async with RawUpstream(echo_handler) as up:
        catalog.put("h2b", host="127.0.0.1")
        gw = await start_gateway()
        host = gw.host(up.port, "h2b")
        out = await asyncio.to_thread(
            subprocess.run,
            [curl, "-sS", "--http2-prior-knowledge", "-o", "-", "-w", "\n%{http_version} %{http_code}",
             "-H", f"Host: {host}", "-d", "hello", f"http://127.0.0.1:{gw.port}/post"],
            capture_output=True, timeout=WAIT, check=False,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        assert out.stdout.endswith(b"\n2 200"), out.stdout[-200:]
        assert b"POST /post HTTP/1.1\r\n" in out.stdout
        assert out.stdout.endswith(b"\nbody=5\n2 200")  # the echo: the head, then the body length


async def test_upgrade_h2c_from_http11_stays_refused(start_gateway: Any, catalog: Catalog) -> None:
    """``Upgrade: h2c`` is a known smuggling path through proxies: the request goes on as plain
    HTTP/1.1 without it, and the connection stays HTTP/1.1."""
    async with RawUpstream(echo_handler) as up:
        catalog.put("h2c", host="127.0.0.1")
        gw = await start_gateway()
        host = gw.host(up.port, "h2c")
        c = await Client.connect(gw.port)
        c.send(
            f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
            "HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n".encode()
        )
        r = await c.read_response()
        assert r.status == 200  # not 101
        assert b"upgrade" not in up.received.lower() and b"http2-settings" not in up.received.lower()
        r = await c.request(host, "/again")  # still HTTP/1.1
        assert r.status == 200
        await c.close()


async def test_http2_can_be_turned_off(start_gateway: Any, catalog: Catalog) -> None:
    async with RawUpstream(echo_handler) as up:
        catalog.put("h2off", host="127.0.0.1")
        gw = await start_gateway(http2=False)
        c = await H2Client.connect(gw.port)
        await c.closed()
        assert not c.responses and c.received > 0  # an HTTP/1.1 400, not HTTP/2 frames
        del up
