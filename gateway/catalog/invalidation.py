"""Follow catalog changes: the invalidation channel, and keyspace notifications when Redis sends them.

Writers publish a sandbox ID on ``invalidate_channel`` after every change (docs/catalog.md). The
gateway also pattern-subscribes to ``__keyspace@{db}__:{prefix}*``: a Redis configured with
``notify-keyspace-events`` then announces changes by writers that do not publish (a TTL expiry
too). On every (re)subscription the whole cache is flushed, because messages sent while the
subscription was down are lost; the cache TTL remains the backstop for writers that do neither.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import redis.asyncio as aioredis
from redis.exceptions import NoPermissionError

from gateway.catalog.connection import REDIS_ERRORS, CatalogRedis, pubsub_nodes
from gateway.catalog.reader import Catalog
from gateway.config import Config

__all__ = ["InvalidationListener"]

log = logging.getLogger("gateway.catalog")


class InvalidationListener:
    """Subscribes, reconnects with backoff, and calls ``changed(sandbox_id)`` for each change."""

    def __init__(self, cfg: Config, client: CatalogRedis, catalog: Catalog, changed: Callable[[str], None]) -> None:
        self.cfg = cfg
        self.client = client
        self.catalog = catalog
        self.changed = changed
        self.subscriptions = 0  # (re)subscriptions so far; tests and /ready look at it
        self.subscribed = asyncio.Event()  # set once Redis confirmed the subscriptions
        self._keyspace_refused = False
        self._prefix = cfg.catalog_prefix.encode()

    def _keyspace_pattern(self, node: aioredis.Redis) -> bytes:
        db = node.connection_pool.connection_kwargs.get("db", 0) if hasattr(node, "connection_pool") else 0
        return b"__keyspace@%d__:" % int(db or 0) + self._prefix + b"*"

    async def run(self) -> None:
        delay = 0.1
        failing = False
        while True:
            try:
                nodes = await pubsub_nodes(self.client, self.cfg)
                await self._listen(nodes)
            except asyncio.CancelledError:
                raise
            except REDIS_ERRORS as e:
                if self.subscribed.is_set():
                    # It was working: retry at once, and back off only while attempts keep failing
                    # (the delay used to stay at its maximum for the rest of the process's life).
                    delay = 0.1
                    log.warning("catalog subscription lost (%s); resubscribing", e)
                elif not failing:
                    log.warning("cannot follow catalog changes (%s); retrying", e)
                failing = True
                self.subscribed.clear()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

    async def _confirmed(self, ps: aioredis.client.PubSub, kind: str) -> None:
        """Until Redis confirms the (p)subscription: changes after that are sure to be announced."""
        wait = self.cfg.redis_timeout * 4
        async with asyncio.timeout(wait):
            while True:
                msg = await ps.get_message(timeout=wait)
                if msg is not None and msg.get("type") == kind:
                    return

    async def _listen(self, nodes: list[aioredis.Redis]) -> None:
        pubsubs = [n.pubsub() for n in nodes]
        try:
            reading = [pubsubs[0]]
            await pubsubs[0].subscribe(self.cfg.invalidate_channel)
            await self._confirmed(pubsubs[0], "subscribe")
            if self.cfg.keyspace_notifications:
                for n, ps in zip(nodes, pubsubs, strict=True):
                    await ps.psubscribe(self._keyspace_pattern(n))
                    try:
                        await self._confirmed(ps, "psubscribe")
                    except NoPermissionError as e:
                        # An ACL user allowed the invalidation channel but not the keyspace channels.
                        # The notifications are an extra: follow the channel alone rather than
                        # dropping it too and flushing the cache on every retry.
                        if not self._keyspace_refused:
                            log.warning("keyspace notifications not followed (%s); the channel still is", e)
                        self._keyspace_refused = True
                        continue
                    if ps is not pubsubs[0]:
                        reading.append(ps)
            # Subscribed (again): whatever changed while we were not is unknown, so forget it all.
            self.catalog.flush()
            self.subscriptions += 1
            self.subscribed.set()
            log.info("following catalog changes on %s (%d node(s))", self.cfg.invalidate_channel, len(nodes))
            await asyncio.gather(*(self._read(ps) for ps in reading))
        finally:
            # Bounded: this also runs when the task is cancelled at shutdown, maybe with Redis frozen.
            for ps in pubsubs:
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(1.0):
                        await ps.aclose()  # type: ignore[no-untyped-call]
            for n in nodes:
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(1.0):
                        await n.aclose()

    async def _read(self, ps: aioredis.client.PubSub) -> None:
        prefix = self._prefix
        while True:
            msg = await ps.get_message(timeout=1.0)
            if msg is None:
                continue
            data = msg.get("data")
            if msg.get("type") == "pmessage":  # keyspace: the channel names the key
                channel = msg.get("channel", b"")
                key = channel.split(b":", 1)[1] if b":" in channel else b""
                if not key.startswith(prefix):
                    continue
                sandbox_id = key[len(prefix) :]
            elif isinstance(data, bytes):
                sandbox_id = data
            else:
                continue
            try:
                self.changed(sandbox_id.decode("ascii"))
            except (UnicodeDecodeError, ValueError):
                continue
