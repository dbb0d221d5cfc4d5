"""Prometheus metrics: plain numbers on the hot path, prometheus_client at scrape time.

A prometheus_client ``Counter.inc()`` or ``Histogram.observe()`` takes a lock and costs about a
microsecond; a request touches half a dozen metrics. So each worker counts into the plain ints and
lists of :class:`Metrics` (a dict update and a bisect per request), and a custom collector turns a
*snapshot* of them into metric families only when ``/metrics`` is scraped.

With several workers (``workers`` > 1) every worker writes its snapshot to a file in a shared
directory once a second, and the supervisor's admin app sums the files (:func:`merge`): the
numbers cover all workers, at most a second old. Counters of a worker that died are kept (its
file stays, minus its gauges), so totals never go backwards when a worker is replaced.

No metric has a per-sandbox label: thousands of short-lived sandboxes would each make a new
time series (cardinality); the access log has the per-sandbox detail.
"""

from __future__ import annotations

import collections
import json
import os
import tempfile
import time
from bisect import bisect_left
from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

__all__ = [
    "CONNECT_BUCKETS",
    "DURATION_BUCKETS",
    "LAG_BUCKETS",
    "Metrics",
    "Snapshot",
    "merge",
    "read_snapshots",
    "registry_for",
    "write_snapshot",
]

#: Request duration buckets (seconds): API calls to long downloads.
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
#: Upstream connect buckets (seconds): loopback to a slow cross-node dial.
CONNECT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
#: Event loop lag buckets (seconds), sampled by the watchdog's heartbeat: a busy loop's
#: milliseconds to a stall.
LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
GC_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
_HISTOGRAMS = ("duration", "connect", "loop_lag", "gc_pause")

Snapshot = dict[str, Any]

#: Snapshot keys that are gauges (a dead worker's are dropped when merging).
_GAUGES = ("downstream_connections", "downstream_opening", "upstream_connections", "tunnels", "pool_idle",
           "cached_records", "http2_connections", "http2_streams")  # fmt: skip
_COUNTERS = ("cache_hits", "cache_misses", "cache_stale", "redis_errors", "bytes_in", "bytes_out", "tunnels_total",
             "worker_restarts", "worker_stalls", "trailers_dropped")  # fmt: skip


class Histogram:
    """Cumulative-at-scrape histogram: per-bucket counts (the last one is +Inf) and a sum."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, v: float) -> None:
        self.counts[bisect_left(self.bounds, v)] += 1
        self.sum += v

    def data(self) -> dict[str, Any]:
        """As a snapshot holds it."""
        return {"counts": list(self.counts), "sum": self.sum}


class Metrics:
    """One worker's numbers. The data plane updates the attributes directly."""

    __slots__ = (
        "bytes_in", "bytes_out", "connect", "duration", "gc_pause", "h2_requests", "h2_sandbox_status", "loop_lag",
        "requests", "sandbox_status", "trailers_dropped", "tunnels_total",
    )  # fmt: skip

    def __init__(self) -> None:
        #: (status, reason code) -> requests the gateway answered itself, and status -> requests the
        #: sandbox answered (no tuple to build on the common path); classes are made at scrape time
        self.requests: collections.defaultdict[tuple[int, str], int] = collections.defaultdict(int)
        self.sandbox_status: collections.defaultdict[int, int] = collections.defaultdict(int)
        #: the same for requests that came over HTTP/2 (the metric's ``protocol`` label)
        self.h2_requests: collections.defaultdict[tuple[int, str], int] = collections.defaultdict(int)
        self.h2_sandbox_status: collections.defaultdict[int, int] = collections.defaultdict(int)
        self.duration = Histogram(DURATION_BUCKETS)
        self.connect = Histogram(CONNECT_BUCKETS)
        self.loop_lag = Histogram(LAG_BUCKETS)  # observed by the watchdog's heartbeat
        self.gc_pause = Histogram(GC_BUCKETS)  # observed by collector.PauseClock
        self.bytes_in = 0  # from clients (request heads and bodies, tunnel bytes)
        self.bytes_out = 0  # from sandboxes (responses, tunnel bytes), relayed to clients
        self.tunnels_total = 0
        #: HTTP/2 request trailer sections with fields, not forwarded: the request had content-length
        #: (its HTTP/1.1 body is framed by Content-Length, after which a trailer section cannot follow)
        self.trailers_dropped = 0

    def snapshot(self, gauges: dict[str, float], counters: dict[str, float]) -> Snapshot:
        """Everything as JSON-able data; ``gauges``/``counters`` come from the rest of the worker."""
        return {
            "requests": [[_class(s), r, "http/1.1", n] for (s, r), n in self.requests.items()]
            + [[_class(s), "sandbox", "http/1.1", n] for s, n in self.sandbox_status.items()]
            + [[_class(s), r, "h2", n] for (s, r), n in self.h2_requests.items()]
            + [[_class(s), "sandbox", "h2", n] for s, n in self.h2_sandbox_status.items()],
            "duration": self.duration.data(),
            "connect": self.connect.data(),
            "loop_lag": self.loop_lag.data(),
            "gc_pause": self.gc_pause.data(),
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "tunnels_total": self.tunnels_total,
            "trailers_dropped": self.trailers_dropped,
            **counters,
            **gauges,
        }


_CLASSES = ("0xx", "1xx", "2xx", "3xx", "4xx", "5xx")


def _class(status: int) -> str:
    return _CLASSES[status // 100] if 0 <= status < 600 else "5xx"


def _add_hist(into: dict[str, Any], h: dict[str, Any]) -> None:
    if not into:
        into.update(counts=list(h["counts"]), sum=h["sum"])
        return
    into["counts"] = [a + b for a, b in zip(into["counts"], h["counts"], strict=True)]
    into["sum"] += h["sum"]


def merge(snapshots: Iterable[tuple[Snapshot, bool]]) -> Snapshot:
    """Sum worker snapshots; ``(snapshot, alive)``: a dead worker's gauges are left out."""
    out: Snapshot = {"requests": {}, "workers": 0} | {k: {} for k in _HISTOGRAMS}
    for snap, alive in snapshots:
        for entry in snap.get("requests", ()):
            c, r, p, n = entry if len(entry) == 4 else (entry[0], entry[1], "http/1.1", entry[2])
            out["requests"][(c, r, p)] = out["requests"].get((c, r, p), 0) + n
        for k in _HISTOGRAMS:
            if k in snap:
                _add_hist(out[k], snap[k])
        for k in _COUNTERS:
            out[k] = out.get(k, 0) + snap.get(k, 0)
        if alive:
            out["workers"] += 1
            for k in _GAUGES:
                out[k] = out.get(k, 0) + snap.get(k, 0)
    return out


def _hist(name: str, doc: str, bounds: tuple[float, ...], h: dict[str, Any]) -> HistogramMetricFamily:
    counts = h.get("counts") or [0] * (len(bounds) + 1)
    buckets, acc = [], 0
    for b, c in zip((*(str(x) for x in bounds), "+Inf"), counts, strict=True):
        acc += c
        buckets.append((b, acc))
    return HistogramMetricFamily(name, doc, buckets=buckets, sum_value=h.get("sum", 0.0))


class _Collector(Collector):
    def __init__(self, source: Any) -> None:
        self.source = source

    def collect(self) -> Iterator[Metric]:
        s: Snapshot = self.source()
        req = CounterMetricFamily(
            "gateway_requests",
            "Requests answered, by status class, reason (sandbox: the sandbox answered) and protocol (http/1.1, h2)",
            labels=["code", "reason", "protocol"],
        )  # fmt: skip
        for (c, r, p), n in sorted(s["requests"].items()):
            req.add_metric([c, r, p], n)
        yield req
        yield _hist("gateway_request_duration_seconds", "Time from request head to the response's end",
                    DURATION_BUCKETS, s["duration"])  # fmt: skip
        yield _hist("gateway_upstream_connect_duration_seconds", "Time to open a new connection to a sandbox",
                    CONNECT_BUCKETS, s["connect"])  # fmt: skip
        yield _hist("gateway_event_loop_lag_seconds", "How late a worker's event loop ran a timer (sampled 4/s)",
                    LAG_BUCKETS, s.get("loop_lag") or {})  # fmt: skip
        yield _hist("gateway_gc_pause_seconds", "How long Python's cycle collector stopped a worker, each time it ran",
                    GC_BUCKETS, s.get("gc_pause") or {})  # fmt: skip
        g = GaugeMetricFamily
        yield g("gateway_downstream_connections", "Open client connections", s.get("downstream_connections", 0))
        yield g("gateway_downstream_connections_opening", "Accepted client connections still in their PROXY "
                "header or TLS handshake (served once open, waited for by a drain)",
                s.get("downstream_opening", 0))  # fmt: skip
        yield g("gateway_upstream_connections", "Open connections to sandboxes (busy and idle, not tunnels)",
                s.get("upstream_connections", 0))  # fmt: skip
        yield g("gateway_tunnels", "Open WebSocket/upgrade tunnels", s.get("tunnels", 0))
        yield g("gateway_http2_connections", "Open client connections speaking HTTP/2", s.get("http2_connections", 0))
        yield g("gateway_http2_streams", "Open HTTP/2 streams (requests in progress and WebSockets over HTTP/2)",
                s.get("http2_streams", 0))  # fmt: skip
        yield g("gateway_pool_idle_connections", "Idle pooled connections to sandboxes", s.get("pool_idle", 0))
        yield g("gateway_catalog_cached_records", "Catalog answers held in the in-process cache",
                s.get("cached_records", 0))  # fmt: skip
        yield g("gateway_workers", "Worker processes reporting", s.get("workers", 0))
        c = CounterMetricFamily
        yield c("gateway_catalog_cache_hits", "Requests routed from a fresh cached record", s.get("cache_hits", 0))
        yield c("gateway_catalog_cache_misses", "Catalog reads from Redis", s.get("cache_misses", 0))
        yield c(
            "gateway_catalog_stale_serves", "Expired records used while re-read or while Redis fails",
            s.get("cache_stale", 0),
        )  # fmt: skip
        yield c("gateway_redis_errors", "Failed or timed-out Redis calls", s.get("redis_errors", 0))
        b = CounterMetricFamily("gateway_bytes", "Bytes relayed: in from clients, out from sandboxes",
                                labels=["direction"])  # fmt: skip
        b.add_metric(["in"], s.get("bytes_in", 0))
        b.add_metric(["out"], s.get("bytes_out", 0))
        yield b
        yield c("gateway_tunnels_finished", "Tunnels that have ended", s.get("tunnels_total", 0))
        yield c("gateway_request_trailers_dropped", "HTTP/2 request trailers not forwarded: the request had "
                "content-length, and its HTTP/1.1 body framed by Content-Length cannot carry them",
                s.get("trailers_dropped", 0))  # fmt: skip
        yield c("gateway_worker_restarts", "Workers the supervisor restarted after they died",
                s.get("worker_restarts", 0))  # fmt: skip
        yield c("gateway_worker_stalls", "Workers killed and replaced because their event loop stopped turning "
                "for loop_stall_timeout", s.get("worker_stalls", 0))  # fmt: skip


def registry_for(source: Any) -> CollectorRegistry:
    """A registry exposing ``source()`` (a merged snapshot) in the Prometheus text format."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(_Collector(source))
    return reg


def write_snapshot(directory: str, pid: int, snap: Snapshot) -> None:
    """Atomically replace this worker's snapshot file (readers never see half a file)."""
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{pid}.")
    with os.fdopen(fd, "w") as f:
        json.dump(snap, f)
    os.replace(tmp, os.path.join(directory, f"worker-{pid}.json"))


def read_snapshots(directory: str) -> list[tuple[int, Snapshot, bool, float]]:
    """Every worker's last snapshot: (pid, snapshot, still alive, age of the report in seconds)."""
    out = []
    now = time.time()
    for name in os.listdir(directory):
        if not (name.startswith("worker-") and name.endswith(".json")):
            continue
        pid = int(name[7:-5])
        path = os.path.join(directory, name)
        try:
            age = now - os.stat(path).st_mtime
            with open(path) as f:
                snap = json.load(f)
        except (OSError, ValueError):
            continue
        try:
            os.kill(pid, 0)
            alive = True
        except ProcessLookupError:
            alive = False
        except PermissionError:
            alive = True
        out.append((pid, snap, alive, age))
    return out
