#!/usr/bin/env bash
# The main job: builds the package (editable, so `python -m bench` and the checkout agree) in a virtualenv
# created on first use, with the peers it is compared against, then runs the benchmark suite: a self-check
# of every implementation against the reference, then the timings, on the CPU and on a GPU if present.
# Extra arguments go to `python -m bench`, e.g. `bash scripts/bench.sh --quick` or `--shapes dfine-infer-b1`.
# BENCH_PEERS=0 skips building torch-ms-deform-attn (compiled from its sdist).
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
"$VENV/bin/python" -m pip install -q torch==2.14.1 numpy ninja
# Where no GPU could run them, the CUDA kernels are not compiled (minutes for five architectures): the main job
# times what runs here. The tests still build them. RTDETRV2_BUILD_CUDA=1 builds them regardless.
if [ -z "${RTDETRV2_BUILD_CUDA:-}" ] && ! "$VENV/bin/python" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
  export RTDETRV2_BUILD_CUDA=0
  echo "== no GPU here: building the CPU kernels only (RTDETRV2_BUILD_CUDA=1 builds the CUDA kernels too)"
fi
echo "== building rtdetrv2_kernels"
"$VENV/bin/python" -m pip install -q --no-build-isolation -e ".[bench]"
if [ "${BENCH_PEERS:-1}" != 0 ] && ! "$VENV/bin/python" -c "import torch_ms_deform_attn" 2>/dev/null; then
  echo "== building the peer torch-ms-deform-attn (BENCH_PEERS=0 skips it)"
  "$VENV/bin/python" -m pip install -q --no-build-isolation torch-ms-deform-attn > "$VENV/peer-build.log" 2>&1 \
    || echo "   could not build torch-ms-deform-attn (its log: $VENV/peer-build.log): it is left out of the comparison"
fi
exec "$VENV/bin/python" -m bench "$@"
