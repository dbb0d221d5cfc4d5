"""A worker whose event loop stops turning is noticed, its stack logged, and it is replaced.

One event loop serves thousands of connections, so a loop that stops (a parser spinning on bytes
it should have refused, a regular expression backtracking, a blocking call) stops them all while
the process still looks alive: it holds its listening socket, the kernel keeps handing it new
connections, nothing crashes. Envoy's watchdog (a thread that notices a stuck dispatcher and
kills the process) is the model:

- :class:`Heartbeat` runs on each worker's loop every :data:`INTERVAL` seconds. It records that the
  loop turned and how late the beat ran: that lateness, sampled, is the loop lag, exported as the
  histogram ``gateway_event_loop_lag_seconds``. Under a supervisor it writes the time into a small
  shared file (an ``mmap``: no system call per beat) and registers :data:`STACK_SIGNAL` with
  ``faulthandler``, which dumps the Python stack of every thread to a file from a C signal
  handler: it works while the loop, or the interpreter, is stuck.
- :class:`WorkerWatch` runs in the supervisor (a separate process, so a worker that holds the
  GIL cannot stop it). A worker whose beat is older than ``loop_stall_timeout`` gets the signal,
  its stack is logged, it is killed (SIGKILL: SIGTERM would wait for the very loop that is stuck)
  and the supervisor starts a new one in its slot. ``gateway_worker_stalls_total`` counts them.
- :class:`LoopWatchdog` is the same judge for a single process (``workers = 1``): a thread that
  logs a clear message and the stacks and exits the process (status :data:`EXIT_STALLED`), so the
  container or the service manager restarts it. Should the loop hold the GIL so the thread cannot
  run, ``faulthandler.dump_traceback_later``, which the thread keeps re-arming, dumps and exits.

Tests block a loop on purpose through :data:`TEST_STALL_ENV`, an environment variable (never a
setting, never reachable from the network) naming a file: a worker that finds its pid (or ``any``)
in that file spins in :func:`_stalled_on_purpose`, a Python loop like the one issue 9 found.
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import logging
import mmap
import os
import signal
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterable
from typing import IO, Final

from gateway.metrics import Histogram

__all__ = [
    "EXIT_STALLED",
    "INTERVAL",
    "STACK_SIGNAL",
    "TEST_STALL_ENV",
    "Heartbeat",
    "LoopWatchdog",
    "WorkerWatch",
]

log = logging.getLogger("gateway.watchdog")

INTERVAL: Final = 0.25  #: seconds between two beats of a loop
STACK_SIGNAL: Final = signal.SIGUSR2  #: makes a worker dump its threads' stacks (faulthandler)
EXIT_STALLED: Final = 70  #: a single process exits with this when its loop stalled (EX_SOFTWARE)
TEST_STALL_ENV: Final = "_GATEWAY_TEST_STALL"
STACK_WAIT: Final = 2.0  #: seconds the supervisor waits for a stalled worker's stack
_BEAT = struct.Struct("d")


def beat_path(directory: str, pid: int) -> str:
    return os.path.join(directory, f"beat-{pid}")


def stack_path(directory: str, pid: int) -> str:
    return os.path.join(directory, f"stack-{pid}")


class Heartbeat:
    """Runs on a worker's loop: every INTERVAL it notes that the loop turned, and how late."""

    def __init__(self, lag: Histogram, worker_dir: str | None = None) -> None:
        self.loop = asyncio.get_running_loop()
        self.lag = lag
        self.last = time.monotonic()  # when the loop last turned (read by LoopWatchdog's thread)
        self.due = 0.0
        self.stopped = False
        self._handle: asyncio.TimerHandle | None = None
        self._map: mmap.mmap | None = None
        self._stack_file: IO[str] | None = None
        self._stall_file = os.environ.get(TEST_STALL_ENV) or None
        if worker_dir is not None:
            pid = os.getpid()
            with open(beat_path(worker_dir, pid), "w+b") as f:
                f.write(_BEAT.pack(0.0))
                f.flush()
                self._map = mmap.mmap(f.fileno(), _BEAT.size)
            self._stack_file = open(stack_path(worker_dir, pid), "w")  # noqa: SIM115  # kept open for the signal
            faulthandler.register(STACK_SIGNAL, file=self._stack_file, all_threads=True)

    def start(self) -> None:
        self._beat()

    def stop(self) -> None:
        self.stopped = True
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _beat(self) -> None:
        now = time.monotonic()
        if self.due:
            self.lag.observe(max(now - self.due, 0.0))
        self.last = now
        if self._map is not None:
            _BEAT.pack_into(self._map, 0, now)
        if self._stall_file is not None:
            self._test_stall()
        self.due = now + INTERVAL
        self._handle = self.loop.call_later(INTERVAL, self._beat)

    def _test_stall(self) -> None:
        assert self._stall_file is not None
        try:
            with open(self._stall_file) as f:
                who = f.read().split()
        except OSError:
            return
        if str(os.getpid()) in who or "any" in who:
            _stalled_on_purpose()


def _stalled_on_purpose() -> None:
    """A loop that never returns, like ``ChunkedFramer.scan`` on a negative size (tests only)."""
    n = 0
    while True:
        n = (n + 1) % 1_000_003


class LoopWatchdog(threading.Thread):
    """Single process: exits it when its loop has not turned for ``timeout`` seconds."""

    def __init__(self, heartbeat: Heartbeat, timeout: float) -> None:
        super().__init__(name="gateway-watchdog", daemon=True)
        self.heartbeat = heartbeat
        self.timeout = timeout
        self._stop = threading.Event()

    def run(self) -> None:
        check = min(1.0, self.timeout / 4)
        while not self._stop.wait(check) and not self.heartbeat.stopped:
            # Backstop, re-armed while this thread runs: if the GIL is held so it cannot, the C
            # thread of faulthandler dumps the stacks and exits anyway.
            faulthandler.dump_traceback_later(self.timeout + 5 * check + 5, exit=True)
            stalled = time.monotonic() - self.heartbeat.last
            if stalled > self.timeout:
                log.critical(
                    "event loop stalled: it has not turned for %.1f s (loop_stall_timeout %.1f s); exiting with "
                    "status %d so that the process is restarted. Stacks of its threads follow.",
                    stalled, self.timeout, EXIT_STALLED,
                )  # fmt: skip
                for h in logging.getLogger().handlers:
                    with contextlib.suppress(Exception):
                        h.flush()
                faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
                sys.stderr.flush()
                os._exit(EXIT_STALLED)
        faulthandler.cancel_dump_traceback_later()

    def stop(self) -> None:
        self._stop.set()


class WorkerWatch:
    """The supervisor's side: replaces workers whose loop stopped turning."""

    def __init__(self, directory: str, timeout: float) -> None:
        self.directory = directory
        self.timeout = timeout
        self.stalls = 0  # gateway_worker_stalls_total

    def age(self, pid: int) -> float | None:
        """Seconds since the worker's loop last turned; None before its first beat."""
        try:
            with open(beat_path(self.directory, pid), "rb") as f:
                raw = f.read(_BEAT.size)
        except OSError:
            return None
        if len(raw) != _BEAT.size:
            return None
        (beat,) = _BEAT.unpack(raw)
        return time.monotonic() - beat if beat else None

    async def run(self, workers: Callable[[], Iterable[asyncio.subprocess.Process]]) -> None:
        """Check every live worker about four times per ``timeout`` (cancel to stop)."""
        while True:
            await asyncio.sleep(min(1.0, self.timeout / 4))
            for proc in list(workers()):
                if proc.returncode is None:
                    age = self.age(proc.pid)
                    if age is not None and age > self.timeout:
                        await self.replace(proc, age)

    async def replace(self, proc: asyncio.subprocess.Process, age: float) -> None:
        """Log the stalled worker's stack, then kill it; the supervisor restarts its slot."""
        self.stalls += 1
        pid = proc.pid
        stack = await self._stack(pid)
        log.error(
            "worker pid %d stalled: its event loop has not turned for %.1f s (loop_stall_timeout %.1f s); "
            "killing it for a new one. Its stack:\n%s",
            pid, age, self.timeout, stack or "(none: the worker did not answer the signal, e.g. it is stopped)",
        )  # fmt: skip
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        for path in (beat_path(self.directory, pid), stack_path(self.directory, pid)):
            with contextlib.suppress(OSError):
                os.unlink(path)

    async def _stack(self, pid: int) -> str:
        """Ask the worker for its stack (STACK_SIGNAL) and read it once the dump stops growing."""
        path = stack_path(self.directory, pid)
        try:
            os.kill(pid, STACK_SIGNAL)
        except ProcessLookupError:
            return ""
        size, steady = -1, 0
        deadline = time.monotonic() + STACK_WAIT
        while time.monotonic() < deadline and steady < 3:
            await asyncio.sleep(0.05)
            now = _size(path)
            steady = steady + 1 if now == size and now > 0 else 0
            size = now
        return _read(path)


def _size(path: str) -> int:
    """The size of a small local file (the stack dump; no need for a thread)."""
    try:
        return os.stat(path).st_size
    except OSError:
        return 0


def _read(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read().strip()
    except OSError:
        return ""
