#!/usr/bin/env bash
# The GPU check, in one command on any CUDA machine whose python3 has torch, triton, pytest and
# transformers (no network needed): build against that torch, run the full test suite (the "cuda" and
# "triton" backends run on the GPU), compute-sanitizer memcheck and racecheck on a small subset, and the
# benchmark table. Writes gpu_check.md (summary), tests.log, sanitizer.log, benchmark.md and
# benchmark.json to ${OUT:-bench/results/gpu-<UTC date>}. Exits non-zero if any step failed.
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python3}
OUT_DIR=${OUT:-$REPO/bench/results/gpu-$(date -u +%Y%m%d-%H%M)}
mkdir -p "$OUT_DIR" && OUT_DIR=$(cd "$OUT_DIR" && pwd)
SUMMARY="$OUT_DIR/gpu_check.md"
export PYTHONUNBUFFERED=1
failed=0

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

echo "== build"
(cd "$REPO" && "$PYTHON" -m pip install -q --no-build-isolation --no-deps .) >"$OUT_DIR/build.log" 2>&1
record build $? "$OUT_DIR/build.log"

echo "== tests"
(cd /tmp && "$PYTHON" -m pytest -q -ra "$REPO/tests") >"$OUT_DIR/tests.log" 2>&1
record tests $?
tail -15 "$OUT_DIR/tests.log"

echo "== compute-sanitizer"
SUBSET=(-q -x "$REPO/tests/test_kernels.py" -k "cuda and (matches_reference or nonfinite or shapes) and not torch-")
: >"$OUT_DIR/sanitizer.log"
for tool in memcheck racecheck; do
  (cd /tmp && compute-sanitizer --tool "$tool" --error-exitcode 9 "$PYTHON" -m pytest "${SUBSET[@]}") \
    >>"$OUT_DIR/sanitizer.log" 2>&1
  record "compute-sanitizer $tool" $?
done
tail -5 "$OUT_DIR/sanitizer.log"

echo "== benchmark"
"$PYTHON" "$REPO/bench/msda_bench.py" --out "$OUT_DIR" >"$OUT_DIR/bench.log" 2>&1
record benchmark $? "$OUT_DIR/bench.log"

{ echo; cat "$OUT_DIR/benchmark.md" 2>/dev/null; } >>"$SUMMARY"
cat "$SUMMARY"
exit $failed
