"""HTTP/2 requests as HTTP/1.1 heads and responses back (gateway/http/h2map.py), without sockets."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway import errors
from gateway.http import h2map
from gateway.http.headers import FieldRoles, RequestHead, analyze_request

H = list[tuple[bytes, bytes]]
BASE: H = [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"3000-abc.e2b.dev"), (b":path", b"/p?q=1")]


def test_a_request_becomes_the_http11_head_the_sandbox_gets() -> None:
    m = h2map.request_head([*BASE, (b"cookie", b"a=1"), (b"accept", b"*/*"), (b"cookie", b"b=2")], True)
    assert isinstance(m, h2map.Mapped)
    assert m.raw == b"GET /p?q=1 HTTP/1.1\r\nhost: 3000-abc.e2b.dev\r\ncookie: a=1; b=2\r\naccept: */*\r\n\r\n"
    assert not m.chunked and m.protocol is None
    req = analyze_request(m.raw, FieldRoles())
    assert isinstance(req, RequestHead) and req.host == b"3000-abc.e2b.dev" and req.target == b"/p?q=1"


def test_bodies_of_unknown_length_go_chunked_and_known_ones_as_they_are() -> None:
    m = h2map.request_head([(b":method", b"POST"), *BASE[1:]], False)
    assert isinstance(m, h2map.Mapped) and m.chunked and m.raw.endswith(b"transfer-encoding: chunked\r\n\r\n")
    post = [(b":method", b"POST"), *BASE[1:], (b"content-length", b"5")]
    m = h2map.request_head(post, False)
    assert isinstance(m, h2map.Mapped) and not m.chunked and b"transfer-encoding" not in m.raw


def test_extended_connect_becomes_an_upgrade_with_a_key() -> None:
    h = [(b":method", b"CONNECT"), (b":protocol", b"websocket"), *BASE[1:], (b"sec-websocket-version", b"13")]
    m = h2map.request_head(h, False)
    assert isinstance(m, h2map.Mapped) and m.protocol == b"websocket" and m.ws_key is not None
    assert m.raw.startswith(b"GET /p?q=1 HTTP/1.1\r\n")
    assert b"\r\nconnection: upgrade\r\nupgrade: websocket\r\nsec-websocket-key: " + m.ws_key + b"\r\n" in m.raw
    req = analyze_request(m.raw, FieldRoles())
    assert isinstance(req, RequestHead) and req.upgrade == b"websocket"


@pytest.mark.parametrize(
    "extra",
    [
        [(b"connection", b"close")], [(b"keep-alive", b"1")], [(b"proxy-connection", b"x")],
        [(b"transfer-encoding", b"chunked")], [(b"upgrade", b"h2c")], [(b"te", b"gzip")],
        [(b"Upper", b"1")], [(b"x", b"a\r\nb: c")], [(b"x", b"a\nb")], [(b"x", b"\x00")], [(b"x", b" a")],
        [(b"x", b"a\t")], [(b"host", b"other")], [(b":path", b"/again")], [(b"x y", b"1")],
    ],
)  # fmt: skip
def test_malformed_requests(extra: H) -> None:
    assert isinstance(h2map.request_head(BASE + extra, True), str)


@pytest.mark.parametrize(
    "headers",
    [
        [(b":scheme", b"https"), (b":authority", b"a"), (b":path", b"/")],  # no :method
        [(b":method", b"GET"), (b":authority", b"a"), (b":path", b"/")],  # no :scheme
        [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"a")],  # no :path
        [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"a"), (b":path", b"x")],
        [(b":method", b"G T"), (b":scheme", b"http"), (b":authority", b"a"), (b":path", b"/")],
        [(b"x", b"1"), (b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"a"), (b":path", b"/")],
        [(b":method", b"GET"), (b":protocol", b"websocket"), *BASE[1:]],
        [(b":method", b"CONNECT"), (b":authority", b"a"), (b":path", b"/")],
        [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"a b"), (b":path", b"/")],
    ],
)
def test_bad_pseudo_header_fields(headers: H) -> None:
    assert isinstance(h2map.request_head(headers, True), str)


def test_host_field_equal_to_authority_is_fine_and_sent_once() -> None:
    m = h2map.request_head([*BASE, (b"host", b"3000-ABC.e2b.dev")], True)
    assert isinstance(m, h2map.Mapped) and m.raw.count(b"host:") == 1


def test_no_authority_uses_the_host_field() -> None:
    m = h2map.request_head([BASE[0], BASE[1], BASE[3], (b"host", b"h.example")], True)
    assert isinstance(m, h2map.Mapped) and b"\r\nhost: h.example\r\n" in m.raw


@given(st.lists(st.tuples(st.binary(max_size=12), st.binary(max_size=12)), max_size=8), st.booleans())
def test_whatever_the_fields_the_head_is_one_valid_http11_head_or_refused(extra: H, end: bool) -> None:
    """No field can smuggle a line, a second head or a framing change into the head the sandbox gets."""
    m = h2map.request_head(BASE + extra, end)
    if isinstance(m, str):
        return
    assert m.raw.count(b"\r\n\r\n") == 1 and m.raw.endswith(b"\r\n\r\n")
    lines = m.raw[:-4].split(b"\r\n")
    assert len(lines) == 1 + m.fields
    for line in lines[1:]:
        assert b"\n" not in line and b"\r" not in line and b"\x00" not in line
    req = analyze_request(m.raw, FieldRoles())
    assert isinstance(req, RequestHead) or req in (errors.INVALID_FRAMING, errors.INVALID_HOST)


def test_trailers() -> None:
    assert h2map.trailer_section([(b"x-sum", b"1")]) == b"x-sum: 1\r\n\r\n"
    for bad in ([(b":status", b"1")], [(b"X", b"1")], [(b"x", b"a\r\n")], [(b"transfer-encoding", b"x")]):
        assert isinstance(h2map.trailer_section(bad), str)


def test_response_heads_become_field_lists() -> None:
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: keep-alive\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\nKeep-Alive: timeout=5\r\n\r\n"
    assert h2map.response_fields(head) == [
        (b":status", b"200"), (b"content-type", b"text/plain"), (b"set-cookie", b"a=1"), (b"set-cookie", b"b=2")
    ]  # fmt: skip
    up = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: x\r\nSec-WebSocket-Protocol: chat\r\n\r\n"
    assert h2map.response_fields(up, tunnel=True) == [(b":status", b"200"), (b"sec-websocket-protocol", b"chat")]


@pytest.mark.parametrize("reason", list(errors.REASONS.values()), ids=list(errors.REASONS))
@pytest.mark.parametrize("html", [False, True])
def test_every_gateway_answer_is_the_same_over_http2(reason: errors.Reason, html: bool) -> None:
    """What H2Stream.answer sends for errors.render's bytes: the same status, reason field and body."""
    out = errors.render(reason, sandbox_id="abc", port=3000, as_html=html, origin=b"https://o", close=True)
    i = out.find(b"\r\n\r\n") + 4
    fields = h2map.response_fields(out[:i])
    assert fields[0] == (b":status", str(reason.status).encode())
    d = dict(fields[1:])
    assert d[b"x-gateway-reason"] == reason.code.encode()
    assert b"connection" not in d
    assert all(n == n.lower() for n, _ in fields)
    if reason.status != 204:
        assert int(d[b"content-length"]) == len(out[i:])


def test_a_field_section_is_measured_as_settings_max_header_list_size_counts_it() -> None:
    """RFC 9113 §6.5.2: each field's name and value in octets, plus 32; a name or value past what
    nghttp2 decodes (h2map.MAX_STRING) fits no limit."""
    assert h2map.section_size([]) == 0
    assert h2map.section_size([(b":status", b"200"), (b"x-a", b"")]) == (7 + 3 + 32) + (3 + 0 + 32)
    assert h2map.section_size([(b"x", b"v" * h2map.MAX_STRING)]) == 1 + h2map.MAX_STRING + 32
    assert h2map.section_size([(b"x", b"v" * (h2map.MAX_STRING + 1))]) == -1
    assert h2map.section_size([(b"x" * (h2map.MAX_STRING + 1), b"")]) == -1
