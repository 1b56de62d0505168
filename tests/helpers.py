"""Shared test instruments: what reaches SDPA, and the processors a model holds."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode


def forward(model, inputs):
    with torch.no_grad():
        return model(**inputs)[0]


def processors(model) -> dict:
    return {n: m.processor for n, m in model.named_modules() if hasattr(m, "processor")}


class SdpaSpy(TorchFunctionMode):
    """Every mask handed to F.scaled_dot_product_attention (``None`` for a mask-free call)."""

    def __init__(self):
        super().__init__()
        self.masks = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            self.masks.append(kwargs.get("attn_mask", args[3] if len(args) > 3 else None))
        return func(*args, **kwargs)


# -- one seeded sampling run per backbone's tiny pipeline (embeds given, latents out) -------------------

def seeded(seed: int, *shape) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _sample(pipe, args: dict, kw: dict) -> torch.Tensor:
    args.update(kw)
    return pipe(generator=torch.Generator().manual_seed(0), **args).images


def run_lumina(pipe, steps=10, height=64, width=96, prompt_seed=1, **kw):
    """Lumina-Next, CFG batch [cond; uncond], captions of 8 tokens with 6 / 2 valid."""
    return _sample(pipe, dict(
        prompt_embeds=seeded(prompt_seed, 1, 8, 32), prompt_attention_mask=torch.tensor([[1] * 6 + [0] * 2]),
        negative_prompt_embeds=seeded(2, 1, 8, 32), negative_prompt_attention_mask=torch.tensor([[1] * 2 + [0] * 6]),
        height=height, width=width, num_inference_steps=steps, guidance_scale=4.0, output_type="latent"), kw)


def run_pixart(pipe, steps=10, height=24, width=40, prompt_seed=1, negative_seed=2, **kw):
    """PixArt-Sigma, CFG batch [uncond; cond], T5-like captions of 8 tokens with 6 / 2 valid."""
    return _sample(pipe, dict(
        prompt_embeds=seeded(prompt_seed, 1, 8, 24), prompt_attention_mask=torch.tensor([[1] * 6 + [0] * 2]),
        negative_prompt=None, negative_prompt_embeds=seeded(negative_seed, 1, 8, 24),
        negative_prompt_attention_mask=torch.tensor([[1] * 2 + [0] * 6]), height=height, width=width,
        num_inference_steps=steps, guidance_scale=4.0, output_type="latent", use_resolution_binning=False), kw)


def run_sd3(pipe, steps=10, height=32, width=48, prompt_seed=1, negative_seed=3, **kw):
    """SD3, CFG batch [uncond; cond], joint text of 8 tokens."""
    return _sample(pipe, dict(
        prompt_embeds=seeded(prompt_seed, 1, 8, 24), pooled_prompt_embeds=seeded(2, 1, 20),
        negative_prompt_embeds=seeded(negative_seed, 1, 8, 24), negative_pooled_prompt_embeds=seeded(4, 1, 20),
        height=height, width=width, num_inference_steps=steps, guidance_scale=4.0, output_type="latent"), kw)


def run_flux(pipe, steps=10, height=32, width=48, prompt_seed=1, **kw):
    """FLUX, batch 1 (guidance-distilled), joint text of 8 tokens."""
    return _sample(pipe, dict(
        prompt_embeds=seeded(prompt_seed, 1, 8, 24), pooled_prompt_embeds=seeded(2, 1, 20), height=height, width=width,
        num_inference_steps=steps, guidance_scale=3.5, output_type="latent"), kw)


# -- bare-transformer checks shared by the joint-attention backbones (SD3, FLUX) ----------------------

def steps_vs_dense_fp(model, inputs, num_steps=4):
    """dense-fp output, then ``num_steps`` safe-core forwards (keep 0.3, warm-up 1, anchor every 2, no tail) on
    the flash kernel only; returns (dense-fp output, the generation, the safe-core outputs)."""
    import safe_dit
    from safe_dit import SafeConfig, apply_safe_dit, remove_safe_dit
    from torch.nn.attention import SDPBackend, sdpa_kernel

    apply_safe_dit(model, SafeConfig("dense-fp"))
    dense = forward(model, inputs)
    apply_safe_dit(model, SafeConfig("safe-core", keep_ratio=0.3, warmup_steps=1, anchor_interval=2, tail_dense_steps=0))
    with torch.no_grad(), safe_dit.generation(model, num_steps=num_steps) as g, sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        outs = [model(**inputs)[0] for _ in range(num_steps)]  # PCSP tap, anchors and selective steps
    remove_safe_dit(model)
    return dense, g, outs


def selective_flops(model, inputs, keep_ratios=(1.0, 0.25)) -> dict:
    """FLOPs of one selective safe-core forward per keep ratio."""
    import safe_dit
    from safe_dit import SafeConfig, apply_safe_dit, remove_safe_dit
    from torch.utils.flop_counter import FlopCounterMode

    flops = {}
    for keep in keep_ratios:
        apply_safe_dit(model, SafeConfig("safe-core", keep_ratio=keep, warmup_steps=1, anchor_interval=2, tail_dense_steps=0))
        with torch.no_grad(), safe_dit.generation(model, num_steps=3):
            model(**inputs)  # warm-up (also the first anchor)
            with FlopCounterMode(display=False) as counter:
                model(**inputs)  # selective
        flops[keep] = counter.get_total_flops()
    remove_safe_dit(model)
    return flops
