"""Qwen-Image (QwenImageTransformer2DModel): the joint caption-padding mask rewritten exactly; safe-core on a batch of
different caption lengths; what is refused."""

from __future__ import annotations

import pytest
import torch

import safe_dit
from safe_dit import SafeConfig, SafeDitError, apply_safe_dit, remove_safe_dit
from safe_dit.cli import main
from safe_dit.inspection.audit import trace_forward
from safe_dit.testing.qwen_image import build_qwen_image, build_qwen_image_pipeline, qwen_image_inputs

from helpers import RUNS, SdpaSpy, forward, selective_flops, stock_vs_dense_fp

run = RUNS["qwen-image"]
TOL = {torch.float32: 1e-5, torch.bfloat16: 3e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("h,w,lens", [(4, 6, [8, 8]), (3, 5, [8, 3]), (5, 3, [6]), (2, 2, [2, 7]), (1, 1, [1, 8])])
def test_dense_fp_equals_dense_with_no_mask_on_the_flash_kernel(h, w, lens, dtype):
    model = build_qwen_image(dtype=dtype)
    inputs = qwen_image_inputs(model, h, w, batch=len(lens), text_len=8, valid_lens=lens, seed=h * 10 + w)
    dense, fast, stock_masks, masks = stock_vs_dense_fp(model, inputs)
    assert all(m is not None for m in stock_masks) == (min(lens) < 8)  # the stock model masks every block
    assert len(masks) == (4 if len(set(lens)) > 1 else 2) and all(m is None for m in masks)  # split: 2 per block
    assert (fast - dense).abs().max().item() <= TOL[dtype] * dense.abs().max().item()


def test_scattered_caption_masks_are_gathered_exactly():
    model = build_qwen_image()
    inputs = qwen_image_inputs(model, 3, 4, batch=2, text_len=8, valid_lens=[8, 3])
    mask = torch.tensor([[1, 0, 1, 1, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 1]])
    inputs["encoder_hidden_states_mask"] = mask
    dense = forward(model, inputs)
    apply_safe_dit(model, SafeConfig("dense-fp"))
    verdicts = {c["verdict"] for c in trace_forward(model, inputs)}
    with SdpaSpy() as spy:
        fast = forward(model, inputs)
    remove_safe_dit(model)
    assert verdicts == {"rewritten: split-batch (exact)"} and all(m is None for m in spy.masks)
    assert (fast - dense).abs().max() <= 1e-5 * dense.abs().max()
    apply_safe_dit(model, SafeConfig("dense-fp", rewrite_padding=False))  # kept as shipped: exact too
    with SdpaSpy() as spy:
        kept = forward(model, inputs)
    remove_safe_dit(model)
    assert all(m is not None for m in spy.masks) and (kept - dense).abs().max() <= 1e-5 * dense.abs().max()


def _steps(model, steps_inputs, config, cfg_batch=False):
    apply_safe_dit(model, config)
    with torch.no_grad(), safe_dit.generation(model, num_steps=len(steps_inputs), cfg_batch=cfg_batch) as g, \
            SdpaSpy() as spy:
        outs = [model(**inputs)[0] for inputs in steps_inputs]
    remove_safe_dit(model)
    return outs, g, spy


@pytest.mark.parametrize("lens", [[8, 3], [8, 8]], ids=["different", "equal"])
def test_safe_core_on_a_batch_of_two_captions(lens):
    model = build_qwen_image()
    base = qwen_image_inputs(model, 4, 6, batch=2, text_len=8, valid_lens=lens)
    steps = [dict(base,
                  hidden_states=(base["hidden_states"] * (1 - 0.1 * i)
                                 + 0.1 * i * torch.randn_like(base["hidden_states"])),
                  timestep=base["timestep"] * 0 + i / 6) for i in range(6)]
    apply_safe_dit(model, SafeConfig("dense-fp"))
    dense_fp = [forward(model, inputs) for inputs in steps]
    remove_safe_dit(model)
    sched = dict(warmup_steps=1, anchor_interval=3, tail_dense_steps=0, anchor_growth=0.0)
    full, g1, _ = _steps(model, steps, SafeConfig("safe-core", keep_ratio=1.0, reuse_every=0, **sched), cfg_batch=True)
    assert "selective" in g1.report()["steps"]
    assert all((o - d).abs().max() <= 1e-5 * d.abs().max() for o, d in zip(full, dense_fp))  # keep 1 == dense-fp
    sparse, g2, spy = _steps(model, steps, SafeConfig("safe-core", keep_ratio=0.25, reuse_every=0, **sched))
    report = g2.report()
    assert report["steps"] == ["warmup", "selective", "selective", "anchor", "selective", "selective"]
    assert report["tokens_per_step"][1] == 6 and report["tokens_per_step"][0] == 24
    assert spy.masks and all(m is None for m in spy.masks)
    assert all(torch.isfinite(o).all() for o in sparse)
    assert not torch.allclose(sparse[1], dense_fp[1], atol=1e-4)  # context rows reuse the anchor
    assert (sparse[3] - dense_fp[3]).abs().max() <= 1e-5 * dense_fp[3].abs().max()  # the anchor is a dense step


def test_pcsp_ignores_caption_padding():
    """The padded caption tokens' states change nothing, neither the output nor the partition."""
    model = build_qwen_image()
    a = qwen_image_inputs(model, 4, 6, batch=2, text_len=8, valid_lens=[8, 3], seed=3)
    b = dict(a, encoder_hidden_states=a["encoder_hidden_states"].clone())
    b["encoder_hidden_states"][1, 3:] = torch.randn(5, b["encoder_hidden_states"].shape[-1])  # sample 1's padding
    index, outs = [], []
    for inputs in (a, b):
        out, g, _ = _steps(model, [inputs] * 3,
                           SafeConfig("safe-core", keep_ratio=0.25, warmup_steps=1, anchor_interval=3))
        index.append(g._gen.index.clone())
        outs.append(out[-1])
    assert torch.equal(index[0], index[1])
    assert (outs[0] - outs[1]).abs().max() <= 1e-5 * outs[0].abs().max()


def test_selective_steps_do_a_fraction_of_the_work():
    model = build_qwen_image()
    flops = selective_flops(model, qwen_image_inputs(model, 8, 8, batch=2, valid_lens=[8, 3]))
    assert flops[0.25] < 0.5 * flops[1.0]


def test_refusals():
    model = build_qwen_image()
    with pytest.raises(SafeDitError, match="safe-sw is not available for Qwen-Image"):
        apply_safe_dit(model, SafeConfig("safe-sw"))
    with pytest.raises(SafeDitError, match="text-to-image only"):
        apply_safe_dit(build_qwen_image(zero_cond_t=True), SafeConfig("safe-core"))
    apply_safe_dit(model, SafeConfig("safe-core", warmup_steps=1))
    edit = qwen_image_inputs(model, 2, 2)
    edit["img_shapes"] = [[(1, 2, 1), (1, 2, 1)]]
    with (pytest.raises(SafeDitError, match="text-to-image only"), torch.no_grad(),
          safe_dit.generation(model, num_steps=2)):
        model(**edit)
    remove_safe_dit(model)
    pipe = build_qwen_image_pipeline()
    apply_safe_dit(pipe, SafeConfig("safe-core", warmup_steps=1, anchor_interval=2))
    g = torch.Generator().manual_seed(0)
    kw = dict(prompt_embeds=torch.randn(1, 8, 32, generator=g), prompt_embeds_mask=torch.tensor([[1] * 6 + [0] * 2]),
              negative_prompt_embeds=torch.randn(1, 8, 32, generator=g),
              negative_prompt_embeds_mask=torch.tensor([[1] * 2 + [0] * 6]),
              true_cfg_scale=4.0, height=32, width=48, num_inference_steps=4, output_type="latent")
    with pytest.raises(SafeDitError, match="one transformer call per sampling step"):
        pipe(**kw)
    apply_safe_dit(pipe, SafeConfig("dense-fp"))  # dense-fp runs true CFG
    out = pipe(generator=torch.Generator().manual_seed(0), **kw).images
    remove_safe_dit(pipe)
    assert torch.allclose(out, pipe(generator=torch.Generator().manual_seed(0), **kw).images, atol=1e-5)


def test_cli_audit():
    assert main(["audit", "--model", "qwen-image", "--height-tokens", "3", "--width-tokens", "4"]) == 0
