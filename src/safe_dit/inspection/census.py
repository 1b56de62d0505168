"""The mask census of diffusers' image and video DiTs (``safe-dit audit --zoo``): which attention calls get which
mask.

For every backbone kit, and every image-generation and video transformer class of the installed diffusers for which
a tiny offline recipe exists (``safe_dit.inspection.recipes``, ``recipes_video``: video classes get 2 latent frames
of the grid), one seeded random model is built and run in
three settings: batch 1, a batch of 2 with equal caption lengths, and the CFG batch of 2 whose captions have
different valid lengths (what a prompt and an empty negative prompt give). Every call to
``torch.nn.functional.scaled_dot_product_attention`` (what diffusers' native dispatcher ends in) is
recorded with its mask's shape, dtype and kind (``safe_dit.inspection.masks``).

The tax is estimated, not timed: each masked call is charged the Mask-Induced Dispatch Tax that
``safe-dit midt`` measured for its mask kind at N = 4096 (``benchmarks/results/midt-*.json``), weighted by
the call's attention work (B*H*Lq*Lk*d) in the census forward. Classes without a recipe, or whose build
fails, are listed with the reason.
"""


from __future__ import annotations

import json
import os
import statistics
import traceback

import torch

from safe_dit.inspection.masks import SdpaCensus, describe_call, mask_kind  # noqa: F401  (the census's spy)
from safe_dit.inspection.recipes import Recipe, image_transformer_classes, recipe_for, recipes  # noqa: F401
from safe_dit.inspection.recipes_video import FRAMES, WHY_NOT_BUILT, video_transformer_classes

SETTINGS = (("batch 1", 1, "full"), ("batch 2, equal captions", 2, "full"),
            ("CFG batch 2, different captions", 2, "cfg"))


def census_one(recipe: Recipe, grid=(16, 16), seed: int = 0) -> dict:
    row = {"class": recipe.cls, "pipeline": recipe.pipeline, "settings": []}
    try:
        model = recipe.build(seed)
        if row["pipeline"] is None and recipe.kit is not None:  # the kit's own pipeline around the model
            from safe_dit.testing.kits import kit_for

            row["pipeline"] = type(kit_for(recipe.kit).pipeline(transformer=model)).__name__
    except Exception as err:  # noqa: BLE001 - the census lists why a class cannot be built
        row["error"] = f"build failed: {type(err).__name__}: {err}"
        return row
    row["class"] = type(model).__name__
    t = recipe.text_len
    for label, batch, lens_kind in SETTINGS:
        lens = [t] * batch if lens_kind == "full" else [t, max(1, t // 4)]
        g = torch.Generator().manual_seed(seed)
        try:
            kwargs = recipe.inputs(model, batch, lens, grid, g)
            with torch.no_grad(), SdpaCensus() as spy:
                model(**kwargs)
        except Exception as err:  # noqa: BLE001
            row["error"] = f"forward failed ({label}): {type(err).__name__}: {err}"
            row["trace"] = traceback.format_exc(limit=3)
            return row
        entry = {"setting": label, "caption_lens": lens, "calls": spy.calls}
        entry["dense_fp_masked_calls"] = _dense_fp_masked(model, kwargs)
        row["settings"].append(entry)
    row["safe_dit_modes"] = safe_dit_modes(model)
    return row


def safe_dit_modes(model) -> list[str]:
    """The safe-dit modes this model's adapter accepts ([] without one): what ``apply_safe_dit`` would not refuse."""
    from safe_dit.adapters import adapter_for
    from safe_dit.config import MODES, SafeConfig, SafeDitError

    try:
        adapter = adapter_for(model)
    except SafeDitError:
        return []
    modes = []
    for mode in MODES:
        try:
            adapter.check(model, SafeConfig(mode))
        except SafeDitError:
            continue
        modes.append(mode)
    return modes


def adapter_status(modes: list[str]) -> str:
    """A census row's safe-dit status in words."""
    if not modes:
        return "no adapter"
    if "safe-core" not in modes:
        return "dense-fp only"
    return "safe-core + safe-sw" if "safe-sw" in modes else "safe-core (no safe-sw)"


def _dense_fp_masked(model, kwargs) -> int | None:
    """Masked SDPA calls of the same forward under safe-dit's dense-fp (None: no adapter for this class)."""
    from safe_dit.adapters import supported_classes
    from safe_dit.api import apply_safe_dit, remove_safe_dit
    from safe_dit.config import SafeConfig

    if type(model).__name__ not in supported_classes():
        return None
    apply_safe_dit(model, SafeConfig("dense-fp"))
    try:
        with torch.no_grad(), SdpaCensus() as spy:
            model(**kwargs)
    finally:
        remove_safe_dit(model)
    return sum(c["kind"] != "none" for c in spy.calls)


# ---------------------------------------------------------------------------------------------------------
# the estimate from the MIDT measurements

_MIDT_CASE = {"all-valid bool": "bool-expanded", "all-valid float": "additive-zero",
              "row-constant": "additive-rowconst",
              "key-padding": "key-padding", "other bool": "bool-expanded", "other float": "additive-zero",
              "rank-1 bias float": "additive-zero", "pair bool": "bool-full"}


def midt_taxes(results_dir: str, device: str, seq_len: int = 4096) -> dict[str, float]:
    """Median MIDT tax per mask case at ``seq_len`` from ``midt-<device>.json`` ({} if the file is missing)."""
    path = os.path.join(results_dir, f"midt-{device}.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        cases = json.load(f)["cases"]
    out = {}
    for case in {c["mask"] for c in cases}:
        taxes = [c["tax"] for c in cases if c["mask"] == case and c["seq_len"] == seq_len and c.get("tax")]
        if taxes:
            out[case] = statistics.median(taxes)
    return out


def _charge(call: dict, taxes: dict[str, float]) -> float:
    kind = call["kind"]
    if kind == "none":
        return 1.0
    flavour = "bool" if call["mask_dtype"] == "bool" else "float"
    key = kind if kind in ("row-constant", "key-padding") else f"{kind} {flavour}"
    return taxes.get(_MIDT_CASE[key], 1.0)


def _work(call: dict) -> float:
    q, k = call["q"], call["k"]
    return float(q[0] * q[1] * q[2] * k[2] * q[3])


def summarize_row(row: dict, taxes: dict[str, dict[str, float]]) -> dict:
    """Per setting: calls, masked calls per kind, and the estimated attention-time factor per device."""
    out = []
    for s in row.get("settings", []):
        kinds: dict[str, int] = {}
        for c in s["calls"]:
            kinds[c["kind"]] = kinds.get(c["kind"], 0) + 1
        work = sum(_work(c) for c in s["calls"]) or 1.0
        est = {dev: sum(_work(c) * _charge(c, t) for c in s["calls"]) / work for dev, t in taxes.items() if t}
        removable = sum(_work(c) for c in s["calls"]
                        if c["kind"] in ("all-valid", "row-constant", "key-padding", "pair", "rank-1 bias"))
        unmasked = sum(_work(c) for c in s["calls"] if c["kind"] == "none")
        out.append({"setting": s["setting"], "calls": len(s["calls"]),
                    "masked": len(s["calls"]) - kinds.get("none", 0),
                    "dense_fp_masked": s.get("dense_fp_masked_calls"),
                    "kinds": kinds, "masked_work_fraction": 1 - unmasked / work,
                    "exactly_removable_work_fraction": removable / work, "attention_tax_estimate": est,
                    "mask_shapes": sorted({f"{c['mask_dtype']}{c['mask_shape']}" for c in s["calls"]
                                           if c["kind"] != "none"})})
    return {"class": row["class"], "pipeline": row["pipeline"], "error": row.get("error"), "settings": out}


def run_census(results_dir: str = "benchmarks/results", grid=(16, 16), progress=None) -> dict:
    from safe_dit.adapters import supported_classes
    from safe_dit.inspection.environment import environment

    taxes = {dev: midt_taxes(results_dir, dev) for dev in ("gpu", "cpu")}
    known = recipes()
    by_class = {r.cls: r for r in known}
    rows = []
    kit_classes = {r.cls for r in known if r.kit is not None}  # every kit's class (video backbones too)
    video = set(video_transformer_classes())
    classes = sorted(kit_classes | set(image_transformer_classes()) | video)
    for name in classes:
        if progress:
            progress(name)
        if name in by_class:
            rows.append(census_one(by_class[name], grid))
        elif name in WHY_NOT_BUILT:
            rows.append({"class": name, "pipeline": None, "settings": [], "error": f"not built: {WHY_NOT_BUILT[name]}",
                         "why": WHY_NOT_BUILT[name]})
        else:
            rows.append({"class": name, "pipeline": None, "settings": [],
                         "error": "not built: no tiny recipe yet (model-specific inputs)",
                         "why": "the census has no tiny config and inputs for this class yet: its forward takes "
                                "inputs specific to its pipeline that the census does not synthesise"})
    supported = set(supported_classes())
    summary = []
    for row in rows:
        s = summarize_row(row, taxes)
        s["safe_dit_adapter"] = row["class"] in supported
        s["safe_dit_modes"] = row.get("safe_dit_modes", [])
        s["video"] = row["class"] in video
        summary.append(s)
    return {"benchmark": "census", "environment": environment("cpu"), "settings": {
        "grid": list(grid), "image_tokens": grid[0] * grid[1], "video_latent_frames": FRAMES,
        "text_len": {r.cls: r.text_len for r in known},
        "tax_source": {dev: f"midt-{dev}.json, median over head dims at N=4096" for dev, t in taxes.items() if t},
        "midt_taxes": taxes}, "rows": rows, "summary": summary}


def _table(summary: list[dict]) -> list[str]:
    lines = ["| class | pipeline | attention calls with a mask (batch 1 / equal / CFG different) "
             "| mask kinds (CFG batch) | est. attention-time factor, CFG batch (GPU MIDT) | exactly removable work "
             "| safe-dit dense-fp: masked calls | safe-dit |",
             "|---|---|---|---|---|---|---|---|"]
    for s in summary:
        if s["error"]:
            lines.append(f"| `{s['class']}` | {s['pipeline'] or '–'} | – | {s['error'][:160]} | – | – | – | – |")
            continue
        counts = " / ".join(f"{x['masked']}/{x['calls']}" for x in s["settings"])
        cfg = s["settings"][-1]
        kinds = ", ".join(f"{k} ×{n}" for k, n in sorted(cfg["kinds"].items()) if k != "none") or "none"
        shapes = "; ".join(cfg["mask_shapes"])
        gpu = cfg["attention_tax_estimate"].get("gpu")
        fp = " / ".join(str(x["dense_fp_masked"]) for x in s["settings"]) if s["safe_dit_adapter"] else "no adapter"
        shapes = f" ({shapes})" if shapes else ""
        factor = "–" if gpu is None else f"{gpu:.2f}×"
        lines.append(f"| `{s['class']}` | {s['pipeline']} | {counts} | {kinds}{shapes} | "
                     f"{factor} | {cfg['exactly_removable_work_fraction']:.0%} | {fp} | "
                     f"{adapter_status(s.get('safe_dit_modes', []))} |")
    return lines


def format_census(result: dict) -> str:
    """The census as Markdown: the image classes' table, then the video classes' (each class built, or listed with
    the reason it is not)."""
    frames = result["settings"].get("video_latent_frames", FRAMES)
    image = [s for s in result["summary"] if not s.get("video")]
    video = [s for s in result["summary"] if s.get("video")]
    return "\n".join(["## Image classes", ""] + _table(image) + [
        "", f"## Video classes ({frames} latent frames of the same grid)", ""] + _table(video))


def plot_census(result: dict, path: str) -> None:
    from matplotlib.figure import Figure  # no pyplot: no backend, no global figure state

    rows = [s for s in result["summary"] if not s["error"]]
    names = [s["class"].replace("Transformer2DModel", "").replace("Transformer3DModel", "").replace("2DModel", "")
             + f"  [{adapter_status(s.get('safe_dit_modes', []))}]" for s in rows]  # what safe-dit runs on it
    fig = Figure(figsize=(12, 0.45 * len(rows) + 1.8))
    ax1, ax2 = fig.subplots(1, 2, sharey=True)
    kinds = ("all-valid", "row-constant", "key-padding", "pair", "rank-1 bias", "other")
    colours = {"all-valid": "tab:green", "row-constant": "tab:olive", "key-padding": "tab:orange",
               "pair": "tab:brown", "rank-1 bias": "tab:purple", "other": "tab:red"}
    left = [0.0] * len(rows)
    for kind in kinds:
        vals = [s["settings"][-1]["kinds"].get(kind, 0) / max(1, s["settings"][-1]["calls"]) for s in rows]
        ax1.barh(names, vals, left=left, color=colours[kind], label=kind)
        left = [a + b for a, b in zip(left, vals)]
    ax1.set_xlim(0, 1)
    ax1.set_xlabel("share of attention calls with a mask\n(CFG batch, different caption lengths)")
    ax1.legend(fontsize=8, loc="lower right")
    gpu = [s["settings"][-1]["attention_tax_estimate"].get("gpu", 1.0) for s in rows]
    cpu = [s["settings"][-1]["attention_tax_estimate"].get("cpu", 1.0) for s in rows]
    y = range(len(rows))
    ax2.barh([i + 0.2 for i in y], gpu, height=0.4, label="GPU (H200 MIDT)")
    ax2.barh([i - 0.2 for i in y], cpu, height=0.4, label="CPU (2-core MIDT)")
    ax2.axvline(1.0, color="k", lw=0.6)
    ax2.set_xlabel("estimated attention-time factor from its masks\n(MIDT at N=4096)")
    ax2.legend(fontsize=8)
    env = result["environment"]
    frames = result["settings"].get("video_latent_frames", FRAMES)
    fig.suptitle(f"Mask census of diffusers {env['diffusers']} image and video DiTs (tiny random models, "
                 f"{result['settings']['image_tokens']} image tokens; video: {frames} frames of them), "
                 f"torch {env['torch']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
