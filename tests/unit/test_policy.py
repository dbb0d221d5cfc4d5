"""Routing policy: direct and node mode, Host masking, states, ports, traffic tokens (pure)."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway import errors
from gateway.catalog.record import SandboxRecord
from gateway.hostname import Route
from gateway.policy import Forward, OwnListeners, check_token, decide, pool_key


def test_direct_mode_uses_the_label_port() -> None:
    d = decide(Route(3000, "abc"), SandboxRecord("10.0.0.1", "e1"), node_port=0)
    assert d == Forward("10.0.0.1", 3000, pool_key("10.0.0.1", 3000, "e1"), execution_id="e1")


def test_node_mode_uses_the_node_port_and_keeps_host() -> None:
    d = decide(Route(3000, "abc"), SandboxRecord("10.0.0.1", "e1", mask_request_host="x"), node_port=5007)
    assert d == Forward("10.0.0.1", 5007, pool_key("10.0.0.1", 5007, "e1"), execution_id="e1")


def test_mask_request_host() -> None:
    d = decide(Route(5173, "abc"), SandboxRecord("10.0.0.1", mask_request_host="localhost:${PORT}"), 0)
    assert isinstance(d, Forward) and d.host == b"localhost:5173"


def test_pool_keys_separate_executions() -> None:
    assert pool_key("10.0.0.1", 80, "e1") != pool_key("10.0.0.1", 80, "e2")


def test_states() -> None:
    route = Route(3000, "abc")
    assert decide(route, SandboxRecord("10.0.0.1", state="paused"), 0) is errors.SANDBOX_PAUSED
    for s in ("pausing", "resuming", "starting", "stopping"):
        d = decide(route, SandboxRecord("10.0.0.1", state=s), 0)
        assert isinstance(d, errors.Reason)
        # One code for tools, a message that names the state for people.
        assert (d.code, d.status, d.message, d.retry_after) == ("sandbox_transitioning", 409, f"The sandbox is {s}.", 1)
    assert isinstance(decide(route, SandboxRecord("10.0.0.1", state="running"), 0), Forward)


def test_ports_restrict_routable_ports() -> None:
    rec = SandboxRecord("10.0.0.1", ports=frozenset({3000, 8080}))
    assert isinstance(decide(Route(8080, "abc"), rec, 0), Forward)
    assert decide(Route(5000, "abc"), rec, 0) is errors.PORT_NOT_EXPOSED


def test_token_required_except_on_exempt_ports() -> None:
    rec = SandboxRecord("10.0.0.1", traffic_access_token="s3cret")
    d = decide(Route(3000, "abc"), rec, 0, exempt_ports=(49983,))
    assert isinstance(d, Forward) and d.token == b"s3cret"
    d = decide(Route(49983, "abc"), rec, 0, exempt_ports=(49983,))
    assert isinstance(d, Forward) and d.token is None
    assert isinstance(decide(Route(3000, "abc"), SandboxRecord("10.0.0.1"), 0), Forward)


def test_check_token() -> None:
    assert check_token(b"s3cret", b"s3cret") is None
    assert check_token(b"s3cret", None) is errors.TRAFFIC_TOKEN_MISSING
    assert check_token(b"s3cret", b"") is errors.TRAFFIC_TOKEN_INVALID
    assert check_token(b"s3cret", b"s3cre") is errors.TRAFFIC_TOKEN_INVALID
    assert check_token(b"s3cret", b"S3CRET") is errors.TRAFFIC_TOKEN_INVALID


@given(st.binary(max_size=40), st.binary(max_size=40))
def test_check_token_accepts_exactly_the_token(expected: bytes, presented: bytes) -> None:
    assert (check_token(expected, presented) is None) == (expected == presented)


OWN = [("127.0.0.1", 8080), ("0.0.0.0", 8443), ("::", 9000), ("10.0.0.5", 8081), ("::1", 8082)]


@pytest.mark.parametrize(
    ("peer", "local", "own"),
    [
        (("127.0.0.1", 8080), "127.0.0.1", True),  # a listener's own address
        (("127.0.0.1", 8081), "127.0.0.1", False),  # another port: a sandbox on this machine
        (("127.0.0.2", 8080), "127.0.0.1", False),  # 127.0.0.1:8080 does not cover 127.0.0.2
        (("127.0.0.2", 8443), "127.0.0.1", True),  # 0.0.0.0 covers every loopback address
        (("10.0.0.5", 8443), "10.0.0.5", True),  # ... and every address of the machine
        (("10.0.0.9", 8443), "10.0.0.5", False),  # another machine at the same port
        (("::ffff:127.0.0.1", 8080), "::ffff:127.0.0.1", True),  # IPv4-mapped
        (("::1", 9000), "::1", True),  # :: covers IPv6 loopback
        (("fd00::2", 9000), "fd00::2", True),
        (("fd00::3", 9000), "fd00::2", False),
        (("127.0.0.1", 9000), "127.0.0.1", False),  # a :: listener is IPv6 only (IPV6_V6ONLY)
        (("::1", 8443), "::1", False),  # and 0.0.0.0 IPv4 only
        (("10.0.0.5", 8081), "10.0.0.7", True),  # an exact listener address, whatever the source
        (("fe80::1%eth0", 9000), "fe80::1%eth0", True),  # a zone is not part of the address
        (("not-an-ip", 8080), "127.0.0.1", False),
    ],
)
def test_reaches_own_listener(peer: tuple[str, int], local: str, own: bool) -> None:
    assert OWN_PARSED.reached(peer, local) is own


OWN_PARSED = OwnListeners.parse(OWN)
ip = ipaddress.ip_address


def test_own_listeners_are_parsed_once_into_sets() -> None:
    """The parsed form: exact addresses as IP objects (IPv4-mapped ones as IPv4, zones dropped),
    and the ports of the wildcard listeners per family."""
    parsed = OwnListeners.parse(
        [*OWN, ("::ffff:10.0.0.6", 8083), ("fe80::1%eth0", 8084), ("not-an-ip", 8085), ("0.0.0.0", 8080)]
    )
    assert parsed.exact == {
        (ip("127.0.0.1"), 8080), (ip("10.0.0.5"), 8081), (ip("::1"), 8082), (ip("10.0.0.6"), 8083),
        (ip("fe80::1"), 8084),
    }  # fmt: skip
    assert parsed.any_v4 == {8443, 8080} and parsed.any_v6 == {9000}
    assert parsed.reached(("10.0.0.6", 8083), "10.0.0.1")  # mapped at bind, plain at connect
    assert parsed.reached(("::ffff:10.0.0.5", 8081), "::ffff:10.0.0.1")  # and the other way round
    assert parsed.reached(("127.0.0.9", 8080), "127.0.0.1")  # the added 0.0.0.0:8080
    assert not parsed.reached(("10.0.0.9", 8080), "10.0.0.5")
    assert not OwnListeners() and not OwnListeners.parse([("not-an-ip", 1)]) and parsed
    with pytest.raises(AttributeError):
        parsed.exact = frozenset()  # type: ignore[misc]  # frozen


def test_own_listeners_cost_set_lookups_however_many_there_are() -> None:
    """Many listeners: answers are those of a listener-by-listener check (the form before parsing)."""
    many = [(f"10.1.{i // 250}.{i % 250 + 1}", 20000 + i) for i in range(2000)] + [("::", 30000), ("0.0.0.0", 30001)]
    parsed = OwnListeners.parse(many)
    assert len(parsed.exact) == 2000
    assert parsed.reached(("10.1.7.200", 20000 + 7 * 250 + 199), "10.9.9.9")
    assert not parsed.reached(("10.1.7.200", 20000 + 7 * 250 + 198), "10.9.9.9")
    assert parsed.reached(("fd00::1", 30000), "fd00::1") and not parsed.reached(("fd00::1", 30001), "fd00::1")
