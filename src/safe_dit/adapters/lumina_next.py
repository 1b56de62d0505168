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
from ..partition import image_to_text_probs
from ..schedule import SELECTIVE
from .base import (Adapter, Handle, Runtime, StepTracker, attend, finish_step, layer_of, on_final_tokens, register,
                   sensitivity_weighted, swap_processors)

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
        self.layer = layer_of(name, "layers")
        self.is_self = name.split(".")[-1] == "attn1"

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
        def stock_mask():  # what the stock processor passes: the mask expanded to [B, H, Lq, Lk] bool
            b, h, lq = query.shape[:3]
            return mask.bool().view(b, 1, 1, -1).expand(-1, h, lq, -1)

        return attend(self.runtime, self.name, query, key, value, mask, scale,
                      rewrite=self.rewrite_padding, stock_mask=stock_mask)


class LuminaNextAdapter(Adapter):
    name = "lumina-next"
    model_classes = (LuminaNextDiT2DModel,)
    notes = ("Lumina-Next: LuminaPatchEmbed builds an all-ones image mask that every self-attention expands to "
             "[B, H, N, N] (elided by provenance); the caption padding mask reaches cross-attention (semantic: "
             "kept, or rewritten exactly by slicing/gathering valid keys and splitting the batch by length).")

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

        handle.on_remove(swap_processors(model, lambda name: SafeLuminaAttnProcessor(runtime, name, config.rewrite_padding)))
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
                x, rope = gen.gather(x), gen.gather(rope)
                if config.mask_elision:  # else (ablation) the stock [B, N] key mask stays: keys are all N tokens
                    mask = gen.gather(mask)
            if certified and config.mask_elision and runtime.state is not None:
                runtime.state.certify(mask, CERTIFIED_BY)
            return x, mask, img_size, rope

        hooks.append(model.patch_embedder.register_forward_hook(on_patch_embed))
        if config.scheduled:
            hooks.append(model.register_forward_pre_hook(StepTracker(runtime, model.config.patch_size), with_kwargs=True))
            hooks.append(model.norm_out.register_forward_hook(on_final_tokens(runtime)))
            hooks.append(model.register_forward_hook(finish_step(runtime, _sensitivity_weighted), always_call=True))
        handle.on_remove(lambda: [h.remove() for h in hooks])
        return handle


def _sensitivity_weighted(runtime: Runtime, gen, output):
    """SW-CFG where Lumina's pipeline guides: the first 3 channels of the [cond; uncond] batch."""
    return sensitivity_weighted(runtime, gen, output, channels=3)


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


register(LuminaNextAdapter())
