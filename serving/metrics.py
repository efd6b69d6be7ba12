"""`GET /metrics`: the Prometheus text exposition, rendered by prometheus_client.

Two sources: `HttpMetrics` (kept by the ingress: requests and latency per route, adapter and
status) and the engine's `stats()` dict of every backbone replica (batch sizes, adapters mixed per
batch, slot-pool hits/misses/evictions, adapter load times, queue length), labelled by replica.
`render` builds one metric family per name from these snapshots and hands them to
`prometheus_client.generate_latest` as a collector of this scrape alone: the process-global
`REGISTRY` is never touched, so apps in one process (tests) never share series.

The `adapter` label takes boundedly many values, whatever ids clients send:

- `_backbone`: the frozen backbone alone; `""`: the route names no adapter (or the request failed
  before the route read one);
- an adapter id, only once it is *known to exist*. A route that names an adapter puts it in
  `request.state.adapter`; a 2xx answer from such a route means the backend found the id in the
  store (generate ran it, upload stored it, get and delete found it), so `RecordMetrics` marks the
  id known: no store read per request. Until then its requests count under `_unknown`: a 404
  `adapter_not_found`, or a request rejected before the backend looked the id up. A known id stays
  known (a deleted adapter keeps its series);
- `_other`: at each scrape the `max_adapters` most active ids (most requests; ties by id) keep
  their own label and the rest are summed under `_other` (counters, summaries and histogram
  buckets added, so totals are preserved). HTTP families rank ids by this ingress' requests, engine
  families by completed requests over all replicas. An id that leaves the top `max_adapters` moves
  into `_other`, which Prometheus reads as the end of its series.

Valid ids never start with '_', so these values never collide with an id.
"""
from __future__ import annotations

import operator
import threading
import time
from bisect import bisect_left
from collections.abc import Callable, Iterator, Mapping
from itertools import accumulate
from typing import TypeVar

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.utils import floatToGoString

CONTENT_TYPE = CONTENT_TYPE_LATEST
LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BACKBONE_LABEL = "_backbone"
UNKNOWN_LABEL = "_unknown"
OTHER_LABEL = "_other"
COMPOSITE_LABEL = "_composite"       # a request naming several adapters composed
CONTEXT_LABEL = "_context"           # a request whose adapter is generated from its inline context
T = TypeVar("T")


class Histogram:
    """Prometheus-style histogram of observations per upper bound. `snapshot()` is its picklable
    form (Engine.stats crosses Ray as a dict); not thread-safe: the caller holds its own lock."""

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)     # per bucket; the last: over every bound
        self.sum, self.count = 0.0, 0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1     # first bound >= value: le semantics
        self.sum += value
        self.count += 1

    def snapshot(self) -> dict:
        """{"buckets": {str(bound): cumulative count, ..., "+Inf": count}, "sum", "count"}."""
        les = [*map(str, self.bounds), "+Inf"]
        return {"buckets": dict(zip(les, accumulate(self.counts))), "sum": self.sum,
                "count": self.count}


def add_snapshots(a: Mapping, b: Mapping) -> dict:
    """The snapshot of two histograms over the same bounds taken together."""
    return {"buckets": {le: n + b["buckets"][le] for le, n in a["buckets"].items()},
            "sum": a["sum"] + b["sum"], "count": a["count"] + b["count"]}


# ---- bounded adapter labels ---------------------------------------------------------------------


def _is_id(label: str) -> bool:
    return bool(label) and not label.startswith("_")


def most_active(activity: Mapping[str, float], n: int) -> set[str]:
    """The `n` adapter ids of most activity (ties: by id); `_backbone` etc. are not ranked."""
    ids = sorted((a for a in activity if _is_id(a)), key=lambda a: (-activity[a], a))
    return set(ids[:n])


def fold_adapters(series: Mapping[tuple, T], keep: set[str],
                  add: Callable[[T, T], T]) -> dict[tuple, T]:
    """`series` keyed by (adapter label, *other labels), with every id outside `keep` renamed
    `_other` and the values that then share a key combined by `add`."""
    out: dict[tuple, T] = {}
    for (adapter, *rest), value in series.items():
        key = (OTHER_LABEL if _is_id(adapter) and adapter not in keep else adapter, *rest)
        out[key] = add(out[key], value) if key in out else value
    return out


class _Families:
    """Metric families by name (a prometheus_client collector), so samples of many replicas or
    label sets land in one family each, as the text format requires."""

    def __init__(self) -> None:
        self._by_name: dict[str, Metric] = {}

    def _add(self, cls, name: str, doc: str, labels: Mapping[str, object], *value) -> None:
        family = self._by_name.get(name)
        if family is None:
            family = self._by_name[name] = cls(name, doc, labels=list(labels))
        family.add_metric([str(v) for v in labels.values()], *value)

    def counter(self, name: str, doc: str, labels: Mapping[str, object], value: float) -> None:
        """`name` ends in _total (the family is called without it)."""
        self._add(CounterMetricFamily, name, doc, labels, value)

    def gauge(self, name: str, doc: str, labels: Mapping[str, object], value: float) -> None:
        self._add(GaugeMetricFamily, name, doc, labels, value)

    def summary(self, name: str, doc: str, labels: Mapping[str, object], count: int,
                total: float) -> None:
        """A summary without quantiles: `_count` and `_sum`."""
        self._add(SummaryMetricFamily, name, doc, labels, count, total)

    def histogram(self, name: str, doc: str, labels: Mapping[str, object],
                  snapshot: Mapping) -> None:
        """`snapshot`: a Histogram.snapshot()."""
        buckets = [(le if le == "+Inf" else floatToGoString(float(le)), n)
                   for le, n in snapshot["buckets"].items()]
        self._add(HistogramMetricFamily, name, doc, labels, buckets, snapshot["sum"])

    def collect(self) -> Iterator[Metric]:
        return iter(self._by_name.values())


def render(http: HttpMetrics, engine_stats: Mapping[str, Mapping], max_adapters: int) -> bytes:
    """The /metrics body (CONTENT_TYPE): `http` and every replica's Engine.stats()
    ({replica: stats}), at most `max_adapters` adapter ids per source."""
    families = _Families()
    http.export(families, max_adapters)
    export_engine_stats(families, engine_stats, max_adapters)
    return generate_latest(families)


# ---- HTTP ---------------------------------------------------------------------------------------


class HttpMetrics:
    """Thread-safe HTTP counters of one ingress process (labels: the module docstring)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: dict[tuple[str, str, str, int], int] = {}  # (adapter, method, route, status)
        self._latency: dict[tuple[str, str, str], Histogram] = {}   # (adapter, method, route)
        self._known: set[str] = set()

    def _adapter_label(self, adapter: str | None, status: int) -> str:
        if adapter is None:
            return BACKBONE_LABEL
        if not adapter:
            return ""
        if 200 <= status < 300:
            self._known.add(adapter)
        return adapter if adapter in self._known else UNKNOWN_LABEL

    def observe(self, method: str, route: str, adapter: str | None, status: int,
                seconds: float) -> None:
        """`adapter`: the id the route named, None for the backbone alone, "" when it named none;
        a 2xx `status` proves the id exists in the store."""
        with self._lock:
            label = self._adapter_label(adapter, status)
            key = (label, method, route, status)
            self._requests[key] = self._requests.get(key, 0) + 1
            hist = self._latency.get(key[:3])
            if hist is None:
                hist = self._latency[key[:3]] = Histogram(LATENCY_BUCKETS_S)
            hist.observe(seconds)

    def export(self, families: _Families, max_adapters: int) -> None:
        with self._lock:
            requests = dict(self._requests)
            latency = {k: h.snapshot() for k, h in self._latency.items()}
        activity: dict[str, int] = {}
        for (adapter, *_), n in requests.items():
            activity[adapter] = activity.get(adapter, 0) + n
        keep = most_active(activity, max_adapters)
        for (adapter, method, route, status), n in sorted(
                fold_adapters(requests, keep, operator.add).items()):
            families.counter("petserve_http_requests_total",
                             "HTTP requests by method, route, adapter and status",
                             {"method": method, "route": route, "adapter": adapter,
                              "status": status}, n)
        for (adapter, method, route), snapshot in sorted(
                fold_adapters(latency, keep, add_snapshots).items()):
            families.histogram("petserve_http_request_duration_seconds",
                               "HTTP request latency in seconds, by method, route and adapter",
                               {"method": method, "route": route, "adapter": adapter}, snapshot)


class RecordMetrics:
    """ASGI middleware feeding HttpMetrics. A route that names an adapter reports it in
    `request.state.adapter` once the id is valid, and answers 2xx only when the backend found it
    in the store (the route template, not the raw path, labels a request, so junk URLs cannot
    add series)."""

    def __init__(self, app, metrics: HttpMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), 500

        async def send_noting_status(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_noting_status)
        finally:
            matched = scope.get("route")
            route = getattr(matched, "path_format", None) or getattr(matched, "path", "unmatched")
            adapter = scope.get("state", {}).get("adapter", "")
            self.metrics.observe(scope["method"], route, adapter, status,
                                 time.perf_counter() - start)


# ---- engine stats (serving.engine.Engine.stats) -------------------------------------------------

_POOL_COUNTERS = {
    "hits": "adapter requests that found the adapter resident in a slot",
    "misses": "adapter requests that had to load the adapter into a slot",
    "evictions": "resident adapters evicted to make room",
    "busy": "slot requests refused because every slot was in use",
    "cpu_hits": "slot loads served from the CPU cache",
    "store_reads": "adapter files read and parsed from the store",
}
_POOL_GAUGES = ("resident", "slots", "referenced", "cpu_cached", "cpu_cached_bytes")
_HISTOGRAMS = {
    "batch_rows": "decoder rows per engine step",
    "adapters_per_step": "distinct adapters mixed in one engine step",
    "prefill_batch_size": "requests per prefill pass",
    "classify_rows": "classify rows per grouped cache-head pass",
    "classify_heads": "distinct cache heads in one grouped pass",
}


def export_engine_stats(families: _Families, engine_stats: Mapping[str, Mapping],
                        max_adapters: int) -> None:
    """Every replica's Engine.stats() as petserve_engine_* / petserve_slot_pool_* families."""
    replicas = sorted(engine_stats.items())
    _export_requests(families, replicas, max_adapters)
    for replica, stats in replicas:
        _export_engine(families, {"replica": replica}, stats)
        _export_pool(families, {"replica": replica}, stats.get("slot_pool", {}))


def _export_requests(families: _Families, replicas: list[tuple[str, Mapping]],
                     max_adapters: int) -> None:
    """Completed requests per (replica, adapter), at most `max_adapters` ids over all replicas."""
    series, activity = {}, {}
    for replica, stats in replicas:
        for adapter, entry in stats.get("requests", {}).items():
            series[(adapter, replica)] = (int(entry["count"]), entry["latency_ms_sum"] / 1e3)
            activity[adapter] = activity.get(adapter, 0) + entry["count"]
    keep = most_active(activity, max_adapters)
    folded = fold_adapters(series, keep, lambda a, b: (a[0] + b[0], a[1] + b[1]))
    for (adapter, replica), (count, seconds) in sorted(folded.items(), key=lambda kv: kv[0][::-1]):
        families.summary("petserve_engine_request_seconds", "engine latency of completed requests",
                         {"replica": replica, "adapter": adapter}, count, seconds)


def _export_engine(families: _Families, r: dict, stats: Mapping) -> None:
    for gauge in ("queue_length", "running_rows", "running_requests"):
        if gauge in stats:
            families.gauge(f"petserve_engine_{gauge}", f"engine {gauge.replace('_', ' ')} now", r,
                           stats[gauge])
    for code, n in sorted(stats.get("failed", {}).items()):
        families.counter("petserve_engine_failed_requests_total",
                         "queued requests that failed, by error code", {**r, "code": code}, n)
    for key in ("steps_total", "prefills_total"):
        if key in stats:
            families.counter(f"petserve_engine_{key}", f"engine {key[:-6]} run", r, stats[key])
    for key, help_text in _HISTOGRAMS.items():
        if key in stats:
            families.histogram(f"petserve_engine_{key}", help_text, r, stats[key])
    cache = stats.get("feature_cache", {})
    for key in ("hits", "misses"):
        if key in cache:
            families.counter(f"petserve_feature_cache_{key}_total", f"vision feature cache {key}",
                             r, cache[key])


def _export_pool(families: _Families, r: dict, pool: Mapping) -> None:
    for key, help_text in _POOL_COUNTERS.items():
        if key in pool:
            families.counter(f"petserve_slot_pool_{key}_total", help_text, r, pool[key])
    for key in _POOL_GAUGES:
        if key in pool:
            families.gauge(f"petserve_slot_pool_{key}", f"slot pool: {key} now", r, pool[key])
    if "load_count" in pool:
        families.summary("petserve_adapter_load_seconds",
                         "time to make an adapter resident (store read, compile, copy into the slot)",
                         r, int(pool["load_count"]), pool.get("load_ms_sum", 0.0) / 1e3)
    for stage in ("read", "compile", "copy"):
        if f"{stage}_ms_sum" in pool:
            families.counter(f"petserve_adapter_load_{stage}_seconds_total",
                             f"adapter load time spent in {stage}", r,
                             pool[f"{stage}_ms_sum"] / 1e3)
