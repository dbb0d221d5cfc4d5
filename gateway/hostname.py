"""The host grammar: which sandbox and port a Host names (pure: no I/O).

A sandbox app is reached at ``{port}-{sandboxId}.{domain}`` (the form E2B's SDK prints) or the
older ``{port}-{sandboxId}-{clientId}.{domain}``. This module turns a Host field value into a
:class:`Route` or the :class:`~gateway.errors.Reason` it is not one:

- Host syntax is RFC 9110 §7.2 (``uri-host [":" port]``); names compare case-insensitively
  (RFC 9110 §4.2.3), and one trailing dot (a fully qualified name) is the same host.
- The port in the label is decimal 1-65535 with no sign and no leading zero, so every port has
  exactly one spelling (a cache key, a metric, a log line all agree).
- IDs are ``[a-z0-9]{1,64}``: the alphabet E2B's API hands out, and short enough for one DNS label.

:func:`check_domain` runs once at startup: it uses tldextract's bundled Public Suffix List snapshot,
never the network, to refuse a domain that is itself a public suffix (``com``, ``co.uk``): routing
every name under it would be a configuration accident.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass

import tldextract

from gateway import errors
from gateway.errors import Reason

__all__ = [
    "HostRouter",
    "Route",
    "authority_matches",
    "check_domain",
    "normalize_host",
    "parse_label",
    "parse_routing_fields",
    "valid_sandbox_id",
]

_LABEL_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-")
_HOST_CHARS = _LABEL_CHARS | {"."}
_ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789")
MAX_ID_LENGTH = 64
_DEFAULT_PORTS = {b"http": b"80", b"https": b"443", b"ws": b"80", b"wss": b"443"}


@dataclass(frozen=True, slots=True)
class Route:
    """Where a request goes: a port inside a sandbox."""

    port: int
    sandbox_id: str
    client_id: str | None = None

    @property
    def label(self) -> str:
        """The leftmost host label that names this route."""
        base = f"{self.port}-{self.sandbox_id}"
        return base if self.client_id is None else f"{base}-{self.client_id}"


def valid_sandbox_id(s: str) -> bool:
    """``[a-z0-9]{1,64}``: the grammar of sandbox (and client) IDs."""
    return 0 < len(s) <= MAX_ID_LENGTH and _ID_CHARS.issuperset(s)


def parse_label(label: str) -> Route | Reason:
    """``{port}-{sandboxId}[-{clientId}]`` (already lower-case) to a Route, or why not."""
    parts = label.split("-")
    if len(parts) not in (2, 3):
        return errors.INVALID_HOST
    p = parts[0]
    if not (0 < len(p) <= 5 and p.isascii() and p.isdigit()) or p[0] == "0":
        return errors.INVALID_PORT
    port = int(p)
    if port > 65535:
        return errors.INVALID_PORT
    if not valid_sandbox_id(parts[1]):
        return errors.INVALID_SANDBOX_ID
    client_id = None
    if len(parts) == 3:
        if not valid_sandbox_id(parts[2]):
            return errors.INVALID_HOST
        client_id = parts[2]
    return Route(port, parts[1], client_id)


def normalize_host(raw: bytes) -> str | Reason:
    """A Host field value to a lower-case name without port or trailing dot.

    IP literals come back as written (``[::1]``, ``10.0.0.1``); they are never sandbox hosts.
    """
    try:
        h = raw.decode("ascii").strip(" \t").lower()
    except UnicodeDecodeError:
        return errors.INVALID_HOST
    if h.startswith("["):
        end = h.find("]")
        if end < 0 or (end + 1 < len(h) and not _is_port_suffix(h[end + 1 :])):
            return errors.INVALID_HOST
        return h[: end + 1]
    colon = h.rfind(":")
    if colon >= 0:
        if not _is_port_suffix(h[colon:]):
            return errors.INVALID_HOST
        h = h[:colon]
    if h.endswith("."):
        h = h[:-1]
    if not h or h.endswith(".") or not _HOST_CHARS.issuperset(h) or ".." in h or h.startswith("."):
        return errors.INVALID_HOST
    return h


def _is_port_suffix(s: str) -> bool:
    """``:`` followed by a TCP port, 1-65535 in decimal (RFC 3986 §3.2.3 allows an empty port too)."""
    if s[:1] != ":" or len(s) > 6:
        return False
    p = s[1:]
    return not p or (p.isascii() and p.isdigit() and 0 < int(p) < 65536)


def parse_routing_fields(sandbox_id: bytes | None, port: bytes | None) -> Route | Reason:
    """The route a request to a shared host names in its routing fields (both are needed).

    Each field is one value with the grammar of its part of a host label: the port ``1*5DIGIT``,
    1-65535 without a leading zero, the ID ``[a-z0-9]{1,64}`` (compared case-insensitively, like
    a host name). Anything else, a field sent twice included (the caller passes
    :data:`~gateway.http.headers.REPEATED`), is ``invalid_routing_header``: never a partial match
    (``3000-pub`` once routed to a sandbox ``pub``) and never a choice between two values.
    """
    if sandbox_id is None and port is None:
        return errors.NO_SANDBOX_IN_HOST  # a person at the bare address, most likely
    if sandbox_id is None or port is None:
        return errors.MISSING_ROUTING_HEADER
    p = port.strip(b" \t")
    sid = sandbox_id.strip(b" \t").lower()
    if not (0 < len(p) <= 5 and p.isdigit()) or p[0] == 48 or int(p) > 65535:  # 48: "0"
        return errors.INVALID_ROUTING_HEADER
    if not (sid.isascii() and valid_sandbox_id(sid.decode("ascii"))):
        return errors.INVALID_ROUTING_HEADER
    return Route(int(p), sid.decode("ascii"))


def _ipv4(name: str) -> bool:
    parts = name.split(".")
    return len(parts) == 4 and all(x.isdigit() and len(x) <= 3 and int(x) < 256 for x in parts)


class HostRouter:
    """Routes Host values under the configured domains, with a bounded memo of recent answers.

    ``route`` answers a Route, a Reason, or None for a shared host (one of ``shared_hosts``, an IP
    literal, ``localhost`` or a bare configured domain), whose requests name the sandbox in routing
    fields instead, so an SDK can reach many sandboxes over one connection.

    A gateway sees few distinct Host values per second compared to requests, so the answer for the
    exact bytes of a Host field is memoised: the hot path is one dict lookup.
    """

    __slots__ = ("_domains", "_memo", "_memo_size", "_shared")

    def __init__(self, domains: Iterable[str], memo_size: int = 8192, shared_hosts: Iterable[str] = ()) -> None:
        # Longest first, so "eu.e2b.dev" wins over "e2b.dev" for "3000-x.eu.e2b.dev".
        self._domains = tuple(sorted({d.lower().rstrip(".") for d in domains}, key=len, reverse=True))
        self._shared = frozenset({"localhost", *(h.lower().rstrip(".") for h in shared_hosts)})
        self._memo: dict[bytes, Route | Reason | None] = {}
        self._memo_size = memo_size

    @property
    def domains(self) -> tuple[str, ...]:
        return self._domains

    def route(self, host: bytes) -> Route | Reason | None:
        try:
            return self._memo[host]
        except KeyError:
            r = self._route(host)
            if len(self._memo) >= self._memo_size:
                self._memo.clear()
            self._memo[host] = r
            return r

    def _route(self, host: bytes) -> Route | Reason | None:
        name = normalize_host(host)
        if isinstance(name, Reason):
            return name
        if name.startswith("[") or name in self._shared or _ipv4(name) or name in self._domains:
            return None  # no sandbox in the name: routing fields (or the health path) decide
        for d in self._domains:
            if len(name) > len(d) + 1 and name.endswith(d) and name[-len(d) - 1] == ".":
                label = name[: -len(d) - 1]
                if "." in label:
                    return errors.INVALID_HOST
                return parse_label(label)
        return errors.UNKNOWN_DOMAIN


def authority_matches(target: bytes, host: bytes) -> bool | None:
    """For an absolute-form request target (RFC 9112 §3.2.2), whether its authority is ``host``.

    Returns None when ``target`` is not absolute-form. Names compare case-insensitively and
    without a trailing dot; an absent port equals the scheme's default port.
    """
    sep = target.find(b"://")
    if sep <= 0 or target[:1] == b"/":
        return None
    scheme = target[:sep].lower()
    rest = target[sep + 3 :]
    end = len(rest)
    for ch in (b"/", b"?", b"#"):
        i = rest.find(ch)
        if 0 <= i < end:
            end = i
    authority = rest[:end]
    if b"@" in authority:  # userinfo is deprecated (RFC 9110 §4.2.4) and never a sandbox host
        return False
    default = _DEFAULT_PORTS.get(scheme, b"")
    return _split_authority(authority, default) == _split_authority(host.strip(b" \t"), default)


def _split_authority(a: bytes, default_port: bytes) -> tuple[bytes, bytes]:
    a = a.lower()
    if a.startswith(b"["):
        end = a.find(b"]")
        host, port = a[: end + 1], a[end + 2 :] if end >= 0 else b""
    else:
        host, _, port = a.partition(b":")
    if host.endswith(b"."):
        host = host[:-1]
    return host, port or default_port


def check_domain(domain: str) -> tuple[str | None, str | None]:
    """Validate one configured domain: ``(problem, warning)``; a problem refuses to start.

    Uses tldextract's bundled snapshot only (``suffix_list_urls=()``): startup never touches the
    network.
    """
    d = domain.lower().rstrip(".")
    labels = d.split(".")
    if (
        not d
        or len(d) > 253
        or any(not lb or len(lb) > 63 or lb[0] == "-" or lb[-1] == "-" for lb in labels)
        or not _HOST_CHARS.issuperset(d)
    ):
        return f"{domain!r} is not a DNS name", None
    ext = _extractor()(d)
    if ext.suffix and not ext.domain:
        return f"{domain!r} is a public suffix: every site under it would be routed here", None
    if not ext.suffix:
        return None, f"{domain!r} is not under a public suffix (fine for local or private DNS)"
    return None, None


@functools.cache
def _extractor() -> tldextract.TLDExtract:
    return tldextract.TLDExtract(cache_dir=None, suffix_list_urls=(), fallback_to_snapshot=True)
