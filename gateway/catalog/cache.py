"""The in-process catalog cache (pure: time is passed in, nothing here awaits).

Asking Redis per request costs ~50 µs of client CPU, more than nginx spends on a whole proxied
request, and turns every Redis hiccup into an outage. So answers are kept here:

- a record for ``ttl`` seconds (the backstop behind invalidation messages);
- "no such sandbox" and "invalid record" for ``negative_ttl`` seconds, so a stream of requests
  for a dead sandbox costs one Redis read per second, not one per request;
- an expired record stays usable for ``stale_if_error`` more seconds (the RFC 5861 ideas): it
  answers while its background re-read runs (stale-while-revalidate), and while Redis fails
  (stale-if-error: a known sandbox keeps working through a catalog outage). Records that may have
  missed an invalidation message (the subscription was down) are re-read before they answer
  again, unless Redis fails.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gateway.catalog.record import SandboxRecord

__all__ = ["CatalogCache", "Entry"]


@dataclass(slots=True)
class Entry:
    """One cached answer: a record, or None for a missing key, or an invalid-record message."""

    record: SandboxRecord | None
    invalid: str | None
    fresh_until: float
    stale_until: float
    #: What the data plane derived from this answer (routing decisions per port), dropped with it.
    memo: dict[int, Any] = field(default_factory=dict)
    #: A change may have been missed: read it again before use (it still answers if Redis fails).
    must_revalidate: bool = False


class CatalogCache:
    __slots__ = ("entries", "max_entries", "negative_ttl", "stale_if_error", "ttl")

    def __init__(self, ttl: float, negative_ttl: float, stale_if_error: float, max_entries: int) -> None:
        self.ttl = ttl
        self.negative_ttl = negative_ttl
        self.stale_if_error = stale_if_error
        self.max_entries = max_entries
        self.entries: dict[str, Entry] = {}

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, sandbox_id: str) -> Entry | None:
        """The entry for ``sandbox_id``, fresh or not (compare ``fresh_until`` with the time)."""
        return self.entries.get(sandbox_id)

    def fresh(self, sandbox_id: str, now: float) -> Entry | None:
        e = self.entries.get(sandbox_id)
        if e is not None and now < e.fresh_until:
            return e
        return None

    def stale(self, sandbox_id: str, now: float) -> Entry | None:
        """An expired record still inside its stale-if-error window (records only, never misses)."""
        e = self.entries.get(sandbox_id)
        if e is not None and e.record is not None and now < e.stale_until:
            return e
        return None

    def put(self, sandbox_id: str, record: SandboxRecord | None, now: float, invalid: str | None = None) -> Entry:
        if record is not None:
            e = Entry(record, None, now + self.ttl, now + self.ttl + self.stale_if_error)
        else:
            e = Entry(None, invalid, now + self.negative_ttl, now + self.negative_ttl)
        entries = self.entries
        if entries.pop(sandbox_id, None) is None and len(entries) >= self.max_entries:
            self._evict(now)
        entries[sandbox_id] = e
        return e

    def invalidate(self, sandbox_id: str) -> Entry | None:
        return self.entries.pop(sandbox_id, None)

    def expire_all(self, now: float) -> None:
        """Make every entry stale: the next request asks Redis and waits for the answer, yet a
        record can still answer within its stale-if-error window if Redis fails (used when
        invalidations may be lost)."""
        for e in self.entries.values():
            e.must_revalidate = True
            if e.fresh_until > now:
                e.fresh_until = now
                if e.record is None:
                    e.stale_until = now

    def clear(self) -> None:
        self.entries.clear()

    def _evict(self, now: float) -> None:
        entries = self.entries
        dead = [k for k, e in entries.items() if e.stale_until <= now]
        for k in dead:
            del entries[k]
        # Still full: drop the oldest tenth (dicts keep insertion order; refreshed keys move back).
        if len(entries) >= self.max_entries:
            for k in list(entries)[: max(1, self.max_entries // 10)]:
                del entries[k]
