"""python-hyper's h2 as the gateway runs it: a server connection whose per-request work is cut to
what this configuration uses (pure: no I/O; http2.py drives it).

h2 is pure Python and costs most of an HTTP/2 request (frames, HPACK, two state machines per stream,
events). The protocol work stays h2's, hpack's and hyperframe's: every frame is parsed and serialised
by hyperframe, every header block encoded and decoded by hpack, every stream and connection state
change made by h2's state machines. What is taken out is work that changes nothing here:

- header validation and normalisation are off (:func:`server_config`): h2map.py checks the same rules
  once while it writes the HTTP/1.1 head, and llhttp checks that head as it would an HTTP/1.1 client's;
- HPACK blocks that repeat on a connection while the dynamic table is unchanged (the same request
  polled, the same response within a second) are decoded and encoded once
  (:class:`RememberingDecoder`, :class:`RememberingEncoder`), like the HTTP/1.1 side analyses a
  repeated head once; the request ID (never indexed) is hpack's prefix for its name and length, then
  its bytes;
- :class:`ServerConnection` overrides the few h2 4.4 methods a request goes through (a request's
  HEADERS, a new stream, a response's HEADERS and DATA, a received frame) with copies that skip what
  this configuration leaves unused: validation flags and UTF-8 passes over every field list, log calls
  that are no-ops (one of them ``repr`` of every received frame, one listing every stream ID), a walk
  over every stream per new stream (h2's count against a limit that is not the gateway's), a second
  window lookup per DATA frame, connection-level inputs that h2's own table says change nothing in an
  open connection (checked at import); and the frames of a response are two hyperframe frames reused
  stream after stream (building a frame and its flag set cost more than serialising it).
  Anything else (priority information, padding, a client's stream whose HEADERS carry a status)
  goes to h2's own methods. pyproject.toml holds h2 below 4.5: the overrides follow 4.4's code.

``bench/hotpath.py --callgrind --h2``: 409,000 instructions per request before these (h2's receiving of
a HEADERS frame a third, its sending of response HEADERS a third), about 207,000 after (docs/development.md).
"""

from __future__ import annotations

from typing import Any, Final

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.stream
import hpack
from hpack import NeverIndexedHeaderTuple
from hpack.hpack import INDEX_INCREMENTAL, encode_integer
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    ExtensionFrame,
    HeadersFrame,
    PriorityFrame,
    RstStreamFrame,
    WindowUpdateFrame,
)

__all__ = [
    "ENCODER_TABLE_SIZE",
    "RememberingDecoder",
    "RememberingEncoder",
    "ServerConnection",
    "ShortestEncoder",
    "server_config",
]

_SEND_HEADERS: Final = h2.connection.ConnectionInputs.SEND_HEADERS
_SEND_DATA: Final = h2.connection.ConnectionInputs.SEND_DATA
_SEND_STREAM_DATA: Final = h2.stream.StreamInputs.SEND_DATA
_SEND_STREAM_HEADERS: Final = h2.stream.StreamInputs.SEND_HEADERS
_SEND_INFORMATIONAL_HEADERS: Final = h2.stream.StreamInputs.SEND_INFORMATIONAL_HEADERS
_SEND_END_STREAM: Final = h2.stream.StreamInputs.SEND_END_STREAM
_RECV_HEADERS: Final = h2.connection.ConnectionInputs.RECV_HEADERS
_RECV_STREAM_HEADERS: Final = h2.stream.StreamInputs.RECV_HEADERS
_RECV_END_STREAM: Final = h2.stream.StreamInputs.RECV_END_STREAM
_CLIENT_STREAMS: Final = h2.connection.AllowedStreamIDs.ODD
_SERVER_OPEN: Final = h2.connection.ConnectionState.SERVER_OPEN
_CLOSED: Final = h2.stream.StreamState.CLOSED
# In an open server connection these connection-level inputs change nothing and make no event (h2's
# own table says so, checked here): ServerConnection does not run them through the state machine there.
if any(
    h2.connection.H2ConnectionStateMachine._transitions[(_SERVER_OPEN, i)] != (None, _SERVER_OPEN)
    for i in (_SEND_HEADERS, _SEND_DATA, _RECV_HEADERS)
):
    raise ImportError("h2's connection states changed: review gateway.http.h2conn.ServerConnection")


#: The most of its HPACK dynamic table the gateway's encoder uses, whatever a client allows: the
#: protocol's default (RFC 9113 §6.5.2), as nginx and nghttp2 keep theirs.
ENCODER_TABLE_SIZE: Final = 4096


class RememberingDecoder:
    """hpack's decoder, with the blocks that repeat while the dynamic table is unchanged decoded once.

    A header block decodes to the same list as long as the table it refers to is the same: a
    block that changed nothing (indexed fields, literals without indexing) may be remembered until
    the next block that changes the table. h2 sets the two limits below and calls :meth:`decode`."""

    __slots__ = ("d", "memo")

    def __init__(self, max_header_list_size: int) -> None:
        self.d = hpack.Decoder(max_header_list_size)
        self.memo: dict[bytes, list[Any]] = {}

    @property
    def max_header_list_size(self) -> int:
        return self.d.max_header_list_size

    @max_header_list_size.setter
    def max_header_list_size(self, v: int) -> None:
        self.d.max_header_list_size = v
        self.memo.clear()

    @property
    def max_allowed_table_size(self) -> int:
        return self.d.max_allowed_table_size

    @max_allowed_table_size.setter
    def max_allowed_table_size(self, v: int) -> None:
        self.d.max_allowed_table_size = v
        self.memo.clear()

    @property
    def header_table_size(self) -> int:
        return self.d.header_table_size

    def decode(self, data: bytes, raw: bool = False) -> list[Any]:
        memo = self.memo
        got = memo.get(data)
        if got is not None:
            return got
        t = self.d.header_table
        entries = t.dynamic_entries
        # Every insertion puts a new tuple first (hpack's add), so the first entry's identity, not
        # its value, tells whether one happened: a full table's re-insertion of an equal entry evicts
        # the oldest and keeps length, size and the first entry's value.
        size, first, maxsize = len(entries), entries[0] if entries else None, t.maxsize
        try:
            out: list[Any] = self.d.decode(data, raw=raw)  # type: ignore[assignment]  # a list, typed Iterable
        except Exception:
            # A block that fails may have changed the table before it failed (an insertion or a size
            # update, then a bad index): what was remembered may mean something else now. (h2 ends
            # the connection on a decoding error; a caller that goes on must not get stale lists.)
            memo.clear()
            raise
        if len(entries) != size or (entries[0] if entries else None) is not first or t.maxsize != maxsize:
            memo.clear()  # the table changed: what was remembered may mean something else now
        elif len(data) <= 4096:  # requests that repeat are small: a big block is not kept
            if len(memo) >= 64:
                memo.clear()
            memo[bytes(data)] = out
        return out


class ShortestEncoder(hpack.Encoder):
    """hpack's encoder, each string literal Huffman-coded only when that makes it shorter (RFC 7541
    §5.2 leaves the choice to the encoder; nghttp2's and Go's encoders choose so too).

    hpack codes every literal: a byte whose Huffman code is long (obs-text, 0x80-0xff, takes 20 to 30
    bits; ``\\`` 19, ``{`` 15) grows up to 3.75 times. A sandbox's field value of 30,000 such bytes
    then became a 97,500-byte string, past the 65,536 bytes that nghttp2 (curl, Node.js, nghttp)
    decodes (NGHTTP2_HD_MAX_NV): a COMPRESSION_ERROR, GOAWAY, every stream of that client connection
    ended, other sandboxes' too; and a 64 KiB head made more than the 8 CONTINUATION frames nghttp2
    takes (CVE-2024-28182's limit). Coded the shorter way, a string is never longer than its bytes."""

    def _string(self, s: bytes) -> bytes:
        coded = self.huffman_coder.encode(s)
        if len(coded) < len(s):
            n = encode_integer(len(coded), 7)
            n[0] |= 0x80  # H: Huffman-coded
            return bytes(n) + coded
        return bytes(encode_integer(len(s), 7)) + s

    def _encode_literal(self, name: bytes, value: bytes, indexbit: bytes, huffman: bool = False) -> bytes:
        if not huffman:
            return super()._encode_literal(name, value, indexbit, huffman)
        return b"".join((indexbit, self._string(name), self._string(value)))

    def _encode_indexed_literal(self, index: int, value: bytes, indexbit: bytes, huffman: bool = False) -> bytes:
        if not huffman:
            return super()._encode_indexed_literal(index, value, indexbit, huffman)
        prefix = encode_integer(index, 4 if indexbit != INDEX_INCREMENTAL else 6)
        prefix[0] |= ord(indexbit)
        return bytes(prefix) + self._string(value)


class RememberingEncoder:
    """hpack's encoder (:class:`ShortestEncoder`), with the field lists that repeat while the dynamic
    table is unchanged encoded once (the same response within a second: its Date is the same).

    A last field that is never indexed (the request ID: a new value per response, which would
    otherwise churn the dynamic table, so that nothing repeats and every lookup scans a full table)
    is encoded on its own after the rest: two blocks of field representations are one block."""

    __slots__ = ("e", "memo")

    def __init__(self) -> None:
        self.e = ShortestEncoder()
        self.memo: dict[tuple[Any, ...], bytes] = {}

    @property
    def header_table_size(self) -> int:
        return self.e.header_table_size

    @header_table_size.setter
    def header_table_size(self, v: int) -> None:
        """h2 sets the client's SETTINGS_HEADER_TABLE_SIZE here: the most the client's decoder
        holds, which the encoder may use less of (RFC 7541 §4.2, it says so in the next block).
        Taken as it came, a client's 2^32-1 would let every response field stay in the gateway's
        memory for as long as the connection lives: at most :data:`ENCODER_TABLE_SIZE` is used."""
        self.e.header_table_size = min(v, ENCODER_TABLE_SIZE)
        self.memo.clear()

    def encode(self, headers: list[Any], huffman: bool = True) -> bytes:
        if headers and headers[-1].__class__ is NeverIndexedHeaderTuple:
            block = self._encode(headers[:-1], huffman)
            return block + self._never_indexed(headers[-1])
        return self._encode(headers, huffman)

    def encode_with(self, headers: tuple[Any, ...], never_indexed: tuple[bytes, bytes]) -> bytes:
        """``encode([*headers, NeverIndexedHeaderTuple(*never_indexed)])``, without building that list."""
        return self._encode(headers, True) + self._never_indexed(never_indexed)

    def _never_indexed(self, field: Any) -> bytes:
        """A never-indexed literal (RFC 7541 §6.2.3), without Huffman coding (a random-looking value
        barely shrinks, and it costs): hpack's representation of the name and the value's length,
        remembered while the table is unchanged (the name's index may change with it), then the
        value's bytes, which is how a literal without Huffman coding ends (§5.2)."""
        name: bytes = field[0]
        value: bytes = field[1]
        key = (None, name, len(value))  # (no field list's key begins with None)
        got = self.memo.get(key)
        if got is not None:
            return got + value
        out: bytes = self.e.encode([NeverIndexedHeaderTuple(name, value)], huffman=False)  # changes no table
        if out.endswith(value) and not self.e.table_size_changes:
            if len(self.memo) >= 64:
                self.memo.clear()
            self.memo[key] = out[: len(out) - len(value)]
        return out

    def _encode(self, headers: list[Any] | tuple[Any, ...], huffman: bool) -> bytes:
        key = tuple(headers)  # (a tuple is its own)
        memo = self.memo
        e = self.e
        if not e.table_size_changes:  # (a size update must begin the block: encoded, not remembered)
            got = memo.get(key)
            if got is not None:
                return got
        t = e.header_table
        entries = t.dynamic_entries
        pending = bool(e.table_size_changes)
        before = (len(entries), entries[0] if entries else None, t.maxsize)
        out: bytes = e.encode(headers, huffman)
        if pending or (len(entries), entries[0] if entries else None, t.maxsize) != before:
            memo.clear()
        else:
            if len(memo) >= 64:
                memo.clear()
            memo[key] = out
        return out


class ServerConnection(h2.connection.H2Connection):
    """h2's connection for the server side (only), with a request's path through it trimmed (module
    docstring), remembering fewer closed streams (h2 keeps 65,536 per connection: megabytes for one
    long-lived balancer connection; frames for a stream closed thousands of streams ago do not come)."""

    MAX_CLOSED_STREAMS = 4096

    def __init__(self, config: h2.config.H2Configuration) -> None:
        super().__init__(config)
        # Frames received that asked for nothing (see _receive_frame), for the caller's budget.
        self.idle_frames = 0
        self.stream_updates = 0  # WINDOW_UPDATE frames for a stream, open or closed
        self.gone_data = 0  # DATA frames with a payload for a stream that is gone
        self.encoder = RememberingEncoder()  # type: ignore[assignment]  # (send_headers needs its encode_with)
        # The frames of responses, reused stream after stream (hyperframe's frames are plain objects:
        # set the stream and the payload, serialise): building a frame and its flags costs more than
        # serialising it. [end_stream] picks the flags.
        self._headers_out = (HeadersFrame(1), HeadersFrame(1))
        self._data_out = (DataFrame(1), DataFrame(1))
        # Their flags never change: a frozenset answers serialize()'s "flag in flags" in C, where
        # hyperframe's Flags (a set that checks what is added) answers in Python.
        self._headers_out[0].flags = frozenset({"END_HEADERS"})  # type: ignore[assignment]
        self._headers_out[1].flags = frozenset({"END_HEADERS", "END_STREAM"})  # type: ignore[assignment]
        self._data_out[0].flags = frozenset()  # type: ignore[assignment]
        self._data_out[1].flags = frozenset({"END_STREAM"})  # type: ignore[assignment]

    _sweep_at = 64  # (see open_inbound_streams)

    def queued(self) -> int:
        """Bytes of frames waiting for ``data_to_send``."""
        return len(self._data_to_send)

    def forget(self, stream_id: int) -> None:
        """A stream the gateway is done with: if closed, forgotten now as h2's count of open streams
        does (remembering how it closed, for frames that still come), not in the next sweep."""
        stream = self.streams.get(stream_id)
        if stream is not None and stream.state_machine.state is _CLOSED:
            del self.streams[stream_id]
            self._closed_streams[stream_id] = stream.state_machine.stream_closed_by

    def _begin_new_stream(self, stream_id: int, allowed_ids: Any) -> h2.stream.H2Stream:
        """h2 4.4's for a stream the client opens (anything else goes to h2's), without its no-op
        log calls (one of them listing every stream's ID)."""
        if stream_id % 2 != 1 or allowed_ids is not _CLIENT_STREAMS:
            return super()._begin_new_stream(stream_id, allowed_ids)
        if stream_id <= self.highest_inbound_stream_id:
            raise h2.exceptions.StreamIDTooLowError(stream_id, self.highest_inbound_stream_id)
        s = h2.stream.H2Stream(
            stream_id,
            config=self.config,
            inbound_window_size=self.local_settings.initial_window_size,
            outbound_window_size=self.remote_settings.initial_window_size,
        )
        s.max_outbound_frame_size = self.max_outbound_frame_size
        self.streams[stream_id] = s
        self.highest_inbound_stream_id = stream_id
        return s

    @property
    def open_inbound_streams(self) -> int:
        """h2 counts the open streams, and forgets the closed ones, each time a client opens one: a
        walk over every stream per request. Its limit is not the one that holds here (``_request``
        refuses past ``http2_max_concurrent_streams``, h2's is 2^31-1), so an upper bound will do:
        the walk runs once the streams have doubled since the last one, which keeps the forgetting."""
        streams = self.streams
        if len(streams) < self._sweep_at:
            return len(streams)
        n = self._open_streams(1)  # (odd: the client's streams; forgets the closed ones)
        self._sweep_at = 2 * len(streams) + 64
        return n

    def send_headers(
        self,
        stream_id: int,
        headers: Any,
        end_stream: bool = False,
        priority_weight: int | None = None,
        priority_depends_on: int | None = None,
        priority_exclusive: bool | None = None,
        never_indexed: tuple[bytes, bytes] | None = None,
    ) -> None:
        """h2 4.4's, for a response, an interim response or trailers on a stream the client opened
        (anything else goes to h2's): the same state transitions, HPACK block and frames, without
        what this configuration leaves unused (a UTF-8 pass over every field: they are bytes here;
        validation flags: validation is off; the request method of a response, which is None) and
        h2's no-op log calls. ``never_indexed``: a last field outside compression (the request ID),
        ``headers`` then being the tuple of the others (see RememberingEncoder.encode_with)."""
        stream = self.streams.get(stream_id)
        if never_indexed is not None and (
            stream is None or (priority_weight, priority_depends_on, priority_exclusive) != (None, None, None)
        ):
            headers = [*headers, NeverIndexedHeaderTuple(*never_indexed)]
            never_indexed = None
        if stream is None or (priority_weight, priority_depends_on, priority_exclusive) != (None, None, None):
            super().send_headers(
                stream_id, headers, end_stream, priority_weight, priority_depends_on, priority_exclusive
            )
            return
        if self.state_machine.state is not _SERVER_OPEN:  # (in it, h2's transition changes nothing)
            self.state_machine.process_input(_SEND_HEADERS)
        informational = False
        for n, v in headers:  # (h2.utilities.is_informational_response)
            if n[:1] != b":":
                break
            if n == b":status":
                informational = v[:1] == b"1"
                break
        if informational and end_stream:
            raise h2.exceptions.ProtocolError("Cannot set END_STREAM on informational responses.")
        sm = stream.state_machine
        sm.process_input(_SEND_INFORMATIONAL_HEADERS if informational else _SEND_STREAM_HEADERS)
        if never_indexed is None:
            block = self.encoder.encode(headers)
        else:
            block = self.encoder.encode_with(headers, never_indexed)  # type: ignore[attr-defined]  # (see __init__)
        size = stream.max_outbound_frame_size or 0
        if end_stream:
            sm.process_input(_SEND_END_STREAM)
        if sm.trailers_sent and not end_stream:
            raise h2.exceptions.ProtocolError("Trailers must have END_STREAM set.")
        stream.request_method = None
        if len(block) <= size:
            f = self._headers_out[end_stream]
            f.stream_id = stream_id
            f.data = block
            self._data_to_send += f.serialize()
            return
        frames: list[Any] = [HeadersFrame(stream_id, block[:size])]
        # (as h2: CONTINUATION frames after a big block)
        frames.extend(ContinuationFrame(stream_id, block[i : i + size]) for i in range(size, len(block), size))
        frames[-1].flags.add("END_HEADERS")
        if end_stream:
            frames[0].flags.add("END_STREAM")
        self._data_to_send += b"".join([f.serialize() for f in frames])

    def send_data(self, stream_id: int, data: Any, end_stream: bool = False, pad_length: Any = None) -> None:
        """h2 4.4's without padding (anything else goes to h2's) and its no-op log calls."""
        stream = self.streams.get(stream_id)
        if stream is None or pad_length is not None or data.__class__ is not bytes:
            super().send_data(stream_id, data, end_stream, pad_length)
            return
        size = len(data)
        if size > 0 and size > min(self.outbound_flow_control_window, stream.outbound_flow_control_window):
            raise h2.exceptions.FlowControlError(f"Cannot send {size} bytes, flow control window is too small")
        if size > self.max_outbound_frame_size:
            raise h2.exceptions.FrameTooLargeError(f"Cannot send frame size {size}")
        if self.state_machine.state is not _SERVER_OPEN:
            self.state_machine.process_input(_SEND_DATA)
        sm = stream.state_machine  # (h2.stream.H2Stream.send_data)
        sm.process_input(_SEND_STREAM_DATA)
        if end_stream:
            sm.process_input(_SEND_END_STREAM)
        stream.outbound_flow_control_window -= size
        f = self._data_out[end_stream]
        f.stream_id = stream_id
        f.data = data
        self._data_to_send += f.serialize()
        f.data = b""  # (not kept: it may be a large frame)
        self.outbound_flow_control_window -= size

    def _receive_headers_frame(self, frame: Any) -> tuple[list[Any], list[h2.events.Event]]:
        """h2 4.4's, for a request's HEADERS opening a new stream without priority information
        (anything else goes to h2's): the same checks, state transitions and events, without what
        this configuration leaves unused (validation flags and a pass over the fields, off here)."""
        sid = frame.stream_id
        flags = frame.flags
        if sid in self.streams or "PRIORITY" in flags:
            return super()._receive_headers_frame(frame)
        if self.open_inbound_streams + 1 > self.local_settings.max_concurrent_streams:
            raise h2.exceptions.TooManyStreamsError(
                f"Max inbound streams is {self.local_settings.max_concurrent_streams}"
            )
        headers = h2.connection._decode_headers(self.decoder, frame.data)
        events = [] if self.state_machine.state is _SERVER_OPEN else self.state_machine.process_input(_RECV_HEADERS)
        stream = self._begin_new_stream(sid, _CLIENT_STREAMS)
        for n, v in headers:  # (h2.utilities.is_informational_response: then h2's own path fails it)
            if n[:1] != b":":
                break
            if n == b":status":
                if v[:1] == b"1":
                    end = "END_STREAM" in flags
                    return stream.receive_headers(headers, end, self.config.header_encoding)
                break
        sm = stream.state_machine
        stream_events: list[Any] = sm.process_input(_RECV_STREAM_HEADERS)
        if "END_STREAM" in flags:
            ended = sm.process_input(_RECV_END_STREAM)
            stream_events[0].stream_ended = ended[0]
            stream_events += ended
        stream._initialize_content_length(headers)
        stream_events[0].headers = headers  # (not copied: the decoder's list, read only, see H2Connection._request)
        return [], events + stream_events

    def _receive_frame(self, frame: Any) -> list[h2.events.Event]:
        """h2 4.4's, without the ``repr`` of every frame it builds for a no-op trace log; and counting
        the frames that ask for nothing, which h2 processes at a cost and the caller budgets
        (CVE-2019-9513, CVE-2019-9518): ``stream_updates`` (a client gives window back for DATA it
        received; more is a flood), ``gone_data`` (DATA the client sent before it learnt that the
        gateway had ended the stream, RFC 9113 §5.1: expected, up to a point), ``idle_frames``:
        PRIORITY frames (§5.3.2 deprecates them; one in a request's HEADERS is not counted), frames
        of an extension h2 does not know (§5.5: ignored), empty DATA frames that do not end their
        stream, and any other frame h2 took without an event (a RST_STREAM for a stream that is
        gone, ALTSVC from a client)."""
        events: list[h2.events.Event]
        try:
            frames, events = self._frame_dispatch_table[frame.__class__](frame)
        except h2.exceptions.StreamClosedError as e:
            if self._stream_is_closed_by_reset(e.stream_id):
                f = RstStreamFrame(e.stream_id)
                f.error_code = e.error_code
                self._prepare_for_sending([f])
                events = e._events
            else:
                raise
        except h2.exceptions.StreamIDTooLowError as e:
            if self._stream_is_closed_by_reset(e.stream_id):
                f = RstStreamFrame(e.stream_id)
                f.error_code = h2.errors.ErrorCodes.STREAM_CLOSED
                self._prepare_for_sending([f])
                events = []
            elif self._stream_is_closed_by_end(e.stream_id):
                raise h2.exceptions.StreamClosedError(e.stream_id) from e
            else:
                raise
        else:
            self._prepare_for_sending(frames)
        cls = frame.__class__
        if cls is HeadersFrame and events:  # (a request: the common case)
            return events
        if cls is DataFrame:
            if not frame.data:
                if "END_STREAM" not in frame.flags:
                    self.idle_frames += 1
            elif not events:
                self.gone_data += 1
        elif cls is WindowUpdateFrame:
            if frame.stream_id:
                self.stream_updates += 1
        elif not events or cls is PriorityFrame or cls is ExtensionFrame:
            self.idle_frames += 1
        return events


def server_config() -> h2.config.H2Configuration:
    return h2.config.H2Configuration(
        client_side=False,
        header_encoding=None,
        validate_inbound_headers=False,  # h2map.py checks, once, while it builds the HTTP/1.1 head
        normalize_inbound_headers=False,
        validate_outbound_headers=False,  # heads the header policy and llhttp already checked
        normalize_outbound_headers=False,
    )
