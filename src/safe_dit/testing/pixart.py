"""PixArt (``PixArtTransformer2DModel``, ``PixArtSigmaPipeline``): random transformers built from configs, their
inputs, and tiny pipelines."""

from __future__ import annotations

import torch

from safe_dit.testing.kit import Kit, TinyRun
from safe_dit.testing.tiny import prefix_mask, tiny_t5, tiny_vae, word_tokenizer

PIXART_PRESETS = {
    "tiny": dict(num_attention_heads=2, attention_head_dim=16, num_layers=2, cross_attention_dim=32,
                 caption_channels=24),
    # PixArt-Sigma XL/2: hidden 1152 = 16 heads of 72, 28 blocks, T5-XXL caption states (4096).
    "pixart-sigma": dict(num_attention_heads=16, attention_head_dim=72, num_layers=28, cross_attention_dim=1152,
                         caption_channels=4096, sample_size=128, interpolation_scale=2,
                         use_additional_conditions=False),
}


def build_pixart(preset: str = "tiny", seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """A seeded random ``PixArtTransformer2DModel`` (learned sigma: 8 output channels for 4 latent ones,
    no additional resolution conditions). Its random AdaLN tables make every gate nonzero."""
    from diffusers import PixArtTransformer2DModel

    if preset not in PIXART_PRESETS:
        raise ValueError(f"unknown PixArt preset {preset!r}; choose one of {sorted(PIXART_PRESETS)}")
    cfg = dict(in_channels=4, out_channels=8, sample_size=16, patch_size=2, norm_num_groups=1)
    cfg.update(PIXART_PRESETS[preset])
    cfg.update(overrides)
    torch.manual_seed(seed)
    model = PixArtTransformer2DModel(**cfg)
    return (model.to(dtype) if dtype != torch.float32 else model).eval()


def pixart_inputs(model, height_tokens: int, width_tokens: int, batch: int = 1, text_len: int = 8,
                  valid_lens: list[int] | None = None, seed: int = 0, dtype: torch.dtype | None = None,
                  device: torch.device | str = "cpu") -> dict:
    """Keyword inputs for ``model(**inputs)`` as ``PixArtSigmaPipeline`` passes them: latents, T5-like
    caption states [B, T, caption_channels], a prefix ``encoder_attention_mask`` [B, T], timesteps."""
    cfg = model.config
    dtype = dtype or next(model.parameters()).dtype
    p = cfg.patch_size
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, cfg.in_channels, height_tokens * p, width_tokens * p, generator=g)
    captions = torch.randn(batch, text_len, cfg.caption_channels, generator=g)
    valid_lens = valid_lens or [text_len] * batch
    if len(valid_lens) != batch:
        raise ValueError("valid_lens needs one length per sample")
    mask = torch.arange(text_len)[None, :] < torch.tensor(valid_lens)[:, None]  # [B, T]
    timestep = torch.randint(0, 1000, (batch,), generator=g)
    return dict(
        hidden_states=latents.to(device, dtype),
        encoder_hidden_states=captions.to(device, dtype),
        encoder_attention_mask=mask.to(device, torch.int64),
        timestep=timestep.to(device),
        added_cond_kwargs={"resolution": None, "aspect_ratio": None},
        return_dict=False,
    )


def build_pixart_pipeline(transformer=None, seed: int = 0):
    """A diffusers ``PixArtSigmaPipeline`` around ``transformer`` with a tiny random VAE, its default
    DPM-Solver scheduler and no text encoder: call it with ``prompt_embeds``/``prompt_attention_mask``
    and the negative ones, ``use_resolution_binning=False``."""
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline

    transformer = transformer if transformer is not None else build_pixart("tiny", seed=seed)
    vae = tiny_vae(transformer.config.in_channels, seed)
    pipe = PixArtSigmaPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer,
                               scheduler=DPMSolverMultistepScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_pixart_text_pipeline(seed: int = 0):
    """A complete, randomly initialised ``PixArtSigmaPipeline`` that takes text prompts offline: a tiny T5
    (d_model 24 = the tiny transformer's caption channels) with a word-level T5-style tokenizer (``... <eos>``,
    padded to the pipeline's 300 tokens). Call it with ``use_resolution_binning=False`` (tiny sample size)."""
    from diffusers import PixArtSigmaPipeline

    base = build_pixart_pipeline(seed=seed)
    pipe = PixArtSigmaPipeline(tokenizer=word_tokenizer("$A <eos>"), text_encoder=tiny_t5(seed + 1, 24), vae=base.vae,
                               transformer=base.transformer, scheduler=base.scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pixart_prompt_kwargs(transformer, draw, text_len: int, valid: tuple[int, int], device="cpu") -> dict:
    """``PixArtSigmaPipeline`` (or ``PixArtAlphaPipeline``) call keywords for a CFG pair of padded T5-like
    captions, without resolution binning (see ``Kit.prompt_kwargs``)."""
    channels = transformer.config.caption_channels
    return dict(prompt_embeds=draw("prompt", 1, text_len, channels),
                prompt_attention_mask=prefix_mask(valid[0], text_len, device),
                negative_prompt_embeds=draw("negative", 1, text_len, channels),
                negative_prompt_attention_mask=prefix_mask(valid[1], text_len, device), negative_prompt=None,
                use_resolution_binning=False)


def pixart_bench_overrides(layers: int, heads=None, hidden_size=None, kv_heads=None) -> dict:
    """Transformer overrides for bench e2e: only the depth (the real width always)."""
    return dict(num_layers=layers)


# T5 caption padded to 300 tokens, its padding bias in cross-attention
KIT = Kit(rank=1, name="pixart", label="PixArt", tiny_name="tiny-random-pixart", build=build_pixart,
          inputs=pixart_inputs,
    pipeline=build_pixart_pipeline, text_pipeline=build_pixart_text_pipeline, prompt_kwargs=pixart_prompt_kwargs,
    tiny_run=TinyRun(24, 40, grid=(6, 10)), real_preset="pixart-sigma", bench_text_len=300,
    bench_overrides=pixart_bench_overrides)
