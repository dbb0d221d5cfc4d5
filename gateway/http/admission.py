"""Who may reach a private sandbox, and what of their credentials the sandbox never sees.

Only requests to a port that needs the record's ``traffic_access_token`` come here (public
sandboxes and exempt ports never do: they pay nothing for any of this). A request is admitted by,
in this order:

1. the token field (``traffic_token_header``), compared in constant time; a wrong one is final;
2. a CORS preflight (``OPTIONS`` with ``Origin`` and ``Access-Control-Request-Method``), which by
   design carries no credentials (https://fetch.spec.whatwg.org/#cors-preflight-fetch): answered
   ``204 cors_preflight`` by the gateway, allowing the method and fields asked for to the asking
   origin, so a page elsewhere can call the sandbox with the token field. The preflight never
   reaches the app (it could not: it has no token); the actual request is checked as usual;
3. an access link (``?{access_link_param}=...``, access.py): a GET or HEAD is answered ``303`` to
   the same URL without the parameter, with the cookie; any other request (a WebSocket, which cannot
   follow a redirect, or a POST) is admitted as it is, the parameter cut from its target;
4. the gateway's cookie (``access_cookie``), signed for this sandbox and port. Only from this
   sandbox's own pages: a request whose ``Origin`` is another site or another sandbox is refused
   (sandboxes of one domain are the same *site*, so ``SameSite=Lax`` alone would let one tenant's
   page send requests with a victim's cookie to another's sandbox);
5. the subprotocol ``e2b-token.{token}`` in ``Sec-WebSocket-Protocol`` (a browser's WebSocket can
   set nothing else).

Whatever the request was admitted by, the link parameter, the gateway's cookie and the token
subprotocol are cut before it goes on (the token field is cut by the header policy), and the rest
of the head stays byte for byte. The pure parts (formats, signatures, field-value surgery) are in
access.py; this module applies them to an HTTP/1.1 head.
"""

from __future__ import annotations

import hmac
import math
from dataclasses import dataclass
from time import time

from gateway import access, errors
from gateway.config import Config
from gateway.errors import Reason
from gateway.hostname import HostRouter, Route
from gateway.http import hdrs
from gateway.http.headers import (
    FieldRoles,
    Peer,
    RequestHead,
    analyze_request,
    edit_fields,
    find_header,
    first_field,
    raw_fields,
    replace_target,
)

__all__ = ["TOKEN_SUBPROTOCOL", "Admission", "Answer"]

#: A WebSocket client that cannot set fields offers ``e2b-token.{token}`` as a subprotocol.
TOKEN_SUBPROTOCOL = b"e2b-token."
COOKIE = b"cookie"
SEC_WEBSOCKET_PROTOCOL = b"sec-websocket-protocol"
ACCESS_CONTROL_REQUEST_METHOD = b"access-control-request-method"
ACCESS_CONTROL_REQUEST_HEADERS = b"access-control-request-headers"
#: How long a browser may reuse the gateway's preflight answer (Chromium caps it at 2 hours).
PREFLIGHT_MAX_AGE = b"600"
#: Verified cookie values remembered per worker (a bound, then the memo starts over).
KNOWN_COOKIES = 4096


@dataclass(frozen=True, slots=True)
class Answer:
    """The gateway answers the request itself: a reason, a detail for people, extra fields."""

    reason: Reason
    detail: str | None = None
    headers: tuple[tuple[bytes, bytes], ...] = ()


class Admission:
    """The credentials a private sandbox accepts besides the token field (settings of one worker)."""

    __slots__ = ("cookie", "cookie_eq", "fields", "known", "param", "param_eq", "router")

    def __init__(self, config: Config, fields: FieldRoles, router: HostRouter) -> None:
        self.param = config.access_link_param.encode()
        self.param_eq = self.param + b"="
        self.cookie = config.access_cookie.encode()
        self.cookie_eq = self.cookie + b"="
        self.fields = fields
        self.router = router
        # Cookie values verified lately: value -> (token, sandbox, port, expires).
        self.known: dict[bytes, tuple[bytes, str, int, int]] = {}

    def admit(
        self, req: RequestHead, token: bytes, route: Route, peer: Peer, now: float | None = None
    ) -> RequestHead | Answer:
        """The head to forward (``req`` itself when nothing is cut), or the gateway's answer.

        ``now`` (unix seconds) is read only when a link or cookie needs it.
        """
        raw = req.raw
        # Cheap scans first: most requests carry none of these, and then nothing is parsed.
        # (``find``, not ``in``: ``bytes in bytes`` first tries the needle as an integer and pays
        # for a TypeError, twice the cost of the scan.)
        has_param = req.target.find(self.param_eq) >= 0
        has_cookie = raw.find(self.cookie_eq) >= 0
        has_proto = req.upgrade is not None and raw.find(TOKEN_SUBPROTOCOL) >= 0
        admitted = False
        if req.token is not None:
            if not hmac.compare_digest(token, req.token):
                return Answer(errors.TRAFFIC_TOKEN_INVALID)
            if not (has_param or has_cookie or has_proto):
                return req
            admitted = True
        elif req.method == b"OPTIONS":
            fields = raw_fields(raw)
            origin = find_header(fields, hdrs.ORIGIN)
            method = find_header(fields, ACCESS_CONTROL_REQUEST_METHOD)
            if origin is not None and method is not None:
                return _preflight(method, find_header(fields, ACCESS_CONTROL_REQUEST_HEADERS))
        out = raw
        if has_param:
            values, stripped = access.take_param(req.target, self.param)
            if values:
                if not admitted:
                    now = time() if now is None else now
                    grant = _first_grant(token, access.LINK, values, route, now)
                    if isinstance(grant, str):
                        return Answer(errors.TRAFFIC_TOKEN_INVALID, grant)
                    if req.method in (b"GET", b"HEAD") and req.upgrade is None:
                        return self._exchange(token, grant, route, stripped, req, peer, now)
                    admitted = True
                out = replace_target(out, stripped)
        # The fields are cut in the same pass that finds what they carried; if that admits nothing,
        # the edited head is simply not used.
        cookies: list[bytes] = []
        if has_cookie:
            out = edit_fields(out, COOKIE, lambda v: _take(access.take_cookies(v, self.cookie), cookies))
        protos: list[bytes] = []
        if has_proto:
            out = edit_fields(
                out, SEC_WEBSOCKET_PROTOCOL, lambda v: _take(access.take_subprotocols(v, TOKEN_SUBPROTOCOL), protos)
            )
        if not admitted and cookies:
            origin = first_field(raw, hdrs.ORIGIN)
            if origin is not None and not self._same_sandbox(origin, route):
                return Answer(
                    errors.TRAFFIC_TOKEN_INVALID,
                    "The access cookie is accepted only from this sandbox's own pages, not from "
                    + origin.decode("latin-1"),
                )
            problem = self._cookie(token, cookies, route, time() if now is None else now)
            if problem is not None:
                return Answer(errors.TRAFFIC_TOKEN_INVALID, problem + " Open a new access link.")
            admitted = True
        if not admitted and protos:
            if not any(hmac.compare_digest(token, p) for p in protos):
                return Answer(
                    errors.TRAFFIC_TOKEN_INVALID, "The e2b-token subprotocol does not carry this sandbox's token."
                )
            admitted = True
        if not admitted:
            return Answer(errors.TRAFFIC_TOKEN_MISSING)
        if out is raw:
            return req
        head = analyze_request(out, self.fields)  # the edited head, analysed as any other
        return head if isinstance(head, RequestHead) else Answer(head)

    def _cookie(self, token: bytes, values: list[bytes], route: Route, now: float) -> str | None:
        """None if one of the cookie values grants this request, else why the first one does not.

        A browser sends the same cookie with every request, so a value verified once is remembered
        with what it grants (and the token it was checked against: a rotated token misses) instead of
        computing its HMAC again each time.
        """
        known = self.known
        for v in values:
            k = known.get(v)
            if k is not None and k[0] == token and k[1] == route.sandbox_id and k[2] == route.port and now < k[3]:
                return None
        problem = ""
        for v in values:
            g = access.verify(token, access.COOKIE, v, route.sandbox_id, route.port, now)
            if isinstance(g, access.Grant):
                if len(known) >= KNOWN_COOKIES:
                    known.clear()
                known[v] = (token, route.sandbox_id, route.port, g.expires)  # this value, never its neighbours
                return None
            problem = problem or g
        return problem

    def _exchange(
        self, token: bytes, grant: access.Grant, route: Route, target: bytes, req: RequestHead, peer: Peer, now: float
    ) -> Answer:
        """A valid link: a cookie for this host and port, until the link expires; then the URL
        without the parameter (RFC 9110 §15.4.4: 303 makes the browser GET it)."""
        max_age = math.floor(grant.expires - now)  # whole seconds, never past the link's expiry
        if max_age < 1:
            return Answer(errors.TRAFFIC_TOKEN_INVALID, "The access link has expired.")
        value = access.mint(token, access.COOKIE, route.sandbox_id, route.port, grant.expires)
        cookie = access.set_cookie(self.cookie, value.encode(), max_age, _secure(req, peer))
        return Answer(
            errors.ACCESS_LINK_ACCEPTED, None, ((b"Location", access.location(target)), (b"Set-Cookie", cookie))
        )

    def _same_sandbox(self, origin: bytes, route: Route) -> bool:
        """Whether ``origin`` (a serialized origin, RFC 6454 §6.2) is a page of the same sandbox."""
        sep = origin.find(b"://")
        if sep < 0:
            return False  # "null" (a sandboxed frame, a cross-origin redirect) is no sandbox's page
        r = self.router.route(origin[sep + 3 :])
        return isinstance(r, Route) and r.sandbox_id == route.sandbox_id


def _take(got: tuple[list[bytes], bytes | None], into: list[bytes]) -> bytes | None:
    """Keep what a field value carried (``got[0]``); the value without it is the field's new value."""
    into += got[0]
    return got[1]


def _first_grant(token: bytes, purpose: str, values: list[bytes], route: Route, now: float) -> access.Grant | str:
    """The grant of the first valid value (several may arrive: stale cookies, a repeated parameter),
    or why the first one fails."""
    problem = ""
    for v in values:
        g = access.verify(token, purpose, v, route.sandbox_id, route.port, now)
        if isinstance(g, access.Grant):
            return g
        problem = problem or g
    return problem


def _secure(req: RequestHead, peer: Peer) -> bool:
    """Whether the client reached us over HTTPS: TLS here, or a trusted proxy's X-Forwarded-Proto."""
    if peer.proto == b"https":
        return True
    if not peer.trusted or req.forwarding is None:
        return False
    proto = find_header(req.forwarding, hdrs.X_FORWARDED_PROTO)
    return proto is not None and proto.split(b",")[0].strip(b" \t").lower() == b"https"


def _preflight(method: bytes, headers: bytes | None) -> Answer:
    """The preflight's answer: what the browser asked for, for the origin that asked (render adds
    Access-Control-Allow-Origin for it, never -Credentials: the token field is the credential a page
    on another origin sends; the gateway's cookie is refused from other origins anyway)."""
    allow = [(b"Access-Control-Allow-Methods", method)]
    if headers is not None:
        allow.append((b"Access-Control-Allow-Headers", headers))
    allow += [
        (b"Access-Control-Max-Age", PREFLIGHT_MAX_AGE),
        (b"Vary", b"Access-Control-Request-Method, Access-Control-Request-Headers"),
    ]
    return Answer(errors.CORS_PREFLIGHT, None, tuple(allow))
