#!/usr/bin/env bash
# The GPU check in one command on a CUDA machine whose python3 has torch, triton, pytest and transformers
# (no network needed); at most 9 minutes (--budget). See bench/gpu_check.py for the steps and the report
# (bench/results/gpu-<UTC date>/ unless --out). --rehearse runs it without a GPU.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONUNBUFFERED=1
exec "${PYTHON:-python3}" "$REPO/bench/gpu_check.py" "$@"
