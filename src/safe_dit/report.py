"""What every benchmark command shares: dtype names, output options, and how results are emitted
(table for people, PNG, JSON file, and the same JSON object as the last stdout line)."""

from __future__ import annotations

import json
import sys
from typing import Callable

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_output_arguments(p, plot_help: str = "write a PNG plot here") -> None:
    p.add_argument("--json", metavar="PATH", help="write the result JSON here")
    p.add_argument("--plot", metavar="PATH", help=plot_help)
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


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
