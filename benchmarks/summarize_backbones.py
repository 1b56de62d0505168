"""One picture of where each backbone's end-to-end gain comes from, read from `bench e2e` JSON files.

    python benchmarks/summarize_backbones.py benchmarks/results/e2e-cpu-*.json --plot backbones-cpu.png

For every file and token count it takes the three ratios `bench e2e` measured side by side in that
run (fast path = dense / dense-fp, scheduling = dense-fp / safe-core, total = dense / safe-core),
prints a Markdown table and draws grouped bars, one group per backbone and token count. Nothing is
re-measured or combined across runs; files from different machines are labelled by their processor
(by the GPU's name for CUDA runs); each bar group names its transformer blocks.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from safe_dit.bench.e2e import GAINS
from safe_dit.bench.report import pyplot


def _short(processor: str | None) -> str:
    """'Intel(R) Xeon(R) Processor' -> 'Intel Xeon', 'AMD EPYC 7B13' -> 'AMD EPYC'."""
    words = (processor or "unknown").replace("(R)", "").replace("(TM)", "").split()
    return " ".join(words[:2])


def _blocks(row: dict) -> str:
    """'24 blk'; FLUX's --layers counts double and single blocks alike: '4+4 blk'; the depth as built where the file
    records it ('19+38 blk')."""
    built = row.get("blocks") or {}
    if "num_layers" in built:
        single = built.get("num_single_layers")
        return f"{built['num_layers']}+{single} blk" if single is not None else f"{built['num_layers']} blk"
    n = row.get("layers")
    return "? blk" if n is None else f"{n}+{n} blk" if row["backbone"] == "FLUX" else f"{n} blk"


def rows_of(path: str) -> list[dict]:
    result = json.loads(Path(path).read_text())
    if result.get("benchmark") != "e2e":
        raise SystemExit(f"{path}: not a `safe-dit bench e2e` result")
    settings = result["settings"]
    label = settings.get("model_label") or "Lumina-Next"
    env = result["environment"]
    out = []
    for s in result["summary"]:
        if "tokens" not in s or s.get("total_gain") is None:
            continue
        out.append({"backbone": label, "tokens": s["tokens"], "steps": settings["steps"],
                    "repeats": settings["repeats"], "width": settings.get("hidden_size"),
                    "heads": settings.get("heads"), "layers": settings.get("layers"),
                    "blocks": settings.get("blocks"),
                    "processor": env.get("gpu") or env.get("processor"),  # the GPU's name for CUDA runs
                    "device": env.get("device"), "file": Path(path).name,
                    **{k: s[k] for k, _ in GAINS}})
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="+", help="bench e2e --json outputs")
    p.add_argument("--plot", metavar="PATH", help="write the grouped bar chart PNG here")
    args = p.parse_args(argv)
    rows = sorted((r for f in args.files for r in rows_of(f)), key=lambda r: (r["backbone"], r["tokens"]))
    if not rows:
        raise SystemExit("no timed token counts in these files")
    print("| backbone | tokens | steps | repeats | fast path | scheduling | total | machine | file |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['backbone']} | {r['tokens']} | {r['steps']} | {r['repeats']} | {r['fast_path_gain']:.2f}x"
              f" | {r['scheduling_gain']:.2f}x | {r['total_gain']:.2f}x | {r['device']}, {r['processor']}"
              f" | {r['file']} |")
    if args.plot:
        plt = pyplot()
        fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(rows)), 4.3))
        width = 0.27
        for i, (key, name) in enumerate(GAINS):
            xs = [j + (i - 1) * width for j in range(len(rows))]
            bars = ax.bar(xs, [r[key] for r in rows], width, label=name)
            ax.bar_label(bars, fmt="%.2f", fontsize=7)
        ax.axhline(1.0, color="gray", lw=0.8)
        several = len({r["processor"] for r in rows}) > 1  # then each bar group says where it ran
        ax.set_xticks(range(len(rows)), [f"{r['backbone']}\n{r['tokens']} tok\n{_blocks(r)}"
                                         + (f"\n{_short(r['processor'])}" if several else "") for r in rows])
        ax.set_ylabel("median end-to-end latency ratio")
        machines = sorted({f"{r['device']} ({r['processor']})" for r in rows})
        ax.set_title("safe-dit bench e2e: " + "; ".join(machines), fontsize=9)
        ax.legend(fontsize=8, loc="upper left")
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
