"""Nothing ambiguous crosses the gateway, in either direction (issue 10).

Every case runs against real peers on loopback: raw-socket clients that send exactly the bytes an
attacker would, raw-socket sandboxes that record every byte they receive (or answer what a broken or
hostile app would), and, where a real server's behaviour was the finding, that server (aiohttp).
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import h2.errors
import h2.events
import pytest
from aiohttp import web

from tests.conftest import WAIT, Catalog, free_port
from tests.h2client import H2Client
from tests.helpers import Client, RawUpstream, UpstreamConn, echo_handler, read_response, request, response

# ---- 1. request trailers never reach another client's request


def recorder(seen: list[tuple[bytes, bytes]]) -> Any:
    """A sandbox that records each request (head, raw body) and answers 200, keeping the connection."""

    async def sandbox(c: UpstreamConn) -> None:
        while True:
            head, body = await c.read_request()
            seen.append((head, body))
            c.send(response(200, b"ok"))

    return sandbox


#: What the gateway adds to a forwarded head (and nothing else).
ADDED = {b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-port", b"forwarded", b"x-forwarded-host",
         b"x-request-id"}  # fmt: skip


def own_request(received: bytes, sent: bytes) -> None:
    """``received`` (a head as the sandbox read it) is ``sent`` byte for byte, plus only the fields
    the gateway adds."""
    assert received.startswith(sent[:-2]), (received, sent)
    added = received[len(sent) - 2 : -4].split(b"\r\n")
    assert {line.partition(b":")[0].lower() for line in added} <= ADDED, added


async def send_with_trailers(gw: Any, host: str, protocol: str, trailers: list[tuple[str, str]]) -> bytes:
    """Client A: a chunked POST (over HTTP/2, DATA of unknown length then trailing HEADERS) with
    ``trailers``; returns the trailer section the sandbox must receive. Waits for A's response."""
    section = "".join(f"{n}: {v}\r\n" for n, v in trailers).encode() + b"\r\n"
    if protocol == "h2":
        c = await H2Client.connect(gw.port)
        sid = c.start(host, "/a", method="POST", body=b"hello", end=False)
        if trailers:
            c.conn.send_headers(sid, [(n.lower().encode(), v.encode()) for n, v in trailers], end_stream=True)
        else:
            c.conn.end_stream(sid)
        c.flush()
        r = await c.response(sid)
        assert r.status == 200 and r.reset is None
        c.close()
        return b"5\r\nhello\r\n0\r\n" + section.lower()
    a = await Client.connect(gw.port)
    a.send(f"POST /a HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
           + b"5;x=1\r\nhello\r\n0\r\n" + section)  # fmt: skip
    assert (await a.read_response()).status == 200
    await a.close()
    return b"5;x=1\r\nhello\r\n0\r\n" + section


@pytest.mark.parametrize("protocol", ["http/1.1", "h2"])
async def test_request_trailers_reach_the_sandbox_and_never_another_clients_request(
    start_gateway: Any, catalog: Catalog, protocol: str
) -> None:
    """Client A's trailers reach the sandbox as A sent them; the sandbox connection that carried
    them is closed after A's response, so client B's request arrives on another connection, byte
    for byte B's own (plus only the forwarding fields the gateway adds)."""
    seen: list[tuple[bytes, bytes]] = []
    ended = asyncio.Event()

    async def sandbox(c: UpstreamConn) -> None:
        try:
            while True:
                head, body = await c.read_request()
                seen.append((head, body))
                c.send(response(200, b"ok"))
        except asyncio.IncompleteReadError:
            ended.set()  # the gateway closed this connection
            raise

    async with RawUpstream(sandbox) as up:
        catalog.put("abc", host="127.0.0.1")
        gw = await start_gateway()
        host = gw.host(up.port, "abc")
        body_a = await send_with_trailers(gw, host, protocol, [("Cookie", "session=attacker"), ("X-Trailer", "t")])
        b = await Client.connect(gw.port)
        sent = f"GET /b HTTP/1.1\r\nHost: {host}\r\nCookie: mine=1\r\nAccept: */*\r\n\r\n".encode()
        b.send(sent)
        assert (await b.read_response()).status == 200
        await b.close()
        async with asyncio.timeout(WAIT):
            await ended.wait()
        (head_a, got_a), _ = seen
        assert got_a == body_a  # the trailer section as A sent it (HTTP/2: field names in lower case)
        assert len(up.conns) == 2  # A's sandbox connection was not pooled
        assert up.conns[0].received == head_a + body_a
        own_request(bytes(up.conns[1].received), sent)  # all B's connection ever carried
        assert b"attacker" not in up.conns[1].received


@pytest.mark.parametrize("protocol", ["http/1.1", "h2"])
async def test_an_empty_trailer_section_keeps_the_connection_pooled(
    start_gateway: Any, catalog: Catalog, protocol: str
) -> None:
    """Every chunked body ends with a trailer section; only one with a field costs the connection."""
    seen: list[tuple[bytes, bytes]] = []
    async with RawUpstream(recorder(seen)) as up:
        catalog.put("abc", host="127.0.0.1")
        gw = await start_gateway()
        host = gw.host(up.port, "abc")
        body_a = await send_with_trailers(gw, host, protocol, [])
        b = await Client.connect(gw.port)
        sent = f"GET /b HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
        b.send(sent)
        assert (await b.read_response()).status == 200
        await b.close()
    assert len(up.conns) == 1
    (_, got_a), (head_b, _) = seen
    assert got_a == body_a
    own_request(head_b, sent)


@pytest.mark.parametrize("protocol", ["http/1.1", "h2"])
async def test_request_trailers_and_a_real_aiohttp_sandbox(start_gateway: Any, catalog: Catalog, protocol: str) -> None:
    """The server the finding was made with: aiohttp's parser carried a request's trailer fields into
    the next request on the connection, ahead of that request's own Cookie. B's request, as aiohttp
    parsed it, is B's own: the same fields, in order, plus only what the gateway adds."""
    heads: list[tuple[str, list[tuple[str, str]]]] = []

    async def fields(request: web.Request) -> web.Response:
        await request.read()
        heads.append((request.path, [(k.decode(), v.decode()) for k, v in request.raw_headers]))
        return web.json_response({"cookie": request.headers.getall("Cookie", []), "path": request.path})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", fields)
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        catalog.put("abc", host="127.0.0.1")
        gw = await start_gateway()
        host = gw.host(port, "abc")
        await send_with_trailers(gw, host, protocol, [("Cookie", "session=attacker")])
        b = await Client.connect(gw.port)
        r = await b.request(host, "/b", headers={"Cookie": "mine=1", "Accept": "*/*"})
        assert r.json() == {"cookie": ["mine=1"], "path": "/b"}
        await b.close()
    finally:
        await runner.cleanup()
    path, got = heads[-1]
    assert path == "/b"
    own = [(k, v) for k, v in got if k.lower().encode() not in ADDED]
    assert own == [("Host", host), ("Cookie", "mine=1"), ("Accept", "*/*")], got


# ---- 2. the method, target and version are llhttp's: bytes before the request line change nothing


async def test_a_bare_lf_before_connect_does_not_bypass_its_refusal(start_gateway: Any, catalog: Catalog) -> None:
    async with RawUpstream(echo_handler) as up:
        catalog.put("abc", host="127.0.0.1")
        gw = await start_gateway()
        host = gw.host(up.port, "abc")
        for lead in (b"\n", b"\r", b"\r\n", b"\n\r\n\r"):
            c = await Client.connect(gw.port)
            c.send(lead + f"CONNECT {host}:443 HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
            r = await c.read_response()
            assert (r.status, r.header("X-Gateway-Reason")) == (405, b"method_not_allowed"), lead
            assert await c.closed()
            await c.close()
        assert bytes(up.received) == b""


async def test_bytes_before_a_head_request_keep_it_a_head_request(start_gateway: Any, catalog: Catalog) -> None:
    """A HEAD taken for a GET once made the gateway wait for a body that never came, and lost the
    connection's next request. Both the first parse and the repeated-head shortcut are checked."""
    lines: list[bytes] = []

    async def sandbox(c: UpstreamConn) -> None:
        while True:
            head, _ = await c.read_request()
            lines.append(head.split(b"\r\n", 1)[0])
            # A HEAD response states the GET's length and carries no body.
            c.send(
                b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n" if head.startswith(b"HEAD") else response(200, b"after")
            )

    async with RawUpstream(sandbox) as up:
        catalog.put("abc", host="127.0.0.1")
        gw = await start_gateway()
        host = gw.host(up.port, "abc")
        head = f"HEAD / HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
        c = await Client.connect(gw.port)
        c.send(b"\r" + head)
        r = await c.read_response(b"HEAD")
        assert r.status == 200 and r.header("Content-Length") == b"5"
        c.send(b"\n" + head)  # the same head again: the repeated-head shortcut
        assert (await c.read_response(b"HEAD")).status == 200
        # Pipelined in one write, with bare CR and LF between them.
        c.send(head + b"\n\r" + head + b"\r\r\n" + f"GET /after HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        assert (await c.read_response(b"HEAD")).status == 200
        assert (await c.read_response(b"HEAD")).status == 200
        r = await c.read_response()
        assert r.status == 200 and r.body == b"after"
        await c.close()
    assert lines == [b"HEAD / HTTP/1.1"] * 4 + [b"GET /after HTTP/1.1"]


# ---- 3. identity and URL-override fields from untrusted peers never reach the sandbox

UNTRUSTED = {
    "X-Real-IP": "6.6.6.6", "True-Client-IP": "6.6.6.6", "X-Client-IP": "6.6.6.6", "CF-Connecting-IP": "6.6.6.6",
    "X-Original-Forwarded-For": "6.6.6.6", "X-Forwarded-Server": "evil", "X-Original-URL": "/admin",
    "X-Rewrite-URL": "/admin", "X-Forwarded-Ssl": "on", "X-Forwarded-Scheme": "https", "X-Url-Scheme": "https",
    "Front-End-Https": "on", "X-Forwarded-Prefix": "/evil", "X-Envoy-External-Address": "6.6.6.6",
    "X-Original-Host": "evil", "X-Forwarded-Client-Cert": "Hash=evil",
}  # fmt: skip
#: Underscore spellings, which CGI-style servers (WSGI, Rack, PHP) read as the dash ones.
UNDERSCORED = {"X_Forwarded_For": "6.6.6.6", "x_real_ip": "6.6.6.6", "X-Forwarded_Host": "evil", "X_Request_ID": "e"}


def names(head: bytes) -> list[bytes]:
    return [line.partition(b":")[0] for line in head.split(b"\r\n")[1:] if line]


async def test_untrusted_identity_and_override_fields_are_removed(start_gateway: Any, catalog: Catalog) -> None:
    seen: list[tuple[bytes, bytes]] = []
    async with RawUpstream(recorder(seen)) as up:
        catalog.put("abc", host="127.0.0.1")
        gw = await start_gateway()
        r = await Client.connect(gw.port)
        got = await r.request(gw.host(up.port, "abc"), headers={**UNTRUSTED, **UNDERSCORED, "X-Kept": "1"})
        assert got.status == 200
        await r.close()
        trusting = await start_gateway(trusted_proxies=["127.0.0.0/8"])
        r = await Client.connect(trusting.port)
        got = await r.request(trusting.host(up.port, "abc"), headers={**UNTRUSTED, **UNDERSCORED})
        assert got.status == 200
        await r.close()
    (untrusted, _), (trusted, _) = seen
    sent = [n.encode() for n in (*UNTRUSTED, *UNDERSCORED)]
    assert not set(names(untrusted)) & set(sent)
    assert b"6.6.6.6" not in untrusted and b"evil" not in untrusted and b"/admin" not in untrusted
    assert b"X-Kept: 1\r\n" in untrusted and b"X-Forwarded-For: 127.0.0.1\r\n" in untrusted
    # From a trusted proxy the fields it vouches for pass; an underscore spelling never does.
    assert [n for n in names(trusted) if n in sent] == [n.encode() for n in UNTRUSTED]
    assert not set(names(trusted)) & {n.encode() for n in UNDERSCORED}


async def test_untrusted_fields_are_configurable(start_gateway: Any, catalog: Catalog) -> None:
    seen: list[tuple[bytes, bytes]] = []
    async with RawUpstream(recorder(seen)) as up:
        catalog.put("abc", host="127.0.0.1")
        gw = await start_gateway(untrusted_fields=["X-Tenant-User"])
        c = await Client.connect(gw.port)
        r = await c.request(gw.host(up.port, "abc"), headers={"X-Tenant-User": "root", "X_Tenant_User": "root",
                                                               "X-Real-IP": "6.6.6.6"})  # fmt: skip
        assert r.status == 200
        await c.close()
    head = seen[0][0]
    assert b"root" not in head and b"X-Real-IP: 6.6.6.6\r\n" in head  # only the configured list


# ---- 4. routing fields: one value each, exactly the host grammar


@pytest.mark.parametrize(
    "fields",
    [
        [("E2b-Sandbox-Id", "abc"), ("E2b-Sandbox-Port", "{port}-pub")],  # once routed to sandbox "pub"
        [("E2b-Sandbox-Id", "abc"), ("E2b-Sandbox-Id", "pub"), ("E2b-Sandbox-Port", "{port}")],
        [("E2b-Sandbox-Id", "abc"), ("E2b-Sandbox-Port", "{port}"), ("e2b-sandbox-port", "{port}")],
        [("E2b-Sandbox-Id", "abc,pub"), ("E2b-Sandbox-Port", "{port}")],
        [("E2b-Sandbox-Id", "abc"), ("E2b-Sandbox-Port", "99999")],
        [("E2b-Sandbox-Id", "abc"), ("E2b-Sandbox-Port", "+{port}")],
        [("E2b-Sandbox-Id", "a_b"), ("E2b-Sandbox-Port", "{port}")],
    ],
)
async def test_malformed_or_repeated_routing_fields_are_refused(
    start_gateway: Any, catalog: Catalog, fields: list[tuple[str, str]]
) -> None:
    async with RawUpstream(echo_handler) as up:
        catalog.put("abc", host="127.0.0.1")
        catalog.put("pub", host="127.0.0.1")
        gw = await start_gateway(shared_hosts=["sandbox.e2b.test"])
        c = await Client.connect(gw.port)
        extra = "".join(f"{n}: {v.format(port=up.port)}\r\n" for n, v in fields)
        c.send(f"GET / HTTP/1.1\r\nHost: sandbox.e2b.test\r\n{extra}\r\n".encode())
        r = await c.read_response()
        assert (r.status, r.header("X-Gateway-Reason")) == (400, b"invalid_routing_header")
        r = await c.request("sandbox.e2b.test", headers={"E2b-Sandbox-Id": "abc", "E2b-Sandbox-Port": str(up.port)})
        assert r.status == 200  # the connection goes on: the fields were well framed, only wrong
        await c.close()
        assert bytes(up.received).count(b"GET / ") == 1


# ---- 5. an answer before the request body is complete closes the connection


async def test_a_refusal_after_expect_100_continue_closes(start_gateway: Any, catalog: Catalog) -> None:
    """The client waits for 100 Continue and, refused, never sends the body: were the connection
    kept, its next request would be read as that body (and answered 400)."""
    async with RawUpstream(echo_handler) as up:
        catalog.put("priv", host="127.0.0.1", traffic_access_token="tok")
        catalog.put("open", host="127.0.0.1", ports=[1])
        gw = await start_gateway()
        for sid, reason in (("priv", b"traffic_token_missing"), ("open", b"port_not_exposed")):
            c = await Client.connect(gw.port)
            c.send(
                f"PUT /u HTTP/1.1\r\nHost: {gw.host(up.port, sid)}\r\nExpect: 100-continue\r\n"
                "Content-Length: 5\r\n\r\n".encode()
            )
            r = await c.read_response(interim=True)
            assert (r.status, r.header("X-Gateway-Reason"), r.header("Connection")) == (403, reason, b"close")
            assert await c.closed()
            await c.close()
        assert bytes(up.received) == b""


async def test_every_answer_before_the_body_closes_and_loses_nothing(start_gateway: Any, catalog: Catalog) -> None:
    """A routing error while the body is on its way: Connection: close. The client may go on sending
    the body it had started (RFC 9110 §10.1.1); the gateway reads and discards it before it closes,
    so the answer is not destroyed by a reset (closed at once, with the client's bytes unread, the
    socket would answer them with an RST, and the client's kernel drops what it had not read)."""
    gw = await start_gateway()
    host = gw.host(3000, "nosuch")
    body = b"x" * (8 << 20)
    head = f"POST /up HTTP/1.1\r\nHost: {host}\r\nContent-Length: {len(body)}\r\n\r\n".encode()

    def client() -> bytes:
        """A blocking client that writes all of its body before it reads anything."""
        with socket.create_connection(("127.0.0.1", gw.port), timeout=WAIT) as s:
            s.sendall(head)
            s.sendall(body)
            got = b""
            while data := s.recv(65536):
                got += data
            return got

    async with asyncio.timeout(WAIT * 2):
        got = await asyncio.to_thread(client)
    r = await read_response(_reader(got))
    assert (r.status, r.header("X-Gateway-Reason"), r.header("Connection")) == (502, b"sandbox_not_found", b"close")
    assert r.raw == got  # the whole answer, then the end of the connection
    # Before any body byte: the same.
    c = await Client.connect(gw.port)
    c.send(f"POST /up HTTP/1.1\r\nHost: {host}\r\nContent-Length: 10\r\n\r\n".encode())
    r = await c.read_response()
    assert (r.status, r.header("Connection")) == (502, b"close")
    assert await c.closed()
    await c.close()


def _reader(data: bytes) -> asyncio.StreamReader:
    r = asyncio.StreamReader()
    r.feed_data(data)
    r.feed_eof()
    return r


async def test_an_answer_after_the_whole_body_keeps_the_connection(start_gateway: Any, catalog: Catalog) -> None:
    gw = await start_gateway()
    c = await Client.connect(gw.port)
    r = await c.request(gw.host(3000, "nosuch"), "/p", "POST", body=b"hello")
    assert r.status == 502 and r.header("Connection") is None
    r = await c.request(gw.host(3000, "nosuch"), "/q")  # the connection goes on
    assert r.status == 502
    await c.close()


# ---- 6. a 101 names a protocol the client offered and the gateway allows

UPGRADE = "GET /ws HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: {offer}\r\nSec-WebSocket-Key: x\r\n\r\n"


@pytest.mark.parametrize("answer", [b"h2c", b"websocket, h2c", b"foo", b"", None])
async def test_a_101_for_another_protocol_is_refused(
    start_gateway: Any, catalog: Catalog, answer: bytes | None
) -> None:
    async def sandbox(c: UpstreamConn) -> None:
        await c.read_head()
        upgrade = b"" if answer is None else b"Upgrade: " + answer + b"\r\n"
        c.send(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n" + upgrade + b"\r\n\x00\x00\x00\x04")
        await c.reader.read()

    async with RawUpstream(sandbox) as up:
        catalog.put("abc", host="127.0.0.1")
        gw = await start_gateway()
        c = await Client.connect(gw.port)
        c.send(UPGRADE.format(host=gw.host(up.port, "abc"), offer="websocket").encode())
        r = await c.read_response()
        assert (r.status, r.header("X-Gateway-Reason")) == (502, b"upstream_invalid_response")
        await c.close()


async def test_only_allowed_upgrade_tokens_are_offered(start_gateway: Any, catalog: Catalog) -> None:
    heads: list[bytes] = []

    async def sandbox(c: UpstreamConn) -> None:
        head = await c.read_head()
        heads.append(head)
        c.send(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
        while data := await c.reader.read(65536):
            c.send(data)

    async with RawUpstream(sandbox) as up:
        catalog.put("abc", host="127.0.0.1")
        gw = await start_gateway()
        c = await Client.connect(gw.port)
        c.send(UPGRADE.format(host=gw.host(up.port, "abc"), offer="h2c, WebSocket, foo/2").encode())
        r = await read_response(c.reader)
        assert r.status == 101 and r.header("Upgrade") == b"websocket"
        c.send(b"ping")
        async with asyncio.timeout(WAIT):
            assert await c.reader.readexactly(4) == b"ping"  # a tunnel
        await c.close()
    upgrade = [line for line in heads[0].split(b"\r\n") if line.lower().startswith(b"upgrade:")]
    assert upgrade == [b"Upgrade: WebSocket"]  # h2c and foo were not offered to the sandbox


# ---- 7. Host ports, CORS, empty tokens, the gateway's own listeners


@pytest.mark.parametrize("suffix", [":0", ":65536", ":99999", ":123456"])
async def test_host_ports_outside_1_65535_are_refused(start_gateway: Any, catalog: Catalog, suffix: str) -> None:
    async with RawUpstream(echo_handler) as up:
        catalog.put("abc", host="127.0.0.1")
        gw = await start_gateway()
        c = await Client.connect(gw.port)
        r = await c.request(gw.host(up.port, "abc") + suffix)
        assert (r.status, r.header("X-Gateway-Reason")) == (400, b"invalid_host")
        r = await c.request(gw.host(up.port, "abc") + ":65535")
        assert r.status == 200
        await c.close()


async def test_gateway_answers_never_allow_credentials(start_gateway: Any, catalog: Catalog) -> None:
    catalog.put("priv", host="127.0.0.1", traffic_access_token="tok")
    gw = await start_gateway()
    c = await Client.connect(gw.port)
    origin = {"Origin": "https://evil.example"}
    for host, headers in (
        (gw.host(3000, "nosuch"), origin),
        (gw.host(3000, "priv"), origin),
        (gw.host(3000, "priv"), {**origin, "Access-Control-Request-Method": "PUT"}),  # a preflight, answered 204
    ):
        method = "OPTIONS" if "Access-Control-Request-Method" in headers else "GET"
        r = await c.request(host, method=method, headers=headers)
        assert r.header("Access-Control-Allow-Origin") == b"https://evil.example"
        assert r.header("Access-Control-Allow-Credentials") is None, r.raw
    await c.close()


@pytest.mark.parametrize("token", ['""', "0", "true", "[]", '{"a": 1}'])
async def test_an_empty_or_non_string_token_fails_closed(start_gateway: Any, catalog: Catalog, token: str) -> None:
    async with RawUpstream(echo_handler) as up:
        catalog.put_raw("abc", f'{{"host": "127.0.0.1", "traffic_access_token": {token}}}')
        gw = await start_gateway()
        r = await request(gw.port, gw.host(up.port, "abc"))
        assert (r.status, r.header("X-Gateway-Reason")) == (502, b"catalog_record_invalid")
        assert bytes(up.received) == b""


async def test_a_record_pointing_at_the_gateway_is_refused(start_gateway: Any, catalog: Catalog) -> None:
    """A sandbox URL must never reach the gateway's own listeners: its admin app (/metrics) or its
    data port (a loop)."""
    gw = await start_gateway()
    c = await Client.connect(gw.port)
    for address in ("127.0.0.1", "localhost", "0.0.0.0", "::ffff:127.0.0.1"):
        catalog.put("self", host=address)
        for port in (gw.port, gw.admin_port):
            r = await c.request(gw.host(port, "self"), "/metrics")
            assert (r.status, r.header("X-Gateway-Reason")) == (403, b"upstream_is_gateway"), (address, port)
            assert b"gateway_" not in r.body
    await c.close()


async def test_a_wildcard_listener_covers_every_local_address(start_gateway: Any, catalog: Catalog) -> None:
    """Listening on 0.0.0.0 the gateway is reachable at every address of the machine: 127.0.0.2,
    and the machine's own non-loopback address when it has one (the traffic stays local)."""
    gw = await start_gateway(listen=["0.0.0.0:0"])
    addresses = ["127.0.0.1", "127.0.0.2", "0.0.0.0"]
    own = local_address()
    if own is not None:
        addresses.append(own)
    c = await Client.connect(gw.port)
    for address in addresses:
        catalog.put("self", host=address)
        r = await c.request(gw.host(gw.port, "self"))
        assert (r.status, r.header("X-Gateway-Reason")) == (403, b"upstream_is_gateway"), address
    # A sandbox at another port of the same addresses is reached as usual.
    async with RawUpstream(echo_handler, host="127.0.0.2") as up:
        catalog.put("other", host="127.0.0.2")
        r = await c.request(gw.host(up.port, "other"))
        assert r.status == 200
    await c.close()


def local_address() -> str | None:
    """An IPv4 address of this machine other than loopback, if it has one (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # TEST-NET-1: only the route is looked up
        except OSError:
            return None
        address: str = s.getsockname()[0]
    return None if address.startswith("127.") else address


async def test_workers_refuse_the_supervisors_admin_listener(gateway_process: Any, catalog: Catalog) -> None:
    catalog.put("self", host="127.0.0.1")
    gw = gateway_process("--workers", "2")
    for port in (gw.admin_port, gw.port):
        for _ in range(4):  # new connections: both workers answer, most likely
            r = await request(gw.port, gw.host(port, "self"), "/metrics")
            assert (r.status, r.header("X-Gateway-Reason")) == (403, b"upstream_is_gateway")


# ---- 8. idle pooled connections stay silent; one Transfer-Encoding; nothing framing a 204/304


async def test_bytes_after_a_response_never_become_the_next_response(start_gateway: Any, catalog: Catalog) -> None:
    """A sandbox writes more after a complete response (a body longer than its Content-Length, in a
    later write). The connection is not reused: the next request gets its own answer."""
    stray_sent = asyncio.Event()
    accepted: list[UpstreamConn] = []

    async def sandbox(c: UpstreamConn) -> None:
        accepted.append(c)
        await c.read_request()
        if len(accepted) > 1:  # a later connection: a well-behaved one
            c.send(response(200, b"own"))
            while True:
                await c.read_request()
                c.send(response(200, b"own"))
        c.send(response(200, b"first"))
        await c.writer.drain()
        c.send(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nstray")
        await c.writer.drain()
        stray_sent.set()
        await c.reader.read()

    async with RawUpstream(sandbox) as up:
        catalog.put("abc", host="127.0.0.1")
        gw = await start_gateway()
        host = gw.host(up.port, "abc")
        c = await Client.connect(gw.port)
        assert (await c.request(host)).body == b"first"
        async with asyncio.timeout(WAIT):
            await stray_sent.wait()
        for _ in range(3):
            assert (await c.request(host)).body == b"own"
        await c.close()
        assert len(up.conns) == 2


async def test_a_readable_idle_connection_is_not_reused(start_gateway: Any) -> None:
    """Bytes that reached the socket of an idle pooled connection but were not read yet (the loop
    may run its read callback after the next request took the connection) are seen before reuse:
    the pool asks the kernel. Real sockets; the pool driven directly so that nothing reads first."""
    from gateway.http.upstream import Pool

    both = asyncio.Event()

    async def sandbox(c: UpstreamConn) -> None:
        if len(c.server.conns) == 2:
            both.set()
        await c.reader.read()

    async with RawUpstream(sandbox) as up:
        pool = Pool(60.0, 4, 4, 65536)
        quiet = await pool.connect("127.0.0.1", up.port, "k", WAIT)
        loud = await pool.connect("127.0.0.1", up.port, "k", WAIT)
        async with asyncio.timeout(WAIT):
            await both.wait()  # the sandbox has accepted both
        pool.release(quiet)
        pool.release(loud)  # the most recently used: acquired first
        loud_port = loud.transport.get_extra_info("sockname")[1]
        (peer,) = [c for c in up.conns if c.writer.get_extra_info("peername")[1] == loud_port]
        peer.writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        assert peer.writer.transport.get_write_buffer_size() == 0  # sent: on loopback, already in our socket
        # No await between the write and the acquire: the event loop has not read the bytes.
        assert pool.acquire("k") is quiet
        assert loud.closed
        assert pool.acquire("k") is None
        quiet.close()


async def test_reframed_responses_carry_one_transfer_encoding(start_gateway: Any, catalog: Catalog) -> None:
    async def sandbox(c: UpstreamConn) -> None:
        while True:
            head, _ = await c.read_request()
            if b"/two" in head:  # two fields, one list; the connection stays
                c.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nX-A: 1\r\nTransfer-Encoding: chunked\r\n"
                       b"\r\n6\r\nzipped\r\n0\r\n\r\n")  # fmt: skip
                continue
            if b"/gzip" in head:  # a coding, then the body until the close: re-framed as chunked
                c.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nX-A: 1\r\n\r\nzipped")
            elif b"/close" in head:  # no framing at all
                c.send(b"HTTP/1.0 200 OK\r\n\r\nplain")
            elif b"/twice" in head:  # chunked not last (RFC 9112 §6.1): never chunked a second time
                c.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\nzipped")
            c.writer.close()
            return

    async with RawUpstream(sandbox) as up:
        catalog.put("abc", host="127.0.0.1")
        gw = await start_gateway()
        host = gw.host(up.port, "abc")
        c = await Client.connect(gw.port)
        for path, te, body in (("/gzip", b"gzip, chunked", b"zipped"), ("/two", b"gzip, chunked", b"zipped"),
                               ("/close", b"chunked", b"plain")):  # fmt: skip
            r = await c.request(host, path)
            assert r.status == 200 and r.all("Transfer-Encoding") == [te] and r.body == body, path
            assert r.header("Connection") is None  # kept open: the client's connection stays framed
        r = await c.request(host, "/twice")
        assert (r.status, r.header("X-Gateway-Reason")) == (502, b"upstream_invalid_response")
        await c.close()


@pytest.mark.parametrize("status", [204, 304])
async def test_no_content_responses_carry_no_framing_fields(start_gateway: Any, catalog: Catalog, status: int) -> None:
    async def sandbox(c: UpstreamConn) -> None:
        while True:
            head, _ = await c.read_request()
            if b"/empty" in head:
                c.send(f'HTTP/1.1 {status} X\r\nContent-Length: 0\r\nETag: "e"\r\n\r\n'.encode())
            elif b"/te" in head:
                c.send(f"HTTP/1.1 {status} X\r\nTransfer-Encoding: chunked\r\n\r\n".encode())
            else:
                c.send(response(200, b"next"))

    async with RawUpstream(sandbox) as up:
        catalog.put("abc", host="127.0.0.1")
        gw = await start_gateway()
        host = gw.host(up.port, "abc")
        c = await Client.connect(gw.port)
        for path in ("/empty", "/te"):
            r = await c.request(host, path)
            assert r.status == status
            assert r.header("Content-Length") is None and r.header("Transfer-Encoding") is None, r.raw
        assert (await c.request(host, "/")).body == b"next"  # both connections still frame right
        await c.close()
        assert len(up.conns) == 1


# ---- the same rules for requests over HTTP/2 (h2map.py writes the HTTP/1.1 head that
# analyze_request judges; the answers that close an HTTP/1.1 connection end only the stream)


async def test_h2_untrusted_fields_underscore_framing_and_connect(start_gateway: Any, catalog: Catalog) -> None:
    seen: list[tuple[bytes, bytes]] = []
    async with RawUpstream(recorder(seen)) as up:
        catalog.put("abc", host="127.0.0.1")
        gw = await start_gateway()
        host = gw.host(up.port, "abc")
        c = await H2Client.connect(gw.port)
        fields = [(k.lower(), v) for k, v in {**UNTRUSTED, **UNDERSCORED, "X-Kept": "1"}.items()]
        r = await c.request(host, "/", headers=fields)
        assert r.status == 200
        for bad in ([("content_length", "5")], [("transfer_encoding", "chunked")]):
            r = await c.request(host, "/bad", method="POST", headers=bad, body=b"hello")
            assert (r.status, r.header(b"x-gateway-reason")) == (400, b"invalid_framing"), bad
        r = await c.request(host, method="CONNECT")  # a plain CONNECT (no :protocol)
        assert (r.status, r.header(b"x-gateway-reason")) == (405, b"method_not_allowed")
        r = await c.request(host, "/after")
        assert r.status == 200 and c.goaway is None
        c.close()
    head = seen[0][0]
    sent = {n.lower().encode() for n in (*UNTRUSTED, *UNDERSCORED)}
    assert not {n.lower() for n in names(head)} & sent, head
    assert b"6.6.6.6" not in head and b"evil" not in head and b"/admin" not in head
    assert b"x-kept: 1\r\n" in head
    assert [h.split(b" ")[1] for h, _ in seen] == [b"/", b"/after"]  # nothing refused reached the sandbox


async def test_h2_routing_fields_and_host_ports(start_gateway: Any, catalog: Catalog) -> None:
    async with RawUpstream(echo_handler) as up:
        catalog.put("abc", host="127.0.0.1")
        catalog.put("pub", host="127.0.0.1")
        catalog.put("self", host="127.0.0.1")
        gw = await start_gateway(shared_hosts=["sandbox.e2b.test"])
        c = await H2Client.connect(gw.port)
        port = str(up.port)
        for fields in (
            [("e2b-sandbox-id", "abc"), ("e2b-sandbox-port", f"{port}-pub")],
            [("e2b-sandbox-id", "abc"), ("e2b-sandbox-id", "pub"), ("e2b-sandbox-port", port)],
            [("e2b-sandbox-id", "abc"), ("e2b-sandbox-port", "99999")],
        ):
            r = await c.request("sandbox.e2b.test", headers=fields)
            assert (r.status, r.header(b"x-gateway-reason")) == (400, b"invalid_routing_header"), fields
        r = await c.request(gw.host(up.port, "abc") + ":99999")
        assert (r.status, r.header(b"x-gateway-reason")) == (400, b"invalid_host")
        r = await c.request(gw.host(gw.admin_port, "self"), "/metrics")
        assert (r.status, r.header(b"x-gateway-reason")) == (403, b"upstream_is_gateway")
        r = await c.request("sandbox.e2b.test", headers=[("e2b-sandbox-id", "abc"), ("e2b-sandbox-port", port)])
        assert r.status == 200 and c.goaway is None
        c.close()
    assert bytes(up.received).count(b"GET / ") == 1


async def test_h2_an_answer_before_the_body_ends_only_the_stream(start_gateway: Any, catalog: Catalog) -> None:
    """Refused before the body (a private sandbox without a token, with and without Expect:
    100-continue): the answer ends the stream and RST_STREAM NO_ERROR asks the client to stop
    sending (RFC 9113 §8.1); the connection and its other streams go on."""
    async with RawUpstream(echo_handler) as up:
        catalog.put("priv", host="127.0.0.1", traffic_access_token="tok")
        catalog.put("open", host="127.0.0.1")
        gw = await start_gateway()
        c = await H2Client.connect(gw.port)
        slow = c.start(gw.host(up.port, "open"), "/slow", method="POST", headers=[("content-length", "9")],
                       body=b"part", end=False)  # fmt: skip
        for extra in ([], [("expect", "100-continue")]):
            sid = c.start(gw.host(up.port, "priv"), "/u", method="PUT", headers=[("content-length", "9"), *extra],
                          body=b"four", end=False)  # fmt: skip
            r = await c.response(sid)
            assert (r.status, r.header(b"x-gateway-reason")) == (403, b"traffic_token_missing")
            async with asyncio.timeout(WAIT):
                while not any(isinstance(e, h2.events.StreamReset) and e.stream_id == sid for e in c.events):
                    c.changed.clear()
                    await c.changed.wait()
            (reset,) = [e for e in c.events if isinstance(e, h2.events.StreamReset) and e.stream_id == sid]
            assert reset.error_code == h2.errors.ErrorCodes.NO_ERROR
        c.send_body(slow, b"-rest", end=True)  # the stream that was open meanwhile goes on
        r = await c.response(slow)
        assert r.status == 200 and bytes(r.body).endswith(b"body=9")
        assert c.goaway is None
        c.close()
    assert b"PUT" not in bytes(up.received)


async def test_h2_a_101_for_another_protocol_is_refused(start_gateway: Any, catalog: Catalog) -> None:
    """An extended CONNECT (RFC 8441) for a WebSocket the sandbox answers with 101 for h2c: 502 on
    the stream, no tunnel; and a :protocol the gateway does not allow is not offered to the sandbox."""
    heads: list[bytes] = []

    async def sandbox(c: UpstreamConn) -> None:
        heads.append(await c.read_head())
        c.send(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n\x00\x00\x00\x04")
        await c.reader.read()

    async with RawUpstream(sandbox) as up:
        catalog.put("abc", host="127.0.0.1")
        gw = await start_gateway()
        host = gw.host(up.port, "abc")
        c = await H2Client.connect(gw.port)
        for protocol in ("websocket", "h2c"):
            sid = c.start(host, "/ws", method="CONNECT", extra_pseudo=[(":protocol", protocol)],
                          headers=[("sec-websocket-version", "13")], end=False)  # fmt: skip
            r = await c.response(sid)
            assert (r.status, r.header(b"x-gateway-reason")) == (502, b"upstream_invalid_response"), protocol
            assert b"\x00\x00\x00\x04" not in r.body
        assert c.goaway is None
        c.close()
    upgrades = [[line.lower() for line in h.split(b"\r\n") if line.lower().startswith(b"upgrade:")] for h in heads]
    assert upgrades == [[b"upgrade: websocket"], []]


async def test_h2_no_content_responses_carry_no_framing_fields(start_gateway: Any, catalog: Catalog) -> None:
    async def sandbox(c: UpstreamConn) -> None:
        while True:
            head, _ = await c.read_request()
            if b"/204" in head:
                c.send(b"HTTP/1.1 204 X\r\nTransfer-Encoding: chunked\r\n\r\n")
            else:
                c.send(b'HTTP/1.1 304 X\r\nContent-Length: 10\r\nETag: "e"\r\n\r\n')

    async with RawUpstream(sandbox) as up:
        catalog.put("abc", host="127.0.0.1")
        gw = await start_gateway()
        c = await H2Client.connect(gw.port)
        for path, status in (("/204", 204), ("/304", 304)):
            r = await c.request(gw.host(up.port, "abc"), path)
            assert r.status == status and bytes(r.body) == b""
            assert r.header(b"content-length") is None and r.header(b"transfer-encoding") is None, r.headers
        c.close()


# ---- refusals are counted under their reasons


async def test_refusals_are_counted_with_their_reasons(start_gateway: Any, catalog: Catalog) -> None:
    catalog.put("self", host="127.0.0.1")
    gw = await start_gateway(shared_hosts=["sandbox.e2b.test"])
    c = await Client.connect(gw.port)
    await c.request(gw.host(gw.admin_port, "self"))
    await c.request("sandbox.e2b.test", headers={"E2b-Sandbox-Id": "a", "E2b-Sandbox-Port": "1-b"})
    await c.close()
    metrics = (await request(gw.admin_port, "x", "/metrics")).body
    assert b'reason="upstream_is_gateway"' in metrics and b'reason="invalid_routing_header"' in metrics


# ---- status codes llhttp takes that are not HTTP's


@pytest.mark.parametrize("status", [b"000", b"020", b"099"])
async def test_a_status_code_below_100_is_refused(status: bytes, start_gateway: Any, catalog: Catalog) -> None:
    """llhttp takes any three digits. Below 100 a status is final to llhttp and to a client but was
    interim to the gateway (every code below 200): a sandbox's ``020`` reached the client without its
    Content-Length (read until the connection closes) and the response the sandbox smuggled after it
    was taken for the final one. RFC 9110 §15: such a code is invalid: 502, over both protocols, the
    smuggled response never seen; the client's next request, to another sandbox, gets its own
    answer. (999, also invalid but final to everyone, passes, as through h11, hyper and Go.)"""

    async def sandbox(c: UpstreamConn) -> None:
        head, _ = await c.read_request()
        code = b"999" if b"/fine" in head else status
        c.send(
            b"HTTP/1.1 "
            + code
            + b" X\r\nContent-Length: 0\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nsmuggled!"
        )
        await c.reader.read()

    async with RawUpstream(sandbox) as up, RawUpstream(echo_handler) as other:
        catalog.put("odd", host="127.0.0.1")
        catalog.put("other", host="127.0.0.1")
        gw = await start_gateway()
        c = await Client.connect(gw.port)
        r = await c.request(gw.host(up.port, "odd"), "/odd")
        assert (r.status, r.header("X-Gateway-Reason")) == (502, b"upstream_invalid_response")
        r = await c.request(gw.host(other.port, "other"), "/next")
        assert r.status == 200 and b"smuggled" not in r.body
        r = await c.request(gw.host(up.port, "odd"), "/fine")
        assert r.status == 999 and r.body == b""
        await c.close()
        h = await H2Client.connect(gw.port)
        r2 = await h.request(gw.host(up.port, "odd"), "/odd")
        assert (r2.status, r2.header(b"x-gateway-reason")) == (502, b"upstream_invalid_response")
        r2 = await h.request(gw.host(other.port, "other"), "/next")
        assert r2.status == 200 and b"smuggled" not in r2.body
        r2 = await h.request(gw.host(up.port, "odd"), "/fine")
        assert r2.status == 999 and bytes(r2.body) == b""
        assert h.goaway is None
        h.close()
