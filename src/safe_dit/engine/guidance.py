"""SW-CFG: sensitivity-weighted classifier-free guidance (the gamma map, and the two ways a pipeline's
own guidance is made to apply it). Model-agnostic."""

from __future__ import annotations

import functools

import torch


def token_guidance(sensitivity: torch.Tensor, cfg_context: float, cfg_sensitive: float) -> torch.Tensor:
    """gamma_i = gamma_c + (gamma_s - gamma_c) * s_i, [B, N] from s [B, N] in [0, 1]."""
    return cfg_context + (cfg_sensitive - cfg_context) * sensitivity


def config_guidance(config, sensitivity: torch.Tensor) -> torch.Tensor:
    """Per-token gamma [B, N] for a SafeConfig; with ``sw_map=False`` (ablation) every token gets the
    guidance of the map's per-image mean, so only the spatial weighting is removed."""
    if not config.sw_map:
        sensitivity = sensitivity.mean(1, keepdim=True).expand_as(sensitivity)
    return token_guidance(sensitivity, config.cfg_context, config.cfg_sensitive)


def guide(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """eps = eps_u + gamma ⊙ (eps_c - eps_u); gamma broadcasts over channels ([B, 1, H, W])."""
    return eps_uncond + gamma * (eps_cond - eps_uncond)


def pixel_gamma(config, gen, batch: int, size, dtype) -> torch.Tensor:
    """gamma_i of the conditional half's sensitivity map, upsampled from the token grid to the model
    output's pixels: [b, 1, H, W] for an output [2b, C, H, W] (a 3-D grid: [b, 1, F, H, W] for [2b, C, F, H, W]).
    ``size``: the output's trailing sizes, one per grid axis, or its width alone (every axis patched alike)."""
    cond, _ = gen.cfg_rows(batch)
    return upsample(config_guidance(config, gen.sensitivity[cond]), gen.grid, size).to(dtype)


def upsample(gamma: torch.Tensor, grid: tuple[int, ...], size) -> torch.Tensor:
    """A per-token map [b, N] on ``grid`` as [b, 1, *output sizes] (``size`` as for :func:`pixel_gamma`)."""
    grid = tuple(grid)
    sizes = (size,) if isinstance(size, int) else tuple(size)
    factors = [sizes[-1] // grid[-1]] * len(grid) if len(sizes) == 1 else [s // g for s, g in zip(sizes, grid)]
    gamma = gamma.view(-1, 1, *grid)  # [b, 1, (f,) h, w]
    for axis, p in enumerate(factors):
        gamma = gamma.repeat_interleave(p, 2 + axis)
    return gamma


def _sample_of(output):
    return output[0] if isinstance(output, tuple) else output.sample  # [B, C_out, H, W]


def sensitivity_weighted(runtime, gen, output, channels: int | None = None):
    """SW-CFG where the pipeline guides with u + g(c - u) (on the first ``channels`` channels, all
    if None): rewrite the cond prediction c' = u + (gamma_i / g)(c - u) so that the pipeline's own
    u + g(c' - u) equals u + gamma_i (c - u), gamma_i = gamma_c + (gamma_s - gamma_c) s_i."""
    g = float(getattr(runtime.pipe, "guidance_scale", 0.0) or 0.0)
    if not gen.cfg_batch or g <= 1.0:
        return output
    sample = _sample_of(output)  # [B, C_out, H, W]
    cond_rows, uncond_rows = gen.cfg_rows(sample.shape[0])
    c = sample.shape[1] if channels is None else channels
    gamma = pixel_gamma(runtime.config, gen, sample.shape[0], sample.shape[-len(gen.grid):],
                        sample.dtype)  # [b, 1, (F,) H, W]
    cond, uncond = sample[cond_rows, :c], sample[uncond_rows, :c]
    guided = sample.clone()
    guided[cond_rows, :c] = uncond + (gamma / g) * (cond - uncond)
    if isinstance(output, tuple):
        return (guided,) + tuple(output[1:])
    output.sample = guided
    return output


class SchedulerGuidance:
    """SW-CFG for pipelines that compute u + g(c - u) with a ``g`` local to ``__call__`` (PixArt) and may then
    keep only the first (latent) channels: the model output of a step is remembered, and the ``step`` of the
    scheduler the pipeline holds at that step (an instance attribute, put there at a generation's first guided
    step and taken away after its last) receives u + gamma_i (c - u) on those channels instead."""

    def __init__(self, pipe):
        self.pipe, self.pending, self.wrapped, self.done = pipe, None, None, False

    def _wrap(self, scheduler) -> None:
        if self.wrapped is scheduler:
            return
        self.remove()
        original = scheduler.step

        @functools.wraps(original)  # the pipeline inspects step's signature (eta, generator)
        def step(model_output, *args, **kwargs):  # model_output [b, C, H, W], already guided
            guided, self.pending = self.pending, None
            if self.done:  # the generation's last step: the scheduler is the pipeline's own again
                self.remove()
            if guided is not None and guided.shape[0] == model_output.shape[0] \
                    and guided.shape[1] >= model_output.shape[1] and guided.shape[2:] == model_output.shape[2:]:
                model_output = guided[:, : model_output.shape[1]].to(model_output.dtype)
            return original(model_output, *args, **kwargs)

        scheduler.step, self.wrapped = step, scheduler

    def remove(self) -> None:
        if self.wrapped is not None and "step" in vars(self.wrapped):
            del self.wrapped.step  # the class's own method again
        self.wrapped = None

    def clear(self, *_args) -> None:  # model forward pre-hook: nothing stale from an interrupted call
        self.pending = None

    def __call__(self, runtime, gen, output):  # model forward: remember u + gamma_i (c - u)
        if not gen.cfg_batch:
            return output
        self._wrap(self.pipe.scheduler)
        self.done = gen.is_last_step
        sample = _sample_of(output)  # [2b, C_out, H, W]
        cond, uncond = gen.cfg_rows(sample.shape[0])
        gamma = pixel_gamma(runtime.config, gen, sample.shape[0], sample.shape[-len(gen.grid):],
                        sample.dtype)  # [b, 1, (F,) H, W]
        self.pending = guide(sample[uncond], sample[cond], gamma)
        return output


class SeparateCallGuidance:
    """SW-CFG for pipelines that make a conditional and then an unconditional call per step and combine them as
    u + g(c - u) (Wan): the conditional output c is remembered, and the unconditional call returns
    u' = (u (1 - gamma_i) + c (gamma_i - g)) / (1 - g) instead of u, so that the pipeline's own u' + g(c - u')
    equals u + gamma_i (c - u) on every channel. ``scale()`` is the g the pipeline applies at this step."""

    def __init__(self, scale):
        self.scale, self.cond = scale, None

    def clear(self, *_args) -> None:  # nothing kept from an interrupted call
        self.cond = None

    def __call__(self, runtime, gen, output):
        if gen.calls_per_step != 2:
            return output
        sample = _sample_of(output)  # [B, C, (F,) H, W]
        if gen.call == 0:
            self.cond = sample
            return output
        cond, self.cond = self.cond, None
        g = float(self.scale() or 0.0)
        if cond is None or g <= 1.0:
            return output
        gamma = upsample(config_guidance(runtime.config, gen.sensitivity), gen.grid,
                         sample.shape[-len(gen.grid):]).to(sample.dtype)  # [B, 1, (F,) H, W]
        guided = (sample * (1 - gamma) + cond * (gamma - g)) / (1 - g)
        if isinstance(output, tuple):
            return (guided,) + tuple(output[1:])
        output.sample = guided
        return output
