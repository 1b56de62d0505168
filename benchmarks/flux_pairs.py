"""FLUX dense-fp vs stock per forward as many alternating pairs (the order flips every pair), the low-noise
form of the hot-path comparison: python3 benchmarks/flux_pairs.py SIDE PAIRS
(e.g. 32 41: 1024 image + 512 text tokens)."""
import json
import statistics
import sys
import time

import torch

from safe_dit import SafeConfig, apply_safe_dit, remove_safe_dit
from safe_dit.testing.kits import build_flux, flux_inputs

side, pairs = int(sys.argv[1]), int(sys.argv[2])
m = build_flux("flux-dev", num_layers=1, num_attention_heads=12)
x = flux_inputs(m, side, side, batch=1, text_len=512)
def f():
    with torch.no_grad():
        m(**x)
f()
apply_safe_dit(m, SafeConfig("dense-fp"))
f()
r = []
for i in range(pairs):
    order = ("dense", "dense-fp") if i % 2 == 0 else ("dense-fp", "dense")  # alternate which goes first
    t = {}
    for mode in order:
        (remove_safe_dit if mode == "dense" else (lambda mm: apply_safe_dit(mm, SafeConfig("dense-fp"))))(m)
        t0 = time.perf_counter()
        f()
        t[mode] = time.perf_counter() - t0
    r.append(t["dense"] / t["dense-fp"])
print(json.dumps({"tokens": side * side, "text_len": 512, "pairs": pairs,
                  "median_dense_over_dense_fp": statistics.median(r),
                  "quartiles": statistics.quantiles(r, n=4), "ratios": r}))
