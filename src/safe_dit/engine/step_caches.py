"""diffusers' step caches on a patched model: found (any stateful hook of diffusers' hook registry) and refused
under the scheduled modes, at apply time and at each forward. Model-agnostic."""

from __future__ import annotations

from typing import Callable

import torch

from safe_dit.config import SafeDitError

STEP_CACHE_REFUSED = (
    "{found} cannot be combined with {mode}: a diffusers step cache carries whole-step tensors of every image token "
    "from one forward to the next, while {mode} runs only the sensitive rows at selective steps against its own "
    "cached context K/V and outputs, so the two caches would mix rows. Use safe-dit's own step reuse instead "
    "(SafeConfig(reuse_every=..., context_forecast=...), on by default), or keep the cache and use dense-fp, which "
    "composes with it; transformer.disable_cache() (or remove_hook) removes it")


def step_caches(model: torch.nn.Module) -> list[str]:
    """The diffusers step caches on ``model``, as "HookClass on module" (empty: none). A step cache is a *stateful*
    hook of diffusers' hook registry (``ModelHook._is_stateful``: what ``reset_stateful_hooks`` resets between
    pipeline calls): FirstBlockCache, FasterCache, PyramidAttentionBroadcast, TaylorSeer, MagCache, and any later one.
    Stateless hooks (layerwise casting, group offloading, safe-dit's own step reuse) are not caches."""
    found = []
    for module in model.modules():  # cheap: a dict lookup per module, names built only for what is found
        registry = module.__dict__.get("_diffusers_hook")
        if registry is not None and any(getattr(h, "_is_stateful", False) for h in registry.hooks.values()):
            found.append(module)
    if not found:
        return []
    names = {id(m): n for n, m in model.named_modules()}
    return [f"{type(h).__name__} on {names.get(id(m)) or type(model).__name__}"
            for m in found for h in m._diffusers_hook.hooks.values() if getattr(h, "_is_stateful", False)]


def step_cache_check(model: torch.nn.Module, mode: str) -> Callable[[], None]:
    """``refuse_step_caches`` for every forward, cheaply: the modules' attribute dicts are listed once (the ones a
    cache hooks, blocks and attention modules, exist at apply time), each forward only looks a key up in each (1279
    of them for FLUX.1-dev) and walks the model, naming what it found, only where a stateful hook is."""
    attributes = [vars(module) for module in model.modules()]

    @torch.compiler.disable  # between graphs
    def check() -> None:
        for attrs in attributes:
            registry = attrs.get("_diffusers_hook")
            if registry is not None and any(getattr(h, "_is_stateful", False) for h in registry.hooks.values()):
                refuse_step_caches(model, mode)

    return check


@torch.compiler.disable  # a walk over the modules, between graphs
def refuse_step_caches(model: torch.nn.Module, mode: str) -> None:
    """Refuse a scheduled mode on a model that carries a diffusers step cache (enabled before apply_safe_dit, or
    after it: checked at apply time and at each forward)."""
    found = step_caches(model)
    if found:
        config = getattr(model, "_cache_config", None)  # set by CacheMixin.enable_cache
        what = "a diffusers cache" if config is None else f"diffusers' {type(config).__name__.removesuffix('Config')}"
        more = f" and {len(found) - 1} more" if len(found) > 1 else ""
        raise SafeDitError(STEP_CACHE_REFUSED.format(found=f"{what} ({found[0]}{more})", mode=mode))
