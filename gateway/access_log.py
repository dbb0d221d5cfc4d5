"""The access log: one JSON object per line, per request and per finished tunnel.

Fields (absent values are null)::

    {"time": "2026-11-26T12:00:00.123Z", "type": "request" | "tunnel", "request_id": "...",
     "client_ip": "...", "protocol": "http/1.1" | "h2", "method": "GET", "host": "3000-abc.e2b.dev", "path": "/x",
     "sandbox_id": "abc", "port": 3000, "status": 200, "reason": "sandbox" | "<reason code>",
     "bytes_in": 123, "bytes_out": 456, "duration_ms": 1.234, "upstream_connect_ms": 0.321 | null,
     "upstream_addr": "10.0.0.7:3000" | null}

``reason`` is ``sandbox`` when the sandbox answered, else the gateway's reason code (docs/reasons.md),
``client_closed`` (status 499, nginx's convention) when the client went away first. The query string
is dropped unless ``access_log_query`` is set: it often carries tokens. ``bytes_in`` counts what the
client sent (head and body), ``bytes_out`` what the sandbox sent (or the gateway's own answer).

Lines are built with plain string formatting (JSON escaping only for the few values that need it;
method, host and path once per distinct request head) and written in batches: the loop's one-second
tick flushes, as does a full buffer, so a request costs no system call. Still, a line costs about
4 µs of Python, a quarter of the CPU a small proxied request needs (docs/development.md), so the log
is off by default, as in Envoy and Traefik; ``access_log = "stdout"`` turns it on.
"""

from __future__ import annotations

import json
import re
import sys
import time
from typing import IO

__all__ = ["AccessLog"]

_NEEDS_ESCAPE = re.compile(rb'["\\\x00-\x1f\x7f-\xff]')
_FLUSH_LINES = 256


def _js(v: bytes | None) -> str:
    """A JSON string for header-derived bytes (validated by llhttp, but may hold quotes or UTF-8)."""
    if v is None:
        return "null"
    if _NEEDS_ESCAPE.search(v) is None:
        return '"' + v.decode("ascii") + '"'
    return json.dumps(v.decode("utf-8", "backslashreplace"))


class AccessLog:
    __slots__ = ("_buf", "_sec", "_stamp", "keep_query", "out")

    def __init__(self, out: IO[str], keep_query: bool = False) -> None:
        self.out = out
        self.keep_query = keep_query
        self._buf: list[str] = []
        self._sec = -1
        self._stamp = ""

    @classmethod
    def open(cls, target: str, keep_query: bool) -> AccessLog | None:
        """``stdout``, ``stderr``, a file path (appended to), or ``off``."""
        if target == "off":
            return None
        if target in ("stdout", "stderr"):
            return cls(sys.stdout if target == "stdout" else sys.stderr, keep_query)
        return cls(open(target, "a", buffering=1 << 16), keep_query)  # lives as long as the worker

    def head_part(self, method: bytes | None, host: bytes | None, target: bytes | None) -> str:
        """The ``"method","host","path"`` members: the caller keeps them with the request head, which
        repeats on a connection (polling, a load balancer's health checks) and is analysed once."""
        if target is not None and not self.keep_query:
            q = target.find(b"?")
            if q >= 0:
                target = target[:q]
        return f'"method":{_js(method)},"host":{_js(host)},"path":{_js(target)}'

    def log(
        self,
        kind: str,
        request_id: bytes,
        client_ip: str,
        protocol: str,
        head_part: str,
        sandbox_id: str | None,
        port: int | None,
        status: int,
        reason: str,
        bytes_in: int,
        bytes_out: int,
        duration: float,
        connect: float | None,
        upstream: str | None,
    ) -> None:
        now = time.time()
        sec = int(now)
        if sec != self._sec:  # the date part changes once a second
            self._sec = sec
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
        self._buf.append(
            f'{{"time":"{self._stamp}.{int((now - sec) * 1000):03d}Z","type":"{kind}",'
            f'"request_id":{_js(request_id) if request_id else "null"},"client_ip":"{client_ip}",'
            f'"protocol":"{protocol}",{head_part},'
            f'"sandbox_id":{"null" if sandbox_id is None else chr(34) + sandbox_id + chr(34)},'
            f'"port":{"null" if port is None else port},"status":{status},"reason":"{reason}",'
            f'"bytes_in":{bytes_in},"bytes_out":{bytes_out},"duration_ms":{duration * 1000:.3f},'
            f'"upstream_connect_ms":{"null" if connect is None else f"{connect * 1000:.3f}"},'
            f'"upstream_addr":{"null" if upstream is None else chr(34) + upstream + chr(34)}}}\n'
        )
        if len(self._buf) >= _FLUSH_LINES:
            self.flush()

    def flush(self) -> None:
        if self._buf:
            buf, self._buf = self._buf, []
            try:
                self.out.write("".join(buf))
                self.out.flush()
            except (OSError, ValueError):
                pass  # a closed or full log destination must not take the data plane down
