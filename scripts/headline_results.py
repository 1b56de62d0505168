"""Print the README's headline-results table from the committed end-to-end result files.

Every number comes from ``benchmarks/results/e2e-*.json``: the gains from each file's ``summary``, the machine
and the torch/diffusers versions from its ``environment``, the safe-core defaults from the recorded config
(named by the package version that made them the defaults, see CHANGELOG.md), and the date from git: the
author date of the oldest commit of the file whose measured rows equal the committed ones (edits to prose fields
do not move it; a rebase keeps it).
``tests/docs/test_readme_links.py`` checks that README.md holds exactly this table.

    python3 scripts/headline_results.py        # the Markdown table
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

# safe-core defaults by version: the fields whose values tell the versions apart (CHANGELOG.md)
DEFAULTS = (
    ("0.5", {"keep_ratio": 0.2, "anchor_growth": 1.0, "tail_dense_steps": 1, "final_selective_steps": 1}),
    ("0.4", {"keep_ratio": 0.15, "anchor_growth": 2.0, "final_selective_steps": 1}),
    ("0.3", {"keep_ratio": 0.2, "anchor_growth": 2.0, "final_selective_steps": 1}),
    ("0.2", {"keep_ratio": 0.2, "anchor_growth": 1.0, "tail_dense_steps": 2}),
    ("0.1", {"keep_ratio": 0.25, "anchor_interval": 5}),
)


def defaults_version(config: dict) -> str:
    for version, values in DEFAULTS:
        if all(config.get(k, None if k != "anchor_growth" else 0.0) == v for k, v in values.items()):
            return version
    return "custom"


def measured_on(path: Path) -> str:
    """The date of the oldest commit whose ``rows`` equal the file's current ones (YYYY-MM-DD), or '?'."""
    rel = path.relative_to(ROOT).as_posix()
    try:
        shallow = subprocess.run(["git", "rev-parse", "--is-shallow-repository"], cwd=ROOT, capture_output=True,
                                 text=True, check=True).stdout.strip()
        log = subprocess.run(["git", "log", "--format=%H %as", "--", rel], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout.split("\n")
    except (OSError, subprocess.CalledProcessError):
        return "?"
    if shallow == "true":
        return "?"  # a shallow clone lacks the commits that measured the file
    rows, date = json.loads(path.read_text())["rows"], "?"
    for line in filter(None, log):
        commit, day = line.split()
        shown = subprocess.run(["git", "show", f"{commit}:{rel}"], cwd=ROOT, capture_output=True, text=True)
        if shown.returncode != 0 or json.loads(shown.stdout).get("rows") != rows:
            break
        date = day
    return date


def _machine(env: dict) -> str:
    if env.get("gpu"):
        return env["gpu"]
    cpu = "AMD EPYC" if "EPYC" in env.get("processor", "") else "Intel Xeon" if "Xeon" in env.get("processor", "") \
        else env.get("processor", "CPU")
    return f"{cpu}, {env.get('cpu_count')} cores"


def rows() -> list[dict]:
    out = {}
    for path in sorted(RESULTS.glob("e2e-*.json")):
        data = json.loads(path.read_text())
        gains = [s for s in data.get("summary", []) if "total_gain" in s]
        if not gains:
            continue  # a memory probe: no timed ratio
        env, settings = data["environment"], data["settings"]
        layers = settings["layers"]
        key = (settings["model_label"], _machine(env))
        row = out.setdefault(key, {"backbone": key[0], "machine": key[1], "gpu": bool(env.get("gpu")), "cells": [],
                                   "versions": set(), "defaults": set(), "dates": set(), "blocks": set()})
        row["blocks"].add(f"{layers}+{layers}" if settings["model"] == "flux" else str(layers))
        row["versions"].add(f"{env['torch']} / {env['diffusers']}")
        row["defaults"].add(defaults_version(settings["configs"]["safe-core"]))
        row["dates"].add(measured_on(path))
        for g in gains:
            row["cells"].append((g["tokens"], g["fast_path_gain"], g["scheduling_gain"], g["total_gain"],
                                 settings["dtype"]))
    return list(out.values())


def table() -> str:
    lines = ["| backbone | machine | blocks | image tokens | dense / dense-fp | dense-fp / safe-core "
             "| **dense / safe-core** | safe-core defaults | torch / diffusers | measured |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows(), key=lambda r: (not r["gpu"], r["backbone"], r["machine"])):
        cells = sorted(r["cells"])
        join = " / ".join
        lines.append(
            f"| {r['backbone']} | {r['machine']} | {join(sorted(r['blocks']))} "
            f"| {join(str(c[0]) for c in cells)} | {join(f'{c[1]:.2f}×' for c in cells)} "
            f"| {join(f'{c[2]:.2f}×' for c in cells)} | **{join(f'{c[3]:.2f}×' for c in cells)}** "
            f"| {join(sorted(r['defaults']))} | {join(sorted(r['versions']))} | {join(sorted(r['dates']))} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    print(table())
