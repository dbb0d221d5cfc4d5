"""Requests reach the sandbox and responses come back faithfully (real sockets, real Redis)."""

from __future__ import annotations

import asyncio
import gzip
import re
import subprocess
import sys
from typing import Any

import aiohttp
import pytest

from tests import needs
from tests.conftest import WAIT, Catalog, RunningGateway
from tests.helpers import Client, RawUpstream, UpstreamConn, echo_handler, request, response


def fwd_lines(host: str, port: int, ip: str = "127.0.0.1") -> bytes:
    return (
        f"X-Forwarded-For: {ip}\r\nX-Forwarded-Proto: http\r\nX-Forwarded-Port: {port}\r\n"
        f'Forwarded: for={ip};proto=http;host="{host}"\r\nX-Forwarded-Host: {host}\r\n\r\n'
    ).encode()


async def test_request_bytes_reach_the_sandbox_as_sent(start_gateway: Any, catalog: Catalog) -> None:
    async with RawUpstream(echo_handler) as up:
        catalog.put("abc", host="127.0.0.1")
        gw: RunningGateway = await start_gateway()
        host = gw.host(up.port, "abc")
        head = (
            f"GET /a%2Fb/%20c?x=%41&y=1;z&q=a%20b HTTP/1.1\r\nHost: {host}\r\nUser-Agent: test/1\r\n"
            "accept:   */*\r\nX-Dup: 1\r\nx-dup: 2\r\nCookie: a=b; c=d\r\nConnection: keep-alive\r\n\r\n"
        ).encode()
        c = await Client.connect(gw.port)
        c.send(head)
        r = await c.read_response()
        assert r.status == 200
        rid = r.header("X-Request-ID")
        assert rid is not None and re.fullmatch(rb"[0-9a-f]{12}-[0-9a-f]+", rid)
        expected = head.replace(b"Connection: keep-alive\r\n", b"")[:-2] + fwd_lines(host, gw.port)
        # plus the request ID, last, the same the client was told
        assert bytes(up.received) == expected[:-2] + b"X-Request-ID: " + rid + b"\r\n\r\n"
        await c.close()


async def test_post_bodies_both_framings(start_gateway: Any, catalog: Catalog) -> None:
    async with RawUpstream(echo_handler) as up:
        catalog.put("abc", host="127.0.0.1")
        gw = await start_gateway()
        host = gw.host(up.port, "abc")
        c = await Client.connect(gw.port)
        r = await c.request(host, "/p", "POST", body=b"x" * 100_000)
        assert r.status == 200 and r.body.endswith(b"body=100000")
        chunked = b"5;ext=1\r\nhello\r\n3\r\nabc\r\n0\r\nX-Trailer: t\r\n\r\n"
        c.send(f"POST /c HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n\r\n".encode() + chunked)
        r = await c.read_response()
        assert r.status == 200
        # Chunks, extensions and trailers pass unchanged (issue 10, point 1: the sandbox connection
        # that carried a trailer field is then closed, not pooled: test_ambiguity.py).
        assert up.received.endswith(chunked)
        await c.close()


async def test_keep_alive_pool_and_per_request_routing(start_gateway: Any, catalog: Catalog) -> None:
    async with RawUpstream(echo_handler) as a, RawUpstream(echo_handler) as b:
        catalog.put("one", host="127.0.0.1")
        catalog.put("two", host="127.0.0.1")
        gw = await start_gateway()
        c = await Client.connect(gw.port)
        for i in range(6):  # one client connection, requests for two sandboxes interleaved
            sid, up = ("one", a) if i % 2 == 0 else ("two", b)
            r = await c.request(gw.host(up.port, sid), f"/{i}")
            assert r.status == 200 and f"GET /{i} ".encode() in r.body
        assert len(a.conns) == 1 and len(b.conns) == 1  # upstream connections were reused
        await c.close()


async def test_pipelined_requests_are_answered_in_order(start_gateway: Any, catalog: Catalog) -> None:
    async def slow_first(c: UpstreamConn) -> None:
        while True:
            head, _ = await c.read_request()
            if b"/slow" in head:  # answered after the next requests already arrived at the gateway
                await asyncio.sleep(0.05)
            c.send(response(200, head.split(b" ")[1]))

    async with RawUpstream(slow_first) as a, RawUpstream(echo_handler) as b:
        catalog.put("one", host="127.0.0.1")
        catalog.put("two", host="127.0.0.1")
        gw = await start_gateway()
        c = await Client.connect(gw.port)
        h1, h2 = gw.host(a.port, "one"), gw.host(b.port, "two")
        c.send(
            f"GET /slow HTTP/1.1\r\nHost: {h1}\r\n\r\nPOST /b HTTP/1.1\r\nHost: {h2}\r\nContent-Length: 3\r\n\r\nxyz"
            f"GET /fast HTTP/1.1\r\nHost: {h1}\r\n\r\nHEAD /h HTTP/1.1\r\nHost: {h2}\r\n\r\n".encode()
        )
        assert (await c.read_response()).body == b"/slow"
        r = await c.read_response()
        assert b"POST /b " in r.body and r.body.endswith(b"body=3")
        assert (await c.read_response()).body == b"/fast"
        r = await c.read_response(b"HEAD")
        assert r.status == 200 and r.body == b""
        # The pipeline has drained: the connection reads on (a second batch used to wait forever).
        c.send(f"GET /again HTTP/1.1\r\nHost: {h1}\r\n\r\nGET /more HTTP/1.1\r\nHost: {h2}\r\n\r\n".encode())
        assert (await c.read_response()).body == b"/again"
        assert b"GET /more " in (await c.read_response()).body
        await c.close()


async def test_response_fidelity(start_gateway: Any, catalog: Catalog) -> None:
    gz = gzip.compress(b"hello " * 100)
    head = (
        b"HTTP/1.1 201 Made It\r\nSet-Cookie: a=1; Path=/\r\nContent-Encoding: gzip\r\nSet-Cookie: b=2\r\n"
        b"Content-Length: %d\r\nX-Thing:  spaced \r\nset-cookie: c=3\r\n\r\n" % len(gz)
    )

    async def handler(c: UpstreamConn) -> None:
        await c.read_request()
        c.send(head + gz)

    async with RawUpstream(handler) as up:
        catalog.put("abc", host="127.0.0.1")
        gw = await start_gateway()
        c = await Client.connect(gw.port)
        r = await c.request(gw.host(up.port, "abc"), "/")
        rid = r.header("X-Request-ID")
        assert rid is not None
        # status, reason, order, duplicates, spelling, encoding: unchanged; the request ID added last
        assert r.raw == head[:-2] + b"X-Request-ID: " + rid + b"\r\n\r\n" + gz
        await c.close()


async def test_bodiless_responses(start_gateway: Any, catalog: Catalog) -> None:
    async def handler(c: UpstreamConn) -> None:
        while True:
            head, _ = await c.read_request()
            if head.startswith(b"HEAD"):
                c.send(b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\nContent-Type: text/plain\r\n\r\n")
            elif b"/204" in head:
                c.send(b"HTTP/1.1 204 No Content\r\n\r\n")
            elif b"/304" in head:
                c.send(b'HTTP/1.1 304 Not Modified\r\nETag: "x"\r\nContent-Length: 99\r\n\r\n')
            else:
                c.send(response(200, b"after"))

    async with RawUpstream(handler) as up:
        catalog.put("abc", host="127.0.0.1")
        gw = await start_gateway()
        host = gw.host(up.port, "abc")
        c = await Client.connect(gw.port)
        r = await c.request(host, "/", "HEAD")
        assert r.status == 200 and r.header("Content-Length") == b"1234" and r.body == b""
        r = await c.request(host, "/204")
        assert r.status == 204
        r = await c.request(host, "/304")
        # No body framing fields on a 204 or 304 (issue 10, point 8): RFC 9110 §8.6 lets a 304 state
        # the 200's length, but a client that frames by it (not all follow RFC 9112 §6.3) would
        # take 99 bytes of the next response for its body.
        assert r.status == 304 and r.header("Content-Length") is None and r.header("ETag") == b'"x"'
        r = await c.request(host, "/")  # the connection (and the pooled upstream one) still frame right
        assert r.body == b"after"
        assert len(up.conns) == 1
        await c.close()


async def test_interim_responses_and_trailers(start_gateway: Any, catalog: Catalog) -> None:
    body = b"4\r\nwiki\r\n5\r\npedia\r\n0\r\nServer-Timing: db;dur=53\r\nX-Checksum: abc\r\n\r\n"

    async def handler(c: UpstreamConn) -> None:
        await c.read_request()
        c.send(b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n")
        await asyncio.sleep(0.01)
        c.send(b"HTTP/1.1 200 OK\r\nTrailer: Server-Timing, X-Checksum\r\nTransfer-Encoding: chunked\r\n\r\n" + body)

    async with RawUpstream(handler) as up:
        catalog.put("abc", host="127.0.0.1")
        gw = await start_gateway()
        c = await Client.connect(gw.port)
        c.send(f"GET / HTTP/1.1\r\nHost: {gw.host(up.port, 'abc')}\r\n\r\n".encode())
        hint = await c.read_response(interim=True)
        assert hint.status == 103 and hint.header("Link") == b"</style.css>; rel=preload"
        r = await c.read_response()
        assert r.body == b"wikipedia"
        assert r.trailers == [(b"Server-Timing", b"db;dur=53"), (b"X-Checksum", b"abc")]
        assert r.raw.endswith(body)
        await c.close()


async def test_http10_client(start_gateway: Any, catalog: Catalog) -> None:
    async def handler(c: UpstreamConn) -> None:
        head, _ = await c.read_request()
        assert head.startswith(b"GET /old HTTP/1.1\r\n")  # we speak 1.1 upstream
        c.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n3\r\ndef\r\n0\r\n\r\n")

    async with RawUpstream(handler) as up:
        catalog.put("abc", host="127.0.0.1")
        gw = await start_gateway()
        c = await Client.connect(gw.port)
        c.send(f"GET /old HTTP/1.0\r\nHost: {gw.host(up.port, 'abc')}\r\n\r\n".encode())
        async with asyncio.timeout(WAIT):
            data = await c.reader.read()  # until the gateway closes: an HTTP/1.0 body ends with the connection
        head, _, body = data.partition(b"\r\n\r\n")
        assert body == b"abcdef" and b"chunked" not in head.lower() and b"Connection: close" in head
        await c.close()


CLOSE_DELIMITED_SERVER = """
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # HTTP/1.0, no Content-Length: the body ends when the connection closes
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.end_headers()
        self.wfile.write(b"line %d\\n" % 1 * 1000)
    def log_message(self, *a): pass
s = http.server.HTTPServer(("127.0.0.1", 0), H)
print(s.server_address[1], flush=True)
s.serve_forever()
"""


async def test_close_delimited_response_is_chunked_for_http11(start_gateway: Any, catalog: Catalog) -> None:
    # http.server speaks HTTP/1.0 and, without Content-Length, ends a body by closing.
    proc = subprocess.Popen([sys.executable, "-c", CLOSE_DELIMITED_SERVER], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        catalog.put("abc", host="127.0.0.1")
        gw = await start_gateway()
        c = await Client.connect(gw.port)
        host = gw.host(port, "abc")
        for _ in range(2):  # the client connection stays open across close-delimited responses
            r = await c.request(host, "/")
            assert r.status == 200 and r.body == b"line 1\n" * 1000
            assert r.header("Transfer-Encoding") == b"chunked"
        await c.close()
    finally:
        proc.terminate()
        proc.wait(WAIT)


async def test_sse_events_arrive_as_they_are_written(start_gateway: Any, catalog: Catalog) -> None:
    got = [asyncio.Event() for _ in range(5)]

    async def handler(c: UpstreamConn) -> None:
        await c.read_request()
        c.send(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n\r\n")
        for i in range(5):
            c.send(f"data: event {i}\n\n".encode())
            # The next event is only written once the client has this one: a gateway that buffers
            # makes this wait time out.
            async with asyncio.timeout(WAIT):
                await got[i].wait()
            await asyncio.sleep(0.2)
        c.writer.close()

    async with RawUpstream(handler) as up:
        catalog.put("abc", host="127.0.0.1")
        gw = await start_gateway()
        async with aiohttp.ClientSession() as s:
            url = f"http://127.0.0.1:{gw.port}/events"
            async with s.get(url, headers={"Host": gw.host(up.port, "abc")}) as r:
                assert r.headers["Content-Type"] == "text/event-stream"
                for i in range(5):
                    async with asyncio.timeout(WAIT):
                        line = await r.content.readuntil(b"\n\n")
                    assert line == f"data: event {i}\n\n".encode()
                    got[i].set()


async def test_expect_100_continue(start_gateway: Any, catalog: Catalog) -> None:
    async with RawUpstream(echo_handler) as up:
        catalog.put("abc", host="127.0.0.1")
        gw = await start_gateway()
        c = await Client.connect(gw.port)
        c.send(
            f"PUT /u HTTP/1.1\r\nHost: {gw.host(up.port, 'abc')}\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n".encode()
        )
        interim = await c.read_response(interim=True)
        assert interim.status == 100  # answered once the sandbox is connected, before the body
        c.send(b"hello")
        r = await c.read_response()
        assert r.status == 200 and r.body.endswith(b"body=5") and b"Expect" not in r.body
        # For a sandbox that does not exist the final answer comes instead of 100 Continue.
        c.send(
            f"PUT /u HTTP/1.1\r\nHost: {gw.host(up.port, 'nosuch')}\r\nExpect: 100-continue\r\n"
            "Content-Length: 5\r\n\r\n".encode()
        )
        r = await c.read_response(interim=True)
        assert r.status == 502 and r.header("X-Gateway-Reason") == b"sandbox_not_found"
        await c.close()


@pytest.mark.parametrize("curl_args", [[], ["--http1.0"], ["-X", "POST", "--data-binary", "@docs/reasons.md"]])
async def test_curl(start_gateway: Any, catalog: Catalog, curl_args: list[str]) -> None:
    curl = needs.tool("curl", "apt-get install curl")
    async with RawUpstream(echo_handler) as up:
        catalog.put("abc", host="127.0.0.1")
        gw = await start_gateway()
        proc = await asyncio.create_subprocess_exec(
            curl, "-sS", "--max-time", "10", "-H", f"Host: {gw.host(up.port, 'abc')}", *curl_args,
            f"http://127.0.0.1:{gw.port}/curl?x=1", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await proc.communicate()
        assert proc.returncode == 0, err
        assert b"/curl?x=1 HTTP/1.1" in out and b"User-Agent: curl/" in out


async def test_connect_is_refused(start_gateway: Any, catalog: Catalog) -> None:
    gw = await start_gateway()
    c = await Client.connect(gw.port)
    c.send(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n\x16\x03\x01")
    r = await c.read_response()
    assert r.status == 405 and r.header("X-Gateway-Reason") == b"method_not_allowed"
    assert await c.closed()
    await c.close()


async def test_absolute_form_target(start_gateway: Any, catalog: Catalog) -> None:
    async with RawUpstream(echo_handler) as up:
        catalog.put("abc", host="127.0.0.1")
        gw = await start_gateway()
        host = gw.host(up.port, "abc")
        c = await Client.connect(gw.port)
        c.send(f"GET http://{host}/abs?x=1 HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        r = await c.read_response()
        assert r.status == 200 and f"GET http://{host}/abs?x=1 HTTP/1.1\r\n".encode() in r.body
        c.send(f"GET http://{gw.host(up.port, 'other')}/ HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        r = await c.read_response()
        assert r.status == 400 and r.header("X-Gateway-Reason") == b"invalid_host"
        await c.close()


async def test_idle_pooled_connections_are_closed_after_the_idle_timeout(start_gateway: Any, catalog: Catalog) -> None:
    closed = asyncio.Event()

    async def handler(c: UpstreamConn) -> None:
        try:
            await echo_handler(c)
        finally:
            closed.set()  # the gateway closed its idle connection to us

    async with RawUpstream(handler) as up:
        catalog.put("abc", host="127.0.0.1")
        gw = await start_gateway(upstream_idle_timeout=0.3)
        assert (await request(gw.port, gw.host(up.port, "abc"))).status == 200
        assert gw.gateway.pool.idle_count == 1
        async with asyncio.timeout(WAIT):
            await closed.wait()
        assert gw.gateway.pool.idle_count == 0
