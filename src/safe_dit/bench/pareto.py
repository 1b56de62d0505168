"""Speed-quality Pareto of SAFE-DiT against peer accelerators, with component ablations, side by side.

One process, same prompts, seeds, steps, guidance and dtype for every setting:

* safe-dit: dense, dense-fp, safe-core (a keep_ratio / anchor_interval sweep), safe-sw;
* ablations of safe-core (keep 0.25, anchor 5): without the fast path, without SRSU (every step
  dense), without CAR (no refresh after warm-up), PCSP replaced by a uniform or a random partition
  of the same size; safe-sw with a flat map (its mean guidance everywhere);
* peers: diffusers' own cache hooks on the same transformer (FirstBlockCache, TaylorSeer,
  FasterCache, MagCache, PyramidAttentionBroadcast, SeaCache, TextKVCache) at a few settings each,
  and plain step reduction. Peers run on the dense-fp model (the exact fast path on, so the
  comparison is between schedules; dense/dense-fp is its own row). A method that fails on the
  model, or attaches no hook to it, is listed as unsupported with the reason.

Part 1, quality (the embedded shapes model, 64x64, 256 tokens): prompt alignment graded by the
checker, paired PSNR/SSIM against dense-fp, median seconds per image and the ratio to dense (tiny
images: these latency ratios are noisy), peak memory of one call. Part 2, latency at scale
(``--scaled-tokens``, default 4096 = a 1024² image): every setting (``--scaled-subset``: a short
list) on a random-weight Lumina-Next with the real head dim 72, one timed call each; quality is not measured
there (random weights), and adaptive caches (FirstBlockCache, MagCache, SeaCache) decide what to
skip from the model's own activations, which random weights do not represent.

Writes a table, JSON (``--json``; also the last stdout line), a Pareto PNG (``--plot``: quality vs
speedup, one point per setting, SAFE-Core highlighted, front marked) and an ablation bar chart
(``--ablation-plot``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from safe_dit.embedded import world
from safe_dit.api import apply_safe_dit, remove_safe_dit, runtime_of
from safe_dit.config import SafeConfig, SafeDitError
from safe_dit.environment import environment, peak_memory_mb
from safe_dit.bench.quality import REFERENCE, Run, generate, pair_with_reference, prompt_set, run_interleaved, summarize
from safe_dit.bench.peers import DEFAULT_PEERS, PeerSetting, PeerUnsupported, apply_peer, available_hooks, calibrate_mag_ratios
from safe_dit.bench.report import add_output_arguments, emit, pyplot

FAMILIES = ("safe-dit", "ablation", "peer", "steps")
CORE = dict(keep_ratio=0.25, warmup_steps=2, anchor_interval=5, tail_dense_steps=1)  # SafeConfig's defaults


@dataclass(frozen=True)
class Setting:
    """One point of the comparison: a safe-dit config, optionally a peer hook on top, optionally
    fewer steps (``step_fraction`` of the run's steps)."""

    name: str
    family: str
    safe: SafeConfig
    peer: PeerSetting | None = None
    step_fraction: float | None = None
    scaled: bool = False  # also timed on the scaled random-weight model
    note: str = ""

    def steps(self, steps: int) -> int:
        return steps if self.step_fraction is None else max(1, round(steps * self.step_fraction))

    @property
    def is_safe_core(self) -> bool:
        return self.family == "safe-dit" and self.safe.scheduled


def default_settings() -> list[Setting]:
    fp = SafeConfig("dense-fp")
    out = [
        Setting("dense", "safe-dit", SafeConfig("dense"), scaled=True, note="stock model, masks as shipped"),
        Setting("dense-fp", "safe-dit", fp, scaled=True, note="exact fast path (reference for PSNR/SSIM)"),
        Setting("safe-core", "safe-dit", SafeConfig("safe-core", **CORE), scaled=True, note="keep 0.25, anchor 5"),
    ]
    for keep, anchor in ((0.25, 3), (0.25, 10), (0.5, 5), (0.15, 5)):
        out.append(Setting(f"safe-core k{keep} a{anchor}", "safe-dit",
                           SafeConfig("safe-core", **(CORE | dict(keep_ratio=keep, anchor_interval=anchor))),
                           note=f"keep {keep}, anchor {anchor}"))
    out.append(Setting("safe-sw", "safe-dit", SafeConfig("safe-sw", **CORE), note="guidance 3 (context) .. 5 (sensitive)"))
    ablations = (
        ("no-fast-path", dict(mask_elision=False), True, "stock masks kept, scheduling on"),
        ("no-srsu", dict(srsu=False), False, "every step dense (PCSP computed, unused)"),
        ("no-car", dict(car=False), False, "no anchors or tail after warm-up"),
        ("uniform-partition", dict(partition="uniform"), False, "strided tokens instead of PCSP"),
        ("random-partition", dict(partition="random"), False, "seeded random tokens instead of PCSP"),
    )
    for name, kw, scaled, note in ablations:
        out.append(Setting(name, "ablation", SafeConfig("safe-core", **CORE, **kw), scaled=scaled, note=note))
    out.append(Setting("safe-sw flat-map", "ablation", SafeConfig("safe-sw", **CORE, sw_map=False),
                       note="safe-sw with the map's mean guidance on every token"))
    scaled_peers = {("first-block-cache", 0.1), ("taylorseer", 3), ("faster-cache", 2), ("mag-cache", 0.12),
                    ("pab", 2), ("sea-cache", 0.25)}
    for p in DEFAULT_PEERS:
        key = (p.method, next(iter(p.params.values()), None))
        out.append(Setting(p.name, "peer", fp, peer=p, scaled=key in scaled_peers, note="diffusers hook on dense-fp"))
    for frac in (2 / 3, 1 / 2, 1 / 3):
        out.append(Setting(f"steps x{frac:.2f}", "steps", fp, step_fraction=frac, scaled=frac == 1 / 2,
                           note="fewer sampling steps, dense-fp"))
    return out


class _Harness:
    """Turns settings into runs on one pipeline; calibrates MagCache once per step count (on a
    held-out prompt for the embedded model); remembers which settings are unsupported and why."""

    def __init__(self, pipe, steps: int, calibrate_call):
        self.pipe, self.steps, self.calibrate_call = pipe, steps, calibrate_call
        self.mag_ratios: dict[int, list[float]] = {}
        self.unsupported: dict[str, str] = {}

    def setup(self, s: Setting):
        def fn(pipe):
            apply_safe_dit(pipe, s.safe)
            if s.peer is None:
                return lambda: remove_safe_dit(pipe)
            n = s.steps(self.steps)
            ratios = None
            if s.peer.method == "mag-cache":
                if n not in self.mag_ratios:
                    self.mag_ratios[n] = calibrate_mag_ratios(pipe, n, lambda: self.calibrate_call(n))
                ratios = self.mag_ratios[n]
            try:
                undo = apply_peer(pipe, s.peer, n, mag_ratios=ratios)
            except BaseException:
                remove_safe_dit(pipe)
                raise

            def undo_all():
                undo()
                remove_safe_dit(pipe)

            return undo_all

        return fn

    def run(self, s: Setting) -> Run:
        return Run(s.name, self.setup(s), s.steps(self.steps))

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
    calib = world.caption(world.sample_scene(__import__("random").Random(10_000), two_object_prob=0.5))
    h = _Harness(pipe, args.steps, lambda n: generate(pipe, calib, 10_000, n, args.guidance))
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
    fp_s = summary[REFERENCE]["seconds"]
    for s in ok:
        e = summary[s.name]
        e["speedup_vs_dense_fp"] = fp_s / e["seconds"]
        e["peak_memory_mb"] = memory.get(s.name)
    return dict(summary=summary, rows=rows, unsupported=h.unsupported, mag_ratios=h.mag_ratios)


# -- part 2: latency at scale ---------------------------------------------------------------------
def run_scaled(settings: list[Setting], args, progress: bool) -> dict:
    from safe_dit.testing.kits import build_lumina_next, build_lumina_pipeline

    n_tokens = args.scaled_tokens
    side = math.isqrt(n_tokens)
    if side * side != n_tokens:
        raise SafeDitError(f"--scaled-tokens {n_tokens}: use a square token grid")
    if args.quick:
        transformer = build_lumina_next("tiny", num_layers=2)
    else:
        transformer = build_lumina_next("lumina-next-2b", num_layers=args.scaled_layers, hidden_size=args.scaled_hidden,
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

    h = _Harness(pipe, args.steps, lambda n: call(n, seed=1))
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
        undo = h.setup(s)(pipe)
        try:
            t0 = time.perf_counter()
            with torch.no_grad():
                call(s.steps(args.steps))
            seconds = time.perf_counter() - t0
            rt = runtime_of(pipe)
            rep = rt.last_report if rt is not None and rt.config.scheduled else None
        finally:
            undo()
        rows[s.name] = dict(status="ok", seconds=seconds, peak_memory_mb=None if math.isnan(mb) else mb,
                            token_fraction=rep["token_fraction"] if rep else 1.0)
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
                weights="random (latency only)", repeats=1, memory_measured_on=f"a {short}-step call",
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


# -- analysis -------------------------------------------------------------------------------------
def pareto_front(points: dict[str, tuple[float, float]]) -> list[str]:
    """Names not dominated by another point (at least as fast and as good, better in one)."""
    front = []
    for a, (sa, qa) in points.items():
        if not any((sb >= sa and qb >= qa) and (sb > sa or qb > qa) for b, (sb, qb) in points.items() if b != a):
            front.append(a)
    return sorted(front, key=lambda n: points[n][0])


def verdicts(settings: list[Setting], quality: dict, speed: dict[str, float], metric: str) -> list[dict]:
    """For each peer / step-reduction setting: the fastest SAFE-Core setting with at least its
    quality, and who is faster. ``speed`` maps names to speedup vs dense."""
    core = [s.name for s in settings if s.is_safe_core and s.safe.mode == "safe-core" and s.name in speed]
    out = []
    for s in settings:
        if s.family not in ("peer", "steps") or s.name not in speed or s.name not in quality:
            continue
        q = quality[s.name][metric]
        rivals = [c for c in core if quality[c][metric] >= q]
        entry = dict(setting=s.name, quality=q, speedup=speed[s.name])
        if not rivals:
            slower = [c for c in core if speed[c] <= speed[s.name]]
            entry.update(safe_core=None, verdict=(
                "peer wins: better quality than every SAFE-Core setting and faster than " + ", ".join(slower)
                if slower else "no SAFE-Core setting reaches its quality; it is slower than all of them (trade-off)"))
        else:
            best = max(rivals, key=lambda c: speed[c])
            faster = speed[best] >= speed[s.name]
            entry.update(safe_core=best, safe_core_quality=quality[best][metric], safe_core_speedup=speed[best],
                         verdict="safe-core faster at >= quality" if faster else "peer wins: faster at this quality")
        out.append(entry)
    return out


def analyse(settings: list[Setting], part1: dict, part2: dict | None) -> dict:
    q = part1["summary"]
    out = {}
    speeds = {"embedded": {n: e["speedup"] for n, e in q.items()}}
    if part2:
        speeds[f"{part2['tokens']} tokens"] = {n: r["speedup"] for n, r in part2["rows"].items()
                                               if r["status"] == "ok" and n in q}
    for where, sp in speeds.items():
        for metric in ("psnr_vs_dense_fp", "accuracy"):
            pts = {n: (v, q[n][metric]) for n, v in sp.items() if n in q}
            out[f"{where} / {metric}"] = dict(front=pareto_front(pts), verdicts=verdicts(settings, q, sp, metric))
    return out


# -- output ---------------------------------------------------------------------------------------
def table(result: dict) -> str:
    p1, p2 = result["quality"], result.get("scaled")
    tok = f"x@{p2['tokens']}" if p2 else ""
    head = (f"{'setting':34} {'family':8} {'steps':>5} {'x dense':>7} {tok:>7} {'peakMB':>7} {'PSNR':>6} {'SSIM':>6} "
            f"{'acc':>6} {'1-obj':>6} {'2-obj':>6} {'tokens':>6}")
    lines = [head]
    for s in result["settings"]:
        name = s["name"]
        if name in p1["unsupported"]:
            lines.append(f"{name:34} {s['family']:8} unsupported: {p1['unsupported'][name]}")
            continue
        e = p1["summary"][name]
        sc = ""
        if p2 and name in p2["rows"]:
            r = p2["rows"][name]
            sc = f"{r['speedup']:6.2f}x" if r["status"] == "ok" else "unsup."
        mem = f"{e['peak_memory_mb']:7.1f}" if e.get("peak_memory_mb") is not None else f"{'-':>7}"
        lines.append(f"{name:34} {s['family']:8} {s['steps']:5d} {e['speedup']:6.2f}x {sc:>7} {mem} "
                     f"{e['psnr_vs_dense_fp']:6.2f} {e['ssim_vs_dense_fp']:6.4f} {e['accuracy']:6.1%} "
                     f"{e.get('accuracy_single_object', float('nan')):6.1%} {e.get('accuracy_two_object', float('nan')):6.1%} "
                     f"{e['token_fraction']:6.3f}")
    st = result["settings_common"]
    lines.append(f"{st['prompts']} prompts ({st['single']} one-object, {st['two']} two-object), {st['steps']} steps, "
                 f"guidance {st['guidance']}, seed {st['seed']}, float32; PSNR/SSIM paired vs dense-fp (identical: 100); "
                 "'x dense' = median s/image of dense over the setting's, on the embedded model (256 tokens, noisy)")
    if p2:
        lines.append(f"x@{p2['tokens']}: latency ratio vs dense at {p2['tokens']} tokens ({p2['resolution']}²), "
                     f"Lumina-Next {p2['hidden_size']}w/{p2['layers']}L/{p2['heads']}h x {p2['head_dim']}, random weights, "
                     "1 timed call each; adaptive caches (first-block-cache, mag-cache, sea-cache) choose what to skip "
                     "from the activations, which random weights do not represent: their x@ values are indicative only")
        lines.append(f"{'scaled setting':34} {'seconds':>8} {'x dense':>8} {'x dense-fp':>10} {'peak MB':>8}")
        for name, r in p2["rows"].items():
            if r["status"] != "ok":
                lines.append(f"{name:34} unsupported: {r['reason']}")
                continue
            mem = f"{r['peak_memory_mb']:8.0f}" if r.get("peak_memory_mb") is not None else f"{'-':>8}"
            lines.append(f"{name:34} {r['seconds']:8.2f} {r['speedup']:7.2f}x {r['speedup_vs_dense_fp']:9.2f}x {mem}")
    for key, a in result["analysis"].items():
        lines.append(f"Pareto front ({key}): " + ", ".join(a["front"]))
        for v in a["verdicts"]:
            if v["safe_core"] is None:
                lines.append(f"  {v['setting']:32} q={v['quality']:.3g} at {v['speedup']:.2f}x -> {v['verdict']}")
            else:
                lines.append(f"  {v['setting']:32} q={v['quality']:.3g} at {v['speedup']:.2f}x vs {v['safe_core']} "
                             f"q={v['safe_core_quality']:.3g} at {v['safe_core_speedup']:.2f}x -> {v['verdict']}")
    return "\n".join(lines)


_COLORS = {"first-block-cache": "tab:blue", "taylorseer": "tab:orange", "faster-cache": "tab:green",
           "mag-cache": "tab:purple", "pab": "tab:brown", "sea-cache": "tab:pink", "text-kv-cache": "tab:olive",
           "steps": "tab:gray", "ablation": "tab:cyan", "safe-dit": "black"}


def _color(s: dict) -> str:
    return _COLORS.get(s["peer"] or s["family"], "black")


def plot_pareto(result: dict, path: str) -> None:
    plt = pyplot()
    q = result["quality"]["summary"]
    p2 = result.get("scaled")
    panels = [("embedded", {n: e["speedup"] for n, e in q.items()},
               "speedup vs dense, embedded model (256 tokens, noisy)")]
    if p2:
        panels.append((f"{p2['tokens']} tokens", {n: r["speedup"] for n, r in p2["rows"].items() if r["status"] == "ok"},
                       f"speedup vs dense at {p2['tokens']} tokens (random-weight Lumina-Next, latency only)"))
    metrics = (("psnr_vs_dense_fp", "paired PSNR vs dense-fp (dB, embedded model; >= 60 drawn at 60)"),
               ("accuracy", "prompt alignment: all attributes right (embedded model)"))
    fig, axes = plt.subplots(len(metrics), len(panels), figsize=(7.5 * len(panels), 10), squeeze=False)
    settings = {s["name"]: s for s in result["settings"]}
    for j, (where, sp, xlabel) in enumerate(panels):
        for i, (metric, ylabel) in enumerate(metrics):
            ax = axes[i][j]
            cap = 60.0 if metric == "psnr_vs_dense_fp" else None  # identical images score 100: keep the scale readable
            pts = {n: (v, min(q[n][metric], cap) if cap else q[n][metric]) for n, v in sp.items() if n in q}
            front = result["analysis"][f"{where} / {metric}"]["front"]
            fx = [pts[n][0] for n in front]
            fy = [pts[n][1] for n in front]
            ax.step(fx, fy, where="post", color="red", lw=0.8, alpha=0.5, label="Pareto front")
            seen = set()
            for n, (x, y) in pts.items():
                s = settings[n]
                core = s["family"] == "safe-dit" and s["mode"] in ("safe-core", "safe-sw")
                label = s["peer"] or s["family"]
                if core:
                    label = "SAFE-Core / SW"
                kw = dict(marker="*", s=180, color="red", edgecolor="black", zorder=5) if core else \
                    dict(marker="o" if s["family"] == "peer" else ("s" if s["family"] == "steps" else "^"), s=40,
                         color=_color(s), zorder=3)
                ax.scatter([x], [y], label=None if label in seen else label, **kw)
                seen.add(label)
                if core or n in front or s["family"] == "ablation" or n in ("dense", "dense-fp"):
                    ax.annotate(n, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
            ax.axvline(1.0, color="gray", lw=0.6)
            ax.set_xlabel(xlabel, fontsize=8)
            ax.set_ylabel(ylabel, fontsize=8)
            ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6), fontsize=8)
    env, st = result["environment"], result["settings_common"]
    fig.suptitle(f"SAFE-DiT vs diffusers cache hooks and step reduction: {st['prompts']} prompts x {st['steps']} steps, "
                 f"same seeds; {env['device']} ({env['processor'][:30]}), torch {env['torch']}, diffusers {env['diffusers']}",
                 fontsize=9)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_ablation(result: dict, path: str) -> None:
    plt = pyplot()
    q = result["quality"]["summary"]
    p2 = result.get("scaled")
    names = [n for n in ("safe-core", "no-fast-path", "no-srsu", "no-car", "uniform-partition", "random-partition",
                         "safe-sw", "safe-sw flat-map") if n in q]
    bars = [("paired PSNR vs dense-fp (dB; identical = 100, drawn at 60)",
             [min(q[n]["psnr_vs_dense_fp"], 60.0) for n in names]),
            ("accuracy (all attributes)", [q[n]["accuracy"] for n in names]),
            ("speedup vs dense, embedded", [q[n]["speedup"] for n in names])]
    if p2:
        bars.append((f"speedup vs dense at {p2['tokens']} tokens",
                     [p2["rows"][n]["speedup"] if n in p2["rows"] and p2["rows"][n]["status"] == "ok" else 0.0
                      for n in names]))
    fig, axes = plt.subplots(1, len(bars), figsize=(4.2 * len(bars), 4.2))
    colors = ["red" if n in ("safe-core", "safe-sw") else "tab:cyan" for n in names]
    for ax, (title, vals) in zip(axes, bars):
        ax.bar(range(len(names)), vals, color=colors)
        ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
        ax.set_title(title, fontsize=9)
        for k, v in enumerate(vals):
            ax.annotate(f"{v:.2f}" if v else "-", (k, v), ha="center", va="bottom", fontsize=6)
        ax.grid(axis="y", alpha=0.3)
    st = result["settings_common"]
    fig.suptitle(f"SAFE-Core ablations (keep 0.25, anchor 5): {st['prompts']} prompts x {st['steps']} steps; "
                 "0 = not timed at scale", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def configure_parser(p) -> None:
    p.add_argument("--model", default=None, help="directory of a shapes transformer (default: the embedded one)")
    p.add_argument("--single", type=int, default=18, help="one-object prompts (default 18; the first of eval's set)")
    p.add_argument("--two", type=int, default=12, help="two-object prompts (default 12)")
    p.add_argument("--steps", type=int, default=30, help="sampling steps for every setting but step reduction")
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES),
                   help="which groups of settings to run (dense and dense-fp always run)")
    p.add_argument("--scaled-tokens", type=int, default=4096,
                   help="image tokens of the latency-only run on a random-weight model (0 = skip; default 4096)")
    p.add_argument("--scaled-subset", action="store_true",
                   help="time only a subset at scale (dense, dense-fp, safe-core, no-fast-path, one setting per peer, "
                        "steps x0.5) instead of every setting")
    p.add_argument("--scaled-layers", type=int, default=2, help="blocks (default 2: FirstBlockCache needs a second)")
    p.add_argument("--scaled-hidden", type=int, default=288, help="width (default 288 = 4 heads x 72)")
    p.add_argument("--scaled-heads", type=int, default=4)
    p.add_argument("--scaled-kv-heads", type=int, default=1)
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (0 = torch's default); 1 is steadier on a shared, oversubscribed machine")
    p.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-memory calls")
    p.add_argument("--quick", action="store_true", help="CI-sized: 2 prompts, 6 steps, a tiny model at 64 tokens")
    p.add_argument("--ablation-plot", metavar="PATH", help="write the ablation bar chart PNG here")
    p.add_argument("--scaled-from", metavar="PATH",
                   help="reuse the scaled-model timings (random weights) of an earlier --json result instead of "
                        "timing again, e.g. after the embedded model was retrained; the quality part runs anew")
    p.add_argument("--from-json", metavar="PATH", help="redraw table and plots from an earlier --json result (no run)")
    add_output_arguments(p, plot_help="write the Pareto plot PNG here")
    p.set_defaults(func=run)


def run(args) -> int:
    from safe_dit.embedded.model import load_default_pipeline, weights_identity

    if args.from_json:
        with open(args.from_json) as f:
            result = json.load(f)
        if args.ablation_plot:
            plot_ablation(result, args.ablation_plot)
        return emit(result, table(result), args, plot_pareto)

    if args.quick:
        args.single, args.two, args.steps = 1, 1, 6
        args.scaled_tokens = 64 if args.scaled_tokens else 0
        args.scaled_subset = True
    if args.single < 0 or args.two < 0 or args.single + args.two == 0:
        raise SafeDitError("--single and --two must be >= 0 and not both 0")
    if args.steps < 1:
        raise SafeDitError("--steps must be >= 1")
    if args.scaled_tokens < 0:
        raise SafeDitError("--scaled-tokens must be >= 0")
    if args.threads < 0:
        raise SafeDitError("--threads must be >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = [s for s in default_settings() if s.family in args.families or s.name in ("dense", REFERENCE)]
    torch.manual_seed(args.seed)
    pipe = load_default_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    scenes = prompt_set(args.single, args.two, args.seed)
    progress = not args.no_progress
    part1 = run_quality(pipe, settings, scenes, args, progress)
    part2 = reuse_scaled(settings, args) if args.scaled_from else run_scaled(settings, args, progress) \
        if args.scaled_tokens else None
    rows = part1.pop("rows")
    result = dict(
        benchmark="pareto",
        settings=[dict(name=s.name, family=s.family, mode=s.safe.mode, ablations=list(s.safe.ablations),
                       peer=s.peer.method if s.peer else None, peer_params=s.peer.params if s.peer else None,
                       steps=s.steps(args.steps), note=s.note, config=dataclasses.asdict(s.safe))
                  for s in settings],
        settings_common=dict(prompts=len(scenes), single=args.single, two=args.two, steps=args.steps,
                             guidance=args.guidance, seed=args.seed, dtype="float32",
                             model=args.model or "embedded default", weights=weights_identity(args.model),
                             peers_run_on="dense-fp (the exact fast path on)",
                             diffusers_cache_hooks=available_hooks()),
        quality=part1, scaled=part2, analysis=analyse(settings, part1, part2), rows=rows,
        environment=environment("cpu"),
    )
    if args.ablation_plot:
        plot_ablation(result, args.ablation_plot)
    return emit(result, table(result), args, plot_pareto)
