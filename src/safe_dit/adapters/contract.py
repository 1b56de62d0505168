"""The adapter contract: what a backbone declares, the one generic ``attach`` that wires it, and the registry.

A backbone adapter is a file in this package holding a :class:`SafeProcessor` subclass (its attention, with
the mask decided by ``engine.attend``) and an :class:`Adapter` subclass that *declares* its facts: model
classes, the processors it replaces, where image tokens enter and leave the block stack, the token grid, the
CFG batch order, special caption tokens, its guidance, the inputs the scheduled modes refuse, and any
backbone-specific hooks. Decorating the adapter class with ``@register`` is all it takes to be found.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch

from safe_dit.config import SafeConfig, SafeDitError
from safe_dit.engine.attend import PARALLEL_REFUSED, Dispatch
from safe_dit.engine.guidance import sensitivity_weighted
from safe_dit.engine.hooks import forward_scope, refuse_inputs, schedule_hooks, step_reuse, swap_processors, watch_cfg
from safe_dit.engine.parallel import SequenceParallel, check_heads, gather_tokens
from safe_dit.engine.runtime import Handle, Runtime

logger = logging.getLogger(__name__)


class SafeProcessor(Dispatch):
    """Base of every safe-dit attention processor: bound to one model's runtime and one attention module.

    Built bare (``type(processor)()``, as diffusers' IP-Adapter loaders rebuild every processor), it gives
    the backbone's stock processor (``stock``): the model is then stock there, ``is_safe_dit_applied`` says
    so, its next forward refuses, and ``apply_safe_dit`` re-patches it."""

    def __new__(cls, runtime: Runtime | None = None, *args, **kwargs):
        if runtime is None:
            if cls.stock is None:
                raise SafeDitError(f"{cls.__name__} belongs to a model patched by apply_safe_dit; "
                                   "call remove_safe_dit before rebuilding its processors")
            return cls.stock()
        return super().__new__(cls)

    def __init__(self, runtime: Runtime | None = None, name: str = "", model: torch.nn.Module | None = None,
                 config: SafeConfig | None = None):
        self.runtime, self.name = runtime, name
        self.rewrite_padding = True if config is None else config.rewrite_padding
        self.setup(model)

    def setup(self, model) -> None:
        """Per-module facts (block index, self- or cross-attention), read once at apply time."""


class Adapter:
    """One backbone's facts. Override the ``hooks``/``guidance``/``check`` methods only where a fact is code."""

    name: str = "base"
    model_classes: tuple[type, ...] = ()
    notes: str = ""  # where this backbone's masks come from, for the audit
    processor: type[SafeProcessor] = SafeProcessor
    replaces: tuple[type, ...] | None = None  # stock processors it may replace (others refused); None: any
    passthrough: tuple[type, ...] = ()  # processors left in place under dense-fp (exact: they pass no mask)
    tokens_in: str | None = None  # module whose output is the image tokens [B, N, D]; None: `hooks` gathers
    tokens_out: str | Callable = "proj_out"  # the last per-token layer, [B, N, C] out (or model -> that module)
    grid: int | Callable | None = None  # token grid: a patch size, a callable (args, kwargs) -> (h, w); None: config
    cond_first: bool = True  # CFG batch order: [cond; uncond] (True) or [uncond; cond]
    special_leading_tokens: int = 0  # caption tokens that are no prompt word (e.g. Gemma's <bos>)
    special_trailing_tokens: int = 0  # e.g. T5's </s>, the last valid token
    refused_inputs: tuple[str, ...] = ()  # forward kwargs the scheduled modes refuse (per-token residuals)
    cfg_pairs: bool = True  # its pipelines may batch [cond; uncond] (False: guidance-distilled, one call per step)
    # its split points are declared (``parallel_hooks``); else context_parallel is refused
    context_parallel: bool = False
    step_inputs: tuple[str, str] = ("hidden_states", "timestep")  # the forward's latent and timestep parameters

    def check(self, model: torch.nn.Module, config: SafeConfig) -> None:
        """Refuse a config this backbone cannot run exactly, before anything changes."""

    def token_grid(self, model: torch.nn.Module):
        """The token grid as ``StepTracker`` takes it: ``grid``, or the model's ``patch_size`` where that is None."""
        return model.config.patch_size if self.grid is None else self.grid

    def hooks(self, model: torch.nn.Module, runtime: Runtime, handle: Handle) -> list:
        """Backbone-specific hooks after the per-forward state exists (fast-path modes)."""
        return []

    def parallel_hooks(self, model: torch.nn.Module, runtime: Runtime, parallel) -> list:
        """Under context parallelism: the hooks that split the token sequence after the token embedders (before
        any other hook on them). The gather after ``tokens_out`` is generic."""
        return []

    def guidance(self, model: torch.nn.Module, runtime: Runtime, handle: Handle) -> Callable | None:
        """SW-CFG for this pipeline: ``guide(runtime, gen, model_output) -> model_output``."""
        return sensitivity_weighted

    def attach(self, model: torch.nn.Module, config: SafeConfig, pipe=None) -> Handle:
        """Patch ``model`` for ``config`` (the same steps for every backbone) and return the undo log."""
        self.check(model, config)
        runtime = Runtime(config, self.special_leading_tokens, self.special_trailing_tokens, self.cond_first)
        runtime.pipe, runtime.cfg_pairs = pipe, self.cfg_pairs
        handle = Handle(config, runtime, self.name)
        if not config.fast_path:
            return handle  # dense: the stock model, untouched
        if getattr(model, "_parallel_config", None) is not None:  # diffusers' enable_parallelism split its inputs
            raise SafeDitError(PARALLEL_REFUSED)
        if config.context_parallel is not None:
            if not self.context_parallel:
                supported = ", ".join(context_parallel_adapters()) or "none"
                raise SafeDitError(f"context_parallel is not supported for {self.name} yet (its split points are not "
                                   f"declared); supported: {supported}. Run it on one device")
            for name, module in model.named_modules():  # a processor left stock would attend its local shard only
                if self.passthrough and isinstance(getattr(module, "processor", None), self.passthrough):
                    raise SafeDitError(f"context_parallel: {name} uses {type(module.processor).__name__}, which "
                                       "safe-dit leaves stock and which would attend only this rank's tokens: run it "
                                       "on one device, or restore the default processors first")
            runtime.parallel = SequenceParallel(config.context_parallel)
            check_heads(model, runtime.parallel)
        keep = () if config.scheduled else self.passthrough  # scheduled modes need every block's rows
        handle.on_remove(swap_processors(model, lambda name: self.processor(runtime, name, model, config), runtime,
                                         expected=self.replaces, keep=keep))
        hooks = []
        if config.scheduled and self.refused_inputs:
            hooks.append(model.register_forward_pre_hook(refuse_inputs(*self.refused_inputs), with_kwargs=True))
        hooks += forward_scope(model, runtime)
        if runtime.parallel is not None:  # split first: every later hook on the embedders sees this rank's rows
            hooks += self.parallel_hooks(model, runtime, runtime.parallel)
        hooks += self.hooks(model, runtime, handle)
        tokens_out = self.tokens_out(model) if callable(self.tokens_out) else getattr(model, self.tokens_out)
        if config.scheduled:
            if pipe is not None and self.cfg_pairs:
                handle.on_remove(watch_cfg(pipe, runtime))
            grid = self.token_grid(model)
            tokens_in = None if self.tokens_in is None else getattr(model, self.tokens_in)
            guide = self.guidance(model, runtime, handle) if config.mode == "safe-sw" else None
            hooks += schedule_hooks(model, runtime, grid, tokens_in, tokens_out, guide, self.step_inputs)
        if runtime.parallel is not None:  # gather last: the scheduled modes scatter this rank's rows first
            hooks.append(tokens_out.register_forward_hook(gather_tokens(runtime.parallel)))
        handle.remove_hooks(hooks)
        if config.scheduled and config.reuse_every:
            handle.on_remove(step_reuse(model, runtime))
        self._check_blocks(runtime, config, handle)
        return handle

    @staticmethod
    def _check_blocks(runtime: Runtime, config: SafeConfig, handle: Handle) -> None:
        """``pcsp_blocks`` must name blocks this model has (else PCSP would read none and fail after warm-up)."""
        if config.pcsp_blocks is None or not config.scheduled:
            return
        layers = {getattr(proc, "layer", -1) for _, proc in runtime.installed} - {-1}
        missing = sorted(set(config.pcsp_blocks) - layers)
        if missing:
            handle.remove()
            raise SafeDitError(f"pcsp_blocks {missing} are not blocks of this model: it has blocks 0..{max(layers)}")


_REGISTRY: list[Adapter] = []


def register(cls: type[Adapter]) -> type[Adapter]:
    """Class decorator: one instance of this adapter serves every model of its classes."""
    _REGISTRY.append(cls())
    return cls


def adapter_for(model: torch.nn.Module) -> Adapter:
    for adapter in _REGISTRY:
        if isinstance(model, adapter.model_classes):
            return adapter
    supported = ", ".join(supported_classes()) or "none"
    raise SafeDitError(f"safe-dit has no adapter for {type(model).__name__}; supported model classes: {supported}")


def registered_adapters() -> tuple[Adapter, ...]:
    """Every registered adapter, in registration order."""
    return tuple(_REGISTRY)


def supported_classes() -> list[str]:
    return [c.__name__ for a in _REGISTRY for c in a.model_classes]


def context_parallel_adapters() -> list[str]:
    """The adapters that declare their context-parallel split points (in registry order)."""
    return [a.name for a in _REGISTRY if a.context_parallel]
