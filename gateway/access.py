"""Access links and cookies for private sandboxes, in a browser (pure: no I/O, no clock).

A private sandbox (its record has ``traffic_access_token``) admits requests that carry the token in
a request field. Browsers cannot add fields to a navigation, an ``<img>``, an EventSource or a
``new WebSocket()``, so a control plane (or SDK) that knows the token mints a short-lived *link*::

    https://{port}-{sandboxId}.{domain}/any/path?e2b_access={signed}

and the gateway exchanges it for a host-only *cookie* with a ``303 See Other`` to the same URL without
the parameter. Both values have one shape (docs/catalog.md, "Access links", for other languages)::

    v1.{sandboxId}.{port}.{expires}.{mac}
    mac = base64url(HMAC-SHA256(key = token as UTF-8, msg = "{purpose}:v1.{sandboxId}.{port}.{expires}"))

``port`` is the decimal port, or ``0`` for any port of the sandbox; ``expires`` is unix seconds;
base64url has no padding (RFC 4648 §5). ``purpose`` is ``e2b-access-link`` for links and
``e2b-access-cookie`` for cookies, so neither can be replayed as the other. The key is the record's
token: whoever can mint links already has it, no other secret is shared, and rotating the token in the
record revokes every outstanding link and cookie at once. Every character of a value is unreserved in
URLs (RFC 3986 §2.3) and a valid cookie-octet (RFC 6265 §4.1.1), so no encoding step can change it.

The other half of this module strips what the gateway consumed before a request goes on, keeping
everything else as the client sent it: the parameter from the query (the other parameters byte for
byte, in order), the gateway's cookie from ``Cookie`` (the app's cookies byte for byte, in order), and
the token subprotocol ``e2b-token.{token}`` from ``Sec-WebSocket-Protocol``. These work on field values,
not on HTTP/1.1 heads, so an HTTP/2 front end can use them unchanged.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from dataclasses import dataclass
from urllib.parse import unquote_to_bytes

__all__ = [
    "ANY_PORT",
    "COOKIE",
    "LINK",
    "Grant",
    "link_url",
    "location",
    "mint",
    "set_cookie",
    "take_cookies",
    "take_param",
    "take_subprotocols",
    "verify",
]

#: Purposes (the MAC's domain separation): a link in a URL, or the cookie it is exchanged for.
LINK = "e2b-access-link"
COOKIE = "e2b-access-cookie"
ANY_PORT = 0
_VERSION = b"v1"
_ID_CHARS = frozenset(b"abcdefghijklmnopqrstuvwxyz0123456789")
_DIGITS = frozenset(b"0123456789")
_MAC_LENGTH = 43  # 32 bytes in unpadded base64url
_EXPIRES_DIGITS = 12  # unix seconds until the year 33658


@dataclass(frozen=True, slots=True)
class Grant:
    """What a valid link or cookie allows: this sandbox, this port (0: any), until ``expires``."""

    sandbox_id: str
    port: int
    expires: int


def _mac(token: bytes, purpose: str, payload: bytes) -> bytes:
    digest = hmac.new(token, purpose.encode() + b":" + payload, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=")


def mint(token: str | bytes, purpose: str, sandbox_id: str, port: int, expires: int) -> str:
    """A signed value: ``v1.{sandboxId}.{port}.{expires}.{mac}`` (``port`` 0: any port)."""
    if (
        not (0 <= port <= 65535)
        or not (0 <= expires < 10**_EXPIRES_DIGITS)
        or not sandbox_id
        or not _ID_CHARS.issuperset(sandbox_id.encode())
    ):
        raise ValueError("a signed value needs a sandbox ID [a-z0-9]+, a port 0-65535 and an expiry 0-999999999999")
    key = token.encode() if isinstance(token, str) else token
    payload = b"%s.%s.%d.%d" % (_VERSION, sandbox_id.encode(), port, expires)
    return (payload + b"." + _mac(key, purpose, payload)).decode()


def link_url(
    token: str | bytes,
    sandbox_id: str,
    port: int,
    expires: int,
    domain: str,
    *,
    any_port: bool = False,
    scheme: str = "https",
    path: str = "/",
    param: str = "e2b_access",
) -> str:
    """``{scheme}://{port}-{sandboxId}.{domain}{path}?{param}={signed}`` (``domain`` may end in
    ``:port``); ``any_port``: the link opens every port of the sandbox, not only ``port``."""
    if not path.startswith("/"):
        raise ValueError("the path must start with /")
    value = mint(token, LINK, sandbox_id, ANY_PORT if any_port else port, expires)
    sep = "&" if "?" in path else "?"
    return f"{scheme}://{port}-{sandbox_id}.{domain}{path}{sep}{param}={value}"


def _number(b: bytes, limit: int) -> int | None:
    """A decimal without sign or leading zero (one spelling per number), at most ``limit`` digits."""
    if not b or len(b) > limit or not _DIGITS.issuperset(b) or (b[0] == 0x30 and len(b) > 1):
        return None
    return int(b)


def verify(token: bytes, purpose: str, value: bytes, sandbox_id: str, port: int, now: float) -> Grant | str:
    """The grant ``value`` carries for a request to ``port`` of ``sandbox_id``, or why it gives none.

    The sandbox and port are checked before the MAC (they are not secret: the value carries them in
    clear), the MAC before the expiry, so "expired" is only ever said of a value the token signed.
    The MAC is compared in constant time.
    """
    what = "access link" if purpose == LINK else "access cookie"
    parts = value.split(b".")
    if len(parts) != 5 or parts[0] != _VERSION:
        return f"The {what} is malformed."
    sid, p, exp, mac = parts[1], _number(parts[2], 5), _number(parts[3], _EXPIRES_DIGITS), parts[4]
    if p is None or p > 65535 or exp is None or not sid or not _ID_CHARS.issuperset(sid) or len(mac) != _MAC_LENGTH:
        return f"The {what} is malformed."
    if sid.decode() != sandbox_id:
        return f"The {what} is for another sandbox."
    if p not in (ANY_PORT, port):
        return f"The {what} is for another port of this sandbox."
    if not hmac.compare_digest(_mac(token, purpose, value[: -len(mac) - 1]), mac):
        return f"The {what} is not valid: it was altered, or the sandbox's access token has changed since."
    if exp <= now:
        return f"The {what} has expired."
    return Grant(sandbox_id, p, exp)


def take_param(target: bytes, name: bytes) -> tuple[list[bytes], bytes]:
    """The values of query parameter ``name`` in a request target (percent-decoded), and the target
    without them: the other parameters keep their bytes and order; an emptied query loses its ``?``."""
    q = target.find(b"?")
    if q < 0:
        return [], target
    found: list[bytes] = []
    kept: list[bytes] = []
    for item in target[q + 1 :].split(b"&"):
        key, eq, v = item.partition(b"=")
        if key == name:
            found.append(unquote_to_bytes(v.replace(b"+", b" ")) if eq else b"")
        else:
            kept.append(item)
    if not found:
        return [], target
    rest = b"&".join(kept)
    return found, target[:q] + (b"?" + rest if rest else b"")


def _take_items(value: bytes, sep: bytes, match: bytes, by_name: bool) -> tuple[list[bytes], bytes | None]:
    """Split a list-valued field at ``sep``; take out the items that match; rejoin the rest as sent."""
    found: list[bytes] = []
    kept: list[bytes] = []
    for item in value.split(sep):
        s = item.strip(b" \t")
        if by_name:  # a cookie-pair: name "=" value
            hit = s.startswith(match) and s[len(match) : len(match) + 1] == b"="
            if hit:
                found.append(s[len(match) + 1 :])
        else:  # a token that starts with the prefix
            hit = s.startswith(match)
            if hit:
                found.append(s[len(match) :])
        if not hit:
            kept.append(item)
    if not found:
        return [], value
    rest = sep.join(kept).lstrip(b" \t")  # a new first item loses the separator's whitespace
    return found, rest if rest.strip(b" \t") else None


def take_cookies(value: bytes, name: bytes) -> tuple[list[bytes], bytes | None]:
    """The values of cookie ``name`` in a ``Cookie`` field value (RFC 6265 §5.4: pairs joined by
    ``"; "``), and the value without them: every other cookie-pair byte for byte, in order. None: no
    cookie is left (the field line should go). Cookie names are case-sensitive."""
    return _take_items(value, b";", name, True)


def take_subprotocols(value: bytes, prefix: bytes) -> tuple[list[bytes], bytes | None]:
    """The subprotocols that start with ``prefix`` in a ``Sec-WebSocket-Protocol`` value (RFC 6455
    §11.3.4: tokens joined by commas), with the prefix cut, and the value without them (None: empty)."""
    return _take_items(value, b",", prefix, False)


def location(target: bytes) -> bytes:
    """A Location for a redirect to ``target`` on the same host (RFC 9110 §10.2.2 allows a relative
    reference): the origin-form of the target, which never becomes a network-path reference.

    ``//evil.example/`` is a valid request path, but as a Location it would name another host, and
    browsers read ``/\\`` as ``//`` (WHATWG URL). Such paths get a ``/.`` prefix, which resolves to the
    same path on the same host (RFC 3986 §5.2.4 removes the dot segment).
    """
    if target[:1] != b"/":  # absolute-form (RFC 9112 §3.2.2): keep the path and query
        sep = target.find(b"://")
        rest = target[sep + 3 :] if sep >= 0 else b""
        ends = [i for i in (rest.find(b"/"), rest.find(b"?")) if i >= 0]
        rest = rest[min(ends) :] if ends else b""
        target = rest if rest[:1] == b"/" else b"/" + rest
    # Browsers drop tabs and newlines anywhere in a URL before parsing it (llhttp refuses them in a
    # request target already; an HTTP/2 front end might not).
    if target.translate(None, b"\t\r\n")[1:2] in (b"/", b"\\"):
        target = b"/." + target
    return target


def set_cookie(name: bytes, value: bytes, max_age: int, secure: bool) -> bytes:
    """A ``Set-Cookie`` value (RFC 6265 §4.1) for the gateway's cookie: host-only (no Domain, so it
    never reaches another sandbox's host), ``Path=/``, ``HttpOnly`` (scripts cannot read it),
    ``SameSite=Lax`` (not sent on cross-site subresource requests), ``Secure`` over HTTPS."""
    out = b"%s=%s; Path=/; Max-Age=%d; HttpOnly; SameSite=Lax" % (name, value, max_age)
    return out + b"; Secure" if secure else out
