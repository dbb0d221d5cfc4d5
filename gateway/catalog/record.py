"""The catalog record: one JSON object per sandbox in Redis (pure: no I/O).

The contract (docs/catalog.md, restating the platform's catalog-record page): key
``{prefix}{sandboxId}``, value a JSON object written with ``SET key value [EX ttl]``:

- ``host`` (or E2B's ``orchestrator_ip`` when ``host`` is absent): the address to connect to;
- ``execution_id``: one lifecycle of the sandbox; pooled connections are keyed by it, so an
  address reused by a later sandbox never inherits a kept-alive connection;
- ``state``: ``running`` (default), ``paused`` or a transition;
- ``traffic_access_token``, ``mask_request_host``, ``ports``: access and Host policy;
- anything else is ignored (E2B also writes ``orchestrator_id``, ``sandbox_started_at``, ...).

A value that is not such an object raises :class:`RecordError`; the caller answers
``catalog_record_invalid`` and logs the message.
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass
from typing import Any

__all__ = ["STATES", "TRANSITIONS", "RecordError", "SandboxRecord", "dump_record", "parse_record"]

RUNNING = "running"
PAUSED = "paused"
TRANSITIONS = frozenset({"pausing", "resuming", "starting", "stopping"})
STATES = frozenset({RUNNING, PAUSED}) | TRANSITIONS
_HOSTNAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-.")


class RecordError(ValueError):
    """The stored value does not follow the record contract."""


@dataclass(frozen=True, slots=True)
class SandboxRecord:
    """What the gateway needs from a catalog record."""

    address: str
    execution_id: str = ""
    state: str = RUNNING
    traffic_access_token: str | None = None
    mask_request_host: str | None = None
    ports: frozenset[int] | None = None


def parse_record(raw: bytes | str) -> SandboxRecord:
    """Parse and check one stored value."""
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise RecordError(f"not JSON: {e}") from None
    if not isinstance(doc, dict):
        raise RecordError(f"not a JSON object but {type(doc).__name__}")
    address = doc.get("host")
    if address is None:
        address = doc.get("orchestrator_ip")
    if address is None:
        raise RecordError("neither 'host' nor 'orchestrator_ip' is set")
    address = _address(address)
    execution_id = _opt_str(doc, "execution_id") or ""
    state = _opt_str(doc, "state") or RUNNING
    if state not in STATES:
        raise RecordError(f"'state' {state!r} is not one of {sorted(STATES)}")
    token = _opt_str(doc, "traffic_access_token")
    if token == "":
        # Fail closed: a writer that meant a private sandbox and produced no token must not
        # publish it (absent or null is a public sandbox; an empty string is neither).
        raise RecordError("'traffic_access_token' is empty: omit it (or null) for a public sandbox")
    mask = _opt_str(doc, "mask_request_host") or None
    ports = doc.get("ports")
    port_set: frozenset[int] | None = None
    if ports is not None:
        if not isinstance(ports, list) or not all(type(p) is int and 1 <= p <= 65535 for p in ports):
            raise RecordError("'ports' must be a list of integers 1-65535")
        port_set = frozenset(ports)
    return SandboxRecord(address, execution_id, state, token, mask, port_set)


def _opt_str(doc: dict[str, Any], key: str) -> str | None:
    v = doc.get(key)
    if v is None:
        return None
    if not isinstance(v, str):
        raise RecordError(f"{key!r} must be a string, not {type(v).__name__}")
    return v


def _address(v: object) -> str:
    """An IP literal (brackets allowed around IPv6) or a DNS name."""
    if not isinstance(v, str) or not v:
        raise RecordError("the address ('host'/'orchestrator_ip') must be a non-empty string")
    a = v[1:-1] if v.startswith("[") and v.endswith("]") else v
    try:
        return str(ipaddress.ip_address(a))
    except ValueError:
        pass
    if len(a) > 253 or not _HOSTNAME_CHARS.issuperset(a) or ".." in a or a.startswith((".", "-")):
        raise RecordError(f"the address {v!r} is neither an IP address nor a host name")
    return a.lower()


def dump_record(rec: SandboxRecord, **extra: Any) -> str:
    """The JSON a writer stores for ``rec`` (the inverse of :func:`parse_record`)."""
    doc: dict[str, Any] = {"host": rec.address}
    if rec.execution_id:
        doc["execution_id"] = rec.execution_id
    if rec.state != RUNNING:
        doc["state"] = rec.state
    if rec.traffic_access_token is not None:
        doc["traffic_access_token"] = rec.traffic_access_token
    if rec.mask_request_host is not None:
        doc["mask_request_host"] = rec.mask_request_host
    if rec.ports is not None:
        doc["ports"] = sorted(rec.ports)
    doc.update(extra)
    return json.dumps(doc, separators=(",", ":"))
