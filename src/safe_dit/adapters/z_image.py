"""Z-Image adapter, exact fast path only (diffusers ``ZImageTransformer2DModel``, ``ZImagePipeline``).

Masks in the stock model: Z-Image pads every caption and image sequence to a multiple of 32 with learned pad
tokens (ordinary, attended tokens) and then pads the batch to its longest sequence with a [B, L] mask, which
``ZSingleStreamAttnProcessor`` views as [B, 1, 1, L]: the noise refiner, the caption refiner and every unified
block get one whenever the samples' padded lengths differ (captions of different lengths in a batch or CFG
pair), none otherwise. It is key padding, decided once per forward on the [B, L] tensor the model hands a
whole stack, and rewritten exactly: keys sliced, or the batch split by length.

Not yet: safe-core/safe-sw (the unified sequence is assembled from per-sample lists inside the forward,
[image_i; caption_i] with per-sample padding, which the sensitive rows cannot follow without a forward of
our own). They are refused; dense-fp is exact.
"""

from __future__ import annotations

from diffusers.models.transformers.transformer_z_image import ZImageTransformer2DModel, ZSingleStreamAttnProcessor

from safe_dit.adapters.contract import Adapter, SafeProcessor, register
from safe_dit.config import SafeDitError
from safe_dit.engine.attend import attend
from safe_dit.engine.hooks import layer_of

NOTES = ("Z-Image: a [B, L] batch-padding mask in the noise refiner, caption refiner and unified blocks whenever the "
         "samples' (32-padded) sequence lengths differ; key padding, rewritten exactly (keys sliced, batch split by "
         "length), decided once per forward. safe-core is not supported yet.")

NOT_SCHEDULED = ("safe-core/safe-sw are not supported on Z-Image yet: its unified [image; caption] sequence is built "
                 "from per-sample lists inside the model's forward, with per-sample padding, which the selective rows "
                 "cannot follow. Use mode='dense-fp' (exact: the batch-padding masks are rewritten into mask-free calls)")


class SafeZImageAttnProcessor(SafeProcessor):
    """Drop-in for ``ZSingleStreamAttnProcessor``: same projections, QK-norm and complex RoPE; the [B, L] padding
    mask decided by ``engine.attend`` (dropped or rewritten exactly), attention through diffusers' dispatcher."""

    stock = ZSingleStreamAttnProcessor

    def setup(self, model) -> None:
        self.layer = layer_of(self.name, "layers")

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, freqs_cis=None):
        query = attn.to_q(hidden_states).unflatten(-1, (attn.heads, -1))  # [B, L, H, d]
        key = attn.to_k(hidden_states).unflatten(-1, (attn.heads, -1))
        value = attn.to_v(hidden_states).unflatten(-1, (attn.heads, -1))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if freqs_cis is not None:
            query, key = _rotate(query, freqs_cis), _rotate(key, freqs_cis)
        dtype = query.dtype
        mask = attention_mask

        def stock_mask():  # as the stock processor passes it
            return mask[:, None, None, :] if mask.ndim == 2 else mask

        out = attend(self.runtime, self.name, query, key, value, mask, None, rewrite=self.rewrite_padding,
                     stock_mask=stock_mask, compact=lambda m: m.bool() if m.dim() == 2 else None, processor=self)
        out = out.flatten(2, 3).to(dtype)
        output = attn.to_out[0](out)
        if len(attn.to_out) > 1:
            output = attn.to_out[1](output)
        return output


def _rotate(x, freqs):
    """Z-Image's complex RoPE on x [B, L, H, d] with freqs [B, L, d/2], in float32 as the stock processor."""
    import torch

    with torch.amp.autocast("cuda", enabled=False):
        rotated = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2)) * freqs.unsqueeze(2)
        return torch.view_as_real(rotated).flatten(3).type_as(x)


@register
class ZImageAdapter(Adapter):
    name = "z-image"
    model_classes = (ZImageTransformer2DModel,)
    notes = NOTES
    processor = SafeZImageAttnProcessor
    replaces = (ZSingleStreamAttnProcessor,)

    def check(self, model, config) -> None:
        if config.scheduled:
            raise SafeDitError(NOT_SCHEDULED)
