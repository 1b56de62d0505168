"""What every benchmark command shares: dtypes, and how results are emitted (table for people, PNG, JSON file,
and the same JSON object as the last stdout line; the output options are ``commands.options.add_output_arguments``)."""

from __future__ import annotations

import json
import sys
from typing import Callable

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def emit(result: dict, table: str, args, plot: Callable[[dict, str], None]) -> int:
    print(table)
    if args.plot:
        plot(result, args.plot)
    if args.json:
        with open(args.json, "w") as f:
            f.write(json.dumps(result, indent=1) + "\n")
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (no display on these machines)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def is_oom(err: BaseException) -> bool:
    text = str(err).lower()
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in text or "can't allocate memory" in text


def memory_axis(ax, rows: list[dict], modes, title: str) -> None:
    """Peak memory vs image tokens, one line per mode, OOM rows marked."""
    for mode in modes:
        pts = [(r["tokens"], r["peak_memory_mb"]) for r in rows if r["mode"] == mode and r["peak_memory_mb"]]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=mode)
        for r in rows:
            if r["mode"] == mode and r["status"] == "oom":
                ax.axvline(r["tokens"], color="red", lw=0.6, ls=":")
                ax.annotate(f"{mode}: OOM", (r["tokens"], 0.5), xycoords=("data", "axes fraction"), fontsize=7,
                            rotation=90)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("image tokens")
    ax.set_ylabel("peak memory (MiB)")
    ax.set_title(title)
    ax.legend(fontsize=8)


def save_figure(plt, fig, result: dict, path: str, what: str) -> None:
    """Title names the model shape, dtype, device and torch version; then PNG at 120 dpi."""
    env, st = result["environment"], result["settings"]
    fig.suptitle(f"{st.get('model_label', 'Lumina-Next')} "
                 f"{st['hidden_size']}w/{st['layers']}L/{st['heads']}h×{st['head_dim']}, {what}{st['dtype']}, "
                 f"{env['device']} ({env.get('gpu') or env['processor'][:40]}), torch {env['torch']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
