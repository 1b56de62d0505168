"""Chroma (``ChromaTransformer2DModel``, ``ChromaPipeline``): random transformers built from configs, their inputs,
and tiny pipelines. ``tiny`` is for unit tests, ``chroma`` the real model's attention shape (hidden 3072 = 24 heads
of 128, 19 double + 38 single blocks, T5-XXL states of 4096) with as many layers as asked."""

from __future__ import annotations

import torch

from safe_dit.testing.flux import flux_image_ids
from safe_dit.testing.kit import Kit, TinyRun
from safe_dit.testing.tiny import tiny_t5, tiny_vae, word_tokenizer

CHROMA_PRESETS = {
    "tiny": dict(num_layers=1, num_single_layers=2, attention_head_dim=24, num_attention_heads=2, in_channels=16,
                 joint_attention_dim=24, axes_dims_rope=(4, 10, 10), approximator_num_channels=16,
                 approximator_hidden_dim=32, approximator_layers=1),
    # Chroma1-HD: FLUX.1-schnell's blocks (hidden 3072 = 24 heads of 128, 19 double + 38 single) without the
    # per-block modulation, whose 5-layer approximator (hidden 5120) makes them all from the timestep.
    "chroma": dict(num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24, in_channels=64,
                   joint_attention_dim=4096, axes_dims_rope=(16, 56, 56), approximator_num_channels=64,
                   approximator_hidden_dim=5120, approximator_layers=5),
}


def build_chroma(preset: str = "tiny", seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """A seeded random ``ChromaTransformer2DModel`` (head dim 24 in ``tiny``: not a power of two, so the scale
    1/sqrt(d) is inexact, as at 128). ``num_layers`` sets both block kinds unless ``num_single_layers`` is given."""
    from diffusers import ChromaTransformer2DModel

    if preset not in CHROMA_PRESETS:
        raise ValueError(f"unknown Chroma preset {preset!r}; choose one of {sorted(CHROMA_PRESETS)}")
    cfg = dict(patch_size=1)
    cfg.update(CHROMA_PRESETS[preset])
    if "num_layers" in overrides and "num_single_layers" not in overrides:
        overrides = dict(overrides, num_single_layers=overrides["num_layers"])
    cfg.update(overrides)
    torch.manual_seed(seed)
    model = ChromaTransformer2DModel(**cfg)
    return (model.to(dtype) if dtype != torch.float32 else model).eval()


def chroma_mask(valid_lens: list[int], text_len: int, image_tokens: int, dtype=torch.float32, device="cpu"):
    """The [B, T + N] mask ``ChromaPipeline`` hands the transformer: its caption part in the embeddings' float dtype,
    1 on each caption's tokens and the one padding token after them, then ones (bool, promoted) for the image."""
    text = (torch.arange(text_len)[None] <= torch.tensor(valid_lens)[:, None]).to(device, dtype)  # [B, T]
    return torch.cat([text, torch.ones(len(valid_lens), image_tokens, dtype=torch.bool, device=device)], dim=1)


def chroma_inputs(model, height_tokens: int, width_tokens: int, batch: int = 1, text_len: int = 8,
                  valid_lens: list[int] | None = None, seed: int = 0, dtype: torch.dtype | None = None,
                  device: torch.device | str = "cpu") -> dict:
    """Keyword inputs for ``model(**inputs)`` as ``ChromaPipeline`` passes them: packed latents [B, N, C], T5 states
    [B, T, Dc] and its float mask over [text; image] (``valid_lens`` caption tokens per sample, default T - 1)."""
    cfg = model.config
    dtype = dtype or next(model.parameters()).dtype
    g = torch.Generator().manual_seed(seed)
    valid_lens = valid_lens or [text_len - 1] * batch
    if len(valid_lens) != batch:
        raise ValueError("valid_lens needs one length per sample")
    n = height_tokens * width_tokens
    return dict(
        hidden_states=torch.randn(batch, n, cfg.in_channels, generator=g).to(device, dtype),
        encoder_hidden_states=torch.randn(batch, text_len, cfg.joint_attention_dim, generator=g).to(device, dtype),
        timestep=torch.rand(batch, generator=g).to(device, dtype),
        img_ids=flux_image_ids(height_tokens, width_tokens).to(device),
        txt_ids=torch.zeros(text_len, 3).to(device),
        attention_mask=chroma_mask(valid_lens, text_len, n, dtype, device),
        return_dict=False,
    )


def build_chroma_pipeline(transformer=None, seed: int = 0):
    """A diffusers ``ChromaPipeline`` around ``transformer`` with a tiny random VAE and no text encoder: call it
    with ``prompt_embeds``/``prompt_attention_mask``."""
    from diffusers import ChromaPipeline, FlowMatchEulerDiscreteScheduler

    transformer = transformer if transformer is not None else build_chroma("tiny", seed=seed)
    vae = tiny_vae(transformer.config.in_channels // 4, seed, shift_factor=0.1159, scaling_factor=0.3611)
    pipe = ChromaPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None, tokenizer=None,
                          transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_chroma_text_pipeline(seed: int = 0):
    """A complete, randomly initialised ``ChromaPipeline`` that takes text prompts offline: a tiny T5 (d_model 24 =
    the joint dim) with a word-level tokenizer built in code (``$A <eos>``, padded to ``max_sequence_length``)."""
    from diffusers import ChromaPipeline

    base = build_chroma_pipeline(seed=seed)
    pipe = ChromaPipeline(scheduler=base.scheduler, vae=base.vae, transformer=base.transformer,
                          text_encoder=tiny_t5(seed + 2, 24), tokenizer=word_tokenizer("$A <eos>"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def chroma_prompt_kwargs(transformer, draw, text_len: int, valid=None, device="cpu") -> dict:
    """``ChromaPipeline`` call keywords: one prompt's T5 states and its mask as the pipeline's encoder makes it
    (float, ``valid[0]`` tokens and one padding token); no negative prompt: CFG would be two calls per step (see
    ``Kit.prompt_kwargs``)."""
    valid = valid or (text_len - 1, text_len - 1)
    mask = (torch.arange(text_len)[None] <= valid[0]).to(device, torch.float32)  # [1, T]
    return dict(prompt_embeds=draw("prompt", 1, text_len, transformer.config.joint_attention_dim).to(device),
                prompt_attention_mask=mask)


def chroma_bench_overrides(layers: int, heads=None, hidden_size=None, kv_heads=None) -> dict:
    """Transformer overrides for bench e2e: ``layers`` double and single blocks; --heads sets the width."""
    return dict(num_layers=layers) | (dict(num_attention_heads=heads) if heads else {})


# T5 padded to 512 with the float mask; CFG is two calls per step: the pipeline runs use guidance 1 (batch 1), like
# a guidance-distilled backbone; ChromaPipeline packs 2x2 latents per token
KIT = Kit(rank=7, name="chroma", label="Chroma", tiny_name="tiny-random-chroma", build=build_chroma,
          inputs=chroma_inputs, pipeline=build_chroma_pipeline, text_pipeline=build_chroma_text_pipeline,
          prompt_kwargs=chroma_prompt_kwargs, tiny_run=TinyRun(32, 48, grid=(8, 12), guidance=1.0),
          real_preset="chroma", bench_text_len=512, bench_overrides=chroma_bench_overrides, guidance_distilled=True,
          latent_patch=2)
