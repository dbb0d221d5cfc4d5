"""Message framing for both directions: one sans-I/O framer, one strict grammar (no I/O).

RFC 9112 §6.3 decides a body's length from the head. The gateway finds message boundaries itself
and feeds llhttp exactly the bytes of each message, so two framers must agree: a message that
llhttp ends earlier or later than the :class:`Framer` does is refused (request smuggling needs two
parties to disagree about where a message ends; here both views are checked against each other on
every message, and where they could differ the stricter one wins and the connection closes).

The same :class:`Framer` serves the client side (requests, downstream.py) and the sandbox side
(responses, upstream.py): bytes in memory go in, events with offsets come out (a head, a piece of
body, the end of a message, an upgrade). What a head *means* (which body framing its fields
select) is the caller's header analysis (headers.py); the framer is told and checks llhttp agrees.
h11's ``_readers.py`` (one table of readers for both roles, each chunk header checked by a regular
expression) and mitmproxy's ``read_body`` (shared by its client and server layers) are the models.

Grammar, stricter than Python's ``int()`` (which takes signs, spaces, ``_``, ``0x`` and Unicode
digits; a chunk size of ``-6`` once moved the read position backwards forever):

- a head ends at the first CRLF CRLF; empty lines before it are skipped (RFC 9112 §2.2), as
  llhttp skips them; its size and field count are capped;
- a chunk-size is ``1*16HEXDIG`` followed by ``;`` (extensions, validated by llhttp) or CRLF
  (RFC 9112 §7.1); chunk data is followed by exactly CRLF; every line ends in CRLF (no bare LF,
  no CR inside a line); the trailer section is capped like a head;
- Content-Length (``1*DIGIT``) is checked by the header analysis and by llhttp.

Every loop here advances: each step consumes at least one byte or changes state towards the end of
the message, and an incomplete head is appended to a buffer and searched only from where the last
search stopped, so the cost is linear in the bytes however they are split (tests/unit/
test_framing.py proves it by property tests, ``make fuzz`` by coverage-guided fuzzing).

Bodies pass unchanged where both hops allow it (Content-Length bodies, chunked bodies with their
chunk boundaries, extensions and trailers; :attr:`Framer.trailer` says whether a trailer section had
fields). Only where the hops differ does the gateway re-frame: a close-delimited response becomes
chunked for an HTTP/1.1 client so its connection can stay open, and an HTTP/1.0 client, which
cannot read chunked coding, gets the body de-chunked and close-delimited (:attr:`Framer.segments`).
"""

from __future__ import annotations

import re
from typing import Final

import httptools

__all__ = [
    "BODY",
    "CHUNKED",
    "CLOSE",
    "END",
    "FRAMING",
    "HEAD",
    "HEAD_BODY",
    "LAST_CHUNK",
    "LENGTH",
    "NEED",
    "NONE",
    "SYNTAX",
    "TOO_LARGE",
    "UPGRADE",
    "Framer",
    "FramingError",
    "chunk",
]

# Body framing, as the header analysis decides it.
NONE: Final = 0  #: no body (a request without one, HEAD responses, 1xx, 204, 304)
LENGTH: Final = 1  #: Content-Length bytes
CHUNKED: Final = 2  #: chunked transfer coding
CLOSE: Final = 3  #: until the connection closes (responses only)

# Events returned by Framer.next (and Framer.body).
NEED: Final = 0  #: every byte given was consumed; call again with the next read
#: ``head`` is a complete head and llhttp ended the message with it: the caller's analysis of the
#: head must select no body (else the two framers disagree: refuse it)
HEAD: Final = 1
#: ``head`` is a complete head and llhttp expects a body: call :meth:`Framer.body` (or
#: :meth:`Framer.skip_body` for the response to a HEAD request)
HEAD_BODY: Final = 2
BODY: Final = 3  #: ``data[pos:end]`` is body, as received (llhttp has seen it)
END: Final = 4  #: ``data[pos:end]`` is the last body bytes: the message is complete, both framers agree
UPGRADE: Final = 5  #: llhttp switched protocols after ``head``: ``data[end:]`` is not HTTP

# FramingError kinds: how the caller answers (431 / 400 malformed_request / 400 invalid_framing,
# or 502 upstream_invalid_response for a sandbox).
TOO_LARGE: Final = "too_large"
SYNTAX: Final = "syntax"
FRAMING: Final = "framing"

LAST_CHUNK: Final = b"0\r\n\r\n"
CRLF: Final = b"\r\n"
#: Longest chunk-size line (size and extensions) or trailer line.
MAX_LINE: Final = 8192

_HEAD, _LENGTH, _CHUNKED, _CLOSE, _DONE = range(5)  # framer states
_SIZE, _DATA, _DATA_CRLF, _TRAILER = range(4)  # inside a chunked body

#: A chunk-size line without its CRLF (RFC 9112 §7.1): 1*HEXDIG, then extensions or nothing.
#: Extensions are validated by llhttp; only their end matters here.
_SIZE_LINE: Final = re.compile(rb"([0-9A-Fa-f]{1,16})(?:;[^\r\n]*)?")
_EMPTY_LINES: Final = re.compile(rb"[\r\n]*")


class FramingError(ValueError):
    """Bytes that cannot be framed; ``kind`` is TOO_LARGE, SYNTAX or FRAMING."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind


def chunk(data: bytes) -> tuple[bytes, bytes, bytes]:
    """``data`` as one chunk (RFC 9112 §7.1), as pieces for ``writelines``."""
    return b"%x\r\n" % len(data), data, CRLF


def _llhttp_kind(e: Exception) -> str:
    msg = str(e).lower()
    if "content-length" in msg or "transfer-encoding" in msg or "chunk" in msg:
        return FRAMING
    return SYNTAX


def _bad_status(status: int) -> FramingError:
    """llhttp takes any three digits for a status code. One below 100 (RFC 9110 §15: invalid) is
    final to llhttp (a body may follow) and to a client, where the gateway takes every code below
    200 for an interim response: a sandbox's ``020`` went to the client without its
    Content-Length, a response read until the connection closes, and the next response was taken
    for the final one. Refused (502). 600-999, also invalid, are final to all three and are
    forwarded, as by h11, hyper and Go (§15: a client takes them as 5xx)."""
    return FramingError(FRAMING, f"status code {status:03d} below 100")


class Framer:
    """Frames the messages of one direction of one HTTP/1.1 connection.

    Drive it with :meth:`next` (``data`` and the offset to start at, before its end) until it
    returns :data:`NEED`. After :data:`HEAD` the head is a whole message (the caller's analysis
    must find no body in it); after :data:`HEAD_BODY` call :meth:`body` with the framing the
    analysis found (or :meth:`skip_body`). ``end`` is the offset just past the bytes an event
    covers, and every event but NEED covers at least one byte. Every byte is fed to llhttp
    (``parser``) before the event that covers it is returned, so nothing is forwarded that llhttp
    refused. Errors raise :class:`FramingError`; the connection cannot go on.

    The verdict does not depend on how the bytes are split into reads: problems are reported in
    the order of the bytes (a syntax error within the first ``max_head`` bytes of an oversized
    head is a syntax error; inside a body every error is a framing error).
    """

    __slots__ = (
        "acc",
        "began",
        "complete",
        "cstate",
        "end",
        "error",
        "head",
        "keep",
        "last",
        "last_len",
        "last_status",
        "line",
        "max_fields",
        "max_head",
        "parser",
        "rem",
        "replay",
        "response",
        "segments",
        "short_head",
        "state",
        "status",
        "trailer",
        "trailers",
    )

    def __init__(self, response: bool, max_head: int, max_fields: int) -> None:
        self.response = response
        self.max_head = max_head
        self.max_fields = max_fields
        # A field line takes 3 bytes at least: a head this long or shorter has not too many.
        self.short_head = 3 * (max_fields + 2)
        self.parser = self._new_parser()
        self.state = _HEAD
        self.acc: bytearray | None = None  # an incomplete head (llhttp has seen it)
        self.head = b""  # the last complete head
        self.status = 0  # responses: the status code of the last head
        self.end = 0
        self.rem = 0  # LENGTH: body bytes to come; chunk data: its bytes to come
        self.cstate = _SIZE
        self.line: bytearray | None = None  # an incomplete chunk-size or trailer line
        #: The field lines of a chunked body's trailer section so far, in bytes: after its END, not
        #: 0 when the section had a field (a request's sandbox connection is then not pooled again).
        self.trailer = 0
        #: Offsets of chunk data in ``data`` (set to a list to de-chunk a body for HTTP/1.0 or HTTP/2).
        self.segments: list[tuple[int, int]] | None = None
        #: While de-chunking: the trailer field lines (without CRLF), for an HTTP/2 client's trailers.
        self.trailers: list[bytes] | None = None
        # What llhttp has said: a message began during the current head; the last one completed
        # (and whether it left the connection open, when it completed with its head).
        self.began = False
        self.complete = True
        self.keep = False
        self.error: FramingError | None = None  # raised in a parser callback
        # The previous message's head when llhttp was back at the start of a message after it, the
        # message being the head alone (``last_len`` 0: polling, health checks) or the head and a
        # Content-Length body of ``last_len`` bytes that came in the same read (a sandbox's answer
        # to a repeated request, the same within its Date's second). The same head again, with as
        # much body, needs no second parse: llhttp would reach the same verdict and the same state
        # (it counts Content-Length body bytes without looking at them).
        self.last: bytes | None = None
        self.last_len = 0
        self.last_status = 0
        self.replay = False  # HEAD_BODY returned for ``last`` without llhttp: body() decides

    def _new_parser(self) -> httptools.HttpRequestParser | httptools.HttpResponseParser:
        return httptools.HttpResponseParser(self) if self.response else httptools.HttpRequestParser(self)

    # ---- llhttp callbacks

    def on_message_begin(self) -> None:
        if self.state != _HEAD or self.began:
            self.error = FramingError(FRAMING, "llhttp sees a new message where the gateway does not")
            raise self.error
        self.began = True
        self.complete = False

    def on_message_complete(self) -> None:
        self.complete = True
        self.keep = self.parser.should_keep_alive()

    # ---- framing

    def next(self, data: bytes, pos: int) -> int:
        """The next event in ``data[pos:]``; ``end`` is where the bytes it covers stop."""
        st = self.state
        if st == _HEAD:
            if self.acc is not None:
                return self._head_continues(data, pos)
            end = data.find(b"\r\n\r\n", pos)
            if end < 0:
                return self._head_begins(data, pos)
            end += 4
            size = end - pos
            if size > self.max_head:
                if data[pos] in b"\r\n":
                    return self._skip(data, pos)
                raise self._too_large(data[pos : pos + self.max_head])
            head = data[pos:end]  # data itself when it is all head (no copy)
            self.end = end
            last = self.last
            if last is not None and head == last:
                # The previous message began with these bytes and llhttp is back at the start of a
                # message: it would parse them to the same verdict. (``head`` stays the previous
                # object: callers comparing with it compare identities.)
                n = self.last_len
                if not n:
                    return HEAD
                if end + n <= len(data):  # and its body is here: body() checks it is as long
                    self.replay = True
                    self.complete = False
                    self.status = self.last_status
                    return HEAD_BODY
            if head[0] in b"\r\n":  # empty lines before a head (never in ``last``)
                return self._skip(data, pos)
            # _parse_head written out: every head comes here, and the call would cost about 300
            # instructions a head (bench/hotpath.py --callgrind: 59,850 against 60,439 a request).
            self.head = head
            try:
                self.parser.feed_data(head)
            except httptools.HttpParserUpgrade as e:
                return self._upgraded(e, len(head), size)
            except httptools.HttpParserCallbackError:
                raise self._callback_error() from None
            except httptools.HttpParserError as e:
                raise FramingError(_llhttp_kind(e), str(e)) from None
            if size > self.short_head and head.count(b"\n") - 2 > self.max_fields:
                raise FramingError(TOO_LARGE, "too many header fields")
            if not self.began:
                raise FramingError(FRAMING, "llhttp saw no message in the head")
            if self.response:
                status = self.status = self.parser.get_status_code()  # type: ignore[union-attr]
                if status < 100:
                    raise _bad_status(status)
            if self.complete:
                self.began = False
                self.last = head if self.keep else None
                self.last_len = 0
                return HEAD
            self.last = None
            return HEAD_BODY
        if st == _LENGTH:
            rem = self.rem
            end = min(pos + rem, len(data))
            self._feed_body(data[pos:end])
            self.end = end
            self.rem = rem = rem - (end - pos)
            if rem:
                if self.complete:
                    raise FramingError(FRAMING, "llhttp ended the body before its Content-Length")
                return BODY
            if not self.complete:
                raise FramingError(FRAMING, "llhttp expects more of the message than the gateway")
            self.state = _HEAD
            self.began = False
            return END
        if st == _CHUNKED:
            end, done = self._chunked(data, pos)
            self._feed_body(data[pos:end])
            self.end = end
            if done:
                if not self.complete:
                    raise FramingError(FRAMING, "llhttp expects more of the message than the gateway")
                self.state = _HEAD
                self.began = False
                if self.trailer and not self.keep:
                    # llhttp read a Connection field in the trailer section as the connection's, and
                    # would refuse the next message ("Data after Connection: close"), though whether
                    # the connection goes on was decided from the head (headers.py; RFC 9110 §6.5.1:
                    # a trailer field does not control the connection). A parser that has not seen
                    # it takes the next message, as after any other.
                    self.parser = self._new_parser()
                return END
            if self.complete:
                raise FramingError(FRAMING, "llhttp ended the chunked body before the gateway did")
            return BODY
        if st == _CLOSE:
            self.end = len(data)
            return BODY
        raise FramingError(FRAMING, "no HTTP after an upgrade")

    def body(self, mode: int, length: int, data: bytes, pos: int) -> int:
        """After :data:`HEAD_BODY`: the body framing the head selects (the header analysis
        decided), then the next event in ``data[pos:]`` like :meth:`next` (NEED at its end)."""
        # (After a HEAD event llhttp is at the start of the next message: body bytes fed to it
        # begin one, and on_message_begin refuses that.)
        if self.replay:  # the head is ``last``, not given to llhttp (next)
            self.replay = False
            self.complete = True
            if mode == LENGTH and length == self.last_len:  # as before, and next saw it is all here
                self.end = pos + length
                return END
            self._reparse()  # another framing than last time: llhttp must see the head after all
        if mode == LENGTH and length > 0:
            end = pos + length
            if end <= len(data):  # the whole body is here (small messages): frame it at once
                self.state = _LENGTH  # for the parser callbacks
                try:
                    self.parser.feed_data(data[pos:end])
                except httptools.HttpParserCallbackError:
                    raise self._callback_error() from None
                except (httptools.HttpParserError, httptools.HttpParserUpgrade) as e:
                    raise FramingError(FRAMING, str(e)) from None
                self.state = _HEAD
                if not self.complete:
                    raise FramingError(FRAMING, "llhttp expects more of the message than the gateway")
                self.end = end
                self.began = False
                if self.keep:
                    self.last = self.head
                    self.last_len = length
                    self.last_status = self.status
                return END
            self.state = _LENGTH
            self.rem = length
        elif mode == CHUNKED:
            self.state = _CHUNKED
            self.cstate = _SIZE
            self.trailer = 0
            self.trailers = None
        elif mode == CLOSE and self.response:
            self.state = _CLOSE
        else:
            raise FramingError(FRAMING, "llhttp expects a body where the gateway sees none")
        return self.next(data, pos) if pos < len(data) else NEED

    def skip_body(self) -> None:
        """After :data:`HEAD_BODY` for the response to a HEAD request: no body, whatever its fields
        say (RFC 9110 §9.3.2). llhttp cannot be told; a new parser starts clean at the message
        boundary the gateway knows."""
        if self.complete or not self.response:
            raise FramingError(FRAMING, "skip_body after a head without a body")
        self.replay = False
        self.parser = self._new_parser()
        self.complete = True
        self.began = False

    # ---- heads

    def _skip(self, data: bytes, pos: int) -> int:
        """Empty lines before a head (RFC 9112 §2.2): skipped, as llhttp skips them."""
        m = _EMPTY_LINES.match(data, pos)
        assert m is not None  # matches the empty string at least
        end = m.end()
        if end == len(data):
            self.end = end
            return NEED
        return self.next(data, end)  # at most once more: data[end] is not CR or LF

    def _head_begins(self, data: bytes, pos: int) -> int:
        """No head end in ``data[pos:]``: keep what there is (after empty lines) for the next read."""
        n = len(data)
        if data[pos] in b"\r\n":
            m = _EMPTY_LINES.match(data, pos)
            assert m is not None
            pos = m.end()
            if pos == n:
                self.end = n
                return NEED
        if n - pos > self.max_head:
            raise self._too_large(data[pos : pos + self.max_head])
        piece = data[pos:]
        self.acc = bytearray(piece)
        self._feed_partial(piece)
        self.end = n
        return NEED

    def _head_continues(self, data: bytes, pos: int) -> int:
        """More of an incomplete head: appended, searched from where the last search stopped."""
        acc = self.acc
        assert acc is not None
        before = len(acc)
        acc += memoryview(data)[pos:]
        i = acc.find(b"\r\n\r\n", before - 3 if before > 3 else 0)
        n = len(data)
        size = len(acc) if i < 0 else i + 4
        if size > self.max_head:
            raise self._too_large(data[pos : pos + self.max_head - before])
        if i < 0:
            self._feed_partial(data[pos:])
            self.end = n
            return NEED
        end = pos + size - before
        head = bytes(acc[:size])
        self.acc = None
        self.end = end
        return self._parse_head(head, data[pos:end], size)

    def _parse_head(self, head: bytes, piece: bytes, size: int) -> int:
        """A whole head found (``piece``: its bytes llhttp has not seen yet): llhttp parses it, and
        what the head may not be (too many fields, no message at all) is checked once it has."""
        self.head = head
        try:
            self.parser.feed_data(piece)
        except httptools.HttpParserUpgrade as e:
            return self._upgraded(e, len(piece), size)
        except httptools.HttpParserCallbackError:
            raise self._callback_error() from None
        except httptools.HttpParserError as e:
            raise FramingError(_llhttp_kind(e), str(e)) from None
        if size > self.short_head and head.count(b"\n") - 2 > self.max_fields:
            raise FramingError(TOO_LARGE, "too many header fields")
        if not self.began:
            raise FramingError(FRAMING, "llhttp saw no message in the head")
        if self.response:
            status = self.status = self.parser.get_status_code()  # type: ignore[union-attr]
            if status < 100:
                raise _bad_status(status)
        if self.complete:
            self.began = False
            self.last = head if self.keep else None
            self.last_len = 0
            return HEAD
        self.last = None
        return HEAD_BODY

    def _reparse(self) -> None:
        """A replayed head (``last``) turned out to frame its body otherwise: llhttp parses it now,
        as it would have in :meth:`next` (the same head parses to HEAD_BODY again, or this raises)."""
        head = self.head
        self.last = None
        self.began = False
        if self._parse_head(head, head, len(head)) != HEAD_BODY:
            raise FramingError(FRAMING, "llhttp framed a repeated head otherwise")

    def _too_large(self, allowed: bytes) -> FramingError:
        """The head passes ``max_head``; llhttp sees the bytes within the limit first, so a syntax
        error there is reported as such, however the bytes were split."""
        if allowed:
            self._feed_partial(allowed)
        return FramingError(TOO_LARGE, "head too large")

    def _upgraded(self, e: httptools.HttpParserUpgrade, fed: int, size: int) -> int:
        """llhttp switched protocols after the head (a 101, or a request asking for an Upgrade)."""
        if not self.complete or e.args[0] != fed:
            raise FramingError(FRAMING, "llhttp switched protocols elsewhere than at the head's end")
        if size > self.short_head and self.head.count(b"\n") - 2 > self.max_fields:
            raise FramingError(TOO_LARGE, "too many header fields")
        self.last = None
        self.began = False
        if self.response:
            self.state = _DONE
        else:
            self.parser = self._new_parser()  # HTTP goes on unless the sandbox accepts (101)
        return UPGRADE

    def _feed_partial(self, piece: bytes) -> None:
        """Feed part of an incomplete head, so bad syntax is refused before the head ends."""
        try:
            self.parser.feed_data(piece)
        except httptools.HttpParserCallbackError:
            raise self._callback_error() from None
        except httptools.HttpParserError as e:
            raise FramingError(_llhttp_kind(e), str(e)) from None
        except httptools.HttpParserUpgrade:
            raise FramingError(FRAMING, "llhttp ended a head where the gateway sees none") from None
        if self.complete:  # e.g. an HTTP/0.9 request line: llhttp took it for a whole request
            raise FramingError(SYNTAX, "llhttp ended a message where the gateway sees an incomplete head")

    def _callback_error(self) -> FramingError:
        e = self.error or FramingError(FRAMING, "parser callback failed")
        self.error = None
        return e

    # ---- bodies

    def _feed_body(self, piece: bytes) -> None:
        """Inside a body every error is a framing error (whatever llhttp calls it)."""
        try:
            self.parser.feed_data(piece)
        except httptools.HttpParserCallbackError:
            raise self._callback_error() from None
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as e:
            raise FramingError(FRAMING, str(e)) from None

    def _chunked(self, data: bytes, pos: int) -> tuple[int, bool]:
        """Consume ``data[pos:]`` of a chunked body: (offset reached, whether the body ended there).

        Each pass of the loop consumes at least one byte."""
        n = len(data)
        cs = self.cstate
        rem = self.rem
        segments = self.segments
        try:
            while pos < n:
                if cs == _DATA:
                    take = rem if rem < n - pos else n - pos
                    if segments is not None:
                        segments.append((pos, pos + take))
                    pos += take
                    rem -= take
                    if not rem:
                        cs = _DATA_CRLF
                        rem = 2
                elif cs == _DATA_CRLF:
                    if data[pos] != (13 if rem == 2 else 10):
                        raise FramingError(FRAMING, "chunk data not followed by CRLF")
                    pos += 1
                    rem -= 1
                    if not rem:
                        cs = _SIZE
                else:  # a chunk-size line or a trailer line
                    j = data.find(b"\n", pos)
                    if j < 0:
                        part = self.line
                        if part is None:
                            part = self.line = bytearray()
                        part += memoryview(data)[pos:]
                        if len(part) > MAX_LINE:
                            raise FramingError(FRAMING, "chunk-size or trailer line too long")
                        pos = n
                        break
                    part = self.line
                    if part is not None:
                        part += memoryview(data)[pos:j]
                        line = bytes(part)
                        self.line = None
                    else:
                        line = data[pos:j]
                    pos = j + 1
                    if len(line) > MAX_LINE:
                        raise FramingError(FRAMING, "chunk-size or trailer line too long")
                    if not line.endswith(b"\r") or b"\r" in line[:-1]:
                        raise FramingError(FRAMING, "a line in a chunked body does not end in CRLF")
                    if cs == _SIZE:
                        m = _SIZE_LINE.fullmatch(line, 0, len(line) - 1)
                        if m is None:
                            raise FramingError(FRAMING, "bad chunk size")
                        rem = int(m.group(1), 16)
                        cs = _DATA if rem else _TRAILER
                    elif len(line) == 1:  # the empty line that ends the trailer section
                        return pos, True
                    else:
                        self.trailer += len(line) + 1
                        if self.trailer > self.max_head:
                            raise FramingError(TOO_LARGE, "trailer section too large")
                        if segments is not None:
                            if self.trailers is None:
                                self.trailers = []
                            self.trailers.append(line[:-1])
        finally:
            self.cstate = cs
            self.rem = rem
        return pos, False
