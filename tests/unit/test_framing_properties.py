"""Differential property tests of the data plane's framing (issue 9, point 4).

Request and response streams are built from the grammar (tests/framing_grammar.py), mutated the
ways attackers and broken peers mutate them, split at every offset and fed to the Framer and the
header analysis the way the data plane feeds them (tests/framing_driver.py). For every input:

- every call advances and the number of calls is bounded by bytes and reads (the driver checks);
- the verdict (the exact messages, then idle / partial / upgrade / close or one reason code) is
  the same however the bytes are split;
- every message the gateway accepts is the one a plain, strict RFC 9112 framer finds at the same
  place (so the gateway is never more lenient about where a message ends);
- a valid stream is framed exactly as it was built.
"""

from __future__ import annotations

import itertools
import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests import framing_driver as drive
from tests import framing_grammar as grammar

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def splits(data: bytes, seed: int) -> list[list[bytes]]:
    """``data`` cut in two at every offset, byte by byte, and at a few random sets of offsets."""
    out = [[data[:i], data[i:]] for i in range(1, len(data))]
    out.append([data[i : i + 1] for i in range(len(data))])
    rnd = random.Random(seed)
    for _ in range(4):
        cuts = sorted(rnd.sample(range(1, len(data)), min(len(data) - 1, rnd.randint(1, 8)))) if len(data) > 1 else []
        bounds = [0, *cuts, len(data)]
        out.append([data[a:b] for a, b in itertools.pairwise(bounds)])
    return out


def check_requests(data: bytes, seed: int) -> drive.Verdict:
    with drive.bounded():
        whole = drive.requests([data])
        for chunks in splits(data, seed):
            assert drive.requests(chunks) == whole, [len(c) for c in chunks]
    trailed: list[int] = []
    ref, _ = drive.reference_requests(data, trailed)
    n = len(whole.messages)
    assert list(whole.messages) == ref[:n], "the gateway framed a message the reference did not"
    assert list(whole.trailer_fields) == [t for t in trailed if t < n], (
        "trailer fields seen where the reference did not"
    )
    return whole


def check_responses(data: bytes, seed: int, **kw: object) -> drive.Verdict:
    with drive.bounded():
        whole = drive.responses([data], **kw)  # type: ignore[arg-type]
        for chunks in splits(data, seed):
            assert drive.responses(chunks, **kw) == whole, [len(c) for c in chunks]  # type: ignore[arg-type]
    if not kw:
        ref, _ = drive.reference_responses(data)
        n = len(whole.messages)
        if whole.end == "close":  # the body so far of a response that runs until the close
            assert list(whole.messages[:-1]) == ref[: n - 1] and whole.messages[-1] == ref[n - 1]
        else:
            assert list(whole.messages) == ref[:n], "the gateway framed a response the reference did not"
    return whole


@SETTINGS
@given(grammar.requests(), st.integers(0, 2**32))
def test_valid_requests_are_framed_exactly_however_split(stream: grammar.Stream, seed: int) -> None:
    assert check_requests(stream.data, seed) == drive.Verdict(
        tuple(stream.messages), "idle", tuple(stream.trailer_fields)
    )


@SETTINGS
@given(grammar.responses(), st.integers(0, 2**32))
def test_valid_responses_are_framed_exactly_however_split(stream: grammar.Stream, seed: int) -> None:
    v = check_responses(stream.data, seed)
    last_head, _ = stream.messages[-1]
    close = b"Content-Length" not in last_head and b"chunked" not in last_head and b" 204 " not in last_head
    close = close and b" 304 " not in last_head
    assert v == drive.Verdict(tuple(stream.messages), "close" if close else "idle")


@SETTINGS
@given(grammar.mutated(grammar.requests()), st.integers(0, 2**32))
def test_mutated_requests_one_verdict_however_split(data: bytes, seed: int) -> None:
    check_requests(data, seed)


@SETTINGS
@given(grammar.mutated(grammar.responses()), st.integers(0, 2**32))
def test_mutated_responses_one_verdict_however_split(data: bytes, seed: int) -> None:
    check_responses(data, seed)


@st.composite
def repeated(draw: st.DrawFn, stream: st.SearchStrategy[grammar.Stream]) -> grammar.Stream:
    """A stream's first message 2-4 times over, as a polling client or a sandbox answering it sends
    it: the framer skips llhttp for a head that repeats the last one with its whole body in the
    same read, and must reach the same verdict as when it parses (the splits decide which)."""
    s = draw(stream)
    end = s.starts[1] if len(s.starts) > 1 else len(s.data)
    one = s.data[s.starts[0] if s.starts else 0 : end]
    n = draw(st.integers(2, 4))
    size = len(one)
    hot = [h + i * size for i in range(n) for h in s.hot if h < size]
    return grammar.Stream(one * n, s.messages[:1] * n, hot, [i * size for i in range(n)])


@SETTINGS
@given(repeated(grammar.requests(leading=False)), st.integers(0, 2**32))
def test_repeated_requests_one_verdict_however_split(stream: grammar.Stream, seed: int) -> None:
    v = check_requests(stream.data, seed)
    if b"Transfer-Encoding" not in stream.messages[0][0]:
        assert v == drive.Verdict(tuple(stream.messages), "idle")


@SETTINGS
@given(grammar.mutated(repeated(grammar.requests(leading=False))), st.integers(0, 2**32))
def test_mutated_repeated_requests_one_verdict_however_split(data: bytes, seed: int) -> None:
    check_requests(data, seed)


@SETTINGS
@given(grammar.mutated(repeated(grammar.responses())), st.integers(0, 2**32))
def test_mutated_repeated_responses_one_verdict_however_split(data: bytes, seed: int) -> None:
    check_responses(data, seed)
    check_responses(data, seed, method=b"HEAD")


@settings(max_examples=20, deadline=None)
@given(grammar.mutated(grammar.responses()), st.integers(0, 2**32))
def test_mutated_responses_for_http10_clients_and_head_requests(data: bytes, seed: int) -> None:
    check_responses(data, seed, http10_client=True)
    check_responses(data, seed, method=b"HEAD")


@settings(max_examples=10, deadline=None)
@given(grammar.requests(many_fields=True), st.integers(0, 2**32))
def test_many_fields_are_refused_however_split(stream: grammar.Stream, seed: int) -> None:
    assert check_requests(stream.data, seed).end == "request_head_too_large"


@settings(max_examples=10, deadline=None)
@given(grammar.responses(many_fields=True), st.integers(0, 2**32))
def test_many_response_fields_are_refused_however_split(stream: grammar.Stream, seed: int) -> None:
    assert check_responses(stream.data, seed).end == "upstream_invalid_response"


@settings(max_examples=10, deadline=None)
@given(grammar.responses(many_interim=True), st.integers(0, 2**32))
def test_many_1xx_are_refused_however_split(stream: grammar.Stream, seed: int) -> None:
    v = check_responses(stream.data, seed)
    assert v.end == "upstream_invalid_response" and len(v.messages) == 16


@SETTINGS
@given(grammar.ambiguous(), st.integers(0, 2**32))
def test_ambiguous_framing_fields_are_refused_however_split(case: tuple[grammar.Stream, int], seed: int) -> None:
    """Two Transfer-Encoding fields, one that is not exactly chunked, an underscore spelling, a
    repeated or signed Content-Length (issue 10, point 2): the requests before it are served, it
    is refused, nothing after it is read."""
    stream, _ = case
    want = drive.Verdict(tuple(stream.messages), "invalid_framing", tuple(stream.trailer_fields))
    assert check_requests(stream.data, seed) == want


@SETTINGS
@given(grammar.requests(leading=False), st.lists(st.sampled_from(grammar.LEADING), min_size=3, max_size=3))
def test_bytes_before_a_request_line_never_change_it(stream: grammar.Stream, leading: list[bytes]) -> None:
    """CRLF, bare CR or bare LF before a request line are skipped as llhttp skips them: the same
    requests, with the same method (the driver checks each against llhttp's parse), whatever came
    before (a `\\nCONNECT` once bypassed the CONNECT refusal)."""
    data = bytearray()
    for i in range(len(stream.messages)):
        end = stream.starts[i + 1] if i + 1 < len(stream.starts) else len(stream.data)
        data += leading[i] + stream.data[stream.starts[i] : end]
    assert check_requests(bytes(data), 0) == drive.Verdict(tuple(stream.messages), "idle", tuple(stream.trailer_fields))


def test_request_trailers_are_forwarded_and_mark_the_request() -> None:
    """Request trailers go to the sandbox as the client sent them, and the request is marked: its
    sandbox connection is closed after the response, never pooled for another client (issue 10,
    point 1: some servers carry trailer fields into the next request). An empty trailer section
    marks nothing; however the bytes are split."""
    head = b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
    body = b"5;x=1\r\nhello\r\n0;last\r\nCookie: session=attacker\r\nX-B: 2\r\n\r\n"
    empty = b"3\r\nabc\r\n0\r\n\r\n"
    nxt = b"GET /b HTTP/1.1\r\nHost: h\r\n\r\n"
    want = drive.Verdict(((head, empty), (head, body), (nxt, b"")), "idle", (1,))
    assert check_requests(head + empty + head + body + nxt, 7) == want
