"""Honest latency at scale for caches that decide from the activations (FirstBlockCache, MagCache, SeaCache).

Random weights do not make the decisions trained weights make, so timing such a cache on the scaled
random-weight model measures a skip pattern no real model would produce. Instead, ``BlockRecorder`` notes
which transformer blocks did their work at each step while the method ran on the trained embedded model
(a block a cache skips runs none of its submodules), and ``apply_replay`` makes the scaled model compute
exactly that share of blocks at each step (a skipped block adds its last computed residual, as these
caches do). The replay leaves out the method's own bookkeeping (norms, thresholds), so it is, if anything,
slightly faster than the method itself.
"""

from __future__ import annotations

import statistics
from typing import Callable

import torch
from diffusers.hooks import HookRegistry, ModelHook

REPLAY_HOOK = "safe_dit_block_replay"


def _step(pipe) -> int:
    index = pipe.scheduler.step_index
    return 0 if index is None else int(index)


class BlockRecorder:
    """Per pipeline call, per step, which of ``blocks`` ran their ``work`` submodule (e.g. the feed-forward)."""

    def __init__(self, pipe, blocks: list[torch.nn.Module], work: str = "feed_forward"):
        self.pipe, self.blocks, self.work, self.n = pipe, blocks, work, len(blocks)
        self.calls: list[list[set[int]]] = []  # call -> step -> block indices that computed
        self.handles: list = []

    def attach(self) -> None:
        """Start recording (again): hooks on the transformer and on each block's ``work`` module."""
        self.remove()
        self.handles = [self.pipe.transformer.register_forward_pre_hook(self._begin_step)]
        for i, block in enumerate(self.blocks):
            self.handles.append(getattr(block, self.work).register_forward_pre_hook(self._worked(i)))

    def _begin_step(self, *_):
        if self.pipe.scheduler.step_index is None:
            self.calls.append([])
        self.calls[-1].append(set())

    def _worked(self, i: int) -> Callable:
        def hook(*_):
            self.calls[-1][-1].add(i)
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def median_pattern(self) -> dict:
        """The recorded call whose total of computed block-steps is the median: its per-step computed fractions."""
        totals = [sum(len(s) for s in call) for call in self.calls]
        if not totals:
            raise ValueError("no pipeline call was recorded")
        median = statistics.median_low(totals)
        call = self.calls[totals.index(median)]
        return dict(fractions=[len(s) / self.n for s in call], computed=median, of=self.n * len(call),
                    calls=len(self.calls), computed_range=[min(totals), max(totals)])


def scaled_plan(fractions: list[float], blocks: int) -> list[int]:
    """How many of ``blocks`` to compute at each step: the recorded fractions, rounded by error diffusion so
    the total over the run matches the recorded share of block-steps."""
    plan, carry = [], 0.0
    for f in fractions:
        want = f * blocks + carry
        n = max(0, min(blocks, round(want)))
        carry = want - n
        plan.append(n)
    return plan


class _Replay(ModelHook):
    def __init__(self, pipe, index: int, plan: list[int]):
        super().__init__()
        self.pipe, self.index, self.plan = pipe, index, plan
        self.residual: torch.Tensor | None = None

    def new_forward(self, module, *args, **kwargs):
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        step = _step(self.pipe)
        if step == 0:
            self.residual = None  # a new pipeline call
        if self.index >= self.plan[min(step, len(self.plan) - 1)] and self.residual is not None \
                and self.residual.shape == hidden.shape:
            return hidden + self.residual  # skipped as the method skipped it
        out = self.fn_ref.original_forward(*args, **kwargs)
        self.residual = out - hidden
        return out


def apply_replay(pipe, blocks: list[torch.nn.Module], fractions: list[float]) -> Callable[[], None]:
    """Make ``blocks`` compute the recorded share per step (the first n at a step); returns the exact undo."""
    plan = scaled_plan(fractions, len(blocks))
    registries = []
    for i, block in enumerate(blocks):
        registry = HookRegistry.check_if_exists_or_initialize(block)
        registry.register_hook(_Replay(pipe, i, plan), REPLAY_HOOK)
        registries.append(registry)

    def undo():
        for registry in registries:
            registry.remove_hook(REPLAY_HOOK, recurse=False)

    return undo
