"""Peer accelerators that are real and available offline, applied to the same pipeline as safe-dit.

* diffusers' own cache hooks (``diffusers.hooks.apply_*``): FirstBlockCache, TaylorSeer, FasterCache,
  MagCache, PyramidAttentionBroadcast, SeaCache, TextKVCache, each at a few settings;
* cache-dit's DBCache with no calibrator, TaylorSeer or FoCa (``safe_dit.bench.cache_dit_peer``; the optional
  extra ``pip install 'safe-dit[peers]'``: without it that family is skipped, and says so);
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

Every peer is one ``PeerFamily`` entry of ``PEERS``: its diffusers hook names, config class and
apply function, how its config is built from a setting's parameters, its default settings, the one
timed at scale, its plot colour. ``DEFAULT_PEERS``, ``apply_peer`` and ``safe-dit pareto`` read it.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import io
import re
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

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


def available_hooks() -> list[str]:
    """Every ``apply_*`` cache function the installed diffusers exports from ``diffusers.hooks``."""
    import diffusers.hooks as h

    return sorted(n for n in dir(h)
                  if n.startswith("apply_") and "cache" in n or n == "apply_pyramid_attention_broadcast")


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


@dataclass(frozen=True)
class ConfigInputs:
    """What a peer's config is built from: the setting's knobs and the pipeline call it serves."""

    params: dict
    clock: _SchedulerClock
    num_steps: int
    mag_ratios: list[float] | None = None


@dataclass(frozen=True)
class PeerFamily:
    """One diffusers cache hook: all that applying, removing, running and plotting it needs."""

    method: str  # its name in settings, JSON and plots
    hook_module: str  # the ``diffusers.hooks`` submodule defining ...
    hook_names: tuple[str, ...]  # ... the names its hooks register under (what CacheMixin.disable_cache removes)
    config_class: str  # its config class in ``diffusers.hooks``
    config_kwargs: Callable[[ConfigInputs], dict]  # that class's arguments for one setting and call
    apply: str | Callable[[torch.nn.Module, Any], None]  # the ``diffusers.hooks.apply_*`` name, or a function
    settings: tuple[dict, ...]  # the params ``safe-dit pareto`` runs, from conservative to aggressive
    scaled: dict | None  # the params of the one setting also timed at scale (None: none)
    color: str  # its colour in the Pareto plot
    no_hook_reason: str = ""  # why it attaches no hook to Lumina, when it cannot
    calibrated: bool = False  # needs ``mag_ratios`` from ``calibrate_mag_ratios``, once per step count
    adaptive: bool = False  # skips by its activations: timed at scale by replaying its trained-weight decisions
    library: str = "diffusers"  # "cache-dit": applied through safe_dit.bench.cache_dit_peer, not a diffusers hook

    def missing_reason(self) -> str | None:
        """Why this family cannot run in this environment (its optional library is missing); None if it can."""
        if self.library == "cache-dit":
            from safe_dit.bench import cache_dit_peer

            return cache_dit_peer.missing_reason()
        return None

    def hooks(self) -> tuple[str, ...]:
        """The hook-name constants' values in the installed diffusers (none for a family of another library)."""
        if self.library != "diffusers":
            return ()
        module = importlib.import_module(f"diffusers.hooks.{self.hook_module}")
        return tuple(getattr(module, n) for n in self.hook_names)

    def config(self, inputs: ConfigInputs):
        """The diffusers config object and the function that applies it."""
        from diffusers import hooks as h

        apply = getattr(h, self.apply) if isinstance(self.apply, str) else self.apply
        return getattr(h, self.config_class)(**self.config_kwargs(inputs)), apply


def _mag_cache_kwargs(c: ConfigInputs) -> dict:
    if c.mag_ratios is None:  # the calibration run
        return dict(calibrate=True, num_inference_steps=c.num_steps)
    return dict(threshold=c.params["threshold"], num_inference_steps=c.num_steps, mag_ratios=list(c.mag_ratios))


#: Lumina's per-block attention and MLP modules (diffusers' default patterns name other models' blocks).
_LUMINA_TAYLORSEER_MODULES = (r"layers\.\d+\.attn1", r"layers\.\d+\.attn2", r"layers\.\d+\.feed_forward")

#: The peers ``safe-dit pareto`` compares with: a new one is one more entry.
PEERS: tuple[PeerFamily, ...] = (
    PeerFamily("first-block-cache", "first_block_cache", ("_FBC_LEADER_BLOCK_HOOK", "_FBC_BLOCK_HOOK"),
               "FirstBlockCacheConfig", lambda c: dict(threshold=c.params["threshold"]), "apply_first_block_cache",
               settings=({"threshold": 0.05}, {"threshold": 0.1}, {"threshold": 0.2}), scaled={"threshold": 0.1},
               color="tab:blue", adaptive=True),
    PeerFamily("taylorseer", "taylorseer_cache", ("_TAYLORSEER_CACHE_HOOK",), "TaylorSeerCacheConfig",
               lambda c: dict(cache_interval=c.params["cache_interval"], disable_cache_before_step=3,
                              max_order=c.params.get("max_order", 1),
                              taylor_factors_dtype=torch.float32, cache_identifiers=list(_LUMINA_TAYLORSEER_MODULES)),
               "apply_taylorseer_cache",
               settings=({"cache_interval": 2}, {"cache_interval": 3}, {"cache_interval": 4}, {"cache_interval": 5},
                         {"cache_interval": 3, "max_order": 2}, {"cache_interval": 5, "max_order": 2}),
               scaled={"cache_interval": 3}, color="tab:orange"),
    PeerFamily("faster-cache", "faster_cache", ("_FASTER_CACHE_DENOISER_HOOK", "_FASTER_CACHE_BLOCK_HOOK"),
               "FasterCacheConfig",
               lambda c: dict(spatial_attention_block_skip_range=c.params["block_skip"],
                              spatial_attention_timestep_skip_range=(-1, 681),
                              spatial_attention_block_identifiers=(_LUMINA_SELF_ATTENTION,),
                              temporal_attention_block_identifiers=(), current_timestep_callback=c.clock.timestep,
                              tensor_format="BCHW", attention_weight_callback=lambda _: 0.5,
                              _unconditional_conditional_input_kwargs_identifiers=_LUMINA_BATCH_KWARGS),
               _apply_faster_cache, settings=({"block_skip": 2}, {"block_skip": 3}), scaled={"block_skip": 2},
               color="tab:green"),
    PeerFamily("mag-cache", "mag_cache", ("_MAG_CACHE_LEADER_BLOCK_HOOK", "_MAG_CACHE_BLOCK_HOOK"), "MagCacheConfig",
               _mag_cache_kwargs, "apply_mag_cache",
               settings=({"threshold": 0.06}, {"threshold": 0.12}, {"threshold": 0.24}), scaled={"threshold": 0.12},
               color="tab:purple", calibrated=True, adaptive=True),
    PeerFamily("pab", "pyramid_attention_broadcast", ("_PYRAMID_ATTENTION_BROADCAST_HOOK",),
               "PyramidAttentionBroadcastConfig",
               lambda c: dict(spatial_attention_block_skip_range=c.params["block_skip"],
                              spatial_attention_timestep_skip_range=(100, 800),
                              spatial_attention_block_identifiers=("layers",),
                              current_timestep_callback=c.clock.timestep),
               "apply_pyramid_attention_broadcast", settings=({"block_skip": 2}, {"block_skip": 3}),
               scaled={"block_skip": 2}, color="tab:brown"),
    PeerFamily("sea-cache", "sea_cache", ("_SEA_CACHE_POST_NORM_HOOK", "_SEA_CACHE_BLOCK_HOOK",
                                          "_SEA_CACHE_LEADER_BLOCK_HOOK", "_SEA_CACHE_ROOT_HOOK"),
               "SeaCacheConfig",
               lambda c: dict(threshold=c.params["threshold"], raw_vision_callback=_lumina_raw_vision),
               "apply_sea_cache", settings=({"threshold": 0.25}, {"threshold": 0.5}), scaled={"threshold": 0.25},
               color="tab:pink", adaptive=True),
    PeerFamily("text-kv-cache", "text_kv_cache", ("_TEXT_KV_CACHE_TRANSFORMER_HOOK", "_TEXT_KV_CACHE_BLOCK_HOOK"),
               "TextKVCacheConfig", lambda c: {}, "apply_text_kv_cache", settings=({},), scaled=None,
               color="tab:olive",
               no_hook_reason="apply_text_kv_cache hooks NucleusMoEImageTransformerBlock only (LuminaNextDiTBlock "
                              "computes its caption K/V inside the attention processor, which the hook cannot reach)"),
    # cache-dit's DBCache (Fn first / Bn last blocks always computed, the middle skipped below a residual-diff
    # threshold), alone and with its TaylorSeer (order 1, 2) and FoCa calibrators; optional extra [peers]
    PeerFamily("cache-dit", "", (), "", lambda c: dict(c.params), "",
               settings=({"Fn": 1, "Bn": 0, "rdt": 0.08}, {"Fn": 1, "Bn": 0, "rdt": 0.12},
                         {"Fn": 1, "Bn": 0, "rdt": 0.24}, {"Fn": 2, "Bn": 1, "rdt": 0.12},
                         {"Fn": 1, "Bn": 0, "rdt": 0.12, "calibrator": "taylorseer", "order": 1},
                         {"Fn": 1, "Bn": 0, "rdt": 0.24, "calibrator": "taylorseer", "order": 1},
                         {"Fn": 1, "Bn": 0, "rdt": 0.12, "calibrator": "taylorseer", "order": 2},
                         {"Fn": 1, "Bn": 0, "rdt": 0.12, "calibrator": "foca"}),
               scaled={"Fn": 1, "Bn": 0, "rdt": 0.12, "calibrator": "taylorseer", "order": 1}, color="teal",
               adaptive=True, library="cache-dit"),
)

_BY_METHOD = {f.method: f for f in PEERS}


def peer_family(method: str) -> PeerFamily | None:
    """The ``PEERS`` entry of ``method``; None for a method not in the table."""
    return _BY_METHOD.get(method)


#: The peers and settings ``safe-dit pareto`` runs (a few per method, from conservative to aggressive).
DEFAULT_PEERS: tuple[PeerSetting, ...] = tuple(PeerSetting(f.method, dict(p)) for f in PEERS for p in f.settings)


def _hook_names(method: str) -> tuple[str, ...]:
    """Names under which a method registers its hooks (none for a method not in the table)."""
    family = peer_family(method)
    return family.hooks() if family is not None else ()


def _config(setting: PeerSetting, clock: _SchedulerClock, num_steps: int, mag_ratios=None):
    family = peer_family(setting.method)
    if family is None:
        raise PeerUnsupported(f"unknown peer method {setting.method!r}")
    return family.config(ConfigInputs(setting.params, clock, num_steps, mag_ratios))


def _no_hook_reason(method: str) -> str:
    family = peer_family(method)
    return family.no_hook_reason if family is not None else ""


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
            _set_cache_context(model,
                               CacheContext("cond_uncond", step_index=clock.index, num_inference_steps=num_steps,
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
    family = peer_family(setting.method)
    if family is not None and family.library == "cache-dit":
        return _apply_cache_dit(pipe, family, setting, num_steps)
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
                              + (_no_hook_reason(setting.method)
                                 or "its apply_* only hooks the block classes it knows"))
    ctx = _ContextHooks(model, clock, num_steps)

    def undo():
        ctx.remove()
        _remove(model, names)

    return undo


def _apply_cache_dit(pipe, family: PeerFamily, setting: PeerSetting, num_steps: int) -> Callable[[], None]:
    from safe_dit.bench import cache_dit_peer

    reason = family.missing_reason()
    if reason:
        raise PeerUnsupported(reason)
    try:
        return cache_dit_peer.apply(pipe, setting.params, num_steps)
    except Exception as err:  # noqa: BLE001 - the reason is what the report needs
        with contextlib.suppress(Exception):
            import cache_dit

            cache_dit.disable_cache(pipe)
        raise PeerUnsupported(f"{type(err).__name__}: {err}") from err


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
