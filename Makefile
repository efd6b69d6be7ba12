# Every target sets itself up: a fresh clone needs only python3 (>=3.10) and make.
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed

.PHONY: test serve bench bench-smoke clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# The CPU build of torch first, so nothing below pulls a multi-GB CUDA build.
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[test,bench]'
	touch $(STAMP)

test: $(STAMP)
	TRITON_INTERPRET=1 $(PY) -m pytest -q -x -p no:cacheprovider

serve: $(STAMP)
	$(VENV)/bin/petserve serve

bench: $(STAMP)
	$(PY) -m benchmarks.bench_kernels
	$(PY) -m benchmarks.bench_serving

bench-smoke: $(STAMP)
	TRITON_INTERPRET=1 $(PY) -m benchmarks.bench_kernels --smoke

clean:
	rm -rf $(VENV) build *.egg-info
