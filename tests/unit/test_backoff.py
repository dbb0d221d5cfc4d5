"""The catalog's retry pace while Redis fails: exponential from 0.1 s, capped (pure: time passed in)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from gateway.catalog.backoff import Backoff


def test_doubles_then_caps_then_resets() -> None:
    b = Backoff(0.1, 2.0)
    assert not b.failing and b.delay() == 0.0
    delays = [b.failed(now=10.0) for _ in range(8)]
    assert delays == [0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0, 2.0]
    assert b.failing and b.retry_at == 12.0
    b.succeeded()
    assert not b.failing and b.retry_at == 0.0 and b.failed(now=20.0) == 0.1


@given(st.integers(1, 10_000), st.floats(0.001, 1.0), st.floats(0.001, 600.0))
def test_never_beyond_the_cap_and_never_decreasing(n: int, first: float, cap: float) -> None:
    b = Backoff(first, cap)
    last = 0.0
    for _ in range(min(n, 200)):
        d = b.failed(now=0.0)
        assert last <= d <= max(cap, first)
        last = d
    b.failures = n  # however long the outage, no overflow
    assert b.delay() <= max(cap, first)
