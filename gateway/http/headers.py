"""The header policy: what is forwarded, removed and added (pure: no I/O; one info log line when a
sandbox tries to set the gateway's own cookie).

Heads pass as the peer wrote them, byte for byte (spelling, order, duplicates, whitespace), except:

Requests (client to sandbox):

- Hop-by-hop fields are removed: Connection and every field it names, Keep-Alive,
  Proxy-Connection, TE and Upgrade (RFC 9110 §7.6.1). Transfer-Encoding stays, because the body is
  passed on in the same chunked coding it arrived in, trailer section included; a sandbox
  connection that carried a trailer field is then never reused (proxy.py), because a server that
  carried trailer fields into its next request (aiohttp did) would hand one client's ``Cookie`` to
  another client's request.
- HTTP/2 request trailers (trailing HEADERS) are forwarded as the chunked body's trailer section
  when the request has no ``content-length`` (h2map.py frames it chunked). A request that has
  ``content-length`` is forwarded with it (the sandbox gets the length the client declared), and
  then its trailers are dropped: a Content-Length body ends at its last byte, no trailer section can
  follow (RFC 9112 §6), and the head has gone before the trailers come. RFC 9110 §6.5.1 expects
  this of intermediaries between versions ("in most cases, the trailers are simply discarded");
  nginx does the same. Each drop is logged at info (the field names) and counted
  (``gateway_request_trailers_dropped_total``). Re-framing such requests as chunked instead would
  take the declared length from every one of them (``te: trailers`` does not announce request
  trailers: RFC 9110 §10.1.4, it accepts response ones), for a case clients hardly produce.
- Of the Upgrade's protocols those in ``upgrade_protocols`` are offered, with ``Connection:
  upgrade`` (RFC 9110 §7.8); none left, the request proceeds as plain HTTP (no h2c). A 101 must
  name one of them (:func:`upgrade_accepted`).
- ``Expect: 100-continue`` is answered by the gateway once the sandbox is connected and is not
  forwarded (RFC 9110 §10.1.1 lets a proxy answer it; the client learns of routing errors before
  it sends the body, and sandbox servers that ignore Expect never stall it).
- X-Forwarded-For gets the client address appended; X-Forwarded-Proto, -Host, -Port and
  Forwarded (RFC 7239) are set. From a peer in ``trusted_proxies`` incoming values are kept
  (For and Forwarded extended); from anyone else they are removed first, so nobody can forge them.
- The client-identity and URL-override fields of ``untrusted_fields`` (X-Real-IP, True-Client-IP,
  X-Original-URL, X-Forwarded-Prefix, ...: what nginx, Envoy, Traefik and CDNs set for the app
  behind them) are removed from requests of peers not in ``trusted_proxies``, kept from those.
- A field spelled with ``_`` where a field the policy acts on has ``-`` (``X_Forwarded_For``) is
  removed whoever sent it, because CGI-style servers (WSGI, Rack, PHP) read ``_`` and ``-`` alike
  and would take it for the field the gateway set or checked; ``Content_Length`` and
  ``Transfer_Encoding`` make the framing ambiguous and are refused.
- The routing fields of shared hosts pass, each exactly once (repeated: ``invalid_routing_header``).
- The request line keeps its method and target byte for byte; the version sent is HTTP/1.1.
- The record's ``mask_request_host`` may replace the Host value (the original is in
  X-Forwarded-Host). Then an ``Origin`` that is the sandbox URL's own origin (the page came from
  this very host) becomes ``{scheme}://{masked host}``, so apps that compare Origin with Host
  (Jupyter's WebSocket check, CSRF guards) see a same-origin request, as they would unmasked; any
  other Origin passes unchanged (RFC 6454 §7: the field names the page's origin, which for the app
  behind the mask is the masked one).
- On private sandboxes, what the gateway consumed as credentials is cut (http/admission.py): the
  access link's query parameter, its own cookie, the token subprotocol.

Responses (sandbox to client): hop-by-hop fields are removed the same way; the gateway states its
own ``Connection`` and, where it re-frames the body (framing.py), ``Transfer-Encoding``: one field,
with the sandbox's codings before ``chunked``. Content-Length and Transfer-Encoding go from 1xx, 204
and 304 responses (RFC 9110 §8.6, RFC 9112 §6.1). The status line's version becomes HTTP/1.1, code
and reason phrase stay.

A ``Set-Cookie`` field that sets the gateway's own cookie (setting ``access_cookie``) is removed from
every response head, final, 1xx and 101, over HTTP/1.1 and HTTP/2, and logged at info: a tenant's app
could otherwise overwrite the visitor's access cookie for its host or plant one (with ``Domain`` set to
the parent domain, for every sandbox's host: a foreign cookie there is refused 403). The name is
compared as a browser reads it (RFC 6265 §5.2): the bytes before the first ``=`` of the part before
the first ``;``, with leading and trailing spaces and tabs removed, case-sensitively (``Name=`` is
another cookie and passes; without ``=`` a field sets no cookie of that name and passes). Every other
``Set-Cookie`` passes byte for byte, in order. A trailer section is forwarded as it is: browsers do not
apply ``Set-Cookie`` from trailer fields (RFC 9110 §6.5.1 lets a recipient process only those it knows
to be safe, and the Fetch standard processes none). Cost: one case-sensitive substring search for the
cookie's name per analysed head (the name compares case-sensitively, so a head without it sets no such
cookie); only a head that holds the name is scanned for its Set-Cookie lines. The name in the head
scan's pattern instead cost every uncached head about 1.8 µs (30 %) more, cookie or not.
A page's script can still set such a cookie (``document.cookie``, which no proxy sees): the
admission takes any valid value among several (http/admission.py), so a planted one shadows nothing.

Framing checks against request smuggling (RFC 9112 §6.1, §6.3): llhttp refuses Content-Length
with Transfer-Encoding and repeated Content-Length; this module refuses any Transfer-Encoding but
exactly ``chunked`` (one field: two are one list, RFC 9110 §5.3), Transfer-Encoding in HTTP/1.0, a
Content-Length that is not ``1*DIGIT``, and more than one Host (RFC 9112 §3.2). A response's
Transfer-Encoding fields are likewise one list, whose last coding decides (RFC 9112 §6.3), and in
which ``chunked`` may only be last (RFC 9112 §6.1: applied once, last). A coding other than chunked
(``gzip``) goes to an HTTP/1.1 client as sent; an HTTP/1.0 or HTTP/2 client, which has no transfer
codings, would get the body still coded with nothing saying so: refused (502, as nginx refuses any).

The method, target and version are taken from the head's first line, which is the request line
llhttp parsed: the framer hands over a head from its first byte that is not CR or LF (llhttp skips
those the same way), never with bytes before it (property-tested against llhttp's own parse).

Cost: a head is scanned once for the fields the policy acts on, and the lines to remove are cut in
one pass over it (with positions found by that scan), so a head's analysis is linear in its size
whatever it holds (a sandbox answering with thousands of hop-by-hop fields once cost seconds when
each removal copied the head).

How fields are found: heads reach this module only after llhttp validated them, so every field
line starts right after a LF, has no whitespace before its colon and holds no CR or LF. One regular
expression finds the few fields the policy acts on; every other field is never looked at (a Python
callback per field costs more than the rest of a request).
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import re
from collections.abc import Callable, Collection
from typing import Any

from gateway import errors
from gateway.errors import Reason
from gateway.hostname import authority_matches
from gateway.http import framing, hdrs

__all__ = [
    "MAX_REQUEST_ID",
    "REPEATED",
    "RESPONSE_FIELDS",
    "FieldRoles",
    "Peer",
    "RequestHead",
    "ResponseHead",
    "analyze_request",
    "analyze_response",
    "edit_fields",
    "find_header",
    "first_field",
    "own_cookie_lines",
    "raw_fields",
    "replace_target",
    "upgrade_accepted",
]

log = logging.getLogger("gateway.headers")

#: The longest received request ID that is kept (from a trusted peer; Heroku's router keeps 20 to
#: 200 characters): a longer one is replaced by one the gateway makes. The ID goes back in every
#: response head, where over HTTP/2 it must fit what the client takes with the sandbox's fields
#: (http2.py measures a head with room for this many bytes of ID, once per head, not per response).
MAX_REQUEST_ID = 200

_CONNECTION_OPTIONS = frozenset({b"close", b"keep-alive", b"upgrade"})
# Fields a Connection header may not remove: honouring "Connection: content-length" would
# desynchronise the two hops, and Host is not a hop-by-hop option.
_NEVER_DROPPED = frozenset({hdrs.HOST, hdrs.CONTENT_LENGTH, hdrs.TRANSFER_ENCODING})

_HOST, _CL, _TE, _CONN, _UPG, _HOP, _EXPECT, _FWD, _TOKEN, _SB_ID, _SB_PORT, _RID, _UNTRUSTED, _ALIAS_FRAMING = range(
    1, 15
)
_ROLES = {
    hdrs.HOST: _HOST,
    hdrs.CONTENT_LENGTH: _CL,
    hdrs.TRANSFER_ENCODING: _TE,
    hdrs.CONNECTION: _CONN,
    hdrs.UPGRADE: _UPG,
    hdrs.KEEP_ALIVE: _HOP,
    hdrs.PROXY_CONNECTION: _HOP,
    hdrs.TE: _HOP,
    hdrs.EXPECT: _EXPECT,
    hdrs.X_FORWARDED_FOR: _FWD,
    hdrs.X_FORWARDED_PROTO: _FWD,
    hdrs.X_FORWARDED_HOST: _FWD,
    hdrs.X_FORWARDED_PORT: _FWD,
    hdrs.FORWARDED: _FWD,
}


def _fields_pattern(names: Collection[bytes], underscores: bool = False) -> re.Pattern[bytes]:
    """A regex finding ``\n{name}: {value}`` for the given field names, case-insensitively.

    The names form a trie (``x-forwarded-(?:for|proto|...)|x-real-ip|...``) behind a lookahead
    on their first letters: the regex engine rejects most lines after one character and never
    tries a shared prefix twice, so the scan costs about the same however many names the policy
    acts on (measured in instructions, docs/development.md).
    With ``underscores``, each ``-`` also matches ``_`` (the spelling CGI-style servers merge with it).
    """
    trie: dict[int, Any] = {}
    for n in names:
        node = trie
        for ch in n.lower():
            node = node.setdefault(ch, {})
        node[-1] = {}  # a name ends here

    def alternatives(node: dict[int, Any]) -> bytes:
        alts = []
        for ch in sorted(k for k in node if k >= 0):
            c = bytes([ch])
            piece = b"[-_]" if c == b"-" and underscores else re.escape(c)
            alts.append(piece + alternatives(node[ch]))
        if not alts:
            return b""
        if len(alts) == 1 and -1 not in node:
            return alts[0]
        return b"(?:" + b"|".join(alts) + b")" + (b"?" if -1 in node else b"")

    # The lookahead: a line whose first letter begins no name fails at one set test, instead of
    # at each of the trie's first branches (sre tries a branch's alternatives one by one): a
    # browser's head, mostly Accept-*, Sec-* and Referer, scans in 20 % fewer instructions.
    letters = {n[:1].lower() for n in names}
    first = re.escape(b"".join(sorted(letters | {c.upper() for c in letters})))
    return re.compile(b"\n(?=[" + first + b"])(" + alternatives(trie) + b"):[ \t]*([^\r]*)", re.IGNORECASE)


class FieldRoles:
    """The fields the policy acts on and what each is, including the configurable ones.

    ``token`` names the traffic-token field, ``sandbox_id``/``sandbox_port`` the routing fields of
    shared hosts; ``upgrade_protocols`` the Upgrade tokens that may be tunnelled; ``request_id`` the
    request ID field (empty: none). A received request ID is always cut from the head: the proxy
    appends the one it uses (the received one only from a trusted peer, and only up to
    :data:`MAX_REQUEST_ID` bytes). ``untrusted`` names the
    client-identity and URL-override fields removed from requests of untrusted peers (a name the
    policy already acts on keeps its role). ``underscores``: a field spelled with ``_`` where one of
    these names has ``-`` is found too (requests only; see :func:`analyze_request`).
    """

    __slots__ = ("pattern", "roles", "spellings", "upgrade_protocols")

    def __init__(
        self,
        token: bytes = b"e2b-traffic-access-token",
        sandbox_id: bytes = b"e2b-sandbox-id",
        sandbox_port: bytes = b"e2b-sandbox-port",
        upgrade_protocols: Collection[bytes] = (b"websocket",),
        request_id: bytes = b"x-request-id",
        untrusted: Collection[bytes] = hdrs.UNTRUSTED,
        underscores: bool = True,
    ) -> None:
        self.roles = {**_ROLES, token.lower(): _TOKEN, sandbox_id.lower(): _SB_ID, sandbox_port.lower(): _SB_PORT}
        if request_id:
            self.roles[request_id.lower()] = _RID
        for n in untrusted:
            self.roles.setdefault(n.lower().replace(b"_", b"-"), _UNTRUSTED)
        self.pattern = _fields_pattern(list(self.roles), underscores)
        # The spellings peers use, so most names need no lower-casing.
        self.spellings = {**self.roles, **{k.title(): v for k, v in self.roles.items()}, b"TE": _HOP}
        self.upgrade_protocols = frozenset(upgrade_protocols)


RESPONSE_FIELDS = FieldRoles(request_id=b"", untrusted=(), underscores=False)

Field = tuple[bytes, bytes]


def _tokens(value: bytes) -> list[bytes]:
    return [t.strip(b" \t").lower() for t in value.split(b",")]


def _alias(roles: dict[bytes, int], name: bytes) -> int:
    """The role of a field the pattern found under an underscore spelling (``X_Forwarded_For``).

    CGI-style servers (WSGI, Rack, PHP, nginx's ``$http_*``) read ``_`` and ``-`` as the same
    character, so such a field would reach the app as the field the gateway checked or set,
    unchecked: one of Content-Length or Transfer-Encoding makes the framing ambiguous (refused),
    any other is removed, whoever sent it (a trusted proxy writes the ``-`` spelling)."""
    role = roles.get(name.lower().replace(b"_", b"-"))
    # None: a configured name that has ``_`` in it, spelt with another mix of ``_`` and ``-``
    return _ALIAS_FRAMING if role in (_CL, _TE) else _HOP


def raw_fields(raw: bytes) -> list[Field]:
    """Every field of a head that llhttp has validated, in order (for the rare paths that need all)."""
    out = []
    for line in raw.split(b"\r\n")[1:]:
        if not line:
            break
        name, _, value = line.partition(b":")
        out.append((name, value.strip(b" \t")))
    return out


def find_header(headers: list[Field], lname: bytes) -> bytes | None:
    """The first value of the field ``lname`` (lower case), for the rare paths that need one."""
    for n, v in headers:
        if n.lower() == lname:
            return v
    return None


Span = tuple[int, int]
#: The value a routing field stands for when it was sent more than once: no valid value (llhttp
#: refuses NUL in a field), so the route is refused as ``invalid_routing_header``.
REPEATED: bytes = b"\x00"
#: Every field line, for the rare heads whose Connection field names others: (line start, end, name).
_FIELD_LINE = re.compile(rb"\n([^:\r\n]*):[^\r\n]*")


@functools.cache
def _field_line(lname: bytes) -> re.Pattern[bytes]:
    return re.compile(b"\r\n(" + re.escape(lname) + b"):[ \t]*([^\r]*)", re.IGNORECASE)


def edit_fields(raw: bytes, lname: bytes, edit: Callable[[bytes], bytes | None]) -> bytes:
    """``raw`` with the value of every ``lname`` field replaced by ``edit(value)``; None removes
    the line. Lines ``edit`` returns unchanged keep their bytes."""
    out: list[bytes] = []
    pos = 0
    for m in _field_line(lname).finditer(raw):
        value = m.group(2).rstrip(b" \t")
        new = edit(value)
        if new is None:
            out.append(raw[pos : m.start()])  # the line's leading CRLF goes with it
            pos = m.start(2) + len(value)
            pos = raw.index(b"\r\n", pos)
        elif new != value:
            out += (raw[pos : m.start(2)], new)
            pos = m.start(2) + len(value)
    if not out:
        return raw
    out.append(raw[pos:])
    return b"".join(out)


def first_field(raw: bytes, lname: bytes) -> bytes | None:
    """The first value of field ``lname`` in a head, found by one regex search (no parse)."""
    m = _field_line(lname).search(raw)
    return None if m is None else m.group(2).rstrip(b" \t")


def replace_target(raw: bytes, target: bytes) -> bytes:
    """``raw`` with another request target (method and version as they were)."""
    start = raw.index(b" ") + 1
    end = raw.index(b" ", start)
    return raw[:start] + target + raw[end:]


_ORIGIN = _field_line(hdrs.ORIGIN)


def _mask_origin(raw: bytes, original: bytes, masked: bytes) -> bytes:
    """``raw`` with an Origin that is ``original``'s own origin rewritten to ``masked``'s."""
    m = _ORIGIN.search(raw)
    if m is None:
        return raw
    value = m.group(2).rstrip(b" \t")
    if authority_matches(value, original) is not True or value.find(b"/", value.find(b"://") + 3) >= 0:
        return raw  # another origin (or not an origin at all): unchanged
    scheme = value[: value.find(b"://")]
    return raw[: m.start(2)] + scheme + b"://" + masked + raw[m.start(2) + len(value) :]


def _edit(raw: bytes, edits: list[tuple[int, int, bytes]]) -> bytes:
    """``raw`` with each ``raw[start:end]`` replaced, in one pass (edits do not overlap)."""
    edits.sort()
    out = []
    prev = 0
    for start, end, replacement in edits:
        if start < prev:  # the same line twice (a field both hop-by-hop and named by Connection)
            continue
        out.append(raw[prev:start])
        out.append(replacement)
        prev = end
    out.append(raw[prev:])
    return b"".join(out)


def _line(m: re.Match[bytes]) -> Span:
    """The span of a matched field line, CRLF before it included: cutting it leaves the head whole."""
    return m.start() - 1, m.end()


class Peer:
    """Who is on the other end of a client connection, computed once per connection."""

    __slots__ = ("for_node", "fwd_pre", "ip", "port", "proto", "trusted")

    def __init__(self, ip: str, trusted: bool, proto: bytes, port: bytes) -> None:
        self.ip = ip
        self.trusted = trusted
        self.proto = proto
        self.port = port
        # This peer as an RFC 7239 §6 node: IPv6 in brackets, quoted.
        self.for_node = f'"[{ip}]"'.encode() if ":" in ip else ip.encode()
        # What every request from this peer gets, up to the per-request Host.
        self.fwd_pre = b"".join(
            (b"X-Forwarded-For: ", ip.encode(), b"\r\nX-Forwarded-Proto: ", proto, b"\r\nX-Forwarded-Port: ", port,
             b"\r\nForwarded: for=", self.for_node, b";proto=", proto, b';host="')
        )  # fmt: skip

    @staticmethod
    def make(
        ip: str,
        listen_port: int,
        tls: bool,
        trusted: Collection[ipaddress.IPv4Network | ipaddress.IPv6Network],
    ) -> Peer:
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            is_trusted = False
        else:
            if addr.version == 6 and addr.ipv4_mapped is not None:
                addr = addr.ipv4_mapped
                ip = str(addr)
            is_trusted = any(addr in net for net in trusted)
        return Peer(ip, is_trusted, b"https" if tls else b"http", str(listen_port).encode())


def _quoted(v: bytes) -> bytes:
    """An RFC 7239 value as a quoted-string (RFC 9110 §5.6.4)."""
    return b'"' + v.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


class RequestHead:
    """A request head as received, what the policy learned from it, and how to send it upstream."""

    __slots__ = (
        "body",
        "content_length",
        "cuts",
        "expect_continue",
        "forwarding",
        "host",
        "host_span",
        "http10",
        "keep_alive",
        "log_part",
        "method",
        "raw",
        "repeatable",
        "request_id",
        "rid_pre",
        "route_id",
        "route_port",
        "target",
        "token",
        "untrusted",
        "upgrade",
        "upstream",
    )

    def __init__(self, raw: bytes, method: bytes, target: bytes) -> None:
        self.raw = raw
        self.method = method
        self.target = target
        self.http10 = False
        self.host: bytes | None = None
        self.host_span: Span | None = None  # where the Host value is (after its colon, to the CRLF)
        self.body = framing.NONE
        self.content_length = 0
        self.keep_alive = True
        self.expect_continue = False
        self.upgrade: bytes | None = None
        self.cuts: list[Span] | None = None  # field lines to remove
        self.untrusted: list[Span] | None = None  # untrusted_fields lines (in cuts; kept for trusted peers)
        self.forwarding: list[Field] | None = None  # X-Forwarded-*/Forwarded received
        self.token: bytes | None = None  # the traffic token presented (never forwarded)
        self.request_id: bytes | None = None  # the request ID received (forwarded by the proxy if trusted)
        self.rid_pre: tuple[bytes | None, bytes] | None = None  # (Host sent, head up to a request ID value)
        self.log_part: str | None = None  # method, host and path as the access log writes them
        self.route_id: bytes | None = None  # the routing fields (shared hosts)
        self.route_port: bytes | None = None
        self.upstream: tuple[bytes | None, bytes] | None = None  # (host, upstream_head(peer, host))
        # A complete message in its head alone, after which llhttp is back at the start of the next
        # one: the same bytes again on the connection need no second parse (downstream.py).
        self.repeatable = False

    def upstream_head(self, peer: Peer, host: bytes | None = None) -> bytes:
        """The head to send upstream; ``host`` replaces the Host value (mask_request_host).

        Remembered for the last ``host``: a connection's requests come from one peer, and a head
        that repeats on a connection (polling, health checks) is analysed and built once.
        """
        up = self.upstream
        if up is not None and up[0] == host:
            return up[1]
        head = self._upstream_head(peer, host)
        self.upstream = (host, head)
        return head

    def _upstream_head(self, peer: Peer, host: bytes | None) -> bytes:
        raw = self.raw
        original = self.host or b""
        if self.cuts is None and host is None and not self.http10 and self.upgrade is None:
            # The common case: the head as received, plus the forwarding fields, in one join.
            return b"".join((raw[:-2], peer.fwd_pre, original, b'"\r\nX-Forwarded-Host: ', original, b"\r\n\r\n"))
        cuts = self.cuts or ()
        if peer.trusted and self.untrusted is not None:
            cuts = _keep(cuts, self.untrusted)
        edits = [(a, b, b"") for a, b in cuts]
        if self.http10:
            eol = raw.find(b"\r\n")
            edits.append((eol - 3, eol, b"1.1"))
        if host is not None and self.host_span is not None:
            edits.append((self.host_span[0], self.host_span[1], b" " + host))
        raw = _edit(raw, edits)
        if host is not None and self.host_span is not None:
            raw = _mask_origin(raw, original, host)
        if self.upgrade is not None:
            raw = raw[:-2] + b"Connection: upgrade\r\nUpgrade: " + self.upgrade + b"\r\n\r\n"
        if self.forwarding is None or not peer.trusted:
            return b"".join((raw[:-2], peer.fwd_pre, original, b'"\r\nX-Forwarded-Host: ', original, b"\r\n\r\n"))
        return raw[:-2] + _trusted_forwarding(self.forwarding, peer, original) + b"\r\n"


def _keep(cuts: Collection[Span], kept: list[Span]) -> list[Span]:
    """``cuts`` without the lines of ``kept`` (the untrusted_fields of a trusted peer), in one pass.

    Each kept line leaves ``cuts`` once: a line cut again for another reason (a field the
    Connection field names is hop-by-hop whoever sent it, RFC 9110 §7.6.1) stays cut."""
    left = set(kept)
    out = []
    for c in cuts:
        if c in left:
            left.discard(c)
        else:
            out.append(c)
    return out


def _trusted_forwarding(received: list[Field], peer: Peer, host: bytes) -> bytes:
    """Forwarding fields for a request from a trusted proxy: its values kept, ours appended."""
    xff = [v for n, v in received if n.lower() == hdrs.X_FORWARDED_FOR]
    fwd = [v for n, v in received if n.lower() == hdrs.FORWARDED]
    first = {n.lower(): v for n, v in reversed(received)}
    node = b"for=" + peer.for_node + b";proto=" + peer.proto + b";host=" + _quoted(host)
    out = [
        b"X-Forwarded-For: " + b", ".join([*xff, peer.ip.encode()]),
        b"X-Forwarded-Proto: " + first.get(hdrs.X_FORWARDED_PROTO, peer.proto),
        b"X-Forwarded-Port: " + first.get(hdrs.X_FORWARDED_PORT, peer.port),
        b"Forwarded: " + b", ".join([*fwd, node]),
        b"X-Forwarded-Host: " + first.get(hdrs.X_FORWARDED_HOST, host),
    ]
    return b"\r\n".join(out) + b"\r\n"


def analyze_request(raw: bytes, fields: FieldRoles) -> RequestHead | Reason:
    """Check a request head that llhttp has validated and decide what to forward."""
    eol = raw.find(b"\n")
    if eol < 1 or raw[eol - 1] != 13 or raw.find(b"\r", 0, eol - 1) >= 0:  # 13: CR
        # llhttp ends a request line at a bare LF (``GET /a\nX:y HTTP/1.1`` is, to it, an HTTP/0.9
        # line and a field X): the gateway would read another target and version than llhttp did,
        # and a sandbox that also ends lines at LF would see a field the policy never saw. A bare CR
        # in the line (llhttp refuses it too) or before it (the framer skips empty lines before a
        # head: this head was built by a caller) is refused as well, never a method ``\rGET``.
        return errors.MALFORMED_REQUEST
    line = raw[: eol - 1].split(b" ")
    if len(line) != 3 or not line[1]:
        # Two spaces before the version (``CONNECT  HTTP/1.1``): llhttp skips spaces before a target
        # and takes ``HTTP/1.1`` for it; no request-target is empty (RFC 9112 §3.2). Found by make fuzz.
        return errors.MALFORMED_REQUEST
    r = RequestHead(raw, line[0], line[1])
    if line[2] != b"HTTP/1.1":
        if line[2] != b"HTTP/1.0":
            return errors.MALFORMED_REQUEST
        r.http10 = True
        r.keep_alive = False
    te: bytes | None = None
    cl: bytes | None = None
    conn: list[bytes] | None = None
    upgrade: list[bytes] | None = None
    cuts: list[Span] = []
    fwd: list[Field] | None = None
    untrusted: list[Span] | None = None
    spellings = fields.spellings
    roles = fields.roles
    for m in fields.pattern.finditer(raw):
        name, found = m.groups()
        role = spellings.get(name) or roles.get(name.lower()) or _alias(roles, name)
        value = found.rstrip(b" \t")
        if role == _HOST:
            if r.host is not None:
                return errors.INVALID_HOST
            r.host = value
            r.host_span = (m.start(1) + len(name) + 1, m.end())
        elif role == _CL:
            if cl is not None or not value.isdigit():  # 1*DIGIT, once (RFC 9112 §6.2)
                return errors.INVALID_FRAMING
            cl = value
        elif role == _TE:
            if te is not None:  # two fields are one list: not exactly "chunked"
                return errors.INVALID_FRAMING
            te = value
        elif role == _CONN:
            if conn is None:
                conn = []
            conn += [value.lower()] if b"," not in value else _tokens(value)
            cuts.append(_line(m))
        elif role == _UPG:
            if upgrade is None:
                upgrade = []
            upgrade += [t.strip(b" \t") for t in value.split(b",")]  # several fields: one list (RFC 9110 §5.3)
            cuts.append(_line(m))
        elif role == _EXPECT:
            if value.lower() == b"100-continue":
                r.expect_continue = True
                cuts.append(_line(m))
        elif role == _FWD:
            if fwd is None:
                fwd = []
            fwd.append((name, value))
            cuts.append(_line(m))
        elif role == _TOKEN:
            if r.token is None:
                r.token = value
            cuts.append(_line(m))
        elif role == _RID:
            if r.request_id is None and len(value) <= MAX_REQUEST_ID:
                r.request_id = value
            cuts.append(_line(m))
        elif role == _SB_ID:
            r.route_id = value if r.route_id is None else REPEATED
        elif role == _SB_PORT:
            r.route_port = value if r.route_port is None else REPEATED
        elif role == _UNTRUSTED:
            span = _line(m)
            if untrusted is None:
                untrusted = []
            untrusted.append(span)
            cuts.append(span)
        elif role == _ALIAS_FRAMING:
            return errors.INVALID_FRAMING
        else:  # Keep-Alive, Proxy-Connection, TE, an underscore spelling
            cuts.append(_line(m))
    if cl is not None:
        r.content_length = int(cl)
        if r.content_length:
            r.body = framing.LENGTH
    if te is not None:
        if r.http10 or te.lower() != b"chunked":
            return errors.INVALID_FRAMING
        r.body = framing.CHUNKED
    if conn is not None:
        if r.http10:
            r.keep_alive = b"keep-alive" in conn
        else:
            r.keep_alive = b"close" not in conn
        if upgrade is not None and b"upgrade" in conn:
            # Only the protocols the gateway may tunnel are offered to the sandbox (RFC 9110 §7.8:
            # the 101 then names one of them, checked by upgrade_accepted).
            allowed = [t for t in upgrade if t.split(b"/")[0].lower() in fields.upgrade_protocols]
            if allowed:
                r.upgrade = b", ".join(allowed)
        if not _CONNECTION_OPTIONS.issuperset(conn):
            _named_by_connection(raw, conn, cuts)
    r.cuts = cuts or None
    r.untrusted = untrusted
    r.forwarding = fwd
    r.repeatable = r.body == framing.NONE and r.keep_alive and not r.http10 and upgrade is None
    return r


def _named_by_connection(raw: bytes, conn: list[bytes], cuts: list[Span]) -> None:
    """Add the lines of the fields a Connection header names (RFC 9110 §7.6.1) to ``cuts``."""
    named = {t for t in conn if t and t not in _CONNECTION_OPTIONS and t not in _NEVER_DROPPED}
    if named:
        cuts += [_line(m) for m in _FIELD_LINE.finditer(raw) if m.group(1).lower() in named]


#: What analyze_response decides: (head for the client, body framing from the sandbox, body
#: framing to the client, Content-Length, client connection stays open, upstream reusable).
ResponseHead = tuple[bytes, int, int, int, bool, bool]


_SET_COOKIE = _field_line(hdrs.SET_COOKIE)


def _sets_cookie(value: bytes, cookie: bytes) -> bool:
    """Whether a ``Set-Cookie`` value sets the cookie named ``cookie``, as a browser parses a
    set-cookie-string (RFC 6265 §5.2): the name-value pair is what precedes the first ``;``; it
    sets no cookie of a name without ``=``; the name is what precedes the first ``=``, without
    leading or trailing spaces and tabs; names compare case-sensitively."""
    name, eq, _ = value.partition(b";")[0].partition(b"=")
    return bool(eq) and name.strip(b" \t") == cookie


def own_cookie_lines(raw: bytes, cookie: bytes) -> list[Span]:
    """The spans (CRLF before them included) of the ``Set-Cookie`` lines of a head that set the
    cookie named ``cookie`` (:func:`_sets_cookie`): what :func:`analyze_response` removes."""
    return [(m.start(), m.end()) for m in _SET_COOKIE.finditer(raw) if _sets_cookie(m.group(2), cookie)]


def analyze_response(
    raw: bytes,
    status: int,
    head_request: bool,
    client_http10: bool,
    client_keep_alive: bool,
    own_cookie: bytes,
) -> ResponseHead:
    """Decide framing both ways (RFC 9112 §6.3) and the head the client gets.

    ``client_keep_alive`` is what the request allows; the result says whether the client
    connection stays open after this response and whether the upstream one can be reused.
    ``own_cookie`` is the gateway's cookie name (``access_cookie``; empty: none): a ``Set-Cookie``
    of that name is removed (:func:`own_cookie_lines`).
    Raises :class:`~gateway.http.framing.FramingError` for a Content-Length that is not one
    ``1*DIGIT`` (llhttp refuses those first), and for a Transfer-Encoding list in which chunked is
    not only the last coding (RFC 9112 §6.1: never applied twice, and last when applied).

    The client gets at most one Transfer-Encoding field: where the gateway re-frames a body as
    chunked, the sandbox's codings and ``chunked`` in one field; several fields merged into one;
    none for an HTTP/1.0 client (RFC 9112 §6.1). A response without a body by its status (1xx,
    204, 304) keeps no Content-Length or Transfer-Encoding (RFC 9110 §8.6, RFC 9112 §6.1).
    """
    content_length = -1
    cl_line: re.Match[bytes] | None = None
    te: list[bytes] | None = None  # the codings of every Transfer-Encoding field, in order
    te_lines: list[Span] = []
    conn: list[bytes] | None = None
    cuts: list[Span] = []
    mine: list[Span] | None = None  # Set-Cookie lines of the gateway's own cookie
    fields = RESPONSE_FIELDS
    for m in fields.pattern.finditer(raw):
        name, found = m.groups()
        role = fields.spellings.get(name) or fields.roles[name.lower()]
        value = found.rstrip(b" \t")
        if role == _CL:
            if content_length >= 0 or not value.isdigit():
                raise framing.FramingError(framing.FRAMING, "Content-Length is not one 1*DIGIT")
            content_length = int(value)
            cl_line = m
        elif role == _CONN:
            if conn is None:
                conn = []
            conn += [value.lower()] if b"," not in value else _tokens(value)
            cuts.append(_line(m))
        elif role == _TE:
            if te is None:
                te = []
            te += _tokens(value)
            te_lines.append(_line(m))
        elif role == _HOP or (role == _UPG and status != 101):
            cuts.append(_line(m))
    # Framing (RFC 9112 §6.3): no body for HEAD, 1xx, 204, 304; chunked if it is the last coding;
    # Content-Length; else until close. Chunked goes to HTTP/1.0 clients de-chunked and
    # close-delimited; close-delimited goes to HTTP/1.1 clients chunked, so they keep the connection.
    te_out = b""  # the one Transfer-Encoding field the gateway writes instead of the sandbox's
    if status < 200 or status in (204, 304):
        body_in = body_out = framing.NONE
        cuts += te_lines
        if cl_line is not None:
            cuts.append(_line(cl_line))
    elif te is not None:
        if head_request:  # the fields describe the GET's response (RFC 9110 §9.3.2)
            body_in = body_out = framing.NONE
        elif b"chunked" in te[:-1]:
            raise framing.FramingError(framing.FRAMING, "chunked is not only the last transfer coding")
        elif client_http10 and te != [b"chunked"]:
            # An HTTP/1.0 client has no transfer codings (RFC 9112 §6.1), an HTTP/2 client neither
            # (RFC 9113 §8.2.2); the gateway takes chunked off and decodes no other coding: the body
            # would reach the client still coded, and nothing would say so.
            raise framing.FramingError(framing.FRAMING, "a transfer coding other than chunked, to a client without any")
        elif te[-1] != b"chunked":
            body_in = framing.CLOSE
            body_out = framing.CLOSE if client_http10 else framing.CHUNKED
            if not client_http10:
                te_out = b"Transfer-Encoding: " + b", ".join([*te, b"chunked"]) + b"\r\n"
        else:
            body_in = framing.CHUNKED
            body_out = framing.CLOSE if client_http10 else framing.CHUNKED
        if client_http10 or te_out:
            cuts += te_lines
        elif len(te_lines) > 1:  # several fields: one list (RFC 9110 §5.3), sent as one field
            cuts += te_lines
            te_out = b"Transfer-Encoding: " + b", ".join(te) + b"\r\n"
    elif head_request:
        body_in = body_out = framing.NONE
    elif content_length >= 0:
        body_in = body_out = framing.LENGTH
    else:
        body_in = framing.CLOSE
        body_out = framing.CLOSE if client_http10 else framing.CHUNKED
        if not client_http10:
            te_out = b"Transfer-Encoding: chunked\r\n"
    keep_alive = client_keep_alive and body_out != framing.CLOSE and status != 101
    upstream11 = raw[5:8] == b"1.1"
    if body_in == framing.CLOSE or status == 101:
        reusable = False
    elif conn is None:
        reusable = upstream11
    else:
        reusable = b"close" not in conn if upstream11 else b"keep-alive" in conn
    if conn is not None and not _CONNECTION_OPTIONS.issuperset(conn):
        _named_by_connection(raw, conn, cuts)
    if own_cookie and own_cookie in raw:  # (case-sensitive, as the name compares: RFC 6265 §5.2)
        mine = own_cookie_lines(raw, own_cookie) or None
    if mine is not None:
        log.info(
            "removed %d Set-Cookie field(s) for the gateway's own cookie %r from a sandbox's %d response",
            len(mine), own_cookie.decode("latin-1"), status,
        )  # fmt: skip
        cuts += mine
    if cuts:
        raw = _edit(raw, [(a, b, b"") for a, b in cuts])
    if not upstream11:
        raw = b"HTTP/1.1" + raw[8:]
    if status == 101:
        return raw[:-2] + b"Connection: upgrade\r\n\r\n", body_in, body_out, 0, False, False
    if keep_alive:
        if client_http10:
            te_out += b"Connection: keep-alive\r\n"
    elif status >= 200:
        te_out += b"Connection: close\r\n"
    if te_out:
        raw = raw[:-2] + te_out + b"\r\n"
    return raw, body_in, body_out, max(content_length, 0), keep_alive, reusable


def upgrade_accepted(offered: bytes, head: bytes) -> bytes | None:
    """The protocol a 101 response ``head`` switches to, when it is one the request ``offered``
    (the allowed tokens it sent upstream); else None (RFC 9110 §7.8, §15.2.2: the server switches
    to a protocol the client asked for, named in its Upgrade field; one here, since the tunnel
    carries one protocol). Names compare case-insensitively, versions when both give one."""
    answered = [t for n, v in raw_fields(head) if n.lower() == hdrs.UPGRADE for t in _tokens(v)]
    if len(answered) != 1 or not answered[0]:
        return None
    name, _, version = answered[0].partition(b"/")
    for t in _tokens(offered):
        n, _, v = t.partition(b"/")
        if n == name and (not v or not version or v == version):
            return name
    return None
