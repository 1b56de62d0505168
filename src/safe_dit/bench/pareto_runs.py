"""Running the settings of ``safe-dit pareto``: part 1, quality on the embedded model; part 2, latency
on a random-weight Lumina-Next at scale (or those timings reused from an earlier result)."""

from __future__ import annotations

import json
import math
import random
import statistics
import sys
import time

import torch
from tqdm.auto import tqdm

from safe_dit.api import apply_safe_dit, remove_safe_dit, runtime_of
from safe_dit.bench.pareto_settings import Setting
from safe_dit.bench.peers import PeerUnsupported, apply_peer, calibrate_mag_ratios, peer_family
from safe_dit.bench.quality import REFERENCE, Run, generate, pair_with_reference, run_interleaved, summarize
from safe_dit.bench.replay import BlockRecorder, apply_replay
from safe_dit.config import SafeDitError
from safe_dit.embedded import world
from safe_dit.inspection.environment import peak_memory_mb


class Harness:
    """Turns settings into runs on one pipeline; calibrates MagCache once per step count (on a
    held-out prompt for the embedded model); remembers which settings are unsupported and why."""

    def __init__(self, pipe, steps: int, calibrate_call):
        self.pipe, self.steps, self.calibrate_call = pipe, steps, calibrate_call
        self.mag_ratios: dict[int, list[float]] = {}
        self.unsupported: dict[str, str] = {}
        self.recorders: dict[str, BlockRecorder] = {}  # adaptive peers: the blocks they computed, per call

    def setup(self, s: Setting, record: bool = False):
        def fn(pipe):
            apply_safe_dit(pipe, s.safe)
            if s.peer is None:
                return lambda: remove_safe_dit(pipe)
            n = s.steps(self.steps)
            ratios = None
            family = peer_family(s.peer.method)
            if family is not None and family.calibrated:
                if n not in self.mag_ratios:
                    self.mag_ratios[n] = calibrate_mag_ratios(pipe, n, lambda: self.calibrate_call(n))
                ratios = self.mag_ratios[n]
            try:
                undo = apply_peer(pipe, s.peer, n, mag_ratios=ratios)
            except BaseException:
                remove_safe_dit(pipe)
                raise
            recorder = None
            if record and family is not None and family.adaptive:
                recorder = self.recorders.setdefault(s.name, BlockRecorder(pipe, list(pipe.transformer.layers)))
                recorder.attach()

            def undo_all():
                if recorder is not None:
                    recorder.remove()
                undo()
                remove_safe_dit(pipe)

            return undo_all

        return fn

    def run(self, s: Setting) -> Run:
        return Run(s.name, self.setup(s, record=True), s.steps(self.steps))

    def probe(self, s: Setting, call, memory: bool) -> float | None:
        """Support check, warm-up and peak memory in one call; None when unsupported."""
        try:
            undo = self.setup(s)(self.pipe)
        except PeerUnsupported as err:
            self.unsupported[s.name] = str(err)
            return None
        try:
            with torch.no_grad():
                if memory:
                    return peak_memory_mb(lambda: call(s.steps(self.steps)))
                call(s.steps(self.steps))
                return float("nan")
        except Exception as err:  # noqa: BLE001 - a peer failing at run time is reported, not fatal
            if s.peer is None:
                raise
            self.unsupported[s.name] = f"{type(err).__name__}: {err}"
            return None
        finally:
            undo()


# -- part 1: quality on the embedded model ----------------------------------------------------------
def run_quality(pipe, settings: list[Setting], scenes, args, progress: bool) -> dict:
    first = world.caption(scenes[0])
    calib = world.caption(world.sample_scene(random.Random(10_000), two_object_prob=0.5))
    h = Harness(pipe, args.steps, lambda n: generate(pipe, calib, 10_000, n, args.guidance))
    memory = {}
    bar = tqdm(settings, desc="probe + memory", disable=not progress, file=sys.stderr)
    for s in bar:
        mb = h.probe(s, lambda n: generate(pipe, first, args.seed, n, args.guidance), args.memory)
        if mb is not None:
            memory[s.name] = None if math.isnan(mb) else mb
    ok = [s for s in settings if s.name not in h.unsupported]
    rows, images = run_interleaved(pipe, scenes, [h.run(s) for s in ok], args.steps, args.guidance, args.seed,
                                   progress, desc="pareto", warmup=False)
    pair_with_reference(rows, images)
    summary = summarize(rows, [s.name for s in ok], "dense")
    patterns = {name: r.median_pattern() for name, r in h.recorders.items() if r.calls}
    fp_s = summary[REFERENCE]["seconds"]
    for s in ok:
        e = summary[s.name]
        e["speedup_vs_dense_fp"] = fp_s / e["seconds"]
        e["peak_memory_mb"] = memory.get(s.name)
    return dict(summary=summary, rows=rows, unsupported=h.unsupported, mag_ratios=h.mag_ratios, patterns=patterns)


# -- part 2: latency at scale ---------------------------------------------------------------------
def run_scaled(settings: list[Setting], args, progress: bool, patterns: dict | None = None) -> dict:
    """``patterns``: per adaptive peer, the per-step share of blocks it computed on the embedded model
    (``BlockRecorder.median_pattern``); those are timed by replaying that share, not by their own decisions."""
    from safe_dit.testing.kits import build_lumina_next, build_lumina_pipeline

    n_tokens = args.scaled_tokens
    side = math.isqrt(n_tokens)
    if side * side != n_tokens:
        raise SafeDitError(f"--scaled-tokens {n_tokens}: use a square token grid")
    if args.quick:
        transformer = build_lumina_next("tiny", num_layers=2)
    else:
        transformer = build_lumina_next("lumina-next-2b", num_layers=args.scaled_layers,
                                        hidden_size=args.scaled_hidden,
                                        num_attention_heads=args.scaled_heads, num_kv_heads=args.scaled_kv_heads)
    pipe = build_lumina_pipeline(transformer)
    pipe.set_progress_bar_config(disable=True)
    cross = transformer.config.cross_attention_dim
    g = torch.Generator().manual_seed(0)
    embeds = [torch.randn(1, 32, cross, generator=g) for _ in range(2)]
    masks = [torch.tensor([[1] * 20 + [0] * 12]), torch.tensor([[1] * 3 + [0] * 29])]  # prompt / negative
    size = side * transformer.config.patch_size * pipe.vae_scale_factor

    def call(steps, seed=0):
        return pipe(prompt_embeds=embeds[0], prompt_attention_mask=masks[0], negative_prompt_embeds=embeds[1],
                    negative_prompt_attention_mask=masks[1], height=size, width=size, num_inference_steps=steps,
                    guidance_scale=args.guidance, generator=torch.Generator().manual_seed(seed),
                    output_type="latent").images

    repeats = getattr(args, "scaled_repeats", 1)
    h = Harness(pipe, args.steps, lambda n: call(n, seed=1))
    short = min(args.steps, 6)
    rows = {}
    todo = [s for s in settings if s.scaled or not args.scaled_subset]
    bar = tqdm(todo, desc=f"scaled {n_tokens} tokens", disable=not progress, file=sys.stderr)
    for s in bar:
        # warm-up + peak memory on a short call (every step kind of safe-core occurs in 6 steps)
        mb = h.probe(s, lambda n: call(min(n, short)), args.memory)
        if mb is None:
            rows[s.name] = dict(status="unsupported", reason=h.unsupported[s.name])
            continue
        replayed = (patterns or {}).get(s.name)
        if replayed is not None:
            apply_safe_dit(pipe, s.safe)
            undo_replay = apply_replay(pipe, list(transformer.layers), replayed["fractions"])

            def undo():
                undo_replay()
                remove_safe_dit(pipe)
        else:
            undo = h.setup(s)(pipe)
        try:
            timings = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                with torch.no_grad():
                    call(s.steps(args.steps))
                timings.append(time.perf_counter() - t0)
            seconds = statistics.median(timings)
            rt = runtime_of(pipe)
            rep = rt.last_report if rt is not None and rt.config.scheduled else None
        finally:
            undo()
        rows[s.name] = dict(status="ok", seconds=seconds, timings=timings,
                            peak_memory_mb=None if math.isnan(mb) else mb,
                            token_fraction=rep["token_fraction"] if rep else 1.0,
                            decisions=("replayed from the embedded model: "
                                       f"{replayed['computed']} of {replayed['of']} block-steps computed")
                            if replayed is not None else "its own (fixed pattern or random-weight activations)")
    for name in ("dense", REFERENCE):
        if rows.get(name, {}).get("status") != "ok":
            raise SafeDitError(f"the scaled run needs {name!r} among its settings")
    for r in rows.values():
        if r["status"] == "ok":
            r["speedup"] = rows["dense"]["seconds"] / r["seconds"]
            r["speedup_vs_dense_fp"] = rows[REFERENCE]["seconds"] / r["seconds"]
    cfg = transformer.config
    return dict(tokens=n_tokens, resolution=side * 16, layers=cfg.num_layers, hidden_size=cfg.hidden_size,
                heads=cfg.num_attention_heads, kv_heads=cfg.num_kv_heads, head_dim=transformer.head_dim,
                weights="random (latency only)", repeats=repeats, memory_measured_on=f"a {short}-step call",
                rows=rows, mag_ratios=h.mag_ratios)


def reuse_scaled(settings: list[Setting], args) -> dict:
    """The scaled-model timings of an earlier ``--json`` result. They are measured on random weights, so they
    do not depend on the embedded model: after retraining it, only the quality part needs to run again.
    Refused unless the earlier run timed the same settings with the same number of steps."""
    with open(args.scaled_from) as f:
        earlier = json.load(f)
    part = earlier.get("scaled")
    if not part:
        raise SafeDitError(f"{args.scaled_from} has no scaled-model timings to reuse")
    steps = earlier.get("settings_common", {}).get("steps")
    missing = sorted(s.name for s in settings if (s.scaled or not args.scaled_subset) and s.name not in part["rows"])
    if missing or steps != args.steps:
        raise SafeDitError(f"{args.scaled_from} timed other settings or steps ({steps} steps; missing: "
                           f"{', '.join(missing) or 'none'}): run the scaled part again")
    return dict(part, reused_from=dict(path=str(args.scaled_from), environment=earlier.get("environment")))
