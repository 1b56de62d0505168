"""SD3 adapter (diffusers ``SD3Transformer2DModel``: SD3 / SD3.5 through ``StableDiffusion3Pipeline``).

Masks in the stock model: none. ``JointAttnProcessor2_0`` never passes a mask to SDPA (it ignores an
``attention_mask`` argument altogether) and ``StableDiffusion3Pipeline`` builds none: CLIP and T5
padding tokens are ordinary tokens of the joint sequence. So ``dense-fp`` has nothing to elide and
equals ``dense``; any SAFE-Core gain on SD3 is scheduling. (Like the stock processor, a mask handed
in through ``joint_attention_kwargs`` is ignored.)

Joint sequence [image; text]: image tokens (absolute sin-cos position embedding added by ``pos_embed``,
so no RoPE) are gathered right after ``pos_embed`` at selective steps and scattered after ``proj_out``;
text tokens are always computed. PCSP reads the image-query x text-key block of each block's joint
attention. SD3.5's extra image-only self-attention (``attn2``) gets its own K/V cache. The CFG batch is
[uncond; cond] and the pipeline guides all channels with ``pipe.guidance_scale``: SW-CFG rewrites the
cond prediction so that its u + g(c - u) becomes u + gamma_i (c - u).
"""

from __future__ import annotations

import torch
from diffusers.models.attention_processor import Attention, FusedJointAttnProcessor2_0, JointAttnProcessor2_0
from diffusers.models.transformers.transformer_sd3 import SD3Transformer2DModel

from safe_dit.adapters.contract import Adapter, SafeProcessor, register
from safe_dit.engine.hooks import layer_of
from safe_dit.engine.joint import joint_attention
from safe_dit.engine.parallel import split_tokens

NOTES = ("SD3: JointAttnProcessor2_0 passes no mask to SDPA and StableDiffusion3Pipeline builds none "
         "(caption padding is ordinary tokens of the joint sequence): nothing to elide, dense-fp == dense; "
         "SAFE-Core's gain here is scheduling only.")


class SafeSD3AttnProcessor(SafeProcessor):
    """Drop-in for ``JointAttnProcessor2_0``: same projections, QK norms and [image; text] order; adds
    the SRSU K/V cache and the PCSP tap through :func:`joint_attention`."""

    stock = JointAttnProcessor2_0

    def setup(self, model) -> None:
        self.layer = layer_of(self.name, "transformer_blocks")

    def __call__(self, attn: Attention, hidden_states, encoder_hidden_states=None, attention_mask=None, *args,
                 **kwargs):
        batch = hidden_states.shape[0]  # hidden_states [B, n, D]: n = N, or K at selective steps
        d = attn.to_k.out_features // attn.heads

        def heads(t):  # [B, L, H*d] -> [B, L, H, d]
            return t.view(batch, -1, attn.heads, d)

        fused = getattr(attn, "fused_projections", False)  # after fuse_qkv_projections: one to_qkv, as stock then
        if fused:
            q, k, v = (heads(t) for t in attn.to_qkv(hidden_states).chunk(3, dim=-1))
        else:
            q, k, v = heads(attn.to_q(hidden_states)), heads(attn.to_k(hidden_states)), heads(attn.to_v(hidden_states))
        if attn.norm_q is not None:  # per-head norms over d: the same on [B, L, H, d] as on [B, H, L, d]
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        parts = [(q, k, v)]
        if encoder_hidden_states is not None:  # [B, T, D], after the image rows as in the stock processor
            e = encoder_hidden_states
            if fused:
                tq, tk, tv = (heads(t) for t in attn.to_added_qkv(e).chunk(3, dim=-1))
            else:
                tq, tk, tv = heads(attn.add_q_proj(e)), heads(attn.add_k_proj(e)), heads(attn.add_v_proj(e))
            if attn.norm_added_q is not None:
                tq = attn.norm_added_q(tq)
            if attn.norm_added_k is not None:
                tk = attn.norm_added_k(tk)
            parts.append((tq, tk, tv))
        n_img = q.shape[1]
        joint = [torch.cat(t, dim=1) if len(parts) > 1 else t[0] for t in zip(*parts)]  # [B, n + T, H, d]
        out = joint_attention(self, *joint, joint[0].shape[1] - n_img, text_first=False)
        out = out.reshape(batch, -1, attn.heads * d).to(q.dtype)  # [B, n + T, D]
        img = attn.to_out[1](attn.to_out[0](out[:, :n_img]))  # [B, n, D]
        if encoder_hidden_states is None:
            return img
        txt = out[:, n_img:]  # [B, T, D]
        if not attn.context_pre_only:
            txt = attn.to_add_out(txt)
        return img, txt


@register
class SD3Adapter(Adapter):
    name = "sd3"
    model_classes = (SD3Transformer2DModel,)
    notes = NOTES
    processor = SafeSD3AttnProcessor
    replaces = (JointAttnProcessor2_0, FusedJointAttnProcessor2_0)
    tokens_in = "pos_embed"
    tokens_out = "proj_out"  # before unpatchify
    cond_first = False  # CFG batch [uncond; cond]
    refused_inputs = ("block_controlnet_hidden_states",)
    context_parallel = True  # image tokens split after pos_embed, text after context_embedder; gathered after proj_out

    def parallel_hooks(self, model, runtime, parallel) -> list:
        return [model.pos_embed.register_forward_hook(split_tokens(runtime, parallel)),
                model.context_embedder.register_forward_hook(split_tokens(runtime, parallel, "caption tokens", False))]
