"""The PROXY protocol parser, v1 and v2: table tests and properties (pure, no sockets)."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from gateway.http.proxy_protocol import (
    MAX_HEADER_LENGTH,
    NEED_MORE,
    V1_MAX_LENGTH,
    NeedMore,
    ProxyInfo,
    ProxyProtocolError,
    parse,
)

SIG = b"\r\n\r\n\x00\r\nQUIT\n"
HTTP = b"GET / HTTP/1.1\r\nHost: 3000-abc.e2b.dev\r\n\r\n"
NO_ADDRESS_1 = ProxyInfo(None, None, 1)
NO_ADDRESS_2 = ProxyInfo(None, None, 2)


def v2(command: int, family: int, block: bytes, *, version: int = 2, length: int | None = None) -> bytes:
    """A v2 header: signature, version/command, family/protocol, length, then ``block``."""
    size = len(block) if length is None else length
    return SIG + bytes([version << 4 | command, family]) + struct.pack("!H", size) + block


def tlv(kind: int, value: bytes) -> bytes:
    return bytes([kind]) + struct.pack("!H", len(value)) + value


def ipv4_block(src: str, dst: str, sport: int, dport: int) -> bytes:
    return ipaddress.IPv4Address(src).packed + ipaddress.IPv4Address(dst).packed + struct.pack("!HH", sport, dport)


def ipv6_block(src: str, dst: str, sport: int, dport: int) -> bytes:
    return ipaddress.IPv6Address(src).packed + ipaddress.IPv6Address(dst).packed + struct.pack("!HH", sport, dport)


LONGEST_V1 = b"PROXY UNKNOWN " + b"ffff:" * 7 + b"ffff " + b"ffff:" * 7 + b"ffff 65535 65535\r\n"
assert len(LONGEST_V1) == V1_MAX_LENGTH

VALID = [
    # v1 (section 2.1)
    (b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n", ProxyInfo(("192.168.0.1", 56324), ("192.168.0.11", 443), 1)),
    (b"PROXY TCP4 0.0.0.0 255.255.255.255 0 65535\r\n", ProxyInfo(("0.0.0.0", 0), ("255.255.255.255", 65535), 1)),
    (b"PROXY TCP4 10.0.0.1 10.0.0.2 1 10\r\n", ProxyInfo(("10.0.0.1", 1), ("10.0.0.2", 10), 1)),
    (b"PROXY TCP6 2001:db8::1 2001:db8::2 1234 80\r\n", ProxyInfo(("2001:db8::1", 1234), ("2001:db8::2", 80), 1)),
    (b"PROXY TCP6 ::1 :: 0 0\r\n", ProxyInfo(("::1", 0), ("::", 0), 1)),
    (  # upper case and the full form: formatted the way ipaddress formats them
        b"PROXY TCP6 2001:0DB8:0000:0000:0000:0000:0000:0001 FE80::A 443 8443\r\n",
        ProxyInfo(("2001:db8::1", 443), ("fe80::a", 8443), 1),
    ),
    (
        b"PROXY TCP6 ::ffff:1.2.3.4 ::ffff:255.255.255.255 5 6\r\n",
        ProxyInfo(
            (str(ipaddress.IPv6Address("::ffff:1.2.3.4")), 5), (str(ipaddress.IPv6Address("::ffff:ffff:ffff")), 6), 1
        ),
    ),
    (b"PROXY UNKNOWN\r\n", NO_ADDRESS_1),
    (b"PROXY UNKNOWN 1.2.3.4 5.6.7.8 1 2\r\n", NO_ADDRESS_1),
    (b"PROXY UNKNOWN anything\x00\xff\r at all\r\n", NO_ADDRESS_1),  # ignored up to the CRLF
    (b"PROXY UNKNOWN \r\n", NO_ADDRESS_1),
    (LONGEST_V1, NO_ADDRESS_1),
    # v2 (section 2.2)
    (v2(1, 0x11, ipv4_block("1.2.3.4", "5.6.7.8", 56324, 443)), ProxyInfo(("1.2.3.4", 56324), ("5.6.7.8", 443), 2)),
    (
        v2(1, 0x11, ipv4_block("0.0.0.0", "255.255.255.255", 0, 65535)),
        ProxyInfo(("0.0.0.0", 0), ("255.255.255.255", 65535), 2),
    ),
    (
        v2(1, 0x21, ipv6_block("2001:db8::1", "2001:db8::2", 1234, 80)),
        ProxyInfo(("2001:db8::1", 1234), ("2001:db8::2", 80), 2),
    ),
    (v2(0, 0x00, b""), NO_ADDRESS_2),  # LOCAL: the balancer's health check
    (v2(0, 0x11, ipv4_block("1.2.3.4", "5.6.7.8", 1, 2)), NO_ADDRESS_2),  # LOCAL ignores addresses
    (v2(0, 0xFF, b"\xff" * 5), NO_ADDRESS_2),  # ... and the family, but skips the length
    (v2(1, 0x00, b""), NO_ADDRESS_2),  # PROXY UNSPEC: like LOCAL
    (v2(1, 0x00, b"whatever the sender put"), NO_ADDRESS_2),
    (v2(1, 0x31, b"/run/client.sock".ljust(108, b"\0") + b"/run/gw.sock".ljust(108, b"\0")), NO_ADDRESS_2),
    (
        v2(1, 0x11, ipv4_block("1.2.3.4", "5.6.7.8", 1, 2) + tlv(0x04, b"") + tlv(0x02, b"example.com")),
        ProxyInfo(("1.2.3.4", 1), ("5.6.7.8", 2), 2),
    ),
    (  # AWS NLB: the VPC endpoint id (0xEA, sub-type 0x01)
        v2(1, 0x21, ipv6_block("2001:db8::1", "::1", 443, 8080) + tlv(0xEA, b"\x01vpce-08d2bf15fac5001c9")),
        ProxyInfo(("2001:db8::1", 443), ("::1", 8080), 2),
    ),
    (
        v2(1, 0x11, ipv4_block("1.2.3.4", "5.6.7.8", 1, 2) + tlv(0x20, b"\x01\0\0\0\0" + tlv(0x21, b"TLSv1.3"))),
        ProxyInfo(("1.2.3.4", 1), ("5.6.7.8", 2), 2),
    ),
    (v2(1, 0x31, bytes(216) + tlv(0x04, b"pad")), NO_ADDRESS_2),
]


@pytest.mark.parametrize(("header", "info"), VALID)
def test_valid_header(header: bytes, info: ProxyInfo) -> None:
    assert parse(header) == (info, len(header))


@pytest.mark.parametrize(("header", "info"), VALID)
def test_the_rest_is_the_request(header: bytes, info: ProxyInfo) -> None:
    """The consumed count is exact: what follows the header is the HTTP request, byte for byte."""
    buf = header + HTTP
    result = parse(buf)
    assert result == (info, len(header))
    assert not isinstance(result, NeedMore)
    assert buf[result[1] :] == HTTP


@pytest.mark.parametrize(("header", "info"), VALID)
def test_every_prefix_needs_more(header: bytes, info: ProxyInfo) -> None:
    for n in range(len(header)):
        assert parse(header[:n]) is NEED_MORE, header[:n]


@pytest.mark.parametrize(
    ("buf", "match"),
    [
        # neither version
        (b"GET / HTTP/1.1\r\n", "no PROXY protocol header"),
        (b"G", "no PROXY protocol header"),
        (b"proxy TCP4 ", "no PROXY protocol header"),  # the keyword is case-sensitive
        (b"PROXY\r\n", "no PROXY protocol header"),
        (b"PROXY  TCP4", "protocol is not"),  # exactly one space
        (b"\x16\x03\x01\x02\x00", "no PROXY protocol header"),  # a TLS ClientHello
        (b"\r\n\r\n\x00\r\nQUIX", "no PROXY protocol header"),
        (b"\r\n\r\n\r\n", "no PROXY protocol header"),
        # v1: the line
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", "bare LF"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\r\n", "port"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\rX", "port"),  # a CR not followed by LF
        (b"PROXY UNKNOWN\n", "bare LF"),
        (b"PROXY UNKNOWN " + b"x" * 100, "no CRLF in its first 107 bytes"),
        (LONGEST_V1[:-2] + b"f\r\n", "no CRLF in its first 107 bytes"),  # 108 bytes
        (b"PROXY UNKNOWN " + b"x" * (V1_MAX_LENGTH - 15), "no CRLF"),  # 106 bytes, no CR: CRLF would make 108
        (  # valid fields, but a 116-byte line
            b"PROXY TCP6 0000:0000:0000:0000:0000:ffff:255.255.255.255 0000:0000:0000:0000:0000:ffff:255.255.255.255"
            b" 1 2\r\n",
            "no CRLF",
        ),
        # v1: the protocol
        (b"PROXY TCP5", "protocol is not"),
        (b"PROXY UDP4 ", "protocol is not"),
        (b"PROXY tcp4 ", "protocol is not"),
        (b"PROXY UNKNOWNX", "protocol is not"),
        (b"PROXY UNKNOWNX\r\n", "protocol is not"),
        (b"PROXY UNKN\r\n", "protocol is not"),
        (b"PROXY \r\n", "protocol is not"),
        (b"PROXY TCP4\r\n", "0 of the 4 fields"),
        # v1: the fields
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", "3 of the 4 fields"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3", "more than 4 fields"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 ", "more than 4 fields"),
        (b"PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n", "address is not one"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1  2\r\n", "port"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8\t1 2\r\n", "address is not one"),
        # v1: addresses of the announced family
        (b"PROXY TCP4 ::1 ::1 1 2\r\n", "TCP4 address is not one"),
        (b"PROXY TCP6 1.2.3.4 5.6.7.8 1 2\r\n", "TCP6 address is not one"),
        (b"PROXY TCP4 1.2.3.256 5.6.7.8 1 2\r\n", "address is not one"),
        (b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n", "address is not one"),  # octal-looking
        (b"PROXY TCP4 1.2.3 5.6.7.8 1 2\r\n", "address is not one"),
        (b"PROXY TCP4 1.2.3.4.5 5.6.7.8 1 2\r\n", "address is not one"),
        (b"PROXY TCP4 1.2.3.4x", "address is not one"),  # refused before the line ends
        (b"PROXY TCP4 1.2.3.4.5.6.7.8.9", "address is not one"),  # longer than any IPv4 text
        (b"PROXY TCP4 \xd9\xa1.2.3.4 5.6.7.8 1 2\r\n", "address is not one"),  # non-ASCII digits
        (b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n", "address is not one"),  # zone ids are no client address
        (b"PROXY TCP6 1::2::3 ::1 1 2\r\n", "address is not one"),
        (b"PROXY TCP6 12345::1 ::1 1 2\r\n", "address is not one"),
        (b"PROXY TCP6 g::1", "address is not one"),
        # v1: ports
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n", "port"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n", "port"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 00", "port"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 +2\r\n", "port"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 -1\r\n", "port"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1_0 2\r\n", "port"),  # int() would take it
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n", "more than 4 fields"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 99999", "port"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 \xd9\xa1\r\n", "port"),
        # v2: version and command
        (SIG + b"\x11", "version 1, not 2"),
        (SIG + b"\x31", "version 3, not 2"),
        (SIG + b"\x02", "version 0"),
        (SIG + b"\x22", "command is 0x2"),
        (SIG + b"\x2f", "command is 0xf"),
        # v2: family and protocol (PROXY)
        (SIG + b"\x21\x12", "UDP over IPv4"),
        (SIG + b"\x21\x22", "UDP over IPv6"),
        (SIG + b"\x21\x32", "UNIX datagram"),
        (SIG + b"\x21\x41", "0x41 is not defined"),
        (SIG + b"\x21\x01", "0x01 is not defined"),
        (SIG + b"\x21\x13", "0x13 is not defined"),
        (SIG + b"\x21\x10", "0x10 is not defined"),
        # v2: length shorter than the address block
        (v2(1, 0x11, b"", length=11), "length 11 is shorter than the 12-byte address block"),
        (v2(1, 0x21, b"", length=12), "length 12 is shorter than the 36-byte address block"),
        (v2(1, 0x31, b"", length=215), "length 215 is shorter than the 216-byte address block"),
        # v2: TLVs must tile the rest of the header
        (v2(1, 0x11, ipv4_block("1.2.3.4", "5.6.7.8", 1, 2) + b"\x04\x00"), "cut short"),
        (v2(1, 0x11, ipv4_block("1.2.3.4", "5.6.7.8", 1, 2) + b"\x04"), "cut short"),
        (v2(1, 0x11, ipv4_block("1.2.3.4", "5.6.7.8", 1, 2) + b"\x04\x00\x02x"), "runs past"),
        (v2(1, 0x11, ipv4_block("1.2.3.4", "5.6.7.8", 1, 2) + tlv(4, b"ok") + b"\x04\xff\xff"), "runs past"),
        (v2(1, 0x31, bytes(216) + b"\x04\x00\x01"), "runs past"),
    ],
)
def test_invalid(buf: bytes, match: str) -> None:
    with pytest.raises(ProxyProtocolError, match=match):
        parse(buf)
    with pytest.raises(ProxyProtocolError):  # more bytes never make it valid
        parse(buf + HTTP)


@pytest.mark.parametrize(
    "buf",
    [
        b"",
        b"P",
        b"PROXY",
        b"PROXY ",
        b"PROXY T",
        b"PROXY U",
        b"PROXY UNKNOWN",  # a space or CRLF may follow
        b"PROXY UNKNOWN\r",
        b"PROXY UNKNOWN x\r",
        b"PROXY UNKNOWN " + b"x" * (V1_MAX_LENGTH - 16),  # 105 bytes: the CRLF may still come
        b"PROXY UNKNOWN " + b"x" * (V1_MAX_LENGTH - 16) + b"\r",  # 106
        b"PROXY TCP4 ",
        b"PROXY TCP4 1.2.3.4",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 0",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 65535 6553",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r",
        b"PROXY TCP6 ::ffff:1.2.3.4",
        b"\r",
        SIG,
        SIG + b"\x21",
        SIG + b"\x21\x11\x00",
        SIG + b"\x21\x11\xff\xff" + bytes(1000),  # up to 65535 bytes of address block and TLVs
        SIG + b"\x20\xee",  # LOCAL ignores the family byte
    ],
)
def test_needs_more(buf: bytes) -> None:
    assert parse(buf) is NEED_MORE


def test_largest_v2_header_is_consumed_whole() -> None:
    block = ipv4_block("1.2.3.4", "5.6.7.8", 1, 2) + tlv(0x04, bytes(0xFFFF - 12 - 3))
    header = v2(1, 0x11, block)
    assert len(header) == MAX_HEADER_LENGTH
    assert parse(header[:-1]) is NEED_MORE
    assert parse(header + HTTP) == (ProxyInfo(("1.2.3.4", 1), ("5.6.7.8", 2), 2), MAX_HEADER_LENGTH)


def test_error_messages_are_bounded() -> None:
    with pytest.raises(ProxyProtocolError) as e:
        parse(b"X" * 100_000)
    assert len(str(e.value)) < 200


def test_need_more_is_a_named_sentinel() -> None:
    assert repr(NEED_MORE) == "NEED_MORE"
    assert isinstance(NEED_MORE, NeedMore)


# Properties

ports = st.integers(0, 65535)


@st.composite
def v1_headers(draw: st.DrawFn) -> tuple[bytes, ProxyInfo]:
    """A valid v1 line with random addresses in any spelling the spec allows, and what it says."""
    if draw(st.booleans()):
        src, dst = draw(st.ip_addresses(v=4)), draw(st.ip_addresses(v=4))
        texts = [str(src), str(dst)]
        protocol = "TCP4"
    else:
        src, dst = draw(st.ip_addresses(v=6)), draw(st.ip_addresses(v=6))
        texts = [draw(st.sampled_from([a.compressed, a.exploded, a.compressed.upper()])) for a in (src, dst)]
        protocol = "TCP6"
    sport, dport = draw(ports), draw(ports)
    line = f"PROXY {protocol} {texts[0]} {texts[1]} {sport} {dport}\r\n".encode()
    return line, ProxyInfo((str(src), sport), (str(dst), dport), 1)


@st.composite
def v2_headers(draw: st.DrawFn) -> tuple[bytes, ProxyInfo]:
    """A valid v2 header with random addresses and TLVs, and what it says."""
    tlvs = b"".join(draw(st.lists(st.builds(tlv, st.integers(0, 255), st.binary(max_size=40)), max_size=4)))
    kind = draw(st.sampled_from(["ipv4", "ipv6", "local", "unspec", "unix"]))
    if kind in ("ipv4", "ipv6"):
        v = 4 if kind == "ipv4" else 6
        src, dst = draw(st.ip_addresses(v=v)), draw(st.ip_addresses(v=v))
        sport, dport = draw(ports), draw(ports)
        block = src.packed + dst.packed + struct.pack("!HH", sport, dport)
        header = v2(1, 0x11 if v == 4 else 0x21, block + tlvs)
        return header, ProxyInfo((str(src), sport), (str(dst), dport), 2)
    if kind == "local":  # anything at all in the family byte and the block
        return v2(0, draw(st.integers(0, 255)), draw(st.binary(max_size=60))), NO_ADDRESS_2
    if kind == "unspec":
        return v2(1, 0x00, draw(st.binary(max_size=60))), NO_ADDRESS_2
    return v2(1, 0x31, draw(st.binary(min_size=216, max_size=216)) + tlvs), NO_ADDRESS_2


@given(v1_headers() | v2_headers(), st.binary(max_size=40), st.data())
def test_valid_header_round_trips(case: tuple[bytes, ProxyInfo], rest: bytes, data: st.DataObject) -> None:
    header, info = case
    assert parse(header + rest) == (info, len(header))
    cut = data.draw(st.integers(0, len(header) - 1), label="cut")
    assert parse(header[:cut]) is NEED_MORE


def _outcome(buf: bytes) -> object:
    try:
        result = parse(buf)
    except ProxyProtocolError:
        return ProxyProtocolError
    if result is NEED_MORE:
        assert len(buf) < MAX_HEADER_LENGTH
        return NEED_MORE
    info, consumed = result
    assert isinstance(info, ProxyInfo)
    assert info.version in (1, 2)
    assert 0 < consumed <= len(buf)
    return result


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A valid header with a few bytes changed, cut or added: inputs that get deep into the parser."""
    buf = bytearray(draw(v1_headers() | v2_headers())[0])
    for _ in range(draw(st.integers(0, 3))):
        at = draw(st.integers(0, len(buf) - 1))
        action = draw(st.sampled_from(["replace", "delete", "insert"]))
        byte = draw(st.sampled_from([0, 0x0A, 0x0D, 0x20, ord("0"), ord(":"), ord("."), 0xFF]) | st.integers(0, 255))
        if action == "replace":
            buf[at] = byte
        elif action == "delete":
            del buf[at]
        else:
            buf.insert(at, byte)
    return bytes(buf) + draw(st.binary(max_size=20))


@given(st.binary(max_size=200) | mutated() | st.builds(bytes.__add__, st.sampled_from([b"PROXY ", SIG]), st.binary()))
@example(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n")
def test_no_input_crashes_the_parser_and_more_bytes_never_change_the_answer(buf: bytes) -> None:
    """Over the prefixes of any input: NEED_MORE, then one answer (an error, or a header) that more bytes keep."""
    outcomes = [_outcome(buf[:n]) for n in range(len(buf) + 1)]
    decided = [o for o in outcomes if o is not NEED_MORE]
    assert outcomes[: len(outcomes) - len(decided)] == [NEED_MORE] * (len(outcomes) - len(decided))
    assert all(o == decided[0] for o in decided)
