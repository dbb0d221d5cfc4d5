"""``gateway catalog put|get|rm|ls|link``: the writer API from a shell, for operators and scripts.

It connects with the same settings as ``gateway serve`` (``--config``, ``--redis-url`` and the
``GATEWAY_*`` environment, Cluster and Sentinel included) and writes records exactly as
:class:`~gateway.catalog.writer.CatalogWriter` does, invalidation message included. Output is JSON
(one object per line for ``ls``) so scripts can parse it. ``link`` prints ``{"sandboxId", "port",
"url", "expires"}``: a signed access link (gateway/access.py) made with the record's token. Exit
status: 0 done, 1 not found or invalid record, 2 bad usage or setting (a public sandbox needs no
link), 3 Redis unreachable.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Any

from gateway.catalog.connection import REDIS_ERRORS, connect
from gateway.catalog.record import STATES, RecordError, SandboxRecord
from gateway.catalog.writer import CatalogWriter
from gateway.config import Config

__all__ = ["add_parser", "run"]


def _ports(v: str) -> frozenset[int]:
    try:
        ports = frozenset(int(p) for p in v.split(",") if p.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{v!r} is not a comma-separated list of ports") from None
    if not ports or not all(0 < p < 65536 for p in ports):
        raise argparse.ArgumentTypeError("ports must be 1-65535")
    return ports


def _port(v: str) -> int:
    if not v.isdigit() or not 0 < int(v) < 65536:
        raise argparse.ArgumentTypeError(f"{v!r} is not a port (1-65535)")
    return int(v)


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("catalog", help="read and write catalog records", parents=[common])
    cmds = p.add_subparsers(dest="catalog_command", required=True)
    put = cmds.add_parser("put", help="store a record and announce it")
    put.add_argument("sandbox_id", metavar="ID")
    put.add_argument("--host", required=True, metavar="ADDR", help="address to connect to")
    put.add_argument("--execution-id", default="", metavar="E", help="this lifecycle of the sandbox")
    put.add_argument("--token", metavar="T", help="traffic_access_token requests must carry")
    put.add_argument("--state", default="running", choices=sorted(STATES))
    put.add_argument("--ttl", type=int, metavar="SECONDS", help="expire the record after this long")
    put.add_argument("--mask-host", metavar="H", help="mask_request_host, e.g. 'localhost:${PORT}'")
    put.add_argument("--ports", type=_ports, metavar="P,P", help="only these ports are routable")
    get = cmds.add_parser("get", help="print a record")
    get.add_argument("sandbox_id", metavar="ID")
    rm = cmds.add_parser("rm", help="delete a record and announce it")
    rm.add_argument("sandbox_id", metavar="ID")
    cmds.add_parser("ls", help="list every record, one JSON object per line")
    link = cmds.add_parser("link", help="mint a signed link that opens a private sandbox's port in a browser")
    link.add_argument("sandbox_id", metavar="ID")
    link.add_argument("port", type=_port, metavar="PORT")
    link.add_argument("--ttl", type=int, default=3600, metavar="SECONDS", help="valid this long (default 3600)")
    link.add_argument("--any-port", action="store_true", help="the link opens every port of the sandbox")
    link.add_argument("--path", default="/", help="path (and query) the link opens (default /)")
    link.add_argument("--scheme", default="https", choices=("https", "http"))
    link.add_argument(
        "--domain",
        dest="link_domain",
        metavar="D",
        help="domain (with :port if not the default); default: the first of 'domains'",
    )


def _doc(sandbox_id: str, rec: SandboxRecord) -> dict[str, Any]:
    return {
        "sandboxId": sandbox_id,
        "host": rec.address,
        "execution_id": rec.execution_id,
        "state": rec.state,
        "traffic_access_token": rec.traffic_access_token,
        "mask_request_host": rec.mask_request_host,
        "ports": sorted(rec.ports) if rec.ports is not None else None,
    }


async def _run(cfg: Config, args: argparse.Namespace) -> int:
    client = connect(cfg, timeout=max(cfg.redis_timeout, 5.0))
    w = CatalogWriter(client, cfg.catalog_prefix, cfg.invalidate_channel)
    try:
        cmd = args.catalog_command
        if cmd == "put":
            if args.ttl is not None and args.ttl <= 0:
                print("gateway: --ttl must be positive", file=sys.stderr)
                return 2
            rec = SandboxRecord(args.host, args.execution_id, args.state, args.token, args.mask_host, args.ports)
            await w.put(args.sandbox_id, rec, ttl=args.ttl)
            print(json.dumps(_doc(args.sandbox_id, rec)))
            return 0
        if cmd == "get":
            try:
                got = await w.get(args.sandbox_id)
            except RecordError as e:
                print(f"gateway: record {args.sandbox_id} is invalid: {e}", file=sys.stderr)
                return 1
            if got is None:
                print(f"gateway: no record for {args.sandbox_id}", file=sys.stderr)
                return 1
            print(json.dumps(_doc(args.sandbox_id, got)))
            return 0
        if cmd == "link":
            if args.ttl <= 0:
                print("gateway: --ttl must be positive", file=sys.stderr)
                return 2
            now = int(time.time())
            try:
                url = await w.link(
                    args.sandbox_id, args.port, args.link_domain or cfg.domains[0], args.ttl, any_port=args.any_port,
                    scheme=args.scheme, path=args.path, param=cfg.access_link_param, now=now,
                )  # fmt: skip
            except (LookupError, RecordError) as e:
                print(f"gateway: {e}", file=sys.stderr)
                return 1
            doc = {"sandboxId": args.sandbox_id, "port": args.port, "url": url, "expires": now + args.ttl}
            print(json.dumps(doc))
            return 0
        if cmd == "rm":
            if not await w.delete(args.sandbox_id):
                print(f"gateway: no record for {args.sandbox_id}", file=sys.stderr)
                return 1
            return 0
        async for sandbox_id, r in w.scan():
            line = _doc(sandbox_id, r) if isinstance(r, SandboxRecord) else {"sandboxId": sandbox_id, "invalid": str(r)}
            print(json.dumps(line))
        return 0
    except ValueError as e:  # a bad sandbox ID or address
        print(f"gateway: {e}", file=sys.stderr)
        return 2
    except REDIS_ERRORS as e:
        print(f"gateway: catalog Redis unreachable: {e}", file=sys.stderr)
        return 3
    finally:
        await client.aclose()


def run(cfg: Config, args: argparse.Namespace) -> int:
    if cfg.embedded:
        print(
            "gateway: catalog: no Redis configured (--redis-url, GATEWAY_REDIS_URL or a config file)", file=sys.stderr
        )
        return 2
    return asyncio.run(_run(cfg, args))
