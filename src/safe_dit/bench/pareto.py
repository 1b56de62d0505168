"""Speed-quality Pareto of SAFE-DiT against peer accelerators, with component ablations, side by side.

One process, same prompts, seeds, steps, guidance and dtype for every setting:

* safe-dit: dense, dense-fp, safe-core (a keep_ratio / anchor_interval sweep), safe-sw;
* ablations of safe-core (each switches one part of the defaults off): without the fast path, without SRSU (every step
  dense), without CAR (no refresh after warm-up), PCSP replaced by a uniform or a random partition
  of the same size; safe-sw with a flat map (its mean guidance everywhere);
* peers: diffusers' own cache hooks on the same transformer (FirstBlockCache, TaylorSeer,
  FasterCache, MagCache, PyramidAttentionBroadcast, SeaCache, TextKVCache) at a few settings each,
  cache-dit's DBCache (alone, with TaylorSeer or FoCa; the optional extra ``safe-dit[peers]``, skipped with
  one line when it is missing), and plain step reduction. Peers run on the dense-fp model (the exact fast
  path on, so the comparison is between schedules; dense/dense-fp is its own row). A method that fails on the
  model, or attaches no hook to it, is listed as unsupported with the reason.

Part 1, quality (the embedded shapes model: 64x64, 256 tokens, or ``--size 128``, 1024 tokens): prompt
alignment graded by the checker, paired PSNR/SSIM against dense-fp, median seconds per image and the ratio to dense
(tiny images: these latency ratios are noisy), peak memory of one call. Part 2, latency at scale
(``--scaled-tokens``, default 4096 = a 1024² image): every setting (``--scaled-subset``: a short
list) on a random-weight Lumina-Next with the real head dim 72, one timed call each (``--scaled-repeats``: the median
of several); quality is not measured
there (random weights). Adaptive caches (FirstBlockCache, MagCache, SeaCache, cache-dit) would decide what to
skip from random activations, which mean nothing: at scale they replay the per-step share of blocks
they computed on the trained embedded model in part 1 (each scaled row's JSON field ``decisions``, the
table's 'replayed' column, says which was done).

Writes a table, JSON (``--json``; also the last stdout line), a Pareto PNG (``--plot``: quality vs
speedup, one point per setting, SAFE-Core highlighted, front marked) and an ablation bar chart
(``--ablation-plot``).
"""

from __future__ import annotations

import dataclasses
import json
import sys

import torch

from safe_dit.bench.pareto_report import plot_ablation, plot_pareto, table
from safe_dit.bench.pareto_runs import reuse_scaled, run_quality, run_scaled

# the parts, re-exported: settings and analysis, the two runs, the outputs
from safe_dit.bench.pareto_settings import CORE, FAMILIES, Setting, analyse, default_settings, pareto_front, verdicts
from safe_dit.bench.peers import available_hooks, peer_family
from safe_dit.bench.quality import REFERENCE, prompt_set
from safe_dit.bench.report import emit
from safe_dit.inspection.environment import environment

__all__ = ["CORE", "FAMILIES", "Setting", "analyse", "default_settings", "pareto_front",
           "plot_ablation", "plot_pareto", "reuse_scaled", "run", "run_quality", "run_scaled", "table", "verdicts"]


def skip_missing_peers(settings: list[Setting]) -> tuple[list[Setting], dict[str, str]]:
    """The settings whose peer library is installed; each missing family is named once on stderr, with why."""
    skipped: dict[str, str] = {}
    kept = []
    for s in settings:
        family = peer_family(s.peer.method) if s.peer is not None else None
        reason = family.missing_reason() if family is not None else None
        if reason is None:
            kept.append(s)
        elif family.method not in skipped:
            skipped[family.method] = reason
    for method, reason in skipped.items():
        n = sum(1 for s in settings if s.peer is not None and s.peer.method == method)
        print(f"safe-dit pareto: {method} skipped ({n} settings): {reason}", file=sys.stderr)
    return kept, skipped


def run(args) -> int:

    if args.from_json:
        with open(args.from_json) as f:
            result = json.load(f)
        if args.ablation_plot:
            plot_ablation(result, args.ablation_plot)
        return emit(result, table(result), args, plot_pareto)

    # --quick's sizes and the argument checks: safe_dit.commands.pareto.prepare, before this module loads
    previous = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(previous)  # the process's setting again (an in-process caller, a test suite)


def _run(args) -> int:
    from safe_dit.embedded.model import load_default_pipeline, weights_identity

    settings = [s for s in default_settings() if (s.family in args.families or s.name in ("dense", REFERENCE))
                and (s.peer is None or args.peers is None or s.peer.method in args.peers)]
    settings, skipped = skip_missing_peers(settings)
    torch.manual_seed(args.seed)
    pipe = load_default_pipeline(args.model, size=args.size)
    pipe.set_progress_bar_config(disable=True)
    scenes = prompt_set(args.single, args.two, args.seed)
    progress = not args.no_progress
    part1 = run_quality(pipe, settings, scenes, args, progress)
    part2 = reuse_scaled(settings, args) if args.scaled_from else run_scaled(settings, args, progress,
                                                                                     part1.get("patterns")) \
        if args.scaled_tokens else None
    rows = part1.pop("rows")
    weights = weights_identity(args.model, args.size)
    result = dict(
        benchmark="pareto",
        settings=[dict(name=s.name, family=s.family, mode=s.safe.mode, ablations=list(s.safe.ablations),
                       peer=s.peer.method if s.peer else None, peer_params=s.peer.params if s.peer else None,
                       steps=s.steps(args.steps), note=s.note, config=dataclasses.asdict(s.safe))
                  for s in settings],
        settings_common=dict(prompts=len(scenes), single=args.single, two=args.two, steps=args.steps,
                             guidance=args.guidance, seed=args.seed, dtype="float32",
                             model=args.model or weights["path"], size=int(pipe.default_sample_size), weights=weights,
                             peers_run_on="dense-fp (the exact fast path on)",
                             diffusers_cache_hooks=available_hooks(), peers_skipped=skipped),
        quality=part1, scaled=part2, analysis=analyse(settings, part1, part2), rows=rows,
        environment=environment("cpu"),
    )
    if args.ablation_plot:
        plot_ablation(result, args.ablation_plot)
    return emit(result, table(result), args, plot_pareto)
