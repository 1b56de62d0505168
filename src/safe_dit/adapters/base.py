"""Backbone adapter contract and registry (by model class)."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from typing import Callable

import torch

from safe_dit.config import SafeConfig, SafeDitError
from safe_dit.engine.guidance import config_guidance, guide
from safe_dit.engine.masks import KeyPaddingPlan, MaskDecision, sdpa_with_plan
from safe_dit.engine.partition import image_to_text_probs
from safe_dit.engine.schedule import SELECTIVE
from safe_dit.engine.generation import Generation

logger = logging.getLogger(__name__)


@dataclass
class ForwardState:
    """Per-forward scratch state: lives from the model's forward pre-hook to its post-hook.

    Masks are matched by object identity (``is``), never by value: a handful of entries per
    forward, and identity checks trace cleanly under torch.compile."""

    certified: list[tuple[torch.Tensor, str]] = field(default_factory=list)
    decisions: list[tuple[torch.Tensor, MaskDecision]] = field(default_factory=list)
    text_len: int = 0  # joint-sequence backbones: caption tokens of this forward
    memo: dict = field(default_factory=dict)  # per-forward values shared by all blocks (e.g. gathered RoPE)

    def certify(self, mask: torch.Tensor, why: str) -> None:
        """Record that ``mask`` (this very tensor object) is all-valid by construction."""
        self.certified.append((mask, why))

    def certification(self, mask: torch.Tensor) -> str | None:
        for known, why in self.certified:
            if known is mask:
                return why
        return None

    def key_padding_decision(self, mask: torch.Tensor, rewrite: bool, compact=None) -> MaskDecision:
        """Decide once per forward for a compact key-padding mask [B, Lk] of unknown origin.

        ``compact`` (optional) turns the mask as the model ships it into that [B, Lk] valid-key form,
        or None when it is no padding mask (then it is kept). Under torch.compile no value is read
        (a graph break and a host sync per call): the mask is kept as shipped, exact by definition."""
        if torch.compiler.is_compiling():
            return _KEPT_UNDER_COMPILE
        for known, decision in self.decisions:
            if known is mask:
                return decision
        valid = mask if compact is None else compact(mask)
        decision = _KEPT_NOT_PADDING if valid is None else decide_key_padding(valid, rewrite)
        self.decisions.append((mask, decision))
        return decision


_KEPT_UNDER_COMPILE = MaskDecision("kept: padding (torch.compile: no value reads)")
_KEPT_NOT_PADDING = MaskDecision("kept: semantic (not a key-padding mask)")


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

    def __init__(self, config: SafeConfig, special_leading_tokens: int = 0, special_trailing_tokens: int = 0,
                 cond_first: bool = True):
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
        self.special_leading_tokens = special_leading_tokens  # e.g. Gemma's <bos>
        self.special_trailing_tokens = special_trailing_tokens  # e.g. T5's </s>, the last valid token
        self.cond_first = cond_first  # CFG batch order: [cond; uncond] (Lumina) or [uncond; cond] (PixArt)

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
        if mask is not None:
            last = mask.bool().long().sum(1, keepdim=True)  # [B, 1] valid length (prefix padding)
            for i in range(1, self.special_trailing_tokens + 1):
                w.scatter_(1, (last - i).clamp_min(0), 0.0)
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

    def remove_hooks(self, hooks: list) -> None:
        """Undo: remove these torch hook handles."""
        self.on_remove(lambda: [h.remove() for h in hooks])


class Adapter:
    """One backbone: knows its blocks, its masks' provenance and how its pipeline runs."""

    name: str = "base"
    model_classes: tuple[type, ...] = ()
    notes: str = ""  # where this backbone's masks come from, for the audit

    def attach(self, model: torch.nn.Module, config: SafeConfig, pipe=None) -> Handle:  # pragma: no cover
        raise NotImplementedError

    def start(self, config: SafeConfig, pipe=None, **runtime_options) -> Handle:
        """A runtime (bound to the pipeline's scheduler, if any) and the undo log for one applied model."""
        runtime = Runtime(config, **runtime_options)
        runtime.pipe, runtime.scheduler = pipe, getattr(pipe, "scheduler", None)
        return Handle(config, runtime, self.name)


def forward_scope(model: torch.nn.Module, runtime: Runtime) -> list:
    """Hooks that give every model forward its own ``ForwardState`` (released even on error)."""
    return [model.register_forward_pre_hook(runtime.begin), model.register_forward_hook(runtime.end, always_call=True)]


def schedule_hooks(model: torch.nn.Module, runtime: Runtime, grid, tokens_in: torch.nn.Module | None,
                   tokens_out: torch.nn.Module, guide: Callable | None = None) -> list:
    """The scheduled modes' hooks: step tracking (``grid`` as for ``StepTracker``), sensitive rows in after
    ``tokens_in`` (None: the adapter gathers them itself), outputs scattered/cached after ``tokens_out`` (the
    last per-token layer), SW-CFG ``guide`` and the generation's release after the model's forward."""
    hooks = [model.register_forward_pre_hook(StepTracker(runtime, grid), with_kwargs=True)]
    if tokens_in is not None:
        hooks.append(tokens_in.register_forward_hook(gather_sensitive(runtime)))
    return hooks + [tokens_out.register_forward_hook(on_final_tokens(runtime)),
                    model.register_forward_hook(finish_step(runtime, guide or _unguided), always_call=True)]


def _unguided(_runtime, _gen, output):
    return output


def repeat_kv(key: torch.Tensor, value: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Grouped-query K/V [B, L, Hkv, d] -> [B, L, heads, d], each KV head repeated for its query heads."""
    n_rep = heads // key.shape[2]
    if n_rep <= 1:
        return key, value
    return tuple(t.unsqueeze(3).repeat(1, 1, 1, n_rep, 1).flatten(2, 3) for t in (key, value))


def collect_text_probs(runtime: Runtime, gen, query: torch.Tensor, key: torch.Tensor, valid: torch.Tensor | None):
    """PCSP tap on a cross-attention call: query [B, N, H, d], caption keys [B, T, Hkv, d], valid keys [B, T] or
    None; the image->text probabilities [B, N, T] go to the generation with the runtime's token weights."""
    k, _ = repeat_kv(key, key, query.shape[2])
    probs = image_to_text_probs(query.transpose(1, 2), k.transpose(1, 2), valid)  # [B, N, T]
    gen.collect(probs, runtime.text_weights(valid, probs.shape[-1], probs.device))


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


def attend(runtime: Runtime, name: str, query, key, value, mask, scale, *, rewrite: bool, stock_mask,
           compact=None) -> torch.Tensor:
    """SDPA for one attention call, q/k/v [B, H, L, d] -> [B, H, Lq, d]: no mask; a mask certified
    by provenance (dropped, no value read); or a mask decided once per forward: kept as the stock
    processor passes it (``stock_mask()``) or rewritten exactly into mask-free calls."""
    sdpa = torch.nn.functional.scaled_dot_product_attention
    if mask is None:
        runtime.record(name, "no mask")
        return sdpa(query, key, value, scale=scale)
    if not runtime.config.mask_elision:  # ablation: every mask exactly as the stock processor passes it
        runtime.record(name, "kept: fast path off (ablation)")
        return sdpa(query, key, value, attn_mask=stock_mask(), scale=scale)
    state = runtime.state
    if state is not None:
        why = state.certification(mask)
        if why is not None:
            runtime.record(name, "elided: " + why)
            return sdpa(query, key, value, scale=scale)
    if state is None:  # called outside a model forward: decide for this call alone
        state = ForwardState()
    decision = state.key_padding_decision(mask, rewrite, compact)
    runtime.record(name, decision.verdict)
    if decision.keep:
        return sdpa(query, key, value, attn_mask=stock_mask(), scale=scale)
    return sdpa_with_plan(query, key, value, decision.plan, scale)


def swap_processors(model: torch.nn.Module, make_processor: Callable[[str], object],
                    expected: tuple[type, ...] | None = None) -> Callable[[], None]:
    """Give every diffusers attention module of ``model`` (``Attention``, or the newer per-model classes
    such as ``FluxAttention``: anything with ``processor``/``set_processor``) a new processor; returns
    the exact undo. With ``expected``, any other processor (IP-Adapter, fused QKV, a user's own) is
    refused before anything changes: replacing it would silently drop what it does."""
    modules = [(n, m) for n, m in model.named_modules() if hasattr(m, "set_processor") and hasattr(m, "processor")]
    if expected is not None:
        for name, module in modules:
            if not isinstance(module.processor, expected):
                raise SafeDitError(
                    f"{name} uses {type(module.processor).__name__}; safe-dit replaces only the stock "
                    f"{'/'.join(c.__name__ for c in expected)} (IP-Adapter, fused QKV or custom processors are not "
                    "supported): restore the default processors first")
    originals = {}
    for name, module in modules:
        originals[name] = module.processor
        module.set_processor(make_processor(name))

    def restore():
        modules = dict(model.named_modules())
        for name, proc in originals.items():
            modules[name].set_processor(proc)

    return restore


def layer_of(name: str, blocks: str) -> int:
    """Block index from an attention module name such as ``layers.3.attn1`` (-1 if none)."""
    parts = name.split(".")
    return int(parts[1]) if len(parts) > 2 and parts[0] == blocks and parts[1].isdigit() else -1


def latent_grid(patch: int):
    """Token grid (h, w) of a [B, C, H, W] latent input patchified by ``patch``."""

    def grid(args, kwargs):
        latents = kwargs.get("hidden_states", args[0] if args else None)  # [B, C, H, W]
        return latents.shape[-2] // patch, latents.shape[-1] // patch

    return grid


class StepTracker:
    """Model forward pre-hook: which step of which generation this forward is, and what kind of step.

    ``grid`` is the patch size of a [B, C, H, W] latent input, or a callable (args, kwargs) -> (h, w)
    for backbones that take packed tokens (FLUX)."""

    def __init__(self, runtime: Runtime, grid):
        self.runtime = runtime
        self.grid_of = latent_grid(grid) if isinstance(grid, int) else grid

    def __call__(self, _model, args, kwargs):
        rt = self.runtime
        latents = kwargs.get("hidden_states", args[0] if args else None)  # [B, ...]
        grid = self.grid_of(args, kwargs)
        if rt.explicit_generation:
            gen = rt.generation
            step = gen.step + 1
        elif rt.scheduler is not None:
            index = rt.scheduler.step_index
            if index is None or rt.generation is None:  # a new pipeline call
                rt.generation = Generation(rt.config, len(rt.scheduler.timesteps))
            elif index == rt.generation.step:
                rt.generation = None
                raise SafeDitError(
                    f"mode {rt.config.mode!r} needs one transformer call per sampling step, but this pipeline called "
                    f"it again at step {index} (e.g. FLUX true_cfg_scale > 1 with a negative prompt, or SD3 skip-layer "
                    "guidance): each call would overwrite the other's caches. Use dense-fp for such runs, or batched CFG"
                )
            step = 0 if index is None else index
            gen = rt.generation
        else:
            raise SafeDitError(
                f"mode {rt.config.mode!r} needs the sampling schedule: apply safe-dit to the pipeline, or run the "
                "transformer inside `with safe_dit.generation(transformer, num_steps=...)`"
            )
        if step == 0:
            b = latents.shape[0]
            gen.cfg_batch = b % 2 == 0 and bool(torch.equal(latents[: b // 2], latents[b // 2:]))
            gen.cond_first = rt.cond_first
        gen.begin_step(step, grid[0] * grid[1], grid, batch=latents.shape[0], device=latents.device)
        return None


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
            raise SafeDitError(f"{', '.join(given)} (ControlNet residuals for every image token) cannot be combined with "
                               "safe-core/safe-sw, which run only the sensitive image rows at selective steps; use dense-fp")

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
        if runtime.config.mode == "safe-sw" and gen.sensitivity is not None:
            output = guide(runtime, gen, output)
        if gen.is_last_step and not runtime.explicit_generation:
            runtime.finish_generation()  # release partition and caches with the pipeline call
        return output

    return hook


def sensitivity_weighted(runtime: Runtime, gen, output, channels: int | None = None):
    """SW-CFG where the pipeline guides with u + g(c - u) (on the first ``channels`` channels, all
    if None): rewrite the cond prediction c' = u + (gamma_i / g)(c - u) so that the pipeline's own
    u + g(c' - u) equals u + gamma_i (c - u), gamma_i = gamma_c + (gamma_s - gamma_c) s_i."""
    g = float(getattr(runtime.pipe, "guidance_scale", 0.0) or 0.0)
    if not gen.cfg_batch or g <= 1.0:
        return output
    sample = output[0] if isinstance(output, tuple) else output.sample  # [B, C_out, H, W]
    half = sample.shape[0] // 2
    cond_rows, uncond_rows = (slice(0, half), slice(half, None)) if gen.cond_first else (slice(half, None), slice(0, half))
    c = sample.shape[1] if channels is None else channels
    cfg = runtime.config
    h, w = gen.grid
    p = sample.shape[-1] // w
    gamma = config_guidance(cfg, gen.sensitivity[cond_rows])  # [b, N]
    gamma = gamma.view(half, 1, h, w).repeat_interleave(p, 2).repeat_interleave(p, 3).to(sample.dtype)
    cond, uncond = sample[cond_rows, :c], sample[uncond_rows, :c]
    guided = sample.clone()
    guided[cond_rows, :c] = uncond + (gamma / g) * (cond - uncond)
    if isinstance(output, tuple):
        return (guided,) + tuple(output[1:])
    output.sample = guided
    return output


class SchedulerGuidance:
    """SW-CFG for pipelines that compute u + g(c - u) with a ``g`` local to ``__call__`` (PixArt) and may then
    keep only the first (latent) channels: the model output of a step is remembered, and this pipeline's
    ``scheduler.step`` (an instance attribute, removed again by ``remove_safe_dit``) receives
    u + gamma_i (c - u) on those channels instead."""

    def __init__(self, scheduler, cond_first: bool = False):
        self.scheduler, self.pending, self.cond_first = scheduler, None, cond_first  # CFG batch order
        self.original = scheduler.step

        @functools.wraps(self.original)  # the pipeline inspects step's signature (eta, generator)
        def step(model_output, *args, **kwargs):  # model_output [b, C, H, W], already guided
            guided, self.pending = self.pending, None
            if guided is not None and guided.shape[0] == model_output.shape[0] and guided.shape[1] >= model_output.shape[1] \
                    and guided.shape[2:] == model_output.shape[2:]:
                model_output = guided[:, : model_output.shape[1]].to(model_output.dtype)
            return self.original(model_output, *args, **kwargs)

        scheduler.step = step

    def remove(self) -> None:
        del self.scheduler.step  # the class's own method again

    def clear(self, *_args) -> None:  # model forward pre-hook: nothing stale from an interrupted call
        self.pending = None

    def __call__(self, runtime: Runtime, gen, output):  # model forward: remember u + gamma_i (c - u)
        if not gen.cfg_batch:
            return output
        sample = output[0] if isinstance(output, tuple) else output.sample  # [2b, C_out, H, W]
        first, second = sample.chunk(2)
        cond, uncond = (first, second) if self.cond_first else (second, first)
        h, w = gen.grid
        p = sample.shape[-1] // w
        cfg = runtime.config
        s_cond = gen.sensitivity[: first.shape[0]] if self.cond_first else gen.sensitivity[first.shape[0]:]
        gamma = config_guidance(cfg, s_cond)  # [b, N]
        gamma = gamma.view(-1, 1, h, w).repeat_interleave(p, 2).repeat_interleave(p, 3)  # [b, 1, H, W]
        self.pending = guide(uncond, cond, gamma.to(sample.dtype))
        return output


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
