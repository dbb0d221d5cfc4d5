"""Resume on traffic: a request for a paused sandbox asks the control plane to resume it.

With ``resume_url`` set, the first request for a paused sandbox POSTs ``{"sandboxId", "port"}``
there; every request for that sandbox arriving meanwhile waits on the same attempt (one POST per
sandbox, however many requests). The control plane's answer maps to a reason: 403
``resume_denied``, 409 ``sandbox_transitioning``, 429 ``resume_rate_limited``, anything else but 2xx
``resume_failed``. After a 2xx the gateway waits up to ``resume_timeout`` for the record to say
``running`` (woken by the invalidation message the writer publishes, re-reading at least every
250 ms), then the waiting requests go on; past the timeout they get 504 ``resume_timeout``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import aiohttp

from gateway import errors
from gateway.catalog.cache import Entry
from gateway.catalog.reader import Catalog, CatalogUnavailable
from gateway.errors import Reason

__all__ = ["Resumer"]

log = logging.getLogger("gateway.resume")

_ANSWERS = {403: errors.RESUME_DENIED, 409: errors.SANDBOX_TRANSITIONING, 429: errors.RESUME_RATE_LIMITED}
POLL = 0.25


class Resumer:
    def __init__(self, catalog: Catalog, url: str, timeout: float) -> None:
        self.catalog = catalog
        self.url = url
        self.timeout = timeout
        self._inflight: dict[str, asyncio.Future[Entry | Reason]] = {}
        self._changed: dict[str, asyncio.Event] = {}
        self._session: aiohttp.ClientSession | None = None
        self.posts = 0  # POSTs made (tests count them)

    async def resume(self, sandbox_id: str, port: int) -> Entry | Reason:
        """The running record once the sandbox is back, or why it is not."""
        fut = self._inflight.get(sandbox_id)
        if fut is None:
            fut = self._inflight[sandbox_id] = asyncio.get_running_loop().create_future()
            asyncio.get_running_loop().create_task(self._resume(sandbox_id, port, fut))
        return await asyncio.shield(fut)

    def changed(self, sandbox_id: str) -> None:
        """The catalog says this sandbox's record changed: a waiting resume looks again."""
        ev = self._changed.get(sandbox_id)
        if ev is not None:
            ev.set()

    async def _resume(self, sandbox_id: str, port: int, fut: asyncio.Future[Entry | Reason]) -> None:
        ev = self._changed[sandbox_id] = asyncio.Event()
        try:
            answer = await self._post(sandbox_id, port)
            fut.set_result(answer if answer is not None else await self._wait_running(sandbox_id, ev))
        except Exception as e:  # a bug must not leave requests waiting
            log.exception("resuming %s failed", sandbox_id)
            if not fut.done():
                fut.set_result(errors.RESUME_FAILED)
            if not isinstance(e, Exception):
                raise
        finally:
            self._inflight.pop(sandbox_id, None)
            self._changed.pop(sandbox_id, None)

    async def _post(self, sandbox_id: str, port: int) -> Reason | None:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout))
        self.posts += 1
        try:
            async with self._session.post(self.url, json={"sandboxId": sandbox_id, "port": port}) as r:
                await r.read()
                if 200 <= r.status < 300:
                    return None
                log.info("resume of %s answered %d", sandbox_id, r.status)
                return _ANSWERS.get(r.status, errors.RESUME_FAILED)
        except (aiohttp.ClientError, TimeoutError) as e:
            log.warning("resume of %s failed: %s", sandbox_id, e)
            return errors.RESUME_FAILED

    async def _wait_running(self, sandbox_id: str, ev: asyncio.Event) -> Entry | Reason:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        while True:
            ev.clear()
            self.catalog.invalidate(sandbox_id)
            with contextlib.suppress(CatalogUnavailable):
                e = await self.catalog.lookup(sandbox_id)
                if e.record is None:
                    return errors.SANDBOX_NOT_FOUND if e.invalid is None else errors.CATALOG_RECORD_INVALID
                if e.record.state == "running":
                    return e
            left = deadline - loop.time()
            if left <= 0:
                return errors.RESUME_TIMEOUT
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(POLL, left)):
                    await ev.wait()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
