#!/usr/bin/env bash
# The full-size GPU runs: MIDT sweep, Lumina-Next-2B forward pass and end to end (all 24 blocks,
# bfloat16, random weights). Sized for one ~9-minute call on one H100/H200:
#   bash benchmarks/run_gpu.sh [OUTDIR]        (default benchmarks/results, tag from TAG, default gpu)
# Each step has its own time limit (cut to what is left before DEADLINE seconds, if set) and its files
# are written as soon as it ends, so a step that runs out of time loses only itself. After every step,
# AFTER_STEP (a shell command) runs, if set. Steps call the CLI through python3, so that a checkout on
# PYTHONPATH (no `pip install`, as on a bare GPU machine) works as well as an installed package.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-benchmarks/results}
tag=${TAG:-gpu}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
deadline=${DEADLINE:-100000}  # seconds from the start after which no step runs on
step() {  # step NAME SECONDS ARGS...: run one safe-dit command, its table into NAME.txt
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS left=$((deadline - SECONDS))
  if [ "$left" -lt 30 ]; then echo "== $name: skipped, ${left}s left before the deadline"; return; fi
  if [ "$limit" -gt "$left" ]; then limit=$left; fi
  echo "== $name (limit ${limit}s)"
  timeout "$limit" python3 -c "import sys; from safe_dit.cli import main; sys.exit(main())" "$@" \
    --no-progress --json "$out/$name.json" --plot "$out/$name.png" > "$out/$name.txt"
  echo "== $name: rc $? in $((SECONDS - t0)) s"
  if [ -n "${AFTER_STEP:-}" ]; then eval "$AFTER_STEP"; fi
}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true

if [ "${2:-}" = "cross" ]; then  # only the other backbones (a second, shorter call)
  # SD3-Medium at full size (24 joint blocks, 24 heads x 64), CFG batch 2, 333 caption tokens, 28 steps.
  step "e2e-$tag-sd3" 110 bench e2e --model sd3 --device cuda --dtype bfloat16 --layers 24 --steps 28 \
    --guidance 7.0 --repeats 1 --tokens 4096 16384 --time-up-to 16384 --modes safe-core
  # FLUX.1-dev's full width (24 heads x 128) but 4 double + 4 single blocks (of 19 + 38), batch 1, 512 T5 tokens.
  step "e2e-$tag-flux" 100 bench e2e --model flux --device cuda --dtype bfloat16 --layers 4 --steps 20 \
    --guidance 3.5 --repeats 1 --tokens 4096 16384 --time-up-to 16384
else
  # 1. One forward of the full Lumina-Next-2B (24 blocks, hidden 2304, 32 heads x 72, 8 KV heads), CFG batch 2:
  #    stock dense vs dense-fp vs a hard-wired mask-free oracle; correctness checked first.
  step "forward-$tag" 120 bench forward --device cuda --dtype bfloat16 --layers 24 --batch 2 \
    --tokens 1024 4096 16384 --repeats 5 --warmup 2
  # 2. MIDT on the GPU: Lumina-Next-2B's attention (CFG batch 2, 32 heads), head dims 72 (Lumina) and 128 (FLUX),
  #    N up to 16384 (2048^2), bfloat16, with the SDPA kernels the profiler saw.
  step "midt-$tag" 150 midt --devices cuda --dtypes bfloat16 --head-dims 72 128 --heads 32 --batch 2 \
    --seq-lens 1024 2048 4096 8192 16384 --repeats 10 --warmup 3
  # 3. End to end through LuminaPipeline, the full 2B transformer, CFG batch 2, 30 steps.
  step "e2e-$tag" 170 bench e2e --device cuda --dtype bfloat16 --layers 24 --steps 30 --repeats 2 \
    --tokens 4096 9216
  step "e2e-$tag-16384" 150 bench e2e --device cuda --dtype bfloat16 --layers 24 --steps 30 --repeats 1 \
    --tokens 16384 --time-up-to 16384 --modes safe-core
  # 4. 2560^2 (25600 tokens): peak memory of each mode on a short call (the paper: dense 94.1 GB).
  step "e2e-$tag-25600" 120 bench e2e --device cuda --dtype bfloat16 --layers 24 --steps 30 --repeats 1 \
    --tokens 25600 --time-up-to 16384 --modes safe-core
fi

# All e2e files of this tag in one picture (re-measures nothing; each call redraws it with what is there).
python3 benchmarks/summarize_backbones.py "$out"/e2e-$tag*.json --plot "$out/backbones-$tag.png" > "$out/backbones-$tag.md"
