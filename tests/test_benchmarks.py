"""The serving benchmarks' --smoke modes run end to end and write the rows the plots and the README
table read; the engine's smoke run also checks that PEFT and the engine generate the same tokens."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import matplotlib  # noqa: F401  (hard dependencies of the benchmarks)
import peft  # noqa: F401
import pytest
import torch

from petserve.benchmarks import (  # noqa: E402
    bench_audio,
    bench_classify,
    bench_engine,
    bench_generator,
    bench_load,
    bench_serving,
    bench_sft,
    plot_serving,
)
from petserve.benchmarks.workloads import Workload, draw_adapters, make_requests  # noqa: E402

ROW_KEYS = {"setup", "metrics", "device", "commit"}
THROUGHPUT = {"requests", "elapsed_s", "requests_per_s", "tokens_per_s"}
LATENCY = {"latency_ms_p50", "latency_ms_p90", "latency_ms_p99", "queue_ms_p50", "queue_ms_p99"}


@pytest.fixture(autouse=True)
def keep_threads():
    """The scripts set torch's thread count for their process; give it back."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def read_rows(path):
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows and all(set(r) == ROW_KEYS for r in rows)
    return rows


def test_workload_popularity_laws():
    import numpy as np
    rng = np.random.default_rng(0)
    zipf = np.bincount(draw_adapters("zipf", 50, 4000, rng), minlength=50)
    uniform = np.bincount(draw_adapters("uniform", 50, 4000, rng), minlength=50)
    assert zipf[0] > 0.3 * 4000 and zipf[0] > 5 * zipf[4]       # 1 / zeta(1.5) ~ 0.38
    assert uniform.min() > 40 and uniform.max() < 130
    assert {r.adapter for r in make_requests(Workload("single", 8, requests=20))} == {"a0000"}
    assert all(r.adapter.startswith("m") for r in make_requests(Workload(kinds="mixed")))


def test_bench_engine_smoke(tmp_path):
    out = tmp_path / "engine.jsonl"
    assert bench_engine.main(["--smoke", "--out", str(out)]) == 0
    rows = read_rows(out)
    runs = [r for r in rows if r["setup"]["bench"] == "engine"]
    assert {r["setup"]["system"] for r in runs} == set(bench_engine.SYSTEMS)
    for r in runs:
        assert THROUGHPUT <= set(r["metrics"]) and r["metrics"]["requests_per_s"] > 0
        assert r["metrics"]["tokens"] == r["metrics"]["requests"] * r["setup"]["max_new_tokens"]
        if r["setup"]["system"] == "engine":
            assert LATENCY <= set(r["metrics"]) and 0 <= r["metrics"]["slot_hit_rate"] <= 1
    acc = [r for r in rows if r["setup"]["bench"] == "engine_acceptance"]
    assert len(acc) == 1
    m = acc[0]["metrics"]
    assert {"ratio_vs_single", "ratio_vs_peft", "pass_vs_single", "pass_vs_peft"} <= set(m)
    assert m["outputs_equal_peft"] == 1.0       # same weights, same greedy tokens
    assert plot_serving.main([str(out)]) == 0 and out.with_suffix(".png").stat().st_size > 0


def test_bench_serving_smoke(tmp_path):
    out = tmp_path / "serving.jsonl"
    assert bench_serving.main(["--smoke", "--out", str(out)]) == 0
    rows = read_rows(out)
    assert {r["setup"]["mode"] for r in rows} == {"closed", "open"}
    assert {r["setup"]["kinds"] for r in rows} == {"lora", "mixed"}
    for r in rows:
        m = r["metrics"]
        assert THROUGHPUT | LATENCY <= set(m) and m["errors"] == 0 and m["ok"] == m["requests"]
        assert len(m["latency_ms_quantiles"]) == 101 and 0 <= m["slot_hit_rate"] <= 1
    assert plot_serving.main([str(out)]) == 0
    assert (tmp_path / "serving_latency_cdf.png").stat().st_size > 0


def test_bench_load_smoke(tmp_path):
    """Every measured load is a cold one (a store read, page cache dropped) and its phases add up
    to no more than the whole."""
    out = tmp_path / "load.jsonl"
    assert bench_load.main(["--smoke", "--out", str(out)]) == 0
    (row,) = read_rows(out)
    m = row["metrics"]
    assert row["setup"]["bench"] == "cold_load" and len(m["loads"]) == 4 and m["file_bytes"] > 0
    assert m["page_cache_dropped"] and 0 < m["load_ms_p50"] <= m["load_ms_p90"] <= m["load_ms_max"]
    for load in m["loads"]:
        phases = load["read_ms"] + load["compile_ms"] + load["copy_ms"]
        assert load["read_ms"] > 0 and phases <= load["total_ms"] + 1e-6
    assert out.with_suffix(".png").stat().st_size > 0


def test_bench_sft_smoke(tmp_path):
    """Throughput of sft adapters mixed / one / none, composite compile time, memory vs dense."""
    out = tmp_path / "sft.jsonl"
    assert bench_sft.main(["--smoke", "--out", str(out)]) == 0
    rows = read_rows(out)
    measures = [r["setup"]["measure"] for r in rows]
    assert measures.count("throughput") == 3 and "composite" in measures and "memory" in measures
    for r in rows:
        assert r["device"] and r["commit"]
    memory = next(r for r in rows if r["setup"]["measure"] == "memory")["metrics"]
    assert 0 < memory["file_vs_dense"] < 0.1           # 1% density: a small fraction of a dense copy
    assert all(r["metrics"]["tokens_per_s"] > 0 for r in rows if r["setup"]["measure"] == "throughput")
    assert out.with_suffix(".png").stat().st_size > 0


def test_bench_generator_smoke(tmp_path):
    """Generation latency per context size, batched contexts, inline vs stored under load."""
    out = tmp_path / "generator.jsonl"
    assert bench_generator.main(["--smoke", "--out", str(out)]) == 0
    rows = read_rows(out)
    measures = [r["setup"]["measure"] for r in rows]
    assert measures.count("latency") == 2 and "batched" in measures and measures.count("load") == 3
    assert all(r["metrics"]["generate_ms"] > 0 for r in rows if r["setup"]["measure"] != "load")
    assert all(r["metrics"]["requests_per_s"] > 0 for r in rows if r["setup"]["measure"] == "load")
    assert out.with_suffix(".png").stat().st_size > 0


def test_bench_classify_smoke(tmp_path):
    """Classify throughput over 1 and 32 cache adapters, alone and beside VQA; grouped vs loop."""
    out = tmp_path / "classify.jsonl"
    assert bench_classify.main(["--smoke", "--out", str(out)]) == 0
    rows = read_rows(out)
    tp = [r for r in rows if r["setup"]["measure"] == "throughput"]
    assert {(r["setup"]["caches"], r["setup"]["traffic"]) for r in tp} == {
        (1, "classify"), (1, "classify + vqa"), (32, "classify"), (32, "classify + vqa")}
    assert all(r["metrics"]["classify_per_s"] > 0 for r in tp)
    assert all(r["metrics"]["vqa_per_s"] > 0 for r in tp if r["setup"]["traffic"] != "classify")
    grouped = next(r for r in rows if r["setup"]["measure"] == "grouped")["metrics"]
    assert grouped["grouped_ms"] > 0 and grouped["loop_ms"] > 0
    assert out.with_suffix(".png").stat().st_size > 0


def test_bench_audio_smoke(tmp_path):
    """Seconds-long: 1 vs 3 audio adapters through the AudioEngine, and one mixed pass."""
    out = tmp_path / "audio.jsonl"
    assert bench_audio.main(["--smoke", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    tp = [r for r in rows if r["setup"]["measure"] == "throughput"]
    assert {r["setup"]["workload"] for r in tp} == {"1 adapter", "3 adapters mixed"}
    assert all(r["metrics"]["requests_per_s"] > 0 for r in tp)
    step = [r for r in rows if r["setup"]["measure"] == "step"][0]["metrics"]
    assert step["3_adapters_ms"] > 0 and step["backbone_ms"] > 0
    assert out.with_suffix(".png").exists()


def test_gpu_run_dry_run(tmp_path):
    """benchmarks/gpu_run.sh --dry-run: the GPU machine's one call, on CPU at smoke sizes (its
    dependency check, the GPU tests (skipped here), the kernel and engine benchmarks, the plots)."""
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(["bash", str(root / "benchmarks/gpu_run.sh"), "--dry-run"],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OUT": str(tmp_path)})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for name in ("kernels_gpu.jsonl", "kernels_gpu.png", "engine_gpu.jsonl", "engine_gpu.png",
                 "gpu_tests.log"):
        assert (tmp_path / name).stat().st_size > 0, name
    rows = [json.loads(line) for line in (tmp_path / "engine_gpu.jsonl").read_text().splitlines()]
    assert {"setup", "metrics", "device", "commit"} <= set(rows[0])
