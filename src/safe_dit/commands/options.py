"""The options several commands share: the scheduling flags of ``generate``, ``eval`` and ``bench e2e`` (from
one table, ``safe_dit.bench.runs.SCHEDULE_FLAGS``, so every command offers the same knobs with the same help and
SafeConfig's defaults), safe-sw's guidance weights, the output options of the benchmarks, dtype names and
``--context-parallel``; and how a command's description and body are found without importing its work.
Torch-free: parsers build in milliseconds."""

from __future__ import annotations

from safe_dit.bench.runs import CP_KINDS, SCHEDULE_FLAGS
from safe_dit.config import SafeConfig

DTYPE_NAMES = ("bfloat16", "float16", "float32")  # safe_dit.bench.report.DTYPES maps them to torch dtypes


def add_output_arguments(p, plot_help: str = "write a PNG plot here") -> None:
    """``--json``, ``--plot``, ``--no-progress`` of the benchmarks (``safe_dit.bench.report.emit`` writes them)."""
    p.add_argument("--json", metavar="PATH", help="write the result JSON here")
    p.add_argument("--plot", metavar="PATH", help=plot_help)
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def add_schedule_arguments(parser) -> None:
    """``--keep-ratio`` ... ``--reuse-order``, SafeConfig's defaults (the same for every mode)."""
    d = SafeConfig("safe-core")
    for field, kind, text in SCHEDULE_FLAGS:
        parser.add_argument("--" + field.replace("_", "-"), type=kind, default=getattr(d, field), help=text)


def add_guidance_weights(parser) -> None:
    """``--cfg-context`` and ``--cfg-sensitive``: safe-sw's guidance scales, SafeConfig's defaults."""
    d = SafeConfig("safe-sw")
    parser.add_argument("--cfg-context", type=float, default=d.cfg_context,
                        help="safe-sw: the guidance scale on context (insensitive) tokens")
    parser.add_argument("--cfg-sensitive", type=float, default=d.cfg_sensitive,
                        help="safe-sw: the guidance scale on sensitive tokens")


def runner(module: str, name: str = "run", prepare=None):
    """A command body that imports ``module`` (torch, diffusers, ...) only when the command runs; ``prepare(args)``
    first (--quick's sizes, the checks that need no torch), so a bad argument is refused before that import."""

    def run(args):
        import importlib

        if prepare is not None:
            prepare(args)
        return getattr(importlib.import_module(module), name)(args)

    run.__qualname__ = f"{module}.{name}"
    return run


def docstring(module: str) -> str:
    """``module``'s docstring read from its source without importing it (a command's --help description)."""
    import ast
    import importlib.util

    spec = importlib.util.find_spec(module)
    with open(spec.origin, encoding="utf-8") as f:
        return ast.get_docstring(ast.parse(f.read()), clean=False) or ""


def add_parallel_argument(parser) -> None:
    """``--context-parallel MODE:DEGREE`` (generate, bench e2e)."""
    parser.add_argument("--context-parallel", default=None, metavar="MODE:DEGREE",
                        help=f"split the image (and joint text) tokens over torchrun's processes with diffusers' "
                             f"context parallelism: {', '.join(k + ':2' for k in CP_KINDS)}; run under torchrun "
                             "--nproc-per-node DEGREE; progress bars and files come from rank 0 only")
