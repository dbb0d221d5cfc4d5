"""Command line: ``gateway serve``, ``gateway check-config`` and ``gateway catalog ...``.

Exit status 2 means a bad setting or usage; the message is one line naming the setting.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import replace
from typing import Any

import uvloop

from gateway.catalog import command as catalog_command
from gateway.config import Config, ConfigError, example_toml, load_config
from gateway.embedded import Embedded
from gateway.hostname import check_domain
from gateway.server import Gateway
from gateway.supervisor import WORKER_DIR_ENV, Supervisor
from gateway.watchdog import LoopWatchdog

__all__ = ["main"]

log = logging.getLogger("gateway")


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="FILE", help="TOML settings file (default: $GATEWAY_CONFIG)")
    common.add_argument("--redis-url", metavar="URL", help="catalog Redis URL")
    serving = argparse.ArgumentParser(add_help=False)
    serving.add_argument("--listen", metavar="HOST:PORT", action="append", help="data-plane listener (repeatable)")
    serving.add_argument("--admin-listen", metavar="HOST:PORT", help="admin listener")
    serving.add_argument("--domain", metavar="DOMAIN", action="append", help="routed domain (repeatable)")
    serving.add_argument("--workers", metavar="N", type=int, help="worker processes (0: one per CPU)")
    ap = argparse.ArgumentParser(prog="gateway", description="Ingress gateway for sandbox apps.")
    sub = ap.add_subparsers(dest="command", required=True)
    for name, help_ in (("serve", "run the gateway"), ("check-config", "validate the configuration and exit")):
        sub.add_parser(name, help=help_, parents=[common, serving])
    catalog_command.add_parser(sub, common)
    return ap


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    o: dict[str, Any] = {}
    if getattr(args, "listen", None):
        o["listen"] = tuple(args.listen)
    if getattr(args, "admin_listen", None):
        o["admin_listen"] = args.admin_listen
    if args.redis_url is not None:
        o["redis_url"] = args.redis_url
    if getattr(args, "domain", None):
        o["domains"] = tuple(args.domain)
    if getattr(args, "workers", None) is not None:
        o["workers"] = args.workers
    return o


def load(args: argparse.Namespace) -> Config:
    path = args.config or os.environ.get("GATEWAY_CONFIG") or None
    return load_config(path, overrides=_overrides(args))


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        cfg = load(args)
    except ConfigError as e:
        print(f"gateway: invalid {e}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=cfg.log_level.upper(), stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.command == "catalog":
        return catalog_command.run(cfg, args)
    for d in cfg.domains:
        _, warning = check_domain(d)
        if warning:
            log.info("domain %s", warning)
    if args.command == "check-config":
        print(example_toml(cfg), end="")
        print("# configuration ok", file=sys.stderr)
        return 0
    worker_dir = os.environ.get(WORKER_DIR_ENV)
    try:
        if worker_dir:
            return uvloop.run(_serve_worker(cfg, worker_dir))
        return uvloop.run(_serve(cfg, argv if argv is not None else sys.argv[1:]))
    except KeyboardInterrupt:
        return 0


async def _started(gw: Gateway, failure: str) -> bool:
    """Start ``gw``; False (``failure: error`` on stderr, everything stopped) when it cannot listen."""
    try:
        await gw.start()
    except OSError as e:
        print(f"{failure}: {e}", file=sys.stderr)
        await gw.stop()
        return False
    return True


async def _serve_worker(cfg: Config, worker_dir: str) -> int:
    """One of several workers: serve until the supervisor passes a signal on."""
    gw = Gateway(cfg, worker_dir=worker_dir, settle=True)
    if not await _started(gw, "gateway: worker cannot listen"):
        return 1
    await gw.serve_until_signalled()
    return 0


async def _serve(cfg: Config, argv: list[str]) -> int:
    embedded: Embedded | None = None
    if cfg.embedded:
        embedded = Embedded(cfg.demo_port)
        try:
            url = await embedded.start(cfg.catalog_prefix)
        except RuntimeError as e:
            print(f"gateway: {e}", file=sys.stderr)
            await embedded.stop()
            return 1
        cfg = replace(cfg, redis_url=url)
    if cfg.workers != 1:
        if any(port == 0 for _, port in cfg.listen_addrs):
            print("gateway: invalid listen: workers share listeners, so port 0 (any) cannot be used", file=sys.stderr)
            return 2
        env = {"GATEWAY_REDIS_URL": cfg.redis_url} if embedded is not None else {}
        try:
            return await Supervisor(cfg, argv, env).run()
        finally:
            if embedded is not None:
                await embedded.stop()
    gw = Gateway(cfg, settle=True)
    try:
        if not await _started(gw, "gateway: cannot listen"):
            return 1
        if cfg.loop_stall_timeout and gw.heartbeat is not None:  # no supervisor: a thread judges the loop
            LoopWatchdog(gw.heartbeat, cfg.loop_stall_timeout).start()
        if embedded is not None:
            host = cfg.listen_addrs[0][0]
            shown = "localhost" if host in ("127.0.0.1", "0.0.0.0", "::1", "::") else host
            print(
                f"gateway: embedded mode (local Redis {embedded.url}); demo sandbox on port {embedded.demo_port}.\n"
                f"Open http://{embedded.demo_port}-demo.{cfg.domains[0]}:{gw.ports[0]}/  "
                f"(or: curl -H 'Host: {embedded.demo_port}-demo.{cfg.domains[0]}' http://{shown}:{gw.ports[0]}/api/info)",
                flush=True,
            )
        await gw.serve_until_signalled()
    finally:
        if embedded is not None:
            await embedded.stop()
    return 0
