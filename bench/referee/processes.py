"""The processes the bench starts, and the CPU they and everyone else use.

Every process runs pinned to one core (``taskset``) in its own process group, so that stopping it
stops all it forked; as root it also runs at nice -10, ahead of other tenants of a shared machine.
CPU is read from /proc: user+sys of a process's whole tree, reaped children included, so a gateway
that forks workers is charged for all of them.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

__all__ = ["CpuMeter", "Service", "launcher", "wait_quiet"]

HZ = os.sysconf("SC_CLK_TCK")
QUIET = 0.15  # before a run, wait (a bounded time) until other processes use less than this many cores


def launcher(core: int) -> list[str]:
    """The prefix that runs a command on ``core`` (and at nice -10 as root)."""
    pin = ["taskset", "-c", str(core)]
    return ["nice", "-n", "-10", *pin] if os.geteuid() == 0 else pin


class Service:
    """A long-running process of the bench (a proxy, the backend, Redis), logging to a file."""

    def __init__(self, name: str, argv: list[str], core: int, logdir: Path, env: Mapping[str, str] | None = None):
        self.name = name
        self.log = logdir / f"{name}.log"
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [*launcher(core), *argv], stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                env=None if env is None else dict(env), start_new_session=True,
            )  # fmt: skip

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, lines: int = 20) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError as e:
            return f"(no log: {e})"
        return "\n".join("    " + line for line in text.splitlines()[-lines:])

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM to the process group, SIGKILL after ``grace`` seconds."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGTERM)
        try:
            self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGKILL)
            self.proc.wait(grace)


@dataclass(frozen=True, slots=True)
class Proc:
    ppid: int
    ticks: int  # user+sys of the process and of its reaped children
    own: int  # user+sys of the process alone
    start: int  # start time: tells a reused pid apart


def snapshot() -> dict[int, Proc]:
    procs = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            raw = Path(entry.path, "stat").read_bytes()
        except OSError:
            continue
        f = raw[raw.rfind(b")") + 2 :].split()
        own = int(f[11]) + int(f[12])
        procs[int(entry.name)] = Proc(int(f[1]), own + int(f[13]) + int(f[14]), own, int(f[19]))
    return procs


def tree(root: int, procs: Mapping[int, Proc]) -> set[int]:
    children: dict[int, list[int]] = {}
    for pid, p in procs.items():
        children.setdefault(p.ppid, []).append(pid)
    found, todo = set(), [root] if root in procs else []
    while todo:
        pid = todo.pop()
        found.add(pid)
        todo.extend(children.get(pid, ()))
    return found


def others_ticks(before: Mapping[int, Proc], after: Mapping[int, Proc]) -> int:
    """CPU used between two snapshots by processes that are not ours (nor kernel threads)."""
    ours = tree(os.getpid(), before) | tree(os.getpid(), after)
    total = 0
    for pid, p in after.items():
        if pid in ours or pid == 2 or p.ppid == 2:
            continue
        old = before.get(pid)
        total += p.own - (old.own if old is not None and old.start == p.start else 0)
    return total


class CpuMeter:
    """CPU of a target's process tree during a run, and the cores other processes used meanwhile."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.before = snapshot()
        self.t0 = time.monotonic()

    def stop(self) -> tuple[float, float, float]:
        """(seconds, the target's CPU seconds, cores used by other processes)."""
        seconds = time.monotonic() - self.t0
        after = snapshot()
        spent = sum(after[p].ticks for p in tree(self.target, after))
        spent -= sum(self.before[p].ticks for p in tree(self.target, self.before))
        return seconds, max(0, spent) / HZ, others_ticks(self.before, after) / HZ / seconds


def wait_quiet(max_wait: float = 10.0) -> float:
    """Wait until other processes use less than ``QUIET`` cores, at most ``max_wait`` s; their cores."""
    deadline = time.monotonic() + max_wait
    while True:
        before = snapshot()
        time.sleep(0.5)
        cores = others_ticks(before, snapshot()) / HZ / 0.5
        if cores < QUIET or time.monotonic() >= deadline:
            return cores
