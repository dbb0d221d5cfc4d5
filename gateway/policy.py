"""Routing policy: from a route and its catalog record to where bytes go (pure: no I/O).

- ``state``: ``running`` routes; ``paused`` is 409 ``sandbox_paused`` (unless the gateway may resume
  it, see proxy.py); a transition (``starting``, ``pausing``, ``resuming``, ``stopping``) is 409
  ``sandbox_transitioning`` with Retry-After, its message naming the state.
- ``ports``: when set, any other port is 403 ``port_not_exposed``.
- ``traffic_access_token``: requests must carry it in the token field (``traffic_token_header``),
  compared in constant time (hmac.compare_digest), except on ``token_exempt_ports`` (E2B's
  in-sandbox daemon port); 403 ``traffic_token_missing`` / ``traffic_token_invalid``. The field is
  never forwarded. Browsers present it through an access link and cookie instead (access.py,
  http/admission.py).
- Direct mode (``node_port = 0``) connects to ``{address}:{port from the host label}``. Node mode
  connects every request for a sandbox to ``{address}:{node_port}`` with the Host unchanged, so a
  per-node proxy (E2B's two-tier layout) can route again; the record's ``mask_request_host`` is then
  that proxy's business and not applied here.
"""

from __future__ import annotations

import hmac
from collections.abc import Collection
from dataclasses import dataclass

from gateway import errors
from gateway.catalog.record import PAUSED, RUNNING, SandboxRecord
from gateway.errors import Reason
from gateway.hostname import Route

__all__ = ["Forward", "PoolKey", "check_token", "decide", "pool_key"]

#: Upstream connections are pooled per (address, port, execution_id): a sandbox that is replaced at
#: the same address never receives a connection kept alive for its predecessor. A string, because
#: strings cache their hash and the pool looks this up for every request.
PoolKey = str


def pool_key(address: str, port: int, execution_id: str) -> PoolKey:
    return f"{address}|{port}|{execution_id}"


@dataclass(frozen=True, slots=True)
class Forward:
    """Where to send a request, and the Host to send it with (None: the client's, unchanged).

    ``token`` is the traffic token requests must present (None: none needed on this port).
    """

    address: str
    port: int
    key: PoolKey
    host: bytes | None = None
    token: bytes | None = None
    execution_id: str = ""

    @property
    def upstream(self) -> str:
        """``address:port`` as logged (IPv6 in brackets)."""
        a = self.address
        return f"[{a}]:{self.port}" if ":" in a else f"{a}:{self.port}"


def decide(route: Route, record: SandboxRecord, node_port: int, exempt_ports: Collection[int] = ()) -> Forward | Reason:
    """The routing decision for a port of a sandbox: the same for every request while the record is."""
    if record.state != RUNNING:
        return errors.SANDBOX_PAUSED if record.state == PAUSED else errors.transitioning(record.state)
    if record.ports is not None and route.port not in record.ports:
        return errors.PORT_NOT_EXPOSED
    token = None
    if record.traffic_access_token is not None and route.port not in exempt_ports:
        token = record.traffic_access_token.encode()
    if node_port:
        key = pool_key(record.address, node_port, record.execution_id)
        return Forward(record.address, node_port, key, None, token, record.execution_id)
    host = None
    if record.mask_request_host is not None:
        host = record.mask_request_host.replace("${PORT}", str(route.port)).encode()
    key = pool_key(record.address, route.port, record.execution_id)
    return Forward(record.address, route.port, key, host, token, record.execution_id)


def check_token(expected: bytes, presented: bytes | None) -> Reason | None:
    """None if ``presented`` is the sandbox's token; compared in constant time."""
    if presented is None:
        return errors.TRAFFIC_TOKEN_MISSING
    if not hmac.compare_digest(expected, presented):
        return errors.TRAFFIC_TOKEN_INVALID
    return None
