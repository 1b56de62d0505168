"""apply_safe_dit / remove_safe_dit: diffusers-style entry points."""

from __future__ import annotations

import logging

import torch

from safe_dit.adapters import Handle, adapter_for
from safe_dit.config import SafeConfig, SafeDitError
from safe_dit.engine.step_caches import refuse_step_caches

logger = logging.getLogger(__name__)

_ATTR = "_safe_dit_handle"


def _transformer(obj) -> torch.nn.Module:
    """Accept a pipeline (anything with ``.transformer``) or the transformer itself; a ``torch.compile``d
    model is patched through the module it wraps (the compiled graph follows on its next call)."""
    model = getattr(obj, "transformer", obj)
    model = getattr(model, "_orig_mod", model)  # torch.compile's OptimizedModule
    if not isinstance(model, torch.nn.Module):
        raise SafeDitError(
            f"expected a diffusers pipeline or transformer model, got {type(obj).__name__}"
        )
    return model


def apply_safe_dit(pipe_or_transformer, config: SafeConfig | None = None):
    """Patch the model in place for ``config`` (default: ``dense-fp``) and return the input.

    Idempotent: applying the same config again, with the same pipeline, to an intact patch does nothing;
    another config or pipeline replaces the first, and a patch whose processors were swapped out since
    (``set_default_attn_processor``, ``fuse_qkv_projections``) is repaired.

    diffusers' step caches (``transformer.enable_cache(...)``: FirstBlockCache, FasterCache, PAB, TaylorSeer,
    MagCache) compose with ``dense``/``dense-fp``: the cache on the stock model's computation, bit for bit where
    dense-fp is (no padded caption, or ``rewrite_padding=False``), to float32 rounding with the caption padding
    rewrite. Under ``safe-core``/``safe-sw``, enabled before or after this call, they are refused (``SafeDitError``).
    """
    config = SafeConfig() if config is None else config
    if not isinstance(config, SafeConfig):
        raise SafeDitError(f"config must be a SafeConfig, got {type(config).__name__}")
    model = _transformer(pipe_or_transformer)
    if config.scheduled:  # before anything changes (a patch already there stays as it is)
        refuse_step_caches(model, config.mode)
    pipe = pipe_or_transformer if getattr(pipe_or_transformer, "transformer", None) is not None else None
    current: Handle | None = getattr(model, _ATTR, None)
    if current is not None:
        same_pipe = pipe is None or current.runtime.pipe is pipe
        if current.config == config and same_pipe and current.runtime.intact():
            return pipe_or_transformer
        remove_safe_dit(model)
    adapter = adapter_for(model)
    handle = adapter.attach(model, config, pipe=pipe)
    setattr(model, _ATTR, handle)
    model.__deepcopy__ = _refuse_deepcopy  # copy.deepcopy reads it from the instance; removed with the patch
    logger.info("safe-dit applied to %s (%s, mode=%s)", type(model).__name__, adapter.name, config.mode)
    return pipe_or_transformer


def remove_safe_dit(pipe_or_transformer):
    """Undo :func:`apply_safe_dit` exactly (original processors, no hooks). No-op if not applied."""
    model = _transformer(pipe_or_transformer)
    handle: Handle | None = getattr(model, _ATTR, None)
    if handle is not None:
        handle.remove()
        delattr(model, _ATTR)
        vars(model).pop("__deepcopy__", None)
    return pipe_or_transformer


def _refuse_deepcopy(_memo):
    raise SafeDitError(
        "copy.deepcopy of a model patched by safe-dit is refused: the copy would share the original's hooks, caches "
        "and scheduler. remove_safe_dit(pipe), copy it, then apply_safe_dit to the original and to the copy")


def is_safe_dit_applied(pipe_or_transformer) -> bool:
    """True while safe-dit is on: applied, and none of its processors swapped out since."""
    handle = getattr(_transformer(pipe_or_transformer), _ATTR, None)
    return handle is not None and handle.runtime.intact()


def runtime_of(pipe_or_transformer):
    """The applied handle's runtime (for tracing), or None."""
    handle = getattr(_transformer(pipe_or_transformer), _ATTR, None)
    return None if handle is None else handle.runtime


class generation:
    """Context for running a bare transformer under ``safe-core``/``safe-sw`` without a pipeline:
    ``with safe_dit.generation(transformer, num_steps=30) as g: ...``, one transformer call per
    step; ``g.report()`` afterwards. ``cfg_batch=True`` says each call's batch is a CFG pair of halves
    (in the backbone's order), so both halves share the conditional half's partition. Releases the
    partition and caches on exit."""

    def __init__(self, pipe_or_transformer, num_steps: int, cfg_batch: bool = False):
        from safe_dit.engine.generation import Generation

        self.runtime = runtime_of(pipe_or_transformer)
        if self.runtime is None or not self.runtime.config.scheduled:
            raise SafeDitError("safe_dit.generation(...) needs a model with safe-core or safe-sw applied")
        if not isinstance(num_steps, int) or num_steps < 1:
            raise SafeDitError(f"num_steps must be an int >= 1, got {num_steps!r}")
        self._gen = Generation(self.runtime.config, num_steps, self.runtime.parallel)
        self.cfg_batch = bool(cfg_batch)

    def __enter__(self):
        self.runtime.generation = self._gen
        self.runtime.explicit_generation = True
        self.runtime.explicit_cfg = self.cfg_batch
        return self

    def __exit__(self, *exc):
        self.runtime.finish_generation()
        return False

    def report(self) -> dict:
        return self._gen.report()
