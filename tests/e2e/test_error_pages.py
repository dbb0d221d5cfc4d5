"""The gateway's own pages as a person sees them in headless Chromium (phone-sized): a plain title,
what happened and what to do, status and reason still there for tools, a reload where waiting helps
(and the app once it is back), no icon request and no second page for /favicon.ico. Screenshots go
to $GATEWAY_SCREENSHOTS (else the test's temp dir)."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

from gateway import access
from tests.conftest import WAIT, Catalog, free_port
from tests.e2e.browser import browse, browser  # noqa: F401 (the fixture)
from tests.helpers import RawUpstream, UpstreamConn, response

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("browser")]

LOOK = """({title: document.title, h1: document.querySelector("h1")?.textContent ?? null,
  text: document.body.innerText, refresh: document.querySelector("meta[http-equiv=refresh]")?.content ?? null,
  icon: document.querySelector("link[rel=icon]")?.getAttribute("href") ?? null,
  fits: document.documentElement.scrollWidth <= window.innerWidth})"""


async def app(c: UpstreamConn) -> None:
    while True:
        await c.read_request()
        c.send(response(200, b"<!doctype html><title>app</title><p>the app", {"Content-Type": "text/html"}))


async def test_error_pages_in_chromium(start_gateway: Any, catalog: Catalog, tmp_path: Path) -> None:
    shots = Path(os.environ.get("GATEWAY_SCREENSHOTS") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    async with RawUpstream(app) as up:
        closed = free_port()  # nothing listens there
        catalog.put("paused", host="127.0.0.1", state="paused")
        catalog.put("boot", host="127.0.0.1", state="starting")
        catalog.put("priv", host="127.0.0.1", traffic_access_token="t")
        catalog.put("idle", host="127.0.0.1")
        gp = free_port()
        log = tmp_path / "access.log"
        gw = await start_gateway(
            listen=(f"127.0.0.1:{gp}", f"[::1]:{gp}"), domains=("sandbox.localhost",), access_log=str(log)
        )
        d = f"sandbox.localhost:{gw.port}"
        expired = access.mint("t", access.LINK, "priv", up.port, int(time.time()) - 1)
        pages = {
            # name: (url, status, reason, title, text that must be there, refresh)
            "not_found": (f"http://3000-nosuch.{d}/", 502, "sandbox_not_found", "Sandbox not found",
                          "no running sandbox with this ID", None),
            "paused": (f"http://{up.port}-paused.{d}/", 409, "sandbox_paused", "Sandbox is paused", "resume", "10"),
            "invalid_host": (f"http://nolabel.{d}/", 400, "invalid_host", "Not a sandbox address",
                             f"http://{{port}}-{{sandboxId}}.sandbox.localhost:{gw.port}/", None),
            "bare": (f"http://127.0.0.1:{gw.port}/", 400, "missing_routing_header", "No sandbox at this address",
                     f"http://{{port}}-{{sandboxId}}.sandbox.localhost:{gw.port}/", None),
            "private": (f"http://{up.port}-priv.{d}/", 403, "traffic_token_missing", "This sandbox is private",
                        "?e2b_access=", None),
            "expired": (f"http://{up.port}-priv.{d}/?e2b_access={expired}", 403, "traffic_token_invalid",
                        "Access link expired", "The access link has expired.", None),
            "port_not_open": (f"http://{closed}-idle.{d}/", 502, "port_not_open", f"Port {closed} is not open yet",
                              "nothing listens on port", "3"),
        }  # fmt: skip
        steps: list[dict[str, Any]] = [
            {"op": "goto", "url": "about:blank", "name": "blank"},
            {"op": "screenshot", "path": str(shots / "blank.png"), "name": "blank_png"},
        ]
        for name, (url, *_) in pages.items():
            steps += [
                {"op": "goto", "url": url, "name": name},
                {"op": "eval", "js": LOOK, "name": name + "_look"},
                {"op": "screenshot", "path": str(shots / f"{name}.png"), "name": name + "_png"},
            ]
        # Waiting helps: the starting page reloads itself and becomes the app once the sandbox runs.
        steps += [
            {"op": "goto", "url": f"http://{up.port}-boot.{d}/", "name": "starting"},
            {"op": "eval", "js": LOOK, "name": "starting_look"},
            {"op": "screenshot", "path": str(shots / "starting.png"), "name": "starting_png"},
            {"op": "signal", "name": "run it"},
            {"op": "wait", "js": "document.title === 'app'", "timeout": 30000},
            {"op": "eval", "js": LOOK, "name": "started_look"},
            # An icon fetch the gateway would answer with an error page is an empty 404 instead.
            {"op": "goto", "url": f"http://3000-nosuch.{d}/", "name": "for_icon"},
            {"op": "eval", "name": "favicon", "js": """fetch("/favicon.ico").then(async (r) =>
                [r.status, r.headers.get("x-gateway-reason"), r.headers.get("content-length"), (await r.text())])"""},
        ]  # fmt: skip

        async def on_signal(name: str) -> None:
            catalog.put("boot", host="127.0.0.1")  # running (and announced)

        r = await browse(steps, on_signal, viewport={"width": 390, "height": 844})
        # What reached the gateway (the browser's own icon fetches do not show in its request events).
        # The app's page names no icon, so Chromium fetches /favicon.ico from the app: proof that it
        # would fetch one for an error page too, if the page did not declare its empty icon.
        deadline = time.monotonic() + WAIT
        while True:
            lines = [json.loads(x) for x in log.read_text().splitlines()] if log.exists() else []
            icons = sorted((x["host"].split(".")[0], x["reason"]) for x in lines if x["path"] == "/favicon.ico")
            if ("3000-nosuch", "sandbox_not_found") in icons and (f"{up.port}-boot", "sandbox") in icons:
                break
            if time.monotonic() > deadline:
                break  # the assertion below says what is missing
            await asyncio.sleep(0.05)  # the access log is flushed once a second
    s = r["steps"]
    for name, (_, status, reason, title, text, refresh) in pages.items():
        look = s[name + "_look"]
        assert (s[name]["status"], s[name]["reason"]) == (status, reason), name
        assert look["title"] == look["h1"] == title, (name, look)
        assert text in look["text"], (name, look["text"])
        assert f"HTTP {status} · reason {reason}" in look["text"], name  # still there for tools
        assert look["refresh"] == refresh, name
        assert look["icon"] == "data:,", name  # so the browser asks for no /favicon.ico
        assert look["fits"], f"{name} scrolls sideways on a phone"
        assert s[name + "_png"] > s["blank_png"] + 2000, name  # the screenshot shows a rendered page
    assert "both the sandbox ID and port fields" not in s["bare_look"]["text"]
    starting = s["starting_look"]
    assert (s["starting"]["status"], starting["title"], starting["refresh"]) == (409, "Starting…", "2")
    assert "The sandbox is starting." in starting["text"]
    assert s["started_look"]["title"] == "app" and "the app" in s["started_look"]["text"]
    assert s["favicon"] == [404, "sandbox_not_found", "0", ""]
    assert icons == [("3000-nosuch", "sandbox_not_found"), (f"{up.port}-boot", "sandbox")], icons
    assert not [m for m in r["console"] if "favicon" in m["text"].lower()], r["console"]
