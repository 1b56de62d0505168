"""Qwen-Image (``QwenImageTransformer2DModel``, ``QwenImagePipeline``): random transformers built from configs, their
inputs, and tiny pipelines. ``tiny`` is for unit tests, ``qwen-image`` the real model's attention shape (hidden 3072 =
24 heads of 128, 60 blocks, Qwen2.5-VL-7B states of 3584) with as many layers as asked."""

from __future__ import annotations

import torch

from safe_dit.config import SafeDitError
from safe_dit.testing.kit import Kit, TinyRun
from safe_dit.testing.tiny import prefix_mask

QWEN_PRESETS = {
    "tiny": dict(num_layers=2, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                 axes_dims_rope=(4, 6, 6)),
    "qwen-image": dict(num_layers=60, attention_head_dim=128, num_attention_heads=24, joint_attention_dim=3584,
                       axes_dims_rope=(16, 56, 56)),
}


def build_qwen_image(preset: str = "tiny", seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """A seeded random ``QwenImageTransformer2DModel`` (16 latent channels packed 2x2: 64 in, as the real model)."""
    from diffusers import QwenImageTransformer2DModel

    if preset not in QWEN_PRESETS:
        raise ValueError(f"unknown Qwen-Image preset {preset!r}; choose one of {sorted(QWEN_PRESETS)}")
    cfg = dict(patch_size=2, in_channels=64, out_channels=16)
    cfg.update(QWEN_PRESETS[preset])
    cfg.update(overrides)
    torch.manual_seed(seed)
    model = QwenImageTransformer2DModel(**cfg)
    return (model.to(dtype) if dtype != torch.float32 else model).eval()


def qwen_image_inputs(model, height_tokens: int, width_tokens: int, batch: int = 1, text_len: int = 8,
                      valid_lens: list[int] | None = None, seed: int = 0, dtype: torch.dtype | None = None,
                      device: torch.device | str = "cpu") -> dict:
    """Keyword inputs for ``model(**inputs)`` as ``QwenImagePipeline`` passes them: packed latents [B, N, 64], caption
    states [B, T, Dc], a caption mask [B, T] only where some caption is padded (the pipeline drops an all-ones one)."""
    cfg = model.config
    dtype = dtype or next(model.parameters()).dtype
    g = torch.Generator().manual_seed(seed)
    valid_lens = valid_lens or [text_len] * batch
    if len(valid_lens) != batch:
        raise ValueError("valid_lens needs one length per sample")
    mask = (torch.arange(text_len)[None] < torch.tensor(valid_lens)[:, None]).to(device, torch.int64)  # [B, T]
    return dict(
        hidden_states=torch.randn(batch, height_tokens * width_tokens, cfg.in_channels, generator=g).to(device, dtype),
        encoder_hidden_states=torch.randn(batch, text_len, cfg.joint_attention_dim, generator=g).to(device, dtype),
        encoder_hidden_states_mask=None if bool(mask.all()) else mask,
        timestep=torch.rand(batch, generator=g).to(device, dtype),
        img_shapes=[[(1, height_tokens, width_tokens)]] * batch,
        return_dict=False,
    )


def tiny_qwen_vae(seed: int = 0):
    """A seeded tiny random ``AutoencoderKLQwenImage`` (16 latent channels, spatial factor 2)."""
    from diffusers import AutoencoderKLQwenImage

    torch.manual_seed(seed)
    return AutoencoderKLQwenImage(base_dim=8, z_dim=16, dim_mult=[1, 2], num_res_blocks=1,
                                  temperal_downsample=[False]).eval()


def build_qwen_image_pipeline(transformer=None, seed: int = 0):
    """A diffusers ``QwenImagePipeline`` around ``transformer`` with a tiny random VAE and no text encoder: call it
    with ``prompt_embeds``/``prompt_embeds_mask``."""
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline

    transformer = transformer if transformer is not None else build_qwen_image("tiny", seed=seed)
    pipe = QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=tiny_qwen_vae(seed), text_encoder=None,
                             tokenizer=None, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_qwen_image_text_pipeline(seed: int = 0):
    raise SafeDitError("no offline tiny text pipeline for Qwen-Image (its prompt encoder is Qwen2.5-VL with a chat "
                       "template); use `--model DIR` with a local QwenImagePipeline, or the Python API with "
                       "prompt_embeds")


def qwen_image_prompt_kwargs(transformer, draw, text_len: int, valid=None, device="cpu") -> dict:
    """``QwenImagePipeline`` call keywords: one prompt's states and mask (no negative prompt: true CFG would make two
    calls per step; see ``Kit.prompt_kwargs``)."""
    kwargs = dict(prompt_embeds=draw("prompt", 1, text_len, transformer.config.joint_attention_dim))
    if valid is not None:
        kwargs["prompt_embeds_mask"] = prefix_mask(valid[0], text_len, device)
    return kwargs


def qwen_image_bench_overrides(layers: int, heads=None, hidden_size=None, kv_heads=None) -> dict:
    return dict(num_layers=layers) | (dict(num_attention_heads=heads) if heads else {})


# Qwen2.5-VL captions (up to 1024 tokens, unpadded for one prompt); true CFG is two calls per step: batch 1 runs
KIT = Kit(rank=5, name="qwen-image", label="Qwen-Image", tiny_name="tiny-random-qwen-image", build=build_qwen_image,
    inputs=qwen_image_inputs, pipeline=build_qwen_image_pipeline, text_pipeline=build_qwen_image_text_pipeline,
    prompt_kwargs=qwen_image_prompt_kwargs, tiny_run=TinyRun(32, 48, grid=(8, 12), guidance=1.0),
    real_preset="qwen-image",
    bench_text_len=256, bench_overrides=qwen_image_bench_overrides, guidance_distilled=True, latent_patch=2)
