#!/usr/bin/env bash
# Regenerates the committed CPU results (run on a quiet machine; about 2.5 hours on 2 cores with
# the cross-backbone runs, plus about 40 minutes for step 8).
set -euo pipefail
cd "$(dirname "$0")/.."
out=benchmarks/results
mkdir -p "$out"
tag=${TAG:-cpu}
# Step 8 alone: the full Pareto of one embedded model (every safe-dit setting, the ablations, every peer
# including cache-dit with the peers extra, step reduction; 2 timed calls per setting at 4096 tokens).
# 64: 30 prompts, ~45 min; 128: 20 prompts, ~60 min; on a quiet 2-core machine.
if [ "${1:-}" = "pareto" ]; then
  exec safe-dit pareto --threads 2 --scaled-repeats 2 --no-progress --json "$out/pareto-$tag.json" \
    --plot "$out/pareto-$tag.png" --ablation-plot "$out/ablation-$tag.png" > "$out/pareto-$tag.txt"
fi
if [ "${1:-}" = "pareto-128" ]; then
  exec safe-dit pareto --size 128 --single 12 --two 8 --threads 2 --scaled-repeats 2 --no-progress \
    --json "$out/pareto-$tag-128.json" --plot "$out/pareto-$tag-128.png" \
    --ablation-plot "$out/ablation-$tag-128.png" > "$out/pareto-$tag-128.txt"
fi
if [ "${1:-}" = "pareto-quality" ]; then  # step 8's quality part only, keeping its random-weight timings
  [ -f "$out/pareto-timed-$tag.json" ] || cp "$out/pareto-$tag.json" "$out/pareto-timed-$tag.json"
  exec safe-dit pareto --threads 2 --no-progress --scaled-from "$out/pareto-timed-$tag.json" \
    --json "$out/pareto-$tag.json" --plot "$out/pareto-$tag.png" --ablation-plot "$out/ablation-$tag.png" \
    > "$out/pareto-$tag.txt"
fi
# 1. MIDT sweep: N 1024..8192, head dims 64/72/80/128, float32 + bfloat16, 2 heads.
safe-dit midt --no-progress --json "$out/midt-$tag.json" --plot "$out/midt-$tag.png" > "$out/midt-$tag.txt"
# 2. Forward pass, stock dense vs dense-fp vs mask-free oracle, Lumina-Next-2B attention shape
#    (hidden 2304, 32 heads x 72, 8 KV heads), 1 block, batch 1.
safe-dit bench forward --no-progress --tokens 1024 4096 9216 --layers 1 --repeats 3 \
  --json "$out/forward-$tag.json" --plot "$out/forward-$tag.png" > "$out/forward-$tag.txt"
# 3. Quality and latency of every mode on the embedded shapes model (84 prompts, 30 steps).
safe-dit eval --no-progress --grid "$out/eval-$tag.png" --json "$out/eval-$tag.json" > "$out/eval-$tag.txt"
# 4. End to end through LuminaPipeline, CFG batch 2, 30 steps (the pipeline's default),
#    head dim 72 at half the 2B width on CPU, 1 block.
safe-dit bench e2e --no-progress --tokens 1024 4096 --hidden-size 1152 --heads 16 --kv-heads 4 --layers 1 \
  --steps 30 --repeats 2 \
  --json "$out/e2e-$tag.json" --plot "$out/e2e-$tag.png" > "$out/e2e-$tag.txt"
# 5. The same at 9216 tokens (1536^2), one repeat (dense alone takes ~9 minutes here).
safe-dit bench e2e --no-progress --tokens 9216 --hidden-size 1152 --heads 16 --kv-heads 4 --layers 1 \
  --steps 30 --repeats 1 --time-up-to 9216 \
  --json "$out/e2e-$tag-9216.json" --plot "$out/e2e-$tag-9216.png" > "$out/e2e-$tag-9216.txt"
# 6. 16384 tokens (2048^2): memory probe only; stock dense runs out of memory on a 24 GiB machine.
safe-dit bench e2e --no-progress --tokens 16384 --hidden-size 1152 --heads 16 --kv-heads 4 --layers 1 \
  --steps 30 --repeats 1 --time-up-to 9216 \
  --json "$out/e2e-$tag-16384.json" --plot "$out/e2e-$tag-16384.png" > "$out/e2e-$tag-16384.txt"
# 7. Cross-backbone, matched 4096 image tokens, 1 block on CPU:
#    SD3 through StableDiffusion3Pipeline (SD3-Medium's full width 1536 = 24 heads x 64, 333 caption tokens,
#    CFG batch 2, its default 28 steps); FLUX through FluxPipeline (head dim 128 at half the FLUX.1 width:
#    12 heads = 1536, 1 double + 1 single block, 512 caption tokens, batch 1, 28 steps (FluxPipeline's default; 20 before session 9); no safe-sw).
safe-dit bench e2e --model sd3 --no-progress --tokens 4096 --layers 1 --steps 28 --repeats 1 --guidance 7.0 \
  --json "$out/e2e-$tag-sd3.json" --plot "$out/e2e-$tag-sd3.png" > "$out/e2e-$tag-sd3.txt"
safe-dit bench e2e --model pixart --no-progress --tokens 4096 --layers 1 --steps 20 --repeats 2 --guidance 4.5 \
  --json "$out/e2e-$tag-pixart.json" --plot "$out/e2e-$tag-pixart.png" > "$out/e2e-$tag-pixart.txt"
safe-dit bench e2e --model pixart --no-progress --tokens 9216 --layers 1 --steps 20 --repeats 1 --guidance 4.5 \
  --modes safe-core --time-up-to 9216 --json "$out/e2e-$tag-pixart-9216.json" --plot "$out/e2e-$tag-pixart-9216.png" > "$out/e2e-$tag-pixart-9216.txt"
safe-dit bench e2e --model flux --no-progress --tokens 4096 --layers 1 --heads 12 --steps 28 --repeats 1 --guidance 3.5 \
  --json "$out/e2e-$tag-flux.json" --plot "$out/e2e-$tag-flux.png" > "$out/e2e-$tag-flux.txt"
#    SD3 and FLUX again at 9216 tokens (1536^2), the same steps as at 4096, safe-sw skipped (same cost as
#    safe-core; ~20 / ~20 min alone on an AMD EPYC VM).
safe-dit bench e2e --model sd3 --no-progress --tokens 9216 --layers 1 --steps 28 --repeats 1 --guidance 7.0 \
  --modes safe-core --time-up-to 9216 \
  --json "$out/e2e-$tag-sd3-9216.json" --plot "$out/e2e-$tag-sd3-9216.png" > "$out/e2e-$tag-sd3-9216.txt"
safe-dit bench e2e --model flux --no-progress --tokens 9216 --layers 1 --heads 12 --steps 28 --repeats 1 --guidance 3.5 \
  --modes safe-core --time-up-to 9216 \
  --json "$out/e2e-$tag-flux-9216.json" --plot "$out/e2e-$tag-flux-9216.png" > "$out/e2e-$tag-flux-9216.txt"
python "$(dirname "$0")/summarize_backbones.py" "$out"/e2e-$tag*.json --plot "$out/backbones-$tag.png" > "$out/backbones-$tag.md"
# 8. Speed-quality Pareto vs diffusers' cache hooks, cache-dit and step reduction, with SAFE-Core ablations:
#    30 fixed prompts x every setting x 30 steps on the embedded model, then latency only at 4096 tokens
#    of every setting (random-weight Lumina-Next, head dim 72, 2 blocks x 288 wide; median of 2 timed calls).
#    Also runnable alone: benchmarks/run_cpu.sh pareto (and pareto-128 for the 1024-token model)
safe-dit pareto --threads 2 --scaled-repeats 2 --no-progress --json "$out/pareto-$tag.json" \
  --plot "$out/pareto-$tag.png" --ablation-plot "$out/ablation-$tag.png" > "$out/pareto-$tag.txt"
