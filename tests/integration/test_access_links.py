"""Private sandboxes for browsers, through a running gateway: signed links exchanged for cookies,
cookies used, the token as a WebSocket subprotocol, CORS preflights; and what the sandbox's
backend sees of all this (nothing)."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve

from gateway import access
from gateway.catalog import CatalogWriter, SandboxRecord, access_link
from tests.conftest import WAIT, Catalog, RedisServer
from tests.h2client import H2Client
from tests.helpers import Client, RawUpstream, Response, echo_handler, request
from tests.integration.test_operations import client_ctx, make_cert, tls_request
from tests.integration.test_writer import cli

TOKEN = "tok-of-priv"


def link(sandbox_id: str, port: int, ttl: int = 600, token: str = TOKEN, path: str = "/") -> str:
    """The path and query of a fresh link (the tests send the Host themselves)."""
    url = access_link(token, sandbox_id, port, "e2b.test", ttl, scheme="http", path=path)
    return url.split("e2b.test", 1)[1]


def cookie_of(r: Response) -> str:
    """The ``name=value`` of the gateway's Set-Cookie."""
    sc = r.header("Set-Cookie")
    assert sc is not None, r.raw
    return sc.split(b";")[0].decode()


async def test_link_is_exchanged_for_a_cookie_that_opens_the_sandbox(start_gateway: Any, catalog: Catalog) -> None:
    async with RawUpstream(echo_handler) as up:
        catalog.put("priv", host="127.0.0.1", traffic_access_token=TOKEN)
        gw = await start_gateway()
        host = gw.host(up.port, "priv")
        c = await Client.connect(gw.port)
        r = await c.request(host, link("priv", up.port, path="/app/page?a=1&b=%2F"), headers={"Cookie": "app=1"})
        assert (r.status, r.header("X-Gateway-Reason")) == (303, b"access_link_accepted")
        assert r.header("Location") == b"/app/page?a=1&b=%2F"  # the other parameters kept, in order
        sc = r.header("Set-Cookie") or b""
        attrs = [a.strip() for a in sc.split(b";")[1:]]
        assert attrs[0] == b"Path=/" and b"HttpOnly" in attrs and b"SameSite=Lax" in attrs
        assert not any(a.lower().startswith(b"domain") for a in attrs)  # host-only
        assert not any(a.lower() == b"secure" for a in attrs)  # plain HTTP from an untrusted peer
        max_age = int(next(a for a in attrs if a.startswith(b"Max-Age=")).split(b"=")[1])
        assert 590 <= max_age <= 600
        assert up.conns == []  # the exchange never reached the sandbox
        app_cookies = 'z=9;  app=1; x="q"'
        r = await c.request(host, "/app/page?a=1&b=%2F", headers={"Cookie": f"{app_cookies}; {cookie_of(r)}"})
        assert r.status == 200
        assert b"GET /app/page?a=1&b=%2F HTTP/1.1\r\n" in r.body
        assert f"\r\nCookie: {app_cookies}\r\n".encode() in r.body  # byte for byte, in order
        assert b"e2b_access" not in up.received and TOKEN.encode() not in up.received
        await c.close()


async def test_link_for_another_port_sandbox_expired_tampered_is_refused(start_gateway: Any, catalog: Catalog) -> None:
    async with RawUpstream(echo_handler) as up:
        catalog.put("priv", host="127.0.0.1", traffic_access_token=TOKEN)
        catalog.put("other", host="127.0.0.1", traffic_access_token="tok-of-other")
        gw = await start_gateway()
        host = gw.host(up.port, "priv")
        now = int(time.time())
        good = access.mint(TOKEN, access.LINK, "priv", up.port, now + 600)
        cases = {
            "expired": access.mint(TOKEN, access.LINK, "priv", up.port, now - 1),
            "another port": access.mint(TOKEN, access.LINK, "priv", up.port + 1, now + 600),
            "another sandbox": access.mint("tok-of-other", access.LINK, "other", up.port, now + 600),
            "altered": good.replace(f".{now + 600}.", f".{now + 6000}."),
            "malformed": "v1.priv",
        }
        for problem, value in cases.items():
            r = await request(gw.port, host, f"/?e2b_access={value}")
            assert (r.status, r.header("X-Gateway-Reason")) == (403, b"traffic_token_invalid"), problem
            doc: Any = r.json()
            assert problem in doc["message"], (problem, doc)
        assert up.conns == []


async def test_bad_cookies_are_403_with_reasons(start_gateway: Any, catalog: Catalog) -> None:
    async with RawUpstream(echo_handler) as up:
        catalog.put("priv", host="127.0.0.1", traffic_access_token=TOKEN)
        gw = await start_gateway()
        host = gw.host(up.port, "priv")
        now = int(time.time())
        cases = {
            "expired": access.mint(TOKEN, access.COOKIE, "priv", up.port, now - 1),
            "another port": access.mint(TOKEN, access.COOKIE, "priv", up.port + 1, now + 600),
            "another sandbox": access.mint(TOKEN, access.COOKIE, "other", up.port, now + 600),
            "altered": access.mint("guess", access.COOKIE, "priv", up.port, now + 600),
            "altered ": access.mint(TOKEN, access.LINK, "priv", up.port, now + 600),  # a link is no cookie
        }
        for problem, value in cases.items():
            r = await request(gw.port, host, headers={"Cookie": f"e2b_access={value}"})
            assert (r.status, r.header("X-Gateway-Reason")) == (403, b"traffic_token_invalid"), problem
            doc: Any = r.json()
            assert problem.strip() in doc["message"] and "new access link" in doc["message"], doc
        good = access.mint(TOKEN, access.COOKIE, "priv", up.port, now + 600)
        r = await request(
            gw.port, host, headers={"Cookie": f"e2b_access={good}", "Origin": "http://3000-evil.e2b.test"}
        )
        assert (r.status, r.header("X-Gateway-Reason")) == (403, b"traffic_token_invalid")  # another tenant's page
        assert up.conns == []
        r = await request(gw.port, host, headers={"Cookie": f"e2b_access={good}", "Origin": f"http://{host}"})
        assert r.status == 200


async def test_rotating_the_token_revokes_cookies(start_gateway: Any, catalog: Catalog) -> None:
    async with RawUpstream(echo_handler) as up:
        catalog.put("rot", host="127.0.0.1", traffic_access_token=TOKEN)
        gw = await start_gateway(cache_ttl=60)  # only the invalidation message can make it see the change
        host = gw.host(up.port, "rot")
        r = await request(gw.port, host, link("rot", up.port))
        cookie = cookie_of(r)
        assert (await request(gw.port, host, headers={"Cookie": cookie})).status == 200
        catalog.put("rot", host="127.0.0.1", traffic_access_token="rotated")  # SET + PUBLISH
        # With a 60 s cache TTL only the invalidation message can end the cookie within WAIT: the
        # cookie is revoked as fast as any record change reaches the gateway (test_invalidation.py).
        async with asyncio.timeout(WAIT):
            while (r := await request(gw.port, host, headers={"Cookie": cookie})).status != 403:
                await asyncio.sleep(0.005)
        assert r.header("X-Gateway-Reason") == b"traffic_token_invalid"
        assert b"token has changed" in r.body
        # The old link is revoked too; a link minted with the new token works.
        assert (await request(gw.port, host, link("rot", up.port))).status == 403
        assert (await request(gw.port, host, link("rot", up.port, token="rotated"))).status == 303


async def test_public_sandboxes_ignore_links_and_cookies(start_gateway: Any, catalog: Catalog) -> None:
    async with RawUpstream(echo_handler) as up:
        catalog.put("pub", host="127.0.0.1")
        gw = await start_gateway()
        path = link("pub", up.port, path="/x?a=1")
        r = await request(gw.port, gw.host(up.port, "pub"), path, headers={"Cookie": "e2b_access=v1.x; a=1"})
        assert r.status == 200  # no redirect: forwarded unchanged
        assert f"GET {path} HTTP/1.1\r\n".encode() in r.body and b"\r\nCookie: e2b_access=v1.x; a=1\r\n" in r.body


async def test_link_on_a_websocket_cookie_and_token_subprotocol(start_gateway: Any, catalog: Catalog) -> None:
    seen: list[tuple[str, Any]] = []

    def process_request(conn: ServerConnection, req: Any) -> None:
        seen.append((req.path, req.headers))

    async def echo(ws: ServerConnection) -> None:
        async for msg in ws:
            await ws.send(msg)

    def select(conn: ServerConnection, offered: Any) -> str | None:
        return "chat" if "chat" in offered else None  # an app that also works without a subprotocol

    async with serve(echo, "127.0.0.1", 0, select_subprotocol=select, process_request=process_request) as server:
        port = server.sockets[0].getsockname()[1]
        catalog.put("wsp", host="127.0.0.1", traffic_access_token=TOKEN)
        gw = await start_gateway()
        host = gw.host(port, "wsp")
        now = int(time.time())
        cookie = access.mint(TOKEN, access.COOKIE, "wsp", port, now + 600)
        ways: list[dict[str, Any]] = [
            {"uri": f"ws://{host}{link('wsp', port, path='/ws?x=1')}"},  # a WebSocket cannot follow a 303
            {"uri": f"ws://{host}/ws?x=1", "additional_headers": {"Cookie": f"a=1; e2b_access={cookie}"}},
            {"uri": f"ws://{host}/ws?x=1", "subprotocols": ["chat", f"e2b-token.{TOKEN}"]},
            {"uri": f"ws://{host}/ws?x=1", "subprotocols": [f"e2b-token.{TOKEN}"]},
        ]
        for way in ways:
            async with connect(host="127.0.0.1", port=gw.port, open_timeout=WAIT, **way) as ws:
                await ws.send("hi")
                assert await ws.recv() == "hi"
                assert ws.subprotocol in (None, "chat")  # never the token: the app never saw it
        assert len(seen) == 4
        for path, headers in seen:
            assert path == "/ws?x=1"
            blob = json.dumps(list(headers.raw_items()))
            assert "e2b_access" not in blob and TOKEN not in blob and "e2b-token" not in blob, blob
        assert seen[1][1]["Cookie"] == "a=1"
        assert seen[2][1]["Sec-WebSocket-Protocol"] == "chat"
        assert "Sec-WebSocket-Protocol" not in seen[3][1]
        with pytest.raises(Exception, match="403"):
            async with connect(f"ws://{host}/ws", host="127.0.0.1", port=gw.port, open_timeout=WAIT,
                               subprotocols=["e2b-token.nope"]):  # fmt: skip
                pass


async def test_preflight_is_answered_for_private_sandboxes_only(start_gateway: Any, catalog: Catalog) -> None:
    async with RawUpstream(echo_handler) as up:
        catalog.put("priv", host="127.0.0.1", traffic_access_token=TOKEN)
        catalog.put("pub", host="127.0.0.1")
        gw = await start_gateway()
        pre = {
            "Origin": "https://app.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type,e2b-traffic-access-token",
        }
        r = await request(gw.port, gw.host(up.port, "priv"), "/api", method="OPTIONS", headers=pre)
        assert (r.status, r.header("X-Gateway-Reason")) == (204, b"cors_preflight")
        assert r.header("Access-Control-Allow-Origin") == b"https://app.example"
        assert r.header("Access-Control-Allow-Methods") == b"POST"
        assert r.header("Access-Control-Allow-Headers") == b"content-type,e2b-traffic-access-token"
        assert r.header("Content-Length") is None and r.body == b""
        assert up.conns == []  # the app never sees a request without the token
        r = await request(gw.port, gw.host(up.port, "pub"), "/api", method="OPTIONS", headers=pre)
        assert r.status == 200 and b"OPTIONS /api HTTP/1.1" in r.body  # a public app answers its own


async def test_secure_cookie_over_tls_or_behind_a_trusted_tls_balancer(
    start_gateway: Any, catalog: Catalog, tmp_path: Path
) -> None:
    async with RawUpstream(echo_handler) as up:
        catalog.put("priv", host="127.0.0.1", traffic_access_token=TOKEN)
        plain = await start_gateway()
        trusting = await start_gateway(trusted_proxies=["127.0.0.1/32"])
        host = plain.host(up.port, "priv")
        xfp = {"X-Forwarded-Proto": "https"}
        r = await request(plain.port, host, link("priv", up.port), headers=xfp)
        assert b"Secure" not in (r.header("Set-Cookie") or b"")  # anyone may claim https
        r = await request(trusting.port, host, link("priv", up.port), headers=xfp)
        assert (r.header("Set-Cookie") or b"").endswith(b"; Secure")
        cert, key = make_cert(tmp_path, "wild", "*.e2b.test")
        tls = await start_gateway(listen=["127.0.0.1:0 tls"], tls_certificates=[f"{cert}:{key}"])
        r, _ = await tls_request(tls.port, client_ctx(cert), host, link("priv", up.port))
        assert r.status == 303 and (r.header("Set-Cookie") or b"").endswith(b"; Secure")


async def test_writer_and_cli_mint_links(start_gateway: Any, catalog: Catalog, redis_server: RedisServer) -> None:
    async with RawUpstream(echo_handler) as up:
        catalog.put("minted", host="127.0.0.1", traffic_access_token=TOKEN)
        catalog.put("open", host="127.0.0.1")
        gw = await start_gateway()
        host = gw.host(up.port, "minted")
        client = aioredis.Redis(host="127.0.0.1", port=redis_server.port)
        w = CatalogWriter(client)
        url = await w.link("minted", up.port, "e2b.test", 60, scheme="http", path="/nb?x=1")
        assert url.startswith(f"http://{host}/nb?x=1&e2b_access=v1.minted.{up.port}.")
        r = await request(gw.port, host, url.split("e2b.test", 1)[1])
        assert (r.status, r.header("Location")) == (303, b"/nb?x=1")
        with pytest.raises(ValueError, match="public"):
            await w.link("open", up.port, "e2b.test")
        with pytest.raises(LookupError):
            await w.link("nosuch", up.port, "e2b.test")
        await client.aclose()
        p = await asyncio.to_thread(cli, redis_server.url, "link", "minted", str(up.port), "--ttl", "120",
                                    "--any-port", "--domain", f"e2b.test:{gw.port}", "--scheme", "http")  # fmt: skip
        assert p.returncode == 0, p.stderr
        doc = json.loads(p.stdout)
        assert doc["url"].startswith(f"http://{host}:{gw.port}/?e2b_access=v1.minted.0.")  # any port
        assert abs(doc["expires"] - (time.time() + 120)) < 30
        r = await request(gw.port, host, doc["url"].split(str(gw.port), 1)[1])
        assert r.status == 303
        p = await asyncio.to_thread(cli, redis_server.url, "link", "open", "3000")
        assert p.returncode == 2 and "public" in p.stderr
        p = await asyncio.to_thread(cli, redis_server.url, "link", "nosuch", "3000")
        assert p.returncode == 1 and "no record" in p.stderr


def test_writer_link_record() -> None:
    """A control plane that has the token mints without Redis; the record type is unchanged."""
    rec = SandboxRecord("10.0.0.1", traffic_access_token="t")
    url = access_link(rec.traffic_access_token or "", "abc", 3000, "e2b.dev", 60, now=1_000)
    assert url == "https://3000-abc.e2b.dev/?e2b_access=" + access.mint("t", access.LINK, "abc", 3000, 1_060)


async def test_parameter_and_cookie_names_are_settings(start_gateway: Any, catalog: Catalog) -> None:
    async with RawUpstream(echo_handler) as up:
        catalog.put("priv", host="127.0.0.1", traffic_access_token=TOKEN)
        gw = await start_gateway(access_link_param="share", access_cookie="gw_pass")
        host = gw.host(up.port, "priv")
        value = access.mint(TOKEN, access.LINK, "priv", up.port, int(time.time()) + 60)
        r = await request(gw.port, host, f"/?e2b_access={value}")
        assert (r.status, r.header("X-Gateway-Reason")) == (403, b"traffic_token_missing")  # not this gateway's
        r = await request(gw.port, host, f"/x?share={value}")
        assert (r.status, r.header("Location")) == (303, b"/x")
        cookie = cookie_of(r)
        assert cookie.startswith("gw_pass=v1.priv.")
        r = await request(gw.port, host, "/x", headers={"Cookie": f"e2b_access=1; {cookie}"})
        assert r.status == 200 and b"\r\nCookie: e2b_access=1\r\n" in r.body  # another name is the app's


# ---- a sandbox may not set the gateway's cookie (headers.py)

#: What a tenant's app answers: the gateway's cookie name in several spellings, among its own.
PLANTING = (
    b"Set-Cookie: app=1; Path=/\r\n"
    b"Set-Cookie: e2b_access=v1.planted.0.9999999999.x; Path=/; Max-Age=99999\r\n"
    b"Set-Cookie:  e2b_access =v1.spaced; Domain=e2b.test; Path=/\r\n"
    b"Set-Cookie: E2b_access=other-name\r\n"
    b"Set-Cookie: e2b_access2=other-name\r\n"
    b"Set-Cookie: app2=2\r\n"
)
KEPT = [b"app=1; Path=/", b"E2b_access=other-name", b"e2b_access2=other-name", b"app2=2"]


async def planting_sandbox(c: Any) -> None:
    """A raw-socket sandbox that tries to set the gateway's cookie on every kind of head."""
    while True:
        head, _ = await c.read_request()
        path = head.split(b" ")[1]
        if path == b"/page":
            c.send(b"HTTP/1.1 200 OK\r\n" + PLANTING + b"Content-Length: 2\r\n\r\nok")
        elif path == b"/hints":
            c.send(b"HTTP/1.1 103 Early Hints\r\n" + PLANTING + b"Link: </s.css>; rel=preload\r\n\r\n")
            c.send(b"HTTP/1.1 200 OK\r\n" + PLANTING + b"Content-Length: 2\r\n\r\nok")
        elif path == b"/ws":
            c.send(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n" + PLANTING
                   + b"Sec-WebSocket-Accept: x\r\n\r\n")  # fmt: skip
            return


async def test_a_sandbox_cannot_set_the_gateways_cookie_over_http11(
    start_gateway: Any, catalog: Catalog, caplog: pytest.LogCaptureFixture
) -> None:
    """Final, 1xx and 101 heads lose the Set-Cookie fields that name the gateway's cookie as a browser
    reads them (`e2b_access=`, ` e2b_access =`); `E2b_access` and `e2b_access2` are other cookies and
    pass, in order, like the app's own. Public and private sandboxes alike; logged at info."""
    async with RawUpstream(planting_sandbox) as up:
        catalog.put("plant", host="127.0.0.1")
        catalog.put("plantp", host="127.0.0.1", traffic_access_token=TOKEN)
        gw = await start_gateway()
        with caplog.at_level("INFO", logger="gateway.headers"):
            for sb, extra in (("plant", {}), ("plantp", {"e2b-traffic-access-token": TOKEN})):
                host = gw.host(up.port, sb)
                c = await Client.connect(gw.port)
                r = await c.request(host, "/page", headers=extra)
                assert r.status == 200 and r.body == b"ok" and r.all("Set-Cookie") == KEPT, r.raw
                c.send(f"GET /hints HTTP/1.1\r\nHost: {host}\r\n".encode() + b"".join(
                    f"{k}: {v}\r\n".encode() for k, v in extra.items()) + b"\r\n")  # fmt: skip
                hints = await c.read_response(interim=True)
                assert hints.status == 103 and hints.all("Set-Cookie") == KEPT, hints.raw
                final = await c.read_response()
                assert final.status == 200 and final.all("Set-Cookie") == KEPT, final.raw
                c.send(f"GET /ws HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n".encode()
                       + b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
                       + b"".join(f"{k}: {v}\r\n".encode() for k, v in extra.items()) + b"\r\n")  # fmt: skip
                ws = await c.read_response()
                assert ws.status == 101 and ws.all("Set-Cookie") == KEPT, ws.raw
                assert b"planted" not in ws.raw + final.raw + hints.raw + r.raw and b"spaced" not in r.raw
                await c.close()
    removed = [r.getMessage() for r in caplog.records if r.name == "gateway.headers"]
    assert removed and all(
        "removed 2 Set-Cookie field(s) for the gateway's own cookie 'e2b_access'" in m for m in removed
    )
    assert {m.rsplit(" ", 2)[1] for m in removed} == {"200", "103", "101"}


async def test_a_sandbox_cannot_set_the_gateways_cookie_over_http2(start_gateway: Any, catalog: Catalog) -> None:
    """The same over HTTP/2: the final and 103 HEADERS, and the 200 of an RFC 8441 WebSocket."""
    async with RawUpstream(planting_sandbox) as up:
        catalog.put("planth2", host="127.0.0.1")
        gw = await start_gateway()
        host = gw.host(up.port, "planth2")
        c = await H2Client.connect(gw.port)
        r = await c.request(host, "/page")
        assert r.status == 200 and bytes(r.body) == b"ok" and r.all(b"set-cookie") == KEPT, r.headers
        r = await c.request(host, "/hints")
        assert [v for n, v in r.interim[0] if n == b"set-cookie"] == KEPT, r.interim
        assert r.status == 200 and r.all(b"set-cookie") == KEPT, r.headers
        sid = c.start(host, "/ws", method="CONNECT", extra_pseudo=[(":protocol", "websocket")],
                      headers=[("sec-websocket-version", "13")], end=False)  # fmt: skip
        async with asyncio.timeout(WAIT):
            await c.responses[sid].head.wait()
        ws = c.responses[sid]
        assert ws.status == 200 and ws.all(b"set-cookie") == KEPT, ws.headers
        c.close()


async def test_the_removed_cookie_name_is_the_setting(start_gateway: Any, catalog: Catalog) -> None:
    """With ``access_cookie = "gw_pass"``, that name is removed and ``e2b_access`` is an app's cookie."""

    async def sandbox(c: Any) -> None:
        await c.read_request()
        c.send(b"HTTP/1.1 200 OK\r\nSet-Cookie: e2b_access=1\r\nSet-Cookie: gw_pass =2\r\nContent-Length: 0\r\n\r\n")

    async with RawUpstream(sandbox) as up:
        catalog.put("plantn", host="127.0.0.1")
        gw = await start_gateway(access_cookie="gw_pass")
        r = await request(gw.port, gw.host(up.port, "plantn"), "/")
        assert r.status == 200 and r.all("Set-Cookie") == [b"e2b_access=1"]
