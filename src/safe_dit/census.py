"""The mask census of diffusers' image DiTs (``safe-dit audit --zoo``): which attention calls get which mask.

For every image-generation transformer class of the installed diffusers for which a tiny offline recipe
exists here (a config and the inputs its pipeline passes), one seeded random model is built and run in
three settings: batch 1, a batch of 2 with equal caption lengths, and the CFG batch of 2 whose captions have
different valid lengths (what a prompt and an empty negative prompt give). Every call to
``torch.nn.functional.scaled_dot_product_attention`` (what diffusers' native dispatcher ends in) is
recorded with its mask's shape, dtype and kind:

* ``none``; ``all-valid`` (an all-True bool mask, an all-zero bias): removable exactly;
* ``row-constant`` (every query row adds one finite constant): removable exactly;
* ``key-padding`` (the same valid keys for every head and query of a sample): rewritable exactly into
  mask-free calls (slice keys, split the batch by length);
* ``other`` (anything else: query x key masks, biases that are no padding, a 0/1 float mask used as a
  bias): semantic, kept.

The tax is estimated, not timed: each masked call is charged the Mask-Induced Dispatch Tax that
``safe-dit midt`` measured for its mask kind at N = 4096 (``benchmarks/results/midt-*.json``), weighted by
the call's attention work (B*H*Lq*Lk*d) in the census forward. Classes without a recipe, or whose build
fails, are listed with the reason.
"""

from __future__ import annotations

import inspect
import json
import os
import statistics
import traceback
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

# ---------------------------------------------------------------------------------------------------------
# the spy and the mask kinds


class SdpaCensus(TorchFunctionMode):
    """Records q/k shapes and the mask of every SDPA call (keyword or positional, as diffusers' backends call it)."""

    def __init__(self):
        super().__init__()
        self.calls: list[dict] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            named = dict(zip(("query", "key", "value", "attn_mask"), args)) | kwargs
            self.calls.append(describe_call(named["query"], named["key"], named.get("attn_mask"),
                                            bool(named.get("enable_gqa", False))))
        return func(*args, **kwargs)


def mask_kind(mask: torch.Tensor | None, q_shape, k_shape) -> str:
    """none / all-valid / row-constant / key-padding / rank-1 bias / other, for a mask as SDPA receives it
    (q [B, H, Lq, d], k [B, Hk, Lk, d]). Reads values: for the census, never on a hot path. A rank-1 bias
    u_i v_j (Chroma's float m_i m_j) is exactly removable too: one extra q/k channel carries it."""
    if mask is None:
        return "none"
    b, h, lq, lk = q_shape[0], q_shape[1], q_shape[2], k_shape[2]
    m = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape)).expand(b, -1, lq, lk)  # [B, h|1, Lq, Lk]
    if m.dtype == torch.bool:
        if bool(m.all()):
            return "all-valid"
        first = m[:, :1, :1, :]
        return "key-padding" if bool((m == first).all()) and bool(first.any(-1).all()) else "other"
    m = m.float()
    if not bool(torch.isfinite(m).all()) and bool(torch.isnan(m).any()):
        return "other"
    if bool((m == 0).all()):
        return "all-valid"
    finite = torch.isfinite(m).all()
    if bool(finite) and bool((m == m[..., :1]).all()) and float(m.abs().max()) <= 2.0 ** 14:
        return "row-constant"
    first = m[:, :1, :1, :]
    padding = (first == 0) | (first <= -1000)
    if bool((m == first).all()) and bool(padding.all()) and bool((first == 0).any(-1).all()):
        return "key-padding"
    if bool(finite) and _rank_one_per_sample(m):
        return "rank-1 bias"
    return "other"


def _rank_one_per_sample(m: torch.Tensor) -> bool:
    """m [B, h, Lq, Lk] finite: the same [Lq, Lk] matrix for every head of a sample, and it is u v^T."""
    if not bool((m == m[:, :1]).all()):
        return False
    for sample in m[:, 0].double():  # [Lq, Lk]
        i, j = divmod(int(sample.abs().argmax()), sample.shape[1])
        outer = sample[:, j:j + 1] * sample[i:i + 1, :] / sample[i, j]
        if not torch.allclose(outer, sample, rtol=0, atol=1e-6 * float(sample.abs().max())):
            return False
    return True


def describe_call(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, gqa: bool) -> dict:
    kind = mask_kind(mask, q.shape, k.shape)
    out = {"q": list(q.shape), "k": list(k.shape), "kind": kind, "mask_shape": None, "mask_dtype": None,
           "valid_key_fraction": None}
    if mask is not None:
        out["mask_shape"], out["mask_dtype"] = list(mask.shape), str(mask.dtype).replace("torch.", "")
        if kind == "key-padding":
            m = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
            first = m[:, 0, 0, :] if m.dtype == torch.bool else m[:, 0, 0, :] == 0
            out["valid_key_fraction"] = round(float(first.float().mean()), 3)
    return out


# ---------------------------------------------------------------------------------------------------------
# the recipes: a tiny config and the inputs the class's pipeline passes


@dataclass(frozen=True)
class Recipe:
    cls: str  # the diffusers class name
    pipeline: str  # the pipeline that drives it (for the table)
    config: dict
    inputs: Callable  # (model, batch, lens, grid, gen) -> forward kwargs
    text_len: int = 12


def _r(g, *shape):
    return torch.randn(*shape, generator=g)


def _prefix(lens, t, dtype=torch.bool):
    return (torch.arange(t)[None] < torch.tensor(lens)[:, None]).to(dtype)  # [B, T]


def _ids(h, w, extra=0, axes=3):
    ids = torch.zeros(h, w, axes)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    return ids.reshape(-1, axes)


def _lumina_next(m, b, lens, grid, g):
    from safe_dit.testing.lumina_next import lumina_inputs
    return lumina_inputs(m, *grid, batch=b, text_len=max(lens), valid_lens=lens)


def _pixart(m, b, lens, grid, g):
    from safe_dit.testing.pixart import pixart_inputs
    return pixart_inputs(m, *grid, batch=b, text_len=max(lens), valid_lens=lens)


def _sd3(m, b, lens, grid, g):
    from safe_dit.testing.sd3 import sd3_inputs
    return sd3_inputs(m, *grid, batch=b, text_len=max(lens))


def _flux(m, b, lens, grid, g):
    from safe_dit.testing.flux import flux_inputs
    return flux_inputs(m, *grid, batch=b, text_len=max(lens))


def _lumina2(m, b, lens, grid, g):
    c, p, t = m.config, m.config.patch_size, max(lens)
    return dict(hidden_states=_r(g, b, c.in_channels, grid[0] * p, grid[1] * p), timestep=torch.rand(b, generator=g),
                encoder_hidden_states=_r(g, b, t, c.cap_feat_dim), encoder_attention_mask=_prefix(lens, t),
                return_dict=False)


def _qwen(m, b, lens, grid, g):
    c, t = m.config, max(lens)
    mask = _prefix(lens, t, torch.long)
    return dict(hidden_states=_r(g, b, grid[0] * grid[1], c.in_channels), encoder_hidden_states=_r(g, b, t, c.joint_attention_dim),
                encoder_hidden_states_mask=None if bool(mask.all()) else mask,  # QwenImagePipeline drops an all-ones mask
                timestep=torch.rand(b, generator=g), img_shapes=[[(1, *grid)]] * b, return_dict=False)


def _zimage(m, b, lens, grid, g):
    c, p = m.config, m.config.all_patch_size[0]
    return dict(x=[_r(g, c.in_channels, 1, grid[0] * p, grid[1] * p) for _ in range(b)], t=torch.rand(b, generator=g),
                cap_feats=[_r(g, n, c.cap_feat_dim) for n in lens], return_dict=False)  # ZImagePipeline: unpadded lists


def _chroma(m, b, lens, grid, g):
    c, t, n = m.config, max(lens), grid[0] * grid[1]
    text = (torch.arange(t)[None] <= torch.tensor(lens)[:, None]).float()  # ChromaPipeline: valid + one pad, in dtype
    mask = torch.cat([text, torch.ones(b, n, dtype=torch.bool)], dim=1)  # ChromaPipeline._prepare_attention_mask
    return dict(hidden_states=_r(g, b, n, c.in_channels), encoder_hidden_states=_r(g, b, t, c.joint_attention_dim),
                timestep=torch.rand(b, generator=g), img_ids=_ids(*grid), txt_ids=torch.zeros(t, 3),
                attention_mask=mask, return_dict=False)


def _sana(m, b, lens, grid, g):
    c, t = m.config, max(lens)
    return dict(hidden_states=_r(g, b, c.in_channels, *grid), encoder_hidden_states=_r(g, b, t, c.caption_channels),
                timestep=torch.rand(b, generator=g), encoder_attention_mask=_prefix(lens, t, torch.long), return_dict=False)


def _auraflow(m, b, lens, grid, g):
    c, p = m.config, m.config.patch_size
    return dict(hidden_states=_r(g, b, c.in_channels, grid[0] * p, grid[1] * p),
                encoder_hidden_states=_r(g, b, max(lens), c.joint_attention_dim), timestep=torch.rand(b, generator=g),
                return_dict=False)


def _cogview4(m, b, lens, grid, g):
    c, p = m.config, m.config.patch_size
    size = torch.tensor([[grid[0] * p * 8, grid[1] * p * 8]] * b, dtype=torch.float32)
    return dict(hidden_states=_r(g, b, c.in_channels, grid[0] * p, grid[1] * p),
                encoder_hidden_states=_r(g, b, max(lens), c.text_embed_dim), timestep=torch.rand(b, generator=g) * 1000,
                original_size=size, target_size=size, crop_coords=torch.zeros(b, 2), return_dict=False)


def _flux2(m, b, lens, grid, g):
    c, t = m.config, max(lens)
    img = _ids(*grid, axes=4)[None].expand(b, -1, -1)
    txt = torch.zeros(b, t, 4)
    txt[..., 3] = torch.arange(t)
    return dict(hidden_states=_r(g, b, grid[0] * grid[1], c.in_channels), encoder_hidden_states=_r(g, b, t, c.joint_attention_dim),
                timestep=torch.rand(b, generator=g), img_ids=img, txt_ids=txt, guidance=torch.full((b,), 3.5),
                return_dict=False)


def _kit(name):
    def config():
        from safe_dit.testing.kits import kit_for
        return kit_for(name)
    return config


RECIPES = [
    Recipe("LuminaNextDiT2DModel", "LuminaPipeline", {"kit": "lumina-next"}, _lumina_next),
    Recipe("Lumina2Transformer2DModel", "Lumina2Pipeline",
           dict(sample_size=16, patch_size=2, in_channels=4, hidden_size=64, num_layers=2, num_refiner_layers=1,
                num_attention_heads=4, num_kv_heads=2, multiple_of=16, axes_dim_rope=(4, 6, 6), axes_lens=(64, 64, 64),
                cap_feat_dim=32), _lumina2),
    Recipe("PixArtTransformer2DModel", "PixArtSigmaPipeline", {"kit": "pixart"}, _pixart),
    Recipe("SD3Transformer2DModel", "StableDiffusion3Pipeline", {"kit": "sd3"}, _sd3),
    Recipe("FluxTransformer2DModel", "FluxPipeline", {"kit": "flux"}, _flux),
    Recipe("QwenImageTransformer2DModel", "QwenImagePipeline",
           dict(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
                joint_attention_dim=32, axes_dims_rope=(4, 6, 6)), _qwen),
    Recipe("ZImageTransformer2DModel", "ZImagePipeline",
           dict(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=64, n_layers=2, n_refiner_layers=1,
                n_heads=2, n_kv_heads=2, cap_feat_dim=32, axes_dims=[8, 12, 12], axes_lens=[256, 64, 64]), _zimage,
           text_len=40),  # Z-Image pads each caption to a multiple of 32: 40 and 10 tokens pad to 64 and 32
    Recipe("ChromaTransformer2DModel", "ChromaPipeline",
           dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
                num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 6, 6), approximator_num_channels=16,
                approximator_hidden_dim=32, approximator_layers=1), _chroma),
    Recipe("SanaTransformer2DModel", "SanaPipeline",
           dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1,
                num_cross_attention_heads=2, cross_attention_head_dim=16, cross_attention_dim=32, caption_channels=24,
                sample_size=16, patch_size=1), _sana),
    Recipe("AuraFlowTransformer2DModel", "AuraFlowPipeline",
           dict(sample_size=16, patch_size=2, in_channels=4, num_mmdit_layers=1, num_single_dit_layers=1,
                attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=32,
                out_channels=4, pos_embed_max_size=256), _auraflow),
    Recipe("CogView4Transformer2DModel", "CogView4Pipeline",
           dict(patch_size=2, in_channels=4, out_channels=4, num_layers=1, attention_head_dim=16, num_attention_heads=2,
                text_embed_dim=32, time_embed_dim=16, condition_dim=8, pos_embed_max_size=32, sample_size=16,
                rope_axes_dim=(32, 32)), _cogview4),
    Recipe("Flux2Transformer2DModel", "Flux2Pipeline",
           dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
                num_attention_heads=2, joint_attention_dim=32, timestep_guidance_channels=16, axes_dims_rope=(4, 4, 4, 4)),
           _flux2),
]

# Image-generation transformers in diffusers: 2-D/image classes (video, audio, protein and 3-D classes are out of scope).
_NOT_IMAGE = ("3D", "1D", "Audio", "Video", "Proteina", "Temporal", "Music", "Prior", "T5Film", "Cosmos3Omni",
              "Wan", "Kandinsky", "LTX", "MiniMax", "Helios", "SkyReels", "Mochi", "Allegro", "ChronoEdit", "Latte",
              "EasyAnimate", "ConsisID", "CogVideoX", "SanaWM", "AnyFlow", "JoyImageEdit")


def image_transformer_classes() -> list[str]:
    import diffusers.models.transformers as T
    from diffusers import ModelMixin

    names = []
    for name in sorted(dir(T)):
        cls = getattr(T, name)
        if inspect.isclass(cls) and issubclass(cls, ModelMixin) and not any(s in name for s in _NOT_IMAGE):
            names.append(name)
    return names


def _build(recipe: Recipe, seed: int):
    if "kit" in recipe.config:
        from safe_dit.testing.kits import kit_for
        return kit_for(recipe.config["kit"]).build("tiny", seed=seed)
    import diffusers
    torch.manual_seed(seed)
    return getattr(diffusers, recipe.cls)(**recipe.config).eval()


SETTINGS = (("batch 1", 1, "full"), ("batch 2, equal captions", 2, "full"), ("CFG batch 2, different captions", 2, "cfg"))


def census_one(recipe: Recipe, grid=(16, 16), seed: int = 0) -> dict:
    row = {"class": recipe.cls, "pipeline": recipe.pipeline, "settings": []}
    try:
        model = _build(recipe, seed)
    except Exception as err:  # noqa: BLE001 - the census lists why a class cannot be built
        row["error"] = f"build failed: {type(err).__name__}: {err}"
        return row
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

_MIDT_CASE = {"all-valid bool": "bool-expanded", "all-valid float": "additive-zero", "row-constant": "additive-rowconst",
              "key-padding": "key-padding", "other bool": "bool-expanded", "other float": "additive-zero",
              "rank-1 bias float": "additive-zero"}


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
                        if c["kind"] in ("all-valid", "row-constant", "key-padding", "rank-1 bias"))
        out.append({"setting": s["setting"], "calls": len(s["calls"]), "masked": len(s["calls"]) - kinds.get("none", 0),
                    "dense_fp_masked": s.get("dense_fp_masked_calls"),
                    "kinds": kinds, "masked_work_fraction": 1 - sum(_work(c) for c in s["calls"] if c["kind"] == "none") / work,
                    "exactly_removable_work_fraction": removable / work, "attention_tax_estimate": est,
                    "mask_shapes": sorted({f"{c['mask_dtype']}{c['mask_shape']}" for c in s["calls"] if c["kind"] != "none"})})
    return {"class": row["class"], "pipeline": row["pipeline"], "error": row.get("error"), "settings": out}


def run_census(results_dir: str = "benchmarks/results", grid=(16, 16), progress=None) -> dict:
    from safe_dit.environment import environment
    from safe_dit.adapters import supported_classes

    taxes = {dev: midt_taxes(results_dir, dev) for dev in ("gpu", "cpu")}
    recipes = {r.cls: r for r in RECIPES}
    rows = []
    classes = image_transformer_classes()
    for name in classes:
        if progress:
            progress(name)
        if name not in recipes:
            rows.append({"class": name, "pipeline": None, "settings": [],
                         "error": "not built: no tiny recipe yet (model-specific inputs)",
                         "why": "the census has no tiny config and inputs for this class yet: its forward takes inputs "
                                "specific to its pipeline that the census does not synthesise"})
            continue
        rows.append(census_one(recipes[name], grid))
    supported = set(supported_classes())
    summary = []
    for row in rows:
        s = summarize_row(row, taxes)
        s["safe_dit_adapter"] = row["class"] in supported
        s["safe_dit_modes"] = row.get("safe_dit_modes", [])
        summary.append(s)
    return {"benchmark": "census", "environment": environment("cpu"), "settings": {
        "grid": list(grid), "image_tokens": grid[0] * grid[1], "text_len": RECIPES[0].text_len,
        "tax_source": {dev: f"midt-{dev}.json, median over head dims at N=4096" for dev, t in taxes.items() if t},
        "midt_taxes": taxes}, "rows": rows, "summary": summary}


def format_census(result: dict) -> str:
    lines = ["| class | pipeline | attention calls with a mask (batch 1 / equal / CFG different) | mask kinds (CFG batch) "
             "| est. attention-time factor, CFG batch (GPU MIDT) | exactly removable work | safe-dit dense-fp: masked calls "
             "| safe-dit |",
             "|---|---|---|---|---|---|---|---|"]
    for s in result["summary"]:
        if s["error"]:
            lines.append(f"| `{s['class']}` | {s['pipeline'] or '–'} | – | {s['error'][:60]} | – | – | – | – |")
            continue
        counts = " / ".join(f"{x['masked']}/{x['calls']}" for x in s["settings"])
        cfg = s["settings"][-1]
        kinds = ", ".join(f"{k} ×{n}" for k, n in sorted(cfg["kinds"].items()) if k != "none") or "none"
        shapes = "; ".join(cfg["mask_shapes"])
        gpu = cfg["attention_tax_estimate"].get("gpu")
        fp = " / ".join(str(x["dense_fp_masked"]) for x in s["settings"]) if s["safe_dit_adapter"] else "no adapter"
        lines.append(f"| `{s['class']}` | {s['pipeline']} | {counts} | {kinds}{' (' + shapes + ')' if shapes else ''} | "
                     f"{'–' if gpu is None else f'{gpu:.2f}×'} | {cfg['exactly_removable_work_fraction']:.0%} | {fp} | "
                     f"{adapter_status(s.get('safe_dit_modes', []))} |")
    return "\n".join(lines)


def plot_census(result: dict, path: str) -> None:
    from safe_dit.bench.report import pyplot

    plt = pyplot()
    rows = [s for s in result["summary"] if not s["error"]]
    names = [s["class"].replace("Transformer2DModel", "").replace("2DModel", "")
             + f"  [{adapter_status(s.get('safe_dit_modes', []))}]" for s in rows]  # what safe-dit runs on it
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 0.45 * len(rows) + 1.8), sharey=True)
    kinds = ("all-valid", "row-constant", "key-padding", "rank-1 bias", "other")
    colours = {"all-valid": "tab:green", "row-constant": "tab:olive", "key-padding": "tab:orange",
               "rank-1 bias": "tab:purple", "other": "tab:red"}
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
    fig.suptitle(f"Mask census of diffusers {env['diffusers']} image DiTs (tiny random models, "
                 f"{result['settings']['image_tokens']} image tokens), torch {env['torch']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
