"""Where SAFE-Core's end-to-end gain comes from on SD3 and FLUX: one transformer forward per step kind.

Times (median of a few calls, same process, same inputs) a stock forward (dense), a dense-fp forward,
and the step kinds of a safe-core generation: warm-up (dense + the PCSP tap), anchor (dense + cache
refresh) and selective (sensitive image rows + every text row). Then composes the e2e schedule the
benchmark used (warm-up 2, anchor every 5, 1 tail step) from them, to compare with `bench e2e`.

    PYTHONPATH=src python3 benchmarks/step_breakdown.py --model sd3 --json benchmarks/results/steps-cpu-sd3.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import safe_dit
from safe_dit import SafeConfig, apply_safe_dit, remove_safe_dit
from safe_dit.engine.schedule import StepPlan
from safe_dit.inspection.environment import environment
from safe_dit.testing.kits import build_flux, build_sd3, flux_inputs, sd3_inputs


def timed(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["sd3", "flux"], required=True)
    p.add_argument("--tokens-side", type=int, default=64, help="image token grid side (64 -> 4096 tokens)")
    p.add_argument("--steps", type=int, default=None, help="e2e steps to compose (default: sd3 28, flux 20)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--json")
    args = p.parse_args()
    torch.manual_seed(0)
    if args.model == "sd3":  # SD3-Medium width, CFG batch 2, 77 + 256 caption tokens
        model, text_len, batch, steps = build_sd3("sd3-medium", num_layers=1), 333, 2, args.steps or 28
        inputs = sd3_inputs(model, args.tokens_side, args.tokens_side, batch=batch, text_len=text_len)
    else:  # FLUX head dim 128 at half width (12 heads), 1 double + 1 single block, batch 1, 512 caption tokens
        model, text_len, batch, steps = build_flux("flux-dev", num_layers=1,
                                                   num_attention_heads=12), 512, 1, args.steps or 20
        inputs = flux_inputs(model, args.tokens_side, args.tokens_side, batch=batch, text_len=text_len)
    n = args.tokens_side ** 2
    result = {"model": args.model, "tokens": n, "text_len": text_len, "batch": batch,
              "environment": environment("cpu")}

    def forward():
        with torch.no_grad():
            model(**inputs)

    forward()  # warm-up
    result["dense_s"] = timed(forward, args.repeats)
    apply_safe_dit(model, SafeConfig("dense-fp"))
    result["dense_fp_s"] = timed(forward, args.repeats)
    cfg = SafeConfig("safe-core", keep_ratio=0.25, warmup_steps=2, anchor_interval=3, tail_dense_steps=0)
    apply_safe_dit(model, cfg)
    kinds: dict[str, list[float]] = {}
    for _ in range(args.repeats):
        # warmup warmup selective selective anchor selective
        with torch.no_grad(), safe_dit.generation(model, num_steps=6) as g:
            for kind in StepPlan(6, 2, 3, 0).kinds():
                t0 = time.perf_counter()
                model(**inputs)
                kinds.setdefault(kind, []).append(time.perf_counter() - t0)
    remove_safe_dit(model)
    for kind, ts in kinds.items():
        result[f"{kind}_s"] = statistics.median(ts)
    k = g.report()["sensitive_tokens"]
    result["selective_rows_fraction"] = (k + text_len) / (n + text_len)
    plan = StepPlan(steps, 2, 5, 1).kinds()  # the bench e2e schedule
    per_kind = {"warmup": result["warmup_s"], "anchor": result["anchor_s"], "tail": result["dense_fp_s"],
                "selective": result["selective_s"]}
    result["composed"] = {"steps": steps, "dense_s": steps * result["dense_s"],
                          "dense_fp_s": steps * result["dense_fp_s"],
                          "safe_core_s": sum(per_kind[kd] for kd in plan)}
    c = result["composed"]
    result["composed"]["scheduling_gain"] = c["dense_fp_s"] / c["safe_core_s"]
    result["composed"]["fast_path_gain"] = c["dense_s"] / c["dense_fp_s"]
    lines = [f"{args.model}: {n} image + {text_len} text tokens, batch {batch}, 1 layer "
             f"(per forward, median of {args.repeats})",
             f"  dense {result['dense_s']:.2f}s  dense-fp {result['dense_fp_s']:.2f}s  "
             f"warm-up (PCSP) {result['warmup_s']:.2f}s"
             f"  anchor {result['anchor_s']:.2f}s  selective {result['selective_s']:.2f}s"
             f" ({result['selective_rows_fraction']:.2f} of the rows)",
             f"  composed {steps}-step schedule: dense/dense-fp {c['fast_path_gain']:.2f}x"
             f"  dense-fp/safe-core {c['scheduling_gain']:.2f}x"]
    print("\n".join(lines))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
