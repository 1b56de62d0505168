"""The kit contract: what tests, benchmarks, the audit and the tiny demos need to know about one backbone.

Each backbone module in this package (``safe_dit.testing.<backbone>``) builds its random models and
pipelines and ends with ``KIT = Kit(...)``; ``safe_dit.testing.kits`` collects them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class TinyRun:
    """The tests' seeded sampling run of a kit's tiny pipeline: image size, the token grid it makes, guidance."""

    height: int
    width: int
    grid: tuple[int, ...]  # image token rows x columns at height x width (frames x rows x columns for video)
    guidance: float | None = 4.0  # None: the pipeline takes no guidance_scale (its guider component holds it)
    frames: int | None = None  # video pipelines: num_frames of the run


def _config_attention_shape(transformer) -> tuple[int, int, int]:
    """(heads, KV heads, head dim) of a transformer configured with num_attention_heads and attention_head_dim."""
    cfg = transformer.config
    return cfg.num_attention_heads, cfg.num_attention_heads, cfg.attention_head_dim


@dataclass(frozen=True)
class Kit:
    """One backbone's test, benchmark and demo knowledge.

    ``build(preset="tiny", seed=0, dtype=float32, **config_overrides)``: a seeded random transformer.
    ``inputs(model, height_tokens, width_tokens, batch=1, text_len=8, valid_lens=None, seed=0, dtype=None,
    device="cpu")``: keywords for ``model(**inputs)`` as the backbone's pipeline passes them.
    ``pipeline(transformer=None, seed=0)``: its diffusers pipeline around ``transformer`` (tiny random VAE, no
    text encoders: embeddings in). ``text_pipeline(seed=0)``: a complete tiny pipeline taking text prompts
    offline, ``safe-dit generate --model <tiny_name>``.
    ``prompt_kwargs(transformer, draw, text_len, valid, device)``: the embedding keywords of one ``pipeline``
    call; ``draw(role, *shape)`` makes each tensor, called in a fixed order with role "prompt", "pooled",
    "negative" or "negative_pooled"; ``valid`` = (prompt, negative) valid caption tokens where captions are
    padded. ``bench_overrides(layers, heads=None, hidden_size=None, kv_heads=None)``: the config overrides bench
    e2e builds ``real_preset`` with. A video backbone's ``frame_kwargs(latent_frames)`` gives the pipeline keywords
    for that many latent frames (``num_frames``); bench e2e makes ``bench_frames`` of them by default, and
    ``safe-dit generate`` writes a video for it.
    """

    rank: int  # order in KITS (and so in --model choices and reports)
    name: str  # the adapter's name; --model of audit and bench e2e
    label: str  # for reports and plots
    tiny_name: str  # safe-dit generate --model
    build: Callable
    inputs: Callable
    pipeline: Callable
    text_pipeline: Callable
    prompt_kwargs: Callable
    tiny_run: TinyRun
    real_preset: str  # bench e2e's default preset: the real model's attention shape
    bench_text_len: int  # caption tokens per prompt as the real pipeline makes them
    bench_overrides: Callable
    bench_hidden_size: bool = False  # bench e2e --hidden-size (with --heads, --kv-heads) applies
    guidance_distilled: bool = False  # one transformer call per step (batch 1): no safe-sw
    latent_patch: int | None = None  # latent pixels per token side if the pipeline packs latents; None: patch_size
    attention_shape: Callable = _config_attention_shape  # transformer -> (heads, KV heads, head dim)
    bench_frames: int = 1  # video backbones: latent frames of bench e2e's calls (tokens = frames x side x side)
    frame_kwargs: Callable | None = None  # video backbones: latent frames -> the pipeline call's keywords
    cfg_calls: bool = False  # its pipeline runs CFG as a conditional and an unconditional call of batch 1 per step
    text_prompts: bool = True  # text_pipeline builds a pipeline taking text offline (False: it refuses, saying why)
