"""Z-Image (``ZImageTransformer2DModel``, ``ZImagePipeline``): random transformers built from configs, their inputs,
and tiny pipelines. ``tiny`` is for unit tests, ``z-image`` the real model's attention shape (hidden 3840 = 30 heads
of 128, 30 blocks and 2 + 2 refiners, Qwen3-4B caption states of 2560) with as many layers as asked."""

from __future__ import annotations

import torch

from safe_dit.testing.kit import Kit, TinyRun
from safe_dit.testing.tiny import tiny_vae, word_tokenizer

Z_IMAGE_PRESETS = {
    "tiny": dict(dim=64, n_layers=2, n_refiner_layers=2, n_heads=2, n_kv_heads=2, cap_feat_dim=32,
                 axes_dims=[8, 12, 12],
                 axes_lens=[256, 64, 64]),
    "z-image": dict(dim=3840, n_layers=30, n_refiner_layers=2, n_heads=30, n_kv_heads=30, cap_feat_dim=2560,
                    axes_dims=[32, 48, 48], axes_lens=[1024, 512, 512]),
}


def build_z_image(preset: str = "tiny", seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """A seeded random ``ZImageTransformer2DModel`` (16 latent channels, patch 2, as the real model)."""
    from diffusers import ZImageTransformer2DModel

    if preset not in Z_IMAGE_PRESETS:
        raise ValueError(f"unknown Z-Image preset {preset!r}; choose one of {sorted(Z_IMAGE_PRESETS)}")
    cfg = dict(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16)
    cfg.update(Z_IMAGE_PRESETS[preset])
    overrides = dict(overrides)
    if "num_layers" in overrides:  # the name every other kit's builder (and audit --layers) uses
        overrides["n_layers"] = overrides.pop("num_layers")
    if "n_heads" in overrides and "dim" not in overrides:  # a width at the preset's head dim (RoPE axes fit it)
        overrides.update(dim=overrides["n_heads"] * cfg["dim"] // cfg["n_heads"], n_kv_heads=overrides["n_heads"])
    cfg.update(overrides)
    torch.manual_seed(seed)
    model = ZImageTransformer2DModel(**cfg)
    # the real checkpoint's pad tokens are trained; zeros (the init) would hide a pad row taken for another
    with torch.no_grad():
        model.x_pad_token.normal_()
        model.cap_pad_token.normal_()
    return (model.to(dtype) if dtype != torch.float32 else model).eval()


def z_image_inputs(model, height_tokens: int, width_tokens: int, batch: int = 1, text_len: int = 8,
                   valid_lens: list[int] | None = None, seed: int = 0, dtype: torch.dtype | None = None,
                   device: torch.device | str = "cpu") -> dict:
    """Keyword inputs for ``model(**inputs)`` as ``ZImagePipeline`` passes them: one latent [C, 1, h*2, w*2] and one
    unpadded caption [T_i, Dc] per sample (``valid_lens`` tokens each, default ``text_len``), timesteps [B]."""
    cfg = model.config
    dtype = dtype or next(model.parameters()).dtype
    p = cfg.all_patch_size[0]
    g = torch.Generator().manual_seed(seed)
    valid_lens = valid_lens or [text_len] * batch
    if len(valid_lens) != batch:
        raise ValueError("valid_lens needs one length per sample")
    x = [torch.randn(cfg.in_channels, 1, height_tokens * p, width_tokens * p, generator=g).to(device, dtype)
         for _ in range(batch)]
    caps = [torch.randn(n, cfg.cap_feat_dim, generator=g).to(device, dtype) for n in valid_lens]
    return dict(x=x, t=torch.rand(batch, generator=g).to(device, dtype), cap_feats=caps, return_dict=False)


def build_z_image_pipeline(transformer=None, seed: int = 0):
    """A diffusers ``ZImagePipeline`` around ``transformer`` with a tiny random VAE (latent factor 2) and no text
    encoder: call it with ``prompt_embeds``/``negative_prompt_embeds`` (lists of unpadded [T_i, Dc] states)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline

    transformer = transformer if transformer is not None else build_z_image("tiny", seed=seed)
    vae = tiny_vae(transformer.config.in_channels, seed, shift_factor=0.1159, scaling_factor=0.3611)
    pipe = ZImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae, text_encoder=None,
                          tokenizer=None, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_z_image_text_pipeline(seed: int = 0):
    """A complete, randomly initialised ``ZImagePipeline`` that takes text prompts offline: a word-level tokenizer
    built in code with a minimal chat template (the words, then <eos>), a tiny random Qwen3 text encoder, the tiny
    transformer and VAE."""
    from diffusers import ZImagePipeline
    from transformers import Qwen3Config, Qwen3Model

    tokenizer = word_tokenizer("$A")
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }} <eos>{% endfor %}"
    torch.manual_seed(seed)
    text_encoder = Qwen3Model(Qwen3Config(vocab_size=len(tokenizer.get_vocab()), hidden_size=32, intermediate_size=64,
                                          num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                          head_dim=16, max_position_embeddings=512)).eval()
    base = build_z_image_pipeline(seed=seed)
    pipe = ZImagePipeline(scheduler=base.scheduler, vae=base.vae, text_encoder=text_encoder, tokenizer=tokenizer,
                          transformer=base.transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def z_image_prompt_kwargs(transformer, draw, text_len: int, valid=None, device="cpu") -> dict:
    """``ZImagePipeline`` call keywords for a prompt and a negative prompt, unpadded as its encoder hands them over.
    The prompt gets 30 more tokens than ``valid[0]`` so that, as with a real prompt against an empty negative one,
    the CFG pair's 32-padded caption lengths differ and the stock model masks (see ``Kit.prompt_kwargs``)."""
    valid = valid or (text_len, text_len)
    dim = transformer.config.cap_feat_dim
    prompt = draw("prompt", 30 + valid[0], dim).to(device)
    negative = draw("negative", valid[1], dim).to(device)
    return dict(prompt_embeds=[prompt], negative_prompt_embeds=[negative])


def z_image_bench_overrides(layers: int, heads=None, hidden_size=None, kv_heads=None) -> dict:
    """Transformer overrides for bench e2e: ``layers`` unified blocks (and up to 2 refiners each); --heads sets the
    width at the preset's head dim."""
    overrides = dict(n_layers=layers, n_refiner_layers=min(2, layers))
    return overrides | (dict(n_heads=heads) if heads else {})


def z_image_attention_shape(transformer) -> tuple[int, int, int]:
    cfg = transformer.config
    return cfg.n_heads, cfg.n_heads, cfg.dim // cfg.n_heads  # the stock Attention has as many K/V heads as heads


# ZImagePipeline batches [cond; uncond] in one call (c + g (c - u)); 24 x 40 pixels: a 6 x 10 grid, 60 tokens padded
# to 64 with learned pad rows (an odd grid: the pad rows must follow the sensitive ones)
KIT = Kit(rank=6, name="z-image", label="Z-Image", tiny_name="tiny-random-z-image", build=build_z_image,
          inputs=z_image_inputs, pipeline=build_z_image_pipeline, text_pipeline=build_z_image_text_pipeline,
          prompt_kwargs=z_image_prompt_kwargs, tiny_run=TinyRun(24, 40, grid=(6, 10), guidance=4.0),
          real_preset="z-image", bench_text_len=128, bench_overrides=z_image_bench_overrides,
          attention_shape=z_image_attention_shape, latent_patch=2)
