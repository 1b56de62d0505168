"""The output of ``safe-dit pareto``: its table, the Pareto plot and the ablation bar chart."""

from __future__ import annotations

from safe_dit.bench.peers import PEERS
from safe_dit.bench.report import pyplot


def _timed_calls(p2: dict) -> str:
    n = p2.get("repeats", 1)
    return "1 timed call each" if n == 1 else f"median of {n} timed calls each"


def _tokens(settings_common: dict) -> int:
    """Image tokens of the embedded model the quality part ran (pixel space, patch 4: (size / 4)²)."""
    return (settings_common.get("size", 64) // 4) ** 2


def _tail(entry: dict, key: str) -> str:
    """A per-prompt PSNR statistic, or '-' in a result written before it was recorded."""
    return f"{entry[key]:6.2f}" if key in entry else f"{'-':>6}"


def table(result: dict) -> str:
    p1, p2 = result["quality"], result.get("scaled")
    tok = f"x@{p2['tokens']}" if p2 else ""
    head = (f"{'setting':34} {'family':8} {'steps':>5} {'x dense':>7} {tok:>7} {'peakMB':>7} {'PSNR':>6} {'med':>6} "
            f"{'p10':>6} {'min':>6} {'SSIM':>6} {'acc':>6} {'1-obj':>6} {'2-obj':>6} {'tokens':>6}")
    lines = [head]
    for s in result["settings"]:
        name = s["name"]
        if name in p1["unsupported"]:
            lines.append(f"{name:34} {s['family']:8} unsupported: {p1['unsupported'][name]}")
            continue
        e = p1["summary"][name]
        sc = ""
        if p2 and name in p2["rows"]:
            r = p2["rows"][name]
            sc = f"{r['speedup']:6.2f}x" if r["status"] == "ok" else "unsup."
        mem = f"{e['peak_memory_mb']:7.1f}" if e.get("peak_memory_mb") is not None else f"{'-':>7}"
        lines.append(f"{name:34} {s['family']:8} {s['steps']:5d} {e['speedup']:6.2f}x {sc:>7} {mem} "
                     f"{e['psnr_vs_dense_fp']:6.2f} {_tail(e, 'psnr_median')} {_tail(e, 'psnr_p10')} "
                     f"{_tail(e, 'psnr_min')} {e['ssim_vs_dense_fp']:6.4f} {e['accuracy']:6.1%} "
                     f"{e.get('accuracy_single_object', float('nan')):6.1%} "
                     f"{e.get('accuracy_two_object', float('nan')):6.1%} "
                     f"{e['token_fraction']:6.3f}")
    st = result["settings_common"]
    lines.append(f"{st['prompts']} prompts ({st['single']} one-object, {st['two']} two-object), {st['steps']} steps, "
                 f"guidance {st['guidance']}, seed {st['seed']}, float32; "
                 "PSNR/SSIM paired vs dense-fp (identical: 100; "
                 "PSNR = mean over prompts, med/p10/min its median, 10th percentile and minimum); "
                 "'x dense' = median s/image of dense over the setting's, "
                 f"on the embedded model ({_tokens(st)} tokens, "
                 "noisy)")
    if p2:
        lines.append(f"x@{p2['tokens']}: latency ratio vs dense at {p2['tokens']} tokens ({p2['resolution']}²), "
                     f"Lumina-Next {p2['hidden_size']}w/{p2['layers']}L/{p2['heads']}h x {p2['head_dim']}, "
                     "random weights, "
                     f"{_timed_calls(p2)}; adaptive caches (first-block-cache, mag-cache, sea-cache, cache-dit) "
                     "replay the share of "
                     "blocks per step they computed on the trained embedded model (column 'replayed')")
        lines.append(f"{'scaled setting':34} {'seconds':>8} {'x dense':>8} {'x dense-fp':>10} {'peak MB':>8} replayed")
        for name, r in p2["rows"].items():
            if r["status"] != "ok":
                lines.append(f"{name:34} unsupported: {r['reason']}")
                continue
            mem = f"{r['peak_memory_mb']:8.0f}" if r.get("peak_memory_mb") is not None else f"{'-':>8}"
            replay = r.get("decisions", "").partition("model: ")[2].replace(" block-steps computed", "")
            lines.append(f"{name:34} {r['seconds']:8.2f} {r['speedup']:7.2f}x {r['speedup_vs_dense_fp']:9.2f}x {mem} "
                         f"{replay}".rstrip())
    for key, a in result["analysis"].items():
        lines.append(f"Pareto front ({key}): " + ", ".join(a["front"]))
        for v in a["verdicts"]:
            if v["safe_core"] is None:
                lines.append(f"  {v['setting']:32} q={v['quality']:.3g} at {v['speedup']:.2f}x -> {v['verdict']}")
            else:
                lines.append(f"  {v['setting']:32} q={v['quality']:.3g} at {v['speedup']:.2f}x vs {v['safe_core']} "
                             f"q={v['safe_core_quality']:.3g} at {v['safe_core_speedup']:.2f}x -> {v['verdict']}")
    return "\n".join(lines)


_COLORS = {f.method: f.color for f in PEERS} | {"steps": "tab:gray", "ablation": "tab:cyan", "safe-dit": "black"}


def _color(s: dict) -> str:
    return _COLORS.get(s["peer"] or s["family"], "black")


def plot_pareto(result: dict, path: str) -> None:
    plt = pyplot()
    q = result["quality"]["summary"]
    p2 = result.get("scaled")
    panels = [("embedded", {n: e["speedup"] for n, e in q.items()},
               f"speedup vs dense, embedded model ({_tokens(result['settings_common'])} tokens, noisy)")]
    if p2:
        panels.append((f"{p2['tokens']} tokens",
                       {n: r["speedup"] for n, r in p2["rows"].items() if r["status"] == "ok"},
                       f"speedup vs dense at {p2['tokens']} tokens (random-weight Lumina-Next, latency only)"))
    metrics = (("psnr_vs_dense_fp", "paired PSNR vs dense-fp (dB, embedded model; >= 60 drawn at 60)"),
               ("psnr_min", "worst prompt: minimum paired PSNR vs dense-fp (dB; >= 60 drawn at 60)"),
               ("accuracy", "prompt alignment: all attributes right (embedded model)"))
    metrics = tuple(m for m in metrics if all(m[0] in e for e in q.values()))  # results written before psnr_min
    fig, axes = plt.subplots(len(metrics), len(panels), figsize=(7.5 * len(panels), 5 * len(metrics)), squeeze=False)
    settings = {s["name"]: s for s in result["settings"]}
    # name the peers' points too when there are few enough to stay readable (a short run beside a peer or two)
    name_peers = sum(s["family"] in ("peer", "steps") for s in result["settings"]) <= 8
    for j, (where, sp, xlabel) in enumerate(panels):
        for i, (metric, ylabel) in enumerate(metrics):
            ax = axes[i][j]
            cap = 60.0 if metric.startswith("psnr") else None  # identical images score 100: keep the scale readable
            pts = {n: (v, min(q[n][metric], cap) if cap else q[n][metric]) for n, v in sp.items() if n in q}
            key = f"{where} / {metric}"
            front = result["analysis"][key]["front"] if key in result["analysis"] else []
            fx = [pts[n][0] for n in front]
            fy = [pts[n][1] for n in front]
            ax.step(fx, fy, where="post", color="red", lw=0.8, alpha=0.5, label="Pareto front")
            seen = set()
            for n, (x, y) in pts.items():
                s = settings[n]
                core = s["family"] == "safe-dit" and s["mode"] in ("safe-core", "safe-sw")
                label = s["peer"] or s["family"]
                if core:
                    label = "SAFE-Core / SW"
                kw = dict(marker="*", s=180, color="red", edgecolor="black", zorder=5) if core else \
                    dict(marker="o" if s["family"] == "peer" else ("s" if s["family"] == "steps" else "^"), s=40,
                         color=_color(s), zorder=3)
                ax.scatter([x], [y], label=None if label in seen else label, **kw)
                seen.add(label)
                if core or n in front or s["family"] == "ablation" or n in ("dense", "dense-fp"):
                    ax.annotate(n, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
                elif name_peers and metric == "psnr_vs_dense_fp":
                    ax.annotate(n, (x, y), fontsize=6, xytext=(3, -8), textcoords="offset points", color=_color(s))
            ax.axvline(1.0, color="gray", lw=0.6)
            ax.set_xlabel(xlabel, fontsize=8)
            ax.set_ylabel(ylabel, fontsize=8)
            ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6), fontsize=8)
    env, st = result["environment"], result["settings_common"]
    fig.suptitle("SAFE-DiT vs diffusers cache hooks, cache-dit and step reduction: "
                 f"{st['prompts']} prompts x {st['steps']} steps, "
                 f"same seeds; {env['device']} ({env['processor'][:30]}), torch {env['torch']}, "
                 f"diffusers {env['diffusers']}",
                 fontsize=9)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_ablation(result: dict, path: str) -> None:
    plt = pyplot()
    q = result["quality"]["summary"]
    p2 = result.get("scaled")
    names = [n for n in ("safe-core", "safe-core published", "no-context-forecast", "periodic-anchors",
                         "safe-core quality", "no-fast-path", "no-srsu", "no-car", "uniform-partition",
                         "random-partition", "safe-sw", "safe-sw flat-map") if n in q]
    bars = [("paired PSNR vs dense-fp (dB; identical = 100, drawn at 60)",
             [min(q[n]["psnr_vs_dense_fp"], 60.0) for n in names]),
            ("accuracy (all attributes)", [q[n]["accuracy"] for n in names]),
            ("speedup vs dense, embedded", [q[n]["speedup"] for n in names])]
    if p2:
        bars.append((f"speedup vs dense at {p2['tokens']} tokens",
                     [p2["rows"][n]["speedup"] if n in p2["rows"] and p2["rows"][n]["status"] == "ok" else 0.0
                      for n in names]))
    fig, axes = plt.subplots(1, len(bars), figsize=(4.2 * len(bars), 4.2))
    colors = ["red" if n in ("safe-core", "safe-sw") else "tab:cyan" for n in names]
    for ax, (title, vals) in zip(axes, bars):
        ax.bar(range(len(names)), vals, color=colors)
        ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
        ax.set_title(title, fontsize=9)
        for k, v in enumerate(vals):
            ax.annotate(f"{v:.2f}" if v else "-", (k, v), ha="center", va="bottom", fontsize=6)
        ax.grid(axis="y", alpha=0.3)
    st = result["settings_common"]
    fig.suptitle(f"SAFE-Core ablations (each switches off one part of the defaults; 'safe-core quality' = no step "
                 f"reuse): {st['prompts']} prompts x {st['steps']} steps; 0 = not timed at scale", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
