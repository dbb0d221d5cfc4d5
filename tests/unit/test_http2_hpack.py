"""The HPACK shortcuts of h2conn.py (blocks remembered while the dynamic table is unchanged, the
never-indexed request ID) against plain hpack: whatever the order of field lists, table size
changes and request IDs, the peer decodes exactly the fields that were encoded, and the gateway
decodes exactly what a client encoded."""

from __future__ import annotations

from typing import Any

from hpack import Decoder, Encoder, NeverIndexedHeaderTuple
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.http.h2conn import RememberingDecoder, RememberingEncoder

# A few names and values, so that lists repeat, share names, and churn the dynamic table.
_NAMES = st.sampled_from([b"content-type", b"date", b"server", b"x-a", b"x-request-id", b"etag", b"cache-control"])
_VALUES = st.sampled_from([b"text/plain", b"1", b"nginx", b"", b"abc", b"Thu, 26 Nov 2026 08:36:27 GMT", b"x" * 200])
_FIELDS = st.lists(st.tuples(_NAMES, _VALUES), max_size=6)
_RID = st.one_of(st.none(), st.binary(min_size=0, max_size=200))
_STEP = st.one_of(
    st.tuples(st.just("fields"), st.sampled_from([b"200", b"404", b"100"]), _FIELDS, _RID),
    st.tuples(st.just("resize"), st.sampled_from([0, 100, 4096])),
)


def _as_pairs(decoded: list[Any]) -> list[tuple[bytes, bytes]]:
    return [(bytes(n), bytes(v)) for n, v in decoded]


@settings(max_examples=300, deadline=None)
@given(st.lists(_STEP, max_size=40), st.integers(min_value=1, max_value=4))
def test_remembered_blocks_decode_as_encoded(steps: list[Any], repeat: int) -> None:
    """RememberingEncoder (what the gateway sends) against hpack's Decoder (what a client reads)."""
    enc = RememberingEncoder()
    dec = Decoder()
    for step in steps * repeat:  # the same lists again: now from the memo
        if step[0] == "resize":
            if step[1] != enc.header_table_size:  # (hpack loses a size update set twice)
                enc.header_table_size = step[1]
            continue
        _, status, fields, rid = step
        headers: list[Any] = [(b":status", status), *fields]
        if rid is not None and len(rid) % 2:  # the request ID given apart (http2.H2Stream.send_head)
            block = enc.encode_with(tuple(headers), (b"x-request-id", rid))
            headers.append((b"x-request-id", rid))
        else:
            if rid is not None:
                headers.append(NeverIndexedHeaderTuple(b"x-request-id", rid))
            block = enc.encode(headers)
        assert _as_pairs(dec.decode(block, raw=True)) == [(bytes(n), bytes(v)) for n, v in headers]


@settings(max_examples=300, deadline=None)
@given(st.lists(_STEP, max_size=40), st.integers(min_value=1, max_value=4))
def test_remembered_blocks_are_read_as_sent(steps: list[Any], repeat: int) -> None:
    """hpack's Encoder (a client) against RememberingDecoder (the gateway)."""
    enc = Encoder()
    dec = RememberingDecoder(1 << 20)
    for step in steps * repeat:
        if step[0] == "resize":
            if step[1] != enc.header_table_size:  # (hpack loses a size update set twice)
                enc.header_table_size = step[1]
            continue
        _, status, fields, rid = step
        headers: list[Any] = [(b":method", b"GET"), (b":path", b"/" + status), *fields]
        if rid is not None:
            headers.append(NeverIndexedHeaderTuple(b"x-request-id", rid))
        block = enc.encode(headers)
        assert _as_pairs(dec.decode(block, raw=True)) == [(bytes(n), bytes(v)) for n, v in headers]


def test_a_full_tables_reinsertion_of_its_newest_entry_is_a_change() -> None:
    """A client re-inserting the newest entry into a full table evicts the oldest while length,
    size and the first entry's value stay as they were: the decoder must see the change (a stale
    memo would decode later references to another request's fields, and skip the insertion)."""
    enc, plain, remembering = Encoder(), Decoder(), RememberingDecoder(65536)
    fields = [(b"x-k", b"%03d" % i + b"v" * 98) for i in range(30)]  # 30 x 136 bytes: 4,080 of 4,096
    block = enc.encode(fields)
    assert _as_pairs(plain.decode(block, raw=True)) == _as_pairs(remembering.decode(block, raw=True)) == fields
    oldest = bytes([0x80 | (61 + 30)])  # indexed field: the oldest dynamic entry
    newest = fields[-1][1]
    reinsert = bytes([0x40 | 62, len(newest)]) + newest  # literal, incremental indexing, newest's name
    for b in (oldest, reinsert, oldest, reinsert, oldest):
        assert _as_pairs(remembering.decode(b, raw=True)) == _as_pairs(plain.decode(b, raw=True))
