"""Table of benchmarks/hotpath.py results: each version's medians over its runs, and after/before per row."""

from __future__ import annotations

import json
import statistics
import sys

ROWS = ("dense_s", "dense_fp_s", "warmup_s", "anchor_s", "selective_s")


def main(paths: list[str]) -> None:
    runs: dict[str, list[dict]] = {}
    for path in paths:
        with open(path) as f:
            r = json.load(f)
        runs.setdefault("after" if r["label"] == "after" else "before", []).append(r)
    env = runs["after"][0]["environment"]
    print(f"Per forward, seconds (median over {len(runs['after'])} interleaved processes of each version, each the "
          f"median of {runs['after'][0]['repeats']} calls), image tokens {runs['after'][0]['tokens']}, "
          f"{env['processor']}, {env['cpu_count']} cores, torch {env['torch']}, diffusers {env['diffusers']}, "
          "float32.\n")
    print(f"| model | forward | before ({runs['before'][0]['label'][7:]}) | after | after / before |")
    print("|---|---|---|---|---|")
    for model in ("flux", "lumina-next"):
        for row in ROWS:
            b = statistics.median(r[model][row] for r in runs["before"])
            a = statistics.median(r[model][row] for r in runs["after"])
            print(f"| {model} | {row[:-2].replace('_', '-')} | {b:.3f} | {a:.3f} | {a / b:.3f} |")
    for model in ("flux", "lumina-next"):
        ratio = statistics.median(r[model]["dense_over_dense_fp"] for r in runs["after"])
        diff = max(r[model]["dense_fp_max_abs_diff"] for r in runs["after"])
        print(f"\n{model} after: stock dense / dense-fp per forward (same process) {ratio:.3f}x; "
              f"max |dense-fp - dense| {diff:.1e}")


if __name__ == "__main__":
    main(sys.argv[1:])
