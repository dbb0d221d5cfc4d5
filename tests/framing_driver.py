"""The Framer and the header analysis driven over a byte stream the way the data plane drives them.

``requests`` mirrors ``ClientConnection.data_received`` (downstream.py), ``responses`` mirrors
``UpstreamConnection.data_received`` (upstream.py), without sockets: the property tests
(tests/unit/test_framing_properties.py), the regression corpus and the coverage-guided fuzzer
(tests/fuzz/) all judge the same :class:`Verdict`. Each driver also checks that the framer
advances: every event but NEED covers at least one byte, and the number of calls is bounded by
the number of bytes and reads.

``reference_requests`` / ``reference_responses`` are an independent, deliberately plain framer
of RFC 9112 over the whole input (the differential side): where the gateway accepts a message, the
reference must find the same bytes for it.
"""

from __future__ import annotations

import contextlib
import re
import signal
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import httptools

from gateway import errors
from gateway.errors import Reason
from gateway.http import framing
from gateway.http.framing import BODY, END, HEAD, HEAD_BODY, NEED, UPGRADE, Framer, FramingError
from gateway.http.headers import FieldRoles, RequestHead, analyze_request, analyze_response
from gateway.http.upstream import MAX_INTERIM, MAX_INTERIM_BYTES

REQUEST_REASONS = {
    framing.TOO_LARGE: errors.HEAD_TOO_LARGE.code,
    framing.SYNTAX: errors.MALFORMED_REQUEST.code,
    framing.FRAMING: errors.INVALID_FRAMING.code,
}
INVALID_RESPONSE = errors.UPSTREAM_INVALID_RESPONSE.code
FIELDS = FieldRoles()


@dataclass(frozen=True)
class Verdict:
    """What the data plane makes of a byte stream: the complete messages, in order, as
    (head, body as received), and how the stream ends: ``idle`` (between messages), ``partial``
    (inside one), ``upgrade`` (the rest is a tunnel), ``close`` (the last message is a response
    body running until the connection closes: it is in ``messages`` with the body so far), or the
    reason code the data plane answers with."""

    messages: tuple[tuple[bytes, bytes], ...]
    end: str
    #: Requests: the indexes of the messages whose trailer section had a field (forwarded; the
    #: sandbox connection that carried one is closed after its response, never pooled again).
    trailer_fields: tuple[int, ...] = ()
    #: Responses de-chunked (for an HTTP/1.0 or HTTP/2 client): the trailer field lines of every
    #: complete one, in order (an HTTP/2 client gets them as trailing HEADERS).
    trailer_lines: tuple[bytes, ...] = ()


class Spinning(AssertionError):
    """The framer did not return: a loop went backwards or spun."""


@contextlib.contextmanager
def bounded(seconds: float = 10.0) -> Iterator[None]:
    """Turn a framer that never returns into a failure (SIGALRM; main thread only). Inputs take
    microseconds: the bound only exists so that a spinning loop fails instead of hanging."""

    def alarm(signum: int, frame: object) -> None:
        raise Spinning(f"no verdict within {seconds} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class Progress:
    """Counts framer calls and checks each one advanced."""

    def __init__(self, total: int, reads: int) -> None:
        self.calls = 0
        self.limit = total + 2 * reads + 2

    def step(self, ev: int, pos: int, fr: Framer) -> None:
        self.calls += 1
        assert self.calls <= self.limit, f"{self.calls} framer calls for {self.limit - 2} bytes and reads"
        if ev != NEED:
            assert fr.end > pos, f"event {ev} at {pos} did not advance (end {fr.end})"


def requests(chunks: Sequence[bytes], max_head: int = 65536, max_fields: int = 128) -> Verdict:
    """The requests the client side finds in ``chunks`` (one read each)."""
    fr = Framer(False, max_head, max_fields)
    progress = Progress(sum(map(len, chunks)), len(chunks))
    msgs: list[tuple[bytes, bytes]] = []
    head: bytes | None = None
    body = bytearray()
    chunked = False
    trailed: list[int] = []

    def analysed(raw: bytes) -> RequestHead:
        r = analyze_request(raw, FIELDS)
        if isinstance(r, Reason):
            raise _Refused(r.code)
        assert_as_llhttp_parsed(raw, r)
        return r

    try:
        for data in chunks:
            pos = 0
            n = len(data)
            while pos < n:
                ev = fr.next(data, pos)
                progress.step(ev, pos, fr)
                if ev == HEAD:
                    pos = fr.end
                    if analysed(fr.head).body != framing.NONE:
                        raise _Refused(errors.INVALID_FRAMING.code)
                    msgs.append((fr.head, b""))
                    continue
                if ev == HEAD_BODY:
                    pos = fr.end
                    req = analysed(fr.head)
                    head = fr.head
                    body = bytearray()
                    chunked = req.body == framing.CHUNKED
                    ev = fr.body(req.body, req.content_length, data, pos)
                    progress.step(ev, pos, fr)
                if ev in (BODY, END):
                    body += data[pos : fr.end]
                    pos = fr.end
                    if ev == END:
                        assert head is not None
                        if chunked and fr.trailer:  # as downstream.py decides
                            trailed.append(len(msgs))
                        msgs.append((head, bytes(body)))
                        head = None
                elif ev == UPGRADE:
                    pos = fr.end
                    req = analysed(fr.head)
                    if req.body != framing.NONE:
                        raise _Refused(errors.INVALID_FRAMING.code)
                    msgs.append((fr.head, b""))
                    if req.upgrade is not None:
                        return Verdict(tuple(msgs), "upgrade", tuple(trailed))
                elif ev == NEED:
                    break
    except FramingError as e:
        return Verdict(tuple(msgs), REQUEST_REASONS[e.kind], tuple(trailed))
    except _Refused as e:
        return Verdict(tuple(msgs), e.reason, tuple(trailed))
    return Verdict(tuple(msgs), "partial" if head is not None or fr.acc is not None else "idle", tuple(trailed))


def responses(
    chunks: Sequence[bytes],
    method: bytes = b"GET",
    http10_client: bool = False,
    max_head: int = 65536,
    max_fields: int = 256,
) -> Verdict:
    """The responses the sandbox side finds in ``chunks``, each answering a ``method`` request."""
    fr = Framer(True, max_head, max_fields)
    progress = Progress(sum(map(len, chunks)), len(chunks))
    msgs: list[tuple[bytes, bytes]] = []
    head: bytes | None = None
    body = bytearray()
    close_delimited = False
    interim = interim_bytes = 0
    trailer_lines: list[bytes] = []
    try:
        for data in chunks:
            n = len(data)
            if not n:
                continue
            pos = 0
            ev = fr.next(data, 0)
            progress.step(ev, pos, fr)
            while ev:
                if ev in (HEAD, HEAD_BODY):
                    pos = fr.end
                    status = fr.status
                    if status < 200:
                        if ev == HEAD_BODY or status == 101:
                            raise _Refused(INVALID_RESPONSE)
                        interim += 1
                        interim_bytes += len(fr.head)
                        if interim > MAX_INTERIM or interim_bytes > MAX_INTERIM_BYTES:
                            raise _Refused(INVALID_RESPONSE)
                        msgs.append((fr.head, b""))
                    else:
                        interim = interim_bytes = 0
                        r = analyze_response(fr.head, status, method == b"HEAD", http10_client, True, b"e2b_access")
                        mode, length = r[1], r[3]
                        if ev == HEAD:
                            if mode != framing.NONE and not (mode == framing.LENGTH and not length):
                                raise _Refused(INVALID_RESPONSE)
                            msgs.append((fr.head, b""))
                        elif mode == framing.NONE and method == b"HEAD":
                            fr.skip_body()
                            msgs.append((fr.head, b""))
                        else:
                            head = fr.head
                            body = bytearray()
                            close_delimited = mode == framing.CLOSE
                            if mode == framing.CHUNKED and r[2] == framing.CLOSE:
                                fr.segments = []
                            ev = fr.body(mode, length, data, pos)
                            progress.step(ev, pos, fr)
                            continue
                    ev = fr.next(data, pos) if pos < n else NEED
                    if ev:
                        progress.step(ev, pos, fr)
                    continue
                if ev in (BODY, END):
                    end = fr.end
                    if fr.segments is not None:  # de-chunked for an HTTP/1.0 client
                        body += b"".join(data[a:b] for a, b in fr.segments)
                        fr.segments.clear()
                    else:
                        body += data[pos:end]
                    pos = end
                    if ev == END:
                        assert head is not None
                        msgs.append((head, bytes(body)))
                        head = None
                        fr.segments = None
                        if fr.trailers is not None:  # (what an HTTP/2 client gets as trailing HEADERS)
                            trailer_lines += fr.trailers
                            fr.trailers = None
                    ev = fr.next(data, pos) if pos < n else NEED
                    if ev:
                        progress.step(ev, pos, fr)
                    continue
                assert ev == UPGRADE
                msgs.append((fr.head, b""))
                return Verdict(tuple(msgs), "upgrade", trailer_lines=tuple(trailer_lines))
    except FramingError:
        return Verdict(tuple(msgs), INVALID_RESPONSE, trailer_lines=tuple(trailer_lines))
    except _Refused as e:
        return Verdict(tuple(msgs), e.reason, trailer_lines=tuple(trailer_lines))
    if head is not None and close_delimited:
        return Verdict((*msgs, (head, bytes(body))), "close", trailer_lines=tuple(trailer_lines))
    end = "partial" if head is not None or fr.acc is not None else "idle"
    return Verdict(tuple(msgs), end, trailer_lines=tuple(trailer_lines))


class _LineParsed:
    def __init__(self) -> None:
        self.url = b""

    def on_url(self, url: bytes) -> None:
        self.url += url


def assert_as_llhttp_parsed(raw: bytes, r: RequestHead) -> None:
    """The method, target and version the policy acts on are llhttp's (issue 10): the head the
    framer hands over starts with the request line llhttp parsed, never with bytes before it."""
    got = _LineParsed()
    p = httptools.HttpRequestParser(got)
    with contextlib.suppress(httptools.HttpParserUpgrade):
        p.feed_data(raw)
    assert r.method == p.get_method(), (r.method, p.get_method())
    assert r.target == got.url, (r.target, got.url)
    assert (b"HTTP/1.0" if r.http10 else b"HTTP/1.1") == b"HTTP/" + p.get_http_version().encode()


class _Refused(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# ---- the reference: RFC 9112 framing over the whole input, written plainly

_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
# Lenient about what is not framing (llhttp judges syntax), strict about what is.
_REQUEST_LINE = re.compile(_TOKEN + rb" [^ \r\n]+ HTTP/[0-9]\.([0-9])")
_STATUS_LINE = re.compile(rb"HTTP/[0-9]\.([0-9]) ([0-9]{3})(?: [^\r\n]*)?")
_FIELD = re.compile(rb"(" + _TOKEN + rb"):[ \t]*([^\r\n]*?)[ \t]*")
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,16})(?:;[^\r\n]*)?")


class _Stop(Exception):
    """The reference refuses the input here (``framing``: for a framing reason)."""


def _fields(lines: list[bytes]) -> dict[bytes, list[bytes]]:
    out: dict[bytes, list[bytes]] = {}
    for line in lines:
        m = _FIELD.fullmatch(line)
        if m is None:
            raise _Stop
        out.setdefault(m.group(1).lower(), []).append(m.group(2))
    return out


def _length(fields: dict[bytes, list[bytes]], http10: bool, response: bool = False) -> tuple[str, int]:
    """RFC 9112 §6.1-6.3, strictly: ("chunked"|"length"|"none"|"close", Content-Length).

    A request's Transfer-Encoding must be exactly ``chunked``; a response's selects chunked when
    chunked is its last coding, else the body runs until the connection closes."""
    te = fields.get(b"transfer-encoding")
    cl = fields.get(b"content-length")
    if te is not None:
        if cl is not None:
            raise _Stop
        if response:
            codings = [t.strip(b" \t").lower() for t in b",".join(te).split(b",")]
            return ("chunked", 0) if codings[-1] == b"chunked" else ("close", 0)
        if http10 or len(te) != 1 or te[0].lower() != b"chunked":
            raise _Stop
        return "chunked", 0
    if cl is not None:
        if len(cl) != 1 or not re.fullmatch(rb"[0-9]+", cl[0]):
            raise _Stop
        return "length", int(cl[0])
    return "none", 0


def _chunked(data: bytes, pos: int, trailers: list[int] | None = None) -> int | None:
    """Where a chunked body starting at ``pos`` ends; None if the input ends first. ``trailers``
    gets where the trailer section begins."""
    while True:
        eol = data.find(b"\r\n", pos)
        if eol < 0:
            return None
        m = _CHUNK_SIZE.fullmatch(data, pos, eol)
        if m is None or b"\n" in data[pos:eol]:
            raise _Stop
        size = int(m.group(1), 16)
        pos = eol + 2
        if size == 0:
            if trailers is not None:
                trailers.append(pos)
            break
        if len(data) < pos + size + 2:
            return None
        if data[pos + size : pos + size + 2] != b"\r\n":
            raise _Stop
        pos += size + 2
    while True:  # trailer section
        eol = data.find(b"\r\n", pos)
        if eol < 0:
            return None
        line = data[pos:eol]
        pos = eol + 2
        if not line:
            return pos
        if b"\n" in line or b"\r" in line:
            raise _Stop


def _skip_empty(data: bytes, pos: int) -> int:
    while pos < len(data) and data[pos] in b"\r\n":
        pos += 1
    return pos


def reference_requests(data: bytes, trailer_fields: list[int] | None = None) -> tuple[list[tuple[bytes, bytes]], bool]:
    """The requests in ``data`` and whether the reference refused what followed them;
    ``trailer_fields`` gets the indexes of those whose trailer section has a field."""
    msgs: list[tuple[bytes, bytes]] = []
    pos = 0
    try:
        while True:
            pos = _skip_empty(data, pos)
            i = data.find(b"\r\n\r\n", pos)
            if i < 0:
                return msgs, False
            head = data[pos : i + 4]
            lines = head[:-4].split(b"\r\n")
            m = _REQUEST_LINE.fullmatch(lines[0])
            if m is None:
                raise _Stop
            mode, length = _length(_fields(lines[1:]), m.group(1) == b"0")
            pos = i + 4
            if mode == "length":
                if len(data) < pos + length:
                    return msgs, False
                msgs.append((head, data[pos : pos + length]))
                pos += length
            elif mode == "chunked":
                trailers: list[int] = []
                end = _chunked(data, pos, trailers)
                if end is None:
                    return msgs, False
                if trailer_fields is not None and end - trailers[0] > 2:  # more than the empty line
                    trailer_fields.append(len(msgs))
                msgs.append((head, data[pos:end]))
                pos = end
            else:
                msgs.append((head, b""))
    except _Stop:
        return msgs, True


def reference_responses(data: bytes, method: bytes = b"GET") -> tuple[list[tuple[bytes, bytes]], bool]:
    """The responses in ``data`` (each answering ``method``) and whether the reference refused
    what followed them. A close-delimited body runs to the end of the input."""
    msgs: list[tuple[bytes, bytes]] = []
    pos = 0
    try:
        while True:
            pos = _skip_empty(data, pos)
            i = data.find(b"\r\n\r\n", pos)
            if i < 0:
                return msgs, False
            head = data[pos : i + 4]
            lines = head[:-4].split(b"\r\n")
            m = _STATUS_LINE.fullmatch(lines[0])
            if m is None:
                raise _Stop
            status = int(m.group(2))
            mode, length = _length(_fields(lines[1:]), False, response=True)
            pos = i + 4
            if status < 200 or status in (204, 304) or method == b"HEAD":
                msgs.append((head, b""))
            elif mode == "length":
                if len(data) < pos + length:
                    return msgs, False
                msgs.append((head, data[pos : pos + length]))
                pos += length
            elif mode == "chunked":
                end = _chunked(data, pos)
                if end is None:
                    return msgs, False
                msgs.append((head, data[pos:end]))
                pos = end
            else:
                msgs.append((head, data[pos:]))
                return msgs, False
    except _Stop:
        return msgs, True
