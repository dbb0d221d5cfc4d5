"""`make bench` works from a clone: bench/referee starts nginx, HAProxy and the gateway against one
backend, measures each under the same load and prints the gateway's ratios to nginx.

One short round (1 s per run): this checks that every target is set up, routes the sandbox and is
measured, never how fast anything is (numbers come from `make bench` on a quiet machine).
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests import needs
from tests.conftest import ROOT, WAIT

pytestmark = pytest.mark.slow


def test_the_referee_measures_every_target_and_prints_the_ratios() -> None:
    for name in ("nginx", "haproxy", "wrk", "h2load"):
        needs.tool(name, "apt-get install nginx haproxy wrk nghttp2-client")
    out = subprocess.run(
        [sys.executable, "bench/referee", "--rounds", "1", "--duration", "1", "--quiet-wait", "0",
         "--scenarios", "small,upload,ws,h2"],
        cwd=ROOT, capture_output=True, text=True, timeout=WAIT * 30,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    report = out.stdout.splitlines()
    # h2 runs once the gateway answers HTTP/2 with prior knowledge.
    summary = r"gateway vs nginx: small cpu x\d+\.\d\d, upload MiB/s x\d+\.\d\d, ws msgs/s x\d+\.\d\d, h2 (not run|cpu x\d+\.\d\d)"
    assert re.fullmatch(summary, report[-1]), report[-1]
    rows = [line.split("|")[1].strip() for line in report if re.match(r"\| (nginx|haproxy|gateway) \| [\d,]", line)]
    measured = 3 + report[-1].count("h2 cpu")
    assert rows.count("nginx") == rows.count("haproxy") == rows.count("gateway") == measured, report
