"""WebSocket conformance with Autobahn|Testsuite: the gateway changes no case's outcome.

Each mode runs the suite twice, directly and through the gateway, and compares every case's class
(pass: OK, NON-STRICT, INFORMATIONAL; anything else fails). Groups 9 (big messages), 12 and 13
(compression) take minutes; they run with GATEWAY_AUTOBAHN_ALL=1 (`make conformance`).

wstest needs Python 2.7 (`$(pyenv root)/versions/2.7.18`) and autobahntestsuite 0.8.2 installed
with PYTHONUSERBASE=~/.cache/gateway-wstest (`make peers` and .ci/run do it); names under
sandbox.localhost need libnss-myhostname.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
from pathlib import Path
from typing import Any

import pytest
import websockets
from websockets.asyncio.client import connect
from websockets.asyncio.server import serve

from tests import needs
from tests.conftest import ROOT, Catalog

USERBASE = Path(os.environ.get("GATEWAY_WSTEST_HOME", Path.home() / ".cache" / "gateway-wstest"))
WSTEST = USERBASE / "bin" / "wstest"
PY27 = WSTEST.read_text().splitlines()[0][2:] if WSTEST.exists() else ""
ALL = os.environ.get("GATEWAY_AUTOBAHN_ALL") == "1"
EXCLUDE = [] if ALL else ["9.*", "12.*", "13.*"]
PASS = {"OK", "NON-STRICT", "INFORMATIONAL"}
DOMAIN = "sandbox.localhost"

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def peers() -> None:
    """wstest (Python 2.7) and names under sandbox.localhost: or say which is missing."""
    if not WSTEST.exists():
        needs.missing(f"Autobahn wstest at {WSTEST}", "make peers (with Python 2.7: pyenv install 2.7.18)")
    if not resolvable():
        needs.missing(f"a resolver for *.{DOMAIN}", "apt-get install libnss-myhostname")


def resolvable() -> bool:
    try:
        return bool(socket.getaddrinfo(f"1-x.{DOMAIN}", 80, socket.AF_INET))
    except OSError:
        return False


def classes(index: dict[str, Any], agent: str) -> dict[str, str]:
    return {case: "pass" if r["behavior"] in PASS else r["behavior"] for case, r in index[agent].items()}


async def echo_handler(ws: Any) -> None:
    try:
        async for msg in ws:
            await ws.send(msg)
    except websockets.ConnectionClosed:
        pass


async def run_wstest(*args: str, cwd: Path, timeout: float) -> None:
    env = {**os.environ, "PYTHONUSERBASE": str(USERBASE)}
    proc = await asyncio.create_subprocess_exec(*args, cwd=cwd, env=env, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.STDOUT)  # fmt: skip
    try:
        async with asyncio.timeout(timeout):
            out, _ = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, out.decode(errors="replace")[-3000:]


async def test_fuzzingclient_direct_and_through_the_gateway(
    start_gateway: Any, catalog: Catalog, tmp_path: Path
) -> None:
    async with serve(echo_handler, "127.0.0.1", 0, max_size=None, compression="deflate") as server:
        port = server.sockets[0].getsockname()[1]
        catalog.put("abc", host="127.0.0.1")
        gw = await start_gateway(domains=(DOMAIN,))
        spec = {
            "outdir": str(tmp_path / "reports"),
            "servers": [
                {"agent": "direct", "url": f"ws://127.0.0.1:{port}"},
                {"agent": "via-gateway", "url": f"ws://{port}-abc.{DOMAIN}:{gw.port}"},
            ],
            "cases": ["*"],
            "exclude-cases": EXCLUDE,
            "exclude-agent-cases": {},
        }
        (tmp_path / "spec.json").write_text(json.dumps(spec))
        await run_wstest(str(WSTEST), "-m", "fuzzingclient", "-s", "spec.json", cwd=tmp_path, timeout=1800)
        index = json.loads((tmp_path / "reports" / "index.json").read_text())
    direct, gateway = classes(index, "direct"), classes(index, "via-gateway")
    assert len(direct) > 200 and direct.keys() == gateway.keys()
    differ = {c: (direct[c], gateway[c]) for c in direct if direct[c] != gateway[c]}
    assert not differ, f"cases whose outcome the gateway changes: {differ}"


async def play_cases(base: str, agent: str, host: str, port: int) -> None:
    """An Autobahn client testee: echo every case the fuzzing server plays."""
    kw: dict[str, Any] = {"host": host, "port": port, "max_size": None, "open_timeout": 10, "close_timeout": 2}
    async with connect(f"{base}/getCaseCount", **kw) as ws:
        count = int(await ws.recv())
    for case in range(1, count + 1):
        try:
            async with connect(f"{base}/runCase?case={case}&agent={agent}", **kw) as ws:
                async for msg in ws:
                    await ws.send(msg)
        except (TimeoutError, websockets.WebSocketException, OSError):
            pass
    async with connect(f"{base}/updateReports?agent={agent}", **kw):
        pass


async def test_fuzzingserver_as_the_sandbox(start_gateway: Any, catalog: Catalog, tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    spec = {"url": f"ws://127.0.0.1:{port}", "outdir": str(tmp_path / "reports"), "cases": ["*"],
            "exclude-cases": EXCLUDE, "exclude-agent-cases": {}}  # fmt: skip
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    env = {**os.environ, "PYTHONUSERBASE": str(USERBASE)}
    server = await asyncio.create_subprocess_exec(
        PY27, str(ROOT / "tests" / "peers" / "fuzzingserver.py"), "spec.json", cwd=tmp_path, env=env,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        async with asyncio.timeout(30):
            while True:
                try:
                    _, w = await asyncio.open_connection("127.0.0.1", port)
                    w.close()
                    break
                except OSError:
                    await asyncio.sleep(0.1)
        catalog.put("fuzz", host="127.0.0.1")
        gw = await start_gateway()
        async with asyncio.timeout(1800):
            await play_cases(f"ws://127.0.0.1:{port}", "direct", "127.0.0.1", port)
            await play_cases(f"ws://{gw.host(port, 'fuzz')}", "via-gateway", "127.0.0.1", gw.port)
        index = json.loads((tmp_path / "reports" / "index.json").read_text())
    finally:
        server.kill()
        await server.wait()
    direct, gateway = classes(index, "direct"), classes(index, "via-gateway")
    assert len(direct) > 200 and direct.keys() == gateway.keys()
    differ = {c: (direct[c], gateway[c]) for c in direct if direct[c] != gateway[c]}
    assert not differ, f"cases whose outcome the gateway changes: {differ}"
