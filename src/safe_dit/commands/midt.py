"""``safe-dit midt``: its options; the work is ``safe_dit.bench.midt`` (whose docstring is the description)."""

from __future__ import annotations

from safe_dit.bench.choices import MIDT_MASKS
from safe_dit.commands.options import DTYPE_NAMES, add_output_arguments, docstring, runner
from safe_dit.config import SafeDitError

WORK = "safe_dit.bench.midt"


def description() -> str:
    return docstring(WORK)


def prepare(args) -> None:
    """--quick's sizes (a CPU sweep), then the checks that need no torch (one-line SafeDitErrors)."""
    if args.quick:
        args.seq_lens, args.head_dims, args.dtypes, args.repeats = [256, 512, 1024], [64, 72], ["float32"], 3
        args.devices = [d for d in args.devices or ["cpu"] if d == "cpu"] or args.devices
    if any(n < 1 for n in args.seq_lens) or any(h < 1 for h in args.head_dims):
        raise SafeDitError("--seq-lens and --head-dims must be >= 1")
    if args.batch < 1 or args.repeats < 1 or args.warmup < 0 or (args.heads is not None and args.heads < 1):
        raise SafeDitError("--batch, --heads and --repeats must be >= 1, --warmup >= 0")


def configure_parser(p) -> None:
    p.add_argument("--seq-lens", type=int, nargs="+", default=[1024, 2048, 4096, 8192], help="sequence lengths N")
    p.add_argument("--head-dims", type=int, nargs="+", default=[64, 72, 80, 128], help="head dims (Lumina-Next: 72)")
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=DTYPE_NAMES,
                   help="float16 only on CUDA")
    p.add_argument("--devices", nargs="+", default=None, choices=["cpu", "cuda"],
                   help="where to measure (None: cpu, and cuda when available)")
    p.add_argument("--heads", type=int, default=None, help="attention heads (None: 2 on CPU, 24 on CUDA)")
    p.add_argument("--batch", type=int, default=1, help="batch size")
    p.add_argument("--masks", nargs="+", default=list(MIDT_MASKS), choices=MIDT_MASKS, help="the mask kinds to time")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per case, the median reported")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls first")
    p.add_argument("--quick", action="store_true", help="a small sweep for a first look (< 1 minute on 2 CPU cores)")
    add_output_arguments(p, "write a PNG of tax vs sequence length here")
    p.set_defaults(func=runner(WORK, prepare=prepare))
