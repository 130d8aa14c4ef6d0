#!/usr/bin/env bash
# The test command: a fresh virtualenv with torch 2.14.1 (the CUDA build, so CUDA sources compile even
# without a GPU), the test dependencies and this package built against that torch, then pytest. It also
# builds against the oldest supported torch (2.11.0) and runs the kernel and op tests there, and runs the
# emulated CUDA kernels' tests a second time under AddressSanitizer and UBSan (the sm_90 build);
# RTDETRV2_TESTS_MAIN_ONLY=1 skips those two. Extra arguments go to the main pytest run, e.g.
# `RTDETRV2_TESTS_MAIN_ONLY=1 bash scripts/test.sh -k reference -x`. The pytest runs take
# RTDETRV2_TEST_WORKERS processes (pytest-xdist, one test file each at a time; default 2; 0: no workers):
# much of the suite is single-threaded (Triton's interpreter, compilers, subprocesses).
set -euo pipefail
cd "$(dirname "$0")/.."
# torch guesses the CUDA toolkit from `which nvcc`, which a wrapper script in /usr/local/bin misleads.
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi
VENV=${RTDETRV2_TEST_VENV:-.venv-test}
OLDEST_VENV=${RTDETRV2_OLDEST_TEST_VENV:-.venv-test-oldest}
OLDEST_TORCH=2.11.0  # pyproject.toml's torch>= (the GPU machines' torch; its Triton is 3.6.0)
PYTHON=${PYTHON:-python3}
WORKERS=${RTDETRV2_TEST_WORKERS:-2}
# pytest-xdist's options: whole files per worker, so that a module's fixtures (the ThreadSanitizer build) are
# made once.
PARALLEL=()
if [ "$WORKERS" != 0 ]; then PARALLEL=(-n "$WORKERS" --dist loadfile); fi
START=$SECONDS
elapsed() { echo "   ($(( (SECONDS - START) / 60 )) min $(( (SECONDS - START) % 60 )) s so far)"; }

# make_venv DIR TORCH_VERSION: a fresh virtualenv with that torch and this package built against it.
make_venv() {
  echo "== creating $1 with torch $2"
  rm -rf "$1"
  "$PYTHON" -m venv "$1"
  "$1/bin/python" -m pip install -q --upgrade pip "setuptools>=64" wheel
  "$1/bin/python" -m pip install -q "torch==$2" numpy
  echo "== building rtdetrv2_kernels against torch $2"
  "$1/bin/python" -m pip install -q --no-build-isolation ".[test]"
  # From inside the venv, so that the installed package is imported rather than the checkout's sources.
  (cd "$1" && bin/python -c "import torch, rtdetrv2_kernels as rk; print('torch', torch.__version__, '| backends:', rk.available_backends())")
  elapsed
}

# RTDETRV2_TESTS_MAIN_ONLY=1: only the main run (for a quick selection such as `-k reference`).
MAIN_ONLY=${RTDETRV2_TESTS_MAIN_ONLY:-0}
make_venv "$VENV" 2.14.1
if [ "$MAIN_ONLY" != 1 ]; then
  # The CUDA library for one architecture is enough to show it builds against the oldest torch's headers.
  TORCH_CUDA_ARCH_LIST=9.0 make_venv "$OLDEST_VENV" "$OLDEST_TORCH"
  # tests/op/test_triton_compile.py compiles the Triton kernels with this Python's Triton too.
  export RTDETRV2_OLDEST_TORCH_PYTHON="$PWD/$OLDEST_VENV/bin/python"
fi

echo "== pytest"
# The pytest script, not `python -m pytest`: the latter puts the checkout on sys.path and would test the
# source tree instead of the installed package. The suite includes the CUDA kernels emulated on the CPU
# (tests/emulated_cuda/, built when the first test that runs them starts) and their ThreadSanitizer run.
"$VENV/bin/pytest" "${PARALLEL[@]}" "$@"
elapsed
if [ "$MAIN_ONLY" = 1 ]; then exit 0; fi

echo "== pytest with torch $OLDEST_TORCH: the kernel and op tests (CPU kernels, Triton 3.6 interpreter)"
RTDETRV2_SKIP_EMULATION=1 "$OLDEST_VENV/bin/pytest" "${PARALLEL[@]}" -q -m "not slow" \
  tests/op/test_kernels.py tests/op/test_fused.py tests/op/test_op_cases.py tests/op/test_registration.py \
  tests/op/test_validation.py tests/op/test_deterministic.py tests/op/test_reference.py
elapsed

echo "== pytest: the emulated CUDA kernels again, under AddressSanitizer and UndefinedBehaviorSanitizer"
# libasan must be the first library loaded, and libstdc++ loaded with it (tests/emulated_cuda/__init__.py).
# The sm_90 build alone (RTDETRV2_EMULATION_ARCHS): under ASan each build and its run take minutes, and the
# main run above tests both builds.
ASAN_PRELOAD="$(g++ -print-file-name=libasan.so) $(g++ -print-file-name=libstdc++.so)"
RTDETRV2_EMULATION_SANITIZE=address RTDETRV2_EMULATION_ARCHS=90 LD_PRELOAD="$ASAN_PRELOAD" ASAN_OPTIONS=detect_leaks=0 \
  "$VENV/bin/pytest" "${PARALLEL[@]}" -q -m "not slow" -k emulated \
  tests/op/test_kernels.py tests/op/test_fused.py tests/op/test_op_cases.py tests/op/test_deterministic.py \
  tests/op/test_emulated_cuda.py
elapsed
