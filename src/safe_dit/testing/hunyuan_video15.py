"""HunyuanVideo 1.5 (``HunyuanVideo15Transformer3DModel``, ``HunyuanVideo15Pipeline``): random transformers built
from configs, their inputs, and tiny pipelines. ``tiny`` is for unit tests; ``hunyuan-video-1.5`` is the real
model's attention shape (hidden 2048 = 16 heads of 128, 54 dual-stream blocks, 2 refiner blocks, Qwen2.5-VL states
of 3584, ByT5 states of 1472, SigLIP image states of 1152, 3-D RoPE axes 16/56/56: the class defaults, as in
tencent/HunyuanVideo-1.5) with as many blocks as asked."""

from __future__ import annotations

import torch

from safe_dit.config import SafeDitError
from safe_dit.testing.kit import Kit, TinyRun
from safe_dit.testing.tiny import prefix_mask

HUNYUAN15_PRESETS = {
    "tiny": dict(num_layers=2, num_refiner_layers=1, num_attention_heads=2, attention_head_dim=16, in_channels=9,
                 out_channels=4, text_embed_dim=32, text_embed_2_dim=24, image_embed_dim=16, rope_axes_dim=(4, 6, 6)),
    "hunyuan-video-1.5": dict(num_layers=54, num_refiner_layers=2, num_attention_heads=16, attention_head_dim=128,
                              in_channels=65, out_channels=32, text_embed_dim=3584, text_embed_2_dim=1472,
                              image_embed_dim=1152, rope_axes_dim=(16, 56, 56)),
}


def build_hunyuan_video15(preset: str = "tiny", seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """A seeded random ``HunyuanVideo15Transformer3DModel`` (latent channels C in: [latents, condition latents,
    condition mask] = 2C + 1, as the pipelines concatenate them; patch 1 x 1 x 1 as the real model)."""
    from diffusers import HunyuanVideo15Transformer3DModel

    if preset not in HUNYUAN15_PRESETS:
        raise ValueError(f"unknown HunyuanVideo 1.5 preset {preset!r}; choose one of {sorted(HUNYUAN15_PRESETS)}")
    cfg = dict(patch_size=1, patch_size_t=1, task_type="t2v")
    cfg.update(HUNYUAN15_PRESETS[preset])
    cfg.update(overrides)
    torch.manual_seed(seed)
    model = HunyuanVideo15Transformer3DModel(**cfg)
    return (model.to(dtype) if dtype != torch.float32 else model).eval()


def hunyuan_video15_inputs(model, height_tokens: int, width_tokens: int, batch: int = 1, text_len: int = 8,
                           valid_lens: list[int] | None = None, seed: int = 0, dtype: torch.dtype | None = None,
                           device: torch.device | str = "cpu", frames: int = 2, glyph_len: int = 4,
                           glyph_valid: list[int] | None = None, image_tokens: int = 4, image: bool = False) -> dict:
    """Keyword inputs for ``model(**inputs)`` as ``HunyuanVideo15Pipeline`` passes them: latents [B, 2C + 1, F, H, W]
    (condition latents and mask zero: text-to-video), Qwen2.5-VL caption states [B, T, Dt] with their mask (float
    0/1, right-padded to ``valid_lens``), ByT5 glyph states [B, T2, D2] with theirs (``glyph_valid``, default none
    valid: a prompt without quoted text), and ``image_tokens`` image-embed slots (zero for text-to-video; random,
    an image-to-video conditioning, with ``image``)."""
    cfg = model.config
    dtype = dtype or next(model.parameters()).dtype
    g = torch.Generator().manual_seed(seed)
    valid_lens = valid_lens or [text_len] * batch
    glyph_valid = glyph_valid or [0] * batch
    if len(valid_lens) != batch or len(glyph_valid) != batch:
        raise ValueError("valid_lens and glyph_valid need one length per sample")

    def mask(lens, length):
        return (torch.arange(length)[None] < torch.tensor(lens)[:, None]).to(device, dtype)  # [B, length]

    channels = cfg.out_channels
    latents = torch.randn(batch, channels, frames, height_tokens, width_tokens, generator=g)
    condition = torch.zeros(batch, cfg.in_channels - channels, frames, height_tokens, width_tokens)
    images = torch.randn(batch, image_tokens, cfg.image_embed_dim, generator=g) if image \
        else torch.zeros(batch, image_tokens, cfg.image_embed_dim)
    return dict(
        hidden_states=torch.cat([latents, condition], dim=1).to(device, dtype),
        timestep=(torch.rand(batch, generator=g) * 1000).to(device, dtype),
        encoder_hidden_states=torch.randn(batch, text_len, cfg.text_embed_dim, generator=g).to(device, dtype),
        encoder_attention_mask=mask(valid_lens, text_len),
        encoder_hidden_states_2=torch.randn(batch, glyph_len, cfg.text_embed_2_dim, generator=g).to(device, dtype),
        encoder_attention_mask_2=mask(glyph_valid, glyph_len),
        image_embeds=images.to(device, dtype),
        return_dict=False,
    )


def tiny_hunyuan_video15_vae(latent_channels: int = 4, seed: int = 0):
    """A seeded tiny random ``AutoencoderKLHunyuanVideo15`` (spatial factor 2, no temporal compression)."""
    from diffusers import AutoencoderKLHunyuanVideo15

    torch.manual_seed(seed)
    return AutoencoderKLHunyuanVideo15(latent_channels=latent_channels, block_out_channels=(8, 16), layers_per_block=1,
                                       spatial_compression_ratio=2, temporal_compression_ratio=1).eval()


def build_hunyuan_video15_pipeline(transformer=None, seed: int = 0):
    """A diffusers ``HunyuanVideo15Pipeline`` around ``transformer`` with a tiny random VAE, a guider of scale 1 (one
    transformer call per step) and no text encoders: call it with ``prompt_embeds``/``prompt_embeds_mask`` and
    ``prompt_embeds_2``/``prompt_embeds_mask_2``."""
    from diffusers import ClassifierFreeGuidance, FlowMatchEulerDiscreteScheduler, HunyuanVideo15Pipeline

    transformer = transformer if transformer is not None else build_hunyuan_video15("tiny", seed=seed)
    pipe = HunyuanVideo15Pipeline(text_encoder=None, tokenizer=None, transformer=transformer,
                                  vae=tiny_hunyuan_video15_vae(transformer.config.out_channels, seed),
                                  scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0), text_encoder_2=None,
                                  tokenizer_2=None, guider=ClassifierFreeGuidance(guidance_scale=1.0))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_hunyuan_video15_text_pipeline(seed: int = 0):
    raise SafeDitError("no offline tiny text pipeline for HunyuanVideo 1.5 (its prompt encoders are Qwen2.5-VL with a "
                       "chat template and ByT5 for quoted glyph text); use `--model DIR` with a local "
                       "HunyuanVideo15Pipeline, or the Python API with prompt_embeds")


def hunyuan_video15_prompt_kwargs(transformer, draw, text_len: int, valid=None, device="cpu") -> dict:
    """``HunyuanVideo15Pipeline`` call keywords: the prompt's and the negative prompt's caption states and masks, and 4
    ByT5 glyph slots each, none valid (prompts without quoted text). The guider uses the negative prompt only when it
    guides (scale not 1: a conditional and an unconditional call per step); see ``Kit.prompt_kwargs``."""
    cfg = transformer.config
    valid = (text_len, text_len) if valid is None else valid
    return dict(prompt_embeds=draw("prompt", 1, text_len, cfg.text_embed_dim),
                prompt_embeds_mask=prefix_mask(valid[0], text_len, device).float(),
                prompt_embeds_2=draw("pooled", 1, 4, cfg.text_embed_2_dim),
                prompt_embeds_mask_2=prefix_mask(0, 4, device).float(),
                negative_prompt_embeds=draw("negative", 1, text_len, cfg.text_embed_dim),
                negative_prompt_embeds_mask=prefix_mask(valid[1], text_len, device).float(),
                negative_prompt_embeds_2=draw("negative_pooled", 1, 4, cfg.text_embed_2_dim),
                negative_prompt_embeds_mask_2=prefix_mask(0, 4, device).float())


def hunyuan_video15_bench_overrides(layers: int, heads=None, hidden_size=None, kv_heads=None) -> dict:
    return dict(num_layers=layers) | (dict(num_attention_heads=heads) if heads else {})


def hunyuan_video15_frame_kwargs(latent_frames: int) -> dict:
    """The pipeline's ``num_frames`` for that many latent frames (the kit's tiny VAE has no temporal compression)."""
    return dict(num_frames=latent_frames)


# Qwen2.5-VL captions (up to 1000 tokens after the template crop) + 256 ByT5 slots + 729 image-embed slots; the
# guider's CFG is two calls per step. bench e2e: 16 latent frames x 32 x 32 = 16,384 video tokens by default.
KIT = Kit(rank=10, name="hunyuan-video-1.5", label="HunyuanVideo 1.5", tiny_name="tiny-random-hunyuan-video-1.5",
          build=build_hunyuan_video15, inputs=hunyuan_video15_inputs, pipeline=build_hunyuan_video15_pipeline,
          text_pipeline=build_hunyuan_video15_text_pipeline, prompt_kwargs=hunyuan_video15_prompt_kwargs,
          tiny_run=TinyRun(16, 24, grid=(2, 8, 12), guidance=None, frames=2), real_preset="hunyuan-video-1.5",
          bench_text_len=256, bench_overrides=hunyuan_video15_bench_overrides, latent_patch=1, bench_frames=16,
          frame_kwargs=hunyuan_video15_frame_kwargs, cfg_calls=True, text_prompts=False)
