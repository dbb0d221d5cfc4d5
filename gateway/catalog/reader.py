"""Catalog reads: cache first, then one Redis GET per sandbox however many requests wait.

The data plane calls :meth:`Catalog.cached` synchronously (a dict lookup) and only on a miss
awaits :meth:`Catalog.lookup`. Concurrent misses for one sandbox share a single GET
(single-flight). Every Redis call is bounded by ``redis_timeout``; when Redis fails, an expired
record inside its stale-if-error window still answers, and otherwise :class:`CatalogUnavailable`
becomes a 503 ``catalog_unavailable``.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from gateway.catalog.cache import CatalogCache, Entry
from gateway.catalog.connection import REDIS_ERRORS, CatalogRedis
from gateway.catalog.record import RecordError, parse_record

__all__ = ["Catalog", "CatalogUnavailable"]

log = logging.getLogger("gateway.catalog")


class CatalogUnavailable(Exception):
    """Redis could not answer and nothing usable is cached."""


class Catalog:
    """Cached, single-flight reads of catalog records, and the catalog's health."""

    __slots__ = (
        "_inflight",
        "_loop",
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

    def __init__(self, client: CatalogRedis, cache: CatalogCache, prefix: str, timeout: float) -> None:
        self.redis = client
        self.cache = cache
        self.prefix = prefix
        self.timeout = timeout
        self._loop = asyncio.get_running_loop()
        self._inflight: dict[str, asyncio.Future[Entry]] = {}
        self.reached = False  # Redis answered at least once since start
        self.degraded = False  # the last Redis call failed
        self.last_error = ""
        self.stats = {"misses": 0, "stale": 0, "redis_errors": 0}
        self.hits = 0  # counted by the data plane, which reads cache.entries directly
        # Advanced by every invalidation: a GET that began before one does not cache what it read.
        self.epoch = 0

    def cached(self, sandbox_id: str) -> Entry | None:
        """The fresh cached entry, or None."""
        e = self.cache.fresh(sandbox_id, self._loop.time())
        if e is not None:
            self.hits += 1
        return e

    async def lookup(self, sandbox_id: str) -> Entry:
        """Ask Redis (once for all concurrent callers); raises CatalogUnavailable."""
        fut = self._inflight.get(sandbox_id)
        if fut is None:
            self.stats["misses"] += 1
            fut = self._loop.create_future()
            self._inflight[sandbox_id] = fut
            self._loop.create_task(self._fetch(sandbox_id, fut))
        return await asyncio.shield(fut)

    async def _fetch(self, sandbox_id: str, fut: asyncio.Future[Entry]) -> None:
        epoch = self.epoch
        try:
            try:
                async with asyncio.timeout(self.timeout):
                    raw = await self.redis.get(self.prefix + sandbox_id)
            except REDIS_ERRORS as e:
                self._failed(e)
                stale = self.cache.stale(sandbox_id, self._loop.time())
                if stale is not None:
                    self.stats["stale"] += 1
                    fut.set_result(stale)
                else:
                    fut.set_exception(CatalogUnavailable(self.last_error))
                    fut.exception()  # retrieved here, so a future nobody awaits any more stays quiet
                return
            self._succeeded()
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

    def _failed(self, e: BaseException) -> None:
        self.stats["redis_errors"] += 1
        self.last_error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        if not self.degraded:
            log.warning("catalog Redis failing: %s", self.last_error)
        self.degraded = True

    def _succeeded(self) -> None:
        if self.degraded:
            log.info("catalog Redis answering again")
        self.degraded = False
        self.reached = True

    async def ping(self) -> bool:
        """One bounded PING; updates the health the admin app reports."""
        try:
            async with asyncio.timeout(self.timeout * 4):
                await self.redis.ping()
        except REDIS_ERRORS as e:
            self._failed(e)
            return False
        self._succeeded()
        return True

    def health(self) -> dict[str, Any]:
        return {
            "reached": self.reached,
            "status": "degraded" if self.degraded or not self.reached else "ok",
            "error": self.last_error if self.degraded else None,
            "cached_records": len(self.cache),
        }

    async def close(self) -> None:
        await self.redis.aclose()
