"""The hooks that wire a patched model: per-forward state, step tracking, the sensitive rows' way in and
out, input checks, and the processor swap with its exact undo. Model-agnostic: an adapter says which of
its modules they go on."""

from __future__ import annotations

import functools
import inspect
import math
from typing import Callable

import torch

from safe_dit.config import SafeDitError
from safe_dit.engine.attend import PARALLEL_REFUSED, Dispatch
from safe_dit.engine.generation import Generation
from safe_dit.engine.runtime import Runtime
from safe_dit.engine.schedule import SELECTIVE
from safe_dit.engine.step_caches import step_cache_check
from safe_dit.engine.step_reuse import step_reuse  # noqa: F401  (re-exported: adapters wire it with the rest)


def forward_scope(model: torch.nn.Module, runtime: Runtime) -> list:
    """Hooks that give every model forward its own ``ForwardState`` (released even on error), and refuse a model
    that diffusers' ``enable_parallelism`` split since apply (its input split would shard what safe-dit decides)
    and, under the scheduled modes, a diffusers step cache enabled since apply (``refuse_step_caches``)."""
    caches = step_cache_check(model, runtime.config.mode) if runtime.config.scheduled else None

    def begin(module, args):
        if getattr(module, "_parallel_config", None) is not None:
            raise SafeDitError(PARALLEL_REFUSED)
        if caches is not None:
            caches()
        runtime.begin(module, args)

    return [model.register_forward_pre_hook(begin), model.register_forward_hook(runtime.end, always_call=True)]


def schedule_hooks(model: torch.nn.Module, runtime: Runtime, grid, tokens_in: torch.nn.Module | None,
                   tokens_out: torch.nn.Module, guide: Callable | None = None,
                   inputs: tuple[str, str] = ("hidden_states", "timestep")) -> list:
    """The scheduled modes' hooks: step tracking (``grid`` as for ``StepTracker``; ``inputs`` the forward's
    latent and timestep parameters), sensitive rows in after ``tokens_in`` (None: the adapter gathers them
    itself), outputs scattered/cached after ``tokens_out`` (the last per-token layer), SW-CFG ``guide`` and the
    generation's release after the model's forward."""
    tracker = StepTracker(runtime, grid, *inputs, positions=_positions(model))
    hooks = [model.register_forward_pre_hook(tracker, with_kwargs=True)]
    if tokens_in is not None:
        hooks.append(tokens_in.register_forward_hook(gather_sensitive(runtime)))
    return hooks + [tokens_out.register_forward_hook(on_final_tokens(runtime)),
                    model.register_forward_hook(finish_step(runtime, guide or _unguided), always_call=True)]


def _unguided(_runtime, _gen, output):
    return output


def caption_mask_check(mask_arg: str, text_arg: str, positional: tuple[str, ...] = ()):
    """Model forward pre-hook: clear errors for caption masks the stock model would silently misread."""

    def hook(_model, args, kwargs):
        given = dict(zip(positional, args)) | {k: v for k, v in kwargs.items() if k in (mask_arg, text_arg)}
        mask, text = given.get(mask_arg), given.get(text_arg)
        if mask is None or text is None:
            return None
        if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or tuple(mask.shape) != tuple(text.shape[:2]):
            shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise SafeDitError(f"{mask_arg} must be [B, T] = {list(text.shape[:2])} like the captions, got {shape}")
        if mask.dtype.is_floating_point and bool(torch.isnan(mask).any()):
            raise SafeDitError(f"{mask_arg} contains NaN; refusing to guess which caption tokens are valid")
        if mask.dtype.is_complex:
            raise SafeDitError(f"{mask_arg} must be bool, integer or float, got {mask.dtype}")
        return None

    return hook


def swap_processors(model: torch.nn.Module, make_processor: Callable[[str], object], runtime: Runtime,
                    expected: tuple[type, ...] | None = None, keep: tuple[type, ...] = ()) -> Callable[[], None]:
    """Give every diffusers attention module of ``model`` (``Attention``, or the newer per-model classes
    such as ``FluxAttention``: anything with ``processor``/``set_processor``) a new processor, recorded in
    ``runtime.installed``; returns the exact undo (a module whose processor was swapped again since keeps
    the newer one). With ``expected``, any other processor (IP-Adapter, fused QKV, a user's own) is
    refused before anything changes: replacing it would silently drop what it does. Processors of the
    ``keep`` classes are left in place (e.g. FLUX's IP-Adapter processors under dense-fp)."""
    modules = [(n, m) for n, m in model.named_modules() if hasattr(m, "set_processor") and hasattr(m, "processor")
               and not isinstance(m.processor, keep)]
    for _, module in modules:  # a safe-dit processor left from an earlier patch (e.g. put back by
        stale = module.processor  # unfuse_qkv_projections) stands for the stock one it replaced
        if isinstance(stale, Dispatch) and type(stale).stock is not None:
            module.set_processor(type(stale).stock())
    if expected is not None:
        for name, module in modules:
            if not isinstance(module.processor, expected):
                raise SafeDitError(
                    f"{name} uses {type(module.processor).__name__}; safe-dit replaces only the stock "
                    f"{'/'.join(c.__name__ for c in expected)} (IP-Adapter under safe-core/safe-sw, custom "
                    "processors are not supported): use dense-fp, or restore the default processors first")
    for name, module in modules:
        if getattr(module.processor, "_parallel_config", None) is not None:
            raise SafeDitError(PARALLEL_REFUSED)
    originals = []
    for name, module in modules:
        new = make_processor(name)
        new._attention_backend = getattr(module.processor, "_attention_backend", None)  # the user's choice stays
        originals.append((module, module.processor, new))
        module.set_processor(new)
    runtime.installed = [(module, new) for module, _, new in originals]

    def restore():
        for module, original, new in originals:
            if module.processor is new:
                if getattr(new, "_parallel_config", None) is not None and hasattr(original, "_parallel_config"):
                    original._parallel_config = new._parallel_config  # enable_parallelism came after apply: the
                    # stock processor takes its parallel config, so the stock model runs correctly split
                module.set_processor(original)
        runtime.installed = []

    return restore


def layer_of(name: str, blocks: str) -> int:
    """Block index from an attention module name such as ``layers.3.attn1`` (-1 if none)."""
    parts = name.split(".")
    return int(parts[1]) if len(parts) > 2 and parts[0] == blocks and parts[1].isdigit() else -1


def latent_grid(patch):
    """Token grid of a latent input patchified by ``patch``: (h, w) of a [B, C, H, W] latent for an int patch,
    one size per axis of a [B, C, ..., H, W] latent for a tuple (a video's (t, h, w) patch: (frames, h, w))."""
    sizes = (patch, patch) if isinstance(patch, int) else tuple(patch)

    def grid(args, kwargs):
        latents = kwargs.get("hidden_states", args[0] if args else None)  # [B, C, (F,) H, W]
        return tuple(n // p for n, p in zip(latents.shape[-len(sizes):], sizes))

    return grid


def _positions(model: torch.nn.Module) -> dict[str, int]:
    """The positions of the forward's parameters (hooks see positional and keyword arguments apart)."""
    try:
        return {n: i for i, n in enumerate(inspect.signature(model.forward).parameters)}
    except (TypeError, ValueError):
        return {}


def _argument(args, kwargs, name: str, positions: dict[str, int], default: int | None = None):
    at = positions.get(name, default)
    return kwargs.get(name, args[at] if at is not None and at < len(args) else None)


class StepTracker:
    """Model forward pre-hook: which step of which generation this forward is, and what kind of step.

    ``grid`` is the patch size of a [B, C, H, W] latent input (a tuple: one per axis of a video latent
    [B, C, F, H, W]), or a callable (args, kwargs) -> the token grid, (h, w) or (frames, h, w), for backbones
    that take packed tokens (FLUX). The latents are the forward's ``latent_arg`` (a tensor [B, ...], or a list
    of per-sample tensors as Z-Image takes them), its timestep ``timestep_arg``. Where the pipeline runs CFG as
    separate calls (``runtime.cfg_calls``), a CFG pipeline call makes two calls per step, conditional first."""

    def __init__(self, runtime: Runtime, grid, latent_arg: str = "hidden_states", timestep_arg: str = "timestep",
                 positions: dict[str, int] | None = None):
        self.runtime = runtime
        self.grid_of = grid if callable(grid) else latent_grid(grid)
        self.latent_arg, self.timestep_arg, self.positions = latent_arg, timestep_arg, positions or {}

    @torch.compiler.disable  # step bookkeeping (step index, plan, timestep read) runs eagerly, between graphs
    def __call__(self, _model, args, kwargs):
        rt = self.runtime
        latents = _argument(args, kwargs, self.latent_arg, self.positions, 0)  # [B, ...] or B x [...]
        batch, device = (len(latents), latents[0].device) if isinstance(latents, (list, tuple)) \
            else (latents.shape[0], latents.device)
        grid = self.grid_of(args, kwargs)
        again = False  # the step's next call (CFG as separate calls)
        if rt.explicit_generation:
            gen, step, cfg = rt.generation, rt.generation.step + 1, rt.explicit_cfg
            if step >= gen.plan.num_steps:
                raise SafeDitError(f"safe_dit.generation(..., num_steps={gen.plan.num_steps}) got more transformer "
                                   "calls than steps: one call per sampling step")
        else:
            gen, step, again = self._pipeline_step(rt, _argument(args, kwargs, self.timestep_arg, self.positions))
            cfg = rt.pipeline_cfg
        if step == 0 and not again:  # a CFG batch is what the pipeline call said it is, never guessed from the latents
            separate = rt.cfg_calls and not rt.explicit_generation  # CFG as a conditional and an unconditional call
            gen.cfg_batch = bool(cfg) and rt.cfg_pairs and batch % 2 == 0 and not separate
            gen.calls_per_step = 2 if separate and cfg else 1
            gen.cond_first = rt.cond_first
        forecasts = rt.config.context_forecast or rt.config.reuse_every
        timestep = None  # the forecasts' variable; without it the step index
        if forecasts:
            timestep = _first_timestep(_argument(args, kwargs, self.timestep_arg, self.positions))
        gen.begin_step(step, math.prod(grid), grid, batch=batch, device=device, timestep=timestep)
        return None

    @staticmethod
    def _pipeline_step(rt: Runtime, timestep) -> tuple[Generation, int, bool]:
        """The step from the scheduler the pipeline holds now (it may have been replaced since apply), and whether
        this call is the step's next one (CFG as separate calls)."""
        scheduler = getattr(rt.pipe, "scheduler", None)
        if scheduler is None:
            raise SafeDitError(
                f"mode {rt.config.mode!r} needs the sampling schedule: apply safe-dit to the pipeline, or run the "
                "transformer inside `with safe_dit.generation(transformer, num_steps=...)`")
        index, gen = scheduler.step_index, rt.generation
        index = None if index is None else index - rt.step_offset
        more = gen is not None and gen.call + 1 < gen.calls_per_step  # a call of the current step is to come
        if index is None:  # the first step of a pipeline call
            t = _first_timestep(timestep)
            if more and gen.step == 0 and t == gen.first_timestep:
                return gen, 0, True
            if gen is not None and gen.step == 0 and None not in (t, gen.first_timestep) and t != gen.first_timestep:
                rt.generation = None
                raise SafeDitError(NOT_ADVANCING)
            rt.step_offset = _start_index(scheduler, t)
            gen = rt.generation = Generation(rt.config, len(scheduler.timesteps) - rt.step_offset, rt.parallel)
            gen.first_timestep, rt.finished_step = t, None
            return gen, 0, False
        if more and index == gen.step:
            return gen, index, True
        if (gen is not None and index == gen.step) or (gen is None and index == rt.finished_step):
            rt.generation = rt.finished_step = None  # (the second: the generation ended with the step's first call)
            raise SafeDitError(CALLED_AGAIN.format(mode=rt.config.mode, step=index))
        if gen is None or index != gen.step + 1 or index >= gen.plan.num_steps:
            rt.generation = None
            where = "no generation is running" if gen is None else f"the generation is at step {gen.step}"
            raise SafeDitError(
                f"mode {rt.config.mode!r} follows the pipeline's scheduler step by step, but this call comes at "
                f"scheduler step {index} while {where} (the transformer called outside the pipeline's loop, or by "
                "another pipeline that shares it): apply_safe_dit(that_pipeline, config), or run it inside "
                "`with safe_dit.generation(transformer, num_steps=...)`")
        return gen, index, False


def _start_index(scheduler, t) -> int:
    """Where in ``scheduler.timesteps`` a pipeline call starts: 0, or later where it starts part-way into the
    schedule (video-to-video, img2img at strength < 1): the scheduler's ``begin_index`` where the pipeline set it,
    else the first timestep's position (how the scheduler finds its own step index)."""
    begin = getattr(scheduler, "begin_index", None)
    if begin is not None:
        return int(begin)
    timesteps = getattr(scheduler, "timesteps", None)
    if t is None or timesteps is None or not len(timesteps):
        return 0
    timesteps = torch.as_tensor(timesteps).float().cpu()
    for scale in (1.0, 1000.0):  # pipelines pass the scheduler's timestep, or it / 1000 (FLUX, Qwen-Image, ...)
        hits = torch.isclose(timesteps, torch.tensor(float(t) * scale), rtol=1e-6, atol=1e-4).nonzero()
        if len(hits):
            return int(hits[0])
    return 0


CALLED_AGAIN = ("mode {mode!r} needs one transformer call per sampling step, but this pipeline called it again at "
                "step {step} (e.g. FLUX true_cfg_scale > 1 with a negative prompt, SD3 skip-layer guidance, or "
                "ChromaPipeline's CFG at guidance_scale > 1): each call would overwrite the other's caches. Use "
                "dense-fp for such runs, or batched CFG")

NOT_ADVANCING = ("the scheduler safe-dit follows did not advance between two transformer calls: this transformer is "
                 "driven by another pipeline (e.g. one made with from_pipe and its own scheduler) than the one it was "
                 "applied with; call apply_safe_dit(that_pipeline, config)")


def _first_timestep(t) -> float | None:
    """The first sample's timestep as a number (read at a generation's first step only)."""
    if t is None:
        return None
    return float(t.reshape(-1)[0]) if isinstance(t, torch.Tensor) else float(t)


def watch_cfg(pipe, runtime: Runtime) -> Callable[[], None]:
    """Record, for each pipeline call, whether it batches [cond; uncond] (its ``encode_prompt``'s
    ``do_classifier_free_guidance``); returns the undo. Without it the CFG batch is taken to be absent."""
    original = getattr(pipe, "encode_prompt", None)
    if original is None or "do_classifier_free_guidance" not in inspect.signature(original).parameters:
        return lambda: None
    signature = inspect.signature(original)

    @functools.wraps(original)
    def encode_prompt(*args, **kwargs):
        bound = signature.bind_partial(*args, **kwargs).arguments
        default = signature.parameters["do_classifier_free_guidance"].default
        runtime.pipeline_cfg = bool(bound.get("do_classifier_free_guidance", default))
        return original(*args, **kwargs)

    pipe.encode_prompt = encode_prompt

    def undo():
        if vars(pipe).get("encode_prompt") is encode_prompt:
            del pipe.encode_prompt

    return undo


def gather_sensitive(runtime: Runtime):
    """Forward hook on the layer that turns the input into image tokens ([B, N, D] out, positions
    already encoded): at selective steps only the sensitive rows [B, K, D] enter the blocks."""

    def hook(_module, _inputs, x):  # x [B, N, D]
        gen = runtime.generation
        return gen.gather(x) if gen is not None and gen.kind == SELECTIVE else None  # [B, K, D]

    return hook


def refuse_inputs(*names: str):
    """Model forward pre-hook for the scheduled modes: inputs that add per-image-token residuals inside the
    block stack (ControlNet) cannot follow the sensitive rows, so refuse them clearly instead of failing on
    a shape mismatch."""

    def hook(_model, _args, kwargs):
        given = [n for n in names if kwargs.get(n) is not None]
        if given:
            raise SafeDitError(f"{', '.join(given)} (ControlNet residuals for every image token) cannot be combined "
                               "with safe-core/safe-sw, which run only the sensitive image rows at selective steps; "
                               "use dense-fp")

    return hook


def on_final_tokens(runtime: Runtime):
    """Forward hook on the last per-token layer (output [B, N or K, p*p*C]): at selective steps
    context tokens reuse the anchor's output; at dense steps the output is cached."""

    def hook(_module, _inputs, out):
        gen = runtime.generation
        if gen is None:
            return None
        if gen.kind == SELECTIVE:
            return gen.scatter_output(out)
        gen.store_output(out)
        return None

    return hook


def finish_step(runtime: Runtime, guide: Callable):
    """Model forward hook: SW-CFG (``guide(runtime, gen, output)``) under safe-sw, and the
    generation's release after its last step."""

    def hook(_model, _inputs, output):
        gen = runtime.generation
        if gen is None:
            return None
        if output is None:  # the forward raised: partition and K/V caches go now, not at the next call
            runtime.finish_generation()
            return None
        if runtime.config.mode == "safe-sw" and gen.sensitivity is not None:
            output = guide(runtime, gen, output)
        if gen.is_last_step and not runtime.explicit_generation:
            runtime.finish_generation()  # release partition and caches with the pipeline call
            runtime.finished_step = gen.step  # a second call at this step is refused as one
        return output

    return hook
