#!/usr/bin/env bash
# The main job: builds the package in a virtualenv (created on first use) and runs the benchmark suite,
# which first checks every available backend against the reference, on the CPU and on a GPU if present.
# Extra arguments go to bench/msda_bench.py, e.g. `bash scripts/bench.sh --quick --out bench/results/local`.
set -euo pipefail
cd "$(dirname "$0")/.."
# torch guesses the CUDA toolkit from `which nvcc`, which a wrapper script in /usr/local/bin misleads.
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi
VENV=${RTDETRV2_VENV:-.venv}
PYTHON=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
  echo "== creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip "setuptools>=64" wheel
"$VENV/bin/python" -m pip install -q torch==2.14.1 numpy
"$VENV/bin/python" -m pip install -q --no-build-isolation .
exec "$VENV/bin/python" bench/msda_bench.py "$@"
