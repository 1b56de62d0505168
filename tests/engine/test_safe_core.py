"""SAFE-Core / SAFE-DiT+SW on Lumina-Next: exact limits, real token sparsity, scoped state."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import safe_dit
from safe_dit import SafeConfig, SafeDitError, apply_safe_dit, remove_safe_dit
from safe_dit.api import runtime_of
from safe_dit.testing.kits import build_lumina_next, build_lumina_pipeline, lumina_inputs

from helpers import SdpaSpy
from helpers import run_lumina as _run


@pytest.fixture(scope="module")
def pipe():
    return build_lumina_pipeline()


def test_equal_guidance_scales_reproduce_plain_cfg(pipe):
    apply_safe_dit(pipe, SafeConfig("safe-core", keep_ratio=0.5))
    core = _run(pipe)
    apply_safe_dit(pipe, SafeConfig("safe-sw", keep_ratio=0.5, cfg_context=4.0, cfg_sensitive=4.0))
    sw_equal = _run(pipe)
    apply_safe_dit(pipe, SafeConfig("safe-sw", keep_ratio=0.5, cfg_context=2.0, cfg_sensitive=7.0))
    sw = _run(pipe)
    remove_safe_dit(pipe)
    assert torch.allclose(sw_equal, core, atol=1e-5)
    assert (sw - core).abs().max() > 1e-3


def test_sw_cfg_matches_the_per_token_formula():
    """The rewritten cond prediction makes the pipeline's scalar guidance equal gamma_i."""
    from safe_dit.engine.generation import Generation
    from safe_dit.engine.guidance import guide, sensitivity_weighted, token_guidance

    cfg = SafeConfig("safe-sw", cfg_context=1.5, cfg_sensitive=6.0)
    gen = Generation(cfg, 4)
    gen.grid, gen.cfg_batch = (2, 3), True
    gen.sensitivity = torch.rand(2, 6)
    gen.sensitivity[1] = gen.sensitivity[0]

    class RT:
        config = cfg

        class pipe:
            guidance_scale = 4.0

    sample = torch.randn(2, 8, 4, 6)  # p = 2
    out = sensitivity_weighted(RT, gen, (sample.clone(),), channels=3)[0]  # Lumina guides 3 channels
    pipeline_eps = out[1:, :3] + 4.0 * (out[:1, :3] - out[1:, :3])
    gamma = token_guidance(gen.sensitivity[:1], 1.5, 6.0).view(1, 1, 2, 3)
    gamma = gamma.repeat_interleave(2, 2).repeat_interleave(2, 3)
    expected = guide(sample[1:, :3], sample[:1, :3], gamma)
    assert torch.allclose(pipeline_eps, expected, atol=1e-5)
    assert torch.equal(out[:, 3:], sample[:, 3:])  # channels the pipeline does not guide are untouched


def test_selective_rows_equal_dense_rows_right_after_an_anchor():
    """With unchanged inputs, the selective step right after the last warm-up step (the first
    anchor) and right after a later anchor both reproduce the dense output on every row."""
    model = build_lumina_next("tiny", num_layers=3)
    inputs = lumina_inputs(model, 5, 6, batch=2, valid_lens=[8, 4])
    apply_safe_dit(model, SafeConfig("dense-fp"))
    with torch.no_grad():
        dense = model(**inputs)[0]
    apply_safe_dit(model,
                   SafeConfig("safe-core", keep_ratio=0.3, warmup_steps=1, anchor_interval=2, tail_dense_steps=0))
    with torch.no_grad(), safe_dit.generation(model, num_steps=4) as g:
        outs = [model(**inputs)[0] for _ in range(4)]
    assert g.report()["steps"] == ["warmup", "selective", "anchor", "selective"]
    for out in outs:
        assert torch.allclose(out, dense, atol=1e-5)


def test_no_spatial_mask_reaches_sdpa_in_any_step(pipe):
    apply_safe_dit(pipe, SafeConfig("safe-core", keep_ratio=0.25))
    with SdpaSpy() as spy:
        _run(pipe, steps=8)
    remove_safe_dit(pipe)
    assert spy.masks and all(m is None for m in spy.masks)


def test_work_per_selective_step_scales_with_keep_ratio():
    model = build_lumina_next("tiny", num_layers=2, hidden_size=128, num_attention_heads=4, num_kv_heads=4)
    inputs = lumina_inputs(model, 16, 16, batch=2)
    flops = {}
    for keep in (1.0, 0.5, 0.25):
        apply_safe_dit(model, SafeConfig("safe-core", keep_ratio=keep, warmup_steps=1, anchor_interval=2,
                                         tail_dense_steps=0))
        with torch.no_grad(), safe_dit.generation(model, num_steps=3):
            model(**inputs)  # warm-up (fills the caches)
            with FlopCounterMode(display=False) as counter:
                model(**inputs)  # selective
        flops[keep] = counter.get_total_flops()
    remove_safe_dit(model)
    for keep in (0.5, 0.25):
        ratio = flops[keep] / flops[1.0]
        assert keep * 0.9 <= ratio <= keep * 1.1, (keep, ratio)


def test_partition_is_deterministic_and_state_is_released(pipe):
    apply_safe_dit(pipe, SafeConfig("safe-core", keep_ratio=0.25))
    rt = runtime_of(pipe)
    _run(pipe, steps=6)
    assert rt.generation is None  # partition and caches released after the last step
    first_index, first_map = rt.last_index.clone(), rt.last_sensitivity.clone()
    _run(pipe, steps=6)
    assert torch.equal(rt.last_index, first_index) and torch.equal(rt.last_sensitivity, first_map)
    assert torch.equal(rt.last_index[0], rt.last_index[1])  # cond and uncond halves share the partition
    assert first_map.min() == 0 and first_map.max() == 1
    _run(pipe, steps=6, height=48, width=112)  # another resolution in the next call works
    assert rt.last_sensitivity.shape[1] != first_map.shape[1]
    remove_safe_dit(pipe)


def test_kv_cache_memory_is_accounted():
    model = build_lumina_next("tiny", num_layers=2)  # 2 KV heads of dim 16
    inputs = lumina_inputs(model, 4, 5, batch=2)
    apply_safe_dit(model,
                   SafeConfig("safe-core", warmup_steps=1, anchor_interval=2, tail_dense_steps=0, context_forecast=0,
                                     reuse_every=0))
    with torch.no_grad(), safe_dit.generation(model, num_steps=2) as g:
        model(**inputs), model(**inputs)
    n = 20
    kv_bytes = 2 * 2 * (2 * n * 2 * 16) * 4  # layers x (K, V) x [B, N, Hkv, d] x fp32
    out_bytes = 2 * n * (2 * 2 * 8) * 4  # [B, N, p*p*C_out]
    assert g.report()["cache_mb"] == pytest.approx((kv_bytes + out_bytes) / 2**20)


def test_scheduled_modes_need_a_schedule():
    model = build_lumina_next("tiny")
    apply_safe_dit(model, SafeConfig("safe-core"))
    with pytest.raises(SafeDitError, match="needs the sampling schedule"):
        with torch.no_grad():
            model(**lumina_inputs(model, 3, 3))
    with pytest.raises(SafeDitError, match="num_steps"):
        safe_dit.generation(model, num_steps=0)


@pytest.mark.parametrize("kwargs,match", [
    (dict(keep_ratio=1.5), "keep_ratio"), (dict(warmup_steps=0), "warmup_steps"),
    (dict(anchor_interval=0), "anchor_interval"), (dict(tail_dense_steps=-1), "tail_dense_steps"),
    (dict(pcsp_blocks=()), "pcsp_blocks"), (dict(text_importance=(1.0, -2.0)), "text_importance"),
    (dict(cfg_sensitive=float("nan")), "cfg_sensitive"), (dict(keep_ratio=True), "keep_ratio"),
])
def test_config_validation(kwargs, match):
    with pytest.raises(SafeDitError, match=match):
        SafeConfig("safe-core", **kwargs)


