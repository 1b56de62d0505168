"""End-to-end benchmark: dense, dense-fp, safe-core and safe-sw side by side, in one process.

Runs one backbone's real diffusers sampling loop (``--model``: the kit's pipeline) with random weights
and the real model's attention shape (the kit's real preset), with as many caption tokens as the real
pipeline makes; a CFG batch of 2 where the pipeline batches the negative prompt, batch 1 where the
backbone is guidance-distilled (there safe-sw does not exist). Latents are returned (no VAE decode) so
the transformer is what is timed. Modes alternate repeat by repeat; each is warmed up with a short
call first, and dense-fp's short-call latents are checked against dense's before any timing.
Medians are reported. Peak memory is measured on a separate call. A mode that runs
out of memory is reported as ``oom`` (caught, not crashed), which shows the largest resolution
each mode reaches in the available memory. Token counts above ``--time-up-to`` are only probed
(a short call: does it run, at what peak memory), which keeps CPU runs affordable.

Reports the fast-path gain (dense / dense-fp), the scheduling gain (dense-fp / safe-core) and
their product (dense / safe-core). Token counts 4096, 9216, 16384, 25600 are the latent grids
of 1024², 1536², 2048², 2560² images (VAE factor 8, patch 2) on every backbone.
"""

from __future__ import annotations

import logging
import math
import statistics
import sys
import time

import torch
from tqdm import tqdm

from safe_dit.api import apply_safe_dit, remove_safe_dit, runtime_of
from safe_dit.bench.choices import E2E_PROMPT_VALID
from safe_dit.bench.midt import _kernels as attention_kernels
from safe_dit.bench.report import DTYPES, emit, is_oom, memory_axis, pyplot, save_figure
from safe_dit.bench.runs import context_parallel_setup, schedule_kwargs, selective_free
from safe_dit.config import SafeConfig, SafeDitError
from safe_dit.inspection.environment import environment, peak_memory_mb
from safe_dit.testing.kits import kit_for

MODES = ("dense", "dense-fp", "safe-core", "safe-sw")


def _configs(args, cp=None) -> dict[str, SafeConfig]:
    """The modes' configs; under ``--context-parallel`` every mode but ``dense`` (the stock model, unsplit on
    each rank: the one-device baseline) splits the sequence."""
    sched = dict(schedule_kwargs(args), context_parallel=cp)
    return {
        "dense": SafeConfig("dense"),
        "dense-fp": SafeConfig("dense-fp", context_parallel=cp),
        "safe-core": SafeConfig("safe-core", **sched),
        "safe-sw": SafeConfig("safe-sw", cfg_context=args.guidance - 1.0, cfg_sensitive=args.guidance + 1.0, **sched),
    }


# valid caption tokens of the (prompt, negative prompt) pair where a backbone pads captions
PROMPT_VALID = E2E_PROMPT_VALID


class _Backbone:
    """One backbone's pipeline as the benchmark drives it (from its kit): which modes exist, how one call is made."""

    def __init__(self, args, dtype):
        kit = self.kit = kit_for(args.model)
        self.model = args.model
        g = torch.Generator().manual_seed(0)

        def draw(_role, *shape):
            return torch.randn(*shape, generator=g).to(args.device, dtype)

        overrides = kit.bench_overrides(args.layers, heads=args.heads, hidden_size=args.hidden_size,
                                        kv_heads=args.kv_heads)
        overrides = {k: v for k, v in overrides.items() if v is not None}  # layers None: the preset's own depth
        with torch.device(args.device):  # initialised where it runs: no host copy of a full-size float32 model
            self.transformer = kit.build(args.preset or kit.real_preset, dtype=dtype, **overrides)
        self.pipe = kit.pipeline(self.transformer)
        self.text_len = kit.bench_text_len
        self.kwargs = kit.prompt_kwargs(self.transformer, draw, self.text_len, PROMPT_VALID, device=args.device)
        self.modes = MODES[:3] if kit.guidance_distilled else MODES
        self.batch = "1 (guidance-distilled)" if kit.guidance_distilled else \
            "1, two calls per step (CFG)" if kit.cfg_calls else "2 (CFG)"
        self.frames = getattr(args, "frames", None) or kit.bench_frames  # latent frames (video backbones)
        if self.frames > 1 and kit.frame_kwargs is None:
            raise SafeDitError(f"--frames applies to video backbones; {kit.label} makes images")
        self.kwargs.update(kit.frame_kwargs(self.frames) if kit.frame_kwargs is not None else {})
        if getattr(args, "prompts", 1) == 2:  # a second prompt of another caption length in the same call
            second = kit.prompt_kwargs(self.transformer, draw, self.text_len, PROMPT_VALID[::-1], device=args.device)
            self.kwargs = {k: torch.cat([v, second[k]]) if isinstance(v, torch.Tensor)
                           else v + second[k] if isinstance(v, list) else v  # Z-Image: lists of unpadded captions
                           for k, v in self.kwargs.items()}
            self.batch = f"2 prompts ({PROMPT_VALID[0]} and {PROMPT_VALID[1]} valid caption tokens) x " + self.batch
        self.label = kit.label
        self.heads, self.kv_heads, self.head_dim = kit.attention_shape(self.transformer)
        self.transformer.to(args.device)
        self.pipe.to(args.device)
        self.hidden = self.heads * self.head_dim
        cfg = self.transformer.config  # the depth as built (FLUX: double + single blocks)
        self.blocks = {k: cfg[k] for k in ("num_layers", "num_single_layers") if isinstance(cfg.get(k), int)}

    @property
    def vae_scale(self) -> int:
        return getattr(self.pipe, "vae_scale_factor", None) or self.pipe.vae_scale_factor_spatial  # video: spatial

    def size(self, side: int) -> int:
        """Image side in pixels whose latent has ``side`` x ``side`` image tokens (per frame)."""
        patch = self.kit.latent_patch or self.transformer.config.patch_size  # FluxPipeline packs 2x2 latents
        return side * patch * self.vae_scale

    def call(self, size: int, steps: int, guidance: float):
        # where a guider holds the CFG scale (HunyuanVideo 1.5): no argument
        guider = getattr(self.pipe, "guider", None)
        if guider is not None:
            guider.guidance_scale = guidance
        scale = {} if guider is not None else dict(guidance_scale=guidance)
        return self.pipe(**self.kwargs, **scale, height=size, width=size, num_inference_steps=steps,
                         generator=torch.Generator().manual_seed(0), output_type="latent")[0]  # images or frames


def run_e2e(args, progress: bool = True, cp=None) -> dict:
    dtype = DTYPES[args.dtype]
    bb = _Backbone(args, dtype)
    pipe = bb.pipe
    modes = tuple(m for m in bb.modes if args.modes is None or m in args.modes)
    configs = _configs(args, cp)
    rows = []
    bar = tqdm(total=len(args.tokens) * len(modes) * (args.repeats + 2), disable=not progress,
               desc=f"bench e2e {args.model}", file=sys.stderr)
    for n_tokens in args.tokens:
        side = math.isqrt(n_tokens // bb.frames)
        if bb.frames * side * side != n_tokens or side % 8:
            per = f"{bb.frames} frames of " if bb.frames > 1 else ""
            raise SafeDitError(f"--tokens {n_tokens}: use {per}square grids whose side is a multiple of 8")
        size = bb.size(side)

        def call(steps):
            return bb.call(size, steps, args.guidance)

        timed = n_tokens <= args.time_up_to
        short = min(args.steps, configs["safe-core"].warmup_steps + 3)  # warm-up (dense) and selective steps
        status, times, reports, peaks, short_out = {}, {m: [] for m in modes}, {}, {}, {}
        for mode in modes:  # warm-up (short call), OOM probe, and the correctness check before any timing
            apply_safe_dit(pipe, configs[mode])
            try:
                with torch.no_grad():
                    short_out[mode] = call(short).float()
                status[mode] = "ok"
            except RuntimeError as err:
                if not is_oom(err):
                    raise
                status[mode] = "oom"
            bar.update(1)
        err = abs_err = None
        if status["dense"] == status["dense-fp"] == "ok":
            ref = short_out["dense"]
            abs_err = float((short_out["dense-fp"] - ref).abs().max())
            err = abs_err / float(ref.abs().max().clamp_min(1e-12))
            if not err <= (1e-4 if dtype == torch.float32 else 5e-2):  # NaN fails too
                raise SafeDitError(f"dense-fp differs from dense by {err:.2e} (relative) at {n_tokens} tokens")
        short_out.clear()
        kernels = {}
        for mode in ("dense", "dense-fp") if getattr(args, "kernels", False) else ():
            if status.get(mode) == "ok":  # one sampling step under the profiler: the attention path each mode took
                apply_safe_dit(pipe, configs[mode])
                with torch.no_grad():
                    kernels[mode] = attention_kernels(lambda: call(1), args.device)
        for _ in range(args.repeats if timed else 0):
            for mode in modes:
                if status[mode] == "ok":
                    apply_safe_dit(pipe, configs[mode])
                    t0 = time.perf_counter()
                    with torch.no_grad():
                        call(args.steps)
                    if args.device.startswith("cuda"):
                        torch.cuda.synchronize()
                    times[mode].append(time.perf_counter() - t0)
                    rt = runtime_of(pipe)
                    reports[mode] = rt.last_report if rt is not None else None
                bar.update(1)
        for mode in modes:
            if status[mode] == "ok" and args.memory:
                apply_safe_dit(pipe, configs[mode])
                with torch.no_grad():  # every step kind occurs in the short call; peaks repeat per kind
                    peaks[mode] = peak_memory_mb(lambda: call(short), args.device)
            bar.update(1)
        for mode in modes:
            rep = reports.get(mode) or {}
            rows.append({
                "tokens": n_tokens, "resolution": size * 8 // bb.vae_scale, "mode": mode,
                "status": status[mode], "timed": timed,
                "rel_err_vs_dense_short_call": err if mode == "dense-fp" else None,
                "max_abs_err_vs_dense_short_call": abs_err if mode == "dense-fp" else None,
                "short_call_steps": short, "attention_kernels": kernels.get(mode),
                "seconds": statistics.median(times[mode]) if times[mode] else None, "all_seconds": times[mode],
                "peak_memory_mb": peaks.get(mode),
                # untimed (probe-only) rows ran a short call: no full-schedule token fraction to report
                "token_fraction": rep.get("token_fraction", 1.0 if times[mode] else None),
                "cache_mb": rep.get("cache_mb", 0.0 if times[mode] else None), "steps": rep.get("steps"),
                "tokens_per_step": rep.get("tokens_per_step"),
            })
    bar.close()
    remove_safe_dit(pipe)
    return {
        "benchmark": "e2e",
        "environment": environment(args.device),
        "settings": {
            "model": args.model, "model_class": type(bb.transformer).__name__, "model_label": bb.label,
            "preset": args.preset, "layers": args.layers, "blocks": bb.blocks, "hidden_size": bb.hidden,
            "heads": bb.heads, "kv_heads": bb.kv_heads, "head_dim": bb.head_dim, "dtype": args.dtype,
            "steps": args.steps, "batch": bb.batch, "latent_frames": bb.frames, "guidance": args.guidance,
            "repeats": args.repeats, "text_len": bb.text_len,
            "time_up_to_tokens": args.time_up_to,
            "memory_measured_on": "a short call (warm-up steps + anchor + selective steps) of each mode",
            "configs": {m: dict(c.__dict__, context_parallel=getattr(args, "context_parallel", None) if
                                c.context_parallel is not None else None) for m, c in configs.items() if m in modes},
            "context_parallel": getattr(args, "context_parallel", None),
        },
        "rows": rows,
        "summary": summarize(rows),
    }


def summarize(rows: list[dict]) -> list[dict]:
    out = []
    for n in sorted({r["tokens"] for r in rows}):
        by = {r["mode"]: r for r in rows if r["tokens"] == n}
        t = {m: by[m]["seconds"] if m in by else None for m in MODES}
        s = {"tokens": n, "resolution": by["dense"]["resolution"]}
        if t["dense"] and t["dense-fp"]:
            s["fast_path_gain"] = t["dense"] / t["dense-fp"]
        if t["dense-fp"] and t["safe-core"]:
            s["scheduling_gain"] = t["dense-fp"] / t["safe-core"]
        if t["dense"] and t["safe-core"]:
            s["total_gain"] = t["dense"] / t["safe-core"]
        pd, pc = by["dense"]["peak_memory_mb"], by["safe-core"]["peak_memory_mb"]
        if pd and pc:
            s["peak_memory_dense_over_safe_core"] = pd / pc
        out.append(s)
    largest = {}
    for m in MODES:
        ok = [r["tokens"] for r in rows if r["mode"] == m and r["status"] == "ok"]
        if any(r["mode"] == m for r in rows):
            largest[m] = max(ok) if ok else None
    out.append({"largest_tokens_that_ran": largest})
    return out


def format_table(result: dict) -> str:
    lines = [f"{'tokens':>7} {'res':>5} {'mode':<10} {'status':<6} {'median s':>9} {'peak MB':>9} "
             f"{'token frac':>10} {'cache MB':>9}"]
    for r in result["rows"]:
        sec = f"{r['seconds']:.2f}" if r["seconds"] is not None else "-"
        mem = f"{r['peak_memory_mb']:.0f}" if r["peak_memory_mb"] is not None else "-"
        frac = f"{r['token_fraction']:.3f}" if r["token_fraction"] is not None else "-"
        cache = f"{r['cache_mb']:.1f}" if r["cache_mb"] is not None else "-"
        lines.append(f"{r['tokens']:>7} {r['resolution']:>5} {r['mode']:<10} {r['status']:<6} {sec:>9} {mem:>9} "
                     f"{frac:>10} {cache:>9}")
    lines.append("")
    for s in result["summary"]:
        if "tokens" not in s:
            lines.append(f"largest token count each mode ran: {s['largest_tokens_that_ran']}")
            continue
        parts = [f"{s['tokens']} tokens ({s['resolution']}²)"]
        for key, label in (("fast_path_gain", "dense/dense-fp"), ("scheduling_gain", "dense-fp/safe-core"),
                           ("total_gain", "dense/safe-core"),
                           ("peak_memory_dense_over_safe_core", "peak mem dense/safe-core")):
            if key in s:
                parts.append(f"{label} {s[key]:.2f}x")
        lines.append("  ".join(parts))
    return "\n".join(lines)


# the three ratios every e2e summary row carries, with their plot labels
GAINS = (("fast_path_gain", "fast path: dense / dense-fp"), ("scheduling_gain", "scheduling: dense-fp / safe-core"),
         ("total_gain", "total: dense / safe-core"))


def plot(result: dict, path: str) -> None:
    plt = pyplot()

    summ = [s for s in result["summary"] if "tokens" in s]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for key, label in GAINS:
        pts = [(s["tokens"], s[key]) for s in summ if key in s]
        if pts:
            axes[0].plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=label)
    axes[0].axhline(1.0, color="gray", lw=0.8)
    axes[0].set_xscale("log", base=2)
    axes[0].set_xlabel("image tokens")
    axes[0].set_ylabel("speedup (median end-to-end latency ratio)")
    if axes[0].get_legend_handles_labels()[0]:  # nothing timed: memory only
        axes[0].legend(fontsize=8)
    axes[0].set_title("speedup vs resolution")
    memory_axis(axes[1], result["rows"], [m for m in MODES if any(r["mode"] == m for r in result["rows"])],
                "peak memory vs resolution")
    save_figure(plt, fig, result, path, f"{result['settings']['steps']} steps, ")


def run(args) -> int:
    # --quick's sizes and the argument checks that need no model: safe_dit.commands.bench_e2e.prepare
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.hidden_size and not (kit_for(args.model).bench_hidden_size and args.heads and args.kv_heads):
        raise SafeDitError("--hidden-size needs --heads and --kv-heads")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SafeDitError("--device cuda requested but CUDA is not available")
    if args.modes is not None:
        args.modes = sorted(set(args.modes) | {"dense", "dense-fp", "safe-core"}, key=MODES.index)
    for config in _configs(args).values():
        warning = selective_free(config, args.steps)
        if warning:
            logging.getLogger(__name__).warning("%s", warning)
    cp, rank = context_parallel_setup(args)
    result = run_e2e(args, progress=not args.no_progress and rank == 0, cp=cp)
    if rank:  # every rank ran the same benchmark in lockstep; rank 0 alone prints and writes
        return 0
    return emit(result, format_table(result), args, plot)
