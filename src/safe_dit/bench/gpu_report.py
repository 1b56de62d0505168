"""The GPU suite's reports from its results: the README/docs GPU table (``markdown_table``, also
``python3 -m safe_dit.commands.gpu_suite --table FILE``), the one-page summary and its picture."""

from __future__ import annotations

import json
from pathlib import Path

from safe_dit.bench import e2e
from safe_dit.bench.gpu_budget import BUDGET_S, format_plan
from safe_dit.bench.gpu_steps import MODES


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
              "Regenerate the table: `python3 -m safe_dit.commands.gpu_suite --table "
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
