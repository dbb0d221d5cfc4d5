"""Resume on traffic: a paused sandbox is resumed through the control plane (``resume_url``), once
however many requests wait, and the waiting requests then reach it. A small control plane in the
test plays the platform's API and flips the record."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web

from tests.conftest import WAIT, Catalog
from tests.helpers import Client, RawUpstream, echo_handler, request

Answer = Callable[[dict[str, Any]], Awaitable[web.Response]]


class ControlPlane:
    """POST /resume: records each call and answers with ``answer(body)``."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.answer: Answer = self._accept
        self.port = 0
        self.flip: Callable[[dict[str, Any]], None] | None = None
        self.runner: web.AppRunner | None = None

    async def _accept(self, body: dict[str, Any]) -> web.Response:
        if self.flip is not None:  # like the platform: answer, then resume and rewrite the record
            asyncio.get_running_loop().call_soon(self.flip, body)
        return web.json_response({"ok": True}, status=202)

    async def _handle(self, req: web.Request) -> web.Response:
        body = await req.json()
        self.calls.append(body)
        return await self.answer(body)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/resume"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/resume", self._handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]


@pytest.fixture
async def control_plane() -> AsyncIterator[ControlPlane]:
    cp = ControlPlane()
    await cp.start()
    yield cp
    assert cp.runner is not None
    await cp.runner.cleanup()


async def test_one_resume_for_many_waiting_requests(
    start_gateway: Any, catalog: Catalog, control_plane: ControlPlane
) -> None:
    async with RawUpstream(echo_handler, host="127.0.0.2") as up:
        # Paused on one node; the platform resumes it on another (127.0.0.2).
        catalog.put("zz", host="127.0.0.1", state="paused", execution_id="e1")
        control_plane.flip = lambda body: catalog.put("zz", host="127.0.0.2", execution_id="e2")
        gw = await start_gateway(resume_url=control_plane.url, resume_timeout=WAIT)
        host = gw.host(up.port, "zz")
        clients = [await Client.connect(gw.port) for _ in range(20)]
        results = await asyncio.gather(*(c.request(host, f"/{i}") for i, c in enumerate(clients)))
        assert [r.status for r in results] == [200] * 20
        assert all(f"GET /{i} ".encode() in r.body for i, r in enumerate(results))
        assert control_plane.calls == [{"sandboxId": "zz", "port": up.port}]
        for c in clients:
            await c.close()
        assert (await request(gw.port, host)).status == 200  # running now: no more resumes
        assert len(control_plane.calls) == 1


@pytest.mark.parametrize(
    ("status", "code", "reason"),
    [
        (403, 403, b"resume_denied"),
        (409, 409, b"sandbox_transitioning"),
        (429, 429, b"resume_rate_limited"),
        (500, 502, b"resume_failed"),
        (404, 502, b"resume_failed"),
    ],
)
async def test_control_plane_answers_map_to_reasons(
    start_gateway: Any, catalog: Catalog, control_plane: ControlPlane, status: int, code: int, reason: bytes
) -> None:
    async def refuse(body: dict[str, Any]) -> web.Response:
        return web.json_response({"error": "no"}, status=status)

    control_plane.answer = refuse
    catalog.put("pp", host="127.0.0.1", state="paused")
    gw = await start_gateway(resume_url=control_plane.url)
    clients = [await Client.connect(gw.port) for _ in range(5)]
    results = await asyncio.gather(*(c.request(gw.host(3000, "pp")) for c in clients))
    assert {(r.status, r.header("X-Gateway-Reason")) for r in results} == {(code, reason)}
    assert len(control_plane.calls) == 1
    for c in clients:
        await c.close()


async def test_resume_that_never_completes_times_out(
    start_gateway: Any, catalog: Catalog, control_plane: ControlPlane
) -> None:
    catalog.put("slow", host="127.0.0.1", state="paused")  # accepted, but the record stays paused
    gw = await start_gateway(resume_url=control_plane.url, resume_timeout=0.5)
    r = await request(gw.port, gw.host(3000, "slow"))
    assert (r.status, r.header("X-Gateway-Reason"), r.header("Retry-After")) == (504, b"resume_timeout", b"5")


async def test_unreachable_control_plane(start_gateway: Any, catalog: Catalog) -> None:
    from tests.conftest import free_port

    catalog.put("un", host="127.0.0.1", state="paused")
    gw = await start_gateway(resume_url=f"http://127.0.0.1:{free_port()}/resume", resume_timeout=2)
    r = await request(gw.port, gw.host(3000, "un"))
    assert (r.status, r.header("X-Gateway-Reason")) == (502, b"resume_failed")


async def test_resume_waits_through_a_transition(
    start_gateway: Any, catalog: Catalog, control_plane: ControlPlane
) -> None:
    """The platform first marks the record ``resuming``, later ``running``: the request waits."""
    async with RawUpstream(echo_handler) as up:
        catalog.put("tr", host="127.0.0.1", state="paused")
        steps = iter(["resuming", "running"])

        def flip(body: dict[str, Any]) -> None:
            state = next(steps, None)
            if state is not None:
                catalog.put("tr", host="127.0.0.1", state=state)
                asyncio.get_running_loop().call_soon(flip, body)

        control_plane.flip = flip
        gw = await start_gateway(resume_url=control_plane.url, resume_timeout=WAIT)
        r = await request(gw.port, gw.host(up.port, "tr"), "/t")
        assert r.status == 200 and b"GET /t " in r.body
        assert control_plane.calls == [{"sandboxId": "tr", "port": up.port}]
