"""``safe-dit bench e2e``: its options; the work is ``safe_dit.bench.e2e`` (its docstring: the description)."""

from __future__ import annotations

from safe_dit.bench.choices import E2E_PROMPT_VALID
from safe_dit.commands.options import (
    DTYPE_NAMES,
    add_output_arguments,
    add_parallel_argument,
    add_schedule_arguments,
    docstring,
    runner,
)
from safe_dit.config import MODES, SafeDitError
from safe_dit.testing import catalog

WORK = "safe_dit.bench.e2e"


def description() -> str:
    return docstring(WORK)


def prepare(args) -> None:
    """--quick's sizes, then the checks that need no model (one-line SafeDitErrors)."""
    if args.quick:
        args.tokens, args.preset, args.layers, args.steps, args.repeats = [64, 256], "tiny", 2, 6, 1
        args.frames = 1
        args.hidden_size = args.heads = None
    if args.steps < 1 or args.layers < 1 or args.repeats < 1 or any(t < 1 for t in args.tokens) \
            or (args.frames is not None and args.frames < 1):
        raise SafeDitError("--steps, --layers, --repeats, --frames and --tokens must be >= 1")


def configure_parser(p) -> None:
    kits = catalog.declared_kits()
    p.add_argument("--tokens", type=int, nargs="+", default=[4096, 9216, 16384],
                   help="image token counts, square grids (4096 = 1024², 9216 = 1536², 16384 = 2048²)")
    p.add_argument("--model", default=kits[0].name, choices=[k.name for k in kits],
                   help="backbone, run through its kit's diffusers pipeline")
    p.add_argument("--preset", default=None,
                   help="transformer preset, or tiny (None: the backbone's real attention shape: "
                        + ", ".join(f"{k.name} {k.real_preset}" for k in kits) + ")")
    p.add_argument("--layers", type=int, default=1,
                   help="transformer blocks (of each stack, where a backbone has double and single blocks)")
    p.add_argument("--hidden-size", type=int, default=None,
                   help="width, with --heads and --kv-heads, where the backbone takes it (None: the preset's)")
    p.add_argument("--heads", type=int, default=None,
                   help="attention heads (with --hidden-size; otherwise width = heads x the preset's head dim) "
                        "(None: the preset's)")
    p.add_argument("--kv-heads", type=int, default=None, help="KV heads, with --hidden-size (None: the preset's)")
    p.add_argument("--prompts", type=int, default=1, choices=(1, 2),
                   help="prompts per pipeline call: 2 batches a second prompt with another caption length "
                        f"({E2E_PROMPT_VALID[0]} and {E2E_PROMPT_VALID[1]} valid tokens), where backbones that mask "
                        "joint attention by caption length show it")
    p.add_argument("--frames", type=int, default=None,
                   help="video backbones: latent frames per call; --tokens counts frames x side x side (None: the "
                        "kit's, e.g. 16 for wan, so 16384 = 16 x 32 x 32; --quick: 1)")
    p.add_argument("--steps", type=int, default=20, help="sampling steps")
    p.add_argument("--guidance", type=float, default=4.0, help="CFG scale; safe-sw uses guidance±1")
    add_schedule_arguments(p)
    p.add_argument("--dtype", default="float32", choices=DTYPE_NAMES, help="weights and activations")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (None: cuda when available, else cpu)")
    p.add_argument("--repeats", type=int, default=2, help="timed calls per mode, the median reported")
    p.add_argument("--modes", nargs="+", choices=MODES, default=None,
                   help="a subset of the modes (None: all the backbone has); the ratios need dense, dense-fp "
                        "and safe-core, so those three are always run")
    p.add_argument("--time-up-to", type=int, default=9216, metavar="TOKENS",
                   help="larger token counts are only probed (runs or OOM, peak memory), not timed")
    p.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-memory call")
    p.add_argument("--kernels", action="store_true",
                   help="record the attention kernels one sampling step of dense and dense-fp ran (profiler)")
    p.add_argument("--quick", action="store_true", help="CI-sized: tiny model, 64 and 256 tokens, 6 steps")
    add_output_arguments(p)
    add_parallel_argument(p)
    p.set_defaults(func=runner(WORK, prepare=prepare))
