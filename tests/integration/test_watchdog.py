"""A stuck loop is noticed and replaced (issue 9, point 6).

Loops are blocked on purpose through the test-only hook (``_GATEWAY_TEST_STALL``: a file naming
the pid to stall, read by the worker's heartbeat; an environment variable, never a setting, never
reachable from the network) or frozen with SIGSTOP. Real processes, real signals, bounded waits.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
from pathlib import Path
from typing import IO, Any

from gateway.watchdog import EXIT_STALLED, TEST_STALL_ENV
from tests.conftest import WAIT, Catalog
from tests.helpers import RawUpstream, echo_handler, request
from tests.integration.test_observability import scrape, value
from tests.integration.test_operations import children, ready


class Output:
    """Everything a gateway process writes (stdout and stderr), read as it comes so that its pipe
    never fills."""

    def __init__(self, stream: IO[str] | None) -> None:
        assert stream is not None
        self.lines: list[str] = []
        self.thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self.thread.start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            self.lines.append(line)

    @property
    def text(self) -> str:
        return "".join(self.lines)


async def replaced(gw: Any, victim: int) -> None:
    async with asyncio.timeout(WAIT * 3):
        while True:
            now = children(gw.proc.pid)
            if len(now) == 2 and victim not in now and await ready(gw.admin_port) == 200:
                return
            await asyncio.sleep(0.1)


async def test_a_worker_whose_loop_spins_is_logged_killed_and_replaced(
    gateway_process: Any, catalog: Catalog, tmp_path: Path
) -> None:
    stall = tmp_path / "stall"
    async with RawUpstream(echo_handler) as up:
        catalog.put("wd", host="127.0.0.1")
        gw = gateway_process(
            "--workers", "2", env={"GATEWAY_LOOP_STALL_TIMEOUT": "2", TEST_STALL_ENV: str(stall)}
        )  # fmt: skip
        out = Output(gw.proc.stdout)
        host = gw.host(up.port, "wd")
        victim = min(children(gw.proc.pid))
        stall.write_text(str(victim))  # its heartbeat reads this and spins, like issue 9's framer
        await replaced(gw, victim)
        results = await asyncio.gather(*(request(gw.port, host, f"/{i}") for i in range(20)))
        assert [r.status for r in results] == [200] * 20
        async with asyncio.timeout(WAIT):  # the merged metrics, once the new worker reported
            while value(text := await scrape(gw.admin_port), "gateway_worker_stalls_total") < 1:
                await asyncio.sleep(0.1)
        assert value(text, "gateway_worker_stalls_total") == 1
        assert value(text, "gateway_worker_restarts_total") == 1
        assert value(text, "gateway_event_loop_lag_seconds_count") > 0
        gw.proc.send_signal(signal.SIGTERM)
        assert gw.proc.wait(WAIT * 2) == 0
        out.thread.join(WAIT)
        log = out.text
        assert f"worker pid {victim} stalled: its event loop has not turned for" in log
        assert "_stalled_on_purpose" in log and "watchdog.py" in log  # the worker's Python stack
        assert log.count("stalled: its event loop") == 1  # the new worker is not the one named


async def test_a_stopped_worker_is_replaced_without_its_stack(gateway_process: Any, catalog: Catalog) -> None:
    async with RawUpstream(echo_handler) as up:
        catalog.put("wd", host="127.0.0.1")
        gw = gateway_process("--workers", "2", env={"GATEWAY_LOOP_STALL_TIMEOUT": "2"})
        out = Output(gw.proc.stdout)
        victim = min(children(gw.proc.pid))
        os.kill(victim, signal.SIGSTOP)
        await replaced(gw, victim)
        results = await asyncio.gather(*(request(gw.port, gw.host(up.port, "wd"), f"/{i}") for i in range(20)))
        assert [r.status for r in results] == [200] * 20
        gw.proc.send_signal(signal.SIGTERM)
        assert gw.proc.wait(WAIT * 2) == 0
        out.thread.join(WAIT)
        assert f"worker pid {victim} stalled" in out.text and "did not answer the signal" in out.text


async def test_a_single_process_whose_loop_spins_exits_with_a_clear_message(
    gateway_process: Any, tmp_path: Path
) -> None:
    stall = tmp_path / "stall"
    gw = gateway_process(env={"GATEWAY_LOOP_STALL_TIMEOUT": "1", TEST_STALL_ENV: str(stall)})
    out = Output(gw.proc.stdout)
    stall.write_text("any")
    assert await asyncio.to_thread(gw.proc.wait, WAIT * 2) == EXIT_STALLED
    out.thread.join(WAIT)
    assert "event loop stalled: it has not turned for" in out.text
    assert "_stalled_on_purpose" in out.text  # the stack of the loop's thread


async def test_the_loop_lag_is_measured(start_gateway: Any) -> None:
    gw = await start_gateway()
    async with asyncio.timeout(WAIT):
        while value(await scrape(gw.admin_port), "gateway_event_loop_lag_seconds_count") < 2:
            await asyncio.sleep(0.1)
    text = await scrape(gw.admin_port)
    assert value(text, "gateway_event_loop_lag_seconds_bucket", le="+Inf") >= 2
    assert "gateway_worker_stalls_total 0.0" in text
