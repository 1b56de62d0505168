"""Per-forward cost of the attention hot path, one process per code version (run it from two checkouts).

Times, after a warm-up and as medians over repeats, one transformer forward of: the stock model (dense),
dense-fp, and each step kind of a safe-core generation (warm-up, anchor, selective), for FLUX (4096 image +
512 text tokens, FLUX.1-dev head dim 128 at 12 heads, 1 double + 1 single block) and Lumina-Next (2304
tokens, Lumina-Next-2B attention: 32 query heads over 8 K/V heads, 1 block, CFG batch 2). The dense and
dense-fp forwards alternate in one process, so their ratio stands on its own; the comparison across
code versions interleaves processes (see benchmarks/run_hotpath.sh).

    python3 benchmarks/hotpath.py --label after --json out.json
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
from safe_dit.testing.kits import build_flux, build_lumina_next, flux_inputs, lumina_inputs


def measure(model, inputs, repeats: int, gen_repeats: int) -> dict:
    def forward():
        with torch.no_grad():
            return model(**inputs)[0]

    stock = forward()  # warm-up, and the reference
    apply_safe_dit(model, SafeConfig("dense-fp"))
    fp = forward()  # warm-up of the patched model
    row = {"dense_fp_max_abs_diff": float((fp - stock).abs().max())}  # correctness before any timing is printed
    times: dict[str, list[float]] = {"dense": [], "dense-fp": []}
    for _ in range(repeats):  # stock and dense-fp alternate, so drift of the machine hits both alike
        for mode in ("dense", "dense-fp"):
            if mode == "dense":
                remove_safe_dit(model)
            else:
                apply_safe_dit(model, SafeConfig("dense-fp"))
            t0 = time.perf_counter()
            forward()
            times[mode].append(time.perf_counter() - t0)
    row["dense_s"], row["dense_fp_s"] = statistics.median(times["dense"]), statistics.median(times["dense-fp"])
    row["dense_over_dense_fp_pairs"] = [a / b for a, b in zip(times["dense"], times["dense-fp"])]
    apply_safe_dit(model,
                   SafeConfig("safe-core", keep_ratio=0.25, warmup_steps=2, anchor_interval=3, tail_dense_steps=0))
    kinds: dict[str, list[float]] = {}
    for _ in range(gen_repeats):
        with torch.no_grad(), safe_dit.generation(model, num_steps=6):  # warm-up x2, selective x2, anchor, selective
            for kind in StepPlan(6, 2, 3, 0).kinds():
                t0 = time.perf_counter()
                model(**inputs)
                kinds.setdefault(kind, []).append(time.perf_counter() - t0)
    remove_safe_dit(model)
    row.update({f"{k}_s": statistics.median(v) for k, v in kinds.items()})
    row["dense_over_dense_fp"] = row["dense_s"] / row["dense_fp_s"]
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--label", required=True, help="name of the code version measured (e.g. before/after)")
    p.add_argument("--side", type=int, default=64, help="FLUX token grid side (64 -> 4096 image tokens)")
    p.add_argument("--lumina-side", type=int, default=48, help="Lumina-Next token grid side (48 -> 2304 tokens)")
    p.add_argument("--repeats", type=int, default=5, help="alternating stock / dense-fp forward pairs")
    p.add_argument("--gen-repeats", type=int, default=3, help="6-step safe-core generations timed per step")
    p.add_argument("--json")
    args = p.parse_args()
    torch.manual_seed(0)
    flux = build_flux("flux-dev", num_layers=1, num_attention_heads=12)
    lumina = build_lumina_next("lumina-next-2b", num_layers=1)
    result = {"label": args.label, "tokens": {"flux": args.side ** 2, "lumina-next": args.lumina_side ** 2},
              "repeats": args.repeats, "gen_repeats": args.gen_repeats, "environment": environment("cpu"),
              "flux": measure(flux, flux_inputs(flux, args.side, args.side, batch=1, text_len=512), args.repeats,
                              args.gen_repeats),
              "lumina-next": measure(lumina,
                                     lumina_inputs(lumina, args.lumina_side, args.lumina_side, batch=2, text_len=32),
                                     args.repeats, args.gen_repeats)}
    for name in ("flux", "lumina-next"):
        r = result[name]
        print(f"[{args.label}] {name}: dense {r['dense_s']:.3f}s  dense-fp {r['dense_fp_s']:.3f}s "
              f"({r['dense_over_dense_fp']:.3f}x, max|diff| {r['dense_fp_max_abs_diff']:.1e})  "
              f"warm-up {r['warmup_s']:.3f}s"
              f"  anchor {r['anchor_s']:.3f}s  selective {r['selective_s']:.3f}s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
