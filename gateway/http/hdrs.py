"""Header names, defined once (as aiohttp's hdrs.py does).

Lower-case constants are for comparing against ``name.lower()`` of a received field; the
capitalised ones are what the gateway writes. Field names are case-insensitive (RFC 9110 §5.1),
so the spelling a peer used is kept when a field is passed on.
"""

from __future__ import annotations

from typing import Final

# Compared in lower case.
HOST: Final = b"host"
CONTENT_LENGTH: Final = b"content-length"
TRANSFER_ENCODING: Final = b"transfer-encoding"
CONNECTION: Final = b"connection"
KEEP_ALIVE: Final = b"keep-alive"
PROXY_CONNECTION: Final = b"proxy-connection"
TE: Final = b"te"
UPGRADE: Final = b"upgrade"
EXPECT: Final = b"expect"
X_FORWARDED_FOR: Final = b"x-forwarded-for"
X_FORWARDED_PROTO: Final = b"x-forwarded-proto"
X_FORWARDED_HOST: Final = b"x-forwarded-host"
X_FORWARDED_PORT: Final = b"x-forwarded-port"
FORWARDED: Final = b"forwarded"
ORIGIN: Final = b"origin"
ACCEPT: Final = b"accept"
USER_AGENT: Final = b"user-agent"
SEC_FETCH_MODE: Final = b"sec-fetch-mode"
SET_COOKIE: Final = b"set-cookie"

# Written by the gateway.
X_GATEWAY_REASON: Final = b"X-Gateway-Reason"
OUT_X_FORWARDED_FOR: Final = b"X-Forwarded-For"
OUT_X_FORWARDED_PROTO: Final = b"X-Forwarded-Proto"
OUT_X_FORWARDED_HOST: Final = b"X-Forwarded-Host"
OUT_X_FORWARDED_PORT: Final = b"X-Forwarded-Port"
OUT_FORWARDED: Final = b"Forwarded"

# RFC 9110 §7.6.1: connection-specific fields a proxy must not forward, besides those the
# Connection field itself names. Proxy-Connection is the pre-standard spelling some clients send.
HOP_BY_HOP: Final = frozenset({CONNECTION, KEEP_ALIVE, PROXY_CONNECTION, TE, TRANSFER_ENCODING, UPGRADE})

# The forwarding fields a gateway sets (RFC 7239 and the de-facto X-Forwarded-*): kept from a
# trusted proxy, replaced otherwise.
FORWARDING: Final = frozenset({X_FORWARDED_FOR, X_FORWARDED_PROTO, X_FORWARDED_HOST, X_FORWARDED_PORT, FORWARDED})

# Fields that tell an app who the client is or which URL it asked for, set by the proxies in front
# of apps (nginx, ingress-nginx, Envoy, Traefik, HAProxy, CDNs, IIS/Azure): removed from requests
# of peers not in trusted_proxies (the default of the untrusted_fields setting), so a client can
# neither pose as another address nor override the URL an app routes or authorises by.
UNTRUSTED: Final = (
    # client identity
    b"X-Real-IP", b"True-Client-IP", b"X-Client-IP", b"CF-Connecting-IP", b"CF-Connecting-IPv6",
    b"Fastly-Client-IP", b"X-Cluster-Client-IP", b"X-Original-Forwarded-For", b"X-Forwarded", b"Forwarded-For",
    b"X-Envoy-External-Address", b"X-Envoy-Internal", b"X-Forwarded-Client-Cert",
    b"X-Forwarded-Tls-Client-Cert", b"X-Forwarded-Tls-Client-Cert-Info",
    # scheme and TLS
    b"X-Forwarded-Ssl", b"X-Forwarded-Scheme", b"X-Scheme", b"X-Url-Scheme", b"Front-End-Https",
    b"CloudFront-Forwarded-Proto", b"CF-Visitor",
    # host, path and method as the client sent them
    b"X-Forwarded-Server", b"X-Original-Host", b"X-Host", b"X-Forwarded-Prefix", b"X-Forwarded-Uri",
    b"X-Forwarded-Path", b"X-Forwarded-Method", b"X-Original-URL", b"X-Original-URI", b"X-Rewrite-URL",
    b"X-Envoy-Original-Path",
)  # fmt: skip
