# Every target sets itself up: a fresh clone needs only python3 (>=3.10) and make.
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed

.PHONY: test serve bench bench-smoke bench-gpu clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# The CPU build of torch first, so nothing below pulls a multi-GB CUDA build.
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[test,bench]'
	touch $(STAMP)

test: $(STAMP)
	$(VENV)/bin/ruff check .
	TRITON_INTERPRET=1 $(PY) -m pytest -q -p no:cacheprovider

serve: $(STAMP)
	$(VENV)/bin/petserve serve

# CPU serving suite (~11 min on 2 shared cores): engine + baselines, HTTP load, plots, cold load.
bench: $(STAMP)
	$(PY) -m petserve.benchmarks.bench_engine --out benchmarks/results/engine_cpu.jsonl
	$(PY) -m petserve.benchmarks.bench_serving --out benchmarks/results/serving_cpu.jsonl
	$(PY) -m petserve.benchmarks.plot_serving benchmarks/results/engine_cpu.jsonl benchmarks/results/serving_cpu.jsonl
	$(PY) -m petserve.benchmarks.bench_load --out benchmarks/results/load_cpu.jsonl
	$(PY) -m petserve.benchmarks.bench_sft --out benchmarks/results/sft_cpu.jsonl
	$(PY) -m petserve.benchmarks.bench_generator --out benchmarks/results/generator_cpu.jsonl

bench-smoke: $(STAMP)
	TRITON_INTERPRET=1 $(PY) -m petserve.benchmarks.bench_kernels --smoke
	$(PY) -m petserve.benchmarks.bench_engine --smoke
	$(PY) -m petserve.benchmarks.bench_serving --smoke
	$(PY) -m petserve.benchmarks.bench_load --smoke
	$(PY) -m petserve.benchmarks.bench_sft --smoke
	$(PY) -m petserve.benchmarks.bench_generator --smoke

# On a CUDA machine, in one call (no venv: the machine's python with torch, triton, transformers;
# what is missing comes from the wheels in .whl/, see benchmarks/gpu_run.sh): GPU tests, kernels
# (bf16, fp16), the engine at t5-base; under 8 minutes. `benchmarks/gpu_run.sh --dry-run` on CPU.
bench-gpu:
	OUT=benchmarks/results bash benchmarks/gpu_run.sh

clean:
	rm -rf $(VENV) build *.egg-info
