"""What the coverage-guided fuzzer checks for one input (also replayed by the test suite).

An input is a byte stream with a small prefix the fuzzer controls too: byte 0 holds the number of
reads the stream is split into (bits 0-2), whether responses answer a HEAD request (bit 3) and an
HTTP/1.0 client (bit 4); then one byte per cut (its position, scaled to the stream); then the
stream. For each input, in both directions (``requests``: the client side, ``responses``: the
sandbox side):

- the framer and the head analysis return, every call advancing (tests/framing_driver.py);
- the verdict for the split stream equals the verdict for the whole stream;
- every message the gateway accepts is the one the plain reference framer finds there, and a request
  whose trailer section has a field is marked (its sandbox connection is not pooled) exactly when
  the reference finds one;
- the head the gateway would forward (request: ``upstream_head``; response: the analysed head)
  is built without error and still ends its head where it should; a request head forwarded for an
  untrusted peer carries none of the untrusted fields (in any ``_``/``-`` spelling), no underscore
  spelling of a field the policy acts on, one of each forwarding field, and in its Upgrade only
  allowed protocols; a response head has a status code of 100 or more, carries at most one
  Transfer-Encoding field, none on a 1xx, 204 or 304, where it carries no Content-Length either,
  and as an HTTP/2 field list passes h2's checks of a received response, as do the trailer fields of
  a de-chunked body (HTTP/1.0 and HTTP/2 clients) as trailing HEADERS;
- ``h2requests``: an HTTP/2 request's field list (the input, decoded by :func:`fields`) is written as an
  HTTP/1.1 head (gateway/http/h2map.py) or refused: a head written holds exactly one line per field,
  none with CR, LF or NUL, one end, and the header analysis takes it (no field smuggles a line, a
  second head or a body framing into what the sandbox gets), and what is forwarded of it obeys the
  same rules as an HTTP/1.1 request's;
- under the fuzzer, it takes at most ``LIMIT`` seconds of CPU (a slow input is as bad as a crash:
  it stalls a loop; libFuzzer's own timeout catches one that never returns). The test suite
  replays inputs without the CPU limit (no timed assertions in tests) but with a bound that turns
  a spin into a failure.
"""

from __future__ import annotations

import itertools
import time

import h2.utilities

from gateway.errors import Reason
from gateway.http import framing, h2map, hdrs
from gateway.http.headers import (
    FieldRoles,
    Peer,
    RequestHead,
    analyze_request,
    analyze_response,
    own_cookie_lines,
    raw_fields,
)
from tests import framing_driver as drive

LIMIT = 0.1  #: seconds of CPU per input
TARGETS = ("requests", "responses", "h2requests")
_H2_RESPONSE = h2.utilities.HeaderValidationFlags(
    is_client=True, is_trailer=False, is_response_header=True, is_push_promise=False
)
_H2_TRAILERS = h2.utilities.HeaderValidationFlags(
    is_client=True, is_trailer=True, is_response_header=False, is_push_promise=False
)
_PEER = Peer.make("198.51.100.7", 443, True, ())
_FIELDS = FieldRoles()
_UNTRUSTED = {n.lower().replace(b"_", b"-") for n in hdrs.UNTRUSTED}
#: Fields the policy acts on that have a "-" (an underscore spelling of one is never forwarded).
_ACTED_ON = {n for n in _FIELDS.roles if b"-" in n}
_ADDED = (b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-port", b"x-forwarded-host", b"forwarded")


def _check_forwarded_request(out: bytes) -> None:
    names = [n.lower() for n, _ in raw_fields(out)]
    for n in names:
        plain = n.replace(b"_", b"-")
        assert plain not in _UNTRUSTED, f"untrusted field {n!r} forwarded"
        assert n == plain or plain not in _ACTED_ON, f"underscore spelling {n!r} forwarded"
    for n in _ADDED:
        assert names.count(n) == 1, f"{n!r} {names.count(n)} times"
    upgrades = [v for n, v in raw_fields(out) if n.lower() == hdrs.UPGRADE]
    assert all(t.strip().split(b"/")[0].lower() in _FIELDS.upgrade_protocols for v in upgrades for t in v.split(b","))


def _check_forwarded_response(out: bytes, status: int) -> None:
    names = [n.lower() for n, _ in raw_fields(out)]
    assert names.count(hdrs.TRANSFER_ENCODING) <= 1, "more than one Transfer-Encoding field"
    if status < 200 or status in (204, 304):
        assert hdrs.TRANSFER_ENCODING not in names and hdrs.CONTENT_LENGTH not in names
    assert not own_cookie_lines(out, b"e2b_access"), "a Set-Cookie of the gateway's cookie passed"
    # What an HTTP/2 client gets of it passes the checks a strict client makes of a response (h2's
    # own: RFC 9113 §8.2.1 characters, §8.2.2 connection-specific fields, §8.3.2 pseudo-header
    # fields): a field one client's connection refuses would end every stream on it, other
    # sandboxes' too. (The trailer fields of a de-chunked body go through the same h2map.fields_of.)
    assert status >= 100, f"status code {status:03d} forwarded (RFC 9110 §15)"
    for tunnel in (False, True) if status == 101 else (False,):
        fields = h2map.response_fields(out, tunnel)
        assert fields[0] == (b":status", b"200" if tunnel else b"%d" % status)
        list(h2.utilities.validate_headers(fields, _H2_RESPONSE))


class Slow(AssertionError):
    """An input took more than LIMIT seconds of CPU."""


def decode(data: bytes) -> tuple[list[bytes], bytes, bool, bool]:
    """(the stream split into reads, the stream, HEAD request, HTTP/1.0 client)."""
    if not data:
        return [], b"", False, False
    flags = data[0]
    cuts = flags & 7
    stream = data[1 + cuts :]
    marks = sorted({1 + b * max(len(stream) - 1, 0) // 255 for b in data[1 : 1 + cuts]})
    bounds = [0, *(m for m in marks if 0 < m < len(stream)), len(stream)]
    reads = [stream[a:b] for a, b in itertools.pairwise(bounds) if b > a]
    return reads, stream, bool(flags & 8), bool(flags & 16)


def fields(data: bytes) -> tuple[list[tuple[bytes, bytes]], bool]:
    """(an HTTP/2 field list, END_STREAM): byte 0 bit 0 is END_STREAM; then fields, each a length
    byte and the name, a length byte and the value (a truncated last one is dropped)."""
    out = []
    pos = 1
    while pos < len(data):
        n = data[pos]
        name = data[pos + 1 : pos + 1 + n]
        pos += 1 + n
        if pos >= len(data):
            break
        m = data[pos]
        value = data[pos + 1 : pos + 1 + m]
        pos += 1 + m
        out.append((name, value))
    return out, bool(data[:1] and data[0] & 1)


def check(target: str, data: bytes, cpu_limit: float | None = None) -> None:
    """Raise if ``data`` breaks a property (see the module docstring)."""
    t0 = time.thread_time()
    reads, stream, head_request, http10 = decode(data)
    if target == "h2requests":
        headers, end = fields(data)
        m = h2map.request_head(headers, end)
        if not isinstance(m, str):
            raw = m.raw
            assert raw.endswith(b"\r\n\r\n") and raw.count(b"\r\n\r\n") == 1, "not one head"
            lines = raw[:-4].split(b"\r\n")
            assert len(lines) == 1 + m.fields, "a field became more than one line"
            assert not any(b"\n" in x or b"\r" in x or b"\x00" in x for x in lines), "CR, LF or NUL in a line"
            r = analyze_request(raw, _FIELDS)
            assert isinstance(r, (RequestHead, Reason))
            if isinstance(r, RequestHead):
                out = r.upstream_head(_PEER, None)
                assert out.endswith(b"\r\n\r\n") and out.count(b"\r\n\r\n") == 1
                _check_forwarded_request(out)
                # chunked towards the sandbox exactly when the mapping said so (a client's own
                # transfer-encoding is refused: it is connection-specific)
                assert (r.body == framing.CHUNKED) == m.chunked, "a body framing the mapping did not choose"
    elif target == "requests":
        whole = drive.requests([stream])
        assert drive.requests(reads) == whole, "the verdict depends on how the bytes are split"
        trailed: list[int] = []
        ref, _ = drive.reference_requests(stream, trailed)
        n = len(whole.messages)
        assert list(whole.messages) == ref[:n], "a request the reference does not frame"
        assert list(whole.trailer_fields) == [t for t in trailed if t < n], "trailer fields the reference does not see"
        for head, _body in whole.messages:
            r = analyze_request(head, _FIELDS)
            assert isinstance(r, RequestHead)
            for host in (None, b"masked.internal"):
                out = r.upstream_head(_PEER, host)
                assert out.endswith(b"\r\n\r\n") and out.count(b"\r\n\r\n") == 1
                _check_forwarded_request(out)
    else:
        method = b"HEAD" if head_request else b"GET"
        whole = drive.responses([stream], method=method, http10_client=http10)
        assert drive.responses(reads, method=method, http10_client=http10) == whole, "split-dependent verdict"
        if not http10:
            ref, _ = drive.reference_responses(stream, method)
            n = len(whole.messages) - (whole.end == "close")
            assert list(whole.messages[:n]) == ref[:n], "a response the reference does not frame"
        for head, _body in whole.messages:
            status = int(head[9:12])
            out = analyze_response(head, status, head_request, http10, True, b"e2b_access")[0]
            assert out.endswith(b"\r\n\r\n") and out.count(b"\r\n\r\n") == 1
            _check_forwarded_response(out, status)
        # The trailer fields of de-chunked bodies, as an HTTP/2 client gets them (h2map.fields_of):
        # what a strict client takes in trailers (no pseudo-header or connection-specific field).
        list(h2.utilities.validate_headers(h2map.fields_of(list(whole.trailer_lines)), _H2_TRAILERS))
    took = time.thread_time() - t0
    if cpu_limit is not None and took > cpu_limit:
        raise Slow(f"{took * 1000:.0f} ms of CPU (limit {cpu_limit * 1000:.0f} ms)")
