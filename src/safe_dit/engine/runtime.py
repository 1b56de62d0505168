"""What a patched model carries (its runtime) and how it is undone (its handle). Model-agnostic."""

from __future__ import annotations

from typing import Callable

import torch

from safe_dit.config import SafeConfig, SafeDitError
from safe_dit.engine.attend import ForwardState

SWAPPED = ("the model's attention processors were replaced after apply_safe_dit (set_default_attn_processor, "
           "fuse_qkv_projections or set_attn_processor), so safe-dit's attention would silently not run: call "
           "apply_safe_dit(pipe, config) again to re-patch (fused QKV is refused where it is unsupported), or "
           "remove_safe_dit(pipe) to run stock")


class Runtime:
    """What a patched model carries: its config, its per-forward state, an optional trace."""

    def __init__(self, config: SafeConfig, special_leading_tokens: int = 0, special_trailing_tokens: int = 0,
                 cond_first: bool = True):
        self.config = config
        self.installed: list = []  # (attention module, the safe-dit processor put there)
        self.state: ForwardState | None = None
        # Set to a list by `safe_dit.inspection.audit` to collect (module name, verdict) per attention call.
        self.trace: list[tuple[str, str]] | None = None
        # safe-core / safe-sw: the running generation, where its steps come from, its last report.
        self.generation = None
        self.pipe = None  # the pipeline applied with: its current scheduler's step_index tells the step
        self.cfg_pairs = True  # the backbone's pipelines may batch [cond; uncond] (not FLUX: guidance-distilled)
        self.cfg_calls = False  # its pipeline runs CFG as a conditional, then an unconditional call per step
        self.pipeline_cfg: bool | None = None  # the current pipeline call batches [cond; uncond] (its encode_prompt)
        self.explicit_cfg = False  # safe_dit.generation(..., cfg_batch=...)
        self.explicit_generation = False  # set by safe_dit.generation(...) for bare transformers
        self.step_offset = 0  # where in the scheduler's timesteps the running pipeline call started
        self.finished_step: int | None = None  # the scheduler step a pipeline call's generation ended at
        self.last_report: dict | None = None
        self.last_sensitivity: torch.Tensor | None = None  # [B, N] map of the last generation
        self.last_index: torch.Tensor | None = None  # [B, K] its sensitive tokens
        self.last_grid: tuple[int, ...] | None = None  # the token grid of that map, (h, w) or (f, h, w)
        self.special_leading_tokens = special_leading_tokens  # e.g. Gemma's <bos>
        self.special_trailing_tokens = special_trailing_tokens  # e.g. T5's </s>, the last valid token
        self.cond_first = cond_first  # CFG batch order: [cond; uncond] (Lumina) or [uncond; cond] (PixArt)
        self.parallel = None  # engine.parallel.SequenceParallel under SafeConfig(context_parallel=...)

    def finish_generation(self) -> None:
        """Keep the small report and partition; drop the caches with the generation."""
        gen = self.generation
        if gen is not None:
            self.last_report = gen.report()
            self.last_sensitivity, self.last_index, self.last_grid = gen.sensitivity, gen.global_index, gen.grid
        self.generation = None
        self.explicit_generation = False

    def text_weights(self, mask: torch.Tensor | None, length: int, device) -> torch.Tensor:
        """PCSP weights over caption tokens [B, T]: 0 on padding and special tokens, else importance."""
        batch = 1 if mask is None else mask.shape[0]
        w = torch.ones(batch, length, device=device) if mask is None else mask.bool().float()
        w[:, : self.special_leading_tokens] = 0
        if mask is not None:
            last = mask.bool().long().sum(1, keepdim=True)  # [B, 1] valid length (prefix padding)
            for i in range(1, self.special_trailing_tokens + 1):
                w.scatter_(1, (last - i).clamp_min(0), 0.0)
        imp = self.config.text_importance
        if imp is not None:
            n = min(len(imp), length)
            w[:, :n] = w[:, :n] * torch.tensor(imp[:n], device=device)
        return w

    def intact(self) -> bool:
        """Every processor safe-dit installed is still in place (set_default_attn_processor, fuse_qkv_projections
        or set_attn_processor swap them out)."""
        return all(module.processor is proc for module, proc in self.installed)

    def begin(self, *_args, **_kwargs) -> None:
        if not self.intact():
            raise SafeDitError(SWAPPED)
        self.state = ForwardState()

    def end(self, _module=None, _inputs=None, output=None) -> None:
        state, self.state = self.state, None
        if state is not None and output is not None:  # not on the way out of an exception
            state.verify()

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

    def remove_hooks(self, hooks: list) -> None:
        """Undo: remove these torch hook handles."""
        self.on_remove(lambda: [h.remove() for h in hooks])
