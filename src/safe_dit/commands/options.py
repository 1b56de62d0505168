"""The options several commands share: the scheduling flags of ``generate``, ``eval`` and ``bench e2e`` (one
table, so every command offers the same knobs with the same help and SafeConfig's defaults), the output
options of the benchmarks, dtype names and context parallelism. Torch-free: parsers build in milliseconds."""

from __future__ import annotations

from safe_dit.config import SafeConfig, SafeDitError

DTYPE_NAMES = ("bfloat16", "float16", "float32")  # safe_dit.bench.report.DTYPES maps them to torch dtypes


def add_output_arguments(p, plot_help: str = "write a PNG plot here") -> None:
    """``--json``, ``--plot``, ``--no-progress`` of the benchmarks (``safe_dit.bench.report.emit`` writes them)."""
    p.add_argument("--json", metavar="PATH", help="write the result JSON here")
    p.add_argument("--plot", metavar="PATH", help=plot_help)
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")

#: (SafeConfig field, type, help)
SCHEDULE_FLAGS = (
    ("keep_ratio", float, "fraction of image tokens recomputed at selective steps"),
    ("warmup_steps", int, "leading dense steps whose image->text attention builds the partition"),
    ("anchor_interval", int, "steps from the last warm-up step to the first dense anchor (the gap between anchors)"),
    ("anchor_growth", float, "the gap between anchors grows by this after each anchor (0: periodic)"),
    ("tail_dense_steps", int, "dense steps at the end, before the final selective steps"),
    ("final_selective_steps", int, "the last steps update only the sensitive rows, after the dense tail"),
    ("context_forecast", int, "0: sensitive rows attend to the anchor's context K/V; 1/2: its linear/quadratic forecast"),
    ("reuse_every", int, "every n-th step after an anchor skips the model and forecasts its output (0: never)"),
    ("reuse_order", int, "a reuse step's forecast: 0 the last output, 1 the line through the last two"),
)


def add_schedule_arguments(parser, with_defaults: bool = True) -> None:
    """``--keep-ratio`` ... ``--reuse-order``; defaults SafeConfig's (or None: the mode's own)."""
    import argparse

    d = SafeConfig("safe-core")
    shows_defaults = issubclass(parser.formatter_class, argparse.ArgumentDefaultsHelpFormatter) and with_defaults
    for field, kind, text in SCHEDULE_FLAGS:
        default = getattr(d, field)
        parser.add_argument("--" + field.replace("_", "-"), type=kind, default=default if with_defaults else None,
                            help=text if shows_defaults else f"{text} (default {default})")


def schedule_kwargs(args) -> dict:
    """The schedule fields the command line set (those left None keep SafeConfig's defaults)."""
    return {f: getattr(args, f) for f, _, _ in SCHEDULE_FLAGS if getattr(args, f, None) is not None}


CP_KINDS = ("ulysses", "ring", "ulysses_anything", "ring_anything")
NOT_UNDER_TORCHRUN = ("--context-parallel needs one process per rank with an initialised process group: run the command "
                      "under torchrun, e.g. `torchrun --nproc-per-node 2 -m safe_dit.cli generate ... --context-parallel "
                      "ulysses:2`")


def add_parallel_argument(parser) -> None:
    """``--context-parallel MODE:DEGREE`` (generate, bench e2e)."""
    parser.add_argument("--context-parallel", default=None, metavar="MODE:DEGREE",
                        help=f"split the image (and joint text) tokens over torchrun's processes with diffusers' "
                             f"context parallelism: {', '.join(k + ':2' for k in CP_KINDS)}; run under torchrun "
                             "--nproc-per-node DEGREE; progress bars and files come from rank 0 only")


def parse_context_parallel(spec: str):
    """``ulysses:2`` -> diffusers' ContextParallelConfig (a one-line SafeDitError for anything else)."""
    from diffusers.models._modeling_parallel import ContextParallelConfig

    kind, _, degree = spec.partition(":")
    if kind not in CP_KINDS or not degree.isdigit() or int(degree) < 2:
        raise SafeDitError(f"--context-parallel {spec!r}: use MODE:DEGREE with MODE one of {', '.join(CP_KINDS)} and "
                           "DEGREE >= 2, e.g. ulysses:2")
    ring = kind.startswith("ring")
    return ContextParallelConfig(ring_degree=int(degree) if ring else 1, ulysses_degree=1 if ring else int(degree),
                                 ulysses_anything=kind == "ulysses_anything", ring_anything=kind == "ring_anything")


def context_parallel_setup(args) -> tuple[object | None, int]:
    """(ContextParallelConfig or None, this process's rank) for ``--context-parallel``: joins torchrun's process
    group (gloo on the CPU, NCCL on CUDA) and moves ``args.device`` to this rank's GPU. Without torchrun (or an
    initialised group), refused before any model is loaded."""
    import os

    import torch
    import torch.distributed as dist

    spec = getattr(args, "context_parallel", None)
    if spec is None:
        return None, 0
    cp = parse_context_parallel(spec)
    if not dist.is_initialized():
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            raise SafeDitError(NOT_UNDER_TORCHRUN)
        cuda = torch.device(args.device).type == "cuda"
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if cuda else "gloo")
    world = dist.get_world_size()
    if cp.ring_degree * cp.ulysses_degree != world:
        raise SafeDitError(f"--context-parallel {spec} needs {cp.ring_degree * cp.ulysses_degree} processes, torchrun "
                           f"started {world}")
    if torch.device(args.device).type == "cuda":
        args.device = f"cuda:{torch.cuda.current_device()}"
    return cp, dist.get_rank()
