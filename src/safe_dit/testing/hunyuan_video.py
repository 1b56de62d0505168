"""HunyuanVideo (``HunyuanVideoTransformer3DModel``, ``HunyuanVideoPipeline``): random transformers built from configs,
their inputs, and tiny pipelines. ``tiny`` is for unit tests; ``hunyuan-video`` is the real model's attention shape
(hidden 3072 = 24 heads of 128, 20 dual- and 40 single-stream blocks, 2 refiner blocks, Llava-Llama-3 states of
4096, CLIP pooled 768, 2 x 2 spatial patches, 3-D RoPE axes 16/56/56: the class defaults, as in
hunyuanvideo-community/HunyuanVideo) with as many blocks as asked."""

from __future__ import annotations

import torch

from safe_dit.config import SafeDitError
from safe_dit.testing.kit import Kit, TinyRun
from safe_dit.testing.tiny import prefix_mask

HUNYUAN_PRESETS = {
    "tiny": dict(num_layers=1, num_single_layers=2, num_refiner_layers=1, num_attention_heads=2, attention_head_dim=16,
                 in_channels=4, out_channels=4, text_embed_dim=32, pooled_projection_dim=20, rope_axes_dim=(4, 6, 6)),
    "hunyuan-video": dict(num_layers=20, num_single_layers=40, num_refiner_layers=2, num_attention_heads=24,
                          attention_head_dim=128, in_channels=16, out_channels=16, text_embed_dim=4096,
                          pooled_projection_dim=768, rope_axes_dim=(16, 56, 56)),
}


def build_hunyuan_video(preset: str = "tiny", seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """A seeded random ``HunyuanVideoTransformer3DModel`` (text-to-video, guidance embedding, 2 x 2 spatial patches).
    ``num_layers`` sets both block kinds unless ``num_single_layers`` is given too."""
    from diffusers import HunyuanVideoTransformer3DModel

    if preset not in HUNYUAN_PRESETS:
        raise ValueError(f"unknown HunyuanVideo preset {preset!r}; choose one of {sorted(HUNYUAN_PRESETS)}")
    cfg = dict(patch_size=2, patch_size_t=1, guidance_embeds=True)
    cfg.update(HUNYUAN_PRESETS[preset])
    if "num_layers" in overrides and "num_single_layers" not in overrides:
        overrides = dict(overrides, num_single_layers=overrides["num_layers"])
    cfg.update(overrides)
    torch.manual_seed(seed)
    model = HunyuanVideoTransformer3DModel(**cfg)
    return (model.to(dtype) if dtype != torch.float32 else model).eval()


def hunyuan_video_inputs(model, height_tokens: int, width_tokens: int, batch: int = 1, text_len: int = 8,
                         valid_lens: list[int] | None = None, seed: int = 0, dtype: torch.dtype | None = None,
                         device: torch.device | str = "cpu", frames: int = 2) -> dict:
    """Keyword inputs for ``model(**inputs)`` as ``HunyuanVideoPipeline`` passes them: latents [B, C, F, H, W] (H, W
    the token grid times the patch), caption states [B, T, Dt] with their mask right-padded to ``valid_lens``, CLIP
    pooled states and the distilled guidance (x 1000, as the pipeline scales it)."""
    cfg = model.config
    dtype = dtype or next(model.parameters()).dtype
    g = torch.Generator().manual_seed(seed)
    valid_lens = valid_lens or [text_len] * batch
    if len(valid_lens) != batch:
        raise ValueError("valid_lens needs one length per sample")
    p = cfg.patch_size
    mask = (torch.arange(text_len)[None] < torch.tensor(valid_lens)[:, None]).to(device, torch.int64)  # [B, T]
    return dict(
        hidden_states=torch.randn(batch, cfg.in_channels, frames * cfg.patch_size_t, height_tokens * p,
                                  width_tokens * p, generator=g).to(device, dtype),
        timestep=(torch.rand(batch, generator=g) * 1000).to(device, dtype),
        encoder_hidden_states=torch.randn(batch, text_len, cfg.text_embed_dim, generator=g).to(device, dtype),
        encoder_attention_mask=mask,
        pooled_projections=torch.randn(batch, cfg.pooled_projection_dim, generator=g).to(device, dtype),
        guidance=torch.full((batch,), 6000.0).to(device, dtype),
        return_dict=False,
    )


def tiny_hunyuan_video_vae(latent_channels: int = 4, seed: int = 0):
    """A seeded tiny random ``AutoencoderKLHunyuanVideo`` (spatial factor 4, temporal 4)."""
    from diffusers import AutoencoderKLHunyuanVideo

    torch.manual_seed(seed)
    blocks = dict(down_block_types=("HunyuanVideoDownBlock3D",) * 3, up_block_types=("HunyuanVideoUpBlock3D",) * 3)
    return AutoencoderKLHunyuanVideo(latent_channels=latent_channels, block_out_channels=(8, 8, 16),
                                     layers_per_block=1, norm_num_groups=4, spatial_compression_ratio=4,
                                     temporal_compression_ratio=4, **blocks).eval()


def build_hunyuan_video_pipeline(transformer=None, seed: int = 0):
    """A diffusers ``HunyuanVideoPipeline`` around ``transformer`` with a tiny random VAE and no text encoders: call it
    with ``prompt_embeds``/``prompt_attention_mask``/``pooled_prompt_embeds``."""
    from diffusers import FlowMatchEulerDiscreteScheduler, HunyuanVideoPipeline

    transformer = transformer if transformer is not None else build_hunyuan_video("tiny", seed=seed)
    pipe = HunyuanVideoPipeline(text_encoder=None, tokenizer=None, transformer=transformer,
                                vae=tiny_hunyuan_video_vae(transformer.config.in_channels, seed),
                                scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), text_encoder_2=None,
                                tokenizer_2=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_hunyuan_video_text_pipeline(seed: int = 0):
    raise SafeDitError("no offline tiny text pipeline for HunyuanVideo (its prompt encoder is Llava-Llama-3 with a "
                       "prompt template, cropped); use `--model DIR` with a local HunyuanVideoPipeline, or the Python "
                       "API with prompt_embeds")


def hunyuan_video_prompt_kwargs(transformer, draw, text_len: int, valid=None, device="cpu") -> dict:
    """``HunyuanVideoPipeline`` call keywords: one prompt's caption states, mask and CLIP pooled projection
    (guidance-distilled: no negative prompt; see ``Kit.prompt_kwargs``)."""
    cfg = transformer.config
    valid_tokens = text_len if valid is None else valid[0]
    return dict(prompt_embeds=draw("prompt", 1, text_len, cfg.text_embed_dim),
                prompt_attention_mask=prefix_mask(valid_tokens, text_len, device),
                pooled_prompt_embeds=draw("pooled", 1, cfg.pooled_projection_dim))


def hunyuan_video_bench_overrides(layers: int, heads=None, hidden_size=None, kv_heads=None) -> dict:
    """Transformer overrides for bench e2e: ``layers`` dual- and single-stream blocks; --heads sets the width."""
    return dict(num_layers=layers) | (dict(num_attention_heads=heads) if heads else {})


def hunyuan_video_frame_kwargs(latent_frames: int) -> dict:
    """The pipeline's ``num_frames`` for that many latent frames (the kit's tiny VAE compresses time 4x, keeping the
    first frame)."""
    return dict(num_frames=4 * (latent_frames - 1) + 1)


# Llava-Llama-3 captions (up to 256 tokens after the template crop); guidance-distilled: batch 1, no safe-sw.
# bench e2e: 16 latent frames x 32 x 32 = 16,384 video tokens by default.
KIT = Kit(rank=9, name="hunyuan-video", label="HunyuanVideo", tiny_name="tiny-random-hunyuan-video",
          build=build_hunyuan_video, inputs=hunyuan_video_inputs, pipeline=build_hunyuan_video_pipeline,
          text_pipeline=build_hunyuan_video_text_pipeline, prompt_kwargs=hunyuan_video_prompt_kwargs,
          tiny_run=TinyRun(32, 48, grid=(2, 4, 6), guidance=6.0, frames=5), real_preset="hunyuan-video",
          bench_text_len=256, bench_overrides=hunyuan_video_bench_overrides, guidance_distilled=True,
          bench_frames=16, frame_kwargs=hunyuan_video_frame_kwargs, text_prompts=False)
