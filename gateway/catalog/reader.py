"""Catalog reads: cache first, then one Redis GET per sandbox however many requests wait.

The data plane reads the cache itself (a dict lookup) and only on a miss awaits
:meth:`Catalog.lookup`. Concurrent misses for one sandbox share a single GET (single-flight).

Redis trouble must cost cached sandboxes nothing:

- stale-while-revalidate (RFC 5861's idea): a record past ``cache_ttl`` still answers at once
  while *one* background GET per sandbox refreshes it (:meth:`Catalog.revalidate`), for up to
  ``stale_if_error`` seconds past its TTL;
- a breaker per worker: the first failed Redis call marks the catalog ``degraded``; from then on no
  request and no refresh calls Redis. An unknown sandbox is answered 503 ``catalog_unavailable``
  at once (an expired record inside its stale window still routes), and only the health watcher
  (:meth:`Catalog.watch`) asks Redis again, at the pace of :class:`~gateway.catalog.backoff.Backoff`
  (0.1 s, doubling, capped at ``redis_backoff_max``). Its first answer closes the breaker.

Every Redis call is bounded by ``redis_timeout``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from gateway.catalog.backoff import Backoff
from gateway.catalog.cache import CatalogCache, Entry
from gateway.catalog.connection import REDIS_ERRORS, CatalogRedis
from gateway.catalog.record import RecordError, parse_record

__all__ = ["Catalog", "CatalogUnavailable"]

log = logging.getLogger("gateway.catalog")

#: Seconds between two health PINGs while Redis answers.
HEALTH_INTERVAL = 1.0


class CatalogUnavailable(Exception):
    """Redis could not answer and nothing usable is cached."""


class Catalog:
    """Cached, single-flight reads of catalog records, and the catalog's health."""

    __slots__ = (
        "_inflight",
        "_loop",
        "_read_failed",
        "_trouble",
        "backoff",
        "cache",
        "degraded",
        "epoch",
        "hits",
        "last_error",
        "prefix",
        "reached",
        "redis",
        "stats",
        "timeout",
    )

    def __init__(
        self, client: CatalogRedis, cache: CatalogCache, prefix: str, timeout: float, backoff_max: float = 2.0
    ) -> None:
        self.redis = client
        self.cache = cache
        self.prefix = prefix
        self.timeout = timeout
        self._loop = asyncio.get_running_loop()
        self._inflight: dict[str, asyncio.Future[Entry]] = {}
        self.reached = False  # Redis answered at least once since start
        self.degraded = False  # the last Redis call failed: the breaker is open
        self.backoff = Backoff(0.1, backoff_max)  # the health watcher's pace while Redis fails
        self._trouble = asyncio.Event()  # a read failed: the watcher should not sleep out its second
        self._read_failed = False  # the last GET failed (a PING answering is then not the whole story)
        self.last_error = ""
        # misses: GETs started (a request's or a refresh's); stale: expired records that answered
        self.stats = {"misses": 0, "stale": 0, "redis_errors": 0}
        self.hits = 0  # counted by the data plane, which reads cache.entries directly
        # Advanced by every invalidation: a GET that began before one does not cache what it read.
        self.epoch = 0

    @property
    def reading(self) -> int:
        """GETs under way (one per sandbox at most)."""
        return len(self._inflight)

    def revalidate(self, sandbox_id: str, e: Entry | None) -> Entry | None:
        """``e`` is not fresh (or absent): the entry to answer with now, or None if the request
        must wait for :meth:`lookup`. A record inside its stale window answers at once while one
        background GET refreshes it (none while the breaker is open: the watcher probes)."""
        if e is None or e.record is None or e.must_revalidate or self._loop.time() >= e.stale_until:
            return None
        self.stats["stale"] += 1
        if sandbox_id not in self._inflight and not self.degraded:
            self._start(sandbox_id)
        return e

    async def lookup(self, sandbox_id: str) -> Entry:
        """Ask Redis (once for all concurrent callers); raises CatalogUnavailable. While the
        breaker is open nothing waits: a stale record, or CatalogUnavailable at once."""
        fut = self._inflight.get(sandbox_id)
        if fut is None:
            if self.degraded:
                stale = self.cache.stale(sandbox_id, self._loop.time())
                if stale is not None:
                    self.stats["stale"] += 1
                    return stale
                raise CatalogUnavailable(self.last_error)
            fut = self._start(sandbox_id)
        return await asyncio.shield(fut)

    def _start(self, sandbox_id: str) -> asyncio.Future[Entry]:
        self.stats["misses"] += 1
        fut: asyncio.Future[Entry] = self._loop.create_future()
        self._inflight[sandbox_id] = fut
        self._loop.create_task(self._fetch(sandbox_id, fut))
        return fut

    async def _fetch(self, sandbox_id: str, fut: asyncio.Future[Entry]) -> None:
        epoch = self.epoch
        try:
            try:
                async with asyncio.timeout(self.timeout):
                    raw = await self.redis.get(self.prefix + sandbox_id)
            except REDIS_ERRORS as e:
                self._failed(e, read=True)
                stale = self.cache.stale(sandbox_id, self._loop.time())
                if stale is not None:
                    self.stats["stale"] += 1
                    fut.set_result(stale)
                else:
                    fut.set_exception(CatalogUnavailable(self.last_error))
                    fut.exception()  # retrieved here, so a future nobody awaits any more stays quiet
                return
            self._succeeded(read=True)
            now = self._loop.time()
            # What was read before an invalidation may already be outdated: answer with it (the
            # requests waiting came before the change), but do not keep it.
            cache = self.cache if epoch == self.epoch else CatalogCache(0, 0, 0, 1)
            if raw is None:
                fut.set_result(cache.put(sandbox_id, None, now))
                return
            try:
                record = parse_record(raw)
            except RecordError as e:
                log.warning("catalog record %s%s is invalid: %s", self.prefix, sandbox_id, e)
                fut.set_result(cache.put(sandbox_id, None, now, invalid=str(e)))
            else:
                fut.set_result(cache.put(sandbox_id, record, now))
        except BaseException as e:  # a bug must not leave waiters hanging
            if not fut.done():
                fut.set_exception(CatalogUnavailable(f"internal error: {e!r}"))
                fut.exception()
            if not isinstance(e, Exception):
                raise
            log.exception("catalog lookup of %s failed", sandbox_id)
        finally:
            self._inflight.pop(sandbox_id, None)

    def invalidate(self, sandbox_id: str) -> Entry | None:
        """A writer changed this sandbox's record: forget the cached copy; returns it."""
        self.epoch += 1
        return self.cache.invalidate(sandbox_id)

    def flush(self) -> None:
        """Invalidation messages may have been missed: every cached answer is asked again.

        Records are kept as stale, not dropped, so a Redis that went away again right after
        answering the subscription still leaves known sandboxes routable (stale_if_error)."""
        self.epoch += 1
        self.cache.expire_all(self._loop.time())

    def _failed(self, e: BaseException, read: bool) -> None:
        """A Redis call failed: open the breaker. The backoff grows with the watcher's probes (and
        the first failure of a run), not with every read that was already under way."""
        self.stats["redis_errors"] += 1
        self.last_error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        was = self.degraded
        if not was:
            log.warning("catalog Redis failing: %s; requests no longer wait for it", self.last_error)
        self.degraded = True
        if read:
            self._read_failed = True
        if not read or not was:
            self.backoff.failed(self._loop.time())
        self._trouble.set()

    def _succeeded(self, read: bool) -> None:
        if self.degraded:
            log.info("catalog Redis answering again")
        self.degraded = False
        self.reached = True
        if read:
            self._read_failed = False
        if not self._read_failed:
            # A PING answering while GETs fail (a Cluster slot without its primary) closes the
            # breaker but keeps the backoff growing, so such reads are retried ever more rarely.
            self.backoff.succeeded()

    async def ping(self) -> bool:
        """One bounded PING; updates the health the admin app reports and the breaker."""
        try:
            async with asyncio.timeout(self.timeout * 4):
                await self.redis.ping()
        except REDIS_ERRORS as e:
            self._failed(e, read=False)
            return False
        self._succeeded(read=False)
        return True

    async def watch(self) -> None:
        """Health and breaker: a PING every HEALTH_INTERVAL while Redis answers; after a failure,
        a PING at each backoff step until one is answered. While Redis fails these PINGs are a
        worker's only catalog calls (the invalidation listener reconnects with its own backoff)."""
        while True:
            await self.ping()
            if not self.degraded:
                self._trouble.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(HEALTH_INTERVAL):
                        await self._trouble.wait()
            pause = self.backoff.retry_at - self._loop.time()
            if pause > 0:
                await asyncio.sleep(pause)

    def health(self) -> dict[str, Any]:
        return {
            "reached": self.reached,
            "status": "degraded" if self.degraded or not self.reached else "ok",
            "error": self.last_error if self.degraded else None,
            "cached_records": len(self.cache),
        }

    async def close(self) -> None:
        await self.redis.aclose()
