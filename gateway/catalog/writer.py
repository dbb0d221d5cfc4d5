"""The writer API for control planes: put, get, delete and scan catalog records.

A control plane in Python uses :class:`CatalogWriter`; one in another language follows the same
contract (docs/catalog.md): ``SET {prefix}{id} {json} [EX ttl]`` then ``PUBLISH {channel} {id}``,
and ``DEL`` then ``PUBLISH`` to remove. Publishing after every change is what lets every gateway drop
its cached copy at once instead of after its cache TTL.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from gateway.catalog.connection import CatalogRedis
from gateway.catalog.record import RecordError, SandboxRecord, dump_record, parse_record
from gateway.hostname import valid_sandbox_id

__all__ = ["CatalogWriter"]


def check_id(sandbox_id: str) -> str:
    if not valid_sandbox_id(sandbox_id):
        raise ValueError(f"sandbox ID {sandbox_id!r} is not [a-z0-9]{{1,64}}")
    return sandbox_id


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
