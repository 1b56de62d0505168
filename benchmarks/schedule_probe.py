"""Held-out selection of a SAFE-Core schedule: paired PSNR against dense-fp of candidate schedules on an embedded
model, on a prompt set that is neither the eval set nor the Pareto set (default seed 23), with each candidate's
step mix and its latency at 4096 tokens *estimated* from the per-step-kind costs fitted to an earlier Pareto run's
scaled timings (``--costs-from``: seconds = a x dense steps + (b + c x keep ratio) x selective steps; reuse
steps cost nothing; a drift-triggered anchor counts as a dense step). The estimate is a guide for what to put into
the Pareto, which then measures it. Per candidate: median, mean, 10th percentile and minimum PSNR.

    python3 benchmarks/schedule_probe.py --size 128 --prompts 8 --steps 30 \\
        --costs-from benchmarks/results/pareto-cpu-128.json --json benchmarks/results/schedule-probe-cpu-128.json \\
        --candidate "gaps+1=anchor_growth:1" --candidate "a3 reuse2=anchor_interval:3,anchor_growth:0"

A candidate is ``NAME=field:value,...`` over SafeConfig's safe-core defaults (fields of
``safe_dit.bench.pareto_settings.SCHEDULE_FIELDS``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import Counter

import numpy as np
import torch
from tqdm import tqdm

from safe_dit import SafeConfig, SafeDitError, apply_safe_dit
from safe_dit.api import runtime_of
from safe_dit.bench.pareto_settings import CORE, SCHEDULE_FIELDS
from safe_dit.bench.quality import generate, prompt_set, psnr
from safe_dit.embedded import world
from safe_dit.embedded.model import load_default_pipeline
from safe_dit.engine.schedule import REUSE, SELECTIVE, StepPlan
from safe_dit.inspection.environment import environment


def parse_candidate(text: str) -> tuple[str, dict]:
    name, sep, body = text.partition("=")
    if not sep or not name.strip():
        raise SafeDitError(f"--candidate {text!r}: write NAME=field:value,... (e.g. 'a3=anchor_interval:3')")
    overrides = {}
    for item in filter(None, body.split(",")):
        key, sep, value = item.partition(":")
        if not sep or key not in SCHEDULE_FIELDS:
            raise SafeDitError(f"--candidate {text!r}: {item!r} is not field:value over {', '.join(SCHEDULE_FIELDS)}")
        number = float(value)
        overrides[key] = (int(number) if number.is_integer() and key != "keep_ratio" and key != "anchor_growth"
                          else number)
    return name.strip(), overrides


def step_mix(config: SafeConfig, steps: int) -> dict:
    plan = StepPlan(steps, config.warmup_steps, config.anchor_interval, config.tail_dense_steps,
                    reuse_every=config.reuse_every, anchor_growth=config.anchor_growth,
                    final_selective_steps=config.final_selective_steps)
    kinds = Counter(plan.kinds())
    return dict(dense=steps - kinds[SELECTIVE] - kinds[REUSE], selective=kinds[SELECTIVE], reuse=kinds[REUSE],
                anchors=list(plan.anchors()))


def fit_costs(path: str) -> dict:
    """Least-squares per-kind costs from the safe-core / dense-fp rows of a Pareto JSON timed at scale."""
    with open(path) as f:
        result = json.load(f)
    rows, steps = result["scaled"]["rows"], result["settings_common"]["steps"]
    xs, ys, names = [], [], []
    for s in result["settings"]:
        r = rows.get(s["name"], {})
        if r.get("status") != "ok" or s["family"] != "safe-dit" or s["mode"] not in ("safe-core", "dense-fp"):
            continue
        if s["steps"] != steps:
            continue
        cfg = s["config"]
        if s["mode"] == "dense-fp":
            mix = dict(dense=steps, selective=0)
        else:
            mix = step_mix(SafeConfig("safe-core", **{k: cfg[k] for k in SCHEDULE_FIELDS if k in cfg}), steps)
        xs.append([mix["dense"], mix["selective"], mix["selective"] * cfg["keep_ratio"]])
        ys.append(r["seconds"])
        names.append(s["name"])
    (a, b, c), *_ = np.linalg.lstsq(np.array(xs, float), np.array(ys, float), rcond=None)
    fitted = {n: float(np.dot(x, (a, b, c))) for n, x in zip(names, xs)}
    return dict(source=path, dense_step_s=float(a), selective_step_s=float(b), selective_step_s_per_keep=float(c),
                dense_s=rows["dense"]["seconds"],
                fit={n: dict(fitted=fitted[n], measured=y) for n, y in zip(names, ys)})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, choices=(64, 128), default=None, help="the embedded model (default 64)")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--seed", type=int, default=23, help="prompt set (23: neither the eval set nor the Pareto set)")
    p.add_argument("--candidate", action="append", default=[], metavar="NAME=field:value,...")
    p.add_argument("--costs-from", metavar="PARETO_JSON", help="fit per-step-kind costs to this run's scaled timings")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json")
    args = p.parse_args()
    if args.seed == 0:
        raise SafeDitError("--seed 0 is the eval and Pareto prompt set: choose schedules on another seed")
    torch.set_num_threads(args.threads)
    candidates = dict(parse_candidate(c) for c in args.candidate) or {"defaults": {}}
    configs = {n: SafeConfig("safe-core", **(CORE | o)) for n, o in candidates.items()}
    costs = fit_costs(args.costs_from) if args.costs_from else None
    pipe = load_default_pipeline(size=args.size)
    pipe.set_progress_bar_config(disable=True)
    scenes = prompt_set(args.prompts // 2, args.prompts - args.prompts // 2, args.seed)
    psnrs: dict[str, list[float]] = {n: [] for n in configs}
    dense_run: dict[str, list[int]] = {n: [] for n in configs}  # dense steps each call ran (drift anchors included)
    for i, scene in enumerate(tqdm(scenes, desc="prompts", file=sys.stderr)):  # settings interleaved per prompt
        caption = world.caption(scene)
        apply_safe_dit(pipe, SafeConfig("dense-fp"))
        reference = generate(pipe, caption, 1000 + i, args.steps, args.guidance)[0]
        for name, cfg in configs.items():
            apply_safe_dit(pipe, cfg)
            psnrs[name].append(psnr(generate(pipe, caption, 1000 + i, args.steps, args.guidance)[0], reference))
            kinds = runtime_of(pipe).last_report["steps"]
            dense_run[name].append(sum(k in ("warmup", "anchor", "tail") for k in kinds))
    rows = {}
    for name, cfg in configs.items():
        v = psnrs[name]
        mix = step_mix(cfg, args.steps)
        row = dict(overrides=candidates[name], median=statistics.median(v), mean=statistics.fmean(v),
                   p10=float(np.percentile(v, 10)), min=min(v), per_prompt=v, **mix,
                   dense_steps_run=statistics.fmean(dense_run[name]))
        if costs:  # drift anchors replace planned selective or reuse steps: the dense steps that ran count
            extra = row["dense_steps_run"] - mix["dense"]
            est = (costs["dense_step_s"] * (mix["dense"] + extra) + costs["selective_step_s"] * mix["selective"]
                   + costs["selective_step_s_per_keep"] * mix["selective"] * cfg.keep_ratio)
            row.update(estimated_s=est, estimated_speedup=costs["dense_s"] / est)
        rows[name] = row
    print(f"{len(scenes)} prompts (seed {args.seed}), {args.steps} steps, size {args.size or 64}; PSNR vs dense-fp")
    print(f"{'candidate':28s} {'median':>7s} {'mean':>7s} {'p10':>7s} {'min':>7s} dense (ran) sel reuse  est. x@4096")
    for name, r in rows.items():
        est = f"{r['estimated_speedup']:.2f}x" if costs else "-"
        print(f"{name:28s} {r['median']:7.2f} {r['mean']:7.2f} {r['p10']:7.2f} {r['min']:7.2f} {r['dense']:5d} "
              f"({r['dense_steps_run']:4.1f}) {r['selective']:3d} {r['reuse']:5d}  {est}")
    result = dict(prompts=len(scenes), steps=args.steps, seed=args.seed, size=args.size or 64, guidance=args.guidance,
                  costs=costs, candidates=rows, environment=environment("cpu"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
