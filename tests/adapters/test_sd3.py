"""SD3 (SD3Transformer2DModel): no mask to elide; safe-core/safe-sw through StableDiffusion3Pipeline."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import safe_dit
from safe_dit import SafeConfig, SafeDitError, apply_safe_dit, remove_safe_dit
from safe_dit.api import runtime_of
from safe_dit.cli import main
from safe_dit.inspection.audit import audit
from safe_dit.testing.kits import build_sd3, build_sd3_pipeline, sd3_inputs

from helpers import SdpaSpy, forward, processors, seeded, selective_flops, steps_vs_dense_fp
from helpers import run_sd3 as _run

TOL = {torch.float32: 1e-5, torch.bfloat16: 3e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("h,w,b", [(5, 7, 1), (3, 8, 2), (1, 1, 1)])
def test_dense_fp_equals_dense_on_the_flash_kernel(h, w, b, dtype):
    model = build_sd3(dtype=dtype, dual_attention_layers=(0,))  # SD3.5's extra image self-attention too
    inputs = sd3_inputs(model, h, w, batch=b, seed=h * 10 + w)
    dense = forward(model, inputs).float()
    apply_safe_dit(model, SafeConfig("dense-fp"))
    with SdpaSpy() as spy, sdpa_kernel([SDPBackend.FLASH_ATTENTION]):  # raises if any call needed another kernel
        fast = forward(model, inputs).float()
    remove_safe_dit(model)
    assert len(spy.masks) == 3 and all(m is None for m in spy.masks)
    assert fast.shape == dense.shape == (b, 4, 2 * h, 2 * w)
    assert (fast - dense).abs().max().item() <= TOL[dtype] * dense.abs().max().item()


def test_audit_shows_no_mask_anywhere():
    model = build_sd3()
    report = audit(model, sd3_inputs(model, 4, 5, batch=2))
    assert report["summary"]["stock_masked_calls"] == report["summary"]["safe_masked_calls"] == 0
    assert all(c["verdict"] == "no mask" for c in report["safe"])
    assert "nothing to elide" in report["notes"]


def test_audit_cli_has_an_sd3_model(capsys):
    assert main(["audit", "--model", "sd3", "--height-tokens", "3", "--width-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "SD3Transformer2DModel" in out and "masked SDPA calls: stock 0/2  ->  safe-dit 0/2" in out


def test_apply_remove_round_trip():
    model = build_sd3(dual_attention_layers=(1,))
    inputs = sd3_inputs(model, 4, 4, batch=2)
    before, out_before = processors(model), forward(model, inputs)
    for cfg in (SafeConfig("dense-fp"), SafeConfig("safe-core"), SafeConfig("safe-sw"), SafeConfig("dense")):
        apply_safe_dit(model, cfg)
        apply_safe_dit(model, cfg)  # idempotent
    apply_safe_dit(model, SafeConfig("safe-core"))
    assert all(type(p).__name__ == "SafeSD3AttnProcessor" for p in processors(model).values())
    remove_safe_dit(model)
    assert all(processors(model)[n] is before[n] for n in before)
    assert not model._forward_pre_hooks and not model._forward_hooks
    assert not model.pos_embed._forward_hooks and not model.proj_out._forward_hooks
    assert torch.equal(forward(model, inputs), out_before)


def test_selective_rows_equal_dense_rows_right_after_an_anchor():
    model = build_sd3(num_layers=3, dual_attention_layers=(0,))
    dense, g, outs = steps_vs_dense_fp(model, sd3_inputs(model, 5, 6, batch=2))  # all on the flash kernel
    assert g.report()["steps"] == ["warmup", "selective", "anchor", "selective"]
    assert g.report()["tokens_per_step"] == [30, 9, 30, 9]
    for out in outs:
        assert (out - dense).abs().max() <= 1e-5 * dense.abs().max()


def test_selective_step_work_shrinks_with_keep_ratio():
    model = build_sd3(num_attention_heads=4, attention_head_dim=16, caption_projection_dim=64)
    flops = selective_flops(model, sd3_inputs(model, 16, 16, batch=2, text_len=4))
    assert 0.25 <= flops[0.25] / flops[1.0] <= 0.25 * 1.2, flops  # text rows (4 of 260) are always computed


def test_pcsp_reads_the_joint_softmax_image_to_text_block():
    from safe_dit.engine.partition import joint_image_to_text_probs

    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 3, 10, 8, generator=g), torch.randn(2, 3, 14, 8, generator=g)  # 10 image + 4 text keys
    full = (torch.einsum("bhnd,bhld->bhnl", q.double(), k.double()) / 8 ** 0.5).softmax(-1)  # [B, H, N, L]
    for text in (slice(10, 14), slice(0, 4)):  # [image; text] (SD3) and [text; image] (FLUX)
        ref = full[:, :, :, text].mean(1)
        assert torch.allclose(joint_image_to_text_probs(q, k, text).double(), ref, atol=1e-6)
        # head by head
        assert torch.allclose(joint_image_to_text_probs(q, k, text, chunk_bytes=1).double(), ref, atol=1e-6)


# -- StableDiffusion3Pipeline -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pipe():
    return build_sd3_pipeline()


def test_partition_comes_from_the_cond_half(pipe):
    apply_safe_dit(pipe, SafeConfig("safe-core", keep_ratio=0.25))
    rt = runtime_of(pipe)
    _run(pipe, steps=6)
    first = rt.last_index.clone()
    _run(pipe, steps=6, negative_seed=5)
    assert torch.equal(rt.last_index, first)
    _run(pipe, steps=6, prompt_embeds=seeded(7, 1, 8, 24))
    assert not torch.equal(rt.last_index, first)
    remove_safe_dit(pipe)


def test_safe_sw_equal_scales_reproduce_safe_core(pipe):
    apply_safe_dit(pipe, SafeConfig("safe-core", keep_ratio=0.5))
    core = _run(pipe)
    apply_safe_dit(pipe, SafeConfig("safe-sw", keep_ratio=0.5, cfg_context=4.0, cfg_sensitive=4.0))
    same = _run(pipe)
    apply_safe_dit(pipe, SafeConfig("safe-sw", keep_ratio=0.5, cfg_context=2.0, cfg_sensitive=7.0))
    sw = _run(pipe)
    remove_safe_dit(pipe)
    assert (same - core).abs().max() <= 1e-5 * core.abs().max()
    assert (sw - core).abs().max() > 1e-3


def test_two_transformer_calls_per_step_are_refused(pipe):
    apply_safe_dit(pipe, SafeConfig("safe-core"))
    with pytest.raises(SafeDitError, match="one transformer call per sampling step"):
        _run(pipe, steps=6, skip_guidance_layers=[0])  # SD3 skip-layer guidance: an extra call per step
    apply_safe_dit(pipe, SafeConfig("dense-fp"))
    _run(pipe, steps=6, skip_guidance_layers=[0])  # the fast path alone is fine
    remove_safe_dit(pipe)


def test_unsupported_model_names_the_supported_ones():
    with pytest.raises(SafeDitError, match="SD3Transformer2DModel"):
        apply_safe_dit(torch.nn.Linear(2, 2), SafeConfig("dense-fp"))


def test_text_prompts_through_every_mode():
    """The complete pipeline offline: tiny random CLIP-L/G and T5 encoders, tokenizers built in code."""
    from safe_dit.config import MODES
    from safe_dit.testing.kits import build_sd3_text_pipeline

    pipe = build_sd3_text_pipeline()
    outs = {}
    for mode in MODES:
        apply_safe_dit(pipe, SafeConfig(mode, keep_ratio=0.5, cfg_context=5.0, cfg_sensitive=9.0))
        outs[mode] = pipe(prompt="a red circle at top left", negative_prompt="blue square", height=32, width=48,
                          num_inference_steps=8, guidance_scale=7.0, max_sequence_length=12, output_type="latent",
                          generator=torch.Generator().manual_seed(0)).images
        if SafeConfig(mode).scheduled:
            assert runtime_of(pipe).last_report["steps"] == ["warmup", "warmup", "selective", "anchor", "selective",
                                                             "reuse", "tail", "selective"]  # 8 steps at the defaults
    remove_safe_dit(pipe)
    assert all(torch.isfinite(o).all() for o in outs.values())
    assert (outs["dense-fp"] - outs["dense"]).abs().max() <= 1e-5 * outs["dense"].abs().max()
    assert not torch.allclose(outs["safe-core"], outs["dense-fp"], atol=1e-4)
    assert not torch.allclose(outs["safe-sw"], outs["safe-core"], atol=1e-4)


def test_controlnet_residuals_are_refused_by_the_scheduled_modes():
    model = build_sd3()
    inputs = sd3_inputs(model, 4, 4)
    inputs["block_controlnet_hidden_states"] = [torch.zeros(1, 16, 32)]
    apply_safe_dit(model, SafeConfig("dense-fp"))
    forward(model, inputs)  # the fast path alone is fine
    apply_safe_dit(model, SafeConfig("safe-core"))
    with pytest.raises(SafeDitError, match="ControlNet"), safe_dit.generation(model, num_steps=4):
        forward(model, inputs)
    remove_safe_dit(model)


def test_non_stock_processors_are_refused_untouched():
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    class CustomJointProcessor:  # a user's own (fused QKV is supported since)
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None):
            return JointAttnProcessor2_0()(attn, hidden_states, encoder_hidden_states, attention_mask)

    model = build_sd3()
    custom = CustomJointProcessor()
    model.transformer_blocks[1].attn.set_processor(custom)
    with pytest.raises(SafeDitError, match="CustomJointProcessor"):
        apply_safe_dit(model, SafeConfig("dense-fp"))
    assert model.transformer_blocks[1].attn.processor is custom and runtime_of(model) is None
    assert type(model.transformer_blocks[0].attn.processor).__name__ == "JointAttnProcessor2_0"
