"""The worst prompt of candidate SAFE-Core schedules on a held-out, two-object-heavy prompt set: paired PSNR against
dense-fp per prompt (median, 10th percentile, minimum) and the dense steps each ran, on an embedded model.

    python3 benchmarks/tail_sweep.py --size 64 --json out.json '{"defaults": {}, "0.4": {"keep_ratio": 0.15,
        "anchor_growth": 2.0}}'

The set is ``prompt_set(4, 12, seed)`` (default seed 23: neither the eval set nor the Pareto set), every image
drawn with seed 0, 30 steps, guidance 4; candidates are overrides of SafeConfig's safe-core defaults.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from safe_dit import SafeConfig, SafeDitError, apply_safe_dit, remove_safe_dit
from safe_dit.api import runtime_of
from safe_dit.bench.pareto_settings import CORE
from safe_dit.bench.quality import generate, prompt_set, psnr
from safe_dit.embedded import world
from safe_dit.embedded.model import load_default_pipeline
from safe_dit.inspection.environment import environment


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("candidates", help='JSON: {"name": {field: value, ...}, ...}')
    p.add_argument("--size", type=int, choices=(64, 128), default=64)
    p.add_argument("--seed", type=int, default=23)
    p.add_argument("--single", type=int, default=4)
    p.add_argument("--two", type=int, default=12)
    p.add_argument("--json")
    args = p.parse_args()
    if args.seed == 0:
        raise SafeDitError("--seed 0 is the eval and Pareto prompt set: choose schedules on another seed")
    torch.set_num_threads(1)
    candidates = json.loads(args.candidates)
    pipe = load_default_pipeline(size=args.size)
    pipe.set_progress_bar_config(disable=True)
    captions = [world.caption(s) for s in prompt_set(args.single, args.two, args.seed)]

    def run(config, caption):
        apply_safe_dit(pipe, config)
        try:
            image = generate(pipe, caption, 0, 30, 4.0)[0]
            report = runtime_of(pipe).last_report if config.scheduled else None
        finally:
            remove_safe_dit(pipe)
        return image, report

    references = [run(SafeConfig("dense-fp"), c)[0] for c in captions]
    results = {}
    for name, overrides in candidates.items():
        config = SafeConfig("safe-core", **(CORE | overrides))
        values, dense = [], []
        for caption, reference in zip(captions, references):
            image, report = run(config, caption)
            values.append(min(psnr(image, reference), 100.0))
            dense.append(sum(k in ("warmup", "anchor", "tail") for k in report["steps"]))
        v = np.array(values)
        results[name] = dict(overrides=overrides, psnr=values, median=float(np.median(v)), mean=float(v.mean()),
                             p10=float(np.percentile(v, 10)), min=float(v.min()), dense_steps=float(np.mean(dense)))
        print(f"{name:24} mean {v.mean():6.2f} med {np.median(v):6.2f} p10 {np.percentile(v, 10):6.2f} "
              f"min {v.min():6.2f}  dense steps {np.mean(dense):5.2f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(size=args.size, seed=args.seed, captions=captions, steps=30, guidance=4.0,
                           results=results, environment=environment("cpu")), f, indent=1)


if __name__ == "__main__":
    main()
