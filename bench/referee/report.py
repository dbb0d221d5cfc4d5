"""Tables and the summary line: every target against nginx measured in the same round.

A ratio is the median over rounds of (target / nginx of that round): rounds minutes apart on a
shared machine differ more than targets within a round do.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from scenarios import SCENARIOS, Sample, Scenario

__all__ = ["Run", "summary", "table"]


@dataclass(frozen=True, slots=True)
class Run:
    scenario: str
    target: str
    round: int
    sample: Sample | None
    error: str | None
    cpu_s: float  # user+sys of the target's process tree
    other_cores: float  # cores other processes used meanwhile

    @property
    def cpu_per_unit_us(self) -> float | None:
        return self.cpu_s / self.sample.units * 1e6 if self.sample and self.sample.units else None

    @property
    def cores(self) -> float | None:
        return self.cpu_s / self.sample.seconds if self.sample and self.sample.seconds else None


def _median(xs: Iterable[float | None]) -> float | None:
    values = [x for x in xs if x is not None]
    return statistics.median(values) if values else None


def ratio(runs: list[Run], scenario: str, target: str, key: Callable[[Run], float | None]) -> float | None:
    """Median over rounds of key(target's run) / key(nginx's run in the same round)."""
    nginx = {r.round: key(r) for r in runs if r.scenario == scenario and r.target == "nginx"}
    return _median(
        k / n for r in runs if r.scenario == scenario and r.target == target
        if (k := key(r)) is not None and (n := nginx.get(r.round)) and n > 0
    )  # fmt: skip


def _rate(r: Run) -> float | None:
    return r.sample.rate if r.sample else None


def _p50(r: Run) -> float | None:
    return r.sample.p50_ms if r.sample else None


def _f(x: float | None, digits: int = 1) -> str:
    if x is None:
        return "-"
    return f"{x:,.0f}" if digits == 1 and abs(x) >= 1000 else f"{x:,.{digits}f}"


def table(runs: list[Run], sc: Scenario, targets: list[str], not_run: dict[str, str]) -> list[str]:
    """One Markdown table: medians over rounds, ratios to nginx, errors, other tenants' CPU."""
    lines = [
        f"| target | {sc.unit} | x nginx | p50 ms | p99 ms | CPU us/{sc.per} | CPU x nginx | cores | errors | other CPU |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for t in targets:
        mine = [r for r in runs if r.scenario == sc.name and r.target == t]
        good = [r for r in mine if r.sample is not None]
        if t in not_run or not good:
            why = not_run.get(t) or next((r.error for r in mine if r.error), "not run")
            lines.append(f"| {t} | not run: {why[:150]} |||||||||")
            continue
        failed = f" + {len(mine) - len(good)} failed run(s)" if len(good) < len(mine) else ""
        lines.append(
            f"| {t} | {_f(_median(_rate(r) for r in good))} | {_f(ratio(runs, sc.name, t, _rate), 2)} "
            f"| {_f(_median(_p50(r) for r in good), 3)} | {_f(_median(r.sample.p99_ms for r in good if r.sample), 3)} "
            f"| {_f(_median(r.cpu_per_unit_us for r in good))} "
            f"| {_f(ratio(runs, sc.name, t, lambda r: r.cpu_per_unit_us), 2)} | {_f(_median(r.cores for r in good), 2)} "
            f"| {sum(r.sample.errors for r in good if r.sample)}{failed} | {_f(_median(r.other_cores for r in good), 2)} |"
        )
    return lines


def summary(runs: list[Run], scenarios: list[str], not_run: dict[tuple[str, str], str]) -> str:
    """The last line: each scenario's headline ratio for the gateway (CPU per unit, rate or p50)."""
    parts = []
    for name in scenarios:
        sc = SCENARIOS[name]
        label, key = {
            "cpu": (f"{name} cpu", lambda r: r.cpu_per_unit_us),
            "rate": (f"{name} {sc.unit}", _rate),
            "p50": (f"{name} p50", _p50),
        }[sc.headline]
        x = ratio(runs, name, "gateway", key)
        mine = [r for r in runs if r.scenario == name and r.target == "gateway"]
        if (name, "gateway") in not_run:
            parts.append(f"{name} not run")
        elif x is None:
            parts.append(f"{label} n/a")
        else:
            errors = any(r.sample is None or r.sample.errors for r in mine)
            parts.append(f"{label} x{x:.2f}" + (" (errors)" if errors else ""))
    return "gateway vs nginx: " + ", ".join(parts)
