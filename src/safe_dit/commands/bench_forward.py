"""``safe-dit bench forward``: its options; the work is ``safe_dit.bench.forward`` (its docstring: the
description)."""

from __future__ import annotations

from safe_dit.commands.options import DTYPE_NAMES, add_output_arguments, docstring, runner
from safe_dit.config import SafeDitError

WORK = "safe_dit.bench.forward"


def description() -> str:
    return docstring(WORK)


def prepare(args) -> None:
    """--quick's sizes, then the checks that need no torch (one-line SafeDitErrors)."""
    if args.quick:
        args.tokens, args.preset, args.layers, args.repeats = [64, 256], "tiny", 2, 3
    if any(t < 1 for t in args.tokens) or args.layers < 1 or args.batch < 1 or args.repeats < 1 or args.warmup < 0:
        raise SafeDitError("--tokens, --layers, --batch and --repeats must be >= 1, --warmup >= 0")


def configure_parser(p) -> None:
    p.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096, 9216],
                   help="image token counts (grid ~sqrt x sqrt)")
    p.add_argument("--preset", default="lumina-next-2b", help="Lumina-Next model preset: lumina-next-2b or tiny")
    p.add_argument("--layers", type=int, default=2, help="transformer blocks (the real model: 24)")
    p.add_argument("--batch", type=int, default=1, help="batch size (2 = the CFG batch)")
    p.add_argument("--dtype", default="float32", choices=DTYPE_NAMES, help="weights and activations")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (None: cuda when available, else cpu)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per case, the median reported")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls first")
    p.add_argument("--quick", action="store_true", help="CI-sized run: tiny model, 64 and 256 tokens")
    add_output_arguments(p)
    p.set_defaults(func=runner(WORK, prepare=prepare))
