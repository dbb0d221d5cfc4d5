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

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from gateway.catalog.cache import CatalogCache, Entry
from gateway.catalog.record import RecordError, parse_record

__all__ = ["Catalog", "CatalogUnavailable", "connect_redis"]

log = logging.getLogger("gateway.catalog")


class CatalogUnavailable(Exception):
    """Redis could not answer and nothing usable is cached."""


def connect_redis(url: str, timeout: float) -> aioredis.Redis:
    """A client that fails fast: one attempt per call, short socket timeouts.

    Retrying inside redis-py would multiply the time a request waits; the cache's stale entries
    and the caller's Retry-After are the better answer to a Redis hiccup.
    """
    client: aioredis.Redis = aioredis.Redis.from_url(
        url,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
        health_check_interval=0,
        decode_responses=False,
    )
    return client


class Catalog:
    """Cached, single-flight reads of catalog records, and the catalog's health."""

    __slots__ = (
        "_inflight",
        "_loop",
        "cache",
        "degraded",
        "hits",
        "last_error",
        "prefix",
        "reached",
        "redis",
        "stats",
        "timeout",
    )

    def __init__(self, client: aioredis.Redis, cache: CatalogCache, prefix: str, timeout: float) -> None:
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
        try:
            try:
                async with asyncio.timeout(self.timeout):
                    raw = await self.redis.get(self.prefix + sandbox_id)
            except (RedisError, OSError, TimeoutError) as e:
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
            if raw is None:
                fut.set_result(self.cache.put(sandbox_id, None, now))
                return
            try:
                record = parse_record(raw)
            except RecordError as e:
                log.warning("catalog record %s%s is invalid: %s", self.prefix, sandbox_id, e)
                fut.set_result(self.cache.put(sandbox_id, None, now, invalid=str(e)))
            else:
                fut.set_result(self.cache.put(sandbox_id, record, now))
        except BaseException as e:  # a bug must not leave waiters hanging
            if not fut.done():
                fut.set_exception(CatalogUnavailable(f"internal error: {e!r}"))
                fut.exception()
            if not isinstance(e, Exception):
                raise
            log.exception("catalog lookup of %s failed", sandbox_id)
        finally:
            self._inflight.pop(sandbox_id, None)

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
        except (RedisError, OSError, TimeoutError) as e:
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
