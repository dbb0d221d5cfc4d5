"""What each scenario sends, with which load generator, and how its output is read.

wrk for HTTP/1.1, h2load for HTTP/2 with prior knowledge, ws.py for the WebSocket echo. Each
result is a ``Sample``: units served (requests, MiB, messages), latency, errors.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

__all__ = ["SCENARIOS", "Sample", "Scenario", "load_command", "parse"]

MIB = 1024 * 1024
BIG = 10 * MIB  # the download and the upload body
HERE = Path(__file__).resolve().parent

# A browser's navigation request: the head a real page costs (about 900 bytes).
BROWSER_HEADERS = (
    "User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0.0.0 Safari/537.36",
    "Accept: text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,*/*;q=0.8",
    "Accept-Language: en-US,en;q=0.9",
    "Accept-Encoding: gzip, deflate, br, zstd",
    "Cookie: _ga=GA1.1.1234567890.1700000000; session=abcdef0123456789abcdef0123456789; theme=dark; "
    "_ga_X1Y2Z3=GS1.1.1700000000.1.1.1700000001.0.0.0",
    "Referer: https://{host}/index.html",
    'Sec-Ch-Ua: "Chromium";v="126", "Not.A/Brand";v="24"',
    "Sec-Ch-Ua-Mobile: ?0",
    'Sec-Ch-Ua-Platform: "Linux"',
    "Sec-Fetch-Dest: document",
    "Sec-Fetch-Mode: navigate",
    "Sec-Fetch-Site: same-origin",
    "Upgrade-Insecure-Requests: 1",
    "Cache-Control: max-age=0",
)


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    what: str
    tool: Literal["wrk", "h2load", "ws"]
    path: str = "/"
    conns: int = 64
    unit: str = "req/s"
    per: str = "req"
    headline: Literal["cpu", "rate", "p50"] = "cpu"  # the ratio the summary line shows
    share: float = 1.0  # of --duration


SCENARIOS = {
    s.name: s
    for s in (
        Scenario("small", "GET / -> `ok\\n`, keep-alive, 64 connections", "wrk"),
        Scenario("real", "GET /real.html: 1 KiB page, 14 browser request headers, 15 response headers", "wrk",
                 path="/real.html"),
        Scenario("big", "GET /big.bin: 10 MiB download, 8 connections", "wrk", path="/big.bin", conns=8,
                 unit="MiB/s", per="MiB", headline="rate"),
        Scenario("upload", "POST /upload: 10 MiB body, read whole by the backend, 8 connections", "wrk",
                 path="/upload", conns=8, unit="MiB/s", per="MiB", headline="rate"),
        Scenario("c1", "GET / on one connection: the latency of one hop", "wrk", conns=1, headline="p50", share=0.5),
        Scenario("ws", "WebSocket echo: 16 connections x 8 messages in flight, 128 B", "ws", conns=16,
                 unit="msgs/s", per="msg", headline="rate", share=0.8),
        Scenario("h2", "HTTP/2 with prior knowledge: GET /, 8 connections x 16 streams", "h2load", conns=8),
    )
}


@dataclass(frozen=True, slots=True)
class Sample:
    units: float  # requests, MiB or messages
    seconds: float
    p50_ms: float | None
    p99_ms: float | None
    errors: int

    @property
    def rate(self) -> float:
        return self.units / self.seconds if self.seconds else 0.0


def load_command(sc: Scenario, tools: dict[str, str], port: int, host: str, seconds: float, lua: Path) -> list[str]:
    url = f"http://127.0.0.1:{port}{sc.path}"
    if sc.tool == "ws":
        return [tools["python"], str(HERE / "ws.py"), "load", str(port), host, "--conns", str(sc.conns),
                "--seconds", f"{seconds:g}"]  # fmt: skip
    if sc.tool == "h2load":
        return [tools["h2load"], "-t1", f"-c{sc.conns}", "-m16", f"-D{max(1, round(seconds))}", "-H",
                f":authority: {host}", url]  # fmt: skip
    cmd = [tools["wrk"], "-t1", f"-c{sc.conns}", f"-d{max(1, round(seconds))}s", "--latency", "--timeout", "10s",
           "-H", f"Host: {host}"]  # fmt: skip
    if sc.name == "real":
        for h in BROWSER_HEADERS:
            cmd += ["-H", h.replace("{host}", host)]
    if sc.name == "upload":
        cmd += ["-s", str(lua)]
    return [*cmd, url]


_SCALE = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4, "h": 3.6e6}  # to milliseconds


def _ms(value: str, unit: str) -> float:
    return float(value) * _SCALE[unit]


def parse(sc: Scenario, text: str) -> Sample:
    """The sample in a load generator's output; ValueError if there is none."""
    if sc.tool == "ws":
        r = json.loads(text.strip().splitlines()[-1])
        return Sample(r["messages"], r["seconds"], r["p50_ms"], r["p99_ms"], r["errors"])
    if sc.tool == "h2load":
        return _parse_h2load(text)
    return _parse_wrk(sc, text)


def _parse_wrk(sc: Scenario, text: str) -> Sample:
    m = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m|h), ([\d.]+)([KMGT]?B) read", text)
    if m is None:
        raise ValueError("no 'requests in' line")
    requests, seconds = int(m[1]), _ms(m[2], m[3]) / 1e3
    p = {q: re.search(rf"^\s+{q}%\s+([\d.]+)(us|ms|s|m)\s*$", text, re.M) for q in ("50", "99")}
    p50, p99 = (_ms(x[1], x[2]) if x else None for x in (p["50"], p["99"]))
    errors = sum(int(x) for x in re.findall(r"Non-2xx or 3xx responses: (\d+)", text))
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    errors += sum(int(x) for x in sock.groups()) if sock else 0
    if sc.name == "big":
        units = float(m[4]) * {"B": 1, "KB": 1024, "MB": MIB, "GB": 1024 * MIB, "TB": MIB * MIB}[m[5]] / MIB
    elif sc.name == "upload":
        units = requests * BIG / MIB
    else:
        units = requests
    return Sample(units, seconds, p50, p99, errors)


def _parse_h2load(text: str) -> Sample:
    """h2load prints no percentiles: its mean request time stands in for p50."""
    m = re.search(r"finished in ([\d.]+)(us|ms|s|m|h), [\d.]+ req/s", text)
    done = re.search(r"requests: \d+ total, \d+ started, \d+ done, (\d+) succeeded, (\d+) failed, (\d+) errored", text)
    if m is None or done is None:
        raise ValueError("no 'finished in' and 'requests:' lines")
    codes = re.search(r"status codes: \d+ 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", text)
    mean = re.search(r"time for request:\s+\S+\s+\S+\s+([\d.]+)(us|ms|s)", text)
    errors = int(done[2]) + int(done[3]) + (sum(int(x) for x in codes.groups()) if codes else 0)
    return Sample(int(done[1]), _ms(m[1], m[2]) / 1e3, _ms(mean[1], mean[2]) if mean else None, None, errors)
