"""The header policy on raw heads (pure). Each rule cites the RFC section it follows."""

from __future__ import annotations

import httptools
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway import errors
from gateway.http import framing
from gateway.http.headers import (
    REPEATED,
    FieldRoles,
    Peer,
    RequestHead,
    analyze_request,
    analyze_response,
    own_cookie_lines,
    upgrade_accepted,
)

PEER = Peer.make("203.0.113.9", 8080, False, ())
WS = FieldRoles()


def req(head: bytes, peer: Peer = PEER) -> RequestHead:
    r = analyze_request(head, WS)
    assert isinstance(r, RequestHead)
    return r


def upstream(head: bytes, peer: Peer = PEER, host: bytes | None = None) -> bytes:
    return req(head, peer).upstream_head(peer, host)


def test_plain_request_passes_byte_for_byte_plus_forwarding() -> None:
    head = b"GET /a%2Fb%20c?q=%41&x HTTP/1.1\r\nHost: 3000-abc.e2b.dev\r\nuser-agent: x\r\nAccept:  */*\r\n\r\n"
    assert upstream(head) == head[:-2] + (
        b"X-Forwarded-For: 203.0.113.9\r\nX-Forwarded-Proto: http\r\nX-Forwarded-Port: 8080\r\n"
        b'Forwarded: for=203.0.113.9;proto=http;host="3000-abc.e2b.dev"\r\n'
        b"X-Forwarded-Host: 3000-abc.e2b.dev\r\n\r\n"
    )


def test_hop_by_hop_fields_are_removed() -> None:
    # RFC 9110 §7.6.1: Connection, the fields it names, Keep-Alive, Proxy-Connection, TE, Upgrade.
    head = (
        b"GET / HTTP/1.1\r\nHost: h.e2b.dev\r\nConnection: keep-alive, X-Secret\r\nKeep-Alive: timeout=5\r\n"
        b"X-Secret: 1\r\nProxy-Connection: keep-alive\r\nTE: trailers\r\nUpgrade: h2c\r\nX-Kept: 2\r\n\r\n"
    )
    out = upstream(head)
    assert out.startswith(b"GET / HTTP/1.1\r\nHost: h.e2b.dev\r\nX-Kept: 2\r\nX-Forwarded-For:")
    for name in (b"Connection", b"Keep-Alive", b"X-Secret", b"Proxy-Connection", b"TE:", b"Upgrade"):
        assert name not in out


def test_connection_cannot_remove_framing_or_host() -> None:
    head = b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nConnection: content-length, host\r\n\r\n"
    out = upstream(head)
    assert b"Content-Length: 3\r\n" in out and b"Host: h\r\n" in out


def test_forwarding_fields_from_untrusted_peers_are_replaced() -> None:
    head = (
        b"GET / HTTP/1.1\r\nHost: h\r\nX-Forwarded-For: 1.1.1.1\r\nX-Forwarded-Proto: https\r\n"
        b"X-Forwarded-Host: evil\r\nX-Forwarded-Port: 1\r\nForwarded: for=1.1.1.1\r\n\r\n"
    )
    out = upstream(head)
    assert b"1.1.1.1" not in out and b"evil" not in out and b"https" not in out
    assert b"X-Forwarded-For: 203.0.113.9\r\n" in out


def test_forwarding_fields_from_trusted_proxies_are_kept_and_extended() -> None:
    lb = Peer.make("10.0.0.2", 8080, False, [__import__("ipaddress").ip_network("10.0.0.0/8")])
    assert lb.trusted
    head = (
        b"GET / HTTP/1.1\r\nHost: h\r\nX-Forwarded-For: 198.51.100.1\r\nX-Forwarded-Proto: https\r\n"
        b"X-Forwarded-Port: 443\r\nForwarded: for=198.51.100.1;proto=https\r\n\r\n"
    )
    out = upstream(head, lb)
    assert b"X-Forwarded-For: 198.51.100.1, 10.0.0.2\r\n" in out
    assert b"X-Forwarded-Proto: https\r\n" in out
    assert b"X-Forwarded-Port: 443\r\n" in out
    assert b'Forwarded: for=198.51.100.1;proto=https, for=10.0.0.2;proto=http;host="h"\r\n' in out
    assert b"X-Forwarded-Host: h\r\n" in out


def test_ipv6_client_in_forwarded_is_bracketed_and_quoted() -> None:
    # RFC 7239 §6: an IPv6 node is "[addr]" in a quoted-string.
    p6 = Peer.make("2001:db8::7", 8080, True, ())
    out = upstream(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n", p6)
    assert b'Forwarded: for="[2001:db8::7]";proto=https;host="h"\r\n' in out
    assert b"X-Forwarded-Proto: https\r\n" in out


def test_ipv4_mapped_peer_is_shown_as_ipv4() -> None:
    assert Peer.make("::ffff:192.0.2.1", 80, False, ()).ip == "192.0.2.1"


def test_http10_request_goes_upstream_as_http11() -> None:
    out = upstream(b"GET /x HTTP/1.0\r\nHost: h\r\n\r\n")
    assert out.startswith(b"GET /x HTTP/1.1\r\nHost: h\r\n")
    r = req(b"GET /x HTTP/1.0\r\nHost: h\r\n\r\n")
    assert not r.keep_alive
    assert req(b"GET /x HTTP/1.0\r\nHost: h\r\nConnection: keep-alive\r\n\r\n").keep_alive


def test_mask_request_host_replaces_host_and_keeps_the_original_in_x_forwarded_host() -> None:
    out = upstream(b"GET / HTTP/1.1\r\nhost: 5173-abc.e2b.dev\r\nA: b\r\n\r\n", host=b"localhost:5173")
    assert out.startswith(b"GET / HTTP/1.1\r\nhost: localhost:5173\r\nA: b\r\n")
    assert b"X-Forwarded-Host: 5173-abc.e2b.dev\r\n" in out


def test_expect_100_continue_is_answered_by_the_gateway() -> None:
    r = req(b"PUT / HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n")
    assert r.expect_continue
    assert b"Expect" not in r.upstream_head(PEER)


def test_websocket_upgrade_is_kept_others_dropped() -> None:
    ws = req(b"GET / HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
    assert ws.upgrade == b"websocket"
    assert b"Connection: upgrade\r\nUpgrade: websocket\r\n" in ws.upstream_head(PEER)
    # Only the allowed protocols of the list (every Upgrade field: one list) are offered.
    mixed = req(b"GET / HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: h2c, WebSocket/13\r\nUpgrade: x\r\n\r\n")
    assert mixed.upgrade == b"WebSocket/13"
    out = mixed.upstream_head(PEER)
    assert out.count(b"Upgrade:") == 1 and b"Upgrade: WebSocket/13\r\n" in out
    h2c = req(
        b"GET / HTTP/1.1\r\nHost: h\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: x\r\n\r\n"
    )
    assert h2c.upgrade is None
    out = h2c.upstream_head(PEER)
    assert b"Upgrade" not in out and b"HTTP2-Settings" not in out


@pytest.mark.parametrize(
    ("head", "reason"),
    [
        (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", errors.INVALID_HOST),  # RFC 9112 §3.2
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", errors.INVALID_FRAMING),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: identity\r\n\r\n", errors.INVALID_FRAMING),
        (b"POST / HTTP/1.0\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n", errors.INVALID_FRAMING),  # §6.1
        (b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", errors.MALFORMED_REQUEST),
        (b"CONNECT  HTTP/1.1\r\nHost: a\r\n\r\n", errors.MALFORMED_REQUEST),  # llhttp: target HTTP/1.1
        (b"GET  HTTP/1.1\r\nHost: a\r\n\r\n", errors.MALFORMED_REQUEST),
        # Two Transfer-Encoding fields are one list (RFC 9110 §5.3), "x, chunked": not exactly chunked.
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: x\r\nTransfer-Encoding: chunked\r\n\r\n",
         errors.INVALID_FRAMING),
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +5\r\n\r\n", errors.INVALID_FRAMING),  # 1*DIGIT
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n", errors.INVALID_FRAMING),
        # Underscore spellings of the framing fields: CGI-style servers read them as the real ones.
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent_Length: 5\r\n\r\n", errors.INVALID_FRAMING),
        (b"POST / HTTP/1.1\r\nHost: a\r\ntransfer_encoding: chunked\r\n\r\n", errors.INVALID_FRAMING),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: identity\r\nTransfer-Encoding: chunked\r\n\r\n",
         errors.INVALID_FRAMING),
        # A bare LF ends llhttp's request line: it would read another target than the gateway.
        # (A bare CR there llhttp refuses itself, and so does the analysis.)
        (b"GET /a\nX:y HTTP/1.1\r\nHost: a\r\n\r\n", errors.MALFORMED_REQUEST),
        (b"GET /a\rX:y HTTP/1.1\r\nHost: a\r\n\r\n", errors.MALFORMED_REQUEST),
        (b"GET /a HTTP/1.1\nX:y\r\nHost: a\r\n\r\n", errors.MALFORMED_REQUEST),
        # Leading CR/LF (the framer skips them; a head that still has them is refused, not parsed).
        (b"\nHEAD / HTTP/1.1\r\nHost: a\r\n\r\n", errors.MALFORMED_REQUEST),
        (b"\r\nHEAD / HTTP/1.1\r\nHost: a\r\n\r\n", errors.MALFORMED_REQUEST),
        (b"\rCONNECT a:1 HTTP/1.1\r\nHost: a\r\n\r\n", errors.MALFORMED_REQUEST),
    ],
)  # fmt: skip
def test_refused_requests(head: bytes, reason: errors.Reason) -> None:
    assert analyze_request(head, WS) == reason


def test_request_framing() -> None:
    assert req(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\n\r\n").body == framing.LENGTH
    assert req(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\n\r\n").body == framing.NONE
    chunked = req(b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: Chunked\r\n\r\n")
    assert chunked.body == framing.CHUNKED
    assert b"Transfer-Encoding: Chunked\r\n" in chunked.upstream_head(PEER)  # same coding, passed on


def resp(  # type: ignore[no-untyped-def]
    head: bytes,
    status: int = 200,
    *,
    head_req: bool = False,
    http10: bool = False,
    ka: bool = True,
    cookie: bytes = b"e2b_access",
):
    return analyze_response(head, status, head_req, http10, ka, cookie)


def test_response_passes_unchanged_minus_connection() -> None:
    head = (
        b"HTTP/1.1 200 Fine Thanks\r\nSet-Cookie: a=1\r\nContent-Length: 2\r\nConnection: keep-alive\r\n"
        b"Content-Encoding: gzip\r\nSet-Cookie: b=2\r\n\r\n"
    )
    out, body_in, body_out, length, keep_alive, reusable = resp(head)
    assert out == (
        b"HTTP/1.1 200 Fine Thanks\r\nSet-Cookie: a=1\r\nContent-Length: 2\r\nContent-Encoding: gzip\r\n"
        b"Set-Cookie: b=2\r\n\r\n"
    )
    assert (body_in, body_out, length, keep_alive, reusable) == (framing.LENGTH, framing.LENGTH, 2, True, True)


def test_response_framing_rules() -> None:
    # RFC 9112 §6.3: HEAD, 1xx, 204 and 304 have no body whatever their fields say.
    assert resp(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n", head_req=True)[1] == framing.NONE
    assert resp(b"HTTP/1.1 304 NM\r\nContent-Length: 9\r\n\r\n", 304)[1] == framing.NONE
    assert resp(b"HTTP/1.1 204 NC\r\n\r\n", 204)[1] == framing.NONE
    # Close-delimited: chunked for an HTTP/1.1 client (its connection stays open) ...
    out, body_in, body_out, _, keep_alive, reusable = resp(b"HTTP/1.0 200 OK\r\nServer: x\r\n\r\n")
    assert (body_in, body_out, keep_alive, reusable) == (framing.CLOSE, framing.CHUNKED, True, False)
    assert out == b"HTTP/1.1 200 OK\r\nServer: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    # ... and left close-delimited for an HTTP/1.0 client, which cannot read chunked coding.
    out, body_in, body_out, _, keep_alive, _ = resp(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", http10=True
    )
    assert (body_in, body_out, keep_alive) == (framing.CHUNKED, framing.CLOSE, False)
    assert out == b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n"
    # An HTTP/1.0 client that asked for keep-alive is told it got it.
    out = resp(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", http10=True)[0]
    assert out.endswith(b"Connection: keep-alive\r\n\r\n")


def test_response_transfer_encoding_fields_are_one_list() -> None:
    """RFC 9112 §6.3: the last coding of all Transfer-Encoding fields decides."""
    out, body_in, body_out, *_ = resp(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nX: 1\r\n\r\n")
    assert (body_in, body_out) == (framing.CLOSE, framing.CHUNKED)
    # Re-framed for an HTTP/1.1 client: one field, the sandbox's coding and chunked once, last.
    assert out == b"HTTP/1.1 200 OK\r\nX: 1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
    out, body_in, body_out, *_ = resp(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nX: 1\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    assert (body_in, body_out) == (framing.CHUNKED, framing.CHUNKED)
    assert out == b"HTTP/1.1 200 OK\r\nX: 1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"  # merged into one
    # Chunked anywhere but last (RFC 9112 §6.1: applied at most once, and last): refused, never
    # chunked again by the gateway.
    for te in (b"chunked, gzip", b"chunked, chunked", b"chunked\r\nTransfer-Encoding: chunked"):
        with pytest.raises(framing.FramingError):
            resp(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: " + te + b"\r\n\r\n")
    out, body_in, *_ = resp(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX: 1\r\n\r\n", http10=True)
    assert body_in == framing.CHUNKED
    assert out == b"HTTP/1.1 200 OK\r\nX: 1\r\nConnection: close\r\n\r\n"  # de-chunked: the TE field goes
    # Any other coding an HTTP/1.0 (or HTTP/2) client cannot take, and the gateway does not decode:
    # de-chunked, the body would still be gzip-coded, and no field would say so (RFC 9112 §6.1).
    for te in (b"gzip\r\nX: 1\r\nTransfer-Encoding: chunked", b"gzip", b"gzip, chunked", b"identity"):
        with pytest.raises(framing.FramingError):
            resp(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: " + te + b"\r\n\r\n", http10=True)
        assert resp(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: " + te + b"\r\n\r\n", http10=True, head_req=True)[1] == 0
    with pytest.raises(framing.FramingError):
        resp(b"HTTP/1.1 200 OK\r\nContent-Length: 0x5\r\n\r\n")


def test_thousands_of_hop_by_hop_response_fields_are_cut_in_one_pass() -> None:
    """A sandbox once stalled the loop for seconds with 8,500 hop-by-hop fields per head (each
    removal copied the head); what is removed and what is kept is exact. (Cost: bench, not here.)"""
    hop = b"".join(b"Keep-Alive: %d\r\nX-Named-%d: v\r\nX-Kept-%d: v\r\n" % (i, i, i) for i in range(3000))
    named = b"Connection: " + b", ".join(b"X-Named-%d" % i for i in range(3000)) + b"\r\n"
    head = b"HTTP/1.1 200 OK\r\n" + named + hop + b"Content-Length: 0\r\n\r\n"
    out = resp(head)[0]
    assert out == b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-Kept-%d: v\r\n" % i for i in range(3000)) + (
        b"Content-Length: 0\r\n\r\n"
    )


def test_upstream_reuse() -> None:
    assert not resp(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")[5]
    assert not resp(b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n")[5]
    assert resp(b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\nConnection: keep-alive\r\n\r\n")[5]


def test_101_keeps_upgrade() -> None:
    head = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: x\r\n\r\n"
    out = resp(head, 101)[0]
    assert out == (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nSec-WebSocket-Accept: x\r\n"
        b"Connection: upgrade\r\n\r\n"
    )


names = st.from_regex(rb"[A-Za-z][A-Za-z0-9-]{0,20}", fullmatch=True)
values = st.from_regex(rb"[ -~]{0,30}", fullmatch=True).map(lambda v: v.strip())


@given(st.lists(st.tuples(names, values), max_size=12))
def test_any_valid_request_head_is_forwarded_with_its_plain_fields_intact(hs: list[tuple[bytes, bytes]]) -> None:
    if any(n.lower() == b"connection" for n, _ in hs):
        return  # Connection may name other fields for removal: covered by its own test
    head = b"GET / HTTP/1.1\r\nHost: 80-a.e2b.dev\r\n" + b"".join(n + b": " + v + b"\r\n" for n, v in hs) + b"\r\n"
    p = httptools.HttpRequestParser(object())
    try:
        p.feed_data(head)
    except (httptools.HttpParserError, httptools.HttpParserUpgrade):
        return  # llhttp refuses it: never reaches the policy
    r = analyze_request(head, WS)
    if not isinstance(r, RequestHead):
        return
    out = r.upstream_head(PEER)
    special = {
        b"host",
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"upgrade",
        b"expect",
        b"transfer-encoding",
        b"content-length",
        b"forwarded",
        b"x-forwarded-for",
        b"x-forwarded-proto",
        b"x-forwarded-host",
        b"x-forwarded-port",
    }
    for n, v in hs:
        if n.lower() not in special:
            assert b"\r\n" + n + b": " + v + b"\r\n" in out


def test_traffic_token_is_read_and_never_forwarded() -> None:
    head = b"GET / HTTP/1.1\r\nHost: h\r\nE2B-Traffic-Access-Token: t0k\r\nA: b\r\n\r\n"
    r = req(head)
    assert r.token == b"t0k"
    out = r.upstream_head(PEER)
    assert b"t0k" not in out and b"A: b\r\n" in out


def test_field_names_are_configurable() -> None:
    roles = FieldRoles(b"x-sandbox-token", b"x-sandbox", b"x-port")
    head = b"GET / HTTP/1.1\r\nHost: h\r\nX-Sandbox-Token: t\r\nx-sandbox: abc\r\nX-PORT: 3000\r\n\r\n"
    r = analyze_request(head, roles)
    assert isinstance(r, RequestHead)
    assert (r.token, r.route_id, r.route_port) == (b"t", b"abc", b"3000")
    assert b"X-Sandbox-Token" not in r.upstream_head(PEER)
    # the default names are ordinary fields then
    r = req(b"GET / HTTP/1.1\r\nHost: h\r\ne2b-traffic-access-token: t\r\nE2b-Sandbox-Id: abc\r\n\r\n")
    assert r.token == b"t" and r.route_id == b"abc"
    r = analyze_request(b"GET / HTTP/1.1\r\nHost: h\r\ne2b-traffic-access-token: t\r\n\r\n", roles)
    assert isinstance(r, RequestHead) and r.token is None
    assert b"e2b-traffic-access-token: t" in r.upstream_head(PEER)


@pytest.mark.parametrize(
    ("origin", "sent"),
    [
        # The sandbox URL's own origin becomes the masked host's, so Jupyter and CSRF checks that
        # compare Origin with Host see what they would see unmasked.
        (b"http://8888-x.sandbox.localhost:8080", b"http://localhost:8888"),
        (b"HTTPS://8888-X.sandbox.localhost:8080", b"HTTPS://localhost:8888"),
        # Any other origin passes unchanged.
        (b"http://8888-x.sandbox.localhost:8081", b"http://8888-x.sandbox.localhost:8081"),
        (b"http://3000-x.sandbox.localhost:8080", b"http://3000-x.sandbox.localhost:8080"),
        (b"https://evil.example", b"https://evil.example"),
        (b"null", b"null"),
    ],
)
def test_mask_rewrites_only_the_sandboxs_own_origin(origin: bytes, sent: bytes) -> None:
    head = (
        b"GET /api/kernels HTTP/1.1\r\nHost: 8888-x.sandbox.localhost:8080\r\nOrigin: " + origin + b"\r\nA: b\r\n\r\n"
    )
    out = upstream(head, host=b"localhost:8888")
    assert out.startswith(b"GET /api/kernels HTTP/1.1\r\nHost: localhost:8888\r\nOrigin: " + sent + b"\r\nA: b\r\n")
    assert upstream(head).startswith(head[:-2])  # no mask: Origin untouched


def test_default_ports_compare_equal_for_the_origin() -> None:
    head = b"GET / HTTP/1.1\r\nHost: 3000-x.e2b.dev\r\nOrigin: https://3000-x.e2b.dev\r\n\r\n"
    assert b"\r\nOrigin: https://localhost:3000\r\n" in upstream(head, host=b"localhost:3000")


def test_edit_fields_and_replace_target_touch_only_what_they_name() -> None:
    from gateway.http.headers import edit_fields, replace_target

    raw = b"GET /x?a=1 HTTP/1.1\r\nHost: h\r\nCookie: a=1; k=2  \r\nX-Cookie: k=3\r\ncookie: k=4\r\n\r\n"
    drop_k = lambda v: b"; ".join(p for p in v.split(b"; ") if not p.startswith(b"k=")) or None  # noqa: E731
    assert edit_fields(raw, b"cookie", drop_k) == (
        b"GET /x?a=1 HTTP/1.1\r\nHost: h\r\nCookie: a=1  \r\nX-Cookie: k=3\r\n\r\n"
    )  # an edited line keeps the client's trailing whitespace; a removed line goes whole
    assert edit_fields(raw, b"cookie", lambda v: v) is raw
    assert replace_target(raw, b"/y") == raw.replace(b"/x?a=1", b"/y", 1)


@pytest.mark.parametrize(
    ("offered", "answer", "protocol"),
    [
        (b"websocket", b"Upgrade: websocket\r\n", b"websocket"),
        (b"WebSocket", b"Upgrade: websocket\r\n", b"websocket"),
        (b"websocket/13", b"Upgrade: WEBSOCKET\r\n", b"websocket"),
        (b"websocket", b"Upgrade: websocket/13\r\n", b"websocket"),
        (b"websocket/13", b"Upgrade: websocket/8\r\n", None),  # another version
        (b"websocket", b"Upgrade: h2c\r\n", None),  # a protocol nobody offered
        (b"websocket", b"Upgrade: websocket, h2c\r\n", None),  # one protocol: the tunnel carries one
        (b"websocket", b"Upgrade: websocket\r\nUpgrade: h2c\r\n", None),
        (b"websocket", b"Upgrade: \r\n", None),
        (b"websocket", b"", None),
    ],
)
def test_a_101_names_a_protocol_the_request_offered(offered: bytes, answer: bytes, protocol: bytes | None) -> None:
    head = b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\n" + answer + b"\r\n"
    assert upgrade_accepted(offered, head) == protocol


UNTRUSTED_HEAD = (
    b"GET / HTTP/1.1\r\nHost: h\r\nX-Real-IP: 6.6.6.6\r\nTrue-Client-IP: 6.6.6.6\r\nx-original-url: /admin\r\n"
    b"X-Kept: 1\r\nX_Forwarded_For: 6.6.6.6\r\nx_real_ip: 6.6.6.6\r\nCF-Connecting-IP: 6.6.6.6\r\n\r\n"
)


def test_untrusted_fields_are_removed_from_untrusted_peers_only() -> None:
    out = upstream(UNTRUSTED_HEAD)
    assert b"6.6.6.6" not in out and b"/admin" not in out and b"X-Kept: 1\r\n" in out
    lb = Peer.make("10.0.0.2", 8080, False, [__import__("ipaddress").ip_network("10.0.0.0/8")])
    out = upstream(UNTRUSTED_HEAD, lb)
    assert b"X-Real-IP: 6.6.6.6\r\nTrue-Client-IP: 6.6.6.6\r\nx-original-url: /admin\r\nX-Kept: 1\r\n" in out
    assert b"CF-Connecting-IP: 6.6.6.6\r\n" in out
    # An underscore spelling is never what a trusted proxy wrote: removed from everyone.
    assert b"X_Forwarded_For" not in out and b"x_real_ip" not in out


def test_thousands_of_untrusted_fields_from_a_trusted_proxy_are_kept_in_one_pass() -> None:
    """The trusted path takes the untrusted_fields lines back out of the cuts with a set, not a list
    scan per cut (it was cuts x fields); what is kept and what is cut is exact. (Cost: bench.)"""
    lb = Peer.make("10.0.0.2", 8080, False, [__import__("ipaddress").ip_network("10.0.0.0/8")])
    fields = b"".join(
        b"X-Real-IP: 10.0.%d.%d\r\nKeep-Alive: %d\r\nX-Kept: %d\r\n" % (i // 250, i % 250, i, i) for i in range(3000)
    )
    head = b"GET / HTTP/1.1\r\nHost: h\r\n" + fields + b"\r\n"
    out = upstream(head, lb)
    body = b"".join(b"X-Real-IP: 10.0.%d.%d\r\nX-Kept: %d\r\n" % (i // 250, i % 250, i) for i in range(3000))
    assert out.startswith(b"GET / HTTP/1.1\r\nHost: h\r\n" + body + b"X-Forwarded-For: 10.0.0.2\r\n")
    assert b"Keep-Alive" not in out
    assert b"X-Real-IP" not in upstream(head)  # from anyone else: all cut


def test_an_untrusted_field_a_trusted_proxy_names_in_connection_is_cut() -> None:
    """Kept from a trusted proxy as an untrusted_fields line, but hop-by-hop when its Connection
    names it (RFC 9110 §7.6.1: removed whoever sent it)."""
    lb = Peer.make("10.0.0.2", 8080, False, [__import__("ipaddress").ip_network("10.0.0.0/8")])
    out = upstream(
        b"GET / HTTP/1.1\r\nHost: h\r\nConnection: X-Real-IP\r\nX-Real-IP: 1.2.3.4\r\nTrue-Client-IP: 5.6.7.8\r\n\r\n",
        lb,
    )
    assert b"X-Real-IP" not in out and b"True-Client-IP: 5.6.7.8\r\n" in out


def test_untrusted_fields_are_configurable_and_match_underscores() -> None:
    roles = FieldRoles(untrusted=[b"X-Tenant_User"])
    r = analyze_request(
        b"GET / HTTP/1.1\r\nHost: h\r\nx_tenant_user: a\r\nX-Tenant-User: b\r\nX-Real-IP: c\r\n\r\n", roles
    )
    assert isinstance(r, RequestHead)
    out = r.upstream_head(PEER)
    assert b"tenant" not in out.lower() and b"X-Real-IP: c\r\n" in out


def test_a_configured_name_with_an_underscore_spelt_otherwise_is_removed() -> None:
    """``e2b_traffic-token`` configured, ``E2B_traffic_token`` sent: a look-alike, cut (it used to
    raise inside the data plane)."""
    roles = FieldRoles(b"e2b_traffic-token")
    r = analyze_request(b"GET / HTTP/1.1\r\nHost: h\r\nE2B_traffic_token: t\r\nX-Kept: 1\r\n\r\n", roles)
    assert isinstance(r, RequestHead)
    out = r.upstream_head(PEER)
    assert b"traffic" not in out.lower() and b"X-Kept: 1\r\n" in out


def test_a_repeated_routing_field_is_no_value() -> None:
    r = req(b"GET / HTTP/1.1\r\nHost: h\r\nE2b-Sandbox-Id: a\r\ne2b-sandbox-id: b\r\nE2b-Sandbox-Port: 1\r\n\r\n")
    assert (r.route_id, r.route_port) == (REPEATED, b"1")


def test_no_content_responses_lose_their_framing_fields() -> None:
    for status in (204, 304, 103):
        out = resp(b"HTTP/1.1 %d X\r\nContent-Length: 7\r\nETag: e\r\nTransfer-Encoding: chunked\r\n\r\n" % status,
                   status)[0]  # fmt: skip
        assert out.startswith(b"HTTP/1.1 %d X\r\nETag: e\r\n" % status) and b"Content-Length" not in out
        assert b"Transfer-Encoding" not in out
    # A HEAD response keeps them (they describe the GET's), as one Transfer-Encoding field.
    out = resp(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n", head_req=True)[0]
    assert out == b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
    out = resp(b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\n", head_req=True)[0]
    assert out == b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\n"


SET_COOKIES = (
    b"Set-Cookie: a=1\r\n"
    b"Set-Cookie: e2b_access=planted; Path=/; Max-Age=99999\r\n"
    b"set-cookie:  e2b_access =spaced; Domain=e2b.dev\r\n"
    b"SET-COOKIE: \te2b_access\t=tabbed\r\n"
    b"Set-Cookie: E2b_access=other-name\r\n"
    b"Set-Cookie: e2b_access2=other-name\r\n"
    b"Set-Cookie: x=e2b_access=value-only; e2b_access=attribute\r\n"
    b"Set-Cookie: e2b_access\r\n"
    b"Set-Cookie: e2b_access; Path=/\r\n"
    b"Set-Cookie: e2b_access=\r\n"
    b"Set-Cookie: b=2\r\n"
)
KEPT_COOKIES = (
    b"Set-Cookie: a=1\r\n"
    b"Set-Cookie: E2b_access=other-name\r\n"
    b"Set-Cookie: e2b_access2=other-name\r\n"
    b"Set-Cookie: x=e2b_access=value-only; e2b_access=attribute\r\n"
    b"Set-Cookie: e2b_access\r\n"
    b"Set-Cookie: e2b_access; Path=/\r\n"
    b"Set-Cookie: b=2\r\n"
)


@pytest.mark.parametrize(
    ("status", "start", "end"),
    [
        (200, b"HTTP/1.1 200 OK\r\n", b"Content-Length: 0\r\n\r\n"),
        (103, b"HTTP/1.1 103 Early Hints\r\n", b"Link: </a.css>; rel=preload\r\n\r\n"),
        (101, b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n", b"Connection: upgrade\r\n\r\n"),
    ],
)
def test_a_sandbox_cannot_set_the_gateways_cookie(status: int, start: bytes, end: bytes) -> None:
    """Set-Cookie fields naming the gateway's cookie go, from final, 1xx and 101 heads; the name as
    a browser reads it (RFC 6265 §5.2: before the first '=' of the part before the first ';',
    spaces and tabs trimmed, case-sensitive); without '=' a field sets no such cookie and passes."""
    head = start + SET_COOKIES + (b"Connection: keep-alive\r\n" if status == 101 else b"") + end
    out = resp(head, status)[0]
    assert out == start + KEPT_COOKIES + end
    assert resp(head, status, cookie=b"")[0] == start + SET_COOKIES + end  # no cookie configured
    assert resp(head, status, cookie=b"a")[0] == start + SET_COOKIES[len(b"Set-Cookie: a=1\r\n") :] + end


def test_own_cookie_lines_are_found_by_the_browsers_reading() -> None:
    head = b"HTTP/1.1 200 OK\r\n" + SET_COOKIES + b"\r\n"
    lines = [head[a:b] for a, b in own_cookie_lines(head, b"e2b_access")]
    assert lines == [
        b"\r\nSet-Cookie: e2b_access=planted; Path=/; Max-Age=99999",
        b"\r\nset-cookie:  e2b_access =spaced; Domain=e2b.dev",
        b"\r\nSET-COOKIE: \te2b_access\t=tabbed",
        b"\r\nSet-Cookie: e2b_access=",
    ]
    assert (
        own_cookie_lines(
            b"HTTP/1.1 200 OK\r\nSet-Cookie2: e2b_access=x\r\nX-Set-Cookie: e2b_access=x\r\n\r\n", b"e2b_access"
        )
        == []
    )


def test_a_removed_own_cookie_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("INFO", logger="gateway.headers"):
        resp(b"HTTP/1.1 200 OK\r\n" + SET_COOKIES + b"Content-Length: 0\r\n\r\n")
        resp(b"HTTP/1.1 200 OK\r\nSet-Cookie: E2b_access=1\r\nX: e2b_access\r\nContent-Length: 0\r\n\r\n")
    assert [r.getMessage() for r in caplog.records] == [
        "removed 4 Set-Cookie field(s) for the gateway's own cookie 'e2b_access' from a sandbox's 200 response"
    ]
