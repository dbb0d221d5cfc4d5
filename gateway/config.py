"""One frozen Config: defaults < TOML file < GATEWAY_* environment < command-line flags.

Every setting is declared once, below, with its default and a one-line meaning; the TOML file
(config/gateway.toml), the environment variables and the docs are checked against this list by the
tests. A bad value raises :class:`ConfigError` naming the setting, and the CLI exits with status 2.
"""

from __future__ import annotations

import ipaddress
import json
import math
import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field, fields, replace
from typing import Any
from urllib.parse import urlsplit

from gateway.hostname import check_domain
from gateway.http import hdrs

__all__ = ["Config", "ConfigError", "example_toml", "load_config", "parse_hostport", "settings_table"]


class ConfigError(ValueError):
    """A setting has a bad value: ``setting`` names it, ``problem`` says what is wrong."""

    def __init__(self, setting: str, problem: str) -> None:
        super().__init__(f"setting {setting!r}: {problem}")
        self.setting = setting
        self.problem = problem


def _s(default: Any, doc: str, check: Callable[[Any], str | None] | None = None) -> Any:
    return field(default=default, metadata={"doc": doc, "check": check})


def _positive(v: float) -> str | None:
    return None if v > 0 else "must be > 0"


def _non_negative(v: float) -> str | None:
    return None if v >= 0 else "must be >= 0"


_non_negative_int = _non_negative


def _tls_version(v: str) -> str | None:
    return None if v in ("1.2", "1.3") else "use 1.2 or 1.3"


def _request_id_header(v: str) -> str | None:
    return None if v == "" else _field_name(v)


def _port_or_zero(v: int) -> str | None:
    return None if 0 <= v <= 65535 else "must be a TCP port (1-65535), or 0"


def _hostports(v: tuple[str, ...]) -> str | None:
    if not v:
        return "needs at least one HOST:PORT"
    for a in v:
        try:
            parse_hostport(a)
        except ValueError as e:
            return str(e)
    return None


def _hostport(v: str) -> str | None:
    return _hostports((v,))


def _listeners(v: tuple[str, ...]) -> str | None:
    if not v:
        return "needs at least one HOST:PORT"
    for a in v:
        try:
            parse_listener(a)
        except ValueError as e:
            return str(e)
    return None


def _certificates(v: tuple[str, ...]) -> str | None:
    for c in v:
        cert, sep, key = c.partition(":")
        if not sep or not cert or not key:
            return f"{c!r} is not CERT_FILE:KEY_FILE"
    return None


def _path(v: str) -> str | None:
    return None if v.startswith("/") and " " not in v else f"{v!r} is not an absolute path"


def _log_target(v: str) -> str | None:
    return None if v else "use stdout, stderr, off or a file path"


def _hostports_or_none(v: tuple[str, ...]) -> str | None:
    return _hostports(v) if v else None


def _field_name(v: str) -> str | None:
    ok = v and all(c.isalnum() or c in "!#$%&'*+-.^_`|~" for c in v)
    return None if ok else f"{v!r} is not a header field name"


def _field_names(v: tuple[str, ...]) -> str | None:
    for n in v:
        problem = _field_name(n)
        if problem:
            return problem
    return None


def _plain_name(v: str) -> str | None:
    """A name that needs no escaping as a query parameter or cookie name: [A-Za-z0-9_.-]+."""
    ok = v and all(c.isascii() and (c.isalnum() or c in "_.-") for c in v)
    return None if ok else f"{v!r} must be letters, digits, '_', '.' or '-'"


def _ports(v: tuple[int, ...]) -> str | None:
    return None if all(0 < p < 65536 for p in v) else "ports must be 1-65535"


def _host_names(v: tuple[str, ...]) -> str | None:
    for h in v:
        if not h or not all(c.isalnum() or c in ".-" for c in h):
            return f"{h!r} is not a host name"
    return None


def _redis_url(v: str) -> str | None:
    if v == "":
        return None
    u = urlsplit(v)
    if u.scheme not in ("redis", "rediss", "unix"):
        return f"{v!r}: scheme must be redis://, rediss:// or unix://"
    return None


def _cidrs(v: tuple[str, ...]) -> str | None:
    for c in v:
        try:
            ipaddress.ip_network(c, strict=False)
        except ValueError:
            return f"{c!r} is not an IP network (CIDR) or address"
    return None


def _domains(v: tuple[str, ...]) -> str | None:
    if not v:
        return "needs at least one domain"
    for d in v:
        problem, _ = check_domain(d)
        if problem:
            return problem
    return None


def _tokens(v: tuple[str, ...]) -> str | None:
    for t in v:
        if not t or not t.replace("-", "").replace(".", "").isalnum():
            return f"{t!r} is not an upgrade protocol token"
    return None


def _log_level(v: str) -> str | None:
    return None if v.upper() in ("DEBUG", "INFO", "WARNING", "ERROR") else "must be debug, info, warning or error"


@dataclass(frozen=True, slots=True)
class Config:
    """Every setting of the gateway, with its default (see config/gateway.toml)."""

    # Listeners
    listen: tuple[str, ...] = _s(
        ("127.0.0.1:8080", "[::1]:8080"),  # both loopbacks: browsers try ::1 first for *.localhost
        "data-plane listeners: 'HOST:PORT [tls] [proxy|proxy-optional]' (IPv6: [::1]:8080); tls terminates TLS, "
        "proxy requires a PROXY protocol v1/v2 header; the default is both loopbacks",
        _listeners,
    )
    admin_listen: str = _s("127.0.0.1:8081", "admin listener (/health, /ready, /metrics), HOST:PORT", _hostport)
    tls_certificates: tuple[str, ...] = _s(
        (),
        "CERT_FILE:KEY_FILE pairs (PEM) for tls listeners; SNI picks by name, the first is the default",
        _certificates,
    )
    tls_min_version: str = _s("1.2", "lowest TLS version accepted: 1.2 or 1.3", _tls_version)
    listen_backlog: int = _s(
        4096,
        "accept queue length of every data and admin listener (the kernel caps it at net.core.somaxconn)",
        _positive,
    )
    workers: int = _s(1, "worker processes sharing the listeners (SO_REUSEPORT); 0: one per CPU", _non_negative_int)
    domains: tuple[str, ...] = _s(
        ("sandbox.localhost",), "domains whose {port}-{sandboxId}.{domain} hosts are routed", _domains
    )
    # Catalog
    redis_url: str = _s(
        "", "catalog Redis (redis://, rediss://, unix://); empty: start a local Redis and a demo sandbox", _redis_url
    )
    redis_cluster_nodes: tuple[str, ...] = _s(
        (), "HOST:PORT seed nodes of a Redis Cluster holding the catalog (instead of redis_url)", _hostports_or_none
    )
    redis_sentinels: tuple[str, ...] = _s(
        (), "HOST:PORT of Redis Sentinels (with redis_sentinel_service; instead of redis_url)", _hostports_or_none
    )
    redis_sentinel_service: str = _s("", "the Sentinel service (master) name of the catalog")
    redis_username: str = _s("", "ACL user for Cluster/Sentinel (redis_url carries its own)")
    redis_password: str = _s("", "password for Cluster/Sentinel (redis_url carries its own)")
    redis_tls: bool = _s(False, "TLS to Cluster/Sentinel nodes (redis_url: use rediss://)")
    redis_tls_ca: str = _s("", "CA certificate file to verify Redis TLS (empty: the system's)")
    catalog_prefix: str = _s("sandbox:catalog:", "key prefix of catalog records")
    invalidate_channel: str = _s("sandbox:catalog:invalidate", "channel on which writers publish changed sandbox IDs")
    keyspace_notifications: bool = _s(
        True, "also follow Redis keyspace notifications for the prefix, when the server emits them"
    )
    redis_timeout: float = _s(0.25, "seconds one Redis call may take before it counts as failed", _positive)
    redis_backoff_max: float = _s(
        2.0,
        "longest pause between a worker's Redis retries while Redis fails (from 0.1 s, doubling); "
        "requests never wait for them",
        _positive,
    )
    cache_ttl: float = _s(
        60.0,
        "seconds a catalog record is used before a background re-read (changes arrive by invalidation)",
        _non_negative,
    )
    negative_cache_ttl: float = _s(1.0, "seconds 'no such sandbox' and invalid records are remembered", _non_negative)
    stale_if_error: float = _s(
        300.0,
        "seconds past cache_ttl an expired record still routes: while its re-read runs, or while Redis fails",
        _non_negative,
    )
    cache_max_entries: int = _s(100_000, "records kept in the in-process cache", _positive)
    node_port: int = _s(0, "0: connect to {address}:{port}; else to {address}:{node_port} (node mode)", _port_or_zero)
    # Access
    traffic_token_header: str = _s(
        "e2b-traffic-access-token", "request field carrying a record's traffic_access_token", _field_name
    )
    token_exempt_ports: tuple[int, ...] = _s((49983,), "ports reachable without the traffic token", _ports)
    access_link_param: str = _s(
        "e2b_access", "query parameter of a signed access link to a private sandbox (docs/catalog.md)", _plain_name
    )
    access_cookie: str = _s(
        "e2b_access", "name of the host-only cookie an access link is exchanged for (never forwarded)", _plain_name
    )
    shared_hosts: tuple[str, ...] = _s(
        (), "hosts (like sandbox.e2b.dev) whose requests name the sandbox in routing fields", _host_names
    )
    sandbox_id_header: str = _s("e2b-sandbox-id", "routing field naming the sandbox on shared hosts", _field_name)
    sandbox_port_header: str = _s("e2b-sandbox-port", "routing field naming the port on shared hosts", _field_name)
    resume_url: str = _s("", "control-plane URL to POST {sandboxId, port} to when a paused sandbox gets traffic")
    resume_timeout: float = _s(30.0, "seconds to wait for a resumed sandbox to be running", _positive)
    # Upstream
    connect_timeout: float = _s(5.0, "seconds to establish a TCP connection to a sandbox (then 504)", _positive)
    connect_wait: float = _s(
        1.0, "seconds to keep retrying a refused connection (then 502 port_not_open)", _non_negative
    )
    upstream_idle_timeout: float = _s(4.0, "seconds an idle pooled upstream connection is kept", _positive)
    pool_max_idle_per_upstream: int = _s(
        256, "idle pooled connections kept per (address, port, execution)", _non_negative
    )
    pool_max_idle: int = _s(4096, "idle pooled connections kept in all", _non_negative)
    max_response_head_size: int = _s(65536, "bytes of an upstream response head (then 502)", _positive)
    max_response_header_count: int = _s(256, "header fields per upstream response head (then 502)", _positive)
    response_head_timeout: float = _s(
        300.0,
        "seconds from a request's last byte to the sandbox's final response head, 1xx included (then 504); 0: off",
        _non_negative,
    )
    # Downstream
    trusted_proxies: tuple[str, ...] = _s(
        (), "CIDRs whose X-Forwarded-*/Forwarded fields are kept and extended", _cidrs
    )
    untrusted_fields: tuple[str, ...] = _s(
        tuple(n.decode() for n in hdrs.UNTRUSTED),
        "client-identity and URL-override fields removed from requests of peers not in trusted_proxies "
        "(names match with '_' and '-' alike; an underscore spelling is removed from anyone)",
        _field_names,
    )
    upgrade_protocols: tuple[str, ...] = _s(("websocket",), "Upgrade tokens tunnelled; others are dropped", _tokens)
    tunnel_idle_timeout: float = _s(
        0.0, "seconds an upgraded connection may carry no bytes before it is closed; 0: never", _non_negative
    )
    health_path: str = _s("/health", "path answered 200 on the data listeners for hosts that name no sandbox", _path)
    max_connections: int = _s(16384, "client connections per worker; more are answered 503 and closed", _positive)
    max_sandbox_connections: int = _s(
        1000,
        "connections open to one sandbox per worker, tunnels included (then 429 too_many_connections); 0: none",
        _non_negative_int,
    )
    min_body_rate: int = _s(
        1024,
        "bytes/s a request or response body must average over body_rate_window, else it ends; 0: off",
        _non_negative_int,
    )
    body_rate_window: float = _s(60.0, "seconds over which min_body_rate is judged", _positive)
    max_request_head_size: int = _s(65536, "bytes of request line plus headers (then 431)", _positive)
    http2: bool = _s(True, "serve HTTP/2: with prior knowledge (h2c) on plain listeners, by ALPN (h2) on tls ones")
    http2_max_concurrent_streams: int = _s(
        100, "HTTP/2 streams a client may have open on one connection (more are refused)", _positive
    )
    max_header_count: int = _s(128, "header fields per request (then 431)", _positive)
    request_head_timeout: float = _s(30.0, "seconds a client has to send a complete request head (then 408)", _positive)
    client_idle_timeout: float = _s(620.0, "seconds an idle keep-alive client connection is kept", _positive)
    # Lifecycle
    drain_delay: float = _s(5.0, "seconds /ready reports 503 before listeners close on SIGTERM", _non_negative)
    shutdown_timeout: float = _s(30.0, "seconds in-flight requests get to finish after listeners close", _non_negative)
    loop_stall_timeout: float = _s(
        10.0,
        "seconds a worker's event loop may not turn before the worker is killed (stack logged) and replaced; "
        "a single process exits instead; 0: off",
        _non_negative,
    )
    # Observability
    log_level: str = _s("info", "debug, info, warning or error", _log_level)
    access_log: str = _s(
        "off",
        "where JSON access log lines go: stdout, stderr, a file path, or off (costs ~4 µs a request)",
        _log_target,
    )
    access_log_query: bool = _s(False, "keep the query string in logged paths (it often carries tokens)")
    request_id_header: str = _s(
        "X-Request-ID",
        "request ID field: kept from trusted proxies (up to 200 bytes), else made; sent upstream and back; empty: off",
        _request_id_header,
    )
    demo_port: int = _s(3000, "embedded mode: port of the demo app (0: any free port)", _port_or_zero)

    @property
    def listen_addrs(self) -> list[tuple[str, int]]:
        return [(x.host, x.port) for x in self.listeners]

    @property
    def listeners(self) -> list[Listener]:
        return [parse_listener(a) for a in self.listen]

    @property
    def admin_addr(self) -> tuple[str, int]:
        return parse_hostport(self.admin_listen)

    @property
    def embedded(self) -> bool:
        """No Redis configured at all: start a local one and a demo sandbox (``make run``)."""
        return self.redis_url == "" and not self.redis_cluster_nodes and not self.redis_sentinels


@dataclass(frozen=True, slots=True)
class Listener:
    """One data-plane listener: where, whether it terminates TLS, and its PROXY protocol mode."""

    host: str
    port: int
    tls: bool = False
    proxy: str = "off"  # "off", "required" or "optional"


def parse_listener(a: str) -> Listener:
    """``HOST:PORT [tls] [proxy|proxy-optional]``."""
    parts = a.split()
    if not parts:
        raise ValueError("empty listener")
    host, port = parse_hostport(parts[0])
    tls, proxy = False, "off"
    for flag in parts[1:]:
        if flag == "tls":
            tls = True
        elif flag in ("proxy", "proxy-optional"):
            proxy = "required" if flag == "proxy" else "optional"
        else:
            raise ValueError(f"unknown listener option {flag!r} in {a!r} (tls, proxy, proxy-optional)")
    return Listener(host, port, tls, proxy)


def parse_hostport(a: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[IPv6]:PORT`` to ``(host, port)``; port 0 means any free port."""
    if a.startswith("["):
        host, sep, port = a[1:].partition("]:")
    else:
        host, sep, port = a.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"{a!r} is not HOST:PORT")
    return host, int(port)


_FIELDS = {f.name: f for f in fields(Config)}
ENV_PREFIX = "GATEWAY_"


def settings_table() -> list[tuple[str, Any, str]]:
    """``(name, default, meaning)`` of every setting, in declaration order."""
    return [(f.name, f.default, f.metadata["doc"]) for f in fields(Config) if f.default is not MISSING]


def _coerce(name: str, value: Any, from_text: bool) -> Any:
    """Convert a TOML value (or, ``from_text``, an environment string) to the setting's type."""
    default = _FIELDS[name].default
    try:
        if isinstance(default, bool):
            if from_text:
                low = str(value).strip().lower()
                if low not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                    raise ValueError
                return low in ("1", "true", "yes", "on")
            if not isinstance(value, bool):
                raise ValueError
            return value
        if isinstance(default, int):
            if isinstance(value, bool) or (not from_text and not isinstance(value, int)):
                raise ValueError
            return int(value)
        if isinstance(default, float):
            if isinstance(value, bool) or (not from_text and not isinstance(value, int | float)):
                raise ValueError
            v = float(value)
            if not math.isfinite(v):
                raise ValueError
            return v
        if isinstance(default, tuple):
            ints = bool(default) and isinstance(default[0], int)
            if from_text:
                items = [x.strip() for x in str(value).split(",") if x.strip()]
                return tuple(int(x) for x in items) if ints else tuple(items)
            item_type = int if ints else str
            if not isinstance(value, list) or not all(type(x) is item_type for x in value):
                raise ValueError
            return tuple(value)
        if not isinstance(value, str):
            raise ValueError
        return value
    except (TypeError, ValueError):
        expected = type(default).__name__
        if isinstance(default, tuple):
            expected = "list of integers" if default and isinstance(default[0], int) else "list of strings"
        raise ConfigError(name, f"expected {expected}, got {value!r}") from None


def load_config(
    path: str | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Merge defaults, the TOML file at ``path``, ``GATEWAY_*`` variables and ``overrides``."""
    values: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as f:
                doc = tomllib.load(f)
        except OSError as e:
            raise ConfigError("config", f"cannot read {path}: {e.strerror}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError("config", f"{path} is not valid TOML: {e}") from None
        for k, v in doc.items():
            if k not in _FIELDS:
                raise ConfigError(k, f"unknown setting in {path}")
            values[k] = _coerce(k, v, from_text=False)
    env = os.environ if env is None else env
    for k, v in env.items():
        if not k.startswith(ENV_PREFIX):
            continue
        name = k[len(ENV_PREFIX) :].lower()
        if name in _FIELDS:
            values[name] = _coerce(name, v, from_text=True)
        elif name not in _NOT_SETTINGS:
            raise ConfigError(name, f"unknown setting (environment variable {k})")
    for k, v in (overrides or {}).items():
        if k not in _FIELDS:
            raise ConfigError(k, "unknown setting")
        values[k] = _coerce(k, v, from_text=False) if not isinstance(v, tuple) else v
    cfg = replace(Config(), **values)
    for name, fld in _FIELDS.items():
        check = fld.metadata["check"]
        if check is not None:
            problem = check(getattr(cfg, name))
            if problem:
                raise ConfigError(name, problem)
    if any(x.tls for x in cfg.listeners) and not cfg.tls_certificates:
        raise ConfigError("tls_certificates", "a tls listener needs at least one CERT_FILE:KEY_FILE")
    return cfg


# GATEWAY_* variables that are not settings: GATEWAY_CONFIG names the settings file.
_NOT_SETTINGS = frozenset({"config"})

_SECTIONS = {
    "listen": "Listeners",
    "redis_url": "Catalog",
    "traffic_token_header": "Access",
    "connect_timeout": "Upstream (the sandbox side)",
    "trusted_proxies": "Downstream (the client side)",
    "drain_delay": "Lifecycle",
    "log_level": "Observability",
}


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return json.dumps(v)  # a TOML basic string for everything a setting holds


def example_toml(cfg: Config | None = None) -> str:
    """Every setting with its meaning, as TOML: config/gateway.toml (``cfg``: these values)."""
    cfg = cfg or Config()
    out = [
        "# gateway settings: every setting, its default and its meaning.",
        "# Precedence: command-line flags > GATEWAY_<NAME> environment variables > this file > defaults.",
        "# Lists in the environment are comma-separated (GATEWAY_DOMAINS=e2b.dev,e2b.app).",
    ]
    for name, default, doc in settings_table():
        if name in _SECTIONS:
            out += ["", f"# --- {_SECTIONS[name]}"]
        out += [
            f"# {doc} (env GATEWAY_{name.upper()}; default {_toml_value(default)})",
            f"{name} = {_toml_value(getattr(cfg, name))}",
        ]
    return "\n".join(out) + "\n"


def settings_markdown() -> str:
    """Every setting as a Markdown table per section: docs/settings.md."""
    out = [
        "# Settings",
        "",
        "Every setting, its default and its meaning (generated from gateway/config.py by `make config`, like",
        "[config/gateway.toml](../config/gateway.toml)). Precedence: command-line flags > `GATEWAY_<NAME>`",
        "environment variables > the TOML file (`--config`, `GATEWAY_CONFIG`) > defaults. Lists in the",
        "environment are comma-separated. `gateway check-config` validates without serving; a bad setting",
        "exits with status 2 and one line naming it.",
    ]
    for name, default, doc in settings_table():
        if name in _SECTIONS:
            out += ["", f"## {_SECTIONS[name]}", "", "| setting | default | meaning |", "|---|---|---|"]
        cell = doc.replace("|", "\\|")
        out.append(f"| `{name}` | `{_toml_value(default)}` | {cell} |")
    return "\n".join(out) + "\n"
