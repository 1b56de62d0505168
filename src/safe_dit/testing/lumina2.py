"""Lumina-Image-2.0 (``Lumina2Transformer2DModel``, ``Lumina2Pipeline``): random transformers built from configs,
their inputs, and tiny pipelines. ``tiny`` is for unit tests, ``lumina-image-2`` the real model's attention shape
(hidden 2304, 24 heads of 96, 8 KV heads, Gemma-2-2B caption states of 2304) with as many layers as asked."""

from __future__ import annotations

import torch

from safe_dit.testing.kit import Kit, TinyRun
from safe_dit.testing.tiny import prefix_mask, tiny_vae, word_tokenizer

LUMINA2_PRESETS = {
    "tiny": dict(hidden_size=64, num_layers=2, num_refiner_layers=1, num_attention_heads=4, num_kv_heads=2,
                 multiple_of=16, axes_dim_rope=(4, 6, 6), axes_lens=(300, 512, 512), cap_feat_dim=32),
    # Lumina-Image-2.0: hidden 2304, 26 layers + 2 refiners each, 24 heads (head dim 96), 8 KV heads,
    # Gemma-2-2B (2304).

    "lumina-image-2": dict(hidden_size=2304, num_layers=26, num_refiner_layers=2, num_attention_heads=24,
                           num_kv_heads=8,
                           multiple_of=256, axes_dim_rope=(32, 32, 32), axes_lens=(300, 512, 512), cap_feat_dim=2304),
}


def build_lumina2(preset: str = "tiny", seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """A seeded random ``Lumina2Transformer2DModel`` (16 latent channels, patch 2, as the real model)."""
    from diffusers import Lumina2Transformer2DModel

    if preset not in LUMINA2_PRESETS:
        raise ValueError(f"unknown Lumina2 preset {preset!r}; choose one of {sorted(LUMINA2_PRESETS)}")
    cfg = dict(sample_size=16, patch_size=2, in_channels=16)
    cfg.update(LUMINA2_PRESETS[preset])
    if "num_layers" in overrides and "num_refiner_layers" not in overrides:
        overrides = dict(overrides, num_refiner_layers=min(2, cfg["num_refiner_layers"], overrides["num_layers"]))
    cfg.update(overrides)
    torch.manual_seed(seed)
    model = Lumina2Transformer2DModel(**cfg)
    return (model.to(dtype) if dtype != torch.float32 else model).eval()


def lumina2_inputs(model, height_tokens: int, width_tokens: int, batch: int = 1, text_len: int = 8,
                   valid_lens: list[int] | None = None, seed: int = 0, dtype: torch.dtype | None = None,
                   device: torch.device | str = "cpu") -> dict:
    """Keyword inputs for ``model(**inputs)`` as ``Lumina2Pipeline`` passes them: latents [B, C, h*p, w*p], caption
    states [B, T, Dc] and their prefix padding mask (``valid_lens`` per sample, default all valid)."""
    cfg = model.config
    dtype = dtype or next(model.parameters()).dtype
    p = cfg.patch_size
    g = torch.Generator().manual_seed(seed)
    valid_lens = valid_lens or [text_len] * batch
    if len(valid_lens) != batch:
        raise ValueError("valid_lens needs one length per sample")
    return dict(
        hidden_states=torch.randn(batch, cfg.in_channels, height_tokens * p, width_tokens * p,
                                  generator=g).to(device, dtype),
        timestep=torch.rand(batch, generator=g).to(device, dtype),
        encoder_hidden_states=torch.randn(batch, text_len, cfg.cap_feat_dim, generator=g).to(device, dtype),
        encoder_attention_mask=(torch.arange(text_len)[None]
                                < torch.tensor(valid_lens)[:, None]).to(device, torch.int64),
        return_dict=False,
    )


def build_lumina2_pipeline(transformer=None, seed: int = 0):
    """A diffusers ``Lumina2Pipeline`` around ``transformer`` with a tiny random VAE and no text encoder: call it
    with ``prompt_embeds``/``prompt_attention_mask``."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Lumina2Pipeline

    transformer = transformer if transformer is not None else build_lumina2("tiny", seed=seed)
    vae = tiny_vae(transformer.config.in_channels, seed, shift_factor=0.1159, scaling_factor=0.3611)
    pipe = Lumina2Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae,
                           text_encoder=None, tokenizer=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_lumina2_text_pipeline(seed: int = 0):
    """A complete, randomly initialised ``Lumina2Pipeline`` that takes text prompts offline: a word-level tokenizer
    built in code (Gemma-style ``<bos>`` first), a tiny random Gemma-2 text encoder, the tiny transformer and VAE."""
    from diffusers import Lumina2Pipeline
    from transformers import Gemma2Config, Gemma2Model

    tokenizer = word_tokenizer("<bos> $A")
    torch.manual_seed(seed)
    text_encoder = Gemma2Model(Gemma2Config(vocab_size=len(tokenizer.get_vocab()), hidden_size=32,
                                            intermediate_size=64,
                                            num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                            head_dim=16)).eval()
    base = build_lumina2_pipeline(seed=seed)
    pipe = Lumina2Pipeline(transformer=base.transformer, scheduler=base.scheduler, vae=base.vae,
                           text_encoder=text_encoder, tokenizer=tokenizer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def lumina2_prompt_kwargs(transformer, draw, text_len: int, valid: tuple[int, int], device="cpu") -> dict:
    """``Lumina2Pipeline`` call keywords for a pair of padded captions (see ``Kit.prompt_kwargs``)."""
    dim = transformer.config.cap_feat_dim
    return dict(prompt_embeds=draw("prompt", 1, text_len, dim),
                prompt_attention_mask=prefix_mask(valid[0], text_len, device),
                negative_prompt_embeds=draw("negative", 1, text_len, dim),
                negative_prompt_attention_mask=prefix_mask(valid[1], text_len, device))


def lumina2_bench_overrides(layers: int, heads=None, hidden_size=None, kv_heads=None) -> dict:
    """Transformer overrides for bench e2e: ``layers`` joint blocks (and up to 2 refiners); the width with
    --hidden-size."""
    overrides = dict(num_layers=layers)
    if hidden_size:
        overrides |= dict(hidden_size=hidden_size, num_attention_heads=heads, num_kv_heads=kv_heads)
    return overrides


def lumina2_attention_shape(transformer) -> tuple[int, int, int]:
    cfg = transformer.config
    return cfg.num_attention_heads, cfg.num_kv_heads, cfg.hidden_size // cfg.num_attention_heads


# Lumina2Pipeline makes one transformer call per prompt (cond, then uncond with guidance > 1): the pipeline runs use
# guidance 1 (one call per step, batch 1), like a guidance-distilled backbone; CFG batches are tested on the model.
KIT = Kit(rank=4, name="lumina2", label="Lumina-Image-2.0", tiny_name="tiny-random-lumina2", build=build_lumina2,
    inputs=lumina2_inputs, pipeline=build_lumina2_pipeline, text_pipeline=build_lumina2_text_pipeline,
    prompt_kwargs=lumina2_prompt_kwargs, tiny_run=TinyRun(64, 96, grid=(4, 6), guidance=1.0),
    real_preset="lumina-image-2", bench_text_len=256, bench_overrides=lumina2_bench_overrides, bench_hidden_size=True,
    guidance_distilled=True, attention_shape=lumina2_attention_shape)
