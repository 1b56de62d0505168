"""Step-level reuse (``reuse_every``): a hook in diffusers' own hook registry around the model's forward, so that a
reuse step returns the forecast output without running the model. Model-agnostic."""

from __future__ import annotations

from typing import Callable

import torch
from diffusers.hooks import HookRegistry, ModelHook

from safe_dit.engine.runtime import Runtime
from safe_dit.engine.schedule import REUSE

STEP_REUSE_HOOK = "safe_dit_step_reuse"


def step_reuse(model: torch.nn.Module, runtime: Runtime) -> Callable[[], None]:
    """Step-level reuse (``reuse_every``): a hook in diffusers' own hook registry around the model's forward,
    so that a reuse step returns the forecast output without running the model, and a step that ran records
    its output as the forecast's node. Returns the exact undo (the registry restores the forward chain)."""
    registry = HookRegistry.check_if_exists_or_initialize(model)
    registry.register_hook(_StepReuse(runtime), STEP_REUSE_HOOK)
    return lambda: registry.remove_hook(STEP_REUSE_HOOK, recurse=False)


def _sample(output):
    """The model output's first tensor (a tuple's first item or a ModelOutput's ``sample``); a list of per-sample
    tensors (Z-Image) stacked."""
    sample = output[0]
    return torch.stack(list(sample)) if isinstance(sample, (list, tuple)) else sample


def _with_sample(template, sample: torch.Tensor):
    """``template`` (the last computed output's structure) carrying ``sample`` instead of its first tensor."""
    if isinstance(template[0], (list, tuple)):  # per-sample outputs, as the model returned them
        sample = list(sample.unbind(0))
    if isinstance(template, tuple):
        return (sample, *template[1:])
    keys = list(template.keys())
    return type(template)(**{k: (sample if k == keys[0] else template[k]) for k in keys})


class _StepReuse(ModelHook):
    def __init__(self, runtime: Runtime):
        super().__init__()
        self.runtime = runtime

    def new_forward(self, module, *args, **kwargs):
        gen = self.runtime.generation
        if gen is not None and gen.kind == REUSE:
            return _with_sample(gen.output_template, gen.forecast_model_output())
        output = self.fn_ref.original_forward(*args, **kwargs)
        if gen is not None and gen.plan.reuse_every:
            gen.output_template = output
            gen.remember_model_output(_sample(output).detach().clone())  # the pipeline owns the returned one
        return output
