#!/usr/bin/env bash
# The test command: a fresh virtualenv with torch 2.14.1 (the CUDA build, so CUDA sources compile even
# without a GPU), the test dependencies and this package built against that torch, then pytest.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k reference -x`; without any, the emulated CUDA
# kernels' tests then run a second time under AddressSanitizer and UBSan.
set -euo pipefail
cd "$(dirname "$0")/.."
# torch guesses the CUDA toolkit from `which nvcc`, which a wrapper script in /usr/local/bin misleads.
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi
VENV=${RTDETRV2_TEST_VENV:-.venv-test}
PYTHON=${PYTHON:-python3}

echo "== creating $VENV"
rm -rf "$VENV"
"$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip "setuptools>=64" wheel
echo "== installing torch 2.14.1"
"$VENV/bin/python" -m pip install -q torch==2.14.1 numpy
echo "== building rtdetrv2_kernels"
"$VENV/bin/python" -m pip install -q --no-build-isolation ".[test]"
# From inside the venv, so that the installed package is imported rather than the checkout's sources.
(cd "$VENV" && bin/python -c "import torch, rtdetrv2_kernels as rk; print('torch', torch.__version__, '| backends:', rk.available_backends())")
echo "== pytest"
# The pytest script, not `python -m pytest`: the latter puts the checkout on sys.path and would test the
# source tree instead of the installed package. The suite includes the CUDA kernels emulated on the CPU
# (tests/emulated_cuda/, built at collection) and their ThreadSanitizer run.
"$VENV/bin/pytest" "$@"
if [ $# -gt 0 ]; then exit 0; fi  # a selection of tests: no sanitizer pass
echo "== pytest: the emulated CUDA kernels again, under AddressSanitizer and UndefinedBehaviorSanitizer"
# libasan must be the first library loaded, and libstdc++ loaded with it (tests/emulated_cuda/__init__.py).
ASAN_PRELOAD="$(g++ -print-file-name=libasan.so) $(g++ -print-file-name=libstdc++.so)"
RTDETRV2_EMULATION_SANITIZE=address LD_PRELOAD="$ASAN_PRELOAD" ASAN_OPTIONS=detect_leaks=0 \
  "$VENV/bin/pytest" -q -m "not slow" -k emulated \
  tests/test_kernels.py tests/test_fused.py tests/test_deterministic.py tests/test_emulated_cuda.py
