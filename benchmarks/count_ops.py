"""ATen operations per transformer forward, stock vs dense-fp (deterministic: no timing noise).

Counts every ATen call that one forward dispatches (TorchDispatchMode), for the FLUX and Lumina-Next tiny
configurations of benchmarks/hotpath.py at a small grid, and prints the counts by operator where they differ.

    python3 benchmarks/count_ops.py --json benchmarks/results/aten-ops-cpu.json
"""

from __future__ import annotations

import argparse
import collections
import json

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from safe_dit import SafeConfig, apply_safe_dit, remove_safe_dit
from safe_dit.inspection.environment import environment
from safe_dit.testing.kits import build_flux, build_lumina_next, flux_inputs, lumina_inputs


class Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def count(model, inputs) -> collections.Counter:
    with torch.no_grad(), Count() as c:
        model(**inputs)
    return c.ops


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json")
    args = p.parse_args()
    flux = build_flux("flux-dev", num_layers=1, num_attention_heads=12)
    lumina = build_lumina_next("lumina-next-2b", num_layers=1)
    cases = {"flux": (flux, flux_inputs(flux, 8, 8, batch=1, text_len=16)),
             "lumina-next": (lumina, lumina_inputs(lumina, 8, 8, batch=2, text_len=8))}
    result = {"environment": environment("cpu")}
    for name, (model, inputs) in cases.items():
        stock = count(model, inputs)
        apply_safe_dit(model, SafeConfig("dense-fp"))
        fp = count(model, inputs)
        remove_safe_dit(model)
        diff = {op: [stock[op], fp[op]] for op in sorted(set(stock) | set(fp)) if stock[op] != fp[op]}
        result[name] = {"dense": sum(stock.values()), "dense_fp": sum(fp.values()), "differing_ops": diff}
        print(f"{name}: ATen ops per forward, stock {sum(stock.values())}, dense-fp {sum(fp.values())}; "
              f"differing (stock, dense-fp): {diff}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
