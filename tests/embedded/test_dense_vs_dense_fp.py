"""dense vs dense-fp on ``safe-dit eval``'s path (the embedded 64-px Lumina-Next, its padded captions, CFG batch,
``bench.quality.generate``): every step's transformer output compared in float32 on the CPU.

With the caption mask kept as shipped (``rewrite_padding=False``) dense-fp differs from dense only by the elided
all-valid image mask, and is bit-identical at every step. With the padding rewrite (the default) each sample
attends over its valid caption keys alone instead of a masked call over all of them: exact in real arithmetic, but
the float sums run over fewer terms in another order, so the outputs agree to float32 rounding (about 2e-6 at the
first step), and the difference grows along the sampling trajectory."""

from __future__ import annotations

import torch

from safe_dit import SafeConfig, apply_safe_dit, remove_safe_dit
from safe_dit.api import runtime_of
from safe_dit.bench import quality
from safe_dit.embedded import world

STEPS = 4


def _per_step(pipe, config: SafeConfig | None):
    """Every step's transformer output [2, C, H, W] and the image, for the eval's first prompt and seed."""
    outputs, trace = [], []
    hook = pipe.transformer.register_forward_hook(lambda _m, _a, out: outputs.append(out[0].detach().clone()))
    if config is not None:
        apply_safe_dit(pipe, config)
        runtime_of(pipe).trace = trace
    try:
        image, _ = quality.generate(pipe, world.caption(quality.prompt_set(4, 2, 0)[0]), 0, STEPS, 4.0)
    finally:
        remove_safe_dit(pipe)
        hook.remove()
    return outputs, image, {verdict for _, verdict in trace}


def test_dense_fp_on_the_eval_path_is_bit_identical_with_the_caption_mask_kept(embedded_pipe):
    dense, dense_image, _ = _per_step(embedded_pipe, None)
    kept, kept_image, verdicts = _per_step(embedded_pipe, SafeConfig("dense-fp", rewrite_padding=False))
    assert len(dense) == len(kept) == STEPS
    assert all(torch.equal(a, b) for a, b in zip(dense, kept))
    assert (dense_image == kept_image).all()
    assert any(v.startswith("elided: certified") for v in verdicts) and "kept: padding" in verdicts

    rewritten, _, verdicts = _per_step(embedded_pipe, SafeConfig("dense-fp"))
    assert any("exact" in v for v in verdicts)  # the padding rewrite ran (captions are padded on this path)
    first = (rewritten[0] - dense[0]).abs().max().item()
    assert first <= 1e-5 * max(1.0, dense[0].abs().max().item())  # float32 rounding, not a semantic difference
