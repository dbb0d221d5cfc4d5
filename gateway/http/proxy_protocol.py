"""The PROXY protocol header, versions 1 and 2 (pure: no I/O).

Behind an L4 load balancer (AWS NLB, HAProxy in TCP mode, ...) the gateway's socket peer is the
balancer, not the client. A balancer that speaks the PROXY protocol prepends one header to the
connection naming the client's address, so the client address in forwarded headers and access logs
is the real one. Spec: https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt, section 2.1
(version 1, a text line) and section 2.2 (version 2, binary, with TLVs in 2.2.1-2.2.7).

:func:`parse` is sans-I/O: give it the bytes received so far; it returns the header and how many
bytes it took (the rest is the HTTP request), :data:`NEED_MORE`, or raises
:class:`ProxyProtocolError`. It raises as soon as the bytes can no longer start a valid header
(the spec asks receivers to abort early so the sender notices), and never asks for more than
:data:`MAX_HEADER_LENGTH` bytes. A listener that enables the protocol must require it: guessing
whether a header is there would let any client pick its own address (spec section 2), and the
listener must only be reachable by the balancer, since whoever can connect can send any header.

Version 1 (section 2.1), one line of at most 107 bytes including CRLF:

- ``PROXY TCP4 <src> <dst> <sport> <dport>\\r\\n`` and ``PROXY TCP6 ...``: exactly one space
  between fields; the addresses must be of the announced family (IPv6 text as RFC 4291 and
  :mod:`ipaddress` accept it, embedded IPv4 included, zone ids not); ports are decimal 0-65535
  without leading zeros. The line ends at its first LF, which must follow a CR.
- ``PROXY UNKNOWN`` followed by CRLF or by a space and anything up to the first CRLF (ignored,
  as the spec says): no address, the socket's peer stays the client.
- An address that is still arriving is checked for its alphabet and length only, and validated in
  full once it ends, so a few bytes of a doomed address may wait for more before the error. Every
  other part (keyword, protocol, spaces, ports, the line's length) is refused at its first wrong
  byte: a line without CRLF is an error once it can no longer end within 107 bytes.

Version 2 (section 2.2), the 12-byte signature, then:

- version 2 only; command LOCAL (the balancer's own connection, such as a health check: no
  address, whatever the family byte says) or PROXY; other commands are errors.
- for PROXY: TCP over IPv4 (``\\x11``) and IPv6 (``\\x21``) carry the addresses. UNSPEC
  (``\\x00``) and UNIX stream (``\\x31``) are accepted without an address, like LOCAL: a UNIX
  path is no client address. Datagram families (UDP, UNIX datagram) are errors: the gateway
  proxies streams. Other family bytes are errors (the spec says to reject them).
- the length must cover the address block (12, 36, 216 bytes). Bytes after it are TLVs: their
  framing is checked (a TLV running past the header is an error) and they are skipped, not
  interpreted (not even PP2_TYPE_CRC32C). For LOCAL and UNSPEC the whole block is skipped
  unread. The length may be anything up to 65535, the field's range: no cap below it, since a
  legal header would be refused and the parser copies nothing, so a large header costs only the
  caller's buffer, at most :data:`MAX_HEADER_LENGTH` bytes.

:attr:`ProxyInfo.source` is ``None`` for every header without a client address (v1 UNKNOWN,
v2 LOCAL, UNSPEC, UNIX): keep the socket's peer address then.
"""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass
from typing import Final

__all__ = [
    "MAX_HEADER_LENGTH",
    "NEED_MORE",
    "V1_MAX_LENGTH",
    "NeedMore",
    "ProxyInfo",
    "ProxyProtocolError",
    "may_be_header",
    "parse",
]

#: Longest version 1 line, CRLF included (section 2.1).
V1_MAX_LENGTH: Final = 107
_V2_FIXED: Final = 16  # signature, version/command, family/protocol, length
#: Longest header of either version: :func:`parse` never answers NEED_MORE to this many bytes.
MAX_HEADER_LENGTH: Final = _V2_FIXED + 0xFFFF

_V1_PREFIX: Final = b"PROXY "
_V2_SIGNATURE: Final = b"\r\n\r\n\x00\r\nQUIT\n"

_V1_PROTOCOLS: Final = (b"TCP4", b"TCP6", b"UNKNOWN")
_V1_ADDRESS_LENGTH: Final = {b"TCP4": 15, b"TCP6": 45}  # "255.255.255.255", "ffff:...:ffff:255.255.255.255"
_V1_ADDRESS_CHARS: Final = {b"TCP4": frozenset(b"0123456789."), b"TCP6": frozenset(b"0123456789abcdefABCDEF:.")}

_LOCAL: Final = 0x0
_PROXY: Final = 0x1
_UNSPEC: Final = 0x00
_TCP4: Final = 0x11
_TCP6: Final = 0x21
_UNIX_STREAM: Final = 0x31
_DATAGRAM: Final = {0x12: "UDP over IPv4", 0x22: "UDP over IPv6", 0x32: "UNIX datagram"}
#: Address block length per family/protocol byte that a PROXY command may carry (section 2.2).
_ADDRESS_BLOCK: Final = {_UNSPEC: 0, _TCP4: 12, _TCP6: 36, _UNIX_STREAM: 216}
_TLV_HEADER: Final = 3  # type (1 byte), length (2 bytes, big-endian)


@dataclass(frozen=True, slots=True)
class ProxyInfo:
    """What the balancer told us.

    ``source`` is None for v1 UNKNOWN and v2 LOCAL (the balancer's own connections, such as
    health checks), UNSPEC and UNIX: keep the socket's peer address then.
    """

    source: tuple[str, int] | None  #: client address (as :mod:`ipaddress` formats it) and port
    destination: tuple[str, int] | None  #: the address and port the client connected to
    version: int  #: 1 or 2


class ProxyProtocolError(ValueError):
    """The bytes cannot start a valid PROXY header; the message says why (for a log line)."""


class NeedMore(enum.Enum):
    """The type of :data:`NEED_MORE`."""

    NEED_MORE = "NEED_MORE"

    def __repr__(self) -> str:
        return "NEED_MORE"


#: :func:`parse` needs more bytes to decide (everything so far is a prefix of a valid header).
NEED_MORE: Final = NeedMore.NEED_MORE


def may_be_header(buf: bytes) -> bool:
    """Whether ``buf`` starts like a PROXY header (v1 or v2), even if too short to tell more.

    For ``proxy-optional`` listeners: bytes that cannot begin a header come from a direct client,
    bytes that can but do not parse are a broken header and refused.
    """
    n = min(len(buf), len(_V1_PREFIX))
    if buf[:n] == _V1_PREFIX[:n]:
        return True
    n = min(len(buf), len(_V2_SIGNATURE))
    return buf[:n] == _V2_SIGNATURE[:n]


def parse(buf: bytes) -> tuple[ProxyInfo, int] | NeedMore:
    """Parse the PROXY header at the start of ``buf``.

    Returns ``(info, consumed)`` where ``buf[consumed:]`` is what follows the header, or
    :data:`NEED_MORE` (call again with more bytes). Raises :class:`ProxyProtocolError` if ``buf``
    cannot start a valid header, including when it starts with no PROXY header at all.
    """
    v1_seen = min(len(buf), len(_V1_PREFIX))
    if buf[:v1_seen] == _V1_PREFIX[:v1_seen]:  # the empty buffer too
        return NEED_MORE if v1_seen < len(_V1_PREFIX) else _parse_v1(buf)
    v2_seen = min(len(buf), len(_V2_SIGNATURE))
    if buf[:v2_seen] == _V2_SIGNATURE[:v2_seen]:
        return NEED_MORE if v2_seen < len(_V2_SIGNATURE) else _parse_v2(buf)
    raise ProxyProtocolError(f"no PROXY protocol header: the connection starts with {buf[:16]!r}")


# Version 1 (section 2.1)


def _parse_v1(buf: bytes) -> tuple[ProxyInfo, int] | NeedMore:
    lf = buf.find(b"\n", 0, V1_MAX_LENGTH)
    if lf >= 0:
        if buf[lf - 1] != 0x0D:  # lf > 0: buf starts with "PROXY "
            raise ProxyProtocolError("PROXY v1 line ends with a bare LF, not CRLF")
        line, ended = buf[len(_V1_PREFIX) : lf - 1], True
    elif len(buf) >= V1_MAX_LENGTH or (len(buf) == V1_MAX_LENGTH - 1 and not buf.endswith(b"\r")):
        raise ProxyProtocolError(f"PROXY v1 line has no CRLF in its first {V1_MAX_LENGTH} bytes")
    elif buf.endswith(b"\r"):  # only LF may follow: every field has ended
        line, ended = buf[len(_V1_PREFIX) : -1], True
    else:  # the last field may still grow
        line, ended = buf[len(_V1_PREFIX) :], False
    protocol, *fields = line.split(b" ")
    if not ended and not fields:  # the protocol name is still arriving
        if any(p.startswith(protocol) for p in _V1_PROTOCOLS):
            return NEED_MORE
        raise ProxyProtocolError(f"PROXY v1 protocol is not TCP4, TCP6 or UNKNOWN: {protocol[:8]!r}")
    if protocol == b"UNKNOWN":  # the rest of the line is ignored (section 2.1)
        return (ProxyInfo(None, None, 1), lf + 1) if lf >= 0 else NEED_MORE
    if protocol not in _V1_ADDRESS_LENGTH:
        raise ProxyProtocolError(f"PROXY v1 protocol is not TCP4, TCP6 or UNKNOWN: {protocol[:8]!r}")
    name = protocol.decode()
    growing = None if ended else fields.pop()  # the field still arriving, if any
    addresses = [_v1_address(protocol, field) for field in fields[:2]]
    ports = [_v1_port(field) for field in fields[2:4]]
    if len(fields) + (growing is not None) > 4:
        raise ProxyProtocolError(f"PROXY v1 {name} line has more than 4 fields after the protocol")
    if growing is not None:
        if len(fields) < 2:
            _v1_address_prefix(protocol, growing)
        elif not _is_port_prefix(growing):
            raise ProxyProtocolError(f"PROXY v1 port is not 0-65535 without leading zeros: {growing[:8]!r}")
        return NEED_MORE
    if len(fields) < 4:
        raise ProxyProtocolError(f"PROXY v1 {name} line has {len(fields)} of the 4 fields after the protocol")
    if lf < 0:  # complete but for the LF
        return NEED_MORE
    (src, dst), (sport, dport) = addresses, ports
    return ProxyInfo((src, sport), (dst, dport), 1), lf + 1


def _v1_address_prefix(protocol: bytes, field: bytes) -> None:
    """Raise unless ``field`` has the alphabet and length of (a beginning of) a ``protocol`` address."""
    if len(field) > _V1_ADDRESS_LENGTH[protocol] or not _V1_ADDRESS_CHARS[protocol].issuperset(field):
        raise ProxyProtocolError(f"PROXY v1 {protocol.decode()} address is not one: {field[:48]!r}")


def _v1_address(protocol: bytes, field: bytes) -> str:
    """The ``protocol`` address in ``field``, as :mod:`ipaddress` formats it."""
    _v1_address_prefix(protocol, field)  # the alphabet keeps out zone ids ("%eth0") and whitespace
    try:
        if protocol == b"TCP4":
            return str(ipaddress.IPv4Address(field.decode("ascii")))
        return str(ipaddress.IPv6Address(field.decode("ascii")))
    except ValueError:
        raise ProxyProtocolError(f"PROXY v1 {protocol.decode()} address is not one: {field!r}") from None


def _is_port_prefix(field: bytes) -> bool:
    """Whether ``field`` is empty or a port so far: ASCII digits, no leading zero, at most 65535."""
    return not field or (field.isdigit() and (field == b"0" or field[:1] != b"0") and int(field) <= 0xFFFF)


def _v1_port(field: bytes) -> int:
    """The port in ``field``: decimal 0-65535, no leading zeros (one spelling per port)."""
    if not field or not _is_port_prefix(field):
        raise ProxyProtocolError(f"PROXY v1 port is not 0-65535 without leading zeros: {field[:8]!r}")
    return int(field)


# Version 2 (section 2.2)


def _parse_v2(buf: bytes) -> tuple[ProxyInfo, int] | NeedMore:
    if len(buf) < 13:
        return NEED_MORE
    version, command = buf[12] >> 4, buf[12] & 0x0F
    if version != 2:
        raise ProxyProtocolError(f"PROXY v2 header has version {version}, not 2")
    if command not in (_LOCAL, _PROXY):
        raise ProxyProtocolError(f"PROXY v2 command is {command:#x}, neither LOCAL (0x0) nor PROXY (0x1)")
    if len(buf) < 14:
        return NEED_MORE
    family = buf[13]  # LOCAL ignores it (section 2.2)
    if command == _PROXY and family in _DATAGRAM:
        raise ProxyProtocolError(f"PROXY v2 carries {_DATAGRAM[family]}: only streams are proxied")
    if command == _PROXY and family not in _ADDRESS_BLOCK:
        raise ProxyProtocolError(f"PROXY v2 address family and protocol byte {family:#04x} is not defined")
    if len(buf) < _V2_FIXED:
        return NEED_MORE
    length = int.from_bytes(buf[14:16], "big")
    if command == _PROXY and length < _ADDRESS_BLOCK[family]:
        raise ProxyProtocolError(
            f"PROXY v2 length {length} is shorter than the {_ADDRESS_BLOCK[family]}-byte address block"
        )
    end = _V2_FIXED + length
    if len(buf) < end:
        return NEED_MORE
    if command == _LOCAL or family == _UNSPEC:  # no address; skip the block unread
        return ProxyInfo(None, None, 2), end
    _skip_tlvs(buf, _V2_FIXED + _ADDRESS_BLOCK[family], end)
    if family == _UNIX_STREAM:  # a path is no client address
        return ProxyInfo(None, None, 2), end
    size = 4 if family == _TCP4 else 16  # then the two ports, 2 bytes each
    src = ipaddress.ip_address(buf[_V2_FIXED : _V2_FIXED + size])
    dst = ipaddress.ip_address(buf[_V2_FIXED + size : _V2_FIXED + 2 * size])
    ports = _V2_FIXED + 2 * size
    sport, dport = int.from_bytes(buf[ports : ports + 2], "big"), int.from_bytes(buf[ports + 2 : ports + 4], "big")
    return ProxyInfo((str(src), sport), (str(dst), dport), 2), end


def _skip_tlvs(buf: bytes, start: int, end: int) -> None:
    """Check that ``buf[start:end]`` is a whole sequence of TLVs (section 2.2), without reading them."""
    at = start
    while at < end:
        if end - at < _TLV_HEADER:
            raise ProxyProtocolError(f"PROXY v2 TLV at byte {at} is cut short by the header's end")
        length = int.from_bytes(buf[at + 1 : at + 3], "big")
        if at + _TLV_HEADER + length > end:
            raise ProxyProtocolError(f"PROXY v2 TLV at byte {at} ({length} bytes) runs past the header's end")
        at += _TLV_HEADER + length
