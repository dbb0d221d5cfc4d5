"""The catalog cache: TTL, negative entries, stale-if-error, bounds (pure: time is passed in)."""

from __future__ import annotations

from gateway.catalog.cache import CatalogCache
from gateway.catalog.record import SandboxRecord

REC = SandboxRecord("10.0.0.1", "e")


def test_fresh_then_stale_then_gone() -> None:
    c = CatalogCache(ttl=2, negative_ttl=1, stale_if_error=10, max_entries=10)
    c.put("a", REC, now=100)
    assert c.fresh("a", 101.9) is not None
    assert c.fresh("a", 102) is None
    assert c.stale("a", 111.9) is not None
    assert c.stale("a", 112) is None


def test_negative_entries_are_short_and_never_stale() -> None:
    c = CatalogCache(ttl=2, negative_ttl=1, stale_if_error=10, max_entries=10)
    e = c.put("gone", None, now=100)
    assert e.record is None and e.invalid is None
    assert c.fresh("gone", 100.5) is not None
    assert c.fresh("gone", 101) is None
    assert c.stale("gone", 100.5) is None
    bad = c.put("bad", None, now=100, invalid="not JSON")
    assert bad.invalid == "not JSON"


def test_bounded() -> None:
    c = CatalogCache(ttl=100, negative_ttl=1, stale_if_error=0, max_entries=50)
    for i in range(500):
        c.put(str(i), REC, now=i)
    assert len(c) <= 50
    assert c.fresh("499", 499) is not None  # the newest survive


def test_invalidate_and_clear() -> None:
    c = CatalogCache(ttl=100, negative_ttl=1, stale_if_error=0, max_entries=50)
    c.put("a", REC, now=0)
    c.put("b", REC, now=0)
    assert c.invalidate("a") is not None
    assert c.get("a") is None
    c.clear()
    assert len(c) == 0


def test_expire_all_makes_records_revalidate_but_keeps_them_for_errors() -> None:
    c = CatalogCache(ttl=60, negative_ttl=1, stale_if_error=10, max_entries=10)
    c.put("a", REC, now=100)
    c.expire_all(now=101)
    e = c.get("a")
    assert e is not None and e.must_revalidate and c.fresh("a", 101) is None
    assert c.stale("a", 105) is e  # still answers if Redis fails
    assert not c.put("a", REC, now=102).must_revalidate  # a new read is trusted again
