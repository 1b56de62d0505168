"""The Mask-Induced Dispatch Tax (MIDT) of scaled_dot_product_attention, measured here.

A mask whose every query row adds one finite constant (an all-True boolean mask, an all-zero or
row-constant additive mask) changes nothing: softmax is shift-invariant per row. It still costs:
SDPA has to read it, often after converting a boolean mask into a materialised float mask of
[B, H, N, N], and, depending on the torch version and GPU, a mask can also disqualify the
FlashAttention kernels (forcing the memory-efficient or math kernel). That avoidable cost is the
Mask-Induced Dispatch Tax. Which kernel ran is recorded per case: on torch 2.11 + an H200, SDPA ran
cuDNN's fused attention with and without the mask, so the tax there was the mask's materialisation
and reading alone (5x at N = 16384 for a boolean mask); on the CPU, flash_attention_for_cpu ran both.

For every case (device, dtype, head dim, sequence length, mask) this command:
  1. checks that the masked output equals the mask-free one (refuses to time a case that fails);
  2. times SDPA without the mask and with it (warm-up first, median over repeats, interleaved);
  3. records peak memory of each call and the SDPA kernel ops that ran (PyTorch profiler).

Masks: bool-full (all-True [B,H,N,N] tensor), bool-expanded (all-True [B,1,1,N] expanded to
[B,H,N,N], as diffusers' Lumina-Next does), additive-zero, additive-rowconst (a different finite
constant per query row), and, for contrast, key-padding (the last quarter of keys masked: a
semantic mask, compared with mask-free SDPA over the valid keys, which is what safe-dit's exact
rewrite runs).
"""

from __future__ import annotations

import statistics
import sys
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from safe_dit.bench.choices import MIDT_MASKS
from safe_dit.bench.report import DTYPES, emit, pyplot
from safe_dit.config import SafeDitError
from safe_dit.inspection.environment import environment, peak_memory_mb, quiet_profiler, synchronize

MASKS = MIDT_MASKS
REDUNDANT = {m: m != "key-padding" for m in MASKS}
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}
KERNEL_PREFIXES = ("aten::_scaled_dot_product", "aten::_flash_attention", "aten::_efficient_attention", "aten::_cudnn")
GPU_KERNEL_WORDS = ("flash", "fmha", "efficient", "cudnn", "attention")


def build_mask(kind: str, batch: int, heads: int, n: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    if kind == "bool-full":
        return torch.ones(batch, heads, n, n, dtype=torch.bool, device=device)
    if kind == "bool-expanded":
        return torch.ones(batch, 1, 1, n, dtype=torch.bool, device=device).expand(batch, heads, n, n)
    if kind == "additive-zero":
        return torch.zeros(batch, heads, n, n, dtype=dtype, device=device)
    if kind == "additive-rowconst":
        row = (torch.arange(n, device=device, dtype=torch.float32) % 7 - 3.0).to(dtype)  # [N] per query row
        return row.view(1, 1, n, 1).expand(batch, heads, n, n).contiguous()
    if kind == "key-padding":
        valid = torch.arange(n, device=device) < max(1, (3 * n) // 4)
        return valid.view(1, 1, 1, n).expand(batch, heads, n, n)
    raise SafeDitError(f"unknown mask {kind!r}; choose from {', '.join(MASKS)}")


def _kernels(fn, device: str) -> list[str]:
    from torch.profiler import ProfilerActivity, profile

    if device.startswith("cuda"):
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            fn()
            synchronize(device)
    else:
        with quiet_profiler() as prof:
            fn()
    names = []
    for ev in prof.events():
        name = ev.name
        on_gpu = str(getattr(ev, "device_type", "")).endswith("CUDA")
        if name.startswith(KERNEL_PREFIXES) or (on_gpu and any(w in name.lower() for w in GPU_KERNEL_WORDS)):
            if name not in names:
                names.append(name)
    return names


def _median_pair(a, b, device: str, warmup: int, repeats: int) -> tuple[float, float, float]:
    """Median seconds of a() and b(), alternated so that machine noise hits both alike, and the larger relative
    spread of the two series ((max - min) / median): how far a single timing strays on this machine now."""
    for _ in range(warmup):
        a(), b()
    synchronize(device)
    ta, tb = [], []
    for _ in range(repeats):
        for fn, acc in ((a, ta), (b, tb)):
            t0 = time.perf_counter()
            fn()
            synchronize(device)
            acc.append(time.perf_counter() - t0)
    spread = max((max(t) - min(t)) / statistics.median(t) for t in (ta, tb))
    return statistics.median(ta), statistics.median(tb), spread


def run_case(device, dtype_name, head_dim, n, heads, batch, mask_kind, warmup, repeats) -> dict:
    dtype = DTYPES[dtype_name]
    g = torch.Generator(device="cpu").manual_seed(n * 1000 + head_dim)
    q, k, v = (torch.randn(batch, heads, n, head_dim, generator=g).to(device, dtype) for _ in range(3))
    mask = build_mask(mask_kind, batch, heads, n, dtype, device)
    if mask_kind == "key-padding":
        valid = int(mask[0, 0, 0].sum())
        k_ref, v_ref = k[:, :, :valid], v[:, :, :valid]
    else:
        k_ref, v_ref = k, v

    def maskless():
        return F.scaled_dot_product_attention(q, k_ref, v_ref)

    def masked():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    with torch.no_grad():
        ref, out = maskless().float(), masked().float()
        err = (ref - out).abs().max().item()
        if not err <= TOL[dtype] * max(1.0, ref.abs().max().item()):
            raise SafeDitError(
                f"correctness check failed for mask {mask_kind} (N={n}, d={head_dim}, {dtype_name}, {device}): "
                f"max abs error {err:.3g}; not timing a case whose outputs differ"
            )
        del ref, out
        t_free, t_mask, spread = _median_pair(maskless, masked, device, warmup, repeats)
        mem_free = peak_memory_mb(maskless, device)
        mem_mask = peak_memory_mb(masked, device)
        k_free, k_mask = _kernels(maskless, device), _kernels(masked, device)
    return {
        "device": device, "seq_len": n, "head_dim": head_dim, "heads": heads, "batch": batch, "dtype": dtype_name,
        "mask": mask_kind, "redundant": REDUNDANT[mask_kind], "maskless_ms": 1e3 * t_free, "masked_ms": 1e3 * t_mask,
        "tax": t_mask / t_free, "repeat_spread": spread, "maskless_peak_mb": mem_free, "masked_peak_mb": mem_mask,
        "maskless_kernels": k_free, "masked_kernels": k_mask, "max_abs_err": err,
        "mask_storage_mb": mask.untyped_storage().nbytes() / 2**20,  # what the mask itself holds in memory
    }


def run_midt(seq_lens, head_dims, dtypes, devices, heads, batch, masks, repeats, warmup, progress=True) -> dict:
    cases = [(d, t, h, n, m) for d in devices for t in dtypes for h in head_dims for n in seq_lens for m in masks]
    rows = []
    for d, t, h, n, m in tqdm(cases, desc="midt", disable=not progress, file=sys.stderr):
        rows.append(run_case(d, t, h, n, heads, batch, m, warmup, repeats))
    return {
        "benchmark": "midt",
        "environment": environment(devices[-1]),
        "settings": {"seq_lens": seq_lens, "head_dims": head_dims, "dtypes": dtypes, "devices": devices,
                     "heads": heads, "batch": batch, "masks": list(masks), "repeats": repeats, "warmup": warmup},
        "cases": rows,
        "summary": summarize(rows),
    }


def summarize(rows: list[dict]) -> dict:
    out = {}
    for dev in sorted({r["device"] for r in rows}):
        red = [r for r in rows if r["device"] == dev and r["redundant"]]
        if not red:
            continue
        longest = max(r["seq_len"] for r in red)
        at_longest = [r["tax"] for r in red if r["seq_len"] == longest]
        out[dev] = {
            "redundant_tax_min": min(r["tax"] for r in red),
            "redundant_tax_max": max(r["tax"] for r in red),
            "redundant_tax_median": statistics.median(r["tax"] for r in red),
            "longest_seq_len": longest,
            "redundant_tax_median_at_longest": statistics.median(at_longest),
        }
    return out


def format_table(result: dict) -> str:
    lines = [f"{'device':<6} {'dtype':<9} {'d':>4} {'N':>6} {'mask':<18} {'mask-free ms':>12} {'masked ms':>10} "
             f"{'tax':>6} {'peak MB free/masked':>20}  kernels (masked)"]
    for r in result["cases"]:
        kern = ",".join(k.replace("aten::_scaled_dot_product_", "") for k in r["masked_kernels"])
        lines.append(
            f"{r['device']:<6} {r['dtype']:<9} {r['head_dim']:>4} {r['seq_len']:>6} {r['mask']:<18} "
            f"{r['maskless_ms']:>12.2f} {r['masked_ms']:>10.2f} {r['tax']:>5.2f}x "
            f"{r['maskless_peak_mb']:>9.1f}/{r['masked_peak_mb']:<10.1f}  {kern}"
        )
    for dev, s in result["summary"].items():
        lines.append(f"{dev}: redundant-mask tax {s['redundant_tax_min']:.2f}x .. {s['redundant_tax_max']:.2f}x "
                     f"(median {s['redundant_tax_median']:.2f}x; at N={s['longest_seq_len']}: "
                     f"{s['redundant_tax_median_at_longest']:.2f}x)")
    noisy = [r for r in result["cases"] if r.get("repeat_spread", 0.0) > NOISY_SPREAD]
    if noisy:
        worst = max(r["repeat_spread"] for r in noisy)
        lines.append(f"warning: {len(noisy)} of {len(result['cases'])} cases had repeat timings spreading "
                     "by more than "
                     f"{NOISY_SPREAD:.0%} of their median (up to {worst:.0%}): the machine is busy or noisy, so those "
                     "taxes are not to be trusted; rerun on a quiet machine, with more --repeats")
    return "\n".join(lines)


NOISY_SPREAD = 0.5  # (max - min) / median of one case's repeats above which its tax is flagged


def plot(result: dict, path: str) -> None:
    plt = pyplot()

    rows = result["cases"]
    head_dims = sorted({r["head_dim"] for r in rows})
    fig, axes = plt.subplots(1, len(head_dims), figsize=(4.2 * len(head_dims), 3.8), squeeze=False, sharey=True)
    for ax, hd in zip(axes[0], head_dims):
        for dev in sorted({r["device"] for r in rows}):
            for dt in sorted({r["dtype"] for r in rows}):
                for m in MASKS:
                    pts = sorted((r["seq_len"], r["tax"]) for r in rows
                                 if r["head_dim"] == hd and r["device"] == dev and r["dtype"] == dt and r["mask"] == m)
                    if pts:
                        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-" if REDUNDANT[m] else "x--",
                                label=f"{m} {dt} {dev}", ms=3)
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length N")
        ax.set_title(f"head dim {hd}")
    axes[0][0].set_ylabel("tax = masked / mask-free latency")
    axes[0][-1].legend(fontsize=6)
    env = result["environment"]
    fig.suptitle(f"Mask-Induced Dispatch Tax — {env.get('gpu') or env['processor'][:48]}, torch {env['torch']}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args) -> int:
    # --quick's sizes and the argument checks: safe_dit.commands.midt.prepare, before this module loads
    if args.devices is None:
        args.devices = ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]
    if "cuda" in args.devices and not torch.cuda.is_available():
        raise SafeDitError("--devices cuda requested but CUDA is not available")
    if "float16" in args.dtypes and args.devices != ["cuda"]:
        raise SafeDitError("float16 is only measured on CUDA (CPU half-precision SDPA is not a fast path); "
                           "use --devices cuda")
    heads = args.heads or (24 if args.devices == ["cuda"] else 2)
    result = run_midt(args.seq_lens, args.head_dims, args.dtypes, args.devices, heads, args.batch, args.masks,
                      args.repeats, args.warmup, progress=not args.no_progress)
    return emit(result, format_table(result), args, plot)
