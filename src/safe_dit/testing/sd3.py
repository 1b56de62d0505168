"""SD3 / SD3.5 (``SD3Transformer2DModel``, ``StableDiffusion3Pipeline``): random transformers built from
configs, their inputs, and tiny pipelines."""

from __future__ import annotations

import torch

from safe_dit.testing.kit import Kit, TinyRun
from safe_dit.testing.tiny import tiny_clip, tiny_t5, tiny_vae, word_tokenizer

SD3_PRESETS = {
    "tiny": dict(num_layers=2, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=24,
                 caption_projection_dim=32, pooled_projection_dim=20, in_channels=4, out_channels=4),
    # SD3-Medium: hidden 1536 = 24 heads of 64, 24 joint blocks, CLIP-L/G + T5 states (4096), pooled 2048.
    "sd3-medium": dict(num_layers=24, attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                       caption_projection_dim=1536, pooled_projection_dim=2048, in_channels=16, out_channels=16),
}


def build_sd3(preset: str = "tiny", seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """A seeded random ``SD3Transformer2DModel`` (patch 2, position table large enough for 128x128 tokens)."""
    from diffusers import SD3Transformer2DModel

    if preset not in SD3_PRESETS:
        raise ValueError(f"unknown SD3 preset {preset!r}; choose one of {sorted(SD3_PRESETS)}")
    cfg = dict(sample_size=32, patch_size=2, pos_embed_max_size=128)
    cfg.update(SD3_PRESETS[preset])
    cfg.update(overrides)
    torch.manual_seed(seed)
    model = SD3Transformer2DModel(**cfg)
    return (model.to(dtype) if dtype != torch.float32 else model).eval()


def sd3_inputs(model, height_tokens: int, width_tokens: int, batch: int = 1, text_len: int = 8, seed: int = 0,
               dtype: torch.dtype | None = None, device: torch.device | str = "cpu", **_ignored) -> dict:
    """Keyword inputs for ``model(**inputs)`` as ``StableDiffusion3Pipeline`` passes them (no mask exists)."""
    cfg = model.config
    dtype = dtype or next(model.parameters()).dtype
    p = cfg.patch_size
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(batch, cfg.in_channels, height_tokens * p, width_tokens * p,
                                  generator=g).to(device, dtype),
        encoder_hidden_states=torch.randn(batch, text_len, cfg.joint_attention_dim, generator=g).to(device, dtype),
        pooled_projections=torch.randn(batch, cfg.pooled_projection_dim, generator=g).to(device, dtype),
        timestep=(torch.rand(batch, generator=g) * 1000).to(device, dtype),
        return_dict=False,
    )


def build_sd3_pipeline(transformer=None, seed: int = 0):
    """A diffusers ``StableDiffusion3Pipeline`` around ``transformer`` with a tiny random VAE and no text
    encoders: call it with ``prompt_embeds``/``pooled_prompt_embeds`` and the negative ones."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    transformer = transformer if transformer is not None else build_sd3("tiny", seed=seed)
    vae = tiny_vae(transformer.config.in_channels, seed, shift_factor=0.0609, scaling_factor=1.5305)
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                    vae=vae,
                                    text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                                    text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_sd3_text_pipeline(seed: int = 0):
    """A complete, randomly initialised ``StableDiffusion3Pipeline`` that takes text prompts offline: two tiny
    CLIP encoders (hidden 8 + 8, projections 10 + 10 = the pooled 20) and a tiny T5 (d_model 24 = the joint
    dim), word-level tokenizers built in code (CLIP: 16 tokens, <bos> ... <eos>; T5: ... <eos>)."""
    from diffusers import StableDiffusion3Pipeline

    base = build_sd3_pipeline(seed=seed)
    clip = word_tokenizer("<bos> $A <eos>", max_length=16)
    pipe = StableDiffusion3Pipeline(
        transformer=base.transformer, scheduler=base.scheduler, vae=base.vae,
        text_encoder=tiny_clip(seed + 1, 8, 10), tokenizer=clip, text_encoder_2=tiny_clip(seed + 2, 8, 10),
        tokenizer_2=clip, text_encoder_3=tiny_t5(seed + 3, 24), tokenizer_3=word_tokenizer("$A <eos>"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sd3_prompt_kwargs(transformer, draw, text_len: int, valid=None, device="cpu") -> dict:
    """``StableDiffusion3Pipeline`` call keywords for a CFG pair of joint text states and pooled projections;
    SD3 has no caption mask (see ``Kit.prompt_kwargs``)."""
    cfg = transformer.config
    return dict(prompt_embeds=draw("prompt", 1, text_len, cfg.joint_attention_dim),
                pooled_prompt_embeds=draw("pooled", 1, cfg.pooled_projection_dim),
                negative_prompt_embeds=draw("negative", 1, text_len, cfg.joint_attention_dim),
                negative_pooled_prompt_embeds=draw("negative_pooled", 1, cfg.pooled_projection_dim))


def sd3_bench_overrides(layers: int, heads=None, hidden_size=None, kv_heads=None) -> dict:
    """Transformer overrides for bench e2e: --heads sets the width (heads x the real head dim 64)."""
    return dict(num_layers=layers) | (dict(num_attention_heads=heads,
                                           caption_projection_dim=64 * heads) if heads else {})


# CLIP-L/G (77) + T5 (256) caption tokens, as StableDiffusion3Pipeline makes them
KIT = Kit(rank=2, name="sd3", label="SD3", tiny_name="tiny-random-sd3", build=build_sd3, inputs=sd3_inputs,
    pipeline=build_sd3_pipeline, text_pipeline=build_sd3_text_pipeline, prompt_kwargs=sd3_prompt_kwargs,
    tiny_run=TinyRun(32, 48, grid=(8, 12)), real_preset="sd3-medium", bench_text_len=77 + 256,
    bench_overrides=sd3_bench_overrides)
