"""Forward-pass benchmark: stock ``dense`` vs the exact fast path ``dense-fp`` on Lumina-Next.

One process, one model, modes interleaved repeat by repeat (these machines are shared and
noisy), warm-up first, medians reported, peak memory measured on a separate call. A third
column, ``maskless-oracle``, hard-wires every attention call to SDPA with no mask and no
decision logic at all: ``dense-fp / maskless-oracle - 1`` is the overhead of the certified fast
path itself (the target is within noise, <= 2%).

A correctness check (dense-fp vs dense, max abs error) runs before any timing is printed.
Default model: the Lumina-Next-2B attention shape (hidden 2304, 32 heads of dim 72, 8 KV
heads) with random weights and 2 blocks on CPU; image token counts 1024, 4096, 9216 are the
512², 1024², 1536² resolutions of the real model's latent grid (VAE 8, patch 2).
"""

from __future__ import annotations

import math
import statistics
import sys
import time

import torch
from tqdm import tqdm

from safe_dit.adapters.lumina_next import SafeLuminaAttnProcessor
from safe_dit.api import apply_safe_dit, remove_safe_dit
from safe_dit.bench.report import DTYPES, emit, is_oom, memory_axis, pyplot, save_figure
from safe_dit.config import SafeConfig, SafeDitError
from safe_dit.inspection.environment import environment, peak_memory_mb

MODES = ("dense", "dense-fp", "maskless-oracle")


class _OracleProcessor(SafeLuminaAttnProcessor):
    """Every attention call is plain SDPA without a mask: the floor the fast path must meet."""

    def __new__(cls):  # a real instance (a bare safe processor would stand in the stock one)
        return object.__new__(cls)

    def __init__(self):  # no runtime: nothing scheduled, no mask decided
        self.runtime, self.name, self.rewrite_padding, self.layer, self.is_self = None, "oracle", False, -1, False

    def _attend(self, attn, query, key, value, mask, scale):  # [B, L, H, d] in and out
        q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # [B, H, L, d]
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale,
                                                               enable_gqa=k.shape[1] != q.shape[1])
        return out.transpose(1, 2)


def _set_mode(model, mode: str, originals: dict) -> None:
    remove_safe_dit(model)
    for name, module in model.named_modules():
        if name in originals:
            module.set_processor(originals[name])
    if mode == "dense-fp":
        apply_safe_dit(model, SafeConfig("dense-fp"))
    elif mode == "maskless-oracle":
        for name, module in model.named_modules():
            if name in originals:
                module.set_processor(_OracleProcessor())


def run_forward_bench(
    tokens: list[int], preset: str = "lumina-next-2b", layers: int = 2, batch: int = 1,
    dtype: str = "float32", repeats: int = 3, warmup: int = 1, device: str = "cpu", progress: bool = True,
) -> dict:
    from safe_dit.testing.kits import build_lumina_next, lumina_inputs

    torch_dtype = DTYPES[dtype]
    model = build_lumina_next(preset, num_layers=layers, dtype=torch_dtype).to(device)
    originals = {n: m.processor for n, m in model.named_modules() if hasattr(m, "processor")}
    rows = []
    bar = tqdm(total=len(tokens) * len(MODES) * (warmup + repeats + 1), disable=not progress,
               desc="bench forward", file=sys.stderr)
    for n_tokens in tokens:
        side = math.isqrt(n_tokens)
        h, w = side, math.ceil(n_tokens / side)
        inputs = lumina_inputs(model, h, w, batch=batch, text_len=32, valid_lens=[32] * batch,
                               dtype=torch_dtype, device=device)
        row_base = {"tokens": h * w, "grid": [h, w], "batch": batch}

        def forward():
            with torch.no_grad():
                return model(**inputs)[0]

        status = {m: "ok" for m in MODES}
        outputs = {}
        # correctness first (this call also warms each mode up)
        for mode in MODES:
            _set_mode(model, mode, originals)
            try:
                outputs[mode] = forward().float()
            except RuntimeError as err:
                if not is_oom(err):
                    raise
                status[mode] = "oom"
            bar.update(1)
        err = None
        if "dense" in outputs and "dense-fp" in outputs:
            err = (outputs["dense"] - outputs["dense-fp"]).abs().max().item()
            tol = 1e-4 if dtype == "float32" else 3e-2
            if not err <= tol * max(1.0, outputs["dense"].abs().max().item()):
                raise SafeDitError(f"dense-fp differs from dense by {err:.3g} at {n_tokens} tokens; not timing it")
        outputs.clear()
        times: dict[str, list[float]] = {m: [] for m in MODES}
        for i in range(warmup + repeats):
            for mode in MODES:  # interleaved: noise hits every mode alike
                if status[mode] != "ok":
                    bar.update(1)
                    continue
                _set_mode(model, mode, originals)
                t0 = time.perf_counter()
                forward()
                if device.startswith("cuda"):
                    torch.cuda.synchronize(device)
                if i >= warmup:
                    times[mode].append(time.perf_counter() - t0)
                bar.update(1)
        for mode in MODES:
            peak = None
            if status[mode] == "ok":
                _set_mode(model, mode, originals)
                peak = peak_memory_mb(forward, device)
            rows.append(row_base | {
                "mode": mode, "status": status[mode],
                "seconds": statistics.median(times[mode]) if times[mode] else None,
                "all_seconds": times[mode], "peak_memory_mb": peak,
                "max_abs_err_vs_dense": err if mode == "dense-fp" else None,
            })
    bar.close()
    _set_mode(model, "dense", originals)
    return {
        "benchmark": "forward",
        "environment": environment(device),
        "settings": {"preset": preset, "layers": layers, "batch": batch, "dtype": dtype, "repeats": repeats,
                     "warmup": warmup, "hidden_size": model.config.hidden_size,
                     "heads": model.config.num_attention_heads, "kv_heads": model.config.num_kv_heads,
                     "head_dim": model.head_dim, "text_len": 32},
        "rows": rows,
        "summary": summarize(rows),
    }


def summarize(rows: list[dict]) -> list[dict]:
    out = []
    for n in sorted({r["tokens"] for r in rows}):
        by = {r["mode"]: r for r in rows if r["tokens"] == n}
        s = {"tokens": n}
        d, fp, orc = (by[m]["seconds"] for m in MODES)
        if d and fp:
            s["dense_over_dense_fp"] = d / fp
        if fp and orc:
            s["fast_path_overhead_vs_oracle"] = fp / orc - 1
        pd, pfp = by["dense"]["peak_memory_mb"], by["dense-fp"]["peak_memory_mb"]
        if pd and pfp:
            s["peak_memory_ratio"] = pd / pfp
        out.append(s)
    return out


def format_table(result: dict) -> str:
    lines = [f"{'tokens':>7} {'mode':<16} {'status':<6} {'median s':>9} {'peak MB':>10}"]
    for r in result["rows"]:
        sec = f"{r['seconds']:.4f}" if r["seconds"] is not None else "-"
        mem = f"{r['peak_memory_mb']:.1f}" if r["peak_memory_mb"] is not None else "-"
        lines.append(f"{r['tokens']:>7} {r['mode']:<16} {r['status']:<6} {sec:>9} {mem:>10}")
    lines.append("")
    for s in result["summary"]:
        parts = [f"tokens {s['tokens']}"]
        if "dense_over_dense_fp" in s:
            parts.append(f"dense/dense-fp {s['dense_over_dense_fp']:.2f}x")
        if "peak_memory_ratio" in s:
            parts.append(f"peak memory dense/dense-fp {s['peak_memory_ratio']:.2f}x")
        if "fast_path_overhead_vs_oracle" in s:
            parts.append(f"fast-path overhead vs maskless oracle {100 * s['fast_path_overhead_vs_oracle']:+.1f}%")
        lines.append("  ".join(parts))
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    plt = pyplot()

    summ = [s for s in result["summary"] if "dense_over_dense_fp" in s]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    x = [s["tokens"] for s in summ]
    axes[0].plot(x, [s["dense_over_dense_fp"] for s in summ], "o-", label="dense / dense-fp")
    axes[0].axhline(1.0, color="gray", lw=0.8)
    axes[0].set_xscale("log", base=2)
    axes[0].set_xlabel("image tokens")
    axes[0].set_ylabel("speedup (median latency ratio)")
    axes[0].set_title("fast-path gain, forward pass")
    axes[0].legend()
    memory_axis(axes[1], result["rows"], ("dense", "dense-fp"), "peak memory, forward pass")
    save_figure(plt, fig, result, path, "")


def run(args) -> int:
    # --quick's sizes and the argument checks: safe_dit.commands.bench_forward.prepare, before this module loads
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SafeDitError("--device cuda requested but CUDA is not available")
    if args.dtype == "float16" and not args.device.startswith("cuda"):
        raise SafeDitError("float16 is only benchmarked on CUDA; use float32 or bfloat16 on CPU")
    result = run_forward_bench(args.tokens, args.preset, args.layers, args.batch, args.dtype, args.repeats,
                               args.warmup, args.device, progress=not args.no_progress)
    return emit(result, format_table(result), args, plot)
