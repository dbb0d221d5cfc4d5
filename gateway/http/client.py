"""What an exchange needs of its client: the one interface an HTTP/1.1 connection and an HTTP/2 stream
both implement.

The request path (route, look up, policy, admission, header rewrite, upstream, retries) is written
once, in :class:`~gateway.http.proxy.Exchange`; what differs between the protocols is how a response
reaches the client. An HTTP/1.1 connection (downstream.py) writes the sandbox's head and body bytes
to its socket, chunking or de-chunking where the hops differ; an HTTP/2 stream (http2.py) maps the
head to a HEADERS frame and the body to DATA frames on its stream. Both receive the same calls:

- ``send_continue`` (the gateway's ``100 Continue``), ``send_interim`` (a 1xx from the sandbox),
  ``send_head`` (the final response head, as the sandbox sent it: the client side decides the
  framing towards its client and tells the exchange how the sandbox frames the body);
- ``send_body`` (pieces of body, written now), ``send_last`` (the last pieces: the response is
  complete), ``answer`` (the gateway's own whole response, as ``errors.render`` makes it);
- ``exchange_done`` (the exchange is over; an HTTP/1.1 connection serves its next request),
  ``reset`` (a response cut short must never look complete: RST for TCP, RST_STREAM for a stream);
- ``pause_reading``/``resume_reading`` with a reason bit from flow.py (the sandbox side is busy, a
  body is buffered while connecting): a TCP connection stops reading its socket, a stream stops
  granting flow-control window;
- ``become_tunnel``: the sandbox accepted an Upgrade; the client side turns into a byte tunnel.

Pingora's request phases are the picture: :meth:`Exchange._end` is the one place where every
exchange ends (its ``logging()`` phase), whatever the protocol.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from gateway.http.context import Context
    from gateway.http.headers import Peer
    from gateway.http.proxy import Exchange
    from gateway.http.upstream import UpstreamConnection

__all__ = ["H1", "H2", "ClientSide"]

#: ``ClientSide.protocol`` (the ALPN identifiers): compared by identity on the hot path.
H1 = "http/1.1"
H2 = "h2"


class ClientSide(Protocol):
    """The client of an exchange: an HTTP/1.1 connection, or one stream of an HTTP/2 connection."""

    @property
    def ctx(self) -> Context: ...

    @property
    def peer(self) -> Peer: ...

    @property
    def protocol(self) -> str:
        """ "http/1.1" or "h2": the access log's and the metrics' ``protocol``."""

    @property
    def write_paused(self) -> bool:
        """The client cannot take more bytes now (its socket buffer is full)."""

    @property
    def in_feed(self) -> bool:
        """Request bytes are being delivered: the exchange's upstream writes wait for the batch's end."""

    def pause_reading(self, reason: int) -> None: ...

    def resume_reading(self, reason: int) -> None: ...

    def send_continue(self, x: Exchange) -> None: ...

    def send_interim(self, x: Exchange, head: bytes, status: int) -> None: ...

    def send_head(self, x: Exchange, up: UpstreamConnection, head: bytes, status: int) -> tuple[int, int]: ...

    def send_body(self, x: Exchange, pieces: list[bytes]) -> None: ...

    def send_last(self, x: Exchange, pieces: list[bytes]) -> None:
        """The end of the response. Raises framing.FramingError, having sent nothing, when the end
        cannot reach this client as the sandbox sent it (trailers past an HTTP/2 client's limit)."""

    def answer(self, x: Exchange, out: bytes, keep_alive: bool) -> None: ...

    def exchange_done(self, x: Exchange, keep_alive: bool) -> None: ...

    def reset(self) -> None: ...

    def become_tunnel(
        self, x: Exchange, up: UpstreamConnection, head: bytes, rest: bytes, early: bytes, websocket: bool
    ) -> None: ...
