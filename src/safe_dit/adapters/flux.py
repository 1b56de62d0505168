"""FLUX adapter (diffusers ``FluxTransformer2DModel``: FLUX.1-dev / schnell through ``FluxPipeline``).

Masks in the stock model: none. ``FluxPipeline`` builds no attention mask (T5 padding tokens are
ordinary tokens of the joint sequence) and the model forward passes none, so ``dense-fp`` has
nothing to elide and equals ``dense``. A mask a user hands in through ``joint_attention_kwargs``
reaches every block's ``FluxAttnProcessor``; here it goes through the same once-per-forward key-padding
decision as elsewhere (kept as shipped, or rewritten exactly).

Joint sequence [text; image] with RoPE on both (ids = [txt_ids; img_ids]). Image tokens arrive packed
([B, N, C], positions only in ``img_ids``): sensitive rows are gathered right after ``x_embedder`` and
scattered after ``proj_out``; each block rotates them with their own positions' RoPE rows, and the
cached context K are stored after RoPE. Text tokens are always computed, in the 19 double-stream
blocks and in the 38 single-stream blocks ([text; image] in one stream, split by caption length).

Guidance: FLUX.1-dev/schnell are guidance-distilled. ``FluxPipeline`` feeds ``guidance_scale`` to the
transformer as an embedding and makes one conditional prediction per step, so there is no
(eps_c - eps_u) whose weight SW-CFG could vary per token: ``safe-sw`` is refused. ``true_cfg_scale > 1``
(two transformer calls per step) is refused by the scheduled modes too (see ``StepTracker``).
"""

from __future__ import annotations

import torch
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import (
    FluxAttnProcessor,
    FluxIPAdapterAttnProcessor,
    FluxTransformer2DModel,
    _get_qkv_projections,
)

from safe_dit.adapters.contract import Adapter, SafeProcessor, register
from safe_dit.config import SafeDitError
from safe_dit.engine.hooks import layer_of
from safe_dit.engine.joint import joint_attention
from safe_dit.engine.masks import key_padding_from_bias
from safe_dit.engine.parallel import split_tokens
from safe_dit.engine.schedule import SELECTIVE

NOTES = ("FLUX: FluxPipeline builds no attention mask and the model passes none (T5 padding is ordinary tokens "
         "of the joint sequence): nothing to elide, dense-fp == dense; SAFE-Core's gain here is scheduling only. "
         "A user mask in joint_attention_kwargs would be decided once per forward (kept, or rewritten exactly).")

NO_SW_CFG = (
    "safe-sw is not available for FLUX: SW-CFG weights classifier-free guidance per token, eps_u + gamma_i "
    "(eps_c - eps_u), but FLUX.1-dev/schnell are guidance-distilled: FluxPipeline passes guidance_scale to the "
    "transformer as an embedding and makes a single conditional prediction per step, so there is no "
    "(eps_c - eps_u) to weight. Use mode='safe-core' (prompt-aware scheduling, the pipeline's own guidance)."
)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """FLUX's RoPE on x [B, L, H, d]; cos/sin [L, d] (shared rows, the stock call) or [B, L, d] (gathered rows)."""
    if cos.dim() == 2:
        return apply_rotary_emb(x, (cos, sin), sequence_dim=1)
    cos, sin = cos[:, :, None].to(x.device), sin[:, :, None].to(x.device)  # [B, L, 1, d]
    real, imag = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)  # [B, L, H, d/2]
    rotated = torch.stack([-imag, real], dim=-1).flatten(3)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


class SafeFluxAttnProcessor(SafeProcessor):
    """Drop-in for ``FluxAttnProcessor`` (double- and single-stream blocks): same projections, RMS norms,
    [text; image] order and one RoPE over the joint sequence, attention through diffusers' dispatcher; adds
    SRSU and the PCSP tap. The text length comes from the call itself (the caption stream, or the RoPE table
    minus the image grid), so recomputation under gradient checkpointing needs no per-forward state."""

    stock = FluxAttnProcessor

    def setup(self, model) -> None:
        single = layer_of(self.name, "single_transformer_blocks")
        self.layer = (len(model.transformer_blocks) + single if single >= 0
                      else layer_of(self.name, "transformer_blocks"))

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        q, k, v, n_text, double = self._joint_qkv(attn, hidden_states, encoder_hidden_states, image_rotary_emb)
        batch = q.shape[0]

        def stock_mask():  # as diffusers' native backend: a [B, Lk] mask becomes [B, 1, 1, Lk]
            m = attention_mask
            return m[:, None, None] if m.dim() == 2 and m.shape[0] == batch else m

        def compact(m):  # per-sample key masks ([B, Lk] or [B, 1, 1, Lk]) as [B, Lk]; others are semantic
            key_only = m.dim() == 2 or (m.dim() == 4 and m.shape[1] == m.shape[2] == 1)
            return key_padding_from_bias(m.reshape(batch, -1), batch) if key_only and m.shape[0] == batch else None

        out = joint_attention(self, q, k, v, n_text, text_first=True, mask=attention_mask, stock_mask=stock_mask,
                              compact=compact)  # [B, T + n, H, d]
        return self._joint_out(attn, out, n_text, double, q.dtype)

    def _joint_qkv(self, attn, hidden_states, encoder_hidden_states, image_rotary_emb):
        """Projections, RMS norms, the joint [text; image] order and RoPE, as the stock processor: q/k/v
        [B, T + n, H, d], the text length, and whether this is a double-stream block."""
        q, k, v, eq, ek, ev = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        q, k, v = (t.unflatten(-1, (-1, attn.head_dim)) for t in (q, k, v))  # [B, L, H, d]
        q, k = attn.norm_q(q), attn.norm_k(k)
        double = attn.added_kv_proj_dim is not None
        if double:  # image stream [B, n, D] + text stream [B, T, D] -> the joint [text; image], as stock
            eq, ek, ev = (t.unflatten(-1, (-1, attn.head_dim)) for t in (eq, ek, ev))
            eq, ek = attn.norm_added_q(eq), attn.norm_added_k(ek)
            q, k, v = torch.cat([eq, q], dim=1), torch.cat([ek, k], dim=1), torch.cat([ev, v], dim=1)
        gen = self.runtime.generation
        n_text = self._text_len(encoder_hidden_states if double else None, image_rotary_emb, gen)
        if image_rotary_emb is not None:
            q, k = self._rotate(q, k, image_rotary_emb, n_text, gen)
        return q, k, v, n_text, double

    @staticmethod
    def _joint_out(attn, out, n_text: int, double: bool, dtype):
        """[B, T + n, H, d] attention output -> the block's output projections, as the stock processor."""
        out = out.flatten(2, 3).to(dtype)  # [B, T + n, D]
        if not double:
            return out
        txt, img = out.split_with_sizes([n_text, out.shape[1] - n_text], dim=1)
        return attn.to_out[1](attn.to_out[0](img.contiguous())), attn.to_add_out(txt.contiguous())

    def _text_len(self, captions, rope, gen) -> int:
        if captions is not None:
            return captions.shape[1]
        if gen is None:
            return 0  # dense: the joint sequence needs no split
        if rope is None:
            raise SafeDitError("safe-core on FLUX needs image_rotary_emb in every block "
                               "(call the model as FluxPipeline does)")
        return rope[0].shape[0] - gen.local_tokens  # the RoPE table covers [text; all N (this rank's) image tokens]

    def _rotate(self, q, k, rope, n_text: int, gen):
        """One RoPE over the joint sequence: the stock table [T + N, d], or at selective steps the rows of
        [text; sensitive image rows], [B, T + K, d], gathered once per generation and shared by every block."""
        if gen is None or gen.kind != SELECTIVE:
            return apply_rotary_emb(q, rope, sequence_dim=1), apply_rotary_emb(k, rope, sequence_dim=1)
        def gathered():
            rows = gen.joint_rows(n_text, text_first=True)  # [B, T + K]
            return tuple(t[rows][:, :, None].to(q.device) for t in rope)  # [B, T + K, 1, d]

        cos, sin = gen.remember(("flux-rope", n_text, tuple(rope[0].shape)), gathered)
        return _rotate_rows(q, cos, sin), _rotate_rows(k, cos, sin)


def _rotate_rows(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """FLUX's RoPE on x [B, L, H, d] with per-sample rows cos/sin [B, L, 1, d] (interleaved real/imag pairs)."""
    real, imag = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)  # [B, L, H, d/2]
    rotated = torch.stack([-imag, real], dim=-1).flatten(3)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


def _token_grid(_args, kwargs):
    """(h, w) of the packed image tokens from ``img_ids`` (row-major rows/cols, as FluxPipeline builds them)."""
    ids = kwargs.get("img_ids")
    n = kwargs.get("hidden_states", _args[0] if _args else None).shape[1]
    if ids is None:
        raise SafeDitError("safe-core on FLUX needs img_ids (call the transformer as FluxPipeline does)")
    ids = ids[0] if ids.dim() == 3 else ids  # [N, 3]
    h, w = int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1
    if h * w != n:
        raise SafeDitError(f"img_ids describe a {h}x{w} grid but there are {n} image tokens (reference-image "
                           "tokens, as in FLUX Kontext, are not supported by the scheduled modes)")
    return h, w


@register
class FluxAdapter(Adapter):
    name = "flux"
    model_classes = (FluxTransformer2DModel,)
    notes = NOTES
    processor = SafeFluxAttnProcessor
    replaces = (FluxAttnProcessor,)
    passthrough = (FluxIPAdapterAttnProcessor,)  # dense-fp: the IP-Adapter's double blocks stay stock (no mask)
    tokens_in = "x_embedder"
    tokens_out = "proj_out"
    grid = staticmethod(_token_grid)
    refused_inputs = ("controlnet_block_samples", "controlnet_single_block_samples")
    cfg_pairs = False  # guidance-distilled: a batch of 2 is two prompts, never [cond; uncond]
    context_parallel = True  # image tokens split after x_embedder, text after context_embedder, the RoPE table
    # [text; image] into each part's rows; gathered after proj_out

    def parallel_hooks(self, model, runtime, parallel) -> list:
        def split_rope(_module, _inputs, rope):  # (cos, sin) [T + N, d] -> [T_local + N_local, d]
            n = runtime.state.global_tokens
            parts = [(t[:-n], t[-n:]) for t in rope]
            return tuple(torch.cat([parallel.shard(txt, 0, "caption tokens"), parallel.shard(img, 0, "image tokens")])
                         for txt, img in parts)

        return [model.x_embedder.register_forward_hook(split_tokens(runtime, parallel)),
                model.context_embedder.register_forward_hook(split_tokens(runtime, parallel, "caption tokens", False)),
                model.pos_embed.register_forward_hook(split_rope)]

    def check(self, model, config) -> None:
        if config.mode == "safe-sw":
            raise SafeDitError(NO_SW_CFG)
