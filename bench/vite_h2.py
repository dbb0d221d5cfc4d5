"""A Vite dev server's page of hundreds of unbundled modules, loaded by headless Chromium through the
gateway's TLS listener: over HTTP/1.1 (``http2 = false``: ALPN offers http/1.1 only) and over HTTP/2.
A measuring tool, not a test.

    .venv/bin/python bench/vite_h2.py [--modules 300] [--rounds 5]

Each load is a fresh browser (cold cache, new connections). The page's main module imports 10 group
modules, each of which imports its share of the leaves: two levels of waterfall, as an app's
``main.js`` -> components -> utilities. Printed per protocol: the median time from navigation start
to every module executed, to the load event, the gateway's CPU per page load and the connections the
browser opened. Needs what the Vite e2e tests need (`make peers`: node >= 20.19, vite, playwright-core,
Chromium) and redis-server, openssl.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import uvloop

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gateway.config import load_config  # noqa: E402
from gateway.http.downstream import ClientConnection  # noqa: E402
from gateway.http.http2 import H2Connection  # noqa: E402
from gateway.server import Gateway  # noqa: E402
from tests.e2e.browser import browse  # noqa: E402
from tests.e2e.test_http2_browser import spki  # noqa: E402
from tests.integration.test_operations import make_cert  # noqa: E402

APP = ROOT / "tests" / "e2e" / "vite-app"
GROUPS = 10


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_app(d: Path, modules: int) -> Path:
    app = d / "app"
    (app / "src").mkdir(parents=True)
    shutil.copy(APP / "vite.config.mjs", app)
    shutil.copy(APP / "package.json", app)
    (app / "node_modules").symlink_to(APP / "node_modules")
    (app / "index.html").write_text(
        '<!doctype html><title>many modules</title><script type="module" src="/src/main.js"></script>'
    )
    per = modules // GROUPS
    for g in range(GROUPS):
        leaves = range(g * per, (g + 1) * per)
        for i in leaves:
            (app / "src" / f"m{i}.js").write_text(f"export const v{i} = {i};\n")
        imports = "".join(f'import {{ v{i} }} from "./m{i}.js";\n' for i in leaves)
        (app / "src" / f"g{g}.js").write_text(
            imports + f"export const g{g} = [{', '.join(f'v{i}' for i in leaves)}].length;\n"
        )
    main = "".join(f'import {{ g{g} }} from "./g{g}.js";\n' for g in range(GROUPS))
    main += f"window.modules = {' + '.join(f'g{g}' for g in range(GROUPS))};\nwindow.doneAt = performance.now();\n"
    (app / "src" / "main.js").write_text(main)
    return app


def wait_port(port: int) -> None:
    for _ in range(400):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    sys.exit(f"nothing listens on {port}")


async def load(gw_port: int, vite_port: int, key: str, modules: int, gw: Gateway) -> dict[str, float]:
    seen: set[int] = set()

    async def count(_: str) -> None:
        seen.update(id(c) for c in gw.ctx.connections if isinstance(c, (ClientConnection, H2Connection)))

    cpu0 = time.process_time()
    out = await browse(
        [
            {"op": "goto", "url": f"https://{vite_port}-vite.sandbox.test:{gw_port}/", "name": "page"},
            {"op": "wait", "js": f"window.modules === {modules}", "timeout": 60000},
            {"op": "signal", "name": "loaded"},
            {"op": "eval", "name": "t", "js": "[window.doneAt, performance.getEntriesByType('navigation')[0].loadEventEnd,"
             " performance.getEntriesByType('navigation')[0].nextHopProtocol,"
             " performance.getEntriesByType('resource').length]"},
        ],
        on_signal=count, resolverRules="MAP *.sandbox.test 127.0.0.1", spki=key, timeout=60000, limit=180,
    )  # fmt: skip
    cpu = time.process_time() - cpu0
    done, loaded, proto, resources = out["steps"]["t"]
    return {"done": done, "load": loaded, "proto": proto, "resources": resources, "cpu": cpu, "conns": len(seen)}


async def main(modules: int, rounds: int) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="vite-h2-"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        rport = free_port()
        redis = shutil.which("redis-server") or sys.exit("redis-server is needed")
        procs.append(subprocess.Popen([redis, "--port", str(rport), "--save", "", "--appendonly", "no", "--dir", str(tmp)],
                                      stdout=subprocess.DEVNULL))  # fmt: skip
        app = make_app(tmp, modules)
        vport = free_port()
        procs.append(subprocess.Popen(
            ["node", "node_modules/vite/bin/vite.js", "--host", "127.0.0.1", "--port", str(vport), "--strictPort"],
            cwd=app, env={**os.environ, "VITE_ALLOWED_HOSTS": ".sandbox.test"},
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        ))  # fmt: skip
        wait_port(vport)
        wait_port(rport)
        subprocess.run(["redis-cli", "-p", str(rport), "set", "sandbox:catalog:vite", json.dumps({"host": "127.0.0.1"})],
                       check=True, stdout=subprocess.DEVNULL)  # fmt: skip
        cert, key = make_cert(tmp, "vite", "*.sandbox.test")
        pin = spki(cert)
        results: dict[str, list[dict[str, float]]] = {"http/1.1": [], "h2": []}
        for r in range(rounds + 1):  # the first round warms Vite's transform cache: not counted
            for http2 in (False, True) if r % 2 else (True, False):
                g = Gateway(load_config(None, env={}, overrides={
                    "listen": ("127.0.0.1:0 tls",), "admin_listen": "127.0.0.1:0", "redis_url": f"redis://127.0.0.1:{rport}/0",
                    "domains": ("sandbox.test",), "tls_certificates": (f"{cert}:{key}",), "http2": http2,
                    "access_log": "off", "drain_delay": 0.0,
                }))  # fmt: skip
                await g.start()
                try:
                    got = await load(g.ports[0], vport, pin, modules, g)
                finally:
                    await g.stop()
                if r:
                    results["h2" if http2 else "http/1.1"].append(got)
        print(
            f"{modules} modules in {GROUPS} groups, {rounds} rounds, fresh Chromium each load, through the TLS listener"
        )
        print(
            "| protocol | all modules run, ms (median) | load event, ms | gateway CPU per page, ms | connections | resources |"
        )
        print("|---|---:|---:|---:|---:|---:|")
        for proto, rs in results.items():
            assert all(x["proto"] == proto for x in rs), [x["proto"] for x in rs]
            print(f"| {proto} | {statistics.median(x['done'] for x in rs):.0f} | {statistics.median(x['load'] for x in rs):.0f} "
                  f"| {statistics.median(x['cpu'] for x in rs) * 1000:.0f} | {max(x['conns'] for x in rs):.0f} "
                  f"| {statistics.median(x['resources'] for x in rs):.0f} |")  # fmt: skip
    finally:
        for p in procs:
            p.terminate()
            p.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modules", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    uvloop.run(main(a.modules, a.rounds))
