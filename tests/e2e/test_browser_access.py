"""Private sandboxes as a person sees them in headless Chromium: an access link becomes a cookie that
opens the page, its WebSocket and EventSource; the cookie stays on its host; a page elsewhere calls a
private sandbox with the token field (CORS preflight) or the token subprotocol. The sandbox's backend
never sees the link parameter, the gateway's cookie or the token."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import WSMsgType, web

from gateway import access
from gateway.catalog import access_link
from tests.conftest import Catalog, free_port
from tests.e2e.browser import browse, browser  # noqa: F401 (the fixture)

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("browser")]
TOKEN = "tok-of-priv"

PAGE = """<!doctype html><title>app</title>
<p id=ws></p><p id=sse></p><p id=who></p>
<script>
const ws = new WebSocket(location.origin.replace("http", "ws") + "/ws");
ws.onopen = () => ws.send("hi");
ws.onmessage = (e) => { document.getElementById("ws").textContent = e.data; };
const es = new EventSource("/sse");
es.onmessage = (e) => { document.getElementById("sse").textContent = e.data; es.close(); };
fetch("/whoami").then((r) => r.text()).then((t) => { document.getElementById("who").textContent = t; });
</script>"""

# A page on another origin that calls a private sandbox: fetch with the token field (a GET, and a PUT
# that needs a preflight), fetch without it, and WebSockets with the token subprotocol.
CORS_PAGE = """<!doctype html><title>elsewhere</title><script>
const q = new URLSearchParams(location.search), target = q.get("target"), token = q.get("token");
const wsTarget = target.replace("http", "ws") + "/ws";
function socket(protocols) {
  return new Promise((resolve) => {
    const ws = new WebSocket(wsTarget, protocols);
    ws.onopen = () => ws.send("hi");
    ws.onmessage = (e) => { resolve({ok: true, data: e.data, protocol: ws.protocol}); ws.close(); };
    ws.onerror = () => resolve({ok: false});
  });
}
async function run() {
  const out = {};
  let r = await fetch(target + "/api?via=get", {headers: {"e2b-traffic-access-token": token}});
  out.get = {status: r.status, body: await r.json()};
  r = await fetch(target + "/api?via=put", {method: "PUT", body: "{}",
    headers: {"e2b-traffic-access-token": token, "content-type": "application/json"}});
  out.put = {status: r.status, body: await r.json()};
  r = await fetch(target + "/api?via=none");
  out.none = {status: r.status, reason: r.headers.get("x-gateway-reason"), body: await r.json()};
  out.wsChat = await socket(["chat", "e2b-token." + token]);
  out.wsAlone = await socket(["e2b-token." + token]);
  return out;
}
run().then((o) => { window.results = o; }, (e) => { window.results = {error: String(e)}; });
</script>"""


@dataclass
class App:
    """A sandbox app: the pages above, a WebSocket echo, SSE; records every request it gets."""

    port: int = 0
    seen: list[dict[str, Any]] = field(default_factory=list)

    def record(self, request: web.Request) -> None:
        self.seen.append({"method": request.method, "path": request.path_qs, "headers": list(request.raw_headers)})

    def cors(self, request: web.Request, resp: web.StreamResponse) -> web.StreamResponse:
        origin = request.headers.get("Origin")
        if origin:  # the app's own CORS policy: any origin may read its API
            resp.headers["Access-Control-Allow-Origin"] = origin
            resp.headers["Access-Control-Allow-Credentials"] = "true"
        return resp

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.record(request)
        path = request.path
        if path == "/":
            resp = web.Response(text=PAGE, content_type="text/html")
            resp.headers["Set-Cookie"] = "app=1; Path=/"
            return resp
        if path == "/plant":  # a hostile tenant's app sets the gateway's cookie for every sandbox
            resp = web.Response(text="planted")
            resp.headers["Set-Cookie"] = f"e2b_access={request.query['v']}; Domain={request.query['d']}; Path=/"
            return resp
        if path == "/cors":
            return web.Response(text=CORS_PAGE, content_type="text/html")
        if path == "/whoami":
            return self.cors(request, web.json_response({"cookie": request.headers.get("Cookie")}))
        if path == "/api":
            if request.method == "OPTIONS":  # never reached for a private sandbox: the gateway answers
                return self.cors(request, web.Response(status=599))
            return self.cors(request, web.json_response({"method": request.method, "path": request.path_qs}))
        if path == "/ws":
            ws = web.WebSocketResponse(protocols=("chat",))
            await ws.prepare(request)
            async for msg in ws:
                if msg.type == WSMsgType.TEXT:
                    await ws.send_str("echo:" + msg.data)
            return ws
        if path == "/sse":
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store"})
            await resp.prepare(request)
            await resp.write(b"data: tick\n\n")
            return resp
        return web.Response(status=404, text="no such page")


@pytest.fixture
async def apps() -> AsyncIterator[Any]:
    runners: list[web.AppRunner] = []

    async def start() -> App:
        app = App()
        wa = web.Application()
        wa.router.add_route("*", "/{tail:.*}", app.handle)
        runner = web.AppRunner(wa, handle_signals=False)
        await runner.setup()
        app.port = free_port()
        await web.TCPSite(runner, "127.0.0.1", app.port).start()
        runners.append(runner)
        return app

    yield start
    for r in runners:
        await r.cleanup()


def blob(app: App) -> str:
    return json.dumps([[s["path"], [[k.decode(), v.decode()] for k, v in s["headers"]]] for s in app.seen])


async def gateway(start_gateway: Any) -> str:
    """A gateway for Chromium; returns its domain with the port."""
    gp = free_port()  # Chromium may try ::1 first for *.localhost: listen on both loopbacks
    gw = await start_gateway(listen=(f"127.0.0.1:{gp}", f"[::1]:{gp}"), domains=("sandbox.localhost",))
    return f"sandbox.localhost:{gw.port}"


async def test_link_opens_page_websocket_and_eventsource(start_gateway: Any, catalog: Catalog, apps: Any) -> None:
    a, b = await apps(), await apps()
    catalog.put("priv", host="127.0.0.1", traffic_access_token=TOKEN)
    catalog.put("pub", host="127.0.0.1")
    catalog.put("other", host="127.0.0.1", traffic_access_token="tok-of-other")
    domain = await gateway(start_gateway)
    origin = f"http://{a.port}-priv.{domain}"
    link = access_link(TOKEN, "priv", a.port, domain, 600, scheme="http", path="/?x=1")
    sneaky = access_link(TOKEN, "priv", a.port, domain, 600, scheme="http", path="//evil.example/x")
    done = "['ws','sse','who'].every((id) => document.getElementById(id).textContent)"
    forged = access.mint("a-guess", access.COOKIE, "priv", a.port, int(time.time()) + 600)
    r = await browse([
        {"op": "goto", "url": link, "name": "open"},
        {"op": "wait", "js": done},
        {"op": "eval", "js": "['ws', 'sse', 'who'].map((id) => document.getElementById(id).textContent)", "name": "page"},
        {"op": "cookies", "name": "cookies"},
        {"op": "goto", "url": f"{origin}/", "name": "again"},  # the cookie, and now the app's cookie too
        {"op": "wait", "js": done},
        {"op": "eval", "js": "document.getElementById('who').textContent", "name": "who"},
        {"op": "goto", "url": f"http://{b.port}-pub.{domain}/whoami", "name": "pub"},
        {"op": "eval", "js": "document.body.textContent", "name": "pub_saw"},
        {"op": "goto", "url": f"http://{a.port}-other.{domain}/", "name": "other"},
        {"op": "goto", "url": sneaky, "name": "sneaky"},
        # Another tenant's app plants a domain cookie of the gateway's name (signed with a guess) with
        # Set-Cookie: the gateway removes the field, the browser never gets it. Its page's script can
        # still plant one (document.cookie, no proxy sees it): the victim's own cookie still opens its
        # sandbox, and neither reaches the app.
        {"op": "goto", "url": f"http://{b.port}-pub.{domain}/plant?d=sandbox.localhost&v={forged}", "name": "plant"},
        {"op": "cookies", "name": "planted"},
        {"op": "eval", "js": f"document.cookie = 'e2b_access={forged}; domain=sandbox.localhost; path=/'", "name": "js"},
        {"op": "cookies", "name": "planted_js"},
        {"op": "goto", "url": f"{origin}/", "name": "after"},
        {"op": "wait", "js": done},
        {"op": "eval", "js": "document.getElementById('who').textContent", "name": "who_after"},
    ])  # fmt: skip
    s = r["steps"]
    assert (s["open"]["status"], s["open"]["url"], s["open"]["redirectedFrom"]) == (200, f"{origin}/?x=1", link)
    assert s["page"][:2] == ["echo:hi", "tick"]  # WebSocket and EventSource went through with the cookie
    assert json.loads(s["page"][2]) == {"cookie": "app=1"}  # the app's own cookie (set by the page), not ours
    assert any(w["url"] == origin.replace("http", "ws") + "/ws" and "echo:hi" in w["received"] for w in r["sockets"])
    ours = [c for c in s["cookies"] if c["name"] == "e2b_access"]
    assert len(ours) == 1
    c = ours[0]
    # Host-only (Playwright shows a domain cookie with a leading dot), HttpOnly, Lax, not Secure over http.
    assert (c["domain"], c["path"], c["httpOnly"], c["sameSite"], c["secure"]) == (
        f"{a.port}-priv.sandbox.localhost",
        "/",
        True,
        "Lax",
        False,
    )
    assert s["again"]["status"] == 200 and json.loads(s["who"]) == {"cookie": "app=1"}  # byte for byte
    assert json.loads(s["pub_saw"]) == {"cookie": None}  # not sent to another sandbox's host
    assert (s["other"]["status"], s["other"]["reason"]) == (403, "traffic_token_missing")  # nor to a private one
    assert s["sneaky"]["url"].startswith(f"{origin}/")  # the redirect never leaves the host
    assert s["plant"]["status"] == 200
    assert [c["domain"] for c in s["planted"] if c["name"] == "e2b_access"] == [f"{a.port}-priv.sandbox.localhost"]
    assert [c["domain"] for c in s["planted_js"] if c["name"] == "e2b_access"] == [
        f"{a.port}-priv.sandbox.localhost",
        ".sandbox.localhost",  # the browser does send both to A
    ]
    assert s["after"]["status"] == 200 and json.loads(s["who_after"]) == {"cookie": "app=1"}
    seen = blob(a)
    assert "e2b_access" not in seen and TOKEN not in seen and "e2b-token" not in seen
    assert any(x["path"] == "/sse" for x in a.seen) and any(x["path"] == "/ws" for x in a.seen)


async def test_a_page_elsewhere_calls_a_private_sandbox(start_gateway: Any, catalog: Catalog, apps: Any) -> None:
    a, b = await apps(), await apps()
    catalog.put("priv", host="127.0.0.1", traffic_access_token=TOKEN)
    catalog.put("pub", host="127.0.0.1")
    domain = await gateway(start_gateway)
    target = f"http://{a.port}-priv.{domain}"
    page = f"http://{b.port}-pub.{domain}/cors?target={target}&token={TOKEN}"
    r = await browse([
        {"op": "goto", "url": page, "name": "page"},
        {"op": "wait", "js": "window.results"},
        {"op": "eval", "js": "window.results", "name": "results"},
    ])  # fmt: skip
    out = r["steps"]["results"]
    assert out["get"] == {"status": 200, "body": {"method": "GET", "path": "/api?via=get"}}
    assert out["put"] == {"status": 200, "body": {"method": "PUT", "path": "/api?via=put"}}  # after a preflight
    assert out["none"]["status"] == 403 and out["none"]["reason"] == "traffic_token_missing"  # readable there
    assert out["wsChat"] == {"ok": True, "data": "echo:hi", "protocol": "chat"}
    # Chromium refuses a handshake answer that selects no subprotocol when it offered some: the token
    # subprotocol alone cannot work from a browser (docs/catalog.md says so), and it was not echoed.
    assert out["wsAlone"] == {"ok": False}
    assert [x["method"] for x in a.seen if x["path"].startswith("/api")] == ["GET", "PUT"]  # no OPTIONS, no 403 one
    seen = blob(a)
    assert TOKEN not in seen and "e2b-token" not in seen
    ws = [x for x in a.seen if x["path"] == "/ws"]
    assert len(ws) == 2
    protocols = [dict((k.lower(), v) for k, v in x["headers"]).get(b"sec-websocket-protocol") for x in ws]
    assert sorted(protocols, key=str) == sorted([b"chat", None], key=str)
