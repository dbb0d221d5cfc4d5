"""Jupyter Server with ipykernel behind the gateway: REST with a token, a kernel over WebSocket."""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import WAIT, Catalog, free_port
from tests.e2e.browser import browse, require_browser

pytestmark = pytest.mark.slow
TOKEN = "gateway-test-token"


@pytest.fixture
def jupyter(tmp_path: Path) -> Iterator[int]:
    port = free_port()
    env = {**os.environ}
    for name in ("CONFIG", "DATA", "RUNTIME"):
        (tmp_path / name.lower()).mkdir()
        env[f"JUPYTER_{name}_DIR"] = str(tmp_path / name.lower())
    env["IPYTHONDIR"] = str(tmp_path / "ipython")
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyter_server", "--allow-root", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
         f"--IdentityProvider.token={TOKEN}", "--ServerApp.allow_remote_access=True", f"--ServerApp.root_dir={tmp_path}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(WAIT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(WAIT)


def message(session: str, code: str) -> dict[str, Any]:
    msg_id = uuid.uuid4().hex
    return {
        "header": {"msg_id": msg_id, "username": "test", "session": session, "msg_type": "execute_request",
                   "version": "5.3", "date": datetime.datetime.now(datetime.UTC).isoformat()},
        "parent_header": {}, "metadata": {}, "channel": "shell", "buffers": [],
        "content": {"code": code, "silent": False, "store_history": True, "user_expressions": {},
                    "allow_stdin": False, "stop_on_error": True},
    }  # fmt: skip


async def test_kernel_executes_through_the_gateway(start_gateway: Any, catalog: Catalog, jupyter: int) -> None:
    catalog.put("notebook", host="127.0.0.1")
    gw = await start_gateway()
    host = gw.host(jupyter, "notebook")
    base = f"http://127.0.0.1:{gw.port}"
    headers = {"Host": host, "Authorization": f"token {TOKEN}"}
    async with aiohttp.ClientSession() as s:
        async with asyncio.timeout(WAIT * 3):  # Jupyter starting: the gateway says port_not_open meanwhile
            while True:
                async with s.get(f"{base}/api/status", headers=headers) as r:
                    if r.status == 200:
                        break
                    assert r.headers.get("X-Gateway-Reason") == "port_not_open"
                await asyncio.sleep(0.1)
        async with s.post(f"{base}/api/kernels", headers=headers, json={"name": "python3"}) as r:
            assert r.status == 201, await r.text()
            kernel = (await r.json())["id"]
        session = uuid.uuid4().hex
        ws_url = f"{base}/api/kernels/{kernel}/channels?token={TOKEN}&session_id={session}"
        async with s.ws_connect(ws_url, headers={"Host": host, "Origin": f"http://{host}"}) as ws:
            request = message(session, "1+1")
            await ws.send_str(json.dumps(request))
            result = None
            async with asyncio.timeout(WAIT * 6):
                async for msg in ws:
                    doc = json.loads(msg.data)
                    if doc["parent_header"].get("msg_id") != request["header"]["msg_id"]:
                        continue
                    if doc["msg_type"] == "execute_result":
                        result = doc["content"]["data"]["text/plain"]
                        break
                    assert doc["msg_type"] != "error", doc["content"]
        assert result == "2"
        async with s.delete(f"{base}/api/kernels/{kernel}", headers=headers) as r:
            assert r.status == 204


@pytest.fixture
def jupyterlab(tmp_path: Path) -> Iterator[int]:
    """JupyterLab (the whole web app: notebooks, terminals) on a free port; its JS API is exposed
    in the page (``window.jupyterapp``) so the browser test drives it as the UI would."""
    port = free_port()
    env = {**os.environ, "IPYTHONDIR": str(tmp_path / "ipython"), "SHELL": "/bin/sh"}
    for name in ("CONFIG", "DATA", "RUNTIME"):
        (tmp_path / name.lower()).mkdir()
        env[f"JUPYTER_{name}_DIR"] = str(tmp_path / name.lower())
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--allow-root", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
         f"--IdentityProvider.token={TOKEN}", f"--ServerApp.root_dir={tmp_path}", "--LabApp.expose_app_in_browser=True",
         "--LabApp.news_url=", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(WAIT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(WAIT)


# Runs in the page: a notebook with one cell, run on a kernel; a terminal with one command. Both go
# over WebSockets that Jupyter refuses when Origin and Host disagree.
LAB = """async () => {
  const app = window.jupyterapp;
  await app.started; await app.restored;
  const nb = await app.commands.execute("notebook:create-new", {kernelName: "python3"});
  await nb.context.ready; await nb.sessionContext.ready;
  nb.content.activeCell.model.sharedModel.setSource("6 * 7");
  await app.commands.execute("notebook:run-cell");
  const term = await app.commands.execute("terminal:create-new");
  await term.content.ready;
  window.terminalOutput = "";
  term.content.session.messageReceived.connect((_, msg) => {
    if (msg.type === "stdout") window.terminalOutput += msg.content[0];
  });
  term.content.session.send({type: "stdin", content: ["echo $((6*7))x\\r"]});
  return true;
}"""


async def test_jupyterlab_notebook_and_terminal_with_mask_in_chromium(
    start_gateway: Any, catalog: Catalog, jupyterlab: int
) -> None:
    """With mask_request_host, Jupyter sees Host localhost:{port}; its WebSocket check compares that
    with Origin, which the gateway rewrites when it is the sandbox URL's own origin."""
    require_browser()
    catalog.put("lab", host="127.0.0.1", mask_request_host="localhost:${PORT}")
    gw = await start_gateway(domains=("sandbox.test",))
    base = f"http://{jupyterlab}-lab.sandbox.test:{gw.port}"
    async with aiohttp.ClientSession() as s:  # JupyterLab starting: the gateway says port_not_open meanwhile
        async with asyncio.timeout(WAIT * 3):
            while True:
                async with s.get(f"http://127.0.0.1:{gw.port}/api/status", headers={"Host": base[7:]}) as r:
                    if r.status in (200, 403):
                        break
                await asyncio.sleep(0.1)
    r = await browse(
        [
            {"op": "goto", "url": f"{base}/lab?token={TOKEN}", "name": "lab"},
            {"op": "wait", "js": "window.jupyterapp", "timeout": 60000},
            {"op": "eval", "js": f"({LAB})()", "name": "driven"},
            {"op": "wait", "timeout": 60000,
             "js": "[...document.querySelectorAll('.jp-OutputArea-output')].some((e) => e.textContent.includes('42'))"},
            {"op": "eval", "name": "output",
             "js": "[...document.querySelectorAll('.jp-OutputArea-output')].map((e) => e.textContent).join('|')"},
            {"op": "wait", "timeout": 60000, "js": "window.terminalOutput.includes('42x')"},
        ],
        resolverRules="MAP *.sandbox.test 127.0.0.1", timeout=60000, limit=240,
    )  # fmt: skip
    assert r["steps"]["lab"]["status"] == 200 and r["steps"]["driven"] is True
    assert "42" in r["steps"]["output"]  # the cell ran on a kernel reached over the kernel WebSocket
    kernel = [w for w in r["sockets"] if "/api/kernels/" in w["url"]]
    terminal = [w for w in r["sockets"] if "/terminals/websocket/" in w["url"]]
    assert kernel and all(w["url"].startswith(base.replace("http", "ws")) for w in kernel), r["sockets"]
    assert not [w for w in kernel + terminal if w["error"]], r["sockets"]
    # The terminal's WebSocket carried the command's output back.
    assert terminal and any("42x" in f for w in terminal for f in w["received"]), terminal
