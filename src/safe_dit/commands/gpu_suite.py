"""The GPU suite: every headline GPU figure measured again in one process, in one ~9-minute call on one H100/H200.

    python3 -m safe_dit.commands.gpu_suite [--out DIR] [--tag gpu] [--budget 540] [--only STEP ...]
    python3 -m safe_dit.commands.gpu_suite --dry-run      # every step at tiny shapes on the CPU, into a temp dir
    python3 -m safe_dit.commands.gpu_suite --plan         # the H200 time budget only
    python3 -m safe_dit.commands.gpu_suite --table FILE   # the README/docs GPU table from a suite JSON

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

This module runs the steps and holds the command line; the steps are listed in ``safe_dit.bench.gpu_steps``, the
budget is estimated in ``safe_dit.bench.gpu_budget``, and the table, summary and picture are written by
``safe_dit.bench.gpu_report``.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from safe_dit.bench import e2e
from safe_dit.bench.gpu_budget import BUDGET_S, PROCESS_S, format_plan, plan
from safe_dit.bench.gpu_report import markdown_table, write_summary
from safe_dit.bench.gpu_steps import MODES, RESULTS, STEPS, MidtStep, Step, run_shape, skip_reason
from safe_dit.commands import bench_e2e
from safe_dit.inspection.environment import environment


def e2e_defaults() -> argparse.Namespace:
    """bench e2e's own defaults, whatever options it has."""
    p = argparse.ArgumentParser()
    bench_e2e.configure_parser(p)
    return p.parse_args([])


def _e2e_args(step: Step, dry: bool, device: str) -> argparse.Namespace:
    """bench e2e's defaults with this step's settings (the dry run: the tiny preset, float32, 4 steps, 1 repeat)."""
    args = e2e_defaults()
    tokens, frames = run_shape(step, dry)
    args.model, args.guidance, args.prompts, args.modes = step.model, step.guidance, step.prompts, list(MODES)
    args.tokens, args.time_up_to, args.layers, args.kernels = [tokens], tokens if step.timed else 0, step.layers, True
    args.preset, args.dtype, args.device = ("tiny", "float32", device) if dry else (step.preset, "bfloat16", device)
    args.steps, args.repeats = (4, 1) if dry else (step.steps, step.repeats)
    if hasattr(args, "frames"):  # a video backbone's latent frames, where bench e2e takes them
        args.frames = frames
    return args


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
    per_frame = f" ({frames} frames of {args.tokens[0] // frames})" if frames > 1 else ""
    log(f"== {step.name}: {step.what} ({args.tokens[0]} tokens{per_frame}, "
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


# ----------------------------------------------------------------------------------------------- command line


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m safe_dit.commands.gpu_suite", description=__doc__.split("\n\n")[0],
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
