"""Admission to a private sandbox on raw heads (pure): which credential admits a request, what the
gateway answers itself, and that exactly the consumed bytes are cut from the forwarded head."""

from __future__ import annotations

import pytest

from gateway import access, errors
from gateway.config import load_config
from gateway.hostname import HostRouter, Route
from gateway.http.admission import Admission, Answer
from gateway.http.headers import FieldRoles, Peer, RequestHead, analyze_request

TOKEN = b"tok-of-priv"
NOW = 1_767_000_000
EXP = NOW + 3600
ROUTE = Route(3000, "priv")
HOST = b"3000-priv.e2b.test"
FIELDS = FieldRoles()
PEER = Peer.make("203.0.113.9", 8080, False, ())
ADMISSION = Admission(load_config(None, env={}, overrides={"domains": ("e2b.test",)}), FIELDS, HostRouter(["e2b.test"]))
LINK = access.mint(TOKEN, access.LINK, "priv", 3000, EXP)
COOKIE = access.mint(TOKEN, access.COOKIE, "priv", 3000, EXP)


def head(first: str, *fields: str) -> bytes:
    return ("\r\n".join([first, f"Host: {HOST.decode()}", *fields]) + "\r\n\r\n").encode()


def admit(raw: bytes, peer: Peer = PEER, now: float = NOW) -> RequestHead | Answer:
    req = analyze_request(raw, FIELDS)
    assert isinstance(req, RequestHead)
    return ADMISSION.admit(req, TOKEN, ROUTE, peer, now)


def forwarded(raw: bytes) -> bytes:
    got = admit(raw)
    assert isinstance(got, RequestHead), got
    return got.raw


def test_nothing_presented_is_missing() -> None:
    got = admit(head("GET / HTTP/1.1", "Cookie: a=1"))
    assert isinstance(got, Answer) and got.reason is errors.TRAFFIC_TOKEN_MISSING


def test_header_token_admits_the_same_head_object() -> None:
    raw = head("GET / HTTP/1.1", "e2b-traffic-access-token: tok-of-priv")
    req = analyze_request(raw, FIELDS)
    assert isinstance(req, RequestHead)
    assert ADMISSION.admit(req, TOKEN, ROUTE, PEER, NOW) is req  # nothing to cut: nothing copied


def test_a_wrong_header_token_is_final() -> None:
    got = admit(head("GET / HTTP/1.1", "e2b-traffic-access-token: nope", f"Cookie: e2b_access={COOKIE}"))
    assert isinstance(got, Answer) and got.reason is errors.TRAFFIC_TOKEN_INVALID


def test_link_on_get_is_exchanged_for_a_cookie() -> None:
    got = admit(head(f"GET /app/?a=1&e2b_access={LINK}&b=2 HTTP/1.1", "Cookie: app=1"))
    assert isinstance(got, Answer) and got.reason is errors.ACCESS_LINK_ACCEPTED and got.reason.status == 303
    h = dict(got.headers)
    assert h[b"Location"] == b"/app/?a=1&b=2"
    name, _, rest = h[b"Set-Cookie"].partition(b"=")
    value, _, attrs = rest.partition(b"; ")
    assert name == b"e2b_access"
    assert value != LINK.encode() and TOKEN not in value  # a cookie of its own, not the link, not the token
    assert access.verify(TOKEN, access.COOKIE, value, "priv", 3000, NOW) == access.Grant("priv", 3000, EXP)
    assert attrs == b"Path=/; Max-Age=3600; HttpOnly; SameSite=Lax"  # no Domain, no Secure over http


def test_any_port_link_gives_a_cookie_for_this_port_only() -> None:
    link = access.mint(TOKEN, access.LINK, "priv", access.ANY_PORT, EXP)
    got = admit(head(f"GET /?e2b_access={link} HTTP/1.1"))
    assert isinstance(got, Answer)
    value = dict(got.headers)[b"Set-Cookie"].split(b";")[0].split(b"=", 1)[1]
    assert isinstance(access.verify(TOKEN, access.COOKIE, value, "priv", 3000, NOW), access.Grant)
    assert isinstance(access.verify(TOKEN, access.COOKIE, value, "priv", 3001, NOW), str)


@pytest.mark.parametrize(
    ("peer", "fields", "secure"),
    [
        (Peer.make("203.0.113.9", 443, True, ()), (), True),  # TLS here
        (PEER, ("X-Forwarded-Proto: https",), False),  # anyone can send that
        (Peer.make("10.0.0.2", 8080, False, [__import__("ipaddress").ip_network("10.0.0.0/8")]),
         ("X-Forwarded-Proto: https",), True),  # a trusted balancer terminated TLS
        (Peer.make("10.0.0.2", 8080, False, [__import__("ipaddress").ip_network("10.0.0.0/8")]),
         ("X-Forwarded-Proto: http",), False),
    ],
)  # fmt: skip
def test_cookie_is_secure_over_https(peer: Peer, fields: tuple[str, ...], secure: bool) -> None:
    got = admit(head(f"GET /?e2b_access={LINK} HTTP/1.1", *fields), peer=peer)
    assert isinstance(got, Answer)
    assert dict(got.headers)[b"Set-Cookie"].endswith(b"; Secure") is secure


def test_max_age_ends_with_the_link() -> None:
    got = admit(head(f"GET /?e2b_access={LINK} HTTP/1.1"), now=EXP - 7.5)
    assert isinstance(got, Answer) and b"Max-Age=7;" in dict(got.headers)[b"Set-Cookie"]
    got = admit(head(f"GET /?e2b_access={LINK} HTTP/1.1"), now=EXP - 0.5)  # Max-Age=1 would outlive it
    assert isinstance(got, Answer) and got.reason is errors.TRAFFIC_TOKEN_INVALID and got.detail
    assert "expired" in got.detail


@pytest.mark.parametrize(
    ("link", "problem"),
    [
        (access.mint(TOKEN, access.LINK, "priv", 3000, NOW), "expired"),
        (access.mint(TOKEN, access.LINK, "priv", 3001, EXP), "another port"),
        (access.mint(TOKEN, access.LINK, "other", 3000, EXP), "another sandbox"),
        (access.mint(b"old-token", access.LINK, "priv", 3000, EXP), "altered"),
        (LINK[:-2] + "AA", "altered"),
        ("garbage", "malformed"),
        (COOKIE, "altered"),  # a cookie value is not a link
    ],
)
def test_bad_links_are_refused_with_why(link: str, problem: str) -> None:
    got = admit(head(f"GET /?e2b_access={link} HTTP/1.1"))
    assert isinstance(got, Answer) and got.reason is errors.TRAFFIC_TOKEN_INVALID
    assert got.detail is not None and problem in got.detail


def test_link_on_a_websocket_or_post_admits_without_the_parameter() -> None:
    ws = head(f"GET /ws?e2b_access={LINK}&x=1 HTTP/1.1", "Connection: Upgrade", "Upgrade: websocket",
              "Sec-WebSocket-Version: 13", "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==")  # fmt: skip
    assert forwarded(ws) == ws.replace(f"e2b_access={LINK}&".encode(), b"")
    post = head(f"POST /api?e2b_access={LINK} HTTP/1.1", "Content-Length: 0")
    assert forwarded(post) == post.replace(f"?e2b_access={LINK}".encode(), b"")


def test_cookie_admits_and_is_cut_the_apps_cookies_byte_for_byte() -> None:
    raw = head("GET /x HTTP/1.1", f"Cookie: a=1;b=2; e2b_access={COOKIE};  c=3", "Accept: */*")
    assert forwarded(raw) == raw.replace(f" e2b_access={COOKIE};".encode(), b"")
    only = head("GET /x HTTP/1.1", "Accept: */*", f"cookie: e2b_access={COOKIE}", "X: y")
    assert forwarded(only) == head("GET /x HTTP/1.1", "Accept: */*", "X: y")  # an emptied field goes


def test_header_token_requests_lose_the_gateway_cookie_too() -> None:
    raw = head("GET / HTTP/1.1", "e2b-traffic-access-token: tok-of-priv", "Cookie: e2b_access=stale; a=1")
    assert forwarded(raw) == raw.replace(b"e2b_access=stale; ", b"")


@pytest.mark.parametrize(
    ("cookie", "problem"),
    [
        (access.mint(TOKEN, access.COOKIE, "priv", 3000, NOW), "expired"),
        (access.mint(TOKEN, access.COOKIE, "other", 3000, EXP), "another sandbox"),
        (access.mint(TOKEN, access.COOKIE, "priv", 8080, EXP), "another port"),
        (access.mint(b"rotated", access.COOKIE, "priv", 3000, EXP), "token has changed"),
        (LINK, "altered"),  # a link is not a cookie
    ],
)
def test_bad_cookies_are_refused_with_why(cookie: str, problem: str) -> None:
    got = admit(head("GET / HTTP/1.1", f"Cookie: e2b_access={cookie}"))
    assert isinstance(got, Answer) and got.reason is errors.TRAFFIC_TOKEN_INVALID
    assert got.detail is not None and problem in got.detail and "new access link" in got.detail


def test_one_valid_cookie_among_stale_ones_admits() -> None:
    stale = access.mint(TOKEN, access.COOKIE, "priv", 3000, NOW - 5)
    raw = head("GET / HTTP/1.1", f"Cookie: e2b_access={stale}; e2b_access={COOKIE}; a=1")
    assert forwarded(raw) == head("GET / HTTP/1.1", "Cookie: a=1")


@pytest.mark.parametrize(
    ("origin", "ok"),
    [
        ("http://3000-priv.e2b.test", True),
        ("https://8080-priv.e2b.test:8443", True),  # another port of the same sandbox
        ("http://3000-evil.e2b.test", False),  # another tenant's sandbox on the same site
        ("https://evil.example", False),
        ("null", False),
    ],
)
def test_cookie_only_from_the_sandboxs_own_pages(origin: str, ok: bool) -> None:
    got = admit(head("POST /api HTTP/1.1", f"Origin: {origin}", f"Cookie: e2b_access={COOKIE}", "Content-Length: 0"))
    assert isinstance(got, RequestHead) is ok, got


def test_token_subprotocol_admits_and_is_cut() -> None:
    raw = head("GET /ws HTTP/1.1", "Connection: Upgrade", "Upgrade: websocket", "Sec-WebSocket-Version: 13",
               "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Protocol: chat, e2b-token.tok-of-priv")  # fmt: skip
    assert forwarded(raw) == raw.replace(b", e2b-token.tok-of-priv", b"")
    alone = raw.replace(b"chat, ", b"")
    assert b"Sec-WebSocket-Protocol" not in forwarded(alone)
    got = admit(raw.replace(b"tok-of-priv", b"tok-of-prix"))
    assert isinstance(got, Answer) and got.reason is errors.TRAFFIC_TOKEN_INVALID


def test_token_subprotocol_counts_only_on_upgrades() -> None:
    got = admit(head("GET / HTTP/1.1", "Sec-WebSocket-Protocol: e2b-token.tok-of-priv"))
    assert isinstance(got, Answer) and got.reason is errors.TRAFFIC_TOKEN_MISSING


def test_preflight_is_answered_by_the_gateway() -> None:
    raw = head("OPTIONS /api HTTP/1.1", "Origin: https://app.example", "Access-Control-Request-Method: PUT",
               "Access-Control-Request-Headers: content-type,e2b-traffic-access-token")  # fmt: skip
    got = admit(raw)
    assert isinstance(got, Answer) and got.reason is errors.CORS_PREFLIGHT and got.reason.status == 204
    h = dict(got.headers)
    assert h[b"Access-Control-Allow-Methods"] == b"PUT"
    assert h[b"Access-Control-Allow-Headers"] == b"content-type,e2b-traffic-access-token"
    # Not a preflight: a plain OPTIONS without Origin or without the request method.
    for raw in (head("OPTIONS /api HTTP/1.1", "Access-Control-Request-Method: PUT"),
                head("OPTIONS /api HTTP/1.1", "Origin: https://app.example")):  # fmt: skip
        got = admit(raw)
        assert isinstance(got, Answer) and got.reason is errors.TRAFFIC_TOKEN_MISSING


def test_a_remembered_cookie_is_only_the_one_that_verified() -> None:
    adm = Admission(load_config(None, env={}, overrides={"domains": ("e2b.test",)}), FIELDS, HostRouter(["e2b.test"]))
    forged = access.mint(b"guess", access.COOKIE, "priv", 3000, EXP)

    def go(cookie: str, token: bytes = TOKEN, now: float = NOW) -> RequestHead | Answer:
        req = analyze_request(head("GET / HTTP/1.1", f"Cookie: {cookie}"), FIELDS)
        assert isinstance(req, RequestHead)
        return adm.admit(req, token, ROUTE, PEER, now)

    assert isinstance(go(f"e2b_access={forged}; e2b_access={COOKIE}"), RequestHead)  # the valid one admits
    assert isinstance(go(f"e2b_access={forged}"), Answer)  # its neighbour was not remembered as valid
    assert isinstance(go(f"e2b_access={COOKIE}"), RequestHead)  # remembered
    assert isinstance(go(f"e2b_access={COOKIE}", now=EXP), Answer)  # ... until it expires
    assert isinstance(go(f"e2b_access={COOKIE}", token=b"rotated"), Answer)  # ... or the token changes
    other = Route(3001, "priv")
    req = analyze_request(head("GET / HTTP/1.1", f"Cookie: e2b_access={COOKIE}"), FIELDS)
    assert isinstance(req, RequestHead) and isinstance(
        adm.admit(req, TOKEN, other, PEER, NOW), Answer
    )  # ... or the port
