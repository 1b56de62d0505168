"""FLUX.1 (``FluxTransformer2DModel``, ``FluxPipeline``): random transformers built from configs, their inputs,
and tiny pipelines."""

from __future__ import annotations

import torch

from safe_dit.testing.kit import Kit, TinyRun
from safe_dit.testing.tiny import tiny_clip, tiny_t5, tiny_vae, word_tokenizer

FLUX_PRESETS = {
    "tiny": dict(num_layers=1, num_single_layers=2, attention_head_dim=16, num_attention_heads=2, in_channels=16,
                 joint_attention_dim=24, pooled_projection_dim=20, axes_dims_rope=(4, 6, 6)),
    # FLUX.1-dev: hidden 3072 = 24 heads of 128, 19 double + 38 single blocks, T5 states (4096), CLIP pooled (768).
    "flux-dev": dict(num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
                     in_channels=64,
                     joint_attention_dim=4096, pooled_projection_dim=768, axes_dims_rope=(16, 56, 56)),
}


def build_flux(preset: str = "tiny", seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """A seeded random ``FluxTransformer2DModel`` with the guidance embedding (FLUX.1-dev style).
    ``num_layers`` sets both block kinds unless ``num_single_layers`` is given too."""
    from diffusers import FluxTransformer2DModel

    if preset not in FLUX_PRESETS:
        raise ValueError(f"unknown FLUX preset {preset!r}; choose one of {sorted(FLUX_PRESETS)}")
    cfg = dict(patch_size=1, guidance_embeds=True)
    cfg.update(FLUX_PRESETS[preset])
    if "num_layers" in overrides and "num_single_layers" not in overrides:
        overrides = dict(overrides, num_single_layers=overrides["num_layers"])
    cfg.update(overrides)
    torch.manual_seed(seed)
    model = FluxTransformer2DModel(**cfg)
    return (model.to(dtype) if dtype != torch.float32 else model).eval()


def flux_image_ids(height_tokens: int, width_tokens: int) -> torch.Tensor:
    """[h*w, 3] row-major (0, row, col) ids, as ``FluxPipeline._prepare_latent_image_ids`` builds them."""
    ids = torch.zeros(height_tokens, width_tokens, 3)
    ids[..., 1] += torch.arange(height_tokens)[:, None]
    ids[..., 2] += torch.arange(width_tokens)[None, :]
    return ids.reshape(-1, 3)


def flux_inputs(model, height_tokens: int, width_tokens: int, batch: int = 1, text_len: int = 8, seed: int = 0,
                dtype: torch.dtype | None = None, device: torch.device | str = "cpu", **_ignored) -> dict:
    """Keyword inputs for ``model(**inputs)`` as ``FluxPipeline`` passes them: packed latents [B, N, C], no mask."""
    cfg = model.config
    dtype = dtype or next(model.parameters()).dtype
    g = torch.Generator().manual_seed(seed)
    inputs = dict(
        hidden_states=torch.randn(batch, height_tokens * width_tokens, cfg.in_channels, generator=g).to(device, dtype),
        encoder_hidden_states=torch.randn(batch, text_len, cfg.joint_attention_dim, generator=g).to(device, dtype),
        pooled_projections=torch.randn(batch, cfg.pooled_projection_dim, generator=g).to(device, dtype),
        timestep=torch.rand(batch, generator=g).to(device, dtype),
        img_ids=flux_image_ids(height_tokens, width_tokens).to(device),
        txt_ids=torch.zeros(text_len, 3).to(device),
        return_dict=False,
    )
    if cfg.guidance_embeds:
        inputs["guidance"] = torch.full((batch,), 3.5).to(device, dtype)
    return inputs


def build_flux_pipeline(transformer=None, seed: int = 0):
    """A diffusers ``FluxPipeline`` around ``transformer`` with a tiny random VAE and no text encoders:
    call it with ``prompt_embeds``/``pooled_prompt_embeds``."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    transformer = transformer if transformer is not None else build_flux("tiny", seed=seed)
    vae = tiny_vae(transformer.config.in_channels // 4, seed, shift_factor=0.1159, scaling_factor=0.3611)
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_flux_text_pipeline(seed: int = 0):
    """A complete, randomly initialised ``FluxPipeline`` that takes text prompts offline: a tiny CLIP
    (pooled 20) and a tiny T5 (d_model 24 = the joint dim) with word-level tokenizers built in code."""
    from diffusers import FluxPipeline

    base = build_flux_pipeline(seed=seed)
    pipe = FluxPipeline(scheduler=base.scheduler, vae=base.vae, transformer=base.transformer,
                        text_encoder=tiny_clip(seed + 1, 20),
                        tokenizer=word_tokenizer("<bos> $A <eos>", max_length=16),
                        text_encoder_2=tiny_t5(seed + 2, 24), tokenizer_2=word_tokenizer("$A <eos>"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def flux_prompt_kwargs(transformer, draw, text_len: int, valid=None, device="cpu") -> dict:
    """``FluxPipeline`` call keywords: one prompt's joint text states and pooled projection (guidance-distilled:
    no negative prompt, no mask; see ``Kit.prompt_kwargs``)."""
    cfg = transformer.config
    return dict(prompt_embeds=draw("prompt", 1, text_len, cfg.joint_attention_dim),
                pooled_prompt_embeds=draw("pooled", 1, cfg.pooled_projection_dim))


def flux_bench_overrides(layers: int, heads=None, hidden_size=None, kv_heads=None) -> dict:
    """Transformer overrides for bench e2e: ``layers`` double and single blocks; --heads sets the width."""
    return dict(num_layers=layers) | (dict(num_attention_heads=heads) if heads else {})


# T5 (512) caption tokens; guidance-distilled: batch 1, no safe-sw; FluxPipeline packs 2x2 latents per token
KIT = Kit(rank=3, name="flux", label="FLUX", tiny_name="tiny-random-flux", build=build_flux, inputs=flux_inputs,
    pipeline=build_flux_pipeline, text_pipeline=build_flux_text_pipeline, prompt_kwargs=flux_prompt_kwargs,
    tiny_run=TinyRun(32, 48, grid=(8, 12), guidance=3.5), real_preset="flux-dev", bench_text_len=512,
    bench_overrides=flux_bench_overrides, guidance_distilled=True, latent_patch=2)
