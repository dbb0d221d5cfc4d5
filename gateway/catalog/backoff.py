"""When a worker may ask a failing Redis again: exponential, capped backoff (pure: time is passed in).

While Redis fails, asking it on behalf of each request multiplies the outage: with Redis killed a
worker made ~3,500 failed calls a second, and with Redis frozen every request waited the full
``redis_timeout``. So a failure opens a breaker for the whole worker: no request and no background
refresh calls Redis until the worker's health watcher has seen it answer again. The watcher asks
at this pace: 0.1 s after the first failure, doubling each time it fails again, at most ``cap``.
"""

from __future__ import annotations

__all__ = ["Backoff"]


class Backoff:
    """``failures`` in a row and the earliest time of the next attempt (``retry_at``)."""

    __slots__ = ("cap", "failures", "first", "retry_at")

    def __init__(self, first: float = 0.1, cap: float = 2.0) -> None:
        self.first = first
        self.cap = max(cap, first)
        self.failures = 0
        self.retry_at = 0.0

    @property
    def failing(self) -> bool:
        return self.failures > 0

    def delay(self) -> float:
        """The pause after the current run of failures (0 when there is none)."""
        if not self.failures:
            return 0.0
        return min(self.first * 2.0 ** min(self.failures - 1, 32), self.cap)

    def failed(self, now: float) -> float:
        """One more failure at ``now``: the next attempt waits longer; returns the pause."""
        self.failures += 1
        d = self.delay()
        self.retry_at = now + d
        return d

    def succeeded(self) -> None:
        self.failures = 0
        self.retry_at = 0.0
