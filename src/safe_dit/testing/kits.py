"""Randomly initialised Lumina-Next transformers built from configs, and matching inputs.

Tests and benchmarks need no hub: ``tiny`` is for unit tests, ``lumina-next-2b`` is the real
model's attention shape (hidden 2304, 32 heads of dim 72) with as many layers as asked.
"""

from __future__ import annotations

import torch
from diffusers import LuminaNextDiT2DModel
from diffusers.models.embeddings import get_2d_rotary_pos_embed_lumina

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
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, LuminaPipeline

    transformer = transformer if transformer is not None else build_lumina_next("tiny", seed=seed)
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=transformer.config.in_channels,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16), norm_num_groups=8, sample_size=32,
    ).eval()
    pipe = LuminaPipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None, tokenizer=None
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


TINY_WORDS = (
    "<pad> <eos> <bos> <unk> a an the and red green blue yellow white black gray orange purple circle square "
    "triangle at in top bottom left right center middle on background of photo"
).split()


def word_tokenizer(template: str, max_length: int | None = None):
    """A word-level fast tokenizer over ``TINY_WORDS`` built in code (no hub): ``template`` places the
    special tokens around the words (``"<bos> $A"`` Gemma-like, ``"<bos> $A <eos>"`` CLIP-like, ``"$A <eos>"``
    T5-like); ``max_length`` becomes ``model_max_length``."""
    from tokenizers import Tokenizer, models as tok_models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(TINY_WORDS)}
    tok = Tokenizer(tok_models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = [(t, vocab[t]) for t in ("<bos>", "<eos>") if t in template]
    tok.post_processor = processors.TemplateProcessing(single=template, special_tokens=specials)
    extra = {} if max_length is None else {"model_max_length": max_length}
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>", padding_side="right", **extra)


def build_tiny_text_pipeline(seed: int = 0):
    """A complete, randomly initialised ``LuminaPipeline`` that takes text prompts offline: a
    word-level tokenizer built in code (Gemma-style ``<bos>`` first), a tiny random Gemma text
    encoder, the tiny transformer and VAE. For smoke tests of the CLI: it draws noise."""
    from diffusers import LuminaPipeline
    from transformers import GemmaConfig, GemmaModel

    tokenizer = word_tokenizer("<bos> $A")
    vocab = tokenizer.get_vocab()
    torch.manual_seed(seed)
    text_encoder = GemmaModel(GemmaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=2, num_key_value_heads=1, head_dim=16)).eval()
    base = build_lumina_pipeline(seed=seed)
    pipe = LuminaPipeline(transformer=base.transformer, scheduler=base.scheduler, vae=base.vae,
                          text_encoder=text_encoder, tokenizer=tokenizer)
    return pipe


# -- PixArt (PixArt-Sigma / PixArt-Alpha transformer) ------------------------------------------

PIXART_PRESETS = {
    "tiny": dict(num_attention_heads=2, attention_head_dim=16, num_layers=2, cross_attention_dim=32, caption_channels=24),
    # PixArt-Sigma XL/2: hidden 1152 = 16 heads of 72, 28 blocks, T5-XXL caption states (4096).
    "pixart-sigma": dict(num_attention_heads=16, attention_head_dim=72, num_layers=28, cross_attention_dim=1152,
                         caption_channels=4096, sample_size=128, interpolation_scale=2, use_additional_conditions=False),
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
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtSigmaPipeline

    transformer = transformer if transformer is not None else build_pixart("tiny", seed=seed)
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=transformer.config.in_channels,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16), norm_num_groups=8, sample_size=32,
    ).eval()
    pipe = PixArtSigmaPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer,
                               scheduler=DPMSolverMultistepScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


# -- SD3 (SD3Transformer2DModel) -------------------------------------------------------------------

SD3_PRESETS = {
    "tiny": dict(num_layers=2, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=24,
                 caption_projection_dim=32, pooled_projection_dim=20, in_channels=4, out_channels=4),
    # SD3-Medium: hidden 1536 = 24 heads of 64, 24 joint blocks, CLIP-L/G + T5 states (4096), pooled 2048.
    "sd3-medium": dict(num_layers=24, attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                       caption_projection_dim=1536, pooled_projection_dim=2048, in_channels=16, out_channels=16),
}


def build_sd3(preset: str = "tiny", seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """A seeded random ``SD3Transformer2DModel`` (patch 2, position table large enough for 128x128 tokens)."""
    from diffusers import SD3Transformer2DModel

    if preset not in SD3_PRESETS:
        raise ValueError(f"unknown SD3 preset {preset!r}; choose one of {sorted(SD3_PRESETS)}")
    cfg = dict(sample_size=32, patch_size=2, pos_embed_max_size=128)
    cfg.update(SD3_PRESETS[preset])
    cfg.update(overrides)
    torch.manual_seed(seed)
    model = SD3Transformer2DModel(**cfg)
    return (model.to(dtype) if dtype != torch.float32 else model).eval()


def sd3_inputs(model, height_tokens: int, width_tokens: int, batch: int = 1, text_len: int = 8, seed: int = 0,
               dtype: torch.dtype | None = None, device: torch.device | str = "cpu", **_ignored) -> dict:
    """Keyword inputs for ``model(**inputs)`` as ``StableDiffusion3Pipeline`` passes them (no mask exists)."""
    cfg = model.config
    dtype = dtype or next(model.parameters()).dtype
    p = cfg.patch_size
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(batch, cfg.in_channels, height_tokens * p, width_tokens * p, generator=g).to(device, dtype),
        encoder_hidden_states=torch.randn(batch, text_len, cfg.joint_attention_dim, generator=g).to(device, dtype),
        pooled_projections=torch.randn(batch, cfg.pooled_projection_dim, generator=g).to(device, dtype),
        timestep=(torch.rand(batch, generator=g) * 1000).to(device, dtype),
        return_dict=False,
    )


def _tiny_vae(latent_channels: int, seed: int = 0, **extra):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16), norm_num_groups=8, sample_size=32, **extra,
    ).eval()


def build_sd3_pipeline(transformer=None, seed: int = 0):
    """A diffusers ``StableDiffusion3Pipeline`` around ``transformer`` with a tiny random VAE and no text
    encoders: call it with ``prompt_embeds``/``pooled_prompt_embeds`` and the negative ones."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    transformer = transformer if transformer is not None else build_sd3("tiny", seed=seed)
    vae = _tiny_vae(transformer.config.in_channels, seed, shift_factor=0.0609, scaling_factor=1.5305)
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
                                    text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                                    text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# -- FLUX (FluxTransformer2DModel) -----------------------------------------------------------------

FLUX_PRESETS = {
    "tiny": dict(num_layers=1, num_single_layers=2, attention_head_dim=16, num_attention_heads=2, in_channels=16,
                 joint_attention_dim=24, pooled_projection_dim=20, axes_dims_rope=(4, 6, 6)),
    # FLUX.1-dev: hidden 3072 = 24 heads of 128, 19 double + 38 single blocks, T5 states (4096), CLIP pooled (768).
    "flux-dev": dict(num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24, in_channels=64,
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
    vae = _tiny_vae(transformer.config.in_channels // 4, seed, shift_factor=0.1159, scaling_factor=0.3611)
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _tiny_clip(seed: int, hidden: int, projection: int | None = None):
    """A tiny random CLIP text encoder (with a text projection when ``projection`` is given)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=len(TINY_WORDS), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=16, projection_dim=projection or hidden,
                         bos_token_id=TINY_WORDS.index("<bos>"), eos_token_id=TINY_WORDS.index("<eos>"),
                         pad_token_id=TINY_WORDS.index("<pad>"))
    return (CLIPTextModelWithProjection(cfg) if projection else CLIPTextModel(cfg)).eval()


def _tiny_t5(seed: int, d_model: int):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    return T5EncoderModel(T5Config(vocab_size=len(TINY_WORDS), d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=2,
                                   num_heads=2, pad_token_id=TINY_WORDS.index("<pad>"),
                                   eos_token_id=TINY_WORDS.index("<eos>"))).eval()


def build_sd3_text_pipeline(seed: int = 0):
    """A complete, randomly initialised ``StableDiffusion3Pipeline`` that takes text prompts offline: two tiny
    CLIP encoders (hidden 8 + 8, projections 10 + 10 = the pooled 20) and a tiny T5 (d_model 24 = the joint
    dim), word-level tokenizers built in code (CLIP: 16 tokens, <bos> ... <eos>; T5: ... <eos>)."""
    from diffusers import StableDiffusion3Pipeline

    base = build_sd3_pipeline(seed=seed)
    clip = word_tokenizer("<bos> $A <eos>", max_length=16)
    pipe = StableDiffusion3Pipeline(
        transformer=base.transformer, scheduler=base.scheduler, vae=base.vae,
        text_encoder=_tiny_clip(seed + 1, 8, 10), tokenizer=clip, text_encoder_2=_tiny_clip(seed + 2, 8, 10),
        tokenizer_2=clip, text_encoder_3=_tiny_t5(seed + 3, 24), tokenizer_3=word_tokenizer("$A <eos>"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_flux_text_pipeline(seed: int = 0):
    """A complete, randomly initialised ``FluxPipeline`` that takes text prompts offline: a tiny CLIP
    (pooled 20) and a tiny T5 (d_model 24 = the joint dim) with word-level tokenizers built in code."""
    from diffusers import FluxPipeline

    base = build_flux_pipeline(seed=seed)
    pipe = FluxPipeline(scheduler=base.scheduler, vae=base.vae, transformer=base.transformer,
                        text_encoder=_tiny_clip(seed + 1, 20), tokenizer=word_tokenizer("<bos> $A <eos>", max_length=16),
                        text_encoder_2=_tiny_t5(seed + 2, 24), tokenizer_2=word_tokenizer("$A <eos>"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_pixart_text_pipeline(seed: int = 0):
    """A complete, randomly initialised ``PixArtSigmaPipeline`` that takes text prompts offline: a tiny T5
    (d_model 24 = the tiny transformer's caption channels) with a word-level T5-style tokenizer (``... <eos>``,
    padded to the pipeline's 300 tokens). Call it with ``use_resolution_binning=False`` (tiny sample size)."""
    from diffusers import PixArtSigmaPipeline

    base = build_pixart_pipeline(seed=seed)
    pipe = PixArtSigmaPipeline(tokenizer=word_tokenizer("$A <eos>"), text_encoder=_tiny_t5(seed + 1, 24), vae=base.vae,
                               transformer=base.transformer, scheduler=base.scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe
