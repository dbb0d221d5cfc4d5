"""Several worker processes under one supervisor (``workers`` > 1): all cores, one address.

Python runs one thread of bytecode at a time, so a gateway uses more cores the way nginx does: N
worker processes, each a complete gateway with its own event loop, cache and pool, each binding
the same listeners with SO_REUSEPORT so the kernel spreads new connections across them.

The supervisor is small and does no proxying:

- it starts the workers (``python -m gateway serve`` with the same arguments, and the private
  variable ``_GATEWAY_WORKER_DIR`` naming a directory for their reports);
- it restarts a worker that dies (with a growing delay if one keeps dying), counted in
  ``gateway_worker_restarts_total``, and kills (then restarts) one whose event loop has not
  turned for ``loop_stall_timeout``, after logging its stack (watchdog.py), counted in
  ``gateway_worker_stalls_total``;
- it passes SIGTERM (drain), SIGINT (stop now) and SIGHUP (reload TLS certificates) on to every
  worker, and exits when they have (a worker whose supervisor died without that drains by itself:
  server.py's tick checks its parent);
- it serves the admin app: ``/metrics`` sums the snapshots the workers write every second, and
  ``/ready`` is 200 while at least one live worker reports ready and the instance is not
  draining; its body counts the workers and the ready ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from typing import Any

from gateway.admin import AdminServer
from gateway.config import Config
from gateway.metrics import Snapshot, merge, read_snapshots
from gateway.watchdog import WorkerWatch

__all__ = ["ADMIN_ADDR_ENV", "WORKER_DIR_ENV", "Supervisor"]

log = logging.getLogger("gateway.supervisor")

#: Set in a worker's environment: the directory it reports to (not a setting, hence no GATEWAY_).
WORKER_DIR_ENV = "_GATEWAY_WORKER_DIR"
#: Set in a worker's environment: where the supervisor's admin app listens (HOST:PORT,...), so the
#: worker never connects to it as a sandbox (policy.OwnListeners).
ADMIN_ADDR_ENV = "_GATEWAY_ADMIN_ADDR"
#: A worker whose report is older than this counts as not ready.
STALE_REPORT = 3.0


class Supervisor:
    def __init__(self, cfg: Config, argv: list[str], env: dict[str, str] | None = None) -> None:
        self.cfg = cfg
        self.argv = argv
        self.env = env or {}
        self.n = cfg.workers or len(os.sched_getaffinity(0))  # the CPUs this process may use (cgroups)
        self.dir = ""
        self.procs: dict[int, asyncio.subprocess.Process] = {}  # slot -> worker
        self.restarts = 0
        self.stopping = False
        self.draining = False
        self.admin: AdminServer | None = None
        self._stop: asyncio.Event | None = None
        self.watch: WorkerWatch | None = None  # replaces workers whose loop stalled

    async def _spawn(self, slot: int) -> None:
        env = {**os.environ, **self.env, WORKER_DIR_ENV: self.dir}
        if self.admin is not None and self.admin.bound:
            env[ADMIN_ADDR_ENV] = ",".join(f"{h}:{p}" for h, p in self.admin.bound)
        proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "gateway", *self.argv, env=env)
        self.procs[slot] = proc
        log.info("worker %d started (pid %d)", slot, proc.pid)

    async def _watch(self, slot: int) -> None:
        """Keep a worker running in this slot until the supervisor stops."""
        delay = 0.1
        while True:
            proc = self.procs[slot]
            started = time.monotonic()
            code = await proc.wait()
            if self.stopping:
                return
            log.error("worker %d (pid %d) exited with %s; restarting", slot, proc.pid, code)
            self.restarts += 1
            if time.monotonic() - started > 30:
                delay = 0.1  # it ran a while: not a crash loop
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
            if self._stopped():
                return
            await self._spawn(slot)

    def _stopped(self) -> bool:
        return self.stopping

    def _signal(self, sig: int) -> None:
        if sig in (signal.SIGTERM, signal.SIGINT):
            self.stopping = True
            self.draining = True
        for proc in self.procs.values():
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(sig)
        if self.stopping and self._stop is not None:
            self._stop.set()

    def _reports(self) -> list[tuple[int, Snapshot, bool, float]]:
        try:
            return read_snapshots(self.dir)
        except OSError:
            return []

    def snapshot(self) -> Snapshot:
        merged = merge((snap, alive) for _, snap, alive, _ in self._reports())
        merged["worker_restarts"] = self.restarts
        merged["worker_stalls"] = self.watch.stalls if self.watch is not None else 0
        return merged

    def status(self) -> tuple[int, dict[str, Any]]:
        live = {p.pid for p in self.procs.values() if p.returncode is None}
        ready = 0
        catalog: dict[str, Any] = {}
        for pid, snap, _, age in self._reports():
            if pid in live and age < STALE_REPORT and snap.get("ready"):
                ready += 1
            if pid in live and not catalog:
                catalog = snap.get("status", {}).get("catalog", {})
        body: dict[str, Any] = {"workers": len(live), "ready_workers": ready, "catalog": catalog}
        if self.draining:
            body["status"] = "draining"
            return 503, body
        if not ready:
            body["status"] = "starting"
            return 503, body
        # One serving worker is enough to take traffic: a crashed worker's replacement starts in
        # about a second, and taking the whole instance out of the balancer for that would move
        # all of its traffic for one crash. The body says how many serve.
        body["status"] = "ready"
        return 200, body

    async def run(self) -> int:
        self.dir = tempfile.mkdtemp(prefix="gateway-workers-")
        loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(sig, self._signal, sig)
        try:
            self.admin = AdminServer(self.status, self.snapshot)
            await self.admin.start(*self.cfg.admin_addr, backlog=self.cfg.listen_backlog)
            for slot in range(self.n):
                await self._spawn(slot)
            log.info("supervisor: %d workers, admin on %s", self.n, self.admin.address)
            watchers = [loop.create_task(self._watch(slot)) for slot in range(self.n)]
            if self.cfg.loop_stall_timeout:
                self.watch = WorkerWatch(self.dir, self.cfg.loop_stall_timeout)
                watchers.append(loop.create_task(self.watch.run(lambda: [] if self.stopping else self.procs.values())))
            await self._stop.wait()
            # The workers drain themselves (drain_delay, then in-flight work up to shutdown_timeout).
            limit = self.cfg.drain_delay + self.cfg.shutdown_timeout + 10
            try:
                async with asyncio.timeout(limit):
                    await asyncio.gather(*(p.wait() for p in self.procs.values()))
            except TimeoutError:
                log.warning("workers still running after %.0f s: killing them", limit)
                for p in self.procs.values():
                    if p.returncode is None:
                        p.kill()
                await asyncio.gather(*(p.wait() for p in self.procs.values()))
            for w in watchers:
                w.cancel()
            return 0
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            for p in self.procs.values():
                if p.returncode is None:
                    p.kill()
            if self.admin is not None:
                await self.admin.stop()
            shutil.rmtree(self.dir, ignore_errors=True)
