"""Routing policy: direct and node mode, Host masking (pure)."""

from __future__ import annotations

from gateway.catalog.record import SandboxRecord
from gateway.hostname import Route
from gateway.policy import Forward, decide, pool_key


def test_direct_mode_uses_the_label_port() -> None:
    d = decide(Route(3000, "abc"), SandboxRecord("10.0.0.1", "e1"), node_port=0)
    assert d == Forward("10.0.0.1", 3000, pool_key("10.0.0.1", 3000, "e1"))


def test_node_mode_uses_the_node_port_and_keeps_host() -> None:
    d = decide(Route(3000, "abc"), SandboxRecord("10.0.0.1", "e1", mask_request_host="x"), node_port=5007)
    assert d == Forward("10.0.0.1", 5007, pool_key("10.0.0.1", 5007, "e1"))


def test_mask_request_host() -> None:
    d = decide(Route(5173, "abc"), SandboxRecord("10.0.0.1", mask_request_host="localhost:${PORT}"), 0)
    assert isinstance(d, Forward) and d.host == b"localhost:5173"


def test_pool_keys_separate_executions() -> None:
    assert pool_key("10.0.0.1", 80, "e1") != pool_key("10.0.0.1", 80, "e2")
