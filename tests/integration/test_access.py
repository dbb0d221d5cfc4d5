"""The record's access fields through a running gateway: state, traffic tokens, ports, and the
shared-host routing fields SDKs use to reach many sandboxes over one connection."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tests.conftest import WAIT, Catalog
from tests.helpers import Client, RawUpstream, echo_handler, request

TOKEN = "e2b-traffic-access-token"


@pytest.mark.parametrize(
    ("state", "status", "reason", "retry_after"),
    [
        ("paused", 409, b"sandbox_paused", None),
        ("pausing", 409, b"sandbox_transitioning", b"1"),
        ("resuming", 409, b"sandbox_transitioning", b"1"),
        ("starting", 409, b"sandbox_transitioning", b"1"),
        ("stopping", 409, b"sandbox_transitioning", b"1"),
    ],
)
async def test_states_other_than_running_are_not_routed(
    start_gateway: Any, catalog: Catalog, state: str, status: int, reason: bytes, retry_after: bytes | None
) -> None:
    async with RawUpstream(echo_handler) as up:
        catalog.put("st", host="127.0.0.1", state=state)
        gw = await start_gateway()
        r = await request(gw.port, gw.host(up.port, "st"))
        assert (r.status, r.header("X-Gateway-Reason"), r.header("Retry-After")) == (status, reason, retry_after)
        assert up.conns == []
        catalog.put("st", host="127.0.0.1", state="running")  # announced: the gateway learns of it at once
        async with asyncio.timeout(WAIT):  # (the message travels through Redis: poll, bounded)
            while (await request(gw.port, gw.host(up.port, "st"))).status != 200:
                await asyncio.sleep(0.01)


async def test_traffic_token_is_required_checked_and_removed(start_gateway: Any, catalog: Catalog) -> None:
    async with RawUpstream(echo_handler) as up:
        catalog.put("priv", host="127.0.0.1", traffic_access_token="tok-of-priv")
        gw = await start_gateway()
        host = gw.host(up.port, "priv")
        r = await request(gw.port, host)
        assert (r.status, r.header("X-Gateway-Reason")) == (403, b"traffic_token_missing")
        r = await request(gw.port, host, headers={TOKEN: "tok-of-pri"})
        assert (r.status, r.header("X-Gateway-Reason")) == (403, b"traffic_token_invalid")
        r = await request(gw.port, host, headers={TOKEN: "TOK-OF-PRIV"})
        assert r.status == 403
        assert up.conns == []  # nothing reached the sandbox
        r = await request(gw.port, host, headers={"E2B-Traffic-Access-Token": "tok-of-priv", "A": "b"})
        assert r.status == 200
        assert b"tok-of-priv" not in r.body and b"access-token" not in r.body.lower()  # never forwarded
        assert b"A: b\r\n" in r.body


async def test_one_sandboxs_token_never_opens_another(start_gateway: Any, catalog: Catalog) -> None:
    async with RawUpstream(echo_handler) as a, RawUpstream(echo_handler) as b:
        catalog.put("sba", host="127.0.0.1", traffic_access_token="token-a")
        catalog.put("sbb", host="127.0.0.1", traffic_access_token="token-b")
        gw = await start_gateway()
        c = await Client.connect(gw.port)  # one connection, as a load balancer would use
        assert (await c.request(gw.host(a.port, "sba"), headers={TOKEN: "token-a"})).status == 200
        r = await c.request(gw.host(b.port, "sbb"), headers={TOKEN: "token-a"})
        assert (r.status, r.header("X-Gateway-Reason")) == (403, b"traffic_token_invalid")
        # Sandbox A's token on A's host, but B's port: still B is never reached.
        r = await c.request(gw.host(b.port, "sba"), headers={TOKEN: "token-b"})
        assert r.status == 403
        assert b.conns == []
        assert (await c.request(gw.host(b.port, "sbb"), headers={TOKEN: "token-b"})).status == 200
        await c.close()


async def test_exempt_ports_need_no_token(start_gateway: Any, catalog: Catalog) -> None:
    async with RawUpstream(echo_handler) as daemon, RawUpstream(echo_handler) as app:
        catalog.put("ex", host="127.0.0.1", traffic_access_token="t")
        gw = await start_gateway(token_exempt_ports=[daemon.port])
        assert (await request(gw.port, gw.host(daemon.port, "ex"))).status == 200
        assert (await request(gw.port, gw.host(app.port, "ex"))).status == 403


async def test_token_field_name_is_configurable(start_gateway: Any, catalog: Catalog) -> None:
    async with RawUpstream(echo_handler) as up:
        catalog.put("named", host="127.0.0.1", traffic_access_token="t")
        gw = await start_gateway(traffic_token_header="X-Sandbox-Token")
        host = gw.host(up.port, "named")
        assert (await request(gw.port, host, headers={TOKEN: "t"})).status == 403
        r = await request(gw.port, host, headers={"x-sandbox-token": "t"})
        assert r.status == 200 and b"x-sandbox-token" not in r.body


async def test_ports_limit_what_is_routable(start_gateway: Any, catalog: Catalog) -> None:
    async with RawUpstream(echo_handler) as open_, RawUpstream(echo_handler) as hidden:
        catalog.put("ports", host="127.0.0.1", ports=[open_.port])
        gw = await start_gateway()
        assert (await request(gw.port, gw.host(open_.port, "ports"))).status == 200
        r = await request(gw.port, gw.host(hidden.port, "ports"))
        assert (r.status, r.header("X-Gateway-Reason")) == (403, b"port_not_exposed")
        assert hidden.conns == []


async def test_shared_host_routes_by_fields_over_one_connection(start_gateway: Any, catalog: Catalog) -> None:
    async with RawUpstream(echo_handler) as a, RawUpstream(echo_handler) as b:
        catalog.put("one", host="127.0.0.1")
        catalog.put("two", host="127.0.0.1", traffic_access_token="t2")
        gw = await start_gateway(shared_hosts=["sandbox.e2b.test"])
        c = await Client.connect(gw.port)
        for host in ("sandbox.e2b.test", f"127.0.0.1:{gw.port}", "localhost", "[::1]"):
            r = await c.request(host, "/x", headers={"E2b-Sandbox-Id": "one", "E2b-Sandbox-Port": str(a.port)})
            assert r.status == 200 and b"GET /x " in r.body, host
            assert b"E2b-Sandbox-Id: one" in r.body  # routing fields pass unchanged
        r = await c.request("sandbox.e2b.test", headers={"e2b-sandbox-id": "two", "e2b-sandbox-port": str(b.port)})
        assert r.status == 403  # the record's policy applies the same way
        r = await c.request(
            "sandbox.e2b.test", headers={"e2b-sandbox-id": "two", "e2b-sandbox-port": str(b.port), TOKEN: "t2"}
        )
        assert r.status == 200
        assert len(a.conns) == 1 and len(b.conns) == 1
        r = await c.request("sandbox.e2b.test", headers={"E2b-Sandbox-Id": "one"})
        assert (r.status, r.header("X-Gateway-Reason")) == (400, b"missing_routing_header")
        r = await c.request("sandbox.e2b.test", headers={"E2b-Sandbox-Port": "3000"})
        assert (r.status, r.header("X-Gateway-Reason")) == (400, b"missing_routing_header")
        r = await c.request("sandbox.e2b.test", headers={"E2b-Sandbox-Id": "On-e", "E2b-Sandbox-Port": "3000"})
        assert (r.status, r.header("X-Gateway-Reason")) == (400, b"invalid_routing_header")
        r = await c.request("sandbox.e2b.test", headers={"E2b-Sandbox-Id": "one", "E2b-Sandbox-Port": "0"})
        assert (r.status, r.header("X-Gateway-Reason")) == (400, b"invalid_routing_header")
        await c.close()


async def test_routing_fields_are_ignored_on_a_sandbox_host(start_gateway: Any, catalog: Catalog) -> None:
    async with RawUpstream(echo_handler) as a, RawUpstream(echo_handler) as b:
        catalog.put("one", host="127.0.0.1")
        catalog.put("two", host="127.0.0.1")
        gw = await start_gateway(shared_hosts=["sandbox.e2b.test"])
        r = await request(
            gw.port, gw.host(a.port, "one"), headers={"E2b-Sandbox-Id": "two", "E2b-Sandbox-Port": str(b.port)}
        )
        assert r.status == 200 and len(a.conns) == 1 and b.conns == []
        r = await request(gw.port, gw.host(a.port, "one"), headers={"E2b-Sandbox-Id": "two"})
        assert r.status == 200  # one field alone is no error either: the Host routes


async def test_shared_host_without_fields_is_not_a_sandbox(start_gateway: Any) -> None:
    gw = await start_gateway(shared_hosts=["sandbox.e2b.test"])
    r = await request(gw.port, "sandbox.e2b.test")
    assert (r.status, r.header("X-Gateway-Reason")) == (400, b"missing_routing_header")
