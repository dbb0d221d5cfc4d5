"""Python's cycle collector, as a long-running server needs it: its pauses measured, and the heap
that startup built left out of its full collections.

While the collector runs, nothing else on the worker does: every connection waits. A young
collection walks the objects allocated since the last one (a fraction of a millisecond); a full one
walks every object the process holds. After startup that is about 80,000 objects (modules, the
public suffix list tldextract loads, configuration), none of which ever becomes garbage, and a full
collection of them took 56-71 ms on this project's machine under h2load: one worker stopped for that
long, once every few hundred thousand allocations that outlived a young collection.

- :func:`settle`, when a serving process has built its state and is about to listen
  (``Gateway(settle=True)``, as the CLI runs it; never an in-process gateway in tests): one
  collection, then ``gc.freeze()`` moves every object alive then into the permanent generation,
  which collections skip (the Python documentation recommends it for long-lived processes). No
  connection exists yet: none is frozen, none waits for that collection. A full collection then
  walks what was allocated since: 4.6 ms instead of about 60 in the measure above.
  Objects frozen are still freed by reference counting as before; only a cycle among them would
  never be collected, and startup's objects are not released.
- :class:`PauseClock` times every collection from ``gc.callbacks`` into the histogram
  ``gateway_gc_pause_seconds``, so an operator sees the pauses instead of inferring them from tail
  latency. Per request the gateway leaves no reference cycle (tests/integration/test_garbage.py), so
  collections stay rare.
"""

from __future__ import annotations

import gc
import time
from typing import Any

from gateway.metrics import Histogram

__all__ = ["PauseClock", "settle"]


def settle() -> int:
    """Collect once, then freeze what is alive (startup's heap): the objects frozen."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


class PauseClock:
    """Observes the duration of every collection in the process into ``histogram``."""

    __slots__ = ("histogram", "started")

    def __init__(self, histogram: Histogram) -> None:
        self.histogram = histogram
        self.started = 0.0

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self.started = time.perf_counter()
        elif self.started:
            self.histogram.observe(time.perf_counter() - self.started)
            self.started = 0.0

    def start(self) -> None:
        if self not in gc.callbacks:
            gc.callbacks.append(self)

    def stop(self) -> None:
        if self in gc.callbacks:
            gc.callbacks.remove(self)
