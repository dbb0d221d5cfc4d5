"""The host grammar: table tests and properties (pure, no sockets)."""

from __future__ import annotations

import socket

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway import errors
from gateway.hostname import (
    HostRouter,
    Route,
    authority_matches,
    check_domain,
    normalize_host,
    parse_label,
    parse_routing_fields,
)
from gateway.http.headers import REPEATED

router = HostRouter(["e2b.dev", "eu.e2b.dev", "sandbox.localhost"])


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        (b"3000-abc.e2b.dev", Route(3000, "abc")),
        (b"3000-i62mff4ahtrdfdkyn2esc-b0b684e9.e2b.dev", Route(3000, "i62mff4ahtrdfdkyn2esc", "b0b684e9")),
        (b"3000-ABC.E2B.DEV", Route(3000, "abc")),  # names are case-insensitive
        (b"3000-abc.e2b.dev:443", Route(3000, "abc")),  # the port in Host is not the sandbox port
        (b"3000-abc.e2b.dev.", Route(3000, "abc")),  # one trailing dot: the same host
        (b"3000-abc.e2b.dev.:8080", Route(3000, "abc")),
        (b"1-a.e2b.dev", Route(1, "a")),
        (b"65535-" + b"a" * 64 + b".e2b.dev", Route(65535, "a" * 64)),
        (b"8080-abc.eu.e2b.dev", Route(8080, "abc")),  # the longest configured domain wins
        (b"3000-demo.sandbox.localhost:8080", Route(3000, "demo")),
        (b"e2b.dev", None),  # a bare domain: routing fields or the health path
        (b"3000-abc.example.com", errors.UNKNOWN_DOMAIN),
        (b"3000-abc.e2b.dev.evil.com", errors.UNKNOWN_DOMAIN),
        (b"3000-abcxe2b.dev", errors.UNKNOWN_DOMAIN),
        (b"127.0.0.1:8080", None),  # shared: routed by fields
        (b"[::1]:8080", None),
        (b"3000-abc.e2b.dev..", errors.INVALID_HOST),
        (b"a.3000-abc.e2b.dev", errors.INVALID_HOST),  # one label only
        (b"3000.e2b.dev", errors.INVALID_HOST),
        (b"3000-abc-def-ghi.e2b.dev", errors.INVALID_HOST),
        (b"3000-abc-DEF_x.e2b.dev", errors.INVALID_HOST),
        (b"3000-abc-.e2b.dev", errors.INVALID_HOST),  # empty client id
        (b"3000-abc.e2b.dev:80x", errors.INVALID_HOST),
        (b"3000-abc.e2b.dev:1234567", errors.INVALID_HOST),
        (b"3000-ab_c.e2b.dev", errors.INVALID_HOST),
        (b"3000-abc.e2b.dev\xff", errors.INVALID_HOST),
        (b"", errors.INVALID_HOST),
        (b"[::1", errors.INVALID_HOST),
        (b"0-abc.e2b.dev", errors.INVALID_PORT),
        (b"03000-abc.e2b.dev", errors.INVALID_PORT),  # no leading zero: one spelling per port
        (b"65536-abc.e2b.dev", errors.INVALID_PORT),
        (b"99999-abc.e2b.dev", errors.INVALID_PORT),
        (b"100000-abc.e2b.dev", errors.INVALID_PORT),
        (b"-abc.e2b.dev", errors.INVALID_PORT),
        (b"x80-abc.e2b.dev", errors.INVALID_PORT),
        (b"3000--x.e2b.dev", errors.INVALID_SANDBOX_ID),
        (b"3000-" + b"a" * 65 + b".e2b.dev", errors.INVALID_SANDBOX_ID),
    ],
)
def test_route_table(host: bytes, expected: object) -> None:
    assert router.route(host) == expected


def test_route_is_memoised_and_bounded() -> None:
    r = HostRouter(["e2b.dev"], memo_size=4)
    for i in range(1, 20):
        assert r.route(b"%d-abc.e2b.dev" % i) == Route(i, "abc")
    assert len(r._memo) <= 4


def test_label_grammar() -> None:
    assert parse_label("80-abc") == Route(80, "abc")
    assert parse_label("80-abc-def") == Route(80, "abc", "def")
    assert parse_label("+80-abc") == errors.INVALID_PORT
    assert parse_label("８０-abc") == errors.INVALID_PORT  # non-ASCII digits are not a port


def test_normalize_host() -> None:
    assert normalize_host(b"ExAmple.COM.:80") == "example.com"
    assert normalize_host(b"[::1]:80") == "[::1]"
    assert normalize_host(b"a b") == errors.INVALID_HOST


@pytest.mark.parametrize(
    ("target", "host", "expected"),
    [
        (b"/path", b"a.e2b.dev", None),
        (b"http://3000-abc.e2b.dev/x", b"3000-abc.e2b.dev", True),
        (b"http://3000-ABC.e2b.dev:80/x?y", b"3000-abc.e2b.dev", True),
        (b"http://3000-abc.e2b.dev", b"3000-abc.e2b.dev:80", True),
        (b"https://3000-abc.e2b.dev/", b"3000-abc.e2b.dev:443", True),
        (b"http://3000-other.e2b.dev/x", b"3000-abc.e2b.dev", False),
        (b"http://3000-abc.e2b.dev:8080/x", b"3000-abc.e2b.dev", False),
        (b"http://user@3000-abc.e2b.dev/x", b"3000-abc.e2b.dev", False),
    ],
)
def test_absolute_form_authority(target: bytes, host: bytes, expected: bool | None) -> None:
    assert authority_matches(target, host) is expected


def test_check_domain_uses_the_bundled_list_only(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_network(*a: object, **k: object) -> None:
        raise AssertionError("tldextract tried the network")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    assert check_domain("e2b.dev") == (None, None)
    assert check_domain("com")[0] is not None  # a public suffix
    assert check_domain("co.uk")[0] is not None
    assert check_domain("sandbox.localhost")[0] is None
    assert check_domain("sandbox.localhost")[1] is not None  # allowed, with a note
    assert check_domain("bad_domain.com")[0] is not None
    assert check_domain("-x.com")[0] is not None


labels = st.from_regex(r"[a-z0-9]{1,64}", fullmatch=True)


@given(port=st.integers(1, 65535), sid=labels, cid=st.none() | labels, upper=st.booleans(), dot=st.booleans())
def test_valid_label_round_trips(port: int, sid: str, cid: str | None, upper: bool, dot: bool) -> None:
    route = Route(port, sid, cid)
    host = f"{route.label}.e2b.dev" + ("." if dot else "")
    assert router.route((host.upper() if upper else host).encode()) == route


@given(st.binary(max_size=300))
def test_no_input_crashes_the_router(host: bytes) -> None:
    r = HostRouter(["e2b.dev"]).route(host)
    assert r is None or isinstance(r, Route) or r in errors.REASONS.values()


@given(st.text(max_size=100))
def test_no_label_crashes_the_parser(label: str) -> None:
    r = parse_label(label)
    assert isinstance(r, Route) or r in (errors.INVALID_HOST, errors.INVALID_PORT, errors.INVALID_SANDBOX_ID)


@given(st.binary(max_size=200), st.binary(max_size=100))
def test_no_target_crashes_the_authority_check(target: bytes, host: bytes) -> None:
    assert authority_matches(target, host) in (None, True, False)


def test_shared_hosts_ip_literals_and_localhost_route_by_fields() -> None:
    r = HostRouter(["e2b.dev"], shared_hosts=["sandbox.e2b.dev"])
    for host in (b"sandbox.e2b.dev", b"SANDBOX.e2b.dev.:443", b"127.0.0.1:8080", b"[::1]:8080", b"localhost"):
        assert r.route(host) is None, host
    assert r.route(b"3000-abc.e2b.dev") == Route(3000, "abc")
    assert r.route(b"1.2.3.4.5") is errors.UNKNOWN_DOMAIN


def test_routing_fields() -> None:
    assert parse_routing_fields(b"abc", b"3000") == Route(3000, "abc")
    assert parse_routing_fields(b"ABC ", b" 8080") == Route(8080, "abc")  # OWS; IDs compare like host names
    assert parse_routing_fields(b"abc", b"65535") == Route(65535, "abc")
    assert parse_routing_fields(b"abc", None) is errors.MISSING_ROUTING_HEADER
    assert parse_routing_fields(None, b"3000") is errors.MISSING_ROUTING_HEADER


@pytest.mark.parametrize(
    ("sid", "port"),
    [
        (b"abc", b"3000-pub"),  # once routed to sandbox "pub" (3000-pub-abc parsed as a host label)
        (b"abc", b"0"),
        (b"abc", b"03000"),  # one spelling per port, as in the host label
        (b"abc", b"65536"),
        (b"abc", b"100000"),
        (b"abc", b"+3000"),
        (b"abc", b"3000 3000"),
        (b"abc", b"3000,3000"),
        (b"abc", "\u0663".encode()),
        (b"abc", b""),
        (b"a-b", b"3000"),
        (b"abc.def", b"3000"),
        (b"a" * 65, b"3000"),
        (b"", b"3000"),
        (b"ab\xff", b"3000"),
        (b"abc,def", b"3000"),
        (REPEATED, b"3000"),  # the field was sent twice
        (b"abc", REPEATED),
    ],
)
def test_malformed_or_repeated_routing_fields_are_refused(sid: bytes, port: bytes) -> None:
    assert parse_routing_fields(sid, port) is errors.INVALID_ROUTING_HEADER


@pytest.mark.parametrize(
    ("host", "ok"),
    [
        (b"3000-abc.e2b.dev:1", True),
        (b"3000-abc.e2b.dev:65535", True),
        (b"3000-abc.e2b.dev:", True),  # RFC 3986 §3.2.3: an empty port is allowed
        (b"3000-abc.e2b.dev:0", False),
        (b"3000-abc.e2b.dev:65536", False),
        (b"3000-abc.e2b.dev:99999", False),
        (b"3000-abc.e2b.dev:123456", False),
        (b"[::1]:99999", False),
        (b"[::1]:0", False),
        (b"[::1]:8080", True),
    ],
)
def test_host_ports_are_1_to_65535(host: bytes, ok: bool) -> None:
    assert (normalize_host(host) is not errors.INVALID_HOST) is ok


@given(st.binary(max_size=80), st.binary(max_size=12))
def test_no_routing_fields_crash_the_parser(sid: bytes, port: bytes) -> None:
    r = parse_routing_fields(sid, port)
    assert isinstance(r, Route) or r is errors.INVALID_ROUTING_HEADER
    if isinstance(r, Route):  # only exactly what the grammar allows
        assert port.strip(b" \t") == str(r.port).encode() and 1 <= r.port <= 65535
        assert sid.strip(b" \t").lower() == r.sandbox_id.encode()
