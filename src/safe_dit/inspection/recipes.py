"""The census's recipes: a tiny model of one diffusers transformer class and the inputs its pipeline passes.

Every backbone kit (``safe_dit.testing.kits.KITS``) is a recipe, built from the kit itself: its ``tiny`` model
and its ``inputs``, so a new backbone's kit is in the census without an entry here. A kit that cannot be
built (a diffusers without its classes, or a kit whose ``build`` refuses) is listed with the reason. The
classes no safe-dit adapter covers have a hand-written recipe below (a config and its pipeline's inputs):
the census shows what their masks are, the case for an adapter.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class Recipe:
    cls: str  # the diffusers class name
    pipeline: str | None  # the pipeline that drives it (for the table; None: read from the kit's pipeline)
    build: Callable  # seed -> the seeded random model
    inputs: Callable  # (model, batch, lens, grid, gen) -> forward kwargs
    text_len: int = 12
    kit: str | None = None  # the backbone kit it comes from


def _r(g, *shape):
    return torch.randn(*shape, generator=g)


def _prefix(lens, t, dtype=torch.bool):
    return (torch.arange(t)[None] < torch.tensor(lens)[:, None]).to(dtype)  # [B, T]


def _ids(h, w, extra=0, axes=3):
    ids = torch.zeros(h, w, axes)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    return ids.reshape(-1, axes)


def _config(cls: str, config: dict) -> Callable:
    def build(seed: int):
        import diffusers

        torch.manual_seed(seed)
        return getattr(diffusers, cls)(**config).eval()

    return build


def _sana(m, b, lens, grid, g):
    c, t = m.config, max(lens)
    return dict(hidden_states=_r(g, b, c.in_channels, *grid), encoder_hidden_states=_r(g, b, t, c.caption_channels),
                timestep=torch.rand(b, generator=g), encoder_attention_mask=_prefix(lens, t, torch.long),
                return_dict=False)


def _auraflow(m, b, lens, grid, g):
    c, p = m.config, m.config.patch_size
    return dict(hidden_states=_r(g, b, c.in_channels, grid[0] * p, grid[1] * p),
                encoder_hidden_states=_r(g, b, max(lens), c.joint_attention_dim), timestep=torch.rand(b, generator=g),
                return_dict=False)


def _cogview4(m, b, lens, grid, g):
    c, p = m.config, m.config.patch_size
    size = torch.tensor([[grid[0] * p * 8, grid[1] * p * 8]] * b, dtype=torch.float32)
    return dict(hidden_states=_r(g, b, c.in_channels, grid[0] * p, grid[1] * p),
                encoder_hidden_states=_r(g, b, max(lens), c.text_embed_dim),
                timestep=torch.rand(b, generator=g) * 1000,
                original_size=size, target_size=size, crop_coords=torch.zeros(b, 2), return_dict=False)


def _flux2(m, b, lens, grid, g):
    c, t = m.config, max(lens)
    img = _ids(*grid, axes=4)[None].expand(b, -1, -1)
    txt = torch.zeros(b, t, 4)
    txt[..., 3] = torch.arange(t)
    return dict(hidden_states=_r(g, b, grid[0] * grid[1], c.in_channels),
                encoder_hidden_states=_r(g, b, t, c.joint_attention_dim),
                timestep=torch.rand(b, generator=g), img_ids=img, txt_ids=txt, guidance=torch.full((b,), 3.5),
                return_dict=False)


def _kit_classes(name: str) -> list[str]:
    """The diffusers classes the adapter named ``name`` (a kit's backbone) serves."""
    from safe_dit.adapters import registered_adapters

    return [c.__name__ for a in registered_adapters() if a.name == name for c in a.model_classes]


def kit_recipe(kit, cls: str | None = None) -> Recipe:
    """The recipe of one backbone kit: its tiny model, its inputs (``valid_lens`` per sample) and its real pipeline's
    caption length (``bench_text_len``: Z-Image, for one, pads captions to a multiple of 32, so only lengths that
    pad differently show its key padding); no config here."""
    classes = _kit_classes(kit.name)
    cls = cls or (classes[0] if classes else f"<{kit.name}: no adapter>")

    def build(seed: int):
        return kit.build("tiny", seed=seed)

    def inputs(model, batch, lens, grid, _g):
        return kit.inputs(model, *grid, batch=batch, text_len=max(lens), valid_lens=list(lens))

    return Recipe(cls, None, build, inputs, text_len=kit.bench_text_len, kit=kit.name)


# the classes without a safe-dit adapter
OTHER_RECIPES = [
    Recipe("SanaTransformer2DModel", "SanaPipeline", _config("SanaTransformer2DModel", dict(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1,
        num_cross_attention_heads=2, cross_attention_head_dim=16, cross_attention_dim=32, caption_channels=24,
        sample_size=16, patch_size=1)), _sana),
    Recipe("AuraFlowTransformer2DModel", "AuraFlowPipeline", _config("AuraFlowTransformer2DModel", dict(
        sample_size=16, patch_size=2, in_channels=4, num_mmdit_layers=1, num_single_dit_layers=1,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=32,
        out_channels=4, pos_embed_max_size=256)), _auraflow),
    Recipe("CogView4Transformer2DModel", "CogView4Pipeline", _config("CogView4Transformer2DModel", dict(
        patch_size=2, in_channels=4, out_channels=4, num_layers=1, attention_head_dim=16, num_attention_heads=2,
        text_embed_dim=32, time_embed_dim=16, condition_dim=8, pos_embed_max_size=32, sample_size=16,
        rope_axes_dim=(32, 32))), _cogview4),
    Recipe("Flux2Transformer2DModel", "Flux2Pipeline", _config("Flux2Transformer2DModel", dict(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, timestep_guidance_channels=16, axes_dims_rope=(4, 4, 4, 4))),
        _flux2),
]


def recipes() -> list[Recipe]:
    """Every kit's recipe (in the kits' order, named by the first class its adapter serves), then the recipes of
    image and video classes without an adapter."""
    from safe_dit.inspection.recipes_video import VIDEO_RECIPES
    from safe_dit.testing.kits import KITS

    return [kit_recipe(kit) for kit in KITS.values()] + OTHER_RECIPES + VIDEO_RECIPES


def recipe_for(cls: str) -> Recipe:
    """The recipe of diffusers class ``cls`` (KeyError: none)."""
    for r in recipes():
        if r.cls == cls:
            return r
    raise KeyError(cls)


# Image-generation transformers in diffusers: 2-D/image classes (the video and 3-D classes are listed by
# ``recipes_video.video_transformer_classes``; audio and protein classes are out of scope).
_NOT_IMAGE = ("3D", "1D", "Audio", "Video", "Proteina", "Temporal", "Music", "Prior", "T5Film", "Cosmos3Omni",
              "Wan", "Kandinsky", "LTX", "MiniMax", "Helios", "SkyReels", "Mochi", "Allegro", "ChronoEdit", "Latte",
              "EasyAnimate", "ConsisID", "CogVideoX", "SanaWM", "AnyFlow", "JoyImageEdit")


def image_transformer_classes() -> list[str]:
    import diffusers.models.transformers as T
    from diffusers import ModelMixin

    names = []
    for name in sorted(dir(T)):
        cls = getattr(T, name)
        if inspect.isclass(cls) and issubclass(cls, ModelMixin) and not any(s in name for s in _NOT_IMAGE):
            names.append(name)
    return names
