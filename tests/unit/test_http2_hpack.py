"""The HPACK shortcuts of h2conn.py (blocks remembered while the dynamic table is unchanged, the
never-indexed request ID) against plain hpack: whatever the order of field lists, table size
changes and request IDs, the peer decodes exactly the fields that were encoded, and the gateway
decodes exactly what a client encoded; and for header blocks written representation by
representation (RFC 7541 §6, what any encoder may send, valid or not), the gateway's decoder
decodes or fails as hpack's own and keeps the same dynamic table."""

from __future__ import annotations

from typing import Any

from hpack import Decoder, Encoder, NeverIndexedHeaderTuple
from hpack.huffman import HuffmanEncoder
from hpack.huffman_constants import REQUEST_CODES, REQUEST_CODES_LENGTH
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
@given(st.lists(st.lists(st.tuples(st.binary(max_size=20), st.binary(max_size=300)), max_size=6), max_size=6))
def test_no_string_is_sent_longer_than_its_bytes(lists: list[list[tuple[bytes, bytes]]]) -> None:
    """RFC 7541 §5.2 leaves Huffman coding to the encoder, string by string: the gateway's codes a
    string only when that makes it shorter (h2conn.ShortestEncoder), so no field costs more than its
    bytes and its representation's few octets (a byte of obs-text is 20 to 30 bits of Huffman code:
    hpack coded every string, and a sandbox's 30,000 such bytes passed nghttp2's 65,536-byte limit
    for a string, a connection error). Whatever the bytes, hpack decodes what was encoded."""
    enc = RememberingEncoder()
    dec = Decoder()
    for fields in lists:
        headers = [(b":status", b"200"), *fields]
        block = enc.encode(headers)
        assert _as_pairs(dec.decode(block, raw=True)) == headers
        assert len(block) <= sum(len(n) + len(v) + 7 for n, v in headers)


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


# ---- raw HPACK representations (RFC 7541 §6), not only what hpack's Encoder writes

_HUFFMAN = HuffmanEncoder(REQUEST_CODES, REQUEST_CODES_LENGTH)
_RAW_NAMES = st.sampled_from([b"x-a", b"x-b", b"cookie", b"content-type", b":path", b"Upper", b""])
_RAW_VALUES = st.sampled_from([b"", b"1", b"abc", b"/p", b"v" * 100, b"w" * 1500, b"\xff\x00"])


def _int(value: int, prefix: int, flags: int) -> bytes:
    """An HPACK integer (§5.1) with ``prefix`` bits in the first octet, whose other bits are ``flags``."""
    top = (1 << prefix) - 1
    if value < top:
        return bytes([flags | value])
    out = [flags | top]
    value -= top
    while value >= 128:
        out.append(value % 128 + 128)
        value //= 128
    out.append(value)
    return bytes(out)


@st.composite
def _string(draw: st.DrawFn, pool: st.SearchStrategy[bytes]) -> bytes:
    """A string literal (§5.2): raw or Huffman-coded (sometimes with padding that is not all ones)."""
    s = draw(pool)
    kind = draw(st.sampled_from(["raw", "huffman", "huffman", "bad_huffman"]))
    if kind == "raw":
        return _int(len(s), 7, 0) + s
    coded = _HUFFMAN.encode(s)
    if kind == "bad_huffman":
        coded += b"\x00"  # padding past 7 bits, or not of ones: a decoding error (§5.2)
    return _int(len(coded), 7, 0x80) + coded


_INDEX = st.one_of(st.integers(1, 61), st.integers(62, 75), st.just(0), st.integers(76, 5000))


@st.composite
def _representation(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["indexed", "incremental", "without", "never", "size"]))
    if kind == "indexed":  # §6.1
        return _int(draw(_INDEX), 7, 0x80)
    if kind == "size":  # §6.3 (a change past the allowed 4,096 is an error)
        return _int(draw(st.sampled_from([0, 1, 64, 200, 4096, 4097])), 5, 0x20)
    prefix, flags = {"incremental": (6, 0x40), "without": (4, 0x00), "never": (4, 0x10)}[kind]
    name = draw(st.one_of(st.none(), _INDEX))  # §6.2: the name indexed, or a literal
    head = _int(0, prefix, flags) + draw(_string(_RAW_NAMES)) if name is None else _int(name, prefix, flags)
    return head + draw(_string(_RAW_VALUES))


_BLOCK = st.lists(_representation(), max_size=8).map(b"".join)


def _decoded(d: Decoder | RememberingDecoder, block: bytes) -> tuple[str, Any]:
    try:
        return ("ok", _as_pairs(d.decode(block, raw=True)))
    except Exception as e:  # (the same failure is what is compared)
        return ("error", f"{type(e).__name__}: {e}")


def _table(d: Decoder) -> tuple[list[Any], int, int]:
    t = d.header_table
    return [(bytes(n), bytes(v)) for n, v in t.dynamic_entries], t._current_size, t.maxsize


@settings(max_examples=500, deadline=None)
@given(st.lists(st.one_of(_BLOCK, st.integers(0, 30)), min_size=1, max_size=30))
def test_raw_representations_decode_as_hpack_decodes_them(steps: list[Any]) -> None:
    """Header blocks of any sequence of representations (indexed fields, literals with, without and
    never indexing, their names indexed or literal, strings Huffman-coded or not, table size updates,
    indexes out of range, bad Huffman padding), and blocks sent again (an integer: an earlier block,
    now decoded from the memo if the table is unchanged): the gateway's remembering decoder and plain
    hpack, fed the same blocks in the same order, give the same lists or the same failure, and their
    dynamic tables are equal after every block."""
    plain, remembering = Decoder(8192), RememberingDecoder(8192)
    sent: list[bytes] = []
    for step in steps:
        if isinstance(step, int):
            if not sent:
                continue
            block = sent[step % len(sent)]
        else:
            block = step
            sent.append(block)
        assert _decoded(remembering, block) == _decoded(plain, block), block
        assert _table(remembering.d) == _table(plain)
