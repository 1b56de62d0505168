"""The GPU suite's time budget for one H200, printed before the run (``plan``, ``format_plan``): each step's
estimate scales committed H200 timings by FLOPs (``estimate``, ``forward_flops``; the method is in
``safe_dit.commands.gpu_suite``'s docstring), and the steps are admitted in order while they fit the budget."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from safe_dit.bench.gpu_steps import MODES, RESULTS, MidtStep, Step, run_shape, skip_reason
from safe_dit.config import SafeConfig, SafeDitError
from safe_dit.testing.kits import KITS

BUDGET_S = 540  # one 10-minute device call: 9 minutes of measuring, the rest for start-up, the archive and transfer
PROCESS_S = 30.0  # imports, CUDA context, the first cuBLAS/cuDNN handles


# ----------------------------------------------------------------------------------------------- the FLOP model

PER_SAMPLE = re.compile(r"norm|mod|adaln|time|embed", re.I)  # modulation / embedding weights: one row per sample
# the caption stream's weights (SD3/FLUX/Qwen-Image joint blocks, cross-attention keys and values): caption rows only
CAPTION = re.compile(r"context|add_|txt|caption|attn2\.to_[kv]\.", re.I)


@dataclass
class _Shape:
    image: int  # weights each image token goes through
    caption: int  # weights each caption token goes through
    attention: list = field(default_factory=list)  # (cross?, width) per attention module

    @property
    def per_token(self) -> int:
        return self.image + self.caption


_SHAPES: dict = {}


def _shape(model: str, preset: str, overrides: dict) -> _Shape:
    """Parameter and attention layout of a transformer, built on the meta device (no memory, milliseconds)."""
    key = (model, preset, tuple(sorted(overrides.items())))
    if key not in _SHAPES:
        kit = KITS[model]
        with torch.device("meta"):
            m = kit.build(preset, **overrides)  # float32: no cast, the layout alone is read
        rows = [(n, p.numel()) for n, p in m.named_parameters() if not PER_SAMPLE.search(n) or CAPTION.search(n)]
        rows = [(n, k) for n, k in rows if not re.search(r"time|adaln|norm", n, re.I)]
        shape = _Shape(sum(k for n, k in rows if not CAPTION.search(n)), sum(k for n, k in rows if CAPTION.search(n)))
        for name, mod in m.named_modules():
            if isinstance(getattr(mod, "to_q", None), torch.nn.Linear):
                shape.attention.append((name.rsplit(".", 1)[-1] == "attn2", mod.to_q.out_features))
        _SHAPES[key] = shape
    return _SHAPES[key]


def forward_flops(model: str, preset: str, overrides: dict, tokens: int, text_len: int, batch: int) -> float:
    """FLOPs of one transformer call: 2 per weight per row, the image stream's weights over the N image tokens and
    the caption stream's (``CAPTION``: joint blocks' context weights, cross-attention keys and values) over the T
    caption tokens, plus 4·Lq·Lk·width per attention module (QKᵀ and PV): cross-attention (modules named ``attn2``:
    Lumina-Next, PixArt, Wan) attends the N image tokens to the caption, every other attention N + T tokens to
    N + T (Lumina-Next's self-attention: N to N, counted as N + T). Modulation, timestep and norm weights (one row
    per sample) and element-wise work are left out; a test checks the weight part against torch's FLOP counter."""
    shape = _shape(model, preset, overrides)
    n = tokens + text_len
    attention = sum(4 * tokens * text_len * w if cross else 4 * n * n * w for cross, w in shape.attention)
    return batch * (2.0 * (shape.image * tokens + shape.caption * text_len) + attention)


def weight_flops(model: str, preset: str, overrides: dict, tokens: int, text_len: int, batch: int) -> float:
    """The weight (matrix-product) part of ``forward_flops``."""
    shape = _shape(model, preset, overrides)
    return batch * 2.0 * (shape.image * tokens + shape.caption * text_len)


def _overrides(kit, layers, heads=None, hidden_size=None, kv_heads=None) -> dict:
    o = kit.bench_overrides(layers, heads=heads, hidden_size=hidden_size, kv_heads=kv_heads)
    return {k: v for k, v in o.items() if v is not None}


def _batch(kit, prompts: int) -> int:
    return prompts * (1 if kit.guidance_distilled else 2)


def _step_flops(step: Step) -> float:
    kit = KITS[step.model]
    tokens = run_shape(step)[0]
    return forward_flops(step.model, step.preset or kit.real_preset, _overrides(kit, step.layers), tokens,
                         kit.bench_text_len, _batch(kit, step.prompts))


def _ref_per_step(path: Path, tokens: int) -> dict[str, tuple[float, float]]:
    """mode -> (seconds per sampling step, FLOPs per sampling step) of a ``bench e2e`` run's rows of ``tokens``
    (all frames' tokens together, as bench e2e counts them)."""
    result = json.loads(path.read_text())
    st = result["settings"]
    kit = KITS[st["model"]]
    preset = st.get("preset") or kit.real_preset
    blocks = st.get("blocks") or {}
    layers = blocks.get("num_layers", st.get("layers"))
    width = dict(hidden_size=st.get("hidden_size"), heads=st.get("heads"), kv_heads=st.get("kv_heads")) \
        if kit.bench_hidden_size else dict(heads=st.get("heads"))
    over = _overrides(kit, layers, **width)
    if blocks.get("num_single_layers") is not None:
        over["num_single_layers"] = blocks["num_single_layers"]
    batch = 2 * (1 if kit.guidance_distilled else 2) if "2 prompts" in st.get("batch", "") else _batch(kit, 1)
    flops = forward_flops(st["model"], preset, over, tokens, st.get("text_len", kit.bench_text_len), batch)
    return {r["mode"]: (r["seconds"] / st["steps"], flops) for r in result["rows"]
            if r["tokens"] == tokens and r.get("seconds")}


def short_steps(step_count: int) -> int:
    """Sampling steps of bench e2e's warm-up and memory calls (its ``short``)."""
    return min(step_count, SafeConfig("safe-core").warmup_steps + 3)


def setup_s(step: Step) -> float:
    """Model build on the device, pipeline, first-call kernel selection: 5 s + 1.5 s per billion weights; the
    profiled sampling step of dense and dense-fp: 3 s each on top of its compute."""
    kit = KITS[step.model]
    shape = _shape(step.model, step.preset or kit.real_preset, _overrides(kit, step.layers))
    return 5.0 + 1.5 * shape.per_token / 1e9 + 2 * 3.0


MIDT_CASE_S = 0.7  # per MIDT case: inputs made on the host, the checked call, two peak-memory calls, two profiled


def estimate_midt(step: MidtStep, results: Path = RESULTS, tag: str = "gpu") -> dict:
    """Each case's mask-free + masked milliseconds in a committed (or this step's own earlier) MIDT run, times the
    calls the sweep makes (warm-up, repeats, the checked and the memory call), plus ``MIDT_CASE_S`` per case."""
    own = results / f"midt-{tag}.json"
    ref = own if own.is_file() else RESULTS / step.ref
    cases = {(c["head_dim"], c["seq_len"], c["mask"]): c for c in json.loads(ref.read_text())["cases"]}
    masks = sorted({m for _, _, m in cases})
    calls = step.warmup + step.repeats + 2
    total = 3.0
    for d in step.head_dims:
        for n in step.seq_lens:
            for m in masks:
                c = cases.get((d, n, m))
                if c is None:
                    raise SafeDitError(f"{step.name}: no case d={d} N={n} {m} in {ref.name}")
                total += (c["maskless_ms"] + c["masked_ms"]) * calls * (step.heads * step.batch) / (
                    c["heads"] * c["batch"]) / 1e3 + MIDT_CASE_S
    return {"seconds": total, "per_mode": None, "refs": [ref.name]}


def estimate(step: Step, results: Path = RESULTS, tag: str = "gpu") -> dict:
    """The step's H200 estimate in seconds, per mode and in all, and the reference files it scaled."""
    own = results / f"e2e-{tag}-{step.name}.json"
    own_tokens = run_shape(step)[0]
    if own.is_file() and not any(r["tokens"] == own_tokens and r.get("seconds") for r in
                                 json.loads(own.read_text())["rows"]):
        own = Path("/nonexistent")  # an earlier result without timings of this shape: the committed references
    refs = [(own, own_tokens)] if own.is_file() else [(RESULTS / f, t) for f, t in step.refs]
    per_ref = [_ref_per_step(p, t) for p, t in refs]
    dense_ref = _ref_per_step(RESULTS / step.dense_ref[0], step.dense_ref[1]) if step.dense_ref and not own.is_file() \
        else None
    flops = _step_flops(step)
    short = short_steps(step.steps)
    per_mode = {}
    for mode in MODES:
        rates = [r[mode][0] / r[mode][1] for r in per_ref if mode in r]
        if not rates:
            raise SafeDitError(f"{step.name}: no {mode} timing in {', '.join(str(p.name) for p, _ in refs)}")
        sampling_steps = step.repeats * step.steps * step.timed + 2 * short + (1 if mode != "safe-core" else 0)
        per_mode[mode] = max(rates) * flops * sampling_steps  # the slowest reference: an upper estimate
    if dense_ref is not None:  # dense masks where the references did not: their dense-fp times a masked run's tax
        per_mode["dense"] = per_mode["dense-fp"] * dense_ref["dense"][0] / dense_ref["dense-fp"][0]
    total = setup_s(step) + sum(per_mode.values())
    return {"seconds": total, "per_mode": per_mode, "flops_per_call": flops,
            "refs": [p.name for p, _ in refs] + ([step.dense_ref[0] + " (dense)"] if dense_ref else [])}


# ----------------------------------------------------------------------------------------------- the plan


def plan(steps, results: Path, tag: str, budget: float = BUDGET_S) -> list[dict]:
    """Each step's H200 estimate (or why it cannot run), and whether it fits the budget after the steps before it."""
    out, total = [], PROCESS_S
    for step in steps:
        tokens = run_shape(step)[0] if isinstance(step, Step) else max(step.seq_lens)
        row = {"step": step.name, "what": step.what, "tokens": tokens, "steps": step.steps,
               "repeats": step.repeats if step.timed else 0, "optional": step.optional, "admitted": False}
        reason = skip_reason(step)
        if reason is None:
            est = estimate(step, results, tag) if isinstance(step, Step) else estimate_midt(step, results, tag)
            row.update(estimate_s=est["seconds"], per_mode_s=est["per_mode"], refs=est["refs"])
            row["admitted"] = total + est["seconds"] <= budget
            total += est["seconds"] if row["admitted"] else 0.0
        else:
            row.update(estimate_s=None, skip=reason)
        out.append(row)
    return out


def format_plan(rows: list[dict], budget: float) -> str:
    lines = [f"GPU suite budget for one H200 (bf16, full depth; each step's estimate scales committed H200 timings "
             f"by FLOPs), budget {budget:.0f} s:",
             f"  {'step':<24} {'tokens':>6} {'steps x rep':>11} {'dense':>6} {'fp':>6} {'core':>6} {'est s':>6}"
             "  scaled from"]
    for r in rows:
        head = f"  {r['step']:<24} {r['tokens']:>6} {r['steps']:>6} x {r['repeats']:<2}"
        if r["estimate_s"] is None:
            lines.append(f"{head}  skipped: {r['skip']}")
            continue
        pm = r["per_mode_s"] or {}
        modes = " ".join(f"{pm[m]:>6.0f}" if pm.get(m) is not None else f"{'-':>6}" for m in MODES)
        lines.append(f"{head} {modes} {r['estimate_s']:>6.0f}  {', '.join(r['refs'])}"
                     + ("" if r["admitted"] else "  [over the budget here: runs only if the steps before it end "
                                                 "early]"))
    total = plan_total(rows)
    lines.append(f"  total estimate {total:.0f} s ({total / 60:.1f} min) incl. {PROCESS_S:.0f} s process start-up; "
                 f"budget {budget:.0f} s ({budget / 60:.1f} min)")
    return "\n".join(lines)


def plan_total(rows: list[dict]) -> float:
    """The estimate of the steps the plan fits into the budget, with the process start-up."""
    return PROCESS_S + sum(r["estimate_s"] for r in rows if r["admitted"])
