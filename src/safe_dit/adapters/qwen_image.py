"""Qwen-Image adapter (diffusers ``QwenImageTransformer2DModel``, ``QwenImagePipeline``).

Masks in the stock model: every double-stream block's ``QwenDoubleStreamAttnProcessor2_0`` builds the joint
[text; image] key mask ``cat([encoder_hidden_states_mask, ones(B, N)])`` as [B, 1, 1, T + N] and hands it to
the dispatcher. ``QwenImagePipeline`` drops an all-ones caption mask and pads a batch's captions to its
longest, so the mask reaches attention exactly when a batch's captions differ in length (or a user passes
one). The image part is all-valid by construction (the processor builds it: never materialised here); the
caption part is key padding of any pattern: decided once per forward on the caption mask object the model
hands every block, dropped when all valid, else rewritten exactly (keys sliced or gathered, the batch split
by pattern).

safe-core: sensitive rows are gathered after ``img_in`` and scattered after ``proj_out``; each block rotates
them with their own rows of the image RoPE table (gathered once per generation) and writes them, with the
always-computed text rows, into the anchor's joint K/V in place. PCSP reads the image-query x caption-key
block of the joint softmax (normalised over each sample's valid keys, padding ignored), warm-up only.

Context parallelism: the image tokens are split after ``img_in`` with their rows of the image RoPE table; every
rank holds the whole caption. Each joint attention attends the caption keys locally (padding rewritten exactly as
above) and the image keys of every rank through the sequence-parallel call, merging the two by log-sum-exp; PCSP
normalises by that joint log-sum-exp. Editing / layered configurations are refused under it.

Refused: ``safe-sw`` (``QwenImagePipeline`` makes separate conditional and unconditional calls for
``true_cfg_scale``; no batched pair to weight), two transformer calls per step in the scheduled modes, and
in the scheduled modes edit-style inputs (several images per sample in ``img_shapes``, ``zero_cond_t``,
the layered 3-D RoPE) and ControlNet residuals.
"""

from __future__ import annotations

import torch
from diffusers.models.transformers.transformer_qwenimage import (
    QwenDoubleStreamAttnProcessor2_0,
    QwenImageTransformer2DModel,
    apply_rotary_emb_qwen,
)

from safe_dit.adapters.contract import Adapter, SafeProcessor, register
from safe_dit.config import SafeDitError
from safe_dit.engine.attend import attend
from safe_dit.engine.generation import gather_rows
from safe_dit.engine.hooks import layer_of
from safe_dit.engine.joint import collect_replicated_text_probs, replicated_text_attention
from safe_dit.engine.parallel import split_tokens
from safe_dit.engine.partition import joint_image_to_text_probs
from safe_dit.engine.schedule import SELECTIVE

NOTES = ("Qwen-Image: each block builds cat([caption mask, ones]) over the joint [text; image] keys; "
         "QwenImagePipeline passes a caption mask only when a batch's captions differ in length. The image part "
         "is all-valid by construction (never built here); the caption part is key padding, rewritten exactly "
         "(keys sliced/gathered, batch split by pattern), decided once per forward.")

NO_SW_CFG = ("safe-sw is not available for Qwen-Image: QwenImagePipeline computes true CFG with separate "
             "conditional and unconditional transformer calls (true_cfg_scale), so there is no batched "
             "(eps_c - eps_u) whose weight SW-CFG could vary per token. Use mode='safe-core' or 'dense-fp'.")

TWO_CALLS = ("safe-core on Qwen-Image needs one transformer call per sampling step, but this pipeline called it "
             "with another caption length inside one generation: QwenImagePipeline calls it twice per step "
             "(conditional, then unconditional) when true_cfg_scale > 1 and a negative prompt is given. Use dense-fp "
             "for true CFG, or call the transformer with a [cond; uncond] batch inside "
             "safe_dit.generation(transformer, num_steps=..., cfg_batch=True)")

EDIT_INPUTS = ("safe-core on Qwen-Image supports text-to-image only: {what}. "
               "Use dense-fp for editing / layered models")


class SafeQwenAttnProcessor(SafeProcessor):
    """Drop-in for ``QwenDoubleStreamAttnProcessor2_0``: same projections, RMS norms, RoPE and [text; image]
    order, attention through diffusers' dispatcher; the joint mask decided once per forward; SRSU; PCSP tap."""

    stock = QwenDoubleStreamAttnProcessor2_0

    def setup(self, model) -> None:
        self.layer = layer_of(self.name, "transformer_blocks")

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, encoder_hidden_states_mask=None,
                 attention_mask=None, image_rotary_emb=None):
        if encoder_hidden_states is None:
            raise ValueError("QwenDoubleStreamAttnProcessor2_0 requires encoder_hidden_states (text stream)")
        if attention_mask is not None:  # as the stock processor
            raise ValueError("QwenDoubleStreamAttnProcessor2_0 does not accept an external attention_mask. "
                             "Pass encoder_hidden_states_mask to let the processor build the joint mask.")
        head_dim = attn.inner_dim // attn.heads

        def qkv(x, q, k, v):
            return (p(x).unflatten(-1, (-1, head_dim)) for p in (q, k, v))  # [B, L, H, d]

        img_q, img_k, img_v = qkv(hidden_states, attn.to_q, attn.to_k, attn.to_v)
        txt_q, txt_k, txt_v = qkv(encoder_hidden_states, attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)
        if attn.norm_q is not None:
            img_q = attn.norm_q(img_q)
        if attn.norm_k is not None:
            img_k = attn.norm_k(img_k)
        if attn.norm_added_q is not None:
            txt_q = attn.norm_added_q(txt_q)
        if attn.norm_added_k is not None:
            txt_k = attn.norm_added_k(txt_k)
        gen = self.runtime.generation
        if image_rotary_emb is not None:
            img_freqs, txt_freqs = image_rotary_emb  # [N, d/2], [T, d/2] complex
            img_q, img_k = (self._rotate_image(x, img_freqs, gen) for x in (img_q, img_k))
            txt_q, txt_k = (apply_rotary_emb_qwen(x, txt_freqs, use_real=False) for x in (txt_q, txt_k))
        n_text = txt_q.shape[1]
        query = torch.cat([txt_q, img_q], dim=1)  # [B, T + n, H, d]
        key = torch.cat([txt_k, img_k], dim=1)
        value = torch.cat([txt_v, img_v], dim=1)

        if gen is not None:
            if gen.kind == SELECTIVE:  # SRSU: fresh text + sensitive rows over the anchor's joint K/V, in place
                cached = gen.kv[self.name][0].shape[1]
                if cached != n_text + gen.local_tokens:
                    self.runtime.generation = None
                    raise SafeDitError(TWO_CALLS)
                key, value = gen.merged_kv(self.name, key, value, gen.joint_rows(n_text, True))  # [B, T + N, H, d]
            elif gen.refreshes_cache:
                gen.store_kv(self.name, key, value)
            if gen.wants_probs(self.layer) and self.runtime.parallel is None:
                self._collect(gen, query, key, n_text, encoder_hidden_states_mask)

        text_mask = encoder_hidden_states_mask  # [B, T] bool (the model normalises it), the same object in every block
        n_image = key.shape[1] - n_text
        if self.runtime.parallel is not None:  # the caption on every rank, the image tokens sharded
            out, lse = replicated_text_attention(self, query, key, value, text=slice(0, n_text),
                                                 image=slice(n_text, None), text_mask=text_mask)
            if gen is not None and gen.wants_probs(self.layer):
                valid = None if text_mask is None else text_mask.bool()
                collect_replicated_text_probs(self.runtime, gen, query[:, n_text:], key[:, :n_text], lse[:, n_text:],
                                              valid)
            return self._out(attn, out, n_text, query.dtype)

        def joint_valid(m):  # [B, T + N]: the caption mask, then the all-valid image keys (provenance: the stock code)
            return torch.cat([m.bool(), m.new_ones(m.shape[0], n_image, dtype=torch.bool)], dim=1)

        def stock_mask():  # [B, 1, 1, T + N], as the stock processor passes it
            return joint_valid(text_mask)[:, None, None, :]

        out = attend(self.runtime, self.name, query, key, value, text_mask, None, rewrite=self.rewrite_padding,
                     stock_mask=stock_mask, compact=lambda m: joint_valid(m) if m.dim() == 2 else None,
                     processor=self)  # [B, T + n, H, d]
        return self._out(attn, out, n_text, query.dtype)

    @staticmethod
    def _out(attn, out, n_text, dtype):
        """[B, T + n, H, d] joint attention output -> (image, text) through the output projections, as stock."""
        out = out.flatten(2, 3).to(dtype)
        txt, img = out[:, :n_text], out[:, n_text:]
        img = attn.to_out[0](img.contiguous())
        if len(attn.to_out) > 1:
            img = attn.to_out[1](img)
        return img, attn.to_add_out(txt.contiguous())

    @staticmethod
    def _rotate_image(x, freqs, gen):
        """Qwen's complex RoPE on image rows x [B, n, H, d]: the stock table [N, d/2], or at selective steps each
        sensitive row's own row of it, [B, K, d/2], gathered once per generation."""
        if gen is None or gen.kind != SELECTIVE:
            return apply_rotary_emb_qwen(x, freqs, use_real=False)
        rows = gen.remember(("qwen-rope", tuple(freqs.shape)), lambda: gather_rows(freqs[None], gen.index))
        rotated = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2)) * rows[:, :, None]  # [B, K, H, d/2]
        return torch.view_as_real(rotated).flatten(3).type_as(x)

    def _collect(self, gen, query, key, n_text, text_mask) -> None:
        """PCSP: the image-query x caption-key block of each sample's joint softmax over its valid keys."""
        q_img = query[:, n_text:].transpose(1, 2)  # [B, H, N, d]
        k = key.transpose(1, 2)  # [B, H, T + N, d]
        if text_mask is None or bool(text_mask.all()):
            probs = joint_image_to_text_probs(q_img, k, slice(0, n_text))  # [B, N, T]
            gen.collect(probs, self.runtime.text_weights(None, n_text, probs.device))
            return
        probs = q_img.new_zeros(q_img.shape[0], q_img.shape[2], n_text, dtype=torch.float32)
        for i in range(q_img.shape[0]):
            text_at = text_mask[i].nonzero().flatten()  # valid caption positions
            keys = torch.cat([text_at, torch.arange(n_text, k.shape[2], device=k.device)])
            p = joint_image_to_text_probs(q_img[i:i + 1], k[i:i + 1, :, keys], slice(0, len(text_at)))[0]
            probs[i, :, text_at] = p
        gen.collect(probs, self.runtime.text_weights(text_mask, n_text, probs.device))


def _token_grid(args, kwargs):
    """(h, w) of the packed image tokens from ``img_shapes`` ([[(frames, h, w)]] per sample, as the pipeline)."""
    shapes = kwargs.get("img_shapes")
    if not shapes:
        raise SafeDitError("safe-core on Qwen-Image needs img_shapes (call the transformer as QwenImagePipeline does)")
    first = shapes[0]
    per_sample = first if isinstance(first, list) else [first]
    if len(per_sample) != 1 or any((s if isinstance(s, list) else [s]) != per_sample for s in shapes):
        raise SafeDitError(EDIT_INPUTS.format(what="img_shapes holds reference images or differs between samples"))
    frames, h, w = per_sample[0]
    n = kwargs.get("hidden_states", args[0] if args else None).shape[1]
    if frames != 1 or h * w != n:
        raise SafeDitError(EDIT_INPUTS.format(what=f"img_shapes {per_sample[0]} do not describe the {n} image tokens"))
    return h, w


@register
class QwenImageAdapter(Adapter):
    name = "qwen-image"
    model_classes = (QwenImageTransformer2DModel,)
    notes = NOTES
    processor = SafeQwenAttnProcessor
    replaces = (QwenDoubleStreamAttnProcessor2_0,)
    tokens_in = "img_in"
    tokens_out = "proj_out"
    grid = staticmethod(_token_grid)
    refused_inputs = ("controlnet_block_samples", "additional_t_cond")
    cfg_pairs = False  # QwenImagePipeline never batches [cond; uncond] (true CFG is two calls)
    context_parallel = True  # image tokens split after img_in and the image RoPE table with them; the caption on
    # every rank (its padding rewritten exactly on the caption keys); gathered after proj_out

    def parallel_hooks(self, model, runtime, parallel) -> list:
        def split_rope(_module, _inputs, rope):  # (image [N, d/2], caption [T, d/2]) -> (image [N_local, d/2], same)
            img, txt = rope
            return parallel.shard(img, 0, "image tokens"), txt

        return [model.img_in.register_forward_hook(split_tokens(runtime, parallel)),
                model.pos_embed.register_forward_hook(split_rope)]

    def check(self, model, config) -> None:
        if config.mode == "safe-sw":
            raise SafeDitError(NO_SW_CFG)
        if config.context_parallel is not None and (model.config.zero_cond_t or model.config.use_layer3d_rope):
            raise SafeDitError("context_parallel on Qwen-Image supports text-to-image only (zero_cond_t / "
                               "use_layer3d_rope mix reference-image tokens into the sequence): run editing / layered "
                               "models on one device")
        if config.scheduled and (model.config.zero_cond_t or model.config.use_layer3d_rope
                                 or model.config.use_additional_t_cond):
            raise SafeDitError(EDIT_INPUTS.format(what="this model is configured for editing or layered images "
                                                       "(zero_cond_t / use_layer3d_rope / use_additional_t_cond)"))

    def hooks(self, model, runtime, handle) -> list:
        if not runtime.config.scheduled:
            return []

        def guard(_model, _args, _kwargs):  # a second call in the same scheduler step
            gen, scheduler = runtime.generation, getattr(runtime.pipe, "scheduler", None)
            if gen is not None and not runtime.explicit_generation and scheduler is not None \
                    and scheduler.step_index is not None and scheduler.step_index == gen.step:
                runtime.generation = None
                raise SafeDitError(TWO_CALLS)

        return [model.register_forward_pre_hook(guard, with_kwargs=True)]
