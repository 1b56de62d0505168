"""Peer accelerators that are real and available offline, applied to the same pipeline as safe-dit.

* diffusers' own cache hooks (``diffusers.hooks.apply_*``): FirstBlockCache, TaylorSeer, FasterCache,
  MagCache, PyramidAttentionBroadcast, SeaCache, TextKVCache, each at a few settings;
* plain step reduction (fewer sampling steps), handled by the caller (see ``pareto``).

diffusers wires these hooks into the pipelines it lists as supported; ``LuminaPipeline`` is not
one of them. What this module adds, and nothing more (no change to any method's semantics):

1. ``LuminaNextDiTBlock`` is registered in diffusers' ``TransformerBlockRegistry`` with the
   metadata its signature and return value call for (``hidden_states`` in, one tensor out), as
   diffusers does for every block class it supports; FirstBlockCache, MagCache and SeaCache read it.
2. A cache context, as supported pipelines open with ``transformer.cache_context(...)`` around each
   denoiser call: Lumina runs cond and uncond in one batch, so one context ``"cond_uncond"`` with
   the step index, step count, timestep and sigma from the pipeline's scheduler. Stateful hooks
   are reset at the first step of every pipeline call (supported pipelines do it in
   ``maybe_free_model_hooks``), so no state leaks from one image to the next.
3. Lumina-specific names where a config asks for them (module-name patterns of its attention
   blocks, its ``encoder_mask`` keyword, the BCHW layout of its output) and, for SeaCache, the
   image analogue of diffusers' own Wan text-to-video ``raw_vision_callback`` (each sample's
   latents as a one-frame ``(C, 1, H, W)`` video).
4. FasterCache: ``apply_faster_cache`` only looks for attention under its built-in block names
   (``blocks``, ``transformer_blocks``, ...), so Lumina's self-attention (``layers.i.attn1``) gets
   its attention hook from diffusers' own per-module function, the same hook with the same config.

A method that raises on this model, or that attaches no hook to it, is reported as unsupported
with the reason (``PeerUnsupported``), never silently run as dense.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import re
from dataclasses import dataclass, field
from typing import Any, Callable

import torch


def _hook_names(method: str) -> tuple[str, ...]:
    """Names under which a method registers its hooks (the constants CacheMixin.disable_cache removes)."""
    from diffusers.hooks import faster_cache, first_block_cache, mag_cache, pyramid_attention_broadcast, sea_cache
    from diffusers.hooks import taylorseer_cache, text_kv_cache

    return {
        "first-block-cache": (first_block_cache._FBC_LEADER_BLOCK_HOOK, first_block_cache._FBC_BLOCK_HOOK),
        "taylorseer": (taylorseer_cache._TAYLORSEER_CACHE_HOOK,),
        "faster-cache": (faster_cache._FASTER_CACHE_DENOISER_HOOK, faster_cache._FASTER_CACHE_BLOCK_HOOK),
        "mag-cache": (mag_cache._MAG_CACHE_LEADER_BLOCK_HOOK, mag_cache._MAG_CACHE_BLOCK_HOOK),
        "pab": (pyramid_attention_broadcast._PYRAMID_ATTENTION_BROADCAST_HOOK,),
        "sea-cache": (sea_cache._SEA_CACHE_POST_NORM_HOOK, sea_cache._SEA_CACHE_BLOCK_HOOK,
                      sea_cache._SEA_CACHE_LEADER_BLOCK_HOOK, sea_cache._SEA_CACHE_ROOT_HOOK),
        "text-kv-cache": (text_kv_cache._TEXT_KV_CACHE_TRANSFORMER_HOOK, text_kv_cache._TEXT_KV_CACHE_BLOCK_HOOK),
    }.get(method, ())

#: Pipeline keyword arguments of LuminaNextDiT2DModel.forward that carry the CFG batch.
_LUMINA_BATCH_KWARGS = ("hidden_states", "encoder_hidden_states", "timestep", "encoder_mask")


class PeerUnsupported(RuntimeError):
    """The peer method cannot run on this model; the message is the reason reported."""


@dataclass(frozen=True)
class PeerSetting:
    """One peer method at one setting: ``method`` names the diffusers hook, ``params`` its knobs."""

    method: str
    params: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        knobs = ",".join(f"{k}={v}" for k, v in self.params.items())
        return f"{self.method}({knobs})" if knobs else self.method


#: The peers and settings ``safe-dit pareto`` runs (a few per method, from conservative to aggressive).
DEFAULT_PEERS: tuple[PeerSetting, ...] = (
    PeerSetting("first-block-cache", {"threshold": 0.05}),
    PeerSetting("first-block-cache", {"threshold": 0.1}),
    PeerSetting("first-block-cache", {"threshold": 0.2}),
    PeerSetting("taylorseer", {"cache_interval": 2}),
    PeerSetting("taylorseer", {"cache_interval": 3}),
    PeerSetting("taylorseer", {"cache_interval": 5}),
    PeerSetting("faster-cache", {"block_skip": 2}),
    PeerSetting("faster-cache", {"block_skip": 3}),
    PeerSetting("mag-cache", {"threshold": 0.06}),
    PeerSetting("mag-cache", {"threshold": 0.12}),
    PeerSetting("mag-cache", {"threshold": 0.24}),
    PeerSetting("pab", {"block_skip": 2}),
    PeerSetting("pab", {"block_skip": 3}),
    PeerSetting("sea-cache", {"threshold": 0.25}),
    PeerSetting("sea-cache", {"threshold": 0.5}),
    PeerSetting("text-kv-cache", {}),
)


def available_hooks() -> list[str]:
    """Every ``apply_*`` cache function the installed diffusers exports from ``diffusers.hooks``."""
    import diffusers.hooks as h

    return sorted(n for n in dir(h) if n.startswith("apply_") and "cache" in n or n == "apply_pyramid_attention_broadcast")


def register_lumina_block() -> None:
    """Tell diffusers' block registry how LuminaNextDiTBlock is called: hidden_states in, one tensor out."""
    from diffusers.hooks._helpers import TransformerBlockMetadata, TransformerBlockRegistry
    from diffusers.models.transformers.lumina_nextdit2d import LuminaNextDiTBlock

    try:
        TransformerBlockRegistry.get(LuminaNextDiTBlock)
    except ValueError:
        TransformerBlockRegistry.register(
            model_class=LuminaNextDiTBlock,
            metadata=TransformerBlockMetadata(return_hidden_states_index=0, return_encoder_hidden_states_index=None),
        )


class _SchedulerClock:
    """Where the pipeline's sampling loop is, read from its scheduler (as the pipelines that support
    the hooks pass ``current_timestep`` and ``cache_context(step_index=...)``)."""

    def __init__(self, pipe):
        self.scheduler = pipe.scheduler

    @property
    def index(self) -> int:
        i = self.scheduler.step_index
        return 0 if i is None else int(i)

    def timestep(self) -> float:
        """The scheduler's timestep of the current step (0..1000, 1000 = pure noise)."""
        return float(self.scheduler.timesteps[min(self.index, len(self.scheduler.timesteps) - 1)])

    def sigma(self) -> float | None:
        sigmas = getattr(self.scheduler, "sigmas", None)
        return None if sigmas is None else float(sigmas[min(self.index, len(sigmas) - 1)])


def _lumina_raw_vision(module, args: tuple, kwargs: dict) -> list[torch.Tensor] | None:
    """SeaCache input for an image model: each sample's latents [C, H, W] as a one-frame video
    [C, 1, H, W] (the image analogue of diffusers' Wan text-to-video callback)."""
    bound = inspect.signature(type(module).forward).bind_partial(module, *args, **kwargs).arguments
    x = bound.get("hidden_states")
    if not isinstance(x, torch.Tensor) or x.ndim != 4:
        return None
    return [s.unsqueeze(1) for s in x.unbind(0)]


_LUMINA_SELF_ATTENTION = r"^layers\.\d+\.attn1$"


def _faster_cache_config(h, p: dict, clock: _SchedulerClock):
    return h.FasterCacheConfig(
        spatial_attention_block_skip_range=p["block_skip"], spatial_attention_timestep_skip_range=(-1, 681),
        spatial_attention_block_identifiers=(_LUMINA_SELF_ATTENTION,), temporal_attention_block_identifiers=(),
        current_timestep_callback=clock.timestep, tensor_format="BCHW", attention_weight_callback=lambda _: 0.5,
        _unconditional_conditional_input_kwargs_identifiers=_LUMINA_BATCH_KWARGS,
    )


def _apply_faster_cache(model: torch.nn.Module, config) -> None:
    """diffusers' apply_faster_cache, whose attention half only visits modules under its built-in
    block names (``^blocks``/``^transformer_blocks``/...): Lumina's self-attention modules
    (``layers.i.attn1``) get the very same hook through diffusers' own per-module function."""
    from diffusers.hooks import apply_faster_cache, faster_cache
    from diffusers.models.attention_processor import Attention

    apply_faster_cache(model, config)
    for name, module in model.named_modules():
        if isinstance(module, Attention) and re.search(_LUMINA_SELF_ATTENTION, name):
            registry = getattr(module, "_diffusers_hook", None)
            if registry is None or registry.get_hook(faster_cache._FASTER_CACHE_BLOCK_HOOK) is None:
                faster_cache._apply_faster_cache_on_attention_class(name, module, config)


def _config(setting: PeerSetting, clock: _SchedulerClock, num_steps: int, mag_ratios=None):
    from diffusers import hooks as h

    p = setting.params
    m = setting.method
    if m == "first-block-cache":
        return h.FirstBlockCacheConfig(threshold=p["threshold"]), h.apply_first_block_cache
    if m == "taylorseer":
        # Lumina's per-block attention and MLP modules (diffusers' default patterns name other models' blocks)
        ids = [r"layers\.\d+\.attn1", r"layers\.\d+\.attn2", r"layers\.\d+\.feed_forward"]
        return h.TaylorSeerCacheConfig(cache_interval=p["cache_interval"], disable_cache_before_step=3, max_order=1,
                                       taylor_factors_dtype=torch.float32, cache_identifiers=ids), h.apply_taylorseer_cache
    if m == "faster-cache":
        return _faster_cache_config(h, p, clock), _apply_faster_cache
    if m == "mag-cache":
        if mag_ratios is None:
            return h.MagCacheConfig(calibrate=True, num_inference_steps=num_steps), h.apply_mag_cache
        return h.MagCacheConfig(threshold=p["threshold"], num_inference_steps=num_steps, mag_ratios=list(mag_ratios)), \
            h.apply_mag_cache
    if m == "pab":
        return h.PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=p["block_skip"], spatial_attention_timestep_skip_range=(100, 800),
            spatial_attention_block_identifiers=("layers",), current_timestep_callback=clock.timestep,
        ), h.apply_pyramid_attention_broadcast
    if m == "sea-cache":
        return h.SeaCacheConfig(threshold=p["threshold"], raw_vision_callback=_lumina_raw_vision), h.apply_sea_cache
    if m == "text-kv-cache":
        return h.TextKVCacheConfig(), h.apply_text_kv_cache
    raise PeerUnsupported(f"unknown peer method {m!r}")


_NO_HOOK_REASON = {
    "text-kv-cache": "apply_text_kv_cache hooks NucleusMoEImageTransformerBlock only (LuminaNextDiTBlock computes "
                     "its caption K/V inside the attention processor, which the hook cannot reach)",
}


def _block_hook_count(model: torch.nn.Module, names: tuple[str, ...]) -> int:
    """Hooks of the method below the root (on blocks or attention): without any, it does nothing."""
    n = 0
    for module in model.modules():
        if module is model:
            continue
        registry = getattr(module, "_diffusers_hook", None)
        if registry is not None:
            n += sum(1 for name in names if registry.get_hook(name) is not None)
    return n


def _remove(model: torch.nn.Module, names: tuple[str, ...]) -> None:
    from diffusers.hooks import HookRegistry

    registry = HookRegistry.check_if_exists_or_initialize(model)
    for name in names:
        registry.remove_hook(name, recurse=True)
    registry.invalidate_child_registries_cache()


class _ContextHooks:
    """Forward pre/post hooks on the transformer: reset state at a pipeline call's first step, open
    the cache context for the call, close it afterwards."""

    def __init__(self, model: torch.nn.Module, clock: _SchedulerClock, num_steps: int):
        from diffusers.hooks import HookRegistry
        from diffusers.hooks.hooks import CacheContext, _set_cache_context

        self.model, self.clock = model, clock

        def pre(_module, _args):
            if clock.scheduler.step_index is None:  # a new pipeline call
                HookRegistry.check_if_exists_or_initialize(model).reset_stateful_hooks(recurse=True)
            _set_cache_context(model, CacheContext("cond_uncond", step_index=clock.index, num_inference_steps=num_steps,
                                                   timestep=clock.timestep(), sigma=clock.sigma()))

        def post(_module, _args, _out):
            _set_cache_context(model, None)

        self.handles = [model.register_forward_pre_hook(pre), model.register_forward_hook(post, always_call=True)]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def apply_peer(pipe, setting: PeerSetting, num_steps: int, mag_ratios=None) -> Callable[[], None]:
    """Attach ``setting`` to ``pipe.transformer`` for ``num_steps``-step calls; returns the exact undo.

    Raises ``PeerUnsupported`` (with the reason) if the method raises or attaches no hook."""
    model = pipe.transformer
    register_lumina_block()
    clock = _SchedulerClock(pipe)
    names = _hook_names(setting.method)
    try:
        config, apply = _config(setting, clock, num_steps, mag_ratios)
        apply(model, config)
    except PeerUnsupported:
        raise
    except Exception as err:  # noqa: BLE001 - the reason is what the report needs
        _remove(model, names)
        raise PeerUnsupported(f"{type(err).__name__}: {err}") from err
    if _block_hook_count(model, names) == 0:
        _remove(model, names)
        raise PeerUnsupported(f"attached no block hook to {type(model).__name__}: "
                              + _NO_HOOK_REASON.get(setting.method, "its apply_* only hooks the block classes it knows"))
    ctx = _ContextHooks(model, clock, num_steps)

    def undo():
        ctx.remove()
        _remove(model, names)

    return undo


def calibrate_mag_ratios(pipe, num_steps: int, generate: Callable[[], Any]) -> list[float]:
    """MagCache's documented calibration: one run with ``calibrate=True``; the ratios it prints."""
    undo = apply_peer(pipe, PeerSetting("mag-cache", {}), num_steps)
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            generate()
    finally:
        undo()
    found = re.findall(r"\[([-+0-9.eE, ]+)\]", buf.getvalue())
    if not found:
        raise PeerUnsupported("MagCache calibration printed no ratios")
    return [float(x) for x in found[-1].split(",")]
