"""Redis clients for the catalog: a single server, a Cluster or a Sentinel-managed primary.

Every client fails fast: short socket timeouts, and one retry only for a connection that turns out
to be closed (a pooled connection to a Redis that restarted), never for a timeout. Retrying longer
inside redis-py would multiply the time a request waits; the cache's stale entries and a
Retry-After are the better answer to a hiccup, and the next request simply tries again.
"""

from __future__ import annotations

import ssl
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException, RedisError

from gateway.config import Config, parse_hostport

__all__ = ["REDIS_ERRORS", "CatalogRedis", "connect", "pubsub_nodes"]

#: The client type the catalog uses: both answer GET, SET, DEL, PUBLISH and SCAN.
CatalogRedis = aioredis.Redis | RedisCluster

#: What a failing catalog Redis raises. redis-py's Cluster client raises RedisClusterException,
#: which is *not* a RedisError, when no node answers or a slot has no owner; catching RedisError
#: alone let one unreachable moment of a Cluster end the health watcher and the invalidation
#: listener for good, and answer 503 instead of a stale record.
REDIS_ERRORS: tuple[type[BaseException], ...] = (RedisError, RedisClusterException, OSError, TimeoutError)


class _SentinelPrimary(aioredis.Redis):
    """The primary the Sentinels name; closing it closes the connections to the Sentinels too.

    redis-py leaves a ``Sentinel``'s own clients to its caller, so without this every client made
    here (one per resubscription of the invalidation listener) left a connection to a Sentinel open
    until garbage collection.
    """

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        try:
            await super().aclose(close_connection_pool)
        finally:
            sentinel: Sentinel | None = getattr(self.connection_pool, "sentinel_manager", None)
            if sentinel is not None:
                await sentinel.aclose()


def _common(cfg: Config, retry: bool = True) -> dict[str, Any]:
    return {
        "socket_timeout": cfg.redis_timeout,
        "socket_connect_timeout": cfg.redis_timeout,
        "retry": Retry(NoBackoff(), 1 if retry else 0, supported_errors=(RedisConnectionError,)),
        "decode_responses": False,
    }


def _tls(cfg: Config) -> dict[str, Any]:
    if not cfg.redis_tls:
        return {}
    out: dict[str, Any] = {"ssl": True, "ssl_cert_reqs": ssl.CERT_REQUIRED}
    if cfg.redis_tls_ca:
        out["ssl_ca_certs"] = cfg.redis_tls_ca
    return out


def _auth(cfg: Config) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if cfg.redis_username:
        out["username"] = cfg.redis_username
    if cfg.redis_password:
        out["password"] = cfg.redis_password
    return out


def connect(cfg: Config, timeout: float | None = None, retry: bool = True) -> CatalogRedis:
    """The catalog's client as configured: redis_url, redis_cluster_nodes or redis_sentinels.

    ``retry=False`` is for subscriptions: redis-py would otherwise reconnect and resubscribe
    silently, and the listener must know when that happens to flush what it may have missed.
    """
    common = _common(cfg, retry)
    if timeout is not None:
        common["socket_timeout"] = timeout
    if cfg.redis_cluster_nodes:
        nodes = [ClusterNode(*parse_hostport(a)) for a in cfg.redis_cluster_nodes]
        del common["retry"]
        return RedisCluster(startup_nodes=nodes, **common, **_auth(cfg), **_tls(cfg))
    if cfg.redis_sentinels:
        sentinels = [parse_hostport(a) for a in cfg.redis_sentinels]
        sentinel = Sentinel(  # type: ignore[no-untyped-call]  # redis-py leaves it unannotated
            sentinels, sentinel_kwargs={**common, **_tls(cfg)}, **common, **_auth(cfg), **_tls(cfg)
        )
        master: aioredis.Redis = sentinel.master_for(
            cfg.redis_sentinel_service, redis_class=_SentinelPrimary, **common, **_auth(cfg), **_tls(cfg)
        )
        return master
    kwargs = dict(common)
    if cfg.redis_url.startswith("rediss://") and cfg.redis_tls_ca:
        kwargs["ssl_ca_certs"] = cfg.redis_tls_ca
    client: aioredis.Redis = aioredis.Redis.from_url(cfg.redis_url, health_check_interval=0, **kwargs)
    return client


async def pubsub_nodes(client: CatalogRedis, cfg: Config) -> list[aioredis.Redis]:
    """New clients, without retries, to subscribe on: the server (or the Sentinel's current
    primary), or every primary of a Cluster (``client`` tells which ones).

    Keyspace notifications are per node, so a Cluster's come from each primary; a PUBLISH reaches
    every node, so the invalidation channel needs only one of them.
    """
    if isinstance(client, RedisCluster):
        await client.initialize()
        # Ask the cluster for its primaries now. The client refreshes its map only when one of its
        # own commands fails; after a failover it can still name the dead primary while every
        # request is answered from the cache, and the listener would retry that one forever.
        await client.nodes_manager.initialize()
        kw = {**_common(cfg, retry=False), **_auth(cfg), **_tls(cfg)}
        return [aioredis.Redis(host=n.host, port=int(n.port), **kw) for n in client.get_primaries()]
    node = connect(cfg, retry=False)
    assert isinstance(node, aioredis.Redis)
    return [node]
