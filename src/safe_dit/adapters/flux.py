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
from diffusers.models.transformers.transformer_flux import (FluxAttnProcessor, FluxTransformer2DModel,
                                                            _get_qkv_projections)

from safe_dit.config import SafeConfig, SafeDitError
from safe_dit.engine.masks import key_padding_from_bias
from safe_dit.engine.schedule import SELECTIVE
from safe_dit.adapters.base import (Adapter, Handle, Runtime, forward_scope, layer_of, refuse_inputs, register, schedule_hooks,
                   swap_processors)
from safe_dit.engine.joint import joint_attention

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


class SafeFluxAttnProcessor:
    """Drop-in for ``FluxAttnProcessor`` (double- and single-stream blocks): same projections, RMS norms,
    RoPE and [text; image] order, attention through torch SDPA; adds SRSU and the PCSP tap."""

    def __init__(self, runtime: Runtime, name: str, num_double: int, rewrite_padding: bool):
        self.runtime, self.name, self.rewrite_padding = runtime, name, rewrite_padding
        single = layer_of(name, "single_transformer_blocks")
        self.layer = num_double + single if single >= 0 else layer_of(name, "transformer_blocks")

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        q, k, v, eq, ek, ev = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        q, k, v = (t.unflatten(-1, (-1, attn.head_dim)) for t in (q, k, v))  # [B, L, H, d]
        q, k = attn.norm_q(q), attn.norm_k(k)
        state = self.runtime.state
        double = encoder_hidden_states is not None and attn.added_kv_proj_dim is not None
        if double:  # image stream [B, n, D] + text stream [B, T, D]
            eq, ek, ev = (t.unflatten(-1, (-1, attn.head_dim)) for t in (eq, ek, ev))
            text, image = (attn.norm_added_q(eq), attn.norm_added_k(ek), ev), (q, k, v)
        else:  # single stream [B, T + n, D], text first
            t_len = state.text_len if state is not None else 0
            text, image = tuple(x[:, :t_len] for x in (q, k, v)), tuple(x[:, t_len:] for x in (q, k, v))
        t_len = text[0].shape[1]
        if image_rotary_emb is not None:
            (cos_t, sin_t), (cos_i, sin_i) = self._rope(image_rotary_emb, t_len)
            text = (_rotate(text[0], cos_t, sin_t), _rotate(text[1], cos_t, sin_t), text[2])
            image = (_rotate(image[0], cos_i, sin_i), _rotate(image[1], cos_i, sin_i), image[2])
        batch = q.shape[0]

        def stock_mask():  # as diffusers' native backend: a [B, Lk] mask becomes [B, 1, 1, Lk]
            m = attention_mask
            return m[:, None, None] if m.dim() == 2 and m.shape[0] == batch else m

        def compact(m):  # per-sample key masks ([B, Lk] or [B, 1, 1, Lk]) as [B, Lk]; others are semantic
            key_only = m.dim() == 2 or (m.dim() == 4 and m.shape[1] == m.shape[2] == 1)
            return key_padding_from_bias(m.reshape(batch, -1), batch) if key_only and m.shape[0] == batch else None

        img, txt = joint_attention(self.runtime, self.name, self.layer, image, text if t_len else None, text_first=True,
                                   mask=attention_mask, stock_mask=stock_mask, compact=compact,
                                   rewrite=self.rewrite_padding)  # [B, n, H, d], [B, T, H, d]
        img = img.flatten(2, 3).to(q.dtype)
        if not double:
            return img if txt is None else torch.cat([txt.flatten(2, 3).to(q.dtype), img], dim=1)  # [B, T + n, D]
        img = attn.to_out[1](attn.to_out[0](img.contiguous()))
        return img, attn.to_add_out(txt.flatten(2, 3).to(q.dtype).contiguous())

    def _rope(self, rope, t_len: int):
        """(text cos/sin [T, d], image cos/sin [N, d] or, at selective steps, the sensitive rows' [B, K, d])."""
        cos, sin = rope  # [T + N, d]
        gen, state = self.runtime.generation, self.runtime.state
        if gen is None or gen.kind != SELECTIVE:
            return (cos[:t_len], sin[:t_len]), (cos[t_len:], sin[t_len:])
        if "rope" not in state.memo:  # gathered once per forward, shared by every block
            state.memo["rope"] = (gen.gather(cos[None, t_len:]), gen.gather(sin[None, t_len:]))  # [B, K, d]
        return (cos[:t_len], sin[:t_len]), state.memo["rope"]


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


class FluxAdapter(Adapter):
    name = "flux"
    model_classes = (FluxTransformer2DModel,)
    notes = NOTES

    def attach(self, model: FluxTransformer2DModel, config: SafeConfig, pipe=None) -> Handle:
        if config.mode == "safe-sw":
            raise SafeDitError(NO_SW_CFG)
        handle = self.start(config, pipe)
        runtime = handle.runtime
        if not config.fast_path:
            return handle  # dense: the stock model, untouched

        num_double = len(model.transformer_blocks)
        handle.on_remove(swap_processors(model, lambda name: SafeFluxAttnProcessor(runtime, name, num_double,
                                                                                   config.rewrite_padding),
                                         expected=(FluxAttnProcessor,)))

        def text_len(_model, args, kwargs):  # the single-stream blocks split [text; image] by it
            captions = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)  # [B, T, Dc]
            runtime.state.text_len = 0 if captions is None else captions.shape[1]

        hooks = forward_scope(model, runtime) + [model.register_forward_pre_hook(text_len, with_kwargs=True)]
        if config.scheduled:
            hooks.append(model.register_forward_pre_hook(
                refuse_inputs("controlnet_block_samples", "controlnet_single_block_samples"), with_kwargs=True))
            hooks += schedule_hooks(model, runtime, _token_grid, model.x_embedder, model.proj_out)
        handle.remove_hooks(hooks)
        return handle


register(FluxAdapter())
