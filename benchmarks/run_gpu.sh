#!/usr/bin/env bash
# The GPU suite: every headline GPU figure measured again, side by side in one process, sized for one ~9-minute call
# on one H100/H200 (src/safe_dit/commands/gpu_suite.py says what each step runs and how its printed budget is estimated).
#   bash benchmarks/run_gpu.sh [--out DIR] [--tag gpu] [--budget 540] [--only STEP ...]   on the GPU machine
#   bash benchmarks/run_gpu.sh --dry-run     every step at tiny shapes on the CPU, into a temp dir (a test runs this)
#   bash benchmarks/run_gpu.sh --plan        the H200 time budget only
#   bash benchmarks/run_gpu.sh --wheels      where pip reaches an index: the wheels a bare GPU machine lacks, into .whl/
# A machine without diffusers (a bare GPU machine has torch, not diffusers) gets the wheels in .whl/ installed into
# /tmp/site first. The checkout's src/ comes first on PYTHONPATH: the code measured is this checkout's, installed or not.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
if [ "${1:-}" = "--wheels" ]; then  # diffusers as tested here, and the one requirement of it the GPU image lacks
  version=$(python3 -c "import diffusers; print(diffusers.__version__)")
  exclude=$(git rev-parse --git-path info/exclude)
  grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
  mkdir -p .whl
  exec python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "diffusers==$version" "importlib_metadata==8.7.0"
fi
if ! python3 -c "import diffusers" 2>/dev/null; then
  if ! compgen -G ".whl/*.whl" > /dev/null; then
    echo "diffusers is not installed and .whl/ holds no wheels: run 'bash benchmarks/run_gpu.sh --wheels' where pip" \
         "reaches an index, and carry .whl to this machine" >&2
    exit 2
  fi
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
exec python3 -m safe_dit.commands.gpu_suite "$@"
