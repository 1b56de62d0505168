"""One kit per backbone: what tests, benchmarks, the audit and the tiny demos need to know about it.

``KITS`` is the one registry: ``safe-dit generate --model tiny-random...``, ``safe-dit audit --model``,
``safe-dit bench e2e --model``, the mask census and the backbone-wide tests are derived from it (the command
line's parsers read the same modules' declarations without importing them: ``safe_dit.testing.catalog``). It is
collected from this package's backbone modules: a new backbone adds its adapter (``safe_dit.adapters.<backbone>``)
and one module here, ``safe_dit.testing.<backbone>``, with its builders and ``KIT = Kit(...)`` (see
``safe_dit.testing.kit``).

Every transformer is randomly initialised from a config (no hub): the ``tiny`` preset is for unit tests,
each kit's ``real_preset`` is the real model's attention shape with as many layers as asked. The builders of
Lumina-Next, PixArt, SD3 and FLUX can also be imported from here (``from safe_dit.testing.kits import
build_pixart``).
"""

from __future__ import annotations

import importlib
import pkgutil

from safe_dit.config import SafeDitError
from safe_dit.testing.flux import (  # noqa: F401  (re-exported)
    FLUX_PRESETS,
    build_flux,
    build_flux_pipeline,
    build_flux_text_pipeline,
    flux_bench_overrides,
    flux_image_ids,
    flux_inputs,
    flux_prompt_kwargs,
)
from safe_dit.testing.kit import Kit, TinyRun  # noqa: F401  (re-exported)
from safe_dit.testing.lumina_next import (  # noqa: F401  (re-exported)
    PRESETS,
    build_lumina_next,
    build_lumina_pipeline,
    build_tiny_text_pipeline,
    lumina_attention_shape,
    lumina_bench_overrides,
    lumina_inputs,
    lumina_prompt_kwargs,
)
from safe_dit.testing.pixart import (  # noqa: F401  (re-exported)
    PIXART_PRESETS,
    build_pixart,
    build_pixart_pipeline,
    build_pixart_text_pipeline,
    pixart_bench_overrides,
    pixart_inputs,
    pixart_prompt_kwargs,
)
from safe_dit.testing.sd3 import (  # noqa: F401  (re-exported)
    SD3_PRESETS,
    build_sd3,
    build_sd3_pipeline,
    build_sd3_text_pipeline,
    sd3_bench_overrides,
    sd3_inputs,
    sd3_prompt_kwargs,
)
from safe_dit.testing.tiny import TINY_WORDS, word_tokenizer  # noqa: F401  (re-exported)


def _discover() -> dict[str, Kit]:
    """Every ``KIT`` of this package's backbone modules, in rank order (a module whose diffusers classes this
    diffusers lacks is skipped, as its adapter is)."""
    kits = []
    for info in pkgutil.iter_modules(importlib.import_module("safe_dit.testing").__path__):
        if info.name in _NOT_BACKBONES:
            continue
        try:
            module = importlib.import_module(f"safe_dit.testing.{info.name}")
        except ImportError:
            continue
        if isinstance(getattr(module, "KIT", None), Kit):
            kits.append(module.KIT)
    return {kit.name: kit for kit in sorted(kits, key=lambda k: (k.rank, k.name))}


_NOT_BACKBONES = {"catalog", "kit", "kits", "tiny"}
KITS: dict[str, Kit] = _discover()


def kit_for(name: str) -> Kit:
    """The kit of backbone ``name``; a SafeDitError naming the known ones otherwise."""
    try:
        return KITS[name]
    except KeyError:
        raise SafeDitError(f"unknown backbone {name!r}; known: {', '.join(KITS)}") from None
