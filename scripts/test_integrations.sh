#!/usr/bin/env bash
# The integrations with other codebases against the real packages (tests/dropins/test_codebases.py), in a side
# virtualenv so that the main test environment stays small: ultralytics, rfdetr, lightly-train and libreyolo,
# at the versions tried (docs/integrations.md), on torch 2.14.1 as the main tests. About 3 minutes to set up
# on a fresh machine; extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${RTDETRV2_INTEGRATIONS_VENV:-.venv-integrations}
PYTHON=${PYTHON:-python3}
START=$SECONDS
elapsed() { echo "   ($(( (SECONDS - START) / 60 )) min $(( (SECONDS - START) % 60 )) s so far)"; }
if [ ! -x "$VENV/bin/python" ]; then
  echo "== creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip "setuptools>=64" wheel
"$VENV/bin/python" -m pip install -q torch==2.14.1 torchvision==0.29.1 numpy ninja
elapsed
CONSTRAINTS=$(mktemp)
printf 'torch==2.14.1\ntorchvision==0.29.1\n' > "$CONSTRAINTS"
"$VENV/bin/python" -m pip install -q -c "$CONSTRAINTS" pytest ultralytics==8.4.190 rfdetr==1.11.2 \
  lightly-train==0.18.0 libreyolo==1.6.0 kernels==0.19.1 transformers==5.25.0
rm -f "$CONSTRAINTS"
elapsed
echo "== building rtdetrv2_kernels (CPU kernels) into $VENV"
CUDA_HOME= "$VENV/bin/python" -m pip install -q --no-build-isolation --no-deps .
elapsed
# From the tests folder, so that the installed package is imported rather than the checkout's sources.
cd tests && RTDETRV2_SKIP_EMULATION=1 "../$VENV/bin/python" -m pytest -q -p no:cacheprovider dropins/test_codebases.py "$@"
