"""dense-fp through the real diffusers LuminaPipeline sampling loop (CFG batch, padded captions)."""

import torch

from safe_dit import SafeConfig, apply_safe_dit, remove_safe_dit
from safe_dit.testing.kits import build_lumina_pipeline


def _run(pipe, **kw):
    g = torch.Generator().manual_seed(0)
    args = dict(
        prompt_embeds=g_randn((1, 8, 32), 1), prompt_attention_mask=torch.tensor([[1] * 6 + [0] * 2]),
        negative_prompt_embeds=g_randn((1, 8, 32), 2),
        negative_prompt_attention_mask=torch.tensor([[1] * 2 + [0] * 6]),
        height=48, width=80, num_inference_steps=3, guidance_scale=4.0, output_type="pt",
    )
    args.update(kw)
    return pipe(generator=g, **args).images


def g_randn(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def test_pipeline_dense_fp_equals_dense_and_removes_cleanly():
    pipe = build_lumina_pipeline()
    dense = _run(pipe)
    apply_safe_dit(pipe, SafeConfig("dense-fp"))
    fast = _run(pipe)
    remove_safe_dit(pipe)
    again = _run(pipe)
    assert dense.shape[:2] == (1, 3) and torch.isfinite(dense).all()
    assert (fast - dense).abs().max().item() < 1e-4
    assert torch.equal(again, dense)
    # guidance and padding matter here, so the comparison is not vacuous
    assert (_run(pipe, guidance_scale=1.0) - dense).abs().max().item() > 1e-3
