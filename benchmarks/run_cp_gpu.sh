#!/usr/bin/env bash
# Context parallelism on several GPUs of one node (checked only on CPU/gloo so far: the machines here have at most
# one GPU, where only degree 1 fits). Usage, on a node with NGPU >= 2 GPUs:
#   NGPU=2 bash benchmarks/run_cp_gpu.sh [OUTDIR]          (default benchmarks/results/cp-gpu)
# 1. Exactness (NGPU=2 only: the cases are written for 2 ranks): the float32 tiny-model cases of
#    tests/engine/test_context_parallel.py on CUDA with NCCL (each backbone's dense-fp under ulysses/ring/*_anything:2
#    and safe-core under ulysses:2 vs one process; the refusal cases stay CPU-only). Expected: every line
#    `max |delta| ... ok` (<= 1e-5; CPU/gloo measured 0 to 1.6e-6). Never run on a GPU yet: a failure to start
#    (e.g. a tensor left on the CPU by a kit) is a harness bug, a FAIL line a real one.
# 2. One image per mode through the CLI under torchrun, Lumina-Next shape (random weights, 2048^2 = 16384 tokens):
#    dense-fp and safe-core with --context-parallel ulysses:NGPU and ring:NGPU. Expected: each writes one PNG and
#    one JSON from rank 0 only; "seconds" falls with NGPU for long sequences (Ulysses: all-to-all per attention
#    call; ring: NGPU K/V rotations), and the PNGs of ulysses and ring are equal to the 1-GPU run within bf16 noise.
# 3. bench e2e under torchrun: the stock dense model on each GPU (the one-device baseline) next to the split modes.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-benchmarks/results/cp-gpu}
ngpu=${NGPU:-2}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
run() { timeout "${LIMIT:-600}" python3 -m torch.distributed.run --nproc-per-node "$ngpu" -m safe_dit.cli "$@"; }

echo "== 1. exactness on CUDA/NCCL"
[ "$ngpu" = 2 ] && timeout 600 python3 - "$ngpu" <<'PY' | tee "$out/exactness.txt"
import sys, subprocess, os
# the CPU suite's cases, on CUDA: the harness starts one process per GPU with NCCL
os.environ["SAFE_DIT_CP_DEVICE"] = "cuda"
from safe_dit.testing.parallel import launch
r = launch(os.path.abspath("tests/engine/test_context_parallel.py") + ":cases", world=int(sys.argv[1]), timeout=540)
for k, v in r.items():
    if isinstance(v, float):
        print(f"{k:55s} max |delta| {v:.2e} {'ok' if v <= 1e-5 else 'FAIL'}")
PY

for spec in ulysses ring; do
  for mode in dense-fp safe-core; do
    echo "== 2. generate $mode --context-parallel $spec:$ngpu"
    run generate "a red circle at the top left" --model tiny-random --height 2048 --width 2048 --steps 30 \
      --mode "$mode" --device cuda --dtype float32 --context-parallel "$spec:$ngpu" --out "$out/$mode-$spec.png"
  done
done

echo "== 3. bench e2e --context-parallel ulysses:$ngpu"
run bench e2e --model lumina-next --device cuda --dtype bfloat16 --layers 24 --steps 30 --repeats 1 \
  --tokens 4096 16384 --time-up-to 16384 --context-parallel "ulysses:$ngpu" --no-progress \
  --json "$out/e2e-ulysses.json" --plot "$out/e2e-ulysses.png" > "$out/e2e-ulysses.txt"
echo "== done: $out"
