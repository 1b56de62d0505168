"""FLUX (FluxTransformer2DModel): no mask to elide; safe-core through FluxPipeline; safe-sw refused
(guidance-distilled)."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from safe_dit import SafeConfig, SafeDitError, apply_safe_dit, remove_safe_dit
from safe_dit.api import runtime_of
from safe_dit.cli import main
from safe_dit.inspection.audit import audit, trace_forward
from safe_dit.testing.kits import build_flux, build_flux_pipeline, flux_inputs

from helpers import SdpaSpy, forward, processors, seeded, selective_flops, steps_vs_dense_fp
from helpers import run_flux as _run

TOL = {torch.float32: 1e-5, torch.bfloat16: 3e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("h,w,b", [(5, 7, 1), (3, 8, 2), (1, 1, 1)])
def test_dense_fp_equals_dense_on_the_flash_kernel(h, w, b, dtype):
    model = build_flux(dtype=dtype)
    inputs = flux_inputs(model, h, w, batch=b, seed=h * 10 + w)
    dense = forward(model, inputs).float()
    apply_safe_dit(model, SafeConfig("dense-fp"))
    with SdpaSpy() as spy, sdpa_kernel([SDPBackend.FLASH_ATTENTION]):  # raises if any call needed another kernel
        fast = forward(model, inputs).float()
    remove_safe_dit(model)
    assert len(spy.masks) == 3 and all(m is None for m in spy.masks)  # 1 double + 2 single blocks
    assert fast.shape == dense.shape == (b, h * w, 16)
    assert (fast - dense).abs().max().item() <= TOL[dtype] * dense.abs().max().item()


def test_a_user_key_padding_mask_is_rewritten_exactly():
    model = build_flux()
    inputs = flux_inputs(model, 4, 5, batch=2, text_len=6)
    valid = torch.ones(2, 6 + 20, dtype=torch.bool)
    valid[0, 4:6] = False  # two padded caption tokens in sample 0 only
    inputs["joint_attention_kwargs"] = {"attention_mask": valid}
    dense = forward(model, inputs)
    unmasked = forward(model, dict(inputs, joint_attention_kwargs=None))
    assert (dense - unmasked).abs().max() > 1e-3  # the mask matters
    apply_safe_dit(model, SafeConfig("dense-fp"))
    with SdpaSpy() as spy:
        fast = forward(model, inputs)
    calls = trace_forward(model, inputs)
    remove_safe_dit(model)
    assert all(m is None for m in spy.masks)
    assert all(c["verdict"] == "rewritten: split-batch (exact)" for c in calls)
    assert (fast - dense).abs().max() <= 1e-5 * dense.abs().max()


def test_audit_shows_no_mask_anywhere(capsys):
    model = build_flux()
    report = audit(model, flux_inputs(model, 4, 5, batch=2))
    assert report["summary"]["stock_masked_calls"] == report["summary"]["safe_masked_calls"] == 0
    assert [c["module"] for c in report["safe"]] == ["transformer_blocks.0.attn", "single_transformer_blocks.0.attn",
                                                     "single_transformer_blocks.1.attn"]
    assert all(c["verdict"] == "no mask" for c in report["safe"])
    assert main(["audit", "--model", "flux", "--height-tokens", "3", "--width-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "FluxTransformer2DModel" in out and "nothing to elide" in out


def test_apply_remove_round_trip():
    model = build_flux()
    inputs = flux_inputs(model, 4, 4, batch=2)
    before, out_before = processors(model), forward(model, inputs)
    for cfg in (SafeConfig("dense-fp"), SafeConfig("safe-core"), SafeConfig("dense")):
        apply_safe_dit(model, cfg)
        apply_safe_dit(model, cfg)
    apply_safe_dit(model, SafeConfig("safe-core"))
    assert all(type(p).__name__ == "SafeFluxAttnProcessor" for p in processors(model).values())
    remove_safe_dit(model)
    assert all(processors(model)[n] is before[n] for n in before)
    assert not model._forward_pre_hooks and not model._forward_hooks
    assert not model.x_embedder._forward_hooks and not model.proj_out._forward_hooks
    assert torch.equal(forward(model, inputs), out_before)


def test_safe_sw_is_refused_with_the_reason():
    model = build_flux()
    with pytest.raises(SafeDitError, match="guidance-distilled"):
        apply_safe_dit(model, SafeConfig("safe-sw"))
    assert runtime_of(model) is None and all(type(p).__name__ == "FluxAttnProcessor"
                                             for p in processors(model).values())


def test_selective_rows_equal_dense_rows_right_after_an_anchor():
    """Double- and single-stream blocks; gathered rows rotated with their own positions' RoPE."""
    model = build_flux(num_layers=2, num_single_layers=2)
    dense, g, outs = steps_vs_dense_fp(model, flux_inputs(model, 5, 6, batch=2))  # all on the flash kernel
    assert g.report()["steps"] == ["warmup", "selective", "anchor", "selective"]
    assert g.report()["tokens_per_step"] == [30, 9, 30, 9]
    for out in outs:
        assert (out - dense).abs().max() <= 1e-5 * dense.abs().max()


def test_selective_step_work_shrinks_with_keep_ratio():
    model = build_flux(num_attention_heads=4, attention_head_dim=16, axes_dims_rope=(4, 6, 6))
    flops = selective_flops(model, flux_inputs(model, 16, 16, batch=1, text_len=4))
    assert 0.25 <= flops[0.25] / flops[1.0] <= 0.25 * 1.2, flops


# -- FluxPipeline -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pipe():
    return build_flux_pipeline()


def test_every_mode_through_the_pipeline(pipe):
    for mode in ("dense", "dense-fp", "safe-core"):
        apply_safe_dit(pipe, SafeConfig(mode))
        assert torch.isfinite(_run(pipe, steps=6)).all()
    with pytest.raises(SafeDitError, match="guidance-distilled"):
        apply_safe_dit(pipe, SafeConfig("safe-sw"))
    remove_safe_dit(pipe)


def test_true_cfg_is_refused_by_safe_core_and_runs_under_dense_fp(pipe):
    neg = dict(negative_prompt_embeds=seeded(5, 1, 8, 24), negative_pooled_prompt_embeds=seeded(6, 1, 20),
               true_cfg_scale=2.0)
    dense = _run(pipe, steps=4, **neg)
    apply_safe_dit(pipe, SafeConfig("dense-fp"))
    assert (_run(pipe, steps=4, **neg) - dense).abs().max() <= 1e-5 * dense.abs().max()
    apply_safe_dit(pipe, SafeConfig("safe-core"))
    with pytest.raises(SafeDitError, match="one transformer call per sampling step"):
        _run(pipe, steps=4, **neg)
    assert torch.isfinite(_run(pipe, steps=6)).all()  # the next ordinary call works
    remove_safe_dit(pipe)


def test_text_prompts_through_every_mode():
    """The complete pipeline offline: tiny random CLIP and T5 encoders, tokenizers built in code."""
    from safe_dit.testing.kits import build_flux_text_pipeline

    pipe = build_flux_text_pipeline()
    outs = {}
    for mode in ("dense", "dense-fp", "safe-core"):
        apply_safe_dit(pipe, SafeConfig(mode, keep_ratio=0.5))
        outs[mode] = pipe(prompt="a red circle at top left", height=32, width=48, num_inference_steps=8,
                          guidance_scale=3.5, max_sequence_length=12, output_type="latent",
                          generator=torch.Generator().manual_seed(0)).images
    steps = runtime_of(pipe).last_report["steps"]  # 8 steps at the defaults: anchor at 3, tail 6, step 5 reused
    assert steps == ["warmup", "warmup", "selective", "anchor", "selective", "reuse", "tail", "selective"]
    with pytest.raises(SafeDitError, match="guidance-distilled"):
        apply_safe_dit(pipe, SafeConfig("safe-sw"))
    remove_safe_dit(pipe)
    assert all(torch.isfinite(o).all() for o in outs.values())
    assert (outs["dense-fp"] - outs["dense"]).abs().max() <= 1e-5 * outs["dense"].abs().max()
    assert not torch.allclose(outs["safe-core"], outs["dense-fp"], atol=1e-4)


def test_bench_e2e_quick_has_no_safe_sw_row(capsys):
    import json

    assert main(["bench", "e2e", "--model", "flux", "--quick", "--no-progress"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {r["mode"] for r in result["rows"]} == {"dense", "dense-fp", "safe-core"}
    assert result["settings"]["model_class"] == "FluxTransformer2DModel" and result["settings"]["text_len"] == 512
    assert all(r["rel_err_vs_dense_short_call"] <= 1e-5 for r in result["rows"] if r["mode"] == "dense-fp")
