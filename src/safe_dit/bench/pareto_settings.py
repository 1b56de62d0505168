"""The settings of ``safe-dit pareto`` (safe-dit modes, ablations, peers, step reduction) and the
analysis of its results: the Pareto front and, per peer, the verdict against SAFE-Core."""

from __future__ import annotations

from dataclasses import dataclass

from safe_dit.bench.choices import PARETO_FAMILIES
from safe_dit.bench.peers import DEFAULT_PEERS, PeerSetting, peer_family
from safe_dit.config import SafeConfig

FAMILIES = PARETO_FAMILIES
#: The scheduling knobs of SafeConfig's safe-core defaults (read from the dataclass, never copied by hand).
SCHEDULE_FIELDS = ("keep_ratio", "warmup_steps", "anchor_interval", "anchor_growth", "tail_dense_steps",
                   "final_selective_steps", "context_forecast", "reuse_every", "reuse_order", "anchor_drift")
CORE = {f: getattr(SafeConfig(), f) for f in SCHEDULE_FIELDS}
#: The schedule as published (arXiv 2606.29360) and shipped before: periodic anchors, frozen context, no reuse.
PUBLISHED = dict(keep_ratio=0.25, warmup_steps=2, anchor_interval=5, anchor_growth=0.0, tail_dense_steps=1,
                 final_selective_steps=0, context_forecast=0, reuse_every=0)


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


#: safe-core settings beside the defaults, from quality to speed: (name, overrides of CORE, note).
VARIANTS = (
    ("safe-core published", PUBLISHED, "the published schedule: keep 0.25, anchor every 5, frozen context"),
    ("safe-core quality", dict(reuse_every=0), "defaults without step reuse"),
    ("safe-core k0.15 a3", dict(keep_ratio=0.15, anchor_interval=3, anchor_growth=0.0, reuse_every=0),
     "keep 0.15, anchor every 3, context forecast"),
    ("safe-core gaps+0.5", dict(anchor_growth=0.5), "the defaults with anchor gaps growing by 0.5 (more anchors)"),
    ("safe-core k0.25", dict(keep_ratio=0.25), "the defaults at keep 0.25"),
    ("safe-core drift0.2", dict(anchor_drift=0.2), "the defaults with drift-triggered anchors at 0.2"),
    ("safe-core 0.4", dict(keep_ratio=0.15, anchor_growth=2.0),
     "the 0.4 defaults: keep 0.15, anchor gaps 2, 4, 6, ..."),
    ("safe-core fast", dict(keep_ratio=0.1, anchor_growth=2.0), "keep 0.10, anchor gaps 2, 4, 6, ..."),
)


def default_settings() -> list[Setting]:
    fp = SafeConfig("dense-fp")
    core = SafeConfig("safe-core", **CORE)
    out = [
        Setting("dense", "safe-dit", SafeConfig("dense"), scaled=True, note="stock model, masks as shipped"),
        Setting("dense-fp", "safe-dit", fp, scaled=True, note="exact fast path (reference for PSNR/SSIM)"),
        Setting("safe-core", "safe-dit", core, scaled=True, note="the defaults"),
    ]
    for name, overrides, note in VARIANTS:
        out.append(Setting(name, "safe-dit", SafeConfig("safe-core", **(CORE | overrides)), scaled=True, note=note))
    out.append(Setting("safe-core x0.67 steps", "safe-dit", core, step_fraction=2 / 3, scaled=True,
                       note="the defaults at 2/3 of the steps (composed with step reduction)"))
    out.append(Setting("safe-sw", "safe-dit", SafeConfig("safe-sw", **CORE),
                       note="guidance 3 (context) .. 5 (sensitive)"))
    ablations = (
        ("no-fast-path", dict(mask_elision=False), True, "stock masks kept, scheduling on"),
        ("no-srsu", dict(srsu=False), False, "every step dense (PCSP computed, unused)"),
        ("no-car", dict(car=False), False, "no anchors or tail after warm-up"),
        ("uniform-partition", dict(partition="uniform"), False, "strided tokens instead of PCSP"),
        ("random-partition", dict(partition="random"), False, "seeded random tokens instead of PCSP"),
        ("no-context-forecast", dict(context_forecast=0), True, "sensitive rows attend to the anchor's context K/V"),
        ("periodic-anchors", dict(anchor_interval=5, anchor_growth=0.0), True, "as many anchors, evenly spaced"),
    )
    for name, kw, scaled, note in ablations:
        out.append(Setting(name, "ablation", SafeConfig("safe-core", **(CORE | kw)), scaled=scaled, note=note))
    out.append(Setting("safe-sw flat-map", "ablation", SafeConfig("safe-sw", **CORE, sw_map=False),
                       note="safe-sw with the map's mean guidance on every token"))
    for p in DEFAULT_PEERS:
        out.append(Setting(p.name, "peer", fp, peer=p, scaled=peer_family(p.method).scaled == p.params,
                           note=f"{peer_family(p.method).library} on dense-fp" if peer_family(p.method).library
                           != "diffusers" else "diffusers hook on dense-fp"))
    for frac in (2 / 3, 1 / 2, 1 / 3):
        out.append(Setting(f"steps x{frac:.2f}", "steps", fp, step_fraction=frac, scaled=frac == 1 / 2,
                           note="fewer sampling steps, dense-fp"))
    return out


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
        for metric in ("psnr_vs_dense_fp", "psnr_min", "accuracy"):
            pts = {n: (v, q[n][metric]) for n, v in sp.items() if n in q and metric in q[n]}
            if not pts:
                continue
            out[f"{where} / {metric}"] = dict(front=pareto_front(pts), verdicts=verdicts(settings, q, sp, metric))
    return out
