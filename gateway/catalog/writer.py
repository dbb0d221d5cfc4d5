"""The writer API for control planes: put, get, delete and scan catalog records.

A control plane in Python uses :class:`CatalogWriter`; one in another language follows the same
contract (docs/catalog.md): ``SET {prefix}{id} {json} [EX ttl]`` then ``PUBLISH {channel} {id}``,
and ``DEL`` then ``PUBLISH`` to remove. Publishing after every change is what lets every gateway drop
its cached copy at once instead of after its cache TTL.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from gateway import access
from gateway.catalog.connection import CatalogRedis
from gateway.catalog.record import RecordError, SandboxRecord, dump_record, parse_record
from gateway.hostname import valid_sandbox_id

__all__ = ["CatalogWriter", "access_link"]


def check_id(sandbox_id: str) -> str:
    if not valid_sandbox_id(sandbox_id):
        raise ValueError(f"sandbox ID {sandbox_id!r} is not [a-z0-9]{{1,64}}")
    return sandbox_id


def access_link(
    token: str,
    sandbox_id: str,
    port: int,
    domain: str,
    ttl: int = 3600,
    *,
    any_port: bool = False,
    scheme: str = "https",
    path: str = "/",
    param: str = "e2b_access",
    now: float | None = None,
) -> str:
    """A signed link that opens ``port`` of a private sandbox in a browser for ``ttl`` seconds.

    ``token`` is the record's ``traffic_access_token`` (a control plane has it: no Redis read
    needed); rotating it in the record revokes the link and every cookie it gave. The format, for
    control planes in other languages, is in docs/catalog.md ("Access links").
    """
    if ttl <= 0:
        raise ValueError("ttl must be positive")
    expires = int(time.time() if now is None else now) + ttl
    return access.link_url(
        token, check_id(sandbox_id), port, expires, domain, any_port=any_port, scheme=scheme, path=path, param=param
    )


class CatalogWriter:
    def __init__(self, client: CatalogRedis, prefix: str = "sandbox:catalog:",
                 channel: str = "sandbox:catalog:invalidate") -> None:  # fmt: skip
        self.redis = client
        self.prefix = prefix
        self.channel = channel

    async def put(self, sandbox_id: str, record: SandboxRecord, ttl: int | None = None) -> None:
        """Store ``record`` (for ``ttl`` seconds: the sandbox's remaining lifetime) and announce it.

        The stored JSON is parsed back first, so a record a gateway would refuse (an address that is
        not one, a port out of range) raises RecordError here instead of reaching Redis.
        """
        value = dump_record(record)
        parse_record(value)
        await self.redis.set(self.prefix + check_id(sandbox_id), value, ex=ttl)
        await self.redis.publish(self.channel, sandbox_id)

    async def get(self, sandbox_id: str) -> SandboxRecord | None:
        """The stored record, None if there is none; RecordError if it breaks the contract."""
        raw = await self.redis.get(self.prefix + check_id(sandbox_id))
        return None if raw is None else parse_record(raw)

    async def link(self, sandbox_id: str, port: int, domain: str, ttl: int = 3600, **options: Any) -> str:
        """:func:`access_link` with the token read from the stored record. LookupError: no record;
        ValueError: the sandbox is public (no token, so no link is needed)."""
        rec = await self.get(sandbox_id)
        if rec is None:
            raise LookupError(f"no record for {sandbox_id}")
        if rec.traffic_access_token is None:
            raise ValueError(f"sandbox {sandbox_id} is public (no traffic_access_token): no link is needed")
        return access_link(rec.traffic_access_token, sandbox_id, port, domain, ttl, **options)

    async def delete(self, sandbox_id: str) -> bool:
        """Remove the record and announce it; False if there was none."""
        removed = int(await self.redis.delete(self.prefix + check_id(sandbox_id)))
        await self.redis.publish(self.channel, sandbox_id)
        return removed > 0

    async def scan(self, count: int = 1000) -> AsyncIterator[tuple[str, SandboxRecord | RecordError]]:
        """Every record under the prefix, as (sandbox ID, record or why it is invalid)."""
        async for key in self.redis.scan_iter(match=self.prefix + "*", count=count):
            sandbox_id = (key.decode() if isinstance(key, bytes) else key)[len(self.prefix) :]
            raw = await self.redis.get(key)
            if raw is None:
                continue
            try:
                yield sandbox_id, parse_record(raw)
            except RecordError as e:
                yield sandbox_id, e
