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
- The gateway never connects to its own listeners (data and admin): a record whose address is
  this machine, at one of their ports, would let a sandbox URL reach the admin app's ``/metrics``
  or loop requests through the gateway (:class:`OwnListeners`, parsed once, checked on every new
  connection, for any address a record may name: a name, ``0.0.0.0``, an address of this machine).
- Direct mode (``node_port = 0``) connects to ``{address}:{port from the host label}``. Node mode
  connects every request for a sandbox to ``{address}:{node_port}`` with the Host unchanged, so a
  per-node proxy (E2B's two-tier layout) can route again; the record's ``mask_request_host`` is then
  that proxy's business and not applied here.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Collection
from dataclasses import dataclass

from gateway import errors
from gateway.catalog.record import PAUSED, RUNNING, SandboxRecord
from gateway.errors import Reason
from gateway.hostname import Route

__all__ = ["Endpoint", "Forward", "OwnListeners", "PoolKey", "check_token", "decide", "pool_key"]

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


#: An IP address (as text) and a TCP port.
Endpoint = tuple[str, int]
_IP = ipaddress.IPv4Address | ipaddress.IPv6Address


def _ip(text: str) -> _IP | None:
    try:
        a = ipaddress.ip_address(text.split("%", 1)[0])  # no IPv6 zone
    except ValueError:
        return None
    if a.version == 6 and a.ipv4_mapped is not None:
        return a.ipv4_mapped
    return a


@dataclass(frozen=True, slots=True)
class OwnListeners:
    """The gateway's own listeners (data and admin, as bound), parsed once (:meth:`parse`, at start
    in server.py): checking a new upstream connection then costs a set lookup or two, not a parse
    of every listener address.

    A listener is an address, or ``0.0.0.0``/``::`` for every address of this machine in that family
    (``::`` is IPv6 only: the listeners are bound with IPV6_V6ONLY). IPv4-mapped IPv6 addresses
    (``::ffff:a.b.c.d``) are the IPv4 address they map, on either side; an IPv6 zone (``%eth0``) is
    not part of the address. A listener address that is not an IP never matches.
    """

    #: (address, port) of the listeners bound to one address.
    exact: frozenset[tuple[_IP, int]] = frozenset()
    #: Ports of the listeners bound to every IPv4 (``0.0.0.0``) / IPv6 (``::``) address of the machine.
    any_v4: frozenset[int] = frozenset()
    any_v6: frozenset[int] = frozenset()

    @classmethod
    def parse(cls, listeners: Collection[Endpoint]) -> OwnListeners:
        exact: set[tuple[_IP, int]] = set()
        any_v4: set[int] = set()
        any_v6: set[int] = set()
        for host, port in listeners:
            h = _ip(host)
            if h is None:
                continue
            if h.is_unspecified:
                (any_v4 if h.version == 4 else any_v6).add(port)
            else:
                exact.add((h, port))
        return cls(frozenset(exact), frozenset(any_v4), frozenset(any_v6))

    def __bool__(self) -> bool:
        return bool(self.exact or self.any_v4 or self.any_v6)

    def reached(self, peer: Endpoint, local: str) -> bool:
        """Whether a connection made from address ``local`` to ``peer`` reached one of them.

        ``peer`` is where the kernel connected (a name resolved, ``0.0.0.0`` already turned into
        ``127.0.0.1``). An address is this machine's when it is loopback or unspecified, or when it
        is the connection's own source address: for a destination on this machine the kernel routes
        through its local table, whose source address is the destination itself (``ip route get``).
        """
        ip = _ip(peer[0])
        if ip is None:
            return False
        port = peer[1]
        if (ip, port) in self.exact:
            return True
        if port not in (self.any_v4 if ip.version == 4 else self.any_v6):
            return False
        return ip.is_loopback or ip.is_unspecified or ip == _ip(local)
