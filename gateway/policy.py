"""Routing policy: from a route and its catalog record to where bytes go (pure: no I/O).

Direct mode (``node_port = 0``) connects to ``{address}:{port from the host label}``. Node mode
connects every request for a sandbox to ``{address}:{node_port}`` with the Host unchanged, so a
per-node proxy (E2B's two-tier layout) can route again; the record's ``mask_request_host`` is then
that proxy's business and not applied here.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.catalog.record import SandboxRecord
from gateway.errors import Reason
from gateway.hostname import Route

__all__ = ["Forward", "PoolKey", "decide", "pool_key"]

#: Upstream connections are pooled per (address, port, execution_id): a sandbox that is replaced at
#: the same address never receives a connection kept alive for its predecessor. A string, because
#: strings cache their hash and the pool looks this up for every request.
PoolKey = str


def pool_key(address: str, port: int, execution_id: str) -> PoolKey:
    return f"{address}|{port}|{execution_id}"


@dataclass(frozen=True, slots=True)
class Forward:
    """Where to send a request, and the Host to send it with (None: the client's, unchanged)."""

    address: str
    port: int
    key: PoolKey
    host: bytes | None = None


def decide(route: Route, record: SandboxRecord, node_port: int) -> Forward | Reason:
    if node_port:
        return Forward(record.address, node_port, pool_key(record.address, node_port, record.execution_id))
    host = None
    if record.mask_request_host is not None:
        host = record.mask_request_host.replace("${PORT}", str(route.port)).encode()
    return Forward(record.address, route.port, pool_key(record.address, route.port, record.execution_id), host)
