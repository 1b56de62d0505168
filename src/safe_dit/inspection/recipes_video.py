"""The census's video transformer classes: tiny recipes for the text-to-video classes without a safe-dit kit, and
the reason each other video/3-D class of diffusers has none.

A recipe's inputs are what its pipeline passes at text-to-video: 2 latent frames of the census grid (token rows x
columns after patching), caption states, and the caption mask where the forward takes one (so the census shows what
the stock model does with caption padding). Wan and both HunyuanVideo generations are in the census through their
kits (``safe_dit.testing``).
"""

from __future__ import annotations

import inspect

import torch

from safe_dit.inspection.recipes import Recipe, _config, _prefix, _r

FRAMES = 2  # latent frames of every video recipe


def _ltx(m, b, lens, grid, g):
    """``LTXPipeline``: packed latents [B, F*H*W, C] (patch 1), caption states and their 0/1 mask [B, T]."""
    c, t = m.config, max(lens)
    return dict(hidden_states=_r(g, b, FRAMES * grid[0] * grid[1], c.in_channels),
                encoder_hidden_states=_r(g, b, t, c.caption_channels), timestep=torch.rand(b, generator=g) * 1000,
                encoder_attention_mask=_prefix(lens, t, torch.long), num_frames=FRAMES, height=grid[0],
                width=grid[1], rope_interpolation_scale=(8 / 25, 32, 32), return_dict=False)


def _cogvideox(m, b, lens, grid, g):
    """``CogVideoXPipeline`` (2b layout, sin-cos positions): latents [B, F, C, H, W], T5 states, no mask."""
    c, p = m.config, m.config.patch_size
    return dict(hidden_states=_r(g, b, FRAMES, c.in_channels, grid[0] * p, grid[1] * p),
                encoder_hidden_states=_r(g, b, max(lens), c.text_embed_dim),
                timestep=torch.randint(0, 1000, (b,), generator=g), return_dict=False)


def _mochi(m, b, lens, grid, g):
    """``MochiPipeline``: latents [B, C, F, H, W], T5 states and their 0/1 mask [B, T]."""
    c, p, t = m.config, m.config.patch_size, max(lens)
    return dict(hidden_states=_r(g, b, c.in_channels, FRAMES, grid[0] * p, grid[1] * p),
                encoder_hidden_states=_r(g, b, t, c.text_embed_dim),
                timestep=torch.randint(0, 1000, (b,), generator=g),
                encoder_attention_mask=_prefix(lens, t, torch.long), return_dict=False)


def _skyreels_v2(m, b, lens, grid, g):
    """``SkyReelsV2Pipeline`` (text-to-video, no diffusion forcing): latents [B, C, F, H, W], UMT5 states zero-padded
    after their valid tokens (no mask, as Wan)."""
    c = m.config
    pt, ph, pw = c.patch_size
    t = max(lens)
    states = _r(g, b, t, c.text_dim) * _prefix(lens, t, torch.float32)[..., None]
    return dict(hidden_states=_r(g, b, c.in_channels, FRAMES * pt, grid[0] * ph, grid[1] * pw),
                encoder_hidden_states=states, timestep=torch.randint(0, 1000, (b,), generator=g), return_dict=False)


def _allegro(m, b, lens, grid, g):
    """``AllegroPipeline``: latents [B, C, F, H, W], T5 states and their 0/1 mask [B, T]. Its 3-D RoPE is left out
    (``image_rotary_emb=None``): the masks do not depend on it."""
    c, p, t = m.config, m.config.patch_size, max(lens)
    return dict(hidden_states=_r(g, b, c.in_channels, FRAMES, grid[0] * p, grid[1] * p),
                encoder_hidden_states=_r(g, b, t, c.caption_channels),
                timestep=torch.randint(0, 1000, (b,), generator=g),
                encoder_attention_mask=_prefix(lens, t, torch.long), return_dict=False)


def _latte(m, b, lens, grid, g):
    """``LattePipeline``: latents [B, C, F, H, W], T5 states, temporal attention on; the pipeline passes no mask."""
    c, p = m.config, m.config.patch_size
    return dict(hidden_states=_r(g, b, c.in_channels, FRAMES, grid[0] * p, grid[1] * p),
                encoder_hidden_states=_r(g, b, max(lens), c.caption_channels),
                timestep=torch.randint(0, 1000, (b,), generator=g), enable_temporal_attentions=True,
                return_dict=False)


def _sana_video(m, b, lens, grid, g):
    """``SanaVideoPipeline``: latents [B, C, F, H, W], Gemma states and their 0/1 mask [B, T]."""
    c, t = m.config, max(lens)
    pt, ph, pw = c.patch_size
    return dict(hidden_states=_r(g, b, c.in_channels, FRAMES * pt, grid[0] * ph, grid[1] * pw),
                encoder_hidden_states=_r(g, b, t, c.caption_channels), timestep=torch.rand(b, generator=g) * 1000,
                encoder_attention_mask=_prefix(lens, t, torch.long), return_dict=False)


def _motif_video(m, b, lens, grid, g):
    """``MotifVideoPipeline`` at text-to-video: latents [B, C, F, H, W] (its conditioning channels are random here),
    caption states and their 0/1 mask [B, T], no image embeddings."""
    c, p, t = m.config, m.config.patch_size, max(lens)
    return dict(hidden_states=_r(g, b, c.in_channels, FRAMES, grid[0] * p, grid[1] * p),
                encoder_hidden_states=_r(g, b, t, c.text_embed_dim), timestep=torch.rand(b, generator=g) * 1000,
                encoder_attention_mask=_prefix(lens, t, torch.long), return_dict=False)


VIDEO_RECIPES = [
    Recipe("LTXVideoTransformer3DModel", "LTXPipeline", _config("LTXVideoTransformer3DModel", dict(
        in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=16, cross_attention_dim=32,
        num_layers=1, caption_channels=24)), _ltx),
    Recipe("CogVideoXTransformer3DModel", "CogVideoXPipeline", _config("CogVideoXTransformer3DModel", dict(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=16,
        text_embed_dim=24, num_layers=1, sample_width=32, sample_height=32, sample_frames=1 + 4 * (FRAMES - 1),
        patch_size=2, max_text_seq_length=12)), _cogvideox),
    Recipe("MochiTransformer3DModel", "MochiPipeline", _config("MochiTransformer3DModel", dict(
        patch_size=2, num_attention_heads=2, attention_head_dim=16, num_layers=1, pooled_projection_dim=16,
        in_channels=4, text_embed_dim=24, time_embed_dim=16, max_sequence_length=12)), _mochi),
    Recipe("SkyReelsV2Transformer3DModel", "SkyReelsV2Pipeline", _config("SkyReelsV2Transformer3DModel", dict(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
        text_dim=24, freq_dim=32, ffn_dim=48, num_layers=1, rope_max_seq_len=32)), _skyreels_v2),
    Recipe("AllegroTransformer3DModel", "AllegroPipeline", _config("AllegroTransformer3DModel", dict(
        patch_size=2, patch_size_t=1, num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
        num_layers=1, cross_attention_dim=32, sample_height=32, sample_width=32, sample_frames=FRAMES,
        caption_channels=24)), _allegro),
    Recipe("LatteTransformer3DModel", "LattePipeline", _config("LatteTransformer3DModel", dict(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=1,
        cross_attention_dim=32, sample_size=32, patch_size=2, norm_type="ada_norm_single", num_embeds_ada_norm=1000,
        caption_channels=24, video_length=FRAMES)), _latte),
    Recipe("SanaVideoTransformer3DModel", "SanaVideoPipeline", _config("SanaVideoTransformer3DModel", dict(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1,
        num_cross_attention_heads=2, cross_attention_head_dim=16, cross_attention_dim=32, caption_channels=24,
        sample_size=16, patch_size=(1, 2, 2), rope_max_seq_len=32)), _sana_video),
    Recipe("MotifVideoTransformer3DModel", "MotifVideoPipeline", _config("MotifVideoTransformer3DModel", dict(
        in_channels=9, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1, num_single_layers=1,
        patch_size=2, text_embed_dim=24, rope_axes_dim=(4, 6, 6))), _motif_video),
]

# why the census builds no tiny model of these video / 3-D classes (their forwards' inputs in diffusers 0.42.1)
_NO_RECIPE = "no tiny recipe yet: "
WHY_NOT_BUILT = {
    "AnyFlowFARTransformer3DModel": "frame-autoregressive: needs its chunk partition, clean latents and KV cache",
    "AnyFlowTransformer3DModel": _NO_RECIPE + "a flow-map model (timestep and r_timestep per call)",
    "ChronoEditTransformer3DModel": "image editing as video: needs the input image's CLIP states "
                                    "(encoder_hidden_states_image) and latents",
    "ConsisIDTransformer3DModel": "identity-preserving image-to-video: needs face identity inputs (id_cond, "
                                  "id_vit_hidden) and the reference image latents",
    "Cosmos3OmniTransformer": "world model over token streams (input ids, vision/sound/action tokens and their "
                              "indexes), no text-to-video forward",
    "CosmosTransformer3DModel": _NO_RECIPE + "a world model whose pipelines pass condition_mask, padding_mask and fps",
    "EasyAnimateTransformer3DModel": _NO_RECIPE + "needs two text encoders' states (encoder_hidden_states_t5) and "
                                     "inpaint/control latents",
    "HeliosTransformer3DModel": "streaming video: needs short/mid/long history latents and their frame indices",
    "HunyuanVideoFramepackTransformer3DModel": "image-to-video frame packing: needs image_embeds, clean latents and "
                                               "2x/4x history latents with their indices",
    "JoyImageEditPlusTransformer3DModel": "image editing (reference images in its token sequence, shape_list), "
                                          "not text-to-video",
    "JoyImageEditTransformer3DModel": "image editing (reference image in its token sequence), not text-to-video",
    "Kandinsky5Transformer3DModel": _NO_RECIPE + "needs its visual/text RoPE positions, scale factor and "
                                    "sparse-attention parameters",
    "Kandinsky6SRTransformer3DModel": "video super-resolution: takes the low-resolution video, no caption",
    "Kandinsky6Transformer3DModel": "audio-video: needs audio_hidden_states, visual RoPE positions and token types",
    "LTX2VideoTransformer3DModel": "audio-video: needs the audio latent stream, its captions and coordinates",
    "MiniMaxH3Transformer3DModel": "audio-video: needs audio_hidden_states, token tags and per-stream indices",
    "SanaWMLTX2RefinerTransformer3DModel": "world-model refiner: needs precomputed video RoPE and a KV cache",
    "SanaWMTransformer3DModel": "world model: needs camera conditions (plucker rays, camera poses) per chunk",
    "TransformerTemporalModel": "a temporal block of UNet video models, not a video DiT",
    "WanAnimate2Transformer3DModel": "character animation: needs condition latents, reference grids and a KV cache",
    "WanAnimateTransformer3DModel": "character animation: needs the reference image's CLIP states, pose latents and "
                                    "face pixels",
    "WanVACETransformer3DModel": "needs VACE control latents and their scales (WanTransformer3DModel is the "
                                 "text-to-video class)",
}

_VIDEO = ("3D", "Video", "Temporal", "Wan", "LTX", "Mochi", "SkyReels", "Allegro", "Latte", "EasyAnimate",
          "ConsisID", "CogVideoX", "Helios", "MiniMaxH3", "ChronoEdit", "AnyFlow", "Kandinsky", "SanaWM",
          "Cosmos3Omni")
_NOT_VIDEO = ("1D", "Audio", "Music", "Proteina", "Prior", "T5Film")


def video_transformer_classes() -> list[str]:
    """Every video / 3-D transformer class of the installed diffusers."""
    import diffusers.models.transformers as T
    from diffusers import ModelMixin

    names = []
    for name in sorted(dir(T)):
        cls = getattr(T, name)
        if (inspect.isclass(cls) and issubclass(cls, ModelMixin) and any(s in name for s in _VIDEO)
                and not any(s in name for s in _NOT_VIDEO)):
            names.append(name)
    return names
