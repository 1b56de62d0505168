"""``safe-dit pareto``: its options; the work is ``safe_dit.bench.pareto`` (whose docstring is the description)."""

from __future__ import annotations

from safe_dit.bench.choices import PARETO_FAMILIES
from safe_dit.commands.options import add_output_arguments, docstring, runner
from safe_dit.config import SafeDitError

WORK = "safe_dit.bench.pareto"


def description() -> str:
    return docstring(WORK)


def peer_method(name: str) -> str:
    """``--peers`` names, checked against ``safe_dit.bench.peers.PEERS`` when given (its import loads torch, so
    the parser itself and --help do not)."""
    import argparse

    from safe_dit.bench.peers import PEERS

    methods = [f.method for f in PEERS]
    if name not in methods:
        raise argparse.ArgumentTypeError(f"unknown peer {name!r}; choose from {', '.join(methods)}")
    return name


def prepare(args) -> None:
    """--quick's sizes, then the checks that need no model (one-line SafeDitErrors); nothing for --from-json."""
    if args.from_json:
        return
    if args.quick:
        args.single, args.two, args.steps = 1, 1, 6
        args.scaled_tokens = 64 if args.scaled_tokens else 0
        args.scaled_subset = True
    if args.single < 0 or args.two < 0 or args.single + args.two == 0:
        raise SafeDitError("--single and --two must be >= 0 and not both 0")
    if args.steps < 1:
        raise SafeDitError("--steps must be >= 1")
    if args.scaled_tokens < 0:
        raise SafeDitError("--scaled-tokens must be >= 0")
    if args.scaled_repeats < 1:
        raise SafeDitError("--scaled-repeats must be >= 1")
    if args.threads < 0:
        raise SafeDitError("--threads must be >= 0")


def configure_parser(p) -> None:
    p.add_argument("--model", default=None, help="directory of a shapes transformer (None: the embedded one)")
    p.add_argument("--size", type=int, choices=(64, 128), default=None,
                   help="the embedded model trained at this image side: 64 (256 tokens) or 128 (1024 tokens) "
                        "(None: 64)")
    p.add_argument("--single", type=int, default=18, help="one-object prompts (the first of eval's set)")
    p.add_argument("--two", type=int, default=12, help="two-object prompts")
    p.add_argument("--steps", type=int, default=30, help="sampling steps for every setting but step reduction")
    p.add_argument("--guidance", type=float, default=4.0, help="CFG scale")
    p.add_argument("--seed", type=int, default=0, help="draws the prompt set, as eval's --seed")
    p.add_argument("--families", nargs="+", choices=PARETO_FAMILIES, default=list(PARETO_FAMILIES),
                   help="which groups of settings to run (dense and dense-fp always run)")
    p.add_argument("--peers", nargs="+", metavar="METHOD", default=None, type=peer_method,
                   help="with the peer family, only these methods (diffusers hooks, cache-dit), every setting of "
                        "each (None: all of them; an unknown name is refused with the list; cache-dit without the "
                        "peers extra is skipped with one line)")
    p.add_argument("--scaled-tokens", type=int, default=4096,
                   help="image tokens of the latency-only run on a random-weight model (0 = skip)")
    p.add_argument("--scaled-subset", action="store_true",
                   help="time only a subset at scale (dense, dense-fp, safe-core, no-fast-path, one setting per peer, "
                        "steps x0.5) instead of every setting")
    p.add_argument("--scaled-repeats", type=int, default=1,
                   help="timed calls per setting at scale, the median reported (single calls vary 5-20%% on a "
                        "2-core VM)")
    p.add_argument("--scaled-layers", type=int, default=2, help="blocks at scale (FirstBlockCache needs a second)")
    p.add_argument("--scaled-hidden", type=int, default=288, help="width at scale (288 = 4 heads x 72)")
    p.add_argument("--scaled-heads", type=int, default=4, help="attention heads at scale")
    p.add_argument("--scaled-kv-heads", type=int, default=1, help="key/value heads at scale")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (0 = torch's own choice); 1 is steadier on a shared, oversubscribed "
                        "machine")
    p.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-memory calls")
    p.add_argument("--quick", action="store_true", help="CI-sized: 2 prompts, 6 steps, a tiny model at 64 tokens")
    p.add_argument("--ablation-plot", metavar="PATH", help="write the ablation bar chart PNG here")
    p.add_argument("--scaled-from", metavar="PATH",
                   help="reuse the scaled-model timings (random weights) of an earlier --json result instead of "
                        "timing again, e.g. after the embedded model was retrained; the quality part runs anew")
    p.add_argument("--from-json", metavar="PATH", help="redraw table and plots from an earlier --json result (no run)")
    add_output_arguments(p, plot_help="write the Pareto plot PNG here")
    p.set_defaults(func=runner(WORK, prepare=prepare))
