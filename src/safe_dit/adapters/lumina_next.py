"""Lumina-Next adapter (diffusers ``LuminaNextDiT2DModel``).

Mask provenance in the stock model: ``LuminaPatchEmbed.forward`` returns ``torch.ones(B, N)``
as the image mask (every patch of a same-size batch is valid) and the stock model forward hands
that very tensor to every block's self-attention, whose processor expands it to [B, H, N, N].
The adapter certifies that tensor object as it leaves the patch embedder; the self-attention
processor drops it by identity, without reading values. Caption padding (``encoder_mask``)
reaches cross-attention: it is semantic and is either kept or rewritten exactly (gather the
valid caption tokens, split the CFG batch by caption length), decided once per forward.
"""

from __future__ import annotations

import logging
import math

import torch
from diffusers.models.attention_processor import Attention
from diffusers.models.embeddings import LuminaPatchEmbed, apply_rotary_emb
from diffusers.models.transformers.lumina_nextdit2d import LuminaNextDiT2DModel, LuminaNextDiTBlock

from ..config import SafeConfig, SafeDitError
from ..masks import sdpa_with_plan
from ..partition import image_to_text_probs
from ..schedule import SELECTIVE
from ..selective import Generation
from .base import Adapter, ForwardState, Handle, Runtime, register

logger = logging.getLogger(__name__)

CERTIFIED_BY = "certified: LuminaPatchEmbed builds it all-valid"


class SafeLuminaAttnProcessor:
    """Drop-in for diffusers' ``LuminaAttnProcessor2_0`` that never hands SDPA a redundant mask.

    Same projections, QK-norm, RoPE, GQA and proportional-attention scale as the stock
    processor; only the mask handling differs.
    """

    def __init__(self, runtime: Runtime, name: str, rewrite_padding: bool):
        self.runtime = runtime
        self.name = name
        self.rewrite_padding = rewrite_padding
        parts = name.split(".")
        self.layer = int(parts[1]) if len(parts) > 2 and parts[0] == "layers" and parts[1].isdigit() else -1
        self.is_self = parts[-1] == "attn1"

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        query_rotary_emb: torch.Tensor | None = None,
        key_rotary_emb: torch.Tensor | None = None,
        base_sequence_length: int | None = None,
    ) -> torch.Tensor:
        if hidden_states.ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        batch, seq_len, _ = hidden_states.shape  # [B, Lq, D]

        query = attn.to_q(hidden_states)  # [B, Lq, H*d]
        key = attn.to_k(encoder_hidden_states)  # [B, Lk, Hkv*d]
        value = attn.to_v(encoder_hidden_states)
        head_dim = query.shape[-1] // attn.heads
        kv_heads = key.shape[-1] // head_dim
        dtype = query.dtype
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        query = query.view(batch, -1, attn.heads, head_dim)  # [B, Lq, H, d]
        key = key.view(batch, -1, kv_heads, head_dim)  # [B, Lk, Hkv, d]
        value = value.view(batch, -1, kv_heads, head_dim)
        if query_rotary_emb is not None:
            query = apply_rotary_emb(query, query_rotary_emb, use_real=False)
        if key_rotary_emb is not None:
            key = apply_rotary_emb(key, key_rotary_emb, use_real=False)
        query, key = query.to(dtype), key.to(dtype)

        gen = self.runtime.generation if self.runtime is not None else None
        if gen is not None and self.is_self:
            if gen.kind == SELECTIVE:  # SRSU: sensitive rows attend to fresh + cached context K/V
                key, value = gen.merged_kv(self.layer, key, value)  # [B, N, Hkv, d]
                seq_len = key.shape[1]  # the proportional scale follows the full sequence
            elif gen.refreshes_cache:
                gen.store_kv(self.layer, key, value)
        elif gen is not None and gen.wants_probs(self.layer):  # PCSP, on its own small N x T softmax
            self._collect_probs(gen, attn, query, key, attention_mask)

        # Lumina's proportional attention: only self-attention (RoPE on keys) rescales.
        if key_rotary_emb is None:
            scale = None
        elif base_sequence_length is not None:
            scale = math.sqrt(math.log(seq_len, base_sequence_length)) * attn.scale
        else:
            scale = attn.scale

        n_rep = attn.heads // kv_heads
        if n_rep >= 1:
            key = key.unsqueeze(3).repeat(1, 1, 1, n_rep, 1).flatten(2, 3)  # [B, Lk, H, d]
            value = value.unsqueeze(3).repeat(1, 1, 1, n_rep, 1).flatten(2, 3)
        query, key, value = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)  # [B, H, L, d]

        out = self._attend(attn, query, key, value, attention_mask, scale)  # [B, H, Lq, d]
        return out.transpose(1, 2).to(dtype)  # [B, Lq, H, d]

    def _collect_probs(self, gen, attn, query, key, mask):
        n_rep = attn.heads // key.shape[2]
        k = key.repeat_interleave(n_rep, dim=2) if n_rep > 1 else key  # [B, T, H, d]
        valid = None if mask is None else mask.bool()  # [B, T]
        probs = image_to_text_probs(query.transpose(1, 2), k.transpose(1, 2), valid)  # [B, N, T]
        gen.collect(probs, self.runtime.text_weights(mask, probs.shape[-1], probs.device))

    def _attend(self, attn, query, key, value, mask, scale):
        sdpa = torch.nn.functional.scaled_dot_product_attention
        rt = self.runtime
        if mask is None:
            rt.record(self.name, "no mask")
            return sdpa(query, key, value, scale=scale)
        state = rt.state
        if state is not None:
            why = state.certification(mask)
            if why is not None:
                rt.record(self.name, "elided: " + why)
                return sdpa(query, key, value, scale=scale)
        if state is None:  # called outside a model forward: decide for this call alone
            state = ForwardState()
        decision = state.key_padding_decision(mask, self.rewrite_padding)
        rt.record(self.name, decision.verdict)
        if decision.keep:
            b, h, lq = query.shape[:3]
            full = mask.bool().view(b, 1, 1, -1).expand(-1, h, lq, -1)  # [B, H, Lq, Lk] as stock
            return sdpa(query, key, value, attn_mask=full, scale=scale)
        return sdpa_with_plan(query, key, value, decision.plan, scale)


class LuminaNextAdapter(Adapter):
    name = "lumina-next"
    model_classes = (LuminaNextDiT2DModel,)

    @staticmethod
    def provenance_holds(model: LuminaNextDiT2DModel) -> bool:
        """The stock code paths that make the image mask all-valid are the ones in use."""
        return (
            type(model).forward is LuminaNextDiT2DModel.forward
            and type(model.patch_embedder).forward is LuminaPatchEmbed.forward
            and all(type(layer).forward is LuminaNextDiTBlock.forward for layer in model.layers)
        )

    def attach(self, model: LuminaNextDiT2DModel, config: SafeConfig, pipe=None) -> Handle:
        # Gemma (Lumina-Next's text encoder) starts every caption with <bos>: not a prompt word.
        runtime = Runtime(config, special_leading_tokens=1)
        runtime.pipe = pipe
        runtime.scheduler = getattr(pipe, "scheduler", None)
        handle = Handle(config, runtime, self.name)
        if not config.fast_path:
            return handle  # dense: the stock model, untouched

        handle.on_remove(_swap_processors(model, runtime, config))
        hooks = [
            model.register_forward_pre_hook(_validate_inputs, with_kwargs=True),
            model.register_forward_pre_hook(runtime.begin),
            model.register_forward_hook(runtime.end, always_call=True),
        ]
        certified = self.provenance_holds(model)
        if not certified:
            logger.warning(
                "%s: custom forward/patch embedder; image masks will be checked by value once per forward",
                type(model).__name__,
            )

        def on_patch_embed(_module, _inputs, outputs):
            x, mask, img_size, rope = outputs  # [B, N, D], [B, N], sizes, [1, N, d/2]
            gen = runtime.generation
            if gen is not None and gen.kind == SELECTIVE:  # SRSU: only sensitive rows enter the blocks
                x, mask, rope = gen.gather(x), gen.gather(mask), gen.gather(rope)
            if certified and runtime.state is not None:
                runtime.state.certify(mask, CERTIFIED_BY)
            return x, mask, img_size, rope

        hooks.append(model.patch_embedder.register_forward_hook(on_patch_embed))
        if config.scheduled:
            hooks.append(model.register_forward_pre_hook(_StepTracker(runtime, model.config.patch_size), with_kwargs=True))
            hooks.append(model.norm_out.register_forward_hook(_on_norm_out(runtime)))
            hooks.append(model.register_forward_hook(_finish_step(runtime), always_call=True))
        handle.on_remove(lambda: [h.remove() for h in hooks])
        return handle


class _StepTracker:
    """Forward pre-hook: which step of which generation this forward is, and what kind of step."""

    def __init__(self, runtime: Runtime, patch: int):
        self.runtime, self.patch = runtime, patch

    def __call__(self, _model, args, kwargs):
        rt = self.runtime
        latents = kwargs.get("hidden_states", args[0] if args else None)  # [B, C, H, W]
        grid = (latents.shape[-2] // self.patch, latents.shape[-1] // self.patch)
        if rt.explicit_generation:
            gen = rt.generation
            step = gen.step + 1
        elif rt.scheduler is not None:
            index = rt.scheduler.step_index
            if index is None or rt.generation is None:  # a new pipeline call
                rt.generation = Generation(rt.config, len(rt.scheduler.timesteps))
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
        gen.begin_step(step, grid[0] * grid[1], grid)
        return None


def _on_norm_out(runtime: Runtime):
    def hook(_module, _inputs, out):  # out [B, N or K, p*p*C]
        gen = runtime.generation
        if gen is None:
            return None
        if gen.kind == SELECTIVE:
            return gen.scatter_output(out)  # context tokens reuse the anchor's output
        gen.store_output(out)
        return None

    return hook


def _finish_step(runtime: Runtime):
    def hook(_model, _inputs, output):
        gen = runtime.generation
        if gen is None:
            return None
        if runtime.config.mode == "safe-sw" and gen.sensitivity is not None:
            output = _sensitivity_weighted(runtime, gen, output)
        if gen.is_last_step and not runtime.explicit_generation:
            runtime.finish_generation()  # release partition and caches with the pipeline call
        return output

    return hook


def _sensitivity_weighted(runtime: Runtime, gen, output):
    """SW-CFG where Lumina's pipeline guides (first 3 channels of the cond half): rewrite the cond
    prediction c' = u + (gamma_i / g)(c - u) so that the pipeline's u + g(c' - u) = u + gamma_i (c - u)."""
    g = float(getattr(runtime.pipe, "guidance_scale", 0.0) or 0.0)
    if not gen.cfg_batch or g <= 1.0:
        return output
    sample = output[0] if isinstance(output, tuple) else output.sample  # [B, 2C, H, W]
    half = sample.shape[0] // 2
    cfg = runtime.config
    h, w = gen.grid
    p = sample.shape[-1] // w
    gamma = cfg.cfg_context + (cfg.cfg_sensitive - cfg.cfg_context) * gen.sensitivity[:half]  # [b, N]
    gamma = gamma.view(half, 1, h, w).repeat_interleave(p, 2).repeat_interleave(p, 3).to(sample.dtype)
    cond, uncond = sample[:half, :3], sample[half:, :3]
    guided = sample.clone()
    guided[:half, :3] = uncond + (gamma / g) * (cond - uncond)
    if isinstance(output, tuple):
        return (guided,) + tuple(output[1:])
    output.sample = guided
    return output


def _validate_inputs(_model, args, kwargs):
    """Clear errors for caption masks the stock model would silently misread (once per forward)."""
    names = ("hidden_states", "timestep", "encoder_hidden_states", "encoder_mask")
    given = dict(zip(names, args)) | {k: v for k, v in kwargs.items() if k in names}
    mask, text = given.get("encoder_mask"), given.get("encoder_hidden_states")
    if mask is None or text is None:
        return None
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or tuple(mask.shape) != tuple(text.shape[:2]):
        shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise SafeDitError(f"encoder_mask must be [B, T] = {list(text.shape[:2])} like the captions, got {shape}")
    if mask.dtype.is_floating_point and bool(torch.isnan(mask).any()):
        raise SafeDitError("encoder_mask contains NaN; refusing to guess which caption tokens are valid")
    if mask.dtype.is_complex:
        raise SafeDitError(f"encoder_mask must be bool, integer or float, got {mask.dtype}")
    return None


def _swap_processors(model, runtime: Runtime, config: SafeConfig):
    originals = {}
    for name, module in model.named_modules():
        if isinstance(module, Attention):
            originals[name] = module.processor
            module.set_processor(SafeLuminaAttnProcessor(runtime, name, config.rewrite_padding))

    def restore():
        modules = dict(model.named_modules())
        for name, proc in originals.items():
            modules[name].set_processor(proc)

    return restore


register(LuminaNextAdapter())
