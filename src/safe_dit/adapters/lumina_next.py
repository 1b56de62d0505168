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

import functools
import logging
import math

import torch
from diffusers.models.attention_processor import Attention, LuminaAttnProcessor2_0
from diffusers.models.embeddings import LuminaPatchEmbed, apply_rotary_emb
from diffusers.models.transformers.lumina_nextdit2d import LuminaNextDiT2DModel, LuminaNextDiTBlock

from safe_dit.adapters.contract import Adapter, SafeProcessor, register
from safe_dit.engine.attend import attend, collect_text_probs
from safe_dit.engine.guidance import sensitivity_weighted
from safe_dit.engine.hooks import caption_mask_check, layer_of
from safe_dit.engine.schedule import SELECTIVE

logger = logging.getLogger(__name__)

CERTIFIED_BY = "certified: LuminaPatchEmbed builds it all-valid"


class SafeLuminaAttnProcessor(SafeProcessor):
    """Drop-in for diffusers' ``LuminaAttnProcessor2_0`` that never hands SDPA a redundant mask.

    Same projections, QK-norm, RoPE, GQA and proportional-attention scale as the stock
    processor; only the mask handling differs.
    """

    stock = LuminaAttnProcessor2_0

    def setup(self, model) -> None:
        self.layer = layer_of(self.name, "layers")
        self.is_self = self.name.split(".")[-1] == "attn1"

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                 attention_mask: torch.Tensor | None = None, query_rotary_emb: torch.Tensor | None = None,
                 key_rotary_emb: torch.Tensor | None = None, base_sequence_length: int | None = None) -> torch.Tensor:
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
            collect_text_probs(self.runtime, gen, query, key,
                               None if attention_mask is None else attention_mask.bool())

        scale = None  # Lumina's proportional attention: only self-attention (RoPE on keys) rescales
        parallel = self.runtime is not None and self.runtime.parallel is not None
        if parallel and self.is_self and self.runtime.state is not None:
            seq_len = self.runtime.state.global_tokens  # context parallelism: the scale of the whole sequence
        if key_rotary_emb is not None:
            scale = attn.scale * (1 if base_sequence_length is None
                                  else math.sqrt(math.log(seq_len, base_sequence_length)))

        out = self._attend(attn, query, key, value, attention_mask, scale)  # [B, Lq, H, d]
        return out.to(dtype)

    def _attend(self, attn, query, key, value, mask, scale):
        """One attention call, q [B, Lq, H, d], k/v [B, Lk, Hkv, d]
        (bench forward's mask-free oracle overrides this)."""
        def stock_mask():  # what the stock processor passes: the mask expanded to [B, H, Lq, Lk] bool
            return mask.bool().view(query.shape[0], 1, 1, -1).expand(-1, query.shape[2], query.shape[1], -1)

        return attend(self.runtime, self.name, query, key, value, mask, scale, rewrite=self.rewrite_padding,
                      stock_mask=stock_mask, processor=self, sequence=self.is_self)


@register
class LuminaNextAdapter(Adapter):
    name = "lumina-next"
    model_classes = (LuminaNextDiT2DModel,)
    notes = ("Lumina-Next: LuminaPatchEmbed builds an all-ones image mask that every self-attention expands to "
             "[B, H, N, N] (elided by provenance); the caption padding mask reaches cross-attention (semantic: "
             "kept, or rewritten exactly by slicing/gathering valid keys and splitting the batch by length).")
    processor = SafeLuminaAttnProcessor
    tokens_in = None  # the patch embedder's hook gathers the sensitive rows with their RoPE rows and mask
    tokens_out = "norm_out"
    special_leading_tokens = 1  # Gemma's <bos> is not a prompt word
    # split after the patch embedder (tokens, their mask and RoPE rows), gathered after norm_out
    context_parallel = True

    def parallel_hooks(self, model, runtime, parallel) -> list:
        def split(_module, _inputs, outputs):
            x, mask, img_size, rope = outputs  # [B, N, D], [B, N], sizes, [1, N, d/2]
            if runtime.state is not None:
                runtime.state.global_tokens = x.shape[1]
            x, mask, rope = (parallel.shard(t, 1, "image tokens") for t in (x, mask, rope))  # N -> N_local
            return x, mask, img_size, rope

        return [model.patch_embedder.register_forward_hook(split)]

    @staticmethod
    def provenance_holds(model: LuminaNextDiT2DModel) -> bool:
        """The stock code paths that make the image mask all-valid are the ones in use."""
        return (
            type(model).forward is LuminaNextDiT2DModel.forward
            and type(model.patch_embedder).forward is LuminaPatchEmbed.forward
            and all(type(layer).forward is LuminaNextDiTBlock.forward for layer in model.layers)
        )

    def hooks(self, model, runtime, handle) -> list:
        config = runtime.config
        names = ("hidden_states", "timestep", "encoder_hidden_states", "encoder_mask")
        check = model.register_forward_pre_hook(caption_mask_check("encoder_mask", "encoder_hidden_states", names),
                                                with_kwargs=True)
        certified = self.provenance_holds(model)
        if not certified:
            logger.warning("%s: custom forward/patch embedder; image masks will be checked by value once per forward",
                           type(model).__name__)

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

        return [check, model.patch_embedder.register_forward_hook(on_patch_embed)]

    def guidance(self, model, runtime, handle):
        return functools.partial(sensitivity_weighted, channels=3)  # Lumina's pipeline guides the first 3 channels
