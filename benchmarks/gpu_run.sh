#!/usr/bin/env bash
# The GPU acceptance in one call, on a bare single-GPU machine (python 3.12 with torch, triton and
# transformers; no ray, decord or pydantic): install what is missing from the wheels carried in
# .whl/ (benchmarks/gpu_wheels.sh fills it, here), run the GPU tests, the kernel benchmark (bf16 and
# fp16; ranks 8-128; 1-1024 adapters; every popularity law) and the engine benchmark at t5-base size
# (backbone alone, merged, 1 / 32 / 1000 adapters, the baselines); JSONL + PNG under $OUT. The
# steps have time limits that keep the whole run under 8 minutes.
#
#   benchmarks/gpu_run.sh              # on the GPU machine; results in $OUT (default: benchmarks/results/gpu)
#   benchmarks/gpu_run.sh --dry-run    # on CPU, the same steps at smoke sizes (tests/test_benchmarks.py)
#
# With the device tool: run benchmarks/gpu_wheels.sh here, then `OUT=$OUT bash benchmarks/gpu_run.sh`
# there with carry [".whl"] (the tree plus the wheels fit its 64 MiB).
set -euo pipefail
cd "$(dirname "$0")/.."

DRY=0
[[ "${1:-}" == "--dry-run" ]] && DRY=1
PY=${PYTHON:-python3}
[[ -z "${PYTHON:-}" && -x .venv/bin/python ]] && PY=.venv/bin/python
OUT=${OUT:-benchmarks/results/gpu}
WHEELS=${WHEELS:-.whl}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
started=$(date +%s)
step() { echo "== gpu_run: $* ($(( $(date +%s) - started )) s in)"; }

# ---- 1. what is missing, from the carried wheels (nothing is fetched: the machine is offline) ----
step "dependencies"
missing=$("$PY" - <<'EOF'
import importlib.util
# import name -> distribution: what petserve's kernels, engine, tests and plots import
NEEDED = {"pydantic": "pydantic", "decord": "decord", "prometheus_client": "prometheus-client",
          "sentencepiece": "sentencepiece", "PIL": "pillow", "matplotlib": "matplotlib",
          "pytest": "pytest"}
print(" ".join(d for m, d in NEEDED.items() if importlib.util.find_spec(m) is None))
EOF
)
if [[ -n "$missing" ]]; then
    echo "gpu_run: installing from $WHEELS: $missing"
    "$PY" -m pip install -q --no-index --find-links "$WHEELS" $missing
fi
if ! "$PY" -c "import petserve.kernels" 2>/dev/null; then
    "$PY" -m pip install -q --no-deps --no-index --find-links "$WHEELS" -e .
fi
"$PY" - <<'EOF'
import torch
print("gpu_run: torch", torch.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else "(no GPU)")
EOF
if (( ! DRY )) && ! "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    echo "gpu_run: no CUDA device; on CPU run benchmarks/gpu_run.sh --dry-run" >&2
    exit 2
fi

# ---- 2. the GPU tests (kernels: Triton vs the references, bf16 included) ----
step "GPU tests"
set +e
timeout 150 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/kernels 2>&1 | tee "$OUT/gpu_tests.log"
tests_rc=${PIPESTATUS[0]}
set -e

# ---- 3. kernels ----
step "kernel benchmark"
if (( DRY )); then
    TRITON_INTERPRET=1 "$PY" -m petserve.benchmarks.bench_kernels --smoke --out "$OUT/kernels_gpu.jsonl"
else
    "$PY" -m petserve.benchmarks.bench_kernels --dtypes bfloat16,float16 --time-budget 150 \
        --out "$OUT/kernels_gpu.jsonl" || echo "gpu_run: kernel benchmark stopped (exit $?)"
fi
"$PY" -m petserve.benchmarks.plot_kernels "$OUT/kernels_gpu.jsonl"

# ---- 4. the engine at t5-base size ----
step "engine benchmark"
if (( DRY )); then
    "$PY" -m petserve.benchmarks.bench_engine --smoke --out "$OUT/engine_gpu.jsonl"
else
    timeout 240 "$PY" -m petserve.benchmarks.bench_engine --backbones t5-base --adapters 1,32,1000 \
        --large-adapters-cap 1000 --requests-large 512 --batch 64 --concurrency 128 --repeats 2 \
        --out "$OUT/engine_gpu.jsonl" || echo "gpu_run: engine benchmark stopped (exit $?)"
fi
"$PY" -m petserve.benchmarks.plot_serving "$OUT/engine_gpu.jsonl"

step "done: GPU tests exit $tests_rc; results in $OUT"
ls -l "$OUT"
exit "$tests_rc"
