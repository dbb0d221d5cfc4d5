"""HTTP/2 from clients: h2c with prior knowledge on the plain listener (curl, h2load, a raw h2 client),
many sandboxes on one connection, the RFC 9113 §8.3 mapping both ways, the gateway's own answers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import subprocess
from pathlib import Path
from typing import Any

import h2.errors
import h2.events
import pytest

from tests import needs
from tests.conftest import WAIT, Catalog, RunningGateway
from tests.h2client import H2Client, error_codes
from tests.helpers import Client, RawUpstream, UpstreamConn, echo_handler, response
from tests.integration.test_observability import log_lines, scrape, value
from tests.integration.test_operations import client_ctx, make_cert, tls_request


async def test_h2c_prior_knowledge_and_http11_share_the_port(start_gateway: Any, catalog: Catalog) -> None:
    """A connection that starts with the preface is HTTP/2, any other HTTP/1.1, on the same port."""
    async with RawUpstream(echo_handler) as up:
        catalog.put("h2a", host="127.0.0.1")
        gw: RunningGateway = await start_gateway()
        host = gw.host(up.port, "h2a")
        c = await H2Client.connect(gw.port)
        r = await c.request(host, "/x?y=1", headers=[("user-agent", "t/1")])
        assert r.status == 200 and r.reset is None
        assert r.body.startswith(b"GET /x?y=1 HTTP/1.1\r\n")  # the echo upstream's first line
        assert r.header(b"x-request-id") is not None
        c.close()
        h1 = await Client.connect(gw.port)
        r1 = await h1.request(host, "/")
        assert r1.status == 200
        await h1.close()


async def _after_first_byte(gw: RunningGateway) -> None:
    """Until the gateway holds the connection's first byte ``P`` as a possible preface (bounded)."""
    async with asyncio.timeout(WAIT):
        while not any(getattr(c, "pending", b"") == b"P" for c in gw.gateway.ctx.connections):
            await asyncio.sleep(0.01)


async def test_a_first_read_of_one_byte_is_kept(start_gateway: Any, catalog: Catalog) -> None:
    """A client whose first read is only ``P`` (the preface's first byte, and a POST's, PUT's or
    PATCH's): the next read decides, and the byte is not lost either way."""
    async with RawUpstream(echo_handler) as up:
        catalog.put("h2p", host="127.0.0.1")
        gw: RunningGateway = await start_gateway()
        host = gw.host(up.port, "h2p")
        c = await Client.connect(gw.port)
        c.send(b"P")
        await _after_first_byte(gw)
        c.send(f"OST /split HTTP/1.1\r\nHost: {host}\r\nContent-Length: 2\r\n\r\nhi".encode())
        r = await c.read_response()
        assert r.status == 200 and r.body.startswith(b"POST /split HTTP/1.1\r\n")
        await c.close()
        raw = await Client.connect(gw.port)
        raw.send(b"P")
        await _after_first_byte(gw)
        raw.send(b"RI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")  # + SETTINGS
        async with asyncio.timeout(WAIT):
            first = await raw.reader.readexactly(9)
        assert first[3] == 0x04  # the server's connection preface: a SETTINGS frame
        await raw.close()


async def test_curl_http2_prior_knowledge(start_gateway: Any, catalog: Catalog) -> None:
    curl = needs.tool("curl", "apt-get install curl")
    async with RawUpstream(echo_handler) as up:
        catalog.put("h2b", host="127.0.0.1")
        gw = await start_gateway()
        host = gw.host(up.port, "h2b")
        out = await asyncio.to_thread(
            subprocess.run,
            [curl, "-sS", "--http2-prior-knowledge", "-o", "-", "-w", "\n%{http_version} %{http_code}",
             "-H", f"Host: {host}", "-d", "hello", f"http://127.0.0.1:{gw.port}/post"],
            capture_output=True, timeout=WAIT, check=False,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        assert out.stdout.endswith(b"\n2 200"), out.stdout[-200:]
        assert b"POST /post HTTP/1.1\r\n" in out.stdout
        assert out.stdout.endswith(b"\nbody=5\n2 200")  # the echo: the head, then the body length


async def test_upgrade_h2c_from_http11_stays_refused(start_gateway: Any, catalog: Catalog) -> None:
    """``Upgrade: h2c`` is a known smuggling path through proxies: the request goes on as plain
    HTTP/1.1 without it, and the connection stays HTTP/1.1."""
    async with RawUpstream(echo_handler) as up:
        catalog.put("h2c", host="127.0.0.1")
        gw = await start_gateway()
        host = gw.host(up.port, "h2c")
        c = await Client.connect(gw.port)
        c.send(
            f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
            "HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n".encode()
        )
        r = await c.read_response()
        assert r.status == 200  # not 101
        assert b"upgrade" not in up.received.lower() and b"http2-settings" not in up.received.lower()
        r = await c.request(host, "/again")  # still HTTP/1.1
        assert r.status == 200
        await c.close()


async def test_http2_can_be_turned_off(start_gateway: Any, catalog: Catalog) -> None:
    async with RawUpstream(echo_handler) as up:
        catalog.put("h2off", host="127.0.0.1")
        gw = await start_gateway(http2=False)
        c = await H2Client.connect(gw.port)
        await c.closed()
        assert not c.responses and c.received > 0  # an HTTP/1.1 400, not HTTP/2 frames
        del up


def named(name: str) -> Any:
    """A sandbox app that answers every request with its own name and the path it was asked."""

    async def handler(c: UpstreamConn) -> None:
        while True:
            head, _ = await c.read_request()
            path = head.split(b" ", 2)[1]
            c.send(response(200, name.encode() + b" " + path))

    return handler


async def test_100_streams_to_10_sandboxes_on_one_connection(start_gateway: Any, catalog: Catalog) -> None:
    """One connection, 100 concurrent streams, 10 sandboxes (five by host name, five by the routing
    fields of a shared host): every response comes from the sandbox its stream named; a stream to a
    private sandbox without its token gets 403 while the others on the connection succeed."""
    async with contextlib.AsyncExitStack() as stack:
        ups = [await stack.enter_async_context(RawUpstream(named(f"sb{i}"))) for i in range(10)]
        for i in range(10):
            catalog.put(f"sb{i}", host="127.0.0.1", **({"traffic_access_token": "tok9"} if i == 9 else {}))
        gw = await start_gateway(shared_hosts=["sandbox.e2b.test"])
        c = await H2Client.connect(gw.port)
        sent: dict[int, tuple[int, str]] = {}
        for n in range(100):
            i = n % 10
            path = f"/n{n}"
            headers = [("authorization", "x")] if n % 3 == 0 else []
            if i == 9 and n % 20 == 9:
                headers.append(("e2b-traffic-access-token", "tok9"))
            if i < 5:
                sid = c.start(gw.host(ups[i].port, f"sb{i}"), path, headers=headers)
            else:
                route = [("e2b-sandbox-id", f"sb{i}"), ("e2b-sandbox-port", str(ups[i].port))]
                sid = c.start("sandbox.e2b.test", path, headers=route + headers)
            sent[sid] = (i, path)
        assert len(c.conn.streams) == 100  # all open at once
        forbidden = 0
        async with asyncio.timeout(WAIT * 2):
            for sid, (i, path) in sent.items():
                r = await c.response(sid)
                assert r.reset is None
                if i == 9 and int(path[2:]) % 20 != 9:  # the private sandbox's streams without its token
                    assert (r.status, r.header(b"x-gateway-reason")) == (403, b"traffic_token_missing")
                    forbidden += 1
                    continue
                assert r.status == 200, (sid, r.status, bytes(r.body))
                assert bytes(r.body) == f"sb{i} {path}".encode()
        assert forbidden == 5
        assert not c.lost.is_set()
        c.close()


async def test_request_mapping_pseudo_headers_cookies_and_forwarding(start_gateway: Any, catalog: Catalog) -> None:
    """RFC 9113 §8.3.1: :method, :path (byte for byte) and :authority make the request line and Host;
    split cookie fields are joined with "; "; the forwarding fields and request ID are the same as
    over HTTP/1.1; te: trailers is accepted and not forwarded."""
    async with RawUpstream(echo_handler) as up:
        catalog.put("map", host="127.0.0.1")
        gw = await start_gateway()
        host = gw.host(up.port, "map")
        c = await H2Client.connect(gw.port)
        r = await c.request(
            host, "/a%2Fb/%20c?x=%41&y=1;z", method="DELETE",
            headers=[("cookie", "a=b"), ("x-dup", "1"), ("cookie", "c=d"), ("x-dup", "2"), ("te", "trailers")],
        )  # fmt: skip
        assert r.status == 200
        head = bytes(r.body).split(b"\nbody=")[0]
        assert head.startswith(f"DELETE /a%2Fb/%20c?x=%41&y=1;z HTTP/1.1\r\nhost: {host}\r\n".encode())
        assert b"\r\ncookie: a=b; c=d\r\nx-dup: 1\r\nx-dup: 2\r\n" in head
        assert b"\r\nte:" not in head.lower()
        assert (
            f"X-Forwarded-For: 127.0.0.1\r\nX-Forwarded-Proto: http\r\nX-Forwarded-Port: {gw.port}\r\n".encode() in head
        )
        assert b"X-Request-ID: " + (r.header(b"x-request-id") or b"?") in head
        c.close()


async def test_connection_specific_fields_are_stream_errors(start_gateway: Any, catalog: Catalog) -> None:
    """RFC 9113 §8.2.2 and §8.2.1: the stream is reset with PROTOCOL_ERROR, nothing reaches the
    sandbox, and the other streams of the connection go on."""
    async with RawUpstream(echo_handler) as up:
        catalog.put("cs", host="127.0.0.1")
        gw = await start_gateway()
        host = gw.host(up.port, "cs")
        c = await H2Client.connect(gw.port)
        bad = [
            [("connection", "keep-alive")], [("keep-alive", "300")], [("proxy-connection", "x")],
            [("transfer-encoding", "chunked")], [("upgrade", "websocket")], [("te", "gzip")],
            [("X-Upper", "1")], [("x-nl", "a\r\nx-smuggled: 1")], [("x-nul", "a\x00b")], [("x-sp", " a")],
            [("host", "other.example")],
        ]  # fmt: skip
        sids = [c.start(host, "/bad", headers=h) for h in bad]
        ok = c.start(host, "/good")
        for sid in sids:
            r = await c.response(sid)
            assert r.reset == h2.errors.ErrorCodes.PROTOCOL_ERROR, (bad[sids.index(sid)], r)
        r = await c.response(ok)
        assert r.status == 200
        assert up.received.count(b"GET ") == 1 and b"/bad" not in up.received
        c.close()


async def test_bad_pseudo_headers_are_stream_errors(start_gateway: Any) -> None:
    gw = await start_gateway()
    c = await H2Client.connect(gw.port)
    host = "1-x.e2b.test"
    cases = [
        {"extra_pseudo": [(":foo", "1")]},
        {"path": "no-slash"},
        {"extra_pseudo": [(":protocol", "websocket")]},  # :protocol without CONNECT
        {"path": "/a b"},
    ]
    sids = [c.start(host, **kw) for kw in cases]  # type: ignore[arg-type]
    for sid in sids:
        r = await c.response(sid)
        assert r.reset == h2.errors.ErrorCodes.PROTOCOL_ERROR
    r = await c.request(host, "/")  # the connection is fine: answered (no such sandbox)
    assert r.status == 502 and r.header(b"x-gateway-reason") == b"sandbox_not_found"
    c.close()


async def test_trailers_both_ways(start_gateway: Any, catalog: Catalog) -> None:
    """A request body of unknown length goes to the sandbox chunked, its HTTP/2 trailers as the
    chunked trailer section; a chunked response's trailers come back as trailing HEADERS."""
    got: list[bytes] = []

    async def handler(c: UpstreamConn) -> None:
        head, body = await c.read_request()
        got.append(head + body)
        c.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: x-checksum\r\n\r\n"
               b"5\r\nhello\r\n6\r\n world\r\n0\r\nX-Checksum: abc\r\nX-Other: 1\r\n\r\n")  # fmt: skip

    async with RawUpstream(handler) as up:
        catalog.put("tr", host="127.0.0.1")
        gw = await start_gateway()
        c = await H2Client.connect(gw.port)
        sid = c.start(gw.host(up.port, "tr"), "/t", method="POST", body=b"part1", end=False)
        c.send_body(sid, b"part22")
        c.conn.send_headers(sid, [(b"x-req-trailer", b"v")], end_stream=True)
        c.flush()
        r = await c.response(sid)
        assert r.status == 200 and bytes(r.body) == b"hello world"
        assert r.trailers == [(b"x-checksum", b"abc"), (b"x-other", b"1")]
        assert r.header(b"transfer-encoding") is None
        req = got[0]
        assert b"\r\ntransfer-encoding: chunked\r\n" in req
        assert req.endswith(b"\r\n\r\n5\r\npart1\r\n6\r\npart22\r\n0\r\nx-req-trailer: v\r\n\r\n")
        c.close()


async def test_trailers_after_a_content_length_body_are_dropped_logged_and_counted(
    start_gateway: Any, catalog: Catalog, caplog: pytest.LogCaptureFixture
) -> None:
    """A request with content-length goes to the sandbox with that length (as declared), and its
    trailing HEADERS, which a Content-Length body cannot carry, are dropped as the header policy
    documents: logged at info (names, not values) and counted; the sandbox connection stays clean
    for the next request."""
    got: list[bytes] = []

    async def handler(c: UpstreamConn) -> None:
        while True:
            head, body = await c.read_request()
            got.append(head + body)
            c.send(response(200, b"ok"))

    async with RawUpstream(handler) as up:
        catalog.put("trcl", host="127.0.0.1")
        gw = await start_gateway()
        host = gw.host(up.port, "trcl")
        c = await H2Client.connect(gw.port)
        with caplog.at_level(logging.INFO, logger="gateway.http2"):
            sid = c.start(host, "/t", method="POST", headers=[("content-length", "11")], body=b"hello", end=False)
            c.send_body(sid, b" world")
            c.conn.send_headers(sid, [(b"x-checksum", b"secret-value")], end_stream=True)
            c.flush()
            r = await c.response(sid)
        assert r.status == 200 and r.reset is None
        assert b"\r\ncontent-length: 11\r\n" in got[0] and got[0].endswith(b"\r\n\r\nhello world")
        assert b"x-checksum" not in got[0] and b"transfer-encoding" not in got[0]
        dropped = [m.getMessage() for m in caplog.records if "trailers" in m.getMessage()]
        assert len(dropped) == 1 and "x-checksum" in dropped[0] and "secret-value" not in dropped[0]
        text = await scrape(gw.admin_port)
        assert value(text, "gateway_request_trailers_dropped_total") == 1
        r = await c.request(host, "/next")  # the same pooled sandbox connection: nothing carried over
        assert r.status == 200 and len(up.conns) == 1
        assert got[1].startswith(b"GET /next HTTP/1.1\r\n") and b"x-checksum" not in got[1]
        c.close()


async def test_interim_responses_and_bodiless_responses(start_gateway: Any, catalog: Catalog) -> None:
    """103 Early Hints reach the client before the final response; HEAD, 204 and 304 have no DATA."""

    async def handler(c: UpstreamConn) -> None:
        while True:
            head, _ = await c.read_request()
            path = head.split(b" ")[1]
            if path == b"/hints":
                c.send(b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n")
                c.send(response(200, b"page"))
            elif path == b"/204":
                c.send(b"HTTP/1.1 204 No Content\r\nX-A: 1\r\n\r\n")
            elif path == b"/304":
                c.send(b'HTTP/1.1 304 Not Modified\r\nETag: "e"\r\n\r\n')
            else:
                c.send(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")  # to HEAD: no body follows

    async with RawUpstream(handler) as up:
        catalog.put("im", host="127.0.0.1")
        gw = await start_gateway()
        host = gw.host(up.port, "im")
        c = await H2Client.connect(gw.port)
        r = await c.request(host, "/hints")
        assert r.interim == [[(b":status", b"103"), (b"link", b"</s.css>; rel=preload")]]
        assert r.status == 200 and bytes(r.body) == b"page"
        for path, method, status in (("/204", "GET", 204), ("/304", "GET", 304), ("/h", "HEAD", 200)):
            r = await c.request(host, path, method=method)
            assert r.status == status and r.body == b"" and r.reset is None, path
            assert not [
                e for e in c.events if isinstance(e, h2.events.DataReceived) and e.stream_id == max(c.responses)
            ]
        r = await c.request(host, "/h", method="HEAD")
        assert r.header(b"content-length") == b"1000"
        c.close()


async def test_bodies_stream_both_ways(start_gateway: Any, catalog: Catalog) -> None:
    """Nothing waits for a whole message: the sandbox gets the first part of an upload before the
    client sends the rest, and the client gets the first part of a response before the sandbox
    sends the rest."""
    first_part = asyncio.Event()
    release = asyncio.Event()

    async def handler(c: UpstreamConn) -> None:
        await c.read_head()
        await c.read_exactly(len(b"5\r\nfirst\r\n"))
        first_part.set()
        c.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nhead\r\n")
        await release.wait()
        c.send(b"4\r\ntail\r\n0\r\n\r\n")

    async with RawUpstream(handler) as up:
        catalog.put("sm", host="127.0.0.1")
        gw = await start_gateway()
        c = await H2Client.connect(gw.port)
        sid = c.start(gw.host(up.port, "sm"), "/up", method="POST", body=b"first", end=False)
        async with asyncio.timeout(WAIT):
            await first_part.wait()
        r = c.responses[sid]
        async with asyncio.timeout(WAIT):
            while bytes(r.body) != b"head":
                r.data.clear()
                await r.data.wait()
        release.set()
        c.send_body(sid, b"", end=True)
        r = await c.response(sid)
        assert bytes(r.body) == b"headtail"
        c.close()


async def test_content_length_is_checked_against_data(start_gateway: Any, catalog: Catalog) -> None:
    """DATA longer or shorter than content-length is h2's connection error (GOAWAY PROTOCOL_ERROR);
    a content-length with no DATA at all (END_STREAM on HEADERS), which h2 does not check, is a
    stream error. None of them reaches the sandbox as a whole request."""
    async with RawUpstream(echo_handler) as up:
        catalog.put("cl", host="127.0.0.1")
        gw = await start_gateway()
        host = gw.host(up.port, "cl")
        c = await H2Client.connect(gw.port)
        sid = c.start(host, "/h", method="POST", headers=[("content-length", "5")], end=True)  # HEADERS only
        r = await c.response(sid)
        assert r.reset == h2.errors.ErrorCodes.PROTOCOL_ERROR
        ok = await c.request(host, "/ok", method="POST", headers=[("content-length", "3")], body=b"abc")
        assert ok.status == 200 and bytes(ok.body).endswith(b"body=3")
        c.close()
        for length, body in (("2", b"12345"), ("10", b"12345")):
            c = await H2Client.connect(gw.port)
            c.start(host, "/bad", method="POST", headers=[("content-length", length)], body=body, end=True)
            assert await c.closed()
            assert error_codes(c) == [h2.errors.ErrorCodes.PROTOCOL_ERROR]
        assert b"/bad" not in up.received and b"/h " not in up.received.replace(b"/h HTTP", b"")


async def test_gateway_answers_are_the_same_as_over_http11(start_gateway: Any, catalog: Catalog) -> None:
    """The gateway's own answers: the same status, X-Gateway-Reason and body over both protocols."""
    async with RawUpstream(echo_handler) as up:
        catalog.put("pv", host="127.0.0.1", traffic_access_token="t")
        catalog.put("bad", host="127.0.0.1", state="paused")
        gw = await start_gateway(shared_hosts=["sandbox.e2b.test"], request_id_header="")
        cases: list[tuple[str, str, dict[str, str]]] = [
            ("x.example.org", "/", {}),  # unknown_domain
            ("99999-abc.e2b.test", "/", {}),  # invalid_port
            ("80-A_B.e2b.test", "/", {}),  # invalid_sandbox_id
            ("80-nosuch.e2b.test", "/", {}),  # sandbox_not_found
            (gw.host(up.port, "pv"), "/", {}),  # traffic_token_missing
            (gw.host(up.port, "pv"), "/", {"e2b-traffic-access-token": "no"}),  # traffic_token_invalid
            (gw.host(up.port, "bad"), "/", {}),  # sandbox_paused
            ("sandbox.e2b.test", "/", {"e2b-sandbox-id": "x"}),  # missing_routing_header
            ("sandbox.e2b.test", "/health", {}),  # the balancer's health check
            (gw.host(1, "pv"), "/", {"e2b-traffic-access-token": "t"}),  # port_not_open
            (gw.host(up.port, "pv"), "/", {"origin": "https://a.example", "access-control-request-method": "PUT"}),
            (gw.host(up.port, "pv"), "/", {"accept": "text/html", "sec-fetch-mode": "navigate"}),  # HTML page
        ]
        c = await H2Client.connect(gw.port)
        for host, path, headers in cases:
            method = "OPTIONS" if "access-control-request-method" in headers else "GET"
            r2 = await c.request(host, path, method=method, headers=list(headers.items()))
            h1 = await Client.connect(gw.port)
            r1 = await h1.request(host, path, method, headers=headers)
            await h1.close()
            assert r2.status == r1.status, (host, headers)
            assert r2.header(b"x-gateway-reason") == r1.header("X-Gateway-Reason"), (host, headers)
            assert bytes(r2.body) == r1.body, (host, headers)
            assert r2.header(b"content-type") == r1.header("Content-Type")
            assert r2.header(b"connection") is None
        c.start("1-x.e2b.test", "/", method="CONNECT")  # a plain CONNECT: 405 as over HTTP/1.1
        r = await c.response(max(c.responses))
        assert (r.status, r.header(b"x-gateway-reason")) == (405, b"method_not_allowed")
        big = await c.request("1-x.e2b.test", "/", headers=[("x-big", "v" * 70_000)])
        assert (big.status, big.header(b"x-gateway-reason")) == (431, b"request_head_too_large")
        c.close()


# ---- TLS and ALPN


async def test_tls_alpn_h2_and_http11_on_one_listener(start_gateway: Any, catalog: Catalog, tmp_path: Path) -> None:
    """ALPN picks h2 or http/1.1 on the tls listener (curl --http2, a raw h2 client, an HTTP/1.1
    client); X-Forwarded-Proto says https either way."""
    curl = needs.tool("curl", "apt-get install curl")
    cert, key = make_cert(tmp_path, "h2tls", "*.sandbox.test")
    async with RawUpstream(echo_handler) as up:
        catalog.put("tls2", host="127.0.0.1")
        gw = await start_gateway(
            listen=["127.0.0.1:0 tls"], domains=["sandbox.test"], tls_certificates=[f"{cert}:{key}"]
        )
        host = f"{up.port}-tls2.sandbox.test"
        out = await asyncio.to_thread(
            subprocess.run,
            [curl, "-sS", "--http2", "--cacert", str(cert), "--resolve", f"{host}:{gw.port}:127.0.0.1",
             "-o", "-", "-w", "\n%{http_version} %{http_code}", f"https://{host}:{gw.port}/tls"],
            capture_output=True, timeout=WAIT, check=False,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        assert out.stdout.endswith(b"\n2 200") and b"GET /tls HTTP/1.1\r\n" in out.stdout
        assert b"X-Forwarded-Proto: https\r\n" in out.stdout
        ctx = client_ctx(cert)
        ctx.set_alpn_protocols(["h2"])
        c = await H2Client.connect(gw.port, ssl_ctx=ctx, server_hostname=host)
        r = await c.request(host, "/raw", scheme="https")
        assert r.status == 200 and b"X-Forwarded-Proto: https\r\n" in r.body
        c.close()
        r1, _ = await tls_request(gw.port, client_ctx(cert), host, "/h1")  # ALPN http/1.1 (or none)
        assert r1.status == 200
        off = await start_gateway(
            listen=["127.0.0.1:0 tls"], domains=["sandbox.test"], tls_certificates=[f"{cert}:{key}"], http2=False
        )
        out = await asyncio.to_thread(
            subprocess.run,
            [curl, "-sS", "--http2", "--cacert", str(cert), "--resolve", f"{host}:{off.port}:127.0.0.1",
             "-o", "/dev/null", "-w", "%{http_version}", f"https://{host}:{off.port}/"],
            capture_output=True, timeout=WAIT, check=False,
        )  # fmt: skip
        assert out.stdout == b"1.1"  # http2 off: ALPN offers http/1.1 only


# ---- metrics and the access log


async def test_metrics_and_access_log_say_the_protocol(start_gateway: Any, catalog: Catalog, tmp_path: Path) -> None:
    log = tmp_path / "access.log"
    release = asyncio.Event()

    async def handler(c: UpstreamConn) -> None:
        while True:
            head, _ = await c.read_request()
            if b"/wait" in head:
                await release.wait()
            c.send(response(200, b"ok"))

    async with RawUpstream(handler) as up:
        catalog.put("mx", host="127.0.0.1")
        gw = await start_gateway(access_log=str(log))
        host = gw.host(up.port, "mx")
        c = await H2Client.connect(gw.port)
        for _ in range(3):
            assert (await c.request(host, "/h2")).status == 200
        assert (await c.request("80-nosuch.e2b.test", "/")).status == 502
        waiting = [c.start(host, "/wait") for _ in range(4)]
        h1 = await Client.connect(gw.port)
        assert (await h1.request(host, "/h1")).status == 200
        await h1.close()
        async with asyncio.timeout(WAIT):
            while sum(1 for x in up.received.split(b"\r\n") if x.startswith(b"GET /wait")) < 4:
                await asyncio.sleep(0.01)
        text = await scrape(gw.admin_port)
        assert value(text, "gateway_requests_total", code="2xx", reason="sandbox", protocol="h2") == 3
        assert value(text, "gateway_requests_total", code="5xx", reason="sandbox_not_found", protocol="h2") == 1
        assert value(text, "gateway_requests_total", code="2xx", reason="sandbox", protocol="http/1.1") == 1
        assert value(text, "gateway_http2_connections") == 1
        assert value(text, "gateway_http2_streams") == 4
        release.set()
        for sid in waiting:
            await c.response(sid)
        c.close()
        async with asyncio.timeout(WAIT):
            while not log.exists() or len(log_lines(log)) < 9:
                await asyncio.sleep(0.05)
        lines = log_lines(log)
        assert sorted(x["protocol"] for x in lines) == ["h2"] * 8 + ["http/1.1"]
        first = lines[0]
        assert (first["method"], first["host"], first["path"], first["status"]) == ("GET", host, "/h2", 200)


async def test_h2load_and_nghttp(start_gateway: Any, catalog: Catalog) -> None:
    """nghttp2's own clients: h2load's 200 requests on 2 connections x 10 streams all succeed;
    nghttp's verbose run shows the SETTINGS the gateway sends (RFC 8441's included)."""
    h2load = needs.tool("h2load", "apt-get install nghttp2-client")
    nghttp = needs.tool("nghttp", "apt-get install nghttp2-client")
    async with RawUpstream(echo_handler) as up:
        catalog.put("ng", host="127.0.0.1")
        gw = await start_gateway()
        host = gw.host(up.port, "ng")
        out = await asyncio.to_thread(
            subprocess.run, [h2load, "-n200", "-c2", "-m10", "-H", f":authority: {host}", f"http://127.0.0.1:{gw.port}/"],
            capture_output=True, text=True, timeout=WAIT * 3, check=False,
        )  # fmt: skip
        assert "200 succeeded, 0 failed, 0 errored" in out.stdout, out.stdout[-500:]
        assert "status codes: 200 2xx" in out.stdout
        out = await asyncio.to_thread(
            subprocess.run, [nghttp, "-nv", "-H", f":authority: {host}", f"http://127.0.0.1:{gw.port}/ng"],
            capture_output=True, text=True, timeout=WAIT, check=False,
        )  # fmt: skip
        assert out.returncode == 0, out.stdout[-500:]
        assert "SETTINGS_MAX_CONCURRENT_STREAMS(0x03):100" in out.stdout
        assert "SETTINGS_ENABLE_CONNECT_PROTOCOL(0x08):1" in out.stdout
        assert ":status: 200" in out.stdout


async def test_expect_100_continue_over_h2(start_gateway: Any, catalog: Catalog) -> None:
    """The gateway answers ``expect: 100-continue`` with a 100 HEADERS once the sandbox is connected
    (as over HTTP/1.1: the Expect field is not forwarded), and the body follows."""
    async with RawUpstream(echo_handler) as up:
        catalog.put("ex", host="127.0.0.1")
        gw = await start_gateway()
        c = await H2Client.connect(gw.port)
        sid = c.start(gw.host(up.port, "ex"), "/up", method="POST",
                      headers=[("content-length", "5"), ("expect", "100-continue")], end=False)  # fmt: skip
        r = c.responses[sid]
        async with asyncio.timeout(WAIT):
            while not r.interim:
                c.changed.clear()
                await c.changed.wait()
        assert r.interim == [[(b":status", b"100")]]
        c.send_body(sid, b"hello", end=True)
        r = await c.response(sid)
        assert r.status == 200 and bytes(r.body).endswith(b"body=5")
        assert b"expect" not in bytes(r.body).lower()
        c.close()


async def test_a_response_head_larger_than_a_frame(start_gateway: Any, catalog: Catalog) -> None:
    """A response head whose HPACK block exceeds the client's frame size (16,384) goes as HEADERS and
    CONTINUATION frames, every field intact, twice on one connection (the second time from the
    remembered block), and so do trailers that large (in lines of at most 8 KiB, framing.MAX_LINE)."""
    big = "".join(f"{i:05x}" for i in range(8000))  # 40,000 characters that Huffman coding barely shrinks
    late = [big[i : i + 7000] for i in range(0, 35000, 7000)]

    async def sandbox(c: UpstreamConn) -> None:
        while True:
            await c.read_request()
            c.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Big: %s\r\n\r\n" % big.encode())
            lines = "".join(f"X-Late-{i}: {v}\r\n" for i, v in enumerate(late)).encode()
            c.send(b"2\r\nok\r\n0\r\n" + lines + b"\r\n")

    async with RawUpstream(sandbox) as up:
        catalog.put("bighead", host="127.0.0.1")
        gw = await start_gateway()
        c = await H2Client.connect(gw.port)
        for _ in range(2):
            r = await c.request(gw.host(up.port, "bighead"), "/", headers=[("te", "trailers")])
            assert r.status == 200 and r.reset is None
            assert r.header(b"x-big") == big.encode()
            assert bytes(r.body) == b"ok"
            assert r.trailers == [(f"x-late-{i}".encode(), v.encode()) for i, v in enumerate(late)]
        assert c.goaway is None
        c.close()
