"""What every backbone (one per kit in ``KITS``) must do through its whole sampling loop: dense-fp reproduces
dense; safe-core with keep_ratio 1 reproduces dense-fp; safe-core at its defaults' shape is token-sparse, hands
SDPA no mask, follows the prompt, and releases its state; and removing safe-dit restores the stock model exactly.
Backbone-specific behaviour (mask provenance, CFG order, refusals) is tested in each backbone's module."""

from __future__ import annotations

import math

import pytest
import torch

from safe_dit import SafeConfig, apply_safe_dit, remove_safe_dit
from safe_dit.api import runtime_of
from safe_dit.testing.kits import KITS

from helpers import RUNS, SdpaSpy, forward, processors

# backbone: (pipeline builder, one seeded run, image token grid of that run), one per kit
BACKBONES = {name: (kit.pipeline, RUNS[name], kit.tiny_run.grid) for name, kit in KITS.items()}


@pytest.fixture(scope="module", params=list(BACKBONES))
def backbone(request):
    build, run, grid = BACKBONES[request.param]
    pipe = build()
    dense = run(pipe)
    apply_safe_dit(pipe, SafeConfig("dense-fp"))
    dense_fp = run(pipe)
    remove_safe_dit(pipe)
    return pipe, run, grid, dense, dense_fp


def _close(a, b):
    return (a - b).abs().max() <= 1e-5 * b.abs().max()


def test_dense_fp_reproduces_dense_through_the_sampling_loop(backbone):
    _pipe, _run, _grid, dense, dense_fp = backbone
    assert _close(dense_fp, dense)


def test_keep_ratio_one_reproduces_dense_fp(backbone):
    pipe, run, _grid, _dense, dense_fp = backbone
    apply_safe_dit(pipe, SafeConfig("safe-core", keep_ratio=1.0, reuse_every=0, warmup_steps=2, anchor_interval=3))
    out = run(pipe)
    report = runtime_of(pipe).last_report
    remove_safe_dit(pipe)
    assert "selective" in report["steps"]  # selective steps really ran, on all tokens
    assert _close(out, dense_fp)


def test_safe_core_is_token_sparse_mask_free_and_prompt_driven(backbone):
    pipe, run, grid, _dense, dense_fp = backbone
    apply_safe_dit(pipe, SafeConfig("safe-core", keep_ratio=0.25, warmup_steps=2, anchor_interval=4, anchor_growth=0.0,
                                    tail_dense_steps=1, context_forecast=1, reuse_every=2))
    with SdpaSpy() as spy:
        out = run(pipe)
    rt = runtime_of(pipe)
    report, first = rt.last_report, rt.last_index.clone()
    run(pipe, prompt_seed=9)
    second = rt.last_index.clone()
    remove_safe_dit(pipe)
    assert spy.masks and all(m is None for m in spy.masks)  # every SDPA call of every step kind is mask-free
    assert report["steps"] == ["warmup"] * 2 + ["selective", "reuse", "selective", "anchor", "selective", "reuse",
                                               "tail", "selective"]  # the final step after the tail: sensitive rows
    n = math.prod(grid)  # (h, w) or (frames, h, w)
    assert report["tokens_per_step"][0] == n and report["sensitive_tokens"] == -(-n // 4)
    assert [t for t, k in zip(report["tokens_per_step"], report["steps"]) if k == "reuse"] == [0, 0]
    assert all(t == -(-n // 4) for t, k in zip(report["tokens_per_step"], report["steps"]) if k == "selective")
    assert rt.generation is None and rt.last_grid == grid  # released after the last step; the map is kept
    assert not torch.equal(first, second)  # the prompt decides the partition
    if first.shape[0] == 2:  # a CFG batch: both halves use the cond half's partition
        assert torch.equal(first[0], first[1])
    assert torch.isfinite(out).all() and not torch.allclose(out, dense_fp, atol=1e-4)


def _equal(a, b) -> bool:
    """Outputs bit-identical (a tensor, or a list of per-sample tensors as Z-Image returns)."""
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("name", list(KITS))
def test_remove_restores_the_stock_model_exactly(name):
    """apply then remove, in each mode that patches: the same processor objects, no hook left on any module, and a
    bit-identical forward on a CFG batch of different caption lengths."""
    kit = KITS[name]
    model = kit.build("tiny")
    before = processors(model)
    inputs = kit.inputs(model, 3, 4, batch=2, text_len=12, valid_lens=[11, 3])
    ref = forward(model, inputs)
    for mode in ("dense-fp", "safe-core"):
        apply_safe_dit(model, SafeConfig(mode))
        remove_safe_dit(model)
        after = processors(model)
        assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)
        hooked = [n for n, m in model.named_modules() if m._forward_pre_hooks or m._forward_hooks]
        assert not hooked, f"{mode}: hooks left on {hooked}"
    assert _equal(forward(model, inputs), ref)
