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
