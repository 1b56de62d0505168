"""cache-dit (``pip install safe-dit[peers]``) as a peer: DBCache with no calibrator, TaylorSeer or FoCa.

cache-dit wraps a transformer's block list through a ``BlockAdapter``; for Lumina-Next that is
``transformer.layers`` with ``ForwardPattern.Pattern_3`` (a block takes ``hidden_states`` and returns one
tensor), the pairing cache-dit documents for Lumina. DBCache always computes the first ``Fn`` and the last
``Bn`` blocks of a step and skips the middle ones when the first blocks' residual changed by less than the
threshold since the last computed step; a calibrator, if any, forecasts the skipped residual (TaylorSeer of
order 1 or 2, or FoCa) instead of reusing it. ``cache_dit.disable_cache`` undoes it exactly.

A setting's ``params``: ``Fn``, ``Bn``, ``rdt`` (residual diff threshold) and optionally ``calibrator``
(``"taylorseer"`` with ``order`` 1 or 2, or ``"foca"``). Everything else stays at cache-dit's defaults.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import io
import logging
from typing import Callable

#: The release the comparison was built against (the ``peers`` extra pins it).
PINNED = "1.5.3"
INSTALL_HINT = "pip install 'safe-dit[peers]'"


def missing_reason() -> str | None:
    """Why cache-dit cannot run here (not installed, or another release than the pinned one); None if it can."""
    try:
        version = importlib.metadata.version("cache-dit")
    except importlib.metadata.PackageNotFoundError:
        return f"cache-dit is not installed ({INSTALL_HINT})"
    if version != PINNED:
        return f"cache-dit {version} is installed; the comparison is pinned to {PINNED} ({INSTALL_HINT})"
    return None


def label(params: dict) -> str:
    """A short name for a setting, e.g. ``F1B0 r0.12 taylorseer2``."""
    tag = f"F{params['Fn']}B{params['Bn']} r{params['rdt']}"
    cal = params.get("calibrator")
    if cal == "taylorseer":
        tag += f" taylorseer{params.get('order', 1)}"
    elif cal:
        tag += f" {cal}"
    return tag


def _calibrator(params: dict):
    import cache_dit

    cal = params.get("calibrator")
    if cal is None:
        return None
    if cal == "taylorseer":
        return cache_dit.TaylorSeerCalibratorConfig(taylorseer_order=int(params.get("order", 1)))
    if cal == "foca":
        return cache_dit.FoCaCalibratorConfig()
    raise ValueError(f"unknown cache-dit calibrator {cal!r} (taylorseer or foca)")


def apply(pipe, params: dict, num_steps: int) -> Callable[[], None]:
    """Enable cache-dit's DBCache on ``pipe.transformer.layers``; returns the exact undo."""
    import cache_dit
    from cache_dit import BlockAdapter, DBCacheConfig, ForwardPattern

    blocks = getattr(pipe.transformer, "layers", None)
    if blocks is None:
        raise ValueError(f"{type(pipe.transformer).__name__} has no 'layers' block list for cache-dit's BlockAdapter")
    # its loggers (created on import) write to stdout, where a benchmark's JSON goes: only errors while it is on
    loggers = [logging.getLogger(n) for n in list(logging.root.manager.loggerDict) if n.startswith("cache_dit")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    adapter = BlockAdapter(pipe=pipe, transformer=pipe.transformer, blocks=blocks,
                           forward_pattern=ForwardPattern.Pattern_3, check_forward_pattern=True)
    config = DBCacheConfig(Fn_compute_blocks=int(params["Fn"]), Bn_compute_blocks=int(params["Bn"]),
                           residual_diff_threshold=float(params["rdt"]), num_inference_steps=num_steps)
    with contextlib.redirect_stdout(io.StringIO()):
        cache_dit.enable_cache(adapter, cache_config=config, calibrator_config=_calibrator(params))

    def undo():
        with contextlib.redirect_stdout(io.StringIO()):
            cache_dit.disable_cache(pipe)
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)

    return undo


def cached_steps(pipe) -> list[int] | None:
    """The steps of the last call whose middle blocks cache-dit skipped, as its own summary reports them."""
    import cache_dit

    try:
        stats = cache_dit.summary(pipe, logging=False)
    except Exception:  # noqa: BLE001 - a summary is information, never a reason to fail a run
        return None
    return sorted(stats[0].cached_steps) if stats else None
