"""Wan (``WanTransformer3DModel``, text-to-video ``WanPipeline``): random transformers built from configs, their
inputs, and tiny pipelines (one transformer, or Wan 2.2's two with a boundary). ``tiny`` is for unit tests,
``wan2.1-t2v-1.3b`` the real model's attention shape (hidden 1536 = 12 heads of 128, 30 blocks, FFN 8960, UMT5-XXL
caption states of 4096, patch (1, 2, 2)) with as many layers as asked."""

from __future__ import annotations

import torch

from safe_dit.testing.kit import Kit, TinyRun
from safe_dit.testing.tiny import TINY_WORDS, word_tokenizer

WAN_PRESETS = {
    "tiny": dict(num_attention_heads=2, attention_head_dim=12, text_dim=32, freq_dim=32, ffn_dim=48, num_layers=2,
                 rope_max_seq_len=32),
    "wan2.1-t2v-1.3b": dict(num_attention_heads=12, attention_head_dim=128, text_dim=4096, freq_dim=256,
                            ffn_dim=8960, num_layers=30, rope_max_seq_len=1024),
}
TEMPORAL_FACTOR = 4  # AutoencoderKLWan: 1 + 4 (F - 1) video frames make F latent frames


def build_wan(preset: str = "tiny", seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """A seeded random ``WanTransformer3DModel`` (16 latent channels, (1, 2, 2) patch, cross-attention norm and
    RMS QK-norm across heads, as Wan 2.1/2.2 text-to-video)."""
    from diffusers import WanTransformer3DModel

    if preset not in WAN_PRESETS:
        raise ValueError(f"unknown Wan preset {preset!r}; choose one of {sorted(WAN_PRESETS)}")
    cfg = dict(patch_size=(1, 2, 2), in_channels=16, out_channels=16, cross_attn_norm=True,
               qk_norm="rms_norm_across_heads", eps=1e-6)
    cfg.update(WAN_PRESETS[preset])
    cfg.update(overrides)
    torch.manual_seed(seed)
    model = WanTransformer3DModel(**cfg)
    return (model.to(dtype) if dtype != torch.float32 else model).eval()


def zero_padded(states: torch.Tensor, valid: int) -> torch.Tensor:
    """Caption states [B, T, D] with the rows after the first ``valid`` zeroed, as ``WanPipeline`` pads them."""
    out = states.clone()
    out[:, valid:] = 0
    return out


def wan_inputs(model, height_tokens: int, width_tokens: int, batch: int = 1, text_len: int = 8,
               valid_lens: list[int] | None = None, seed: int = 0, dtype: torch.dtype | None = None,
               device: torch.device | str = "cpu", frames: int = 2) -> dict:
    """Keyword inputs for ``model(**inputs)`` as ``WanPipeline`` passes them: video latents [B, C, F, H, W]
    (``frames`` latent frames), zero-padded caption states [B, T, text_dim], one timestep per sample."""
    cfg = model.config
    dtype = dtype or next(model.parameters()).dtype
    pt, ph, pw = cfg.patch_size
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, cfg.in_channels, frames * pt, height_tokens * ph, width_tokens * pw, generator=g)
    valid_lens = valid_lens or [text_len] * batch
    if len(valid_lens) != batch:
        raise ValueError("valid_lens needs one length per sample")
    captions = torch.randn(batch, text_len, cfg.text_dim, generator=g)
    captions = torch.cat([zero_padded(captions[i:i + 1], v) for i, v in enumerate(valid_lens)])
    return dict(hidden_states=latents.to(device, dtype), encoder_hidden_states=captions.to(device, dtype),
                timestep=torch.randint(0, 1000, (batch,), generator=g).to(device), return_dict=False)


def tiny_wan_vae(seed: int = 0):
    """A seeded tiny random ``AutoencoderKLWan`` (16 latent channels, spatial factor 8, temporal factor 4)."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    return AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                            temperal_downsample=[False, True, True]).eval()


def tiny_umt5(seed: int, d_model: int):
    """A tiny random UMT5 encoder over ``TINY_WORDS`` (``WanPipeline``'s text encoder class)."""
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    cfg = UMT5Config(vocab_size=len(TINY_WORDS), d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=2, num_heads=2,
                     pad_token_id=TINY_WORDS.index("<pad>"), eos_token_id=TINY_WORDS.index("<eos>"),
                     decoder_start_token_id=TINY_WORDS.index("<pad>"))
    return UMT5EncoderModel(cfg).eval()


def _scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(shift=3.0)


def build_wan_pipeline(transformer=None, seed: int = 0):
    """A diffusers ``WanPipeline`` around ``transformer`` with a tiny random VAE and no text encoder: call it with
    ``prompt_embeds`` (and ``negative_prompt_embeds``), ``num_frames`` = 1 + 4 (latent frames - 1)."""
    from diffusers import WanPipeline

    transformer = transformer if transformer is not None else build_wan("tiny", seed=seed)
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=tiny_wan_vae(seed), scheduler=_scheduler(),
                       transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_wan22_pipeline(seed: int = 0, boundary_ratio: float = 0.6, transformer=None, transformer_2=None):
    """Wan 2.2 A14B's layout, tiny: a ``WanPipeline`` with two transformers (``transformer`` for timesteps at or
    above ``boundary_ratio * 1000``, ``transformer_2`` below), randomly initialised with different seeds."""
    from diffusers import WanPipeline

    transformer = transformer if transformer is not None else build_wan("tiny", seed=seed)
    transformer_2 = transformer_2 if transformer_2 is not None else build_wan("tiny", seed=seed + 100)
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=tiny_wan_vae(seed), scheduler=_scheduler(),
                       transformer=transformer, transformer_2=transformer_2, boundary_ratio=boundary_ratio)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_wan_text_pipeline(seed: int = 0):
    """A complete, randomly initialised ``WanPipeline`` that takes text prompts offline: a tiny UMT5 (d_model 32 = the
    tiny transformer's text_dim) with a word-level T5-style tokenizer (``... <eos>``)."""
    from diffusers import WanPipeline

    base = build_wan_pipeline(seed=seed)
    pipe = WanPipeline(tokenizer=word_tokenizer("$A <eos>"), text_encoder=tiny_umt5(seed + 1, 32), vae=base.vae,
                       scheduler=base.scheduler, transformer=base.transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def wan_frame_kwargs(latent_frames: int) -> dict:
    """``WanPipeline`` keywords for a video of ``latent_frames`` latent frames."""
    return dict(num_frames=1 + TEMPORAL_FACTOR * (latent_frames - 1))


def wan_prompt_kwargs(transformer, draw, text_len: int, valid=None, device="cpu") -> dict:
    """``WanPipeline`` call keywords: the prompt's and the negative prompt's caption states, zero-padded after their
    valid tokens as the pipeline pads them (``valid``: (prompt, negative) valid tokens; see ``Kit.prompt_kwargs``)."""
    dim = transformer.config.text_dim
    prompt, negative = draw("prompt", 1, text_len, dim), draw("negative", 1, text_len, dim)
    if valid is not None:
        prompt, negative = zero_padded(prompt, valid[0]), zero_padded(negative, valid[1])
    return dict(prompt_embeds=prompt.to(device), negative_prompt_embeds=negative.to(device))


def wan_bench_overrides(layers: int, heads=None, hidden_size=None, kv_heads=None) -> dict:
    """Transformer overrides for bench e2e: the depth, and the heads (of the real 128 channels)."""
    return dict(num_layers=layers) | (dict(num_attention_heads=heads) if heads else {})


# UMT5 captions zero-padded to 512 tokens, no mask anywhere; CFG as a conditional and an unconditional call per step
KIT = Kit(rank=8, name="wan", label="Wan", tiny_name="tiny-random-wan", build=build_wan, inputs=wan_inputs,
          pipeline=build_wan_pipeline, text_pipeline=build_wan_text_pipeline, prompt_kwargs=wan_prompt_kwargs,
          tiny_run=TinyRun(64, 96, grid=(3, 4, 6), guidance=4.0, frames=9), real_preset="wan2.1-t2v-1.3b",
          bench_text_len=512, bench_overrides=wan_bench_overrides, latent_patch=2, bench_frames=16,
          frame_kwargs=wan_frame_kwargs, cfg_calls=True)
