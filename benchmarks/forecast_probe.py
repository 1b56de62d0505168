"""A first look at SafeConfig(context_forecast=1) (linear extrapolation of context rows between anchors) against
the frozen context of the published method: paired PSNR vs dense-fp on the embedded model, a held-out prompt
set (seed 23: neither the eval set, seed 0, nor the Pareto set), SAFE-Core's default schedule.

    python3 benchmarks/forecast_probe.py --prompts 12 --steps 30 --json benchmarks/results/forecast-probe-cpu.json
"""

from __future__ import annotations

import argparse
import json
import statistics

from safe_dit import SafeConfig, apply_safe_dit
from safe_dit.bench.quality import generate, prompt_set, psnr
from safe_dit.embedded import world
from safe_dit.embedded.model import load_default_pipeline
from safe_dit.inspection.environment import environment


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=12)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--seed", type=int, default=23)
    p.add_argument("--json")
    args = p.parse_args()
    pipe = load_default_pipeline()
    pipe.set_progress_bar_config(disable=True)
    scenes = prompt_set(args.prompts // 2, args.prompts - args.prompts // 2, args.seed)
    settings = {"dense-fp": SafeConfig("dense-fp"), "safe-core": SafeConfig("safe-core"),
                "safe-core forecast=1": SafeConfig("safe-core", context_forecast=1)}
    psnrs: dict[str, list[float]] = {k: [] for k in settings if k != "dense-fp"}
    for i, scene in enumerate(scenes):  # settings interleaved per prompt
        caption = world.caption(scene)
        images = {}
        for name, cfg in settings.items():
            apply_safe_dit(pipe, cfg)
            images[name] = generate(pipe, caption, 1000 + i, args.steps, 4.0)[0]
        for name in psnrs:
            psnrs[name].append(psnr(images[name], images["dense-fp"]))
    result = {"prompts": len(scenes), "steps": args.steps, "seed": args.seed, "environment": environment("cpu"),
              "psnr_vs_dense_fp": {k: {"median": statistics.median(v), "mean": statistics.fmean(v), "per_prompt": v}
                                   for k, v in psnrs.items()}}
    for k, v in result["psnr_vs_dense_fp"].items():
        print(f"{k}: PSNR vs dense-fp median {v['median']:.2f} dB, mean {v['mean']:.2f} dB over {len(scenes)} prompts")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
