"""One kit per backbone: what tests, benchmarks, the audit and the tiny demos need to know about it.

``KITS`` is the one registry: ``safe-dit generate --model tiny-random...``, ``safe-dit audit --model``,
``safe-dit bench e2e --model`` and the backbone-wide tests are derived from it. A new backbone adds its
adapter (``safe_dit.adapters``), its builders (``safe_dit.testing.<backbone>``) and one ``Kit`` entry here.

Every transformer is randomly initialised from a config (no hub): the ``tiny`` preset is for unit tests,
each kit's ``real_preset`` is the real model's attention shape with as many layers as asked. The builders
are re-exported here under their historical names (``from safe_dit.testing.kits import build_pixart``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from safe_dit.config import SafeDitError
from safe_dit.testing.flux import (  # noqa: F401  (re-exported)
    FLUX_PRESETS, build_flux, build_flux_pipeline, build_flux_text_pipeline, flux_bench_overrides, flux_image_ids,
    flux_inputs, flux_prompt_kwargs,
)
from safe_dit.testing.lumina_next import (  # noqa: F401  (re-exported)
    PRESETS, build_lumina_next, build_lumina_pipeline, build_tiny_text_pipeline, lumina_attention_shape,
    lumina_bench_overrides, lumina_inputs, lumina_prompt_kwargs,
)
from safe_dit.testing.pixart import (  # noqa: F401  (re-exported)
    PIXART_PRESETS, build_pixart, build_pixart_pipeline, build_pixart_text_pipeline, pixart_bench_overrides,
    pixart_inputs, pixart_prompt_kwargs,
)
from safe_dit.testing.sd3 import (  # noqa: F401  (re-exported)
    SD3_PRESETS, build_sd3, build_sd3_pipeline, build_sd3_text_pipeline, sd3_bench_overrides, sd3_inputs,
    sd3_prompt_kwargs,
)
from safe_dit.testing.tiny import TINY_WORDS, word_tokenizer  # noqa: F401  (re-exported)


@dataclass(frozen=True)
class TinyRun:
    """The tests' seeded sampling run of a kit's tiny pipeline: image size, the token grid it makes, guidance."""

    height: int
    width: int
    grid: tuple[int, int]  # image token rows x columns at height x width
    guidance: float = 4.0


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
    e2e builds ``real_preset`` with.
    """

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


KITS: dict[str, Kit] = {kit.name: kit for kit in (
    Kit(name="lumina-next", label="Lumina-Next", tiny_name="tiny-random", build=build_lumina_next,
        inputs=lumina_inputs, pipeline=build_lumina_pipeline, text_pipeline=build_tiny_text_pipeline,
        prompt_kwargs=lumina_prompt_kwargs, tiny_run=TinyRun(64, 96, grid=(4, 6)), real_preset="lumina-next-2b",
        bench_text_len=32, bench_overrides=lumina_bench_overrides, bench_hidden_size=True,
        attention_shape=lumina_attention_shape),
    # T5 caption padded to 300 tokens, its padding bias in cross-attention
    Kit(name="pixart", label="PixArt", tiny_name="tiny-random-pixart", build=build_pixart, inputs=pixart_inputs,
        pipeline=build_pixart_pipeline, text_pipeline=build_pixart_text_pipeline, prompt_kwargs=pixart_prompt_kwargs,
        tiny_run=TinyRun(24, 40, grid=(6, 10)), real_preset="pixart-sigma", bench_text_len=300,
        bench_overrides=pixart_bench_overrides),
    # CLIP-L/G (77) + T5 (256) caption tokens, as StableDiffusion3Pipeline makes them
    Kit(name="sd3", label="SD3", tiny_name="tiny-random-sd3", build=build_sd3, inputs=sd3_inputs,
        pipeline=build_sd3_pipeline, text_pipeline=build_sd3_text_pipeline, prompt_kwargs=sd3_prompt_kwargs,
        tiny_run=TinyRun(32, 48, grid=(8, 12)), real_preset="sd3-medium", bench_text_len=77 + 256,
        bench_overrides=sd3_bench_overrides),
    # T5 (512) caption tokens; guidance-distilled: batch 1, no safe-sw; FluxPipeline packs 2x2 latents per token
    Kit(name="flux", label="FLUX", tiny_name="tiny-random-flux", build=build_flux, inputs=flux_inputs,
        pipeline=build_flux_pipeline, text_pipeline=build_flux_text_pipeline, prompt_kwargs=flux_prompt_kwargs,
        tiny_run=TinyRun(32, 48, grid=(8, 12), guidance=3.5), real_preset="flux-dev", bench_text_len=512,
        bench_overrides=flux_bench_overrides, guidance_distilled=True, latent_patch=2),
)}


def kit_for(name: str) -> Kit:
    """The kit of backbone ``name``; a SafeDitError naming the known ones otherwise."""
    try:
        return KITS[name]
    except KeyError:
        raise SafeDitError(f"unknown backbone {name!r}; known: {', '.join(KITS)}") from None
