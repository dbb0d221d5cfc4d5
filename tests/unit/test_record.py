"""The catalog record contract (pure)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.catalog.record import RecordError, SandboxRecord, dump_record, parse_record


def test_host_and_execution_id() -> None:
    r = parse_record('{"host": "10.0.0.7", "execution_id": "e1"}')
    assert r == SandboxRecord("10.0.0.7", "e1")


def test_e2b_record_as_its_api_writes_it() -> None:
    raw = json.dumps(
        {
            "orchestrator_id": "node-7",
            "orchestrator_ip": "10.11.12.13",
            "execution_id": "4f1c",
            "sandbox_started_at": "2026-11-26T08:00:00Z",
            "sandbox_max_length_in_hours": 24,
        }
    )
    assert parse_record(raw) == SandboxRecord("10.11.12.13", "4f1c")


def test_host_wins_over_orchestrator_ip() -> None:
    assert parse_record('{"host": "10.0.0.1", "orchestrator_ip": "10.0.0.2"}').address == "10.0.0.1"


def test_optional_fields() -> None:
    r = parse_record(
        '{"host": "sb.internal", "state": "paused", "traffic_access_token": "t", '
        '"mask_request_host": "localhost:${PORT}", "ports": [3000, 8080]}'
    )
    assert r.state == "paused"
    assert r.traffic_access_token == "t"
    assert r.mask_request_host == "localhost:${PORT}"
    assert r.ports == frozenset({3000, 8080})


@pytest.mark.parametrize("address", ["::1", "[::1]", "fd00::7"])
def test_ipv6_addresses(address: str) -> None:
    assert parse_record(json.dumps({"host": address})).address in ("::1", "fd00::7")


@pytest.mark.parametrize(
    "raw",
    [
        b"not json",
        b"[1,2]",
        b'"string"',
        b"{}",
        b'{"execution_id": "e"}',
        b'{"host": ""}',
        b'{"host": 7}',
        b'{"host": "a b"}',
        b'{"host": "10.0.0.1", "state": "weird"}',
        b'{"host": "10.0.0.1", "ports": "3000"}',
        b'{"host": "10.0.0.1", "ports": [0]}',
        b'{"host": "10.0.0.1", "ports": [true]}',
        b'{"host": "10.0.0.1", "execution_id": 5}',
        # A token that is there but empty or not a string fails closed, never public (issue 10).
        b'{"host": "10.0.0.1", "traffic_access_token": ""}',
        b'{"host": "10.0.0.1", "traffic_access_token": 0}',
        b'{"host": "10.0.0.1", "traffic_access_token": false}',
        b'{"host": "10.0.0.1", "traffic_access_token": ["t"]}',
        b"\xff\xfe",
    ],
)
def test_invalid_records(raw: bytes) -> None:
    with pytest.raises(RecordError):
        parse_record(raw)


def test_dump_is_the_inverse_of_parse() -> None:
    r = SandboxRecord("10.0.0.1", "e", "paused", "tok", "localhost:${PORT}", frozenset({1, 2}))
    assert parse_record(dump_record(r)) == r


@given(st.binary(max_size=200))
def test_no_value_crashes_the_parser(raw: bytes) -> None:
    try:
        parse_record(raw)
    except RecordError:
        pass


def test_a_null_token_is_a_public_sandbox() -> None:
    """JSON null is the way writers say "no value" (E2B's Go structs write it for a nil pointer)."""
    assert parse_record(b'{"host": "10.0.0.1", "traffic_access_token": null}').traffic_access_token is None
