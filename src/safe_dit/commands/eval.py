"""``safe-dit eval``: its options; the work is ``safe_dit.bench.quality`` (whose docstring is the description)."""

from __future__ import annotations

from safe_dit.commands.options import (
    add_guidance_weights,
    add_output_arguments,
    add_schedule_arguments,
    docstring,
    runner,
)
from safe_dit.config import MODES, SafeDitError

WORK = "safe_dit.bench.quality"


def description() -> str:
    return docstring(WORK)


def prepare(args) -> None:
    """--quick's sizes, then the checks that need no model (one-line SafeDitErrors)."""
    if args.quick:
        args.single, args.two, args.steps = 4, 2, 12
    if args.single < 0 or args.two < 0 or args.single + args.two == 0:
        raise SafeDitError("--single and --two must be >= 0 and not both 0")
    if args.steps < 1:
        raise SafeDitError("--steps must be >= 1")


def configure_parser(p) -> None:
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES,
                   help="the modes to compare (dense-fp, the paired metrics' reference, always runs)")
    p.add_argument("--model", default=None, help="directory of a shapes transformer (None: the embedded one)")
    p.add_argument("--size", type=int, choices=(64, 128), default=None,
                   help="the embedded model trained at this image side: 64 (256 tokens) or 128 (1024 tokens) "
                        "(None: 64)")
    p.add_argument("--single", type=int, default=54, help="one-object prompts")
    p.add_argument("--two", type=int, default=30, help="two-object prompts")
    p.add_argument("--steps", type=int, default=30, help="sampling steps per image")
    p.add_argument("--guidance", type=float, default=4.0, help="CFG scale")
    p.add_argument("--seed", type=int, default=0,
                   help="draws the prompt set and seeds prompt i with seed + i; another seed gives a held-out set")
    add_schedule_arguments(p)
    add_guidance_weights(p)
    p.add_argument("--quick", action="store_true", help="6 prompts, 12 steps (CI-sized)")
    p.add_argument("--grid", metavar="PATH", help="write the prompts x modes image grid PNG here")
    add_output_arguments(p, plot_help="same as --grid")
    p.set_defaults(func=runner(WORK, prepare=prepare))
