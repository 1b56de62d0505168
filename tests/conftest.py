"""Shared fixtures. The test folders mirror the package's layers: engine/, adapters/, bench/, embedded/, cli/.

This file's folder is on sys.path (pytest's rootdir conftest), so every test can ``from helpers import ...``.
"""

from __future__ import annotations

import json

import pytest


@pytest.fixture(scope="session")
def embedded_pipe():
    """The shipped shapes model's pipeline (fp32, progress bars off), loaded once for the whole run."""
    from safe_dit.embedded.model import load_default_pipeline

    pipe = load_default_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def micro_model(tmp_path_factory):
    """``micro_model(layers)``: the directory of a micro shapes model trained for 2 steps (seconds), one per
    layer count for the whole run; eval and pareto read it as ``--model DIR``."""
    from safe_dit.embedded.train import main as train_main

    made: dict[int, object] = {}

    def make(layers: int = 1):
        if layers not in made:
            out = tmp_path_factory.mktemp(f"micro{layers}")
            cfg = json.dumps(dict(hidden_size=32, num_layers=layers, num_attention_heads=2, num_kv_heads=2))
            train_main(["--steps", "2", "--batch", "2", "--quiet", "--config-overrides", cfg, "--out", str(out)])
            made[layers] = out
        return made[layers]

    return make
