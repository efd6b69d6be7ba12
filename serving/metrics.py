"""`GET /metrics`: Prometheus text exposition (format 0.0.4), written by hand.

Two sources: `HttpMetrics` (kept by the ingress: requests and latency per route, adapter and
status) and the engine's `stats()` dict of every backbone replica (batch sizes, adapters mixed per
batch, slot-pool hits/misses/evictions, adapter load times, queue length), labelled by replica.
`Exposition` groups samples by family, as the format requires, whatever order they arrive in.
"""
from __future__ import annotations

import math
import threading
import time
from bisect import bisect_left
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BACKBONE_LABEL = "_backbone"     # no valid adapter id starts with '_'
OVERFLOW_LABEL = "_other"
MAX_ADAPTER_LABELS = 1000        # bounds memory and series count when clients send junk ids


def _escape(value: object) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def _labels(labels: Mapping[str, object]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items()) + "}"


@dataclass
class _Family:
    kind: str
    help: str
    lines: list[str] = field(default_factory=list)


class Exposition:
    """Collects samples and renders them, one `# HELP`/`# TYPE` header per family."""

    def __init__(self) -> None:
        self._families: dict[str, _Family] = {}

    def _family(self, name: str, kind: str, help_text: str) -> _Family:
        fam = self._families.get(name)
        if fam is None:
            fam = self._families[name] = _Family(kind, help_text)
        return fam

    def sample(self, name: str, kind: str, help_text: str, labels: Mapping[str, object],
               value: float) -> None:
        """One counter or gauge sample (counters: `name` should end in _total)."""
        line = f"{name}{_labels(labels)} {_number(value)}"
        self._family(name, kind, help_text).lines.append(line)

    def histogram(self, name: str, help_text: str, labels: Mapping[str, object],
                  buckets: Iterable[tuple[float, int]], total: float, count: int) -> None:
        """`buckets`: (upper bound, cumulative count) in increasing order, +Inf added here."""
        fam = self._family(name, "histogram", help_text)
        for upper, cumulative in buckets:
            bucket_labels = _labels({**labels, "le": _number(upper)})
            fam.lines.append(f"{name}_bucket{bucket_labels} {cumulative}")
        fam.lines.append(f"{name}_bucket{_labels({**labels, 'le': '+Inf'})} {count}")
        fam.lines.append(f"{name}_sum{_labels(labels)} {_number(total)}")
        fam.lines.append(f"{name}_count{_labels(labels)} {count}")

    def summary(self, name: str, help_text: str, labels: Mapping[str, object], total: float,
                count: int) -> None:
        """A summary without quantiles: just `_sum` and `_count`."""
        fam = self._family(name, "summary", help_text)
        fam.lines.append(f"{name}_sum{_labels(labels)} {_number(total)}")
        fam.lines.append(f"{name}_count{_labels(labels)} {count}")

    def render(self) -> str:
        out = []
        for name, fam in self._families.items():
            out.append(f"# HELP {name} {fam.help}")
            out.append(f"# TYPE {name} {fam.kind}")
            out.extend(fam.lines)
        return "\n".join(out) + "\n"


@dataclass
class _Histogram:
    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)   # per bucket, not cumulative
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * len(self.bounds)

    def observe(self, value: float) -> None:
        i = bisect_left(self.bounds, value)
        if i < len(self.counts):
            self.counts[i] += 1
        self.total += value
        self.count += 1

    def cumulative(self) -> list[tuple[float, int]]:
        out, running = [], 0
        for bound, n in zip(self.bounds, self.counts):
            running += n
            out.append((bound, running))
        return out


class HttpMetrics:
    """Thread-safe HTTP counters of one ingress process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: dict[tuple[str, str, str, int], int] = {}
        self._latency: dict[tuple[str, str, str], _Histogram] = {}
        self._adapters: set[str] = set()

    def _adapter_label(self, adapter: str | None) -> str:
        if adapter is None:
            return BACKBONE_LABEL
        if adapter in self._adapters or len(self._adapters) < MAX_ADAPTER_LABELS:
            self._adapters.add(adapter)
            return adapter
        return OVERFLOW_LABEL

    def observe(self, method: str, route: str, adapter: str | None, status: int,
                seconds: float) -> None:
        """`adapter`: an id, None for the backbone alone, "" when the route names none."""
        with self._lock:
            label = "" if adapter == "" else self._adapter_label(adapter)
            key = (method, route, label, status)
            self._requests[key] = self._requests.get(key, 0) + 1
            hist = self._latency.get(key[:3])
            if hist is None:
                hist = self._latency[key[:3]] = _Histogram(LATENCY_BUCKETS_S)
            hist.observe(seconds)

    def export(self, exp: Exposition) -> None:
        with self._lock:
            requests = dict(self._requests)
            latency = {k: (h.cumulative(), h.total, h.count) for k, h in self._latency.items()}
        for (method, route, adapter, status), n in sorted(requests.items()):
            exp.sample("petserve_http_requests_total", "counter",
                       "HTTP requests by method, route, adapter and status",
                       {"method": method, "route": route, "adapter": adapter,
                        "status": status}, n)
        for (method, route, adapter), (buckets, total, count) in sorted(latency.items()):
            exp.histogram("petserve_http_request_duration_seconds",
                          "HTTP request latency in seconds, by method, route and adapter",
                          {"method": method, "route": route, "adapter": adapter},
                          buckets, total, count)


class RecordMetrics:
    """ASGI middleware feeding HttpMetrics. Routes report their adapter in `request.state.adapter`
    (the route template, not the raw path, labels a request, so junk URLs cannot add series)."""

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
_POOL_GAUGES = ("resident", "pinned", "slots", "referenced", "cpu_cached")
_HISTOGRAMS = {
    "batch_rows": "decoder rows per engine step",
    "adapters_per_step": "distinct adapters mixed in one engine step",
    "prefill_batch_size": "requests per prefill pass",
}


def _histogram_from_snapshot(exp: Exposition, name: str, help_text: str, labels: dict,
                             snapshot: Mapping) -> None:
    buckets = [(float(le), int(n)) for le, n in snapshot.get("buckets", {}).items() if le != "+Inf"]
    exp.histogram(name, help_text, labels, sorted(buckets), float(snapshot.get("sum", 0.0)),
                  int(snapshot.get("count", 0)))


def export_engine_stats(exp: Exposition, replica: str, stats: Mapping) -> None:
    """One replica's Engine.stats() as petserve_engine_* / petserve_slot_pool_* families."""
    r = {"replica": replica}
    for gauge in ("queue_length", "running_rows", "running_requests"):
        if gauge in stats:
            exp.sample(f"petserve_engine_{gauge}", "gauge", f"engine {gauge.replace('_', ' ')} now",
                       r, stats[gauge])
    for adapter, entry in sorted(stats.get("requests", {}).items()):
        exp.summary("petserve_engine_request_seconds", "engine latency of completed requests",
                    {**r, "adapter": adapter}, entry.get("latency_ms_sum", 0.0) / 1e3,
                    int(entry.get("count", 0)))
    for code, n in sorted(stats.get("failed", {}).items()):
        exp.sample("petserve_engine_failed_requests_total", "counter",
                   "queued requests that failed, by error code", {**r, "code": code}, n)
    for key in ("steps_total", "prefills_total"):
        if key in stats:
            exp.sample(f"petserve_engine_{key}", "counter", f"engine {key[:-6]} run", r, stats[key])
    for key, help_text in _HISTOGRAMS.items():
        if key in stats:
            _histogram_from_snapshot(exp, f"petserve_engine_{key}", help_text, r, stats[key])
    _export_pool(exp, r, stats.get("slot_pool", {}))
    cache = stats.get("feature_cache", {})
    for key in ("hits", "misses"):
        if key in cache:
            exp.sample(f"petserve_feature_cache_{key}_total", "counter",
                       f"vision feature cache {key}", r, cache[key])


def _export_pool(exp: Exposition, r: dict, pool: Mapping) -> None:
    for key, help_text in _POOL_COUNTERS.items():
        if key in pool:
            exp.sample(f"petserve_slot_pool_{key}_total", "counter", help_text, r, pool[key])
    for key in _POOL_GAUGES:
        if key in pool:
            exp.sample(f"petserve_slot_pool_{key}", "gauge", f"slot pool: {key} now", r, pool[key])
    if "load_count" in pool:
        exp.summary("petserve_adapter_load_seconds",
                    "time to make an adapter resident (store read, compile, copy into the slot)",
                    r, pool.get("load_ms_sum", 0.0) / 1e3, int(pool["load_count"]))
    for stage in ("read", "compile", "copy"):
        if f"{stage}_ms_sum" in pool:
            exp.sample(f"petserve_adapter_load_{stage}_seconds_total", "counter",
                       f"adapter load time spent in {stage}", r, pool[f"{stage}_ms_sum"] / 1e3)
