"""What a run takes from its command line (shared by ``generate``, ``eval`` and ``bench e2e``): the scheduling
fields set (one table, ``SCHEDULE_FLAGS``, from which ``safe_dit.commands.options`` builds the flags with
SafeConfig's defaults), a warning for a schedule with no selective step, and the context-parallel setup under
torchrun. Torch-free at import."""

from __future__ import annotations

from safe_dit.config import SafeConfig, SafeDitError

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


def schedule_kwargs(args) -> dict:
    """The schedule fields the command line set (those left None keep SafeConfig's defaults)."""
    return {f: getattr(args, f) for f, _, _ in SCHEDULE_FLAGS if getattr(args, f, None) is not None}


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


CP_KINDS = ("ulysses", "ring", "ulysses_anything", "ring_anything")
NOT_UNDER_TORCHRUN = ("--context-parallel needs one process per rank with an initialised process group: run the "
                      "command under torchrun, e.g. `torchrun --nproc-per-node 2 -m safe_dit.cli generate ... "
                      "--context-parallel ulysses:2`")


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
