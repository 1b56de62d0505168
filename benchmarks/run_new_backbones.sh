#!/usr/bin/env bash
# End to end on the CPU at 4096 image tokens (1024^2) for the backbones added with the mask census (issue #17):
# Lumina-Image-2.0 (Lumina2Pipeline), Qwen-Image (QwenImagePipeline), Z-Image (ZImagePipeline) and Chroma
# (ChromaPipeline). Run on a quiet machine; each run reports
# dense / dense-fp (the exact fast path) and dense-fp / safe-core (scheduling), dense-fp checked against dense first.
#
# Lumina2, Qwen-Image and Chroma make one transformer call per prompt and per CFG branch (CFG is a second call per
# step, which safe-core refuses), so their runs use guidance 1: one call per step. ZImagePipeline batches
# [cond; uncond] in one call: guidance 4, all four modes (its empty-ish negative prompt pads to another multiple of
# 32 than the prompt, so the stock model masks every CFG call). Chroma's float caption mask is a bias on every call. --prompts 2 batches two prompts of
# different caption lengths (20 and 3 valid tokens) in one call: that is where both models mask their joint
# attention; with one prompt only Lumina2's caption refiner (256 padded Gemma tokens) and Qwen's joint attention
# over padded prompt_embeds (20 of 256 valid; QwenImagePipeline's own text encoding would unpad one prompt) do.
#
# Widths: the real head dims at half the real width, 1 block (Lumina2: 12 heads x 96, 4 KV heads; Qwen and
# Chroma: 12 x 128; Z-Image: 15 x 128, 1 unified block and 1 + 1 refiner blocks).
# TINY=1 runs the same commands on tiny models at 64 tokens (a smoke test, not a measurement).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-benchmarks/results}
mkdir -p "$out"
tag=${TAG:-cpu}
if [ "${TINY:-0}" = "1" ]; then
  size=(--preset tiny --tokens 64 --steps 6 --repeats 1 --no-memory)
  l2=(); qw=(); zi=(); tag="$tag-tiny"
else
  size=(--tokens 4096 --steps 30 --repeats 2)
  l2=(--hidden-size 1152 --heads 12 --kv-heads 4); qw=(--heads 12); zi=(--heads 15)
fi
for prompts in 1 2; do
  safe-dit bench e2e --no-progress --model lumina2 "${size[@]}" ${l2[@]+"${l2[@]}"} --layers 1 --guidance 1 \
    --prompts "$prompts" --json "$out/e2e-$tag-lumina2-p$prompts.json" --plot "$out/e2e-$tag-lumina2-p$prompts.png" \
    > "$out/e2e-$tag-lumina2-p$prompts.txt"
  safe-dit bench e2e --no-progress --model qwen-image "${size[@]}" ${qw[@]+"${qw[@]}"} --layers 1 --guidance 1 \
    --prompts "$prompts" --json "$out/e2e-$tag-qwen-image-p$prompts.json" \
    --plot "$out/e2e-$tag-qwen-image-p$prompts.png" > "$out/e2e-$tag-qwen-image-p$prompts.txt"
  safe-dit bench e2e --no-progress --model z-image "${size[@]}" ${zi[@]+"${zi[@]}"} --layers 1 --guidance 4 \
    --prompts "$prompts" --json "$out/e2e-$tag-z-image-p$prompts.json" \
    --plot "$out/e2e-$tag-z-image-p$prompts.png" > "$out/e2e-$tag-z-image-p$prompts.txt"
  safe-dit bench e2e --no-progress --model chroma "${size[@]}" ${qw[@]+"${qw[@]}"} --layers 1 --guidance 1 \
    --prompts "$prompts" --json "$out/e2e-$tag-chroma-p$prompts.json" \
    --plot "$out/e2e-$tag-chroma-p$prompts.png" > "$out/e2e-$tag-chroma-p$prompts.txt"
done
tail -n 4 "$out"/e2e-"$tag"-{lumina2,qwen-image,z-image,chroma}-p?.txt | grep -v '^{'
