"""Headless Chromium for tests: the system browser driven by npm playwright-core (tests/e2e/vite-app,
`make peers`), through a list of steps (vite-app/steps.mjs). No browser download, bounded waits."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from tests import needs
from tests.conftest import ROOT

APP = ROOT / "tests" / "e2e" / "vite-app"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
NODE = shutil.which("node")


def require_browser() -> None:
    """node, npm playwright-core (`make peers`) and the system Chromium: or skip naming the missing
    one (a failure under CI: tests/needs.py)."""
    needs.tool("node", "apt-get install nodejs npm")
    if not (APP / "node_modules" / "playwright-core").exists():
        needs.missing("npm playwright-core", "make peers (npm install in tests/e2e/vite-app)")
    if not Path(CHROMIUM).exists():
        needs.missing(f"Chromium at {CHROMIUM}", "apt-get install chromium")


@pytest.fixture
def browser() -> None:
    """For tests that drive Chromium: ``pytestmark = pytest.mark.usefixtures("browser")``."""
    require_browser()


async def browse(
    steps: list[dict[str, Any]],
    on_signal: Callable[[str], Awaitable[None]] | None = None,
    limit: float = 120,
    **options: Any,
) -> dict[str, Any]:
    """Run ``steps`` in a fresh browser; ``on_signal`` runs at each ``signal`` step before the
    browser goes on. Returns what steps.mjs printed (``steps``, ``requests``, ``console``, ``sockets``)."""
    plan = {"steps": steps, **options}
    proc = await asyncio.create_subprocess_exec(
        NODE or "node", str(APP / "steps.mjs"), json.dumps(plan), cwd=APP, stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env={**os.environ, "CHROMIUM": CHROMIUM},
    )  # fmt: skip
    assert proc.stdout is not None and proc.stdin is not None and proc.stderr is not None
    err = asyncio.ensure_future(proc.stderr.read())
    result: dict[str, Any] = {}
    try:
        async with asyncio.timeout(limit):
            while line := await proc.stdout.readline():
                doc = json.loads(line)
                if "signal" in doc:
                    if on_signal is not None:
                        await on_signal(doc["signal"])
                    proc.stdin.write(b"go\n")
                    await proc.stdin.drain()
                    continue
                result = doc
            await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    stderr = (await err).decode(errors="replace")[-3000:]
    assert result, stderr
    assert proc.returncode == 0 and "error" not in result, (result.get("error"), result.get("steps"), stderr)
    return result
