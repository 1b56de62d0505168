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
    ("context_forecast", int,
     "0: sensitive rows attend to the anchor's context K/V; 1/2: its linear/quadratic forecast"),
    ("reuse_every", int, "every n-th step after an anchor skips the model and forecasts its output (0: never)"),
    ("reuse_order", int, "a reuse step's forecast: 0 the last output, 1 the line through the last two"),
)


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


def selective_free(config: SafeConfig, steps: int) -> str | None:
    """For a scheduled mode whose ``steps``-step schedule has no selective (or reuse) step, the one line saying so
    (every step then computes every token: the mode costs what dense-fp does); None otherwise."""
    from safe_dit.engine.schedule import REUSE, SELECTIVE, StepPlan

    if not config.scheduled or steps < 1:
        return None
    def sparse(n):
        kinds = StepPlan.of(config, n).kinds()
        return SELECTIVE in kinds or REUSE in kinds

    if sparse(steps):
        return None
    fewest = next((n for n in range(steps + 1, steps + 1000) if sparse(n)), None)
    advice = f"; this schedule has one from --steps {fewest}" if fewest else ""
    return (f"{config.mode} with {steps} step{'s' if steps != 1 else ''} has no selective step (the schedule: "
            f"{', '.join(StepPlan.of(config, steps).kinds())}): every step computes every token, as dense-fp "
            f"does{advice}")


def runner(module: str, name: str = "run"):
    """A command body that imports ``module`` (torch, diffusers, ...) only when the command runs."""

    def run(args):
        import importlib

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


def schedule_kwargs(args) -> dict:
    """The schedule fields the command line set (those left None keep SafeConfig's defaults)."""
    return {f: getattr(args, f) for f, _, _ in SCHEDULE_FLAGS if getattr(args, f, None) is not None}


CP_KINDS = ("ulysses", "ring", "ulysses_anything", "ring_anything")
NOT_UNDER_TORCHRUN = ("--context-parallel needs one process per rank with an initialised process group: run the "
                      "command under torchrun, e.g. `torchrun --nproc-per-node 2 -m safe_dit.cli generate ... "
                      "--context-parallel ulysses:2`")


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
