"""Audit every SDPA call of one model forward, stock and with safe-dit, side by side.

For each call to torch.nn.functional.scaled_dot_product_attention: the attention module that
made it, the q/k/v shapes, the mask that reached SDPA (kind, shape, whether it is a broadcast
view), what safe-dit decided and why (elided by provenance, kept as semantic, rewritten
exactly), and the SDPA kernel that ran (from the PyTorch profiler).

The model is a small randomly initialised transformer of one backbone ({labels}), built from
a config (no download), with a CFG-like batch of 2 whose captions have different padded lengths
(default: {default}). A closing line says where the backbone's masks come from (some pass none
to SDPA in the stock model: then there is nothing to elide and dense-fp equals dense).
--zoo runs the mask census over every image and video transformer class of the installed diffusers
instead.
"""

from __future__ import annotations

import json
import sys

from safe_dit.config import SafeDitError
from safe_dit.testing import catalog


def description() -> str:
    return __doc__.format(labels=catalog.labels(), default=catalog.kit_names()[0])


def configure_parser(p) -> None:
    kits = catalog.declared_kits()
    p.add_argument("--model", default=kits[0].name, choices=[k.name for k in kits],
                   help="backbone to audit, a small random model built from its kit's config")
    p.add_argument("--preset", default="tiny",
                   help="model size: tiny, or the backbone's real attention shape ("
                        + ", ".join(f"{k.name}: {k.real_preset}" for k in kits) + ")")
    p.add_argument("--layers", type=int, default=2, help="number of transformer blocks")
    p.add_argument("--height-tokens", type=int, default=8, help="image token rows")
    p.add_argument("--width-tokens", type=int, default=8, help="image token columns")
    p.add_argument("--batch", type=int, default=2, help="batch size; 2 is the CFG batch")
    p.add_argument("--text-len", type=int, default=8, help="caption tokens incl. padding")
    p.add_argument("--valid-lens", type=int, nargs="+", default=None,
                   help="valid caption tokens per sample (None: text-len, then text-len-3, ...)")
    p.add_argument("--mode", default="dense-fp", choices=["dense-fp"], help="safe-dit mode to compare")
    p.add_argument("--no-rewrite-padding", action="store_true",
                   help="keep caption padding masks instead of rewriting them exactly")
    p.add_argument("--json", metavar="PATH", help="also write the report as JSON")
    p.add_argument("--zoo", action="store_true",
                   help="the mask census instead: every image and video transformer class of the installed diffusers "
                        "with a tiny offline recipe (the others listed with the reason), batch 1 / 2 / CFG batch with "
                        "different caption lengths; which masks reach SDPA and their estimated tax (with --json, "
                        "--plot, --table)")
    p.add_argument("--plot", metavar="PATH", help="--zoo: write the census plot (PNG) here")
    p.add_argument("--table", metavar="PATH", help="--zoo: write the census table (Markdown) here")
    p.add_argument("--results", default="benchmarks/results", metavar="DIR",
                   help="--zoo: where the midt-{gpu,cpu}.json the tax estimate uses are")
    p.set_defaults(func=run)


def run_zoo(args) -> int:
    from safe_dit.inspection.census import format_census, plot_census, run_census

    result = run_census(args.results, progress=lambda name: print(f"census: {name}", file=sys.stderr))
    table = format_census(result)
    print(table)
    if args.table:
        with open(args.table, "w") as f:
            f.write(table + "\n")
    if args.plot:
        plot_census(result, args.plot)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    sys.stdout.write(json.dumps(result["summary"]) + "\n")
    return 0


def run(args) -> int:
    if args.zoo:
        return run_zoo(args)
    for name in ("layers", "height_tokens", "width_tokens", "batch", "text_len"):
        if getattr(args, name) < 1:
            raise SafeDitError(f"--{name.replace('_', '-')} must be >= 1")
    valid = args.valid_lens or [max(1, args.text_len - 3 * i) for i in range(args.batch)]
    if len(valid) != args.batch or any(not 1 <= v <= args.text_len for v in valid):
        raise SafeDitError(f"--valid-lens needs {args.batch} values in [1, {args.text_len}]")
    from safe_dit.config import SafeConfig
    from safe_dit.inspection.audit import audit, format_table
    from safe_dit.testing.kits import kit_for

    kit = kit_for(args.model)
    try:
        model = kit.build(args.preset, num_layers=args.layers)
    except ValueError as e:
        raise SafeDitError(str(e)) from None
    inputs = kit.inputs(model, args.height_tokens, args.width_tokens, batch=args.batch,
                        text_len=args.text_len, valid_lens=valid)
    report = audit(model, inputs, SafeConfig(args.mode, rewrite_padding=not args.no_rewrite_padding))
    report["settings"] = {k: v for k, v in vars(args).items() if k != "func"} | {"valid_lens": valid}
    print(format_table(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    sys.stdout.write(json.dumps(report["summary"]) + "\n")
    return 0
