"""The gateway next to nginx and HAProxy, same backend, same load, same minutes: how it compares.

    make bench                                   # every scenario, 3 rounds x 10 s (~12 min)
    make bench BENCH_ARGS="--rounds 1 --duration 3 --scenarios small,real"

Pins the load generator (wrk, h2load or ws.py) with the backend to one core and the target alone to
another; in each round every target runs once, the order rotated round by round; a run during which
other processes used more than 0.3 core is repeated once. Prints one Markdown table per scenario and,
last, one line: the gateway's ratio to nginx per scenario (docs/development.md says how to read it).
The ``h2`` scenario (h2load) runs once the gateway answers HTTP/2 with prior knowledge on its listener;
nginx and HAProxy take h2c on ports of their own.

Exit status: 0 measured; 1 a target died or (``--strict``) a run had errors; 2 setup failed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from types import FrameType

from processes import CpuMeter, launcher, wait_quiet
from report import Run, summary, table
from scenarios import SCENARIOS, load_command, parse
from stage import SetupError, Stage

TARGETS = ("nginx", "haproxy", "gateway")
RERUN_ABOVE = 0.3  # cores used by other processes during a run


def log(msg: str) -> None:
    print(f"[referee {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def csv(allowed: tuple[str, ...]) -> Callable[[str], list[str]]:
    def parse_list(s: str) -> list[str]:
        items = list(dict.fromkeys(x.strip() for x in s.split(",") if x.strip()))
        if not items or set(items) - set(allowed):
            raise argparse.ArgumentTypeError(f"choose from {','.join(allowed)}")
        return items

    return parse_list


def measure(stage: Stage, scenario: str, target: str, rnd: int, seconds: float, quiet_wait: float) -> Run:
    sc = SCENARIOS[scenario]
    svc = stage.services[target]
    argv = load_command(sc, stage.tools, stage.port(target, sc), stage.host(sc), seconds, stage.lua)
    wait_quiet(quiet_wait)
    meter = CpuMeter(svc.pid)
    try:
        out = subprocess.run([*launcher(stage.load_core), *argv], capture_output=True, text=True,
                             timeout=seconds + 30, check=False)  # fmt: skip
        text, error = out.stdout + out.stderr, None
    except subprocess.TimeoutExpired:
        text, error = "", f"the load generator did not finish in {seconds + 30:g} s"
    _, cpu_s, others = meter.stop()
    sample = None
    if error is None:
        try:
            sample = parse(sc, text)
        except (ValueError, KeyError, IndexError) as e:
            error = f"output not understood ({e}): {text[-300:]!r}"
    if not svc.alive():
        error = f"{target} exited during the run\n{svc.tail()}"
    return Run(scenario, target, rnd, sample if error is None else None, error, cpu_s, others)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenarios", type=csv(tuple(SCENARIOS)), default=list(SCENARIOS))
    ap.add_argument("--targets", type=csv(TARGETS), default=list(TARGETS), help="nginx is the reference: keep it")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per run (c1: half, ws: 0.8x)")
    ap.add_argument("--domain", default="e2b.dev")
    ap.add_argument("--gateway-args", default="", help="more `gateway serve` arguments, e.g. '--workers 2'")
    ap.add_argument("--cores", default=None, help="LOAD,TARGET cores (default: the first two this process may use)")
    ap.add_argument("--quiet-wait", type=float, default=10.0,
                    help="before each run, wait up to this long for other processes to calm down")  # fmt: skip
    ap.add_argument("--json", default=None, help="write every run and the summary to this file")
    ap.add_argument("--strict", action="store_true", help="exit 1 when a run failed or had errors")
    ap.add_argument("--keep-tmp", action="store_true", help="keep configs and logs")
    a = ap.parse_args()
    if a.rounds < 1 or a.duration < 1:
        ap.error("--rounds and --duration must be >= 1")
    cpus = sorted(os.sched_getaffinity(0))
    load_core, target_core = (int(x) for x in a.cores.split(",")) if a.cores else (cpus[0], cpus[min(1, len(cpus) - 1)])
    if load_core == target_core:
        log("WARNING: one core for load and target: CPU per unit still compares, throughput does not")

    def interrupted(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)
    stage = Stage(a.targets, a.scenarios, load_core, target_core, a.domain, a.gateway_args.split())
    runs: list[Run] = []
    not_run: dict[tuple[str, str], str] = {}
    status = 0
    try:
        stage.start()
        for t in a.targets:
            for s in a.scenarios:
                if why := stage.probe(t, SCENARIOS[s]):
                    if t != "gateway" and s != "h2":
                        raise SetupError(f"{t} fails the {s} probe: {why}\n{stage.services[t].tail()}")
                    log(f"{t}: {s} not run: {why}")
                    not_run[s, t] = why
        if ("h2", "gateway") in not_run:  # nothing to compare with: spare the references' h2 runs
            not_run |= {("h2", t): "the gateway does not" for t in a.targets if ("h2", t) not in not_run}
        log(f"measuring {len(a.scenarios)} scenarios x {len(a.targets)} targets x {a.rounds} rounds "
            f"(load core {load_core}, target core {target_core})")  # fmt: skip
        for s in a.scenarios:
            seconds = a.duration * SCENARIOS[s].share
            for rnd in range(a.rounds):
                k = rnd % len(a.targets)
                for t in a.targets[k:] + a.targets[:k]:
                    if (s, t) in not_run or not stage.services[t].alive():
                        continue
                    run = measure(stage, s, t, rnd, seconds, a.quiet_wait)
                    if run.error is None and run.other_cores > RERUN_ABOVE:
                        log(f"  {s} {t}: other processes used {run.other_cores:.2f} cores: once more")
                        again = measure(stage, s, t, rnd, seconds, a.quiet_wait)
                        run = again if again.error is None and again.other_cores < run.other_cores else run
                    runs.append(run)
                    rate = f"{run.sample.rate:,.1f} {SCENARIOS[s].unit}" if run.sample else f"FAILED: {run.error}"
                    log(f"[{s} r{rnd}] {t:8s} {rate} cpu {run.cpu_per_unit_us or 0:.1f} us/{SCENARIOS[s].per} "
                        f"other {run.other_cores:.2f}")  # fmt: skip
                    if not stage.services[t].alive():
                        status = 1
        print(f"# gateway vs nginx and HAProxy ({time.strftime('%Y-%m-%d %H:%M')}, {platform.node()}, "
              f"{os.cpu_count()} CPUs)\n\n- load generator and backend on core {load_core}, target on core "
              f"{target_core}; {a.rounds} round(s) x {a.duration:g} s, order rotated each round"
              + (f"\n- gateway: `{stage.gateway_command}`" if "gateway" in a.targets else ""))  # fmt: skip
        for s in a.scenarios:
            sc = SCENARIOS[s]
            print(f"\n## {s}: {sc.what}\n")
            print("\n".join(table(runs, sc, a.targets, {t: w for (x, t), w in not_run.items() if x == s})))
        print("\nCPU us/unit: user+sys of the target's whole process tree per unit served (lower is better). "
              "x nginx: median of per-round ratios to nginx. other CPU: cores other processes used.\n")  # fmt: skip
        line = summary(runs, a.scenarios, not_run) if "gateway" in a.targets else "gateway: not run"
        if a.strict and any(r.error or (r.sample and r.sample.errors) for r in runs):
            status = 1
    except SetupError as e:
        log(f"setup failed: {e}")
        line, status = f"bench: setup failed: {str(e).splitlines()[0]}", 2
    except KeyboardInterrupt:
        line, status = "bench: interrupted", 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        stage.stop(keep=a.keep_tmp or status == 2)
        if a.keep_tmp or status == 2:
            log(f"configs and logs kept in {stage.tmp}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"summary": line, "runs": [dataclasses.asdict(r) for r in runs]}, f, indent=1)
    print(line, flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
