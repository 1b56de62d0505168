"""PixArt adapter (diffusers ``PixArtTransformer2DModel``: PixArt-Sigma and PixArt-Alpha pipelines).

Masks in the stock model: ``PixArtSigmaPipeline``/``PixArtAlphaPipeline`` pass no ``attention_mask``,
so image self-attention (``attn1``) runs mask-free already: nothing to elide or certify. The T5
caption padding mask reaches cross-attention (``attn2``) as an additive bias [B, 1, T] (0 valid,
-10000 padding) that ``AttnProcessor2_0`` repeats per head: semantic, so it is kept or rewritten
exactly (slice or gather the valid caption keys, split the CFG batch by caption length), decided
once per forward. A user's own ``attention_mask`` goes through the same once-per-forward decision.

SRSU needs no RoPE: the patch embedder's output already carries the absolute position embedding,
so sensitive rows are gathered right after it and scattered back after ``proj_out``. PixArt's CFG
batch is [uncond; cond] and its pipeline guides every output channel (learned sigma included,
split off afterwards) with a ``guidance_scale`` it keeps local to ``__call__``: SW-CFG therefore
replaces the guided prediction where the scheduler receives it (see ``base.SchedulerGuidance``).
"""

from __future__ import annotations

import logging

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from diffusers.models.transformers.pixart_transformer_2d import PixArtTransformer2DModel

from safe_dit.adapters.contract import Adapter, SafeProcessor, register
from safe_dit.engine.attend import attend, collect_text_probs
from safe_dit.engine.guidance import SchedulerGuidance
from safe_dit.engine.hooks import layer_of
from safe_dit.engine.masks import key_padding_from_bias
from safe_dit.engine.parallel import split_tokens
from safe_dit.engine.schedule import SELECTIVE

logger = logging.getLogger(__name__)


class SafePixArtAttnProcessor(SafeProcessor):
    """Drop-in for diffusers' ``AttnProcessor2_0`` in PixArt blocks: same projections and norms;
    only the mask handling differs, plus the SRSU K/V cache and the PCSP tap."""

    stock = AttnProcessor2_0

    def setup(self, model) -> None:
        self.layer = layer_of(self.name, "transformer_blocks")
        self.is_self = self.name.split(".")[-1] == "attn1"

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        batch = hidden_states.shape[0]  # hidden_states [B, Lq, D]
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states  # [B, Lk, Dk]
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        query, key, value = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)  # [B, L, H*d]
        d = key.shape[-1] // attn.heads
        query, key, value = (t.view(batch, -1, attn.heads, d) for t in (query, key, value))  # [B, L, H, d]
        if attn.norm_q is not None:  # per-head norms over d: the same on [B, L, H, d] as on [B, H, L, d]
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        gen = self.runtime.generation
        if gen is not None and self.is_self:
            if gen.kind == SELECTIVE:  # SRSU: sensitive rows attend to fresh + cached context K/V
                key, value = gen.merged_kv(self.layer, key, value)  # [B, N, H, d]
            elif gen.refreshes_cache:
                gen.store_kv(self.layer, key, value)
        elif gen is not None and gen.wants_probs(self.layer):  # PCSP, on its own small N x T softmax
            valid = None if attention_mask is None else _valid_keys(attention_mask, batch)  # [B, T]
            collect_text_probs(self.runtime, gen, query, key, valid)

        def stock_mask():  # as AttnProcessor2_0: repeated per head, [B, H, 1 or Lq, Lk]
            m = attn.prepare_attention_mask(attention_mask, key.shape[1], batch)
            return m.view(batch, attn.heads, -1, m.shape[-1])

        out = attend(self.runtime, self.name, query, key, value, attention_mask, None, rewrite=self.rewrite_padding,
                     stock_mask=stock_mask, compact=lambda m: key_padding_from_bias(m, batch),
                     processor=self, sequence=self.is_self)  # [B, Lq, H, d]
        out = out.reshape(batch, -1, attn.heads * d).to(query.dtype)  # [B, Lq, H*d]
        out = attn.to_out[1](attn.to_out[0](out))
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def _valid_keys(mask: torch.Tensor, batch: int) -> torch.Tensor | None:
    """Valid caption keys [B, T] for PCSP from the bias/bool mask (elementwise, no host sync)."""
    if mask.dim() not in (2, 3) or mask.numel() != batch * mask.shape[-1]:
        return None
    m = mask.reshape(batch, -1)
    return m if m.dtype == torch.bool else m == 0


@register
class PixArtAdapter(Adapter):
    name = "pixart"
    model_classes = (PixArtTransformer2DModel,)
    notes = ("PixArt: the pipelines pass no image mask (self-attention is mask-free already); the T5 caption "
             "padding bias reaches cross-attention (semantic: kept, or rewritten exactly).")
    processor = SafePixArtAttnProcessor
    tokens_in = "pos_embed"
    tokens_out = "proj_out"  # before unpatchify
    cond_first = False  # the CFG batch is [uncond; cond]
    special_trailing_tokens = 1  # T5 ends every caption with </s> (not a prompt word)
    context_parallel = True  # split after pos_embed (positions already added), gathered after proj_out

    def parallel_hooks(self, model, runtime, parallel) -> list:
        return [model.pos_embed.register_forward_hook(split_tokens(runtime, parallel))]

    def guidance(self, model, runtime, handle):
        scheduler = getattr(runtime.pipe, "scheduler", None)
        if scheduler is None or "step" in vars(scheduler):
            logger.warning("safe-sw on PixArt needs the pipeline (its scheduler.step, not already wrapped): "
                           "plain CFG will be used")
            return None
        guidance = SchedulerGuidance(runtime.pipe)
        handle.on_remove(guidance.remove)
        handle.remove_hooks([model.register_forward_pre_hook(guidance.clear)])
        return guidance
