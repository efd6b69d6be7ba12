#!/usr/bin/env bash
# Fill .whl/ (ignored by git; the device tool's `carry`) with the wheels benchmarks/gpu_run.sh
# installs on a bare GPU machine that has python, torch, triton, transformers and peft but not the
# rest of what petserve imports. Run it here, where PyPI is reachable:
#
#   benchmarks/gpu_wheels.sh [PYTHON_VERSION]     # default 3.12, the GPU machine's
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=${1:-3.12}
PY=${PYTHON:-python3}
[[ -z "${PYTHON:-}" && -x .venv/bin/python ]] && PY=.venv/bin/python
rm -rf .whl && mkdir -p .whl
# --no-deps: the list is the closure of what is missing there (torch and friends are present)
"$PY" -m pip download -q --dest .whl --no-deps --only-binary=:all: --implementation cp \
    --python-version "$VERSION" --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux2010_x86_64 --platform any \
    pydantic pydantic-core annotated-types typing-inspection typing-extensions \
    decord prometheus-client sentencepiece pillow \
    matplotlib contourpy cycler fonttools kiwisolver pyparsing python-dateutil six tzdata \
    pytest pluggy iniconfig setuptools
du -sh .whl
