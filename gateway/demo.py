"""The demo sandbox app for embedded mode: one page and one JSON endpoint.

The page calls the JSON endpoint through the gateway and shows what the sandbox received, so a
first-time user sees the forwarding headers the gateway adds.
"""

from __future__ import annotations

import time

from aiohttp import web

__all__ = ["demo_app"]

_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>gateway demo sandbox</title>
<style>
body{font:16px/1.5 system-ui,sans-serif;max-width:44rem;margin:3rem auto;padding:0 1rem;color:#222}
pre{background:#f5f5f5;padding:1rem;overflow:auto}
</style>
</head>
<body>
<h1>Hello from sandbox <code>demo</code></h1>
<p>This page is served by a small app on port <code>{port}</code>, reached through the gateway at
<code id="host"></code>.</p>
<p>What the app received (from <a href="/api/info">/api/info</a>):</p>
<pre id="info">loading...</pre>
<script>
document.getElementById("host").textContent = location.host;
fetch("/api/info").then(r => r.json()).then(j => {
  document.getElementById("info").textContent = JSON.stringify(j, null, 2);
});
</script>
</body>
</html>
"""


async def _page(request: web.Request) -> web.Response:
    port = request.transport.get_extra_info("sockname")[1] if request.transport else "?"
    return web.Response(text=_PAGE.replace("{port}", str(port)), content_type="text/html")


async def _info(request: web.Request) -> web.Response:
    return web.json_response(
        {
            "sandbox": "demo",
            "time": time.time(),
            "method": request.method,
            "path": request.path_qs,
            "headers": dict(request.headers),
        }
    )


def demo_app() -> web.Application:
    app = web.Application()
    app.router.add_get("/", _page)
    app.router.add_get("/api/info", _info)
    return app
