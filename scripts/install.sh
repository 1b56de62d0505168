#!/usr/bin/env bash
# Installs safe-dit (editable) and, with --test, what the test suite needs.
# torch: an already installed torch (CPU or CUDA) is kept; otherwise the pinned
# 2.13.0 is installed, which on the project's CPU machines is the local CPU wheel.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  "$PY" -m pip install --quiet "torch==2.13.0"
fi
extra=""
[ "${1:-}" = "--test" ] && extra="[test]"
"$PY" -m pip install --quiet -e ".${extra}"
