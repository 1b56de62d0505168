"""Lumina-Next (``LuminaNextDiT2DModel``, ``LuminaPipeline``): random transformers built from configs, their
inputs, and tiny pipelines. ``tiny`` is for unit tests, ``lumina-next-2b`` is the real model's attention shape
(hidden 2304, 32 heads of dim 72) with as many layers as asked."""

from __future__ import annotations

import torch
from diffusers import LuminaNextDiT2DModel
from diffusers.models.embeddings import get_2d_rotary_pos_embed_lumina

from safe_dit.testing.kit import Kit, TinyRun
from safe_dit.testing.tiny import prefix_mask, tiny_vae, word_tokenizer

PRESETS = {
    "tiny": dict(hidden_size=64, num_layers=2, num_attention_heads=4, num_kv_heads=2, cross_attention_dim=32),
    # Lumina-Next-SFT 2B: hidden 2304, 24 layers, 32 heads (head dim 72), Gemma-2B text states (2048).
    "lumina-next-2b": dict(
        hidden_size=2304, num_layers=24, num_attention_heads=32, num_kv_heads=8, cross_attention_dim=2048
    ),
}


def build_lumina_next(
    preset: str = "tiny", seed: int = 0, dtype: torch.dtype = torch.float32, **overrides
) -> LuminaNextDiT2DModel:
    """A seeded random LuminaNextDiT2DModel; cross-attention gates are made nonzero so that
    the caption path (and its padding mask) really influences the output."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    cfg = dict(sample_size=32, patch_size=2, in_channels=4, learn_sigma=True, qk_norm=True)
    cfg.update(PRESETS[preset])
    cfg.update(overrides)
    torch.manual_seed(seed)
    model = LuminaNextDiT2DModel(**cfg)
    with torch.no_grad():
        model.pad_token.normal_()  # allocated with torch.empty upstream; keep it deterministic
        for layer in model.layers:
            layer.gate.normal_(0.0, 1.0)
    if dtype != torch.float32:
        model = model.to(dtype)
    return model.eval()


def lumina_inputs(
    model: LuminaNextDiT2DModel,
    height_tokens: int,
    width_tokens: int,
    batch: int = 1,
    text_len: int = 8,
    valid_lens: list[int] | None = None,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
) -> dict:
    """Keyword inputs for ``model(**inputs)``: latents [B, C, h*p, w*p], captions [B, T, Dc]
    with a prefix padding mask (``valid_lens`` per sample, default all valid), timestep, RoPE."""
    cfg = model.config
    dtype = dtype or next(model.parameters()).dtype
    p = cfg.patch_size
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, cfg.in_channels, height_tokens * p, width_tokens * p, generator=g)
    captions = torch.randn(batch, text_len, cfg.cross_attention_dim, generator=g)
    valid_lens = valid_lens or [text_len] * batch
    if len(valid_lens) != batch:
        raise ValueError("valid_lens needs one length per sample")
    mask = torch.arange(text_len)[None, :] < torch.tensor(valid_lens)[:, None]  # [B, T]
    timestep = torch.rand(batch, generator=g)
    rope = get_2d_rotary_pos_embed_lumina(
        model.head_dim, max(height_tokens, 1) + 1, max(width_tokens, 1) + 1
    )
    return dict(
        hidden_states=latents.to(device, dtype),
        timestep=timestep.to(device, dtype),
        encoder_hidden_states=captions.to(device, dtype),
        encoder_mask=mask.to(device, torch.int64),
        image_rotary_emb=rope.to(device),
        cross_attention_kwargs={},
        return_dict=False,
    )


def build_lumina_pipeline(transformer: LuminaNextDiT2DModel | None = None, seed: int = 0):
    """A diffusers ``LuminaPipeline`` around ``transformer`` with a tiny random VAE and no text
    encoder: call it with ``prompt_embeds``/``prompt_attention_mask`` (and negative ones for CFG)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, LuminaPipeline

    transformer = transformer if transformer is not None else build_lumina_next("tiny", seed=seed)
    vae = tiny_vae(transformer.config.in_channels, seed)
    pipe = LuminaPipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None,
        tokenizer=None
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_tiny_text_pipeline(seed: int = 0):
    """A complete, randomly initialised ``LuminaPipeline`` that takes text prompts offline: a
    word-level tokenizer built in code (Gemma-style ``<bos>`` first), a tiny random Gemma text
    encoder, the tiny transformer and VAE. For smoke tests of the CLI: it draws noise."""
    from diffusers import LuminaPipeline
    from transformers import GemmaConfig, GemmaModel

    tokenizer = word_tokenizer("<bos> $A")
    vocab = tokenizer.get_vocab()
    torch.manual_seed(seed)
    text_encoder = GemmaModel(GemmaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                                          num_hidden_layers=2,
                                          num_attention_heads=2, num_key_value_heads=1, head_dim=16)).eval()
    base = build_lumina_pipeline(seed=seed)
    pipe = LuminaPipeline(transformer=base.transformer, scheduler=base.scheduler, vae=base.vae,
                          text_encoder=text_encoder, tokenizer=tokenizer)
    return pipe


def lumina_prompt_kwargs(transformer, draw, text_len: int, valid: tuple[int, int], device="cpu") -> dict:
    """``LuminaPipeline`` call keywords for a CFG pair of padded captions (see ``Kit.prompt_kwargs``)."""
    cross = transformer.config.cross_attention_dim
    return dict(prompt_embeds=draw("prompt", 1, text_len, cross),
                prompt_attention_mask=prefix_mask(valid[0], text_len, device),
                negative_prompt_embeds=draw("negative", 1, text_len, cross),
                negative_prompt_attention_mask=prefix_mask(valid[1], text_len, device))


def lumina_bench_overrides(layers: int, heads=None, hidden_size=None, kv_heads=None) -> dict:
    """Transformer overrides for bench e2e: the width only with --hidden-size (and --heads, --kv-heads)."""
    overrides = dict(num_layers=layers)
    if hidden_size:
        overrides |= dict(hidden_size=hidden_size, num_attention_heads=heads, num_kv_heads=kv_heads)
    return overrides


def lumina_attention_shape(transformer) -> tuple[int, int, int]:
    """(heads, KV heads, head dim): Lumina-Next has grouped-query attention."""
    cfg = transformer.config
    return cfg.num_attention_heads, cfg.num_kv_heads, transformer.head_dim


KIT = Kit(rank=0, name="lumina-next", label="Lumina-Next", tiny_name="tiny-random", build=build_lumina_next,
    inputs=lumina_inputs, pipeline=build_lumina_pipeline, text_pipeline=build_tiny_text_pipeline,
    prompt_kwargs=lumina_prompt_kwargs, tiny_run=TinyRun(64, 96, grid=(4, 6)), real_preset="lumina-next-2b",
    bench_text_len=32, bench_overrides=lumina_bench_overrides, bench_hidden_size=True,
    attention_shape=lumina_attention_shape)
