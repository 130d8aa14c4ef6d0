#!/usr/bin/env bash
# The GPU check, in one command on any CUDA machine whose python3 has torch, triton, pytest and
# transformers (no network needed): build against that torch for this GPU's architecture, run the test
# suite (the "cuda" and "triton" backends run on the GPU; the wheel-building tests marked slow run in CI),
# compute-sanitizer memcheck and racecheck on a small subset, and the GPU benchmark table. With
# PEER_SDIST=path/to/torch_ms_deform_attn-*.tar.gz the peer's kernels are built from that sdist and timed
# beside ours. Writes gpu_check.md (summary), tests.log, sanitizer.log, benchmark.md and benchmark.json to
# ${OUT:-bench/results/gpu-<UTC date>}. Each step has a time limit (STEP_TIMEOUT, seconds). Exits non-zero
# if any step failed. BENCH_ARGS replaces the benchmark's options (default: --budget 1.5 --rounds 5).
#
#   bash bench/gpu_check.sh [STEP ...]     steps: build tests sanitizer benchmark (default: all of them)
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python3}
OUT_DIR=${OUT:-$REPO/bench/results/gpu-$(date -u +%Y%m%d-%H%M)}
mkdir -p "$OUT_DIR" && OUT_DIR=$(cd "$OUT_DIR" && pwd)
SUMMARY="$OUT_DIR/gpu_check.md"
STEP_TIMEOUT=${STEP_TIMEOUT:-900}
export PYTHONUNBUFFERED=1
# The real GPU runs the CUDA kernels: the CPU emulation of them (tests/emulated_cuda/) is CI's, not this.
export RTDETRV2_SKIP_EMULATION=1
# Build for this GPU only (the wheel's default list has four architectures and takes four times as long).
TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$("$PYTHON" -c \
  'import torch; print("%d.%d" % torch.cuda.get_device_capability())')}
export TORCH_CUDA_ARCH_LIST MAX_JOBS=${MAX_JOBS:-$(nproc)}
STEPS=" ${*:-build tests sanitizer benchmark} "
failed=0

want() { [[ "$STEPS" == *" $1 "* ]]; }

record() {  # record NAME STATUS [LOG to delete when the step passed]
  echo "| $1 | $([ "$2" -eq 0 ] && echo ok || echo "FAILED ($2)") |" >>"$SUMMARY"
  if [ "$2" -eq 0 ]; then [ -z "${3:-}" ] || rm -f "$3"; else failed=1; fi
}

{
  echo "# GPU check"
  echo
  echo "- date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "- commit: $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo "- gpu: $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -1)"
  echo "- $("$PYTHON" -c 'import torch, triton; print(f"torch {torch.__version__}, triton {triton.__version__}")' 2>&1)"
  echo
  echo "| step | result |"
  echo "|---|---|"
} >"$SUMMARY"

if want build; then
echo "== build (sm_$TORCH_CUDA_ARCH_LIST)"
# Editable: `python -m bench` runs from the checkout, so the checkout must hold the build.
(cd "$REPO" && timeout "$STEP_TIMEOUT" "$PYTHON" -m pip install -q --no-build-isolation --no-deps -e .) \
  >"$OUT_DIR/build.log" 2>&1
record build $? "$OUT_DIR/build.log"
if [ -n "${PEER_SDIST:-}" ]; then
  timeout "$STEP_TIMEOUT" "$PYTHON" -m pip install -q --no-build-isolation --no-deps "$PEER_SDIST" \
    >"$OUT_DIR/peer_build.log" 2>&1
  record "build torch-ms-deform-attn (peer)" $? "$OUT_DIR/peer_build.log"
fi
fi

if want tests; then
echo "== tests"
(cd /tmp && timeout "$STEP_TIMEOUT" "$PYTHON" -m pytest -q -ra -m "not slow" "$REPO/tests") \
  >"$OUT_DIR/tests.log" 2>&1
record tests $?
tail -15 "$OUT_DIR/tests.log"
fi

if want sanitizer; then
echo "== compute-sanitizer"
SUBSET=(-q -x "$REPO/tests/test_kernels.py" "$REPO/tests/test_fused.py"
        -k "cuda and (matches_reference or nonfinite or shapes or backends_match) and not torch-")
: >"$OUT_DIR/sanitizer.log"
for tool in memcheck racecheck; do
  (cd /tmp && timeout "$STEP_TIMEOUT" compute-sanitizer --tool "$tool" --error-exitcode 9 \
    "$PYTHON" -m pytest "${SUBSET[@]}") \
    >>"$OUT_DIR/sanitizer.log" 2>&1
  record "compute-sanitizer $tool" $?
done
tail -5 "$OUT_DIR/sanitizer.log"
fi

if want benchmark; then
echo "== benchmark"
# A shorter budget per problem than a full run, so that all four steps fit a 10-minute session.
# shellcheck disable=SC2086
(cd "$REPO" && timeout "$STEP_TIMEOUT" "$PYTHON" -m bench --devices cuda --out "$OUT_DIR" \
  ${BENCH_ARGS:---budget 1.5 --rounds 5}) \
  >"$OUT_DIR/bench.log" 2>&1
record benchmark $? "$OUT_DIR/bench.log"
fi

{ echo; cat "$OUT_DIR/benchmark.md" 2>/dev/null; } >>"$SUMMARY"
cat "$SUMMARY"
exit $failed
