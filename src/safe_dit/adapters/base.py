"""Backbone adapter contract and registry (by model class)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..config import SafeConfig, SafeDitError
from ..masks import KeyPaddingPlan, MaskDecision

logger = logging.getLogger(__name__)


@dataclass
class ForwardState:
    """Per-forward scratch state: lives from the model's forward pre-hook to its post-hook.

    Masks are matched by object identity (``is``), never by value: a handful of entries per
    forward, and identity checks trace cleanly under torch.compile."""

    certified: list[tuple[torch.Tensor, str]] = field(default_factory=list)
    decisions: list[tuple[torch.Tensor, MaskDecision]] = field(default_factory=list)

    def certify(self, mask: torch.Tensor, why: str) -> None:
        """Record that ``mask`` (this very tensor object) is all-valid by construction."""
        self.certified.append((mask, why))

    def certification(self, mask: torch.Tensor) -> str | None:
        for known, why in self.certified:
            if known is mask:
                return why
        return None

    def key_padding_decision(self, mask: torch.Tensor, rewrite: bool) -> MaskDecision:
        """Decide once per forward for a compact key-padding mask [B, Lk] of unknown origin.

        Under torch.compile no value is read (that would be a graph break and a host sync per
        call): the mask is kept as shipped, which is exact by definition."""
        if torch.compiler.is_compiling():
            return _KEPT_UNDER_COMPILE
        for known, decision in self.decisions:
            if known is mask:
                return decision
        decision = decide_key_padding(mask, rewrite)
        self.decisions.append((mask, decision))
        return decision


_KEPT_UNDER_COMPILE = MaskDecision("kept: padding (torch.compile: no value reads)")


def decide_key_padding(mask: torch.Tensor, rewrite: bool) -> MaskDecision:
    plan = KeyPaddingPlan.from_key_mask(mask)
    if plan is None:
        return MaskDecision("kept: semantic (a sample has no valid key)")
    if plan.elide:
        return MaskDecision("elided: all-valid (by value, once per forward)", plan)
    if not rewrite:
        return MaskDecision("kept: padding")
    return MaskDecision(plan.verdict + " (exact)", plan)


class Runtime:
    """What a patched model carries: its config, its per-forward state, an optional trace."""

    def __init__(self, config: SafeConfig, special_leading_tokens: int = 0):
        self.config = config
        self.state: ForwardState | None = None
        # Set to a list by `safe_dit.audit` to collect (module name, verdict) per attention call.
        self.trace: list[tuple[str, str]] | None = None
        # safe-core / safe-sw: the running generation, where its steps come from, its last report.
        self.generation = None
        self.scheduler = None  # a pipeline's scheduler: its step_index tells the step
        self.pipe = None
        self.explicit_generation = False  # set by safe_dit.generation(...) for bare transformers
        self.last_report: dict | None = None
        self.last_sensitivity: torch.Tensor | None = None  # [B, N] map of the last generation
        self.last_index: torch.Tensor | None = None  # [B, K] its sensitive tokens
        self.last_grid: tuple[int, int] | None = None  # (h, w) token grid of that map
        self.special_leading_tokens = special_leading_tokens

    def finish_generation(self) -> None:
        """Keep the small report and partition; drop the caches with the generation."""
        gen = self.generation
        if gen is not None:
            self.last_report = gen.report()
            self.last_sensitivity, self.last_index, self.last_grid = gen.sensitivity, gen.index, gen.grid
        self.generation = None
        self.explicit_generation = False

    def text_weights(self, mask: torch.Tensor | None, length: int, device) -> torch.Tensor:
        """PCSP weights over caption tokens [B, T]: 0 on padding and special tokens, else importance."""
        batch = 1 if mask is None else mask.shape[0]
        w = torch.ones(batch, length, device=device) if mask is None else mask.bool().float()
        w[:, : self.special_leading_tokens] = 0
        imp = self.config.text_importance
        if imp is not None:
            n = min(len(imp), length)
            w[:, :n] = w[:, :n] * torch.tensor(imp[:n], device=device)
        return w

    def begin(self, *_args, **_kwargs) -> None:
        self.state = ForwardState()

    def end(self, *_args, **_kwargs) -> None:
        self.state = None

    def record(self, name: str, verdict: str) -> None:
        if self.trace is not None:
            self.trace.append((name, verdict))


class Handle:
    """Undo log for one applied model: restores processors and removes hooks."""

    def __init__(self, config: SafeConfig, runtime: Runtime, adapter_name: str):
        self.config = config
        self.runtime = runtime
        self.adapter_name = adapter_name
        self._undo: list[Callable[[], None]] = []

    def on_remove(self, fn: Callable[[], None]) -> None:
        self._undo.append(fn)

    def remove(self) -> None:
        while self._undo:
            self._undo.pop()()


class Adapter:
    """One backbone: knows its blocks, its masks' provenance and how its pipeline runs."""

    name: str = "base"
    model_classes: tuple[type, ...] = ()

    def attach(self, model: torch.nn.Module, config: SafeConfig, pipe=None) -> Handle:  # pragma: no cover
        raise NotImplementedError


_REGISTRY: list[Adapter] = []


def register(adapter: Adapter) -> Adapter:
    _REGISTRY.append(adapter)
    return adapter


def adapter_for(model: torch.nn.Module) -> Adapter:
    for adapter in _REGISTRY:
        if isinstance(model, adapter.model_classes):
            return adapter
    supported = ", ".join(c.__name__ for a in _REGISTRY for c in a.model_classes) or "none"
    raise SafeDitError(
        f"safe-dit has no adapter for {type(model).__name__}; supported model classes: {supported}"
    )


def supported_classes() -> list[str]:
    return [c.__name__ for a in _REGISTRY for c in a.model_classes]
