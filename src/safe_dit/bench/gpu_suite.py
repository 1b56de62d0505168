"""The GPU suite: every headline GPU figure measured again in one process, in one ~9-minute call on one H100/H200.

    python3 -m safe_dit.bench.gpu_suite [--out DIR] [--tag gpu] [--budget 540] [--only STEP ...]
    python3 -m safe_dit.bench.gpu_suite --dry-run      # every step at tiny shapes on the CPU, into a temp dir
    python3 -m safe_dit.bench.gpu_suite --plan         # the H200 time budget only
    python3 -m safe_dit.bench.gpu_suite --table FILE   # the README/docs GPU table from a suite JSON

``benchmarks/run_gpu.sh`` calls this module. Each step is one ``bench e2e`` run (the same function, so the same
side-by-side protocol): random weights in the real shapes at full depth, bfloat16, dense / dense-fp / safe-core at
the current defaults; each mode warmed up by a short call, dense-fp's short-call latents checked against dense's
(max |Δ|, absolute and relative) before any timing, then the timed calls alternating mode by mode (median of the
repeats), then a peak-memory short call per mode, and the attention kernels one sampling step of dense and dense-fp
ran (profiler). Steps, in order: Lumina-Next-2B at 1024² and 2048², SD3-Medium at 1024², FLUX.1 (19 double + 38
single blocks) at 1024², Qwen-Image (60 blocks) at 1024² with two prompts of different caption lengths in one batch
(the exact rewrite's kernel switch: dense's masked joint attention against dense-fp's mask-free calls), and Wan at
the token count of 480p × 81 frames where a ``wan`` kit exists in ``safe_dit.testing.kits.KITS`` (skipped with
the reason otherwise).

The budget is printed first. Each step's estimate scales committed H200 timings by FLOPs (``estimate``): for each
mode, seconds per sampling step of a reference run (this step's own earlier result in the output folder if there is
one, else the committed runs named in ``Step.refs``) times this step's FLOPs per sampling step over the reference's
(``forward_flops``), times the sampling steps the step runs (timed calls, warm-up and memory short calls, the
profiled step), plus a setup allowance per step (model build, first-call kernel selection) and one for the process.
A step whose estimate would overrun what is left of the budget is skipped, with the reason; every step's files are
written as soon as it ends, and the summary after every step, so a run cut short keeps what it measured.

Files (``e2e-<tag>-<step>.json/.txt/.png`` per step as ``bench e2e`` writes them; ``gpu-suite-<tag>.json``, ``.md``
(a one-page summary) and ``.png``) name the machine, GPU, torch and diffusers versions, dtype, shapes and steps.
"""

from __future__ import annotations

import argparse
import gc
import json
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from safe_dit.bench import e2e
from safe_dit.config import SafeConfig, SafeDitError
from safe_dit.inspection.environment import environment
from safe_dit.testing.kits import KITS

RESULTS = Path(__file__).resolve().parents[3] / "benchmarks" / "results"
BUDGET_S = 540  # one 10-minute device call: 9 minutes of measuring, the rest for start-up, the archive and transfer
PROCESS_S = 30.0  # imports, CUDA context, the first cuBLAS/cuDNN handles
MODES = ("dense", "dense-fp", "safe-core")
FRAMES_480P = 21  # Wan 2.x at 480p, 81 frames: 21 latent frames x 30 x 52 tokens = 32,760 after its 1x2x2 patches


@dataclass(frozen=True)
class Step:
    """One ``bench e2e`` run of the suite and where its time estimate comes from."""

    name: str  # e2e-<tag>-<name>.json
    model: str  # kit name in KITS
    what: str  # one line for the plan and the summary
    tokens: int  # image tokens of the square latent grid (per frame where bench e2e takes --frames)
    steps: int  # sampling steps per timed call
    repeats: int  # timed calls per mode (median reported)
    guidance: float
    refs: tuple[tuple[str, int], ...]  # committed H200 runs (file in benchmarks/results, tokens) the estimate scales
    dense_ref: tuple[str, int] | None = None  # a masked run whose dense / dense-fp scales dense (refs mask-free)
    prompts: int = 1  # 2: two prompts of different caption lengths in one batch
    layers: int | None = None  # None: the real model's full depth
    frames: int = 1  # latent frames (video), where bench e2e takes --frames
    flat_tokens: int | None = None  # video where bench e2e drives one square grid: all frames' tokens in one grid
    dry_tokens: int = 64  # the dry run's grid
    preset: str | None = None  # None: the kit's real preset
    timed: bool = True  # False: warm-up and peak-memory calls only (does it run, at what peak)
    optional: bool = False  # run only where the budget leaves room (a test holds every other step to the budget)


@dataclass(frozen=True)
class MidtStep:
    """The MIDT sweep (``safe-dit midt``): one SDPA call with and without each redundant mask, the kernels seen."""

    name: str = "midt"
    what: str = "MIDT: one SDPA call, batch 2, 32 heads, with / without each mask"
    seq_lens: tuple[int, ...] = (1024, 2048, 4096, 8192, 16384)
    head_dims: tuple[int, ...] = (72, 128)  # Lumina-Next, FLUX / Qwen-Image / Wan
    heads: int = 32
    batch: int = 2
    repeats: int = 10
    warmup: int = 3
    ref: str = "midt-gpu.json"
    model: str | None = None
    optional: bool = False
    steps: int = 0
    timed: bool = True


STEPS = (
    MidtStep(),
    Step("lumina-next-1024", "lumina-next", "Lumina-Next-2B, 24 blocks, 1024², CFG batch 2", 4096, 30, 2, 4.0,
         refs=(("e2e-gpu.json", 4096),)),
    Step("lumina-next-2048", "lumina-next", "Lumina-Next-2B, 24 blocks, 2048², CFG batch 2", 16384, 20, 2, 4.0,
         refs=(("e2e-gpu-16384.json", 16384),)),
    Step("sd3-1024", "sd3", "SD3-Medium, 24 joint blocks, 1024², CFG batch 2", 4096, 28, 2, 7.0,
         refs=(("e2e-gpu-sd3.json", 4096),)),
    Step("flux-1024", "flux", "FLUX.1-dev, 19 double + 38 single blocks, 1024², batch 1", 4096, 28, 2, 3.5,
         refs=(("e2e-gpu-flux.json", 4096),)),
    Step("qwen-image-p2-1024", "qwen-image",
         "Qwen-Image, 60 blocks, 1024², 2 prompts (20 and 3 valid caption tokens) in one batch", 4096, 10, 2, 1.0,
         refs=(("e2e-gpu-flux.json", 4096),), dense_ref=("e2e-gpu.json", 4096), prompts=2),
    # 480p x 81 frames is 21 latent frames of 30 x 52 tokens (32,760): 21 frames of 40 x 40 where bench e2e takes
    # --frames, else one 184 x 184 grid (33,856): the same attention and weight work within 3%
    Step("wan-480p", "wan", "Wan, full depth, the token count of 480p x 81 frames, CFG batch 2", 1600, 10, 1, 5.0,
         refs=(("e2e-gpu-flux.json", 16384),), frames=FRAMES_480P, flat_tokens=33856),
    Step("lumina-next-2560-memory", "lumina-next", "Lumina-Next-2B, 24 blocks, 2560², CFG batch 2: peak memory only",
         25600, 30, 1, 4.0, refs=(("e2e-gpu-16384.json", 16384),), timed=False, optional=True),
)


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


def _e2e_defaults() -> argparse.Namespace:
    """bench e2e's own defaults, whatever options it has."""
    from safe_dit.commands import bench_e2e  # noqa: the options live with the command  # TODO layering

    p = argparse.ArgumentParser()
    bench_e2e.configure_parser(p)
    return p.parse_args([])


def run_shape(step: Step, dry: bool = False) -> tuple[int, int]:
    """(tokens per grid, frames) the step's bench e2e call makes."""
    if dry:
        return step.dry_tokens, min(step.frames, 2) if hasattr(_e2e_defaults(), "frames") else 1
    if step.frames > 1 and not hasattr(_e2e_defaults(), "frames"):
        return step.flat_tokens or step.tokens * step.frames, 1
    return step.tokens, step.frames


def _step_flops(step: Step) -> float:
    kit = KITS[step.model]
    tokens, frames = run_shape(step)
    return forward_flops(step.model, step.preset or kit.real_preset, _overrides(kit, step.layers), tokens * frames,
                         kit.bench_text_len, _batch(kit, step.prompts))


def _ref_per_step(path: Path, tokens: int) -> dict[str, tuple[float, float]]:
    """mode -> (seconds per sampling step, FLOPs per sampling step) of one committed ``bench e2e`` run."""
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
    frames = st.get("frames") or 1
    flops = forward_flops(st["model"], preset, over, tokens * frames, st.get("text_len", kit.bench_text_len), batch)
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


def _e2e_args(step: Step, dry: bool, device: str) -> argparse.Namespace:
    """bench e2e's defaults with this step's settings (the dry run: the tiny preset, float32, 4 steps, 1 repeat)."""
    args = _e2e_defaults()
    tokens, frames = run_shape(step, dry)
    args.model, args.guidance, args.prompts, args.modes = step.model, step.guidance, step.prompts, list(MODES)
    args.tokens, args.time_up_to, args.layers, args.kernels = [tokens], tokens if step.timed else 0, step.layers, True
    args.preset, args.dtype, args.device = ("tiny", "float32", device) if dry else (step.preset, "bfloat16", device)
    args.steps, args.repeats = (4, 1) if dry else (step.steps, step.repeats)
    if hasattr(args, "frames"):  # a video backbone's latent frames, where bench e2e takes them
        args.frames = frames
    return args


def skip_reason(step: Step) -> str | None:
    """Why a step cannot run with this checkout, or None."""
    if step.model is not None and step.model not in KITS:
        return f"no `{step.model}` kit in safe_dit.testing.kits.KITS (its adapter has not landed)"
    return None


def plan(steps, results: Path, tag: str, budget: float = BUDGET_S) -> list[dict]:
    """Each step's H200 estimate (or why it cannot run), and whether it fits the budget after the steps before it."""
    out, total = [], PROCESS_S
    for step in steps:
        tokens, frames = run_shape(step) if isinstance(step, Step) else (max(step.seq_lens), 1)
        row = {"step": step.name, "what": step.what, "tokens": tokens * frames, "steps": step.steps,
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
        modes = " ".join(_fmt(pm.get(m), ">6.0f") if m in pm else f"{'-':>6}" for m in MODES)
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


# ----------------------------------------------------------------------------------------------- running


def _write_step(result: dict, out: Path, stem: str) -> list[str]:
    table = e2e.format_table(result)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / f"{stem}.txt").write_text(table + "\n" + json.dumps(result) + "\n")
    e2e.plot(result, str(out / f"{stem}.png"))
    return [f"{stem}.json", f"{stem}.txt", f"{stem}.png"]


def _free(device: str) -> None:
    """The last step's model and caches off the device before the next step builds its own."""
    if device.startswith("cuda"):
        gc.collect()
        torch.cuda.empty_cache()


def run_suite(steps, out: Path, tag: str, budget: float | None, dry: bool, device: str, log=print) -> dict:
    """Run the steps in order, each only if its H200 estimate fits what is left of ``budget`` seconds (a real run:
    by the wall clock; a dry run: by the estimates of the steps run before it, and only with a budget given); write
    each step's files and the summary as it goes."""
    t_start = time.perf_counter()
    real_plan = plan(steps, RESULTS if dry else out, tag, budget or BUDGET_S)
    log(format_plan(real_plan, budget or BUDGET_S))
    env = environment(device)
    cuda = f", CUDA {env['cuda']}" if env.get("cuda") else ""
    log(f"on {env.get('gpu') or env['processor']} ({device}{cuda}), torch {env['torch']}, diffusers "
        f"{env['diffusers']}, Python {env['python']}, {env['machine']}")
    if dry:
        log(f"dry run: every step at tiny shapes on {device} (float32, 4 sampling steps, 1 repeat), into {out}")
    suite = {"benchmark": "gpu-suite", "environment": env, "tag": tag, "dry_run": dry,
             "budget_s": budget or BUDGET_S, "dtype": "float32" if dry else "bfloat16", "plan_h200": real_plan,
             "steps": []}
    est = {r["step"]: r["estimate_s"] for r in real_plan}
    spent = PROCESS_S  # the dry run's clock: the H200 estimates of what ran (the real run's: PROCESS_S + wall)
    for step in steps:
        row = {"step": step.name, "what": step.what, "model": step.model, "estimate_s": est.get(step.name)}
        reason = skip_reason(step)
        left = None if budget is None and dry else (budget or BUDGET_S) - (
            spent if dry else PROCESS_S + time.perf_counter() - t_start)
        if reason is None and left is not None and est[step.name] > left:
            reason = f"its estimate {est[step.name]:.0f} s exceeds the {max(left, 0):.0f} s left of the budget"
        if reason is not None:
            row.update(status="skipped", reason=reason)
            log(f"== {step.name}: skipped: {reason}")
        else:
            spent += est[step.name]
            (_run_step if isinstance(step, Step) else _run_midt)(step, row, out, tag, dry, device, log)
            _free(device)
        suite["steps"].append(row)
        suite["wall_s"] = time.perf_counter() - t_start
        write_summary(suite, out, tag, picture=False)  # a run cut short keeps the JSON and the page
    write_summary(suite, out, tag)
    return suite


def _run_step(step: Step, row: dict, out: Path, tag: str, dry: bool, device: str, log) -> None:
    args = _e2e_args(step, dry, device)
    frames = getattr(args, "frames", 1)
    log(f"== {step.name}: {step.what} ({args.tokens[0]} tokens{f' x {frames} frames' if frames > 1 else ''}, "
        f"{args.steps} steps x {args.repeats}, H200 estimate {row['estimate_s']:.0f} s)")
    t0 = time.perf_counter()
    try:
        result = e2e.run_e2e(args, progress=False)
    except Exception as err:  # one broken step loses only itself (a test fails on it in the dry run)
        row.update(status="failed", reason=f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:300]}",
                   wall_s=time.perf_counter() - t0)
        log(f"== {step.name}: failed: {row['reason']}")
        return
    result["settings"].update(suite_step=step.name, frames=frames)
    files = _write_step(result, out, f"e2e-{tag}-{step.name}")
    row.update(status="ok", wall_s=time.perf_counter() - t0, files=files, settings=_settings(result),
               rows=result["rows"], summary=result["summary"])
    log(_check_line(result))
    log(e2e.format_table(result))
    log(f"== {step.name}: {row['wall_s']:.0f} s (H200 estimate {row['estimate_s']:.0f} s)")


def _run_midt(step: MidtStep, row: dict, out: Path, tag: str, dry: bool, device: str, log) -> None:
    from safe_dit.bench import midt

    seq_lens, head_dims, heads, repeats, warmup = ((64, 128), step.head_dims, 2, 1, 0) if dry else (
        step.seq_lens, step.head_dims, step.heads, step.repeats, step.warmup)
    log(f"== {step.name}: {step.what} (N {', '.join(map(str, seq_lens))}; head dims "
        f"{', '.join(map(str, head_dims))}; {repeats} repeats after {warmup} warm-up; H200 estimate "
        f"{row['estimate_s']:.0f} s)")
    t0 = time.perf_counter()
    try:  # each case checks masked against mask-free before timing it (midt.run_case)
        result = midt.run_midt(list(seq_lens), list(head_dims), ["float32" if dry else "bfloat16"], [device], heads,
                               step.batch, list(midt.MASKS), repeats, warmup, progress=False)
    except Exception as err:
        row.update(status="failed", reason=f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:300]}",
                   wall_s=time.perf_counter() - t0)
        log(f"== {step.name}: failed: {row['reason']}")
        return
    stem = f"midt-{tag}"
    table = midt.format_table(result)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / f"{stem}.txt").write_text(table + "\n" + json.dumps(result) + "\n")
    midt.plot(result, str(out / f"{stem}.png"))
    row.update(status="ok", wall_s=time.perf_counter() - t0, files=[f"{stem}.json", f"{stem}.txt", f"{stem}.png"],
               cases=result["cases"], summary=result["summary"], settings=result["settings"])
    worst = max(c["max_abs_err"] for c in result["cases"])
    log(f"check masked vs mask-free (before timing, every case): max |Δ| {worst:.3g}")
    log(table)
    log(f"== {step.name}: {row['wall_s']:.0f} s (H200 estimate {row['estimate_s']:.0f} s)")


def _settings(result: dict) -> dict:
    st = result["settings"]
    keep = ("model", "model_label", "model_class", "preset", "blocks", "hidden_size", "heads", "kv_heads", "head_dim",
            "dtype", "steps", "batch", "guidance", "repeats", "text_len", "frames")
    return {k: st.get(k) for k in keep} | {"configs": {"safe-core": st["configs"].get("safe-core")}}


def _check_line(result: dict) -> str:
    fp = [r for r in result["rows"] if r["mode"] == "dense-fp"]
    parts = []
    for r in fp:
        if r.get("max_abs_err_vs_dense_short_call") is None:
            parts.append(f"{r['tokens']} tokens: not checked ({r['status']})")
        else:
            parts.append(f"{r['tokens']} tokens: max|Δ| {r['max_abs_err_vs_dense_short_call']:.3g} "
                         f"(relative {r['rel_err_vs_dense_short_call']:.3g}) on a {r['short_call_steps']}-step call")
    return "check dense-fp vs dense (before timing): " + "; ".join(parts)


# ----------------------------------------------------------------------------------------------- reports


def _blocks(st: dict) -> str:
    b = st.get("blocks") or {}
    if "num_single_layers" in b:
        return f"{b.get('num_layers')}+{b['num_single_layers']}"
    return str(b.get("num_layers", "?"))


def _fmt(x, spec=".2f", suffix=""):
    return "-" if x is None else f"{x:{spec}}{suffix}"


def markdown_table(suite: dict) -> str:
    """The GPU table of the README and docs, from a suite JSON: one row per measured step."""
    env = suite["environment"]
    lines = [f"{env.get('gpu') or env['processor']}, torch {env['torch']}, diffusers {env['diffusers']}, "
             f"{suite['dtype']}, random weights; median of the repeats after a warm-up call per mode.", "",
             "| backbone | blocks | image | tokens | batch | steps × repeats | dense s | dense-fp s | safe-core s "
             "| fast path | scheduling | total | peak MiB dense / fp / core | max abs Δ fp vs dense |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in suite["steps"]:
        if s["status"] != "ok" or "cases" in s:
            continue
        st = s["settings"]
        for summ in s["summary"]:
            if "tokens" not in summ:
                continue
            by = {r["mode"]: r for r in s["rows"] if r["tokens"] == summ["tokens"]}
            sec = [_fmt(by.get(m, {}).get("seconds")) for m in MODES]
            mem = " / ".join(_fmt(by.get(m, {}).get("peak_memory_mb"), ".0f") for m in MODES)
            err = _fmt(by.get("dense-fp", {}).get("max_abs_err_vs_dense_short_call"), ".2g")
            res = summ["resolution"]
            image = f"{res}²" + (f" × {st['frames']} frames" if (st.get("frames") or 1) > 1 else "")
            lines.append(f"| {st['model_label']} | {_blocks(st)} | {image} | {summ['tokens']} | {st['batch']} "
                         f"| {st['steps']} × {st['repeats']} | {' | '.join(sec)} "
                         f"| {_fmt(summ.get('fast_path_gain'), '.2f', 'x')} "
                         f"| {_fmt(summ.get('scheduling_gain'), '.2f', 'x')} "
                         f"| {_fmt(summ.get('total_gain'), '.2f', 'x')} | {mem} | {err} |")
    for s in suite["steps"]:
        if s["status"] == "ok" and "cases" in s:
            lines += ["", midt_table(s)]
    skipped = [s for s in suite["steps"] if s["status"] != "ok"]
    if skipped:
        lines.append("")
        lines += [f"* {s['step']}: {s['status']}: {s['reason']}" for s in skipped]
    return "\n".join(lines)


def midt_table(step_row: dict) -> str:
    """MIDT: masked / mask-free time of one SDPA call per mask, head dim and N (the tax), and the masked kernel."""
    cases = step_row["cases"]
    masks = list(dict.fromkeys(c["mask"] for c in cases))
    st = step_row["settings"]
    lines = [f"MIDT (one SDPA call, batch {st['batch']}, {st['heads']} heads, {', '.join(st['dtypes'])}, median of "
             f"{st['repeats']}): masked / mask-free time", "",
             "| head dim | N | " + " | ".join(masks) + " | masked kernel (bool-full) |",
             "|---|---|" + "---|" * len(masks) + "---|"]
    for d in dict.fromkeys(c["head_dim"] for c in cases):
        for n in dict.fromkeys(c["seq_len"] for c in cases):
            by = {c["mask"]: c for c in cases if c["head_dim"] == d and c["seq_len"] == n}
            kern = (by.get("bool-full") or {}).get("masked_kernels") or ["-"]
            lines.append(f"| {d} | {n} | " + " | ".join(_fmt(by.get(m, {}).get("tax"), ".2f", "x") for m in masks)
                         + f" | {kern[-1][:60]} |")
    return "\n".join(lines)


def summary_markdown(suite: dict) -> str:
    env = suite["environment"]
    head = "GPU suite (dry run: tiny shapes, not a measurement)" if suite["dry_run"] else "GPU suite"
    lines = [f"# {head}", "",
             f"Machine {env['machine']} ({env['processor']}, {env['cpu_count']} CPUs), device {env['device']}"
             f"{' (' + env['gpu'] + ', CUDA ' + str(env.get('cuda')) + ')' if env.get('gpu') else ''}; "
             f"Python {env['python']}, torch {env['torch']}, diffusers {env['diffusers']}, safe-dit "
             f"{env.get('safe_dit')}. Wall time {suite.get('wall_s', 0):.0f} s of a {suite['budget_s']:.0f} s budget.",
             "", "## Results", "", markdown_table(suite), "",
             "Fast path = dense / dense-fp (the exact mask removal and rewrites), scheduling = dense-fp / safe-core, "
             "total = dense / safe-core, each measured side by side in this one process. Peak memory: the most "
             "allocated beyond the loaded model during a short call of each mode.", "",
             "## Attention kernels (one sampling step under the profiler)", ""]
    for s in suite["steps"]:
        if s["status"] != "ok" or "rows" not in s:
            continue
        for r in s["rows"]:
            if r.get("attention_kernels"):
                names = ", ".join(k.replace("aten::_scaled_dot_product_", "sdpa:") for k in r["attention_kernels"][:4])
                lines.append(f"* {s['step']} {r['mode']}: {names}")
    lines += ["", "## Plan (the H200 estimate printed before the run)", "", "```",
              format_plan(suite["plan_h200"], BUDGET_S), "```", "",
              "Steps: " + "; ".join(f"{s['step']} {s['status']} ({_fmt(s.get('wall_s'), '.0f')} s, estimate "
                                    f"{_fmt(s.get('estimate_s'), '.0f')} s)" for s in suite["steps"]), "",
              "Regenerate the table: `python3 -m safe_dit.bench.gpu_suite --table "
              f"benchmarks/results/gpu-suite-{suite['tag']}.json`."]
    return "\n".join(lines) + "\n"


def plot_suite(suite: dict, path: str) -> None:
    from safe_dit.bench.report import pyplot

    plt = pyplot()
    ok = [s for s in suite["steps"] if s["status"] == "ok" and "rows" in s]
    labels, gains, mems = [], {k: [] for k, _ in e2e.GAINS}, {m: [] for m in MODES}
    for s in ok:
        for summ in s["summary"]:
            if "tokens" not in summ:
                continue
            by = {r["mode"]: r for r in s["rows"] if r["tokens"] == summ["tokens"]}
            labels.append(f"{s['settings']['model_label']}\n{summ['tokens']} tok\n{_blocks(s['settings'])} blk")
            for k in gains:
                gains[k].append(summ.get(k) or 0.0)
            for m in MODES:
                mems[m].append(by.get(m, {}).get("peak_memory_mb") or 0.0)
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 2.6 * len(labels)), 4.3))
    width = 0.27
    for i, (k, name) in enumerate(e2e.GAINS):
        bars = axes[0].bar([j + (i - 1) * width for j in range(len(labels))], gains[k], width, label=name)
        axes[0].bar_label(bars, fmt="%.2f", fontsize=7)
    axes[0].axhline(1.0, color="gray", lw=0.8)
    axes[0].set_ylabel("median end-to-end latency ratio")
    for i, m in enumerate(MODES):
        axes[1].bar([j + (i - 1) * width for j in range(len(labels))], mems[m], width, label=m)
    axes[1].set_ylabel("peak memory beyond the model (MiB)")
    for ax in axes:
        ax.set_xticks(range(len(labels)), labels, fontsize=7)
        if labels:
            ax.legend(fontsize=7)
    env = suite["environment"]
    fig.suptitle(f"safe-dit GPU suite{' (dry run)' if suite['dry_run'] else ''}: "
                 f"{env.get('gpu') or env['processor']}, {suite['dtype']}, torch {env['torch']}, "
                 f"diffusers {env['diffusers']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_summary(suite: dict, out: Path, tag: str, picture: bool = True) -> None:
    (out / f"gpu-suite-{tag}.json").write_text(json.dumps(suite, indent=1) + "\n")
    (out / f"gpu-suite-{tag}.md").write_text(summary_markdown(suite))
    if picture:
        plot_suite(suite, str(out / f"gpu-suite-{tag}.png"))


# ----------------------------------------------------------------------------------------------- command line


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m safe_dit.bench.gpu_suite", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true",
                   help="every step at tiny shapes on the CPU (float32, 4 sampling steps, 1 repeat), into a temp dir")
    p.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results; dry run: a "
                                                          "new temp dir)")
    p.add_argument("--tag", default="gpu", help="file tag: e2e-TAG-STEP.json, gpu-suite-TAG.json (default gpu)")
    p.add_argument("--budget", type=float, default=None,
                   help=f"seconds for all steps (default {BUDGET_S}; the dry run skips by the H200 estimates only "
                        "when given)")
    p.add_argument("--only", nargs="+", metavar="STEP", choices=[s.name for s in STEPS],
                   help=f"a subset of the steps: {', '.join(s.name for s in STEPS)}")
    p.add_argument("--device", default=None, help="default cuda (dry run: cpu)")
    p.add_argument("--plan", action="store_true", help="print the H200 budget and exit")
    p.add_argument("--table", metavar="SUITE_JSON", help="print the markdown GPU table of a suite JSON and exit")
    args = p.parse_args(argv)
    if args.table:
        print(markdown_table(json.loads(Path(args.table).read_text())))
        return 0
    steps = [s for s in STEPS if args.only is None or s.name in args.only]
    if args.plan:
        rows = plan(steps, args.out or RESULTS, args.tag, args.budget or BUDGET_S)
        print(format_plan(rows, args.budget or BUDGET_S))
        return 0 if all(r["admitted"] or r["optional"] or r["estimate_s"] is None for r in rows) else 1
    device = args.device or ("cpu" if args.dry_run else "cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("CUDA is not available: run on the GPU machine, or use --dry-run")
    out = args.out or (Path(tempfile.mkdtemp(prefix="safe-dit-gpu-dry-")) if args.dry_run else RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    suite = run_suite(steps, out, args.tag, args.budget, args.dry_run, device,
                      log=lambda s: print(s, flush=True))
    print(markdown_table(suite))
    print(f"files in {out}: e2e-{args.tag}-*.json/.txt/.png, gpu-suite-{args.tag}.json/.md/.png")
    return 0 if all(s["status"] != "failed" for s in suite["steps"]) else 1


if __name__ == "__main__":
    sys.exit(main())
