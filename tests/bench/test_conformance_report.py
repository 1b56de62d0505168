"""scripts/conformance_report.py's classification of a stock-pass -> safe-dit-fail."""

from __future__ import annotations

import importlib.util
from pathlib import Path


def _report():
    path = Path(__file__).resolve().parents[2] / "scripts" / "conformance_report.py"
    spec = importlib.util.spec_from_file_location("conformance_report", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_only_the_designed_refusals_are_not_defects():
    classify = _report().classify
    cache = ("safe_dit.config.SafeDitError: diffusers' FirstBlockCache (FBCHeadBlockHook on transformer_blocks.0) "
             "cannot be combined with safe-core: ...")
    assert classify("x::test_first_block_cache_inference", cache)[0] == "designed refusal"
    twice = "safe_dit.config.SafeDitError: mode 'safe-core' needs one transformer call per sampling step, but ..."
    assert classify("x::test_flux_true_cfg", twice)[0] == "designed refusal"
    other = "safe_dit.config.SafeDitError: mode 'safe-core' follows the pipeline's scheduler step by step, but ..."
    assert classify("x::test_flux_true_cfg", other)[0] == "defect"
    assert classify("x::test_output", "RuntimeError: The size of tensor a (3) must match ...")[0] == "defect"
    assert classify("x::test_output", "AssertionError: max diff 0.2")[0] == "defect"
