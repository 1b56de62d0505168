"""HunyuanVideo 1.5 adapter (diffusers ``HunyuanVideo15Transformer3DModel``, ``HunyuanVideo15Pipeline``).

Masks in the stock model: the forward reorders every sample's caption tokens valid-first ([valid image-embeds,
valid ByT5, valid Qwen2.5-VL, then the padding of each]) and hands each block one [B, T] validity vector.
``HunyuanVideo15AttnProcessor2_0`` pads it with the N video tokens (always valid) to v [B, N + T] and builds, in
every block, the dense pair mask v vᵀ as a [B, 1, S, S] boolean (S = N + T: at 720p x 121 frames about 12 GB per
sample; two such booleans per call, the repeated vector and the product). Its valid rows carry the key-padding mask
v; its padding rows are all False, which SDPA answers with zeros. Here the mask is never built: v is decided once
per forward on the [B, T] vector the model hands every block, and each call runs mask-free on the valid keys only
(a prefix: sliced when all samples share a length, the batch split by length otherwise, ``engine.masks``), with the
padding query rows set to the zeros SDPA gives them. The text-to-video pipeline always pads (its 729 image-embed
slots are invalid), so the rewrite always applies. The token refiner (``context_embedder``) builds its own [B, 1,
L, L] pair mask of the caption vector once per forward; it is checked to be that outer product (once per forward)
and rewritten the same way (``SafeRefinerAttnProcessor``). No other attention runs inside the transformer (the text
and image encoders run outside it, stock). Under torch.compile no mask value is read, so the mask is kept as
shipped (built, exact) there.

safe-core / safe-sw: the joint sequence is [video; text]. Sensitive rows are gathered after ``x_embedder`` and
scattered after ``proj_out``; each block rotates them with their own rows of the 3-D RoPE table (gathered once
per generation) and writes them, with the always-computed text rows, into the anchor's joint K/V in place. PCSP
reads the video-query x caption-key block of each sample's softmax over its valid keys (warm-up only).

CFG: the pipeline's guider (``ClassifierFreeGuidance``) makes a conditional, then an unconditional call per step;
both follow one step plan and the prompt's partition, each with its own caches (the engine's separate CFG calls),
and safe-sw returns the unconditional call's output such that the guider's u + g (c - u) becomes u + gamma_i (c - u).

Context parallelism: the video tokens are split after ``x_embedder`` with their rows of the RoPE table; every rank
holds the whole (valid-first) caption and runs the token refiner locally. Each joint attention attends the caption
keys locally (their padding rewritten exactly as above, padding query rows 0) and the video keys of every rank
through the sequence-parallel call, merged by log-sum-exp; PCSP normalises by that joint log-sum-exp and its top-K
is global. Gathered after ``proj_out``.

Refused: image-to-video conditioning in the scheduled modes (non-zero ``image_embeds``; dense-fp runs it
exactly), other guiders or a CFG on for part of the trajectory in the scheduled modes, a rescaled or original-
formulation CFG under safe-sw, and a mask the processor does not know.
"""

from __future__ import annotations

import math

import torch
from diffusers.models.attention_processor import AttnProcessor2_0
from diffusers.models.transformers.transformer_hunyuan_video15 import (
    HunyuanVideo15AttnProcessor2_0,
    HunyuanVideo15Transformer3DModel,
)

from safe_dit.adapters.contract import Adapter, SafeProcessor, register
from safe_dit.config import SafeDitError
from safe_dit.engine.attend import attend
from safe_dit.engine.generation import gather_rows
from safe_dit.engine.guidance import SeparateCallGuidance, sensitivity_weighted
from safe_dit.engine.hooks import caption_mask_check, layer_of
from safe_dit.engine.joint import collect_replicated_text_probs, replicated_text_attention
from safe_dit.engine.parallel import split_tokens
from safe_dit.engine.partition import joint_image_to_text_probs
from safe_dit.engine.schedule import SELECTIVE

NOTES = ("HunyuanVideo 1.5: every block's processor builds the dense [B, 1, S, S] pair mask v vᵀ of the joint "
         "[video; text] validity vector (text reordered valid-first; ~12 GB per sample at 720p x 121 frames). Never "
         "built here: decided once per forward on the [B, T] caption vector, keys sliced to each sample's valid "
         "prefix (batch split by length), padding query rows zero as in SDPA. The token refiner's [B, 1, L, L] "
         "pair mask is checked once per forward to be the outer product of one vector and rewritten the same way.")

GUIDER = ("safe-core/safe-sw on HunyuanVideo 1.5 follow the pipeline's guider when it is a ClassifierFreeGuidance on "
          "for the whole trajectory (a conditional, then an unconditional call per step); {what}. Use dense-fp with "
          "this guider")

IMAGE_TO_VIDEO = ("safe-core/safe-sw on HunyuanVideo 1.5 support text-to-video only (image_embeds all zero, as "
                  "HunyuanVideo15Pipeline passes them); image-to-video conditioning runs exactly under dense-fp")

UNKNOWN_MASK = ("{where} got an attention mask of shape {shape}: safe-dit knows only the [B, T] caption vector the "
                "HunyuanVideo 1.5 forward hands every block. Run custom masks on the stock model (remove_safe_dit)")


def _rotate_rows(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """diffusers' real RoPE (interleaved pairs) on x [B, L, H, d] with per-sample rows cos/sin [B, L, d]."""
    cos, sin = cos[:, :, None].to(x.device), sin[:, :, None].to(x.device)  # [B, L, 1, d]
    real, imag = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)  # [B, L, H, d/2]
    rotated = torch.stack([-imag, real], dim=-1).flatten(3)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


def _heads(attn, x: torch.Tensor, *projections):
    """x [B, L, D] through each projection, as [B, L, H, d]."""
    return tuple(p(x).unflatten(2, (attn.heads, -1)) for p in projections)


def _zero_rows(out: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """out [B, L, H, d] with the rows where ``valid`` [B, L] is False set to 0: SDPA's answer to an all-False row."""
    return out.masked_fill(~valid[:, :, None, None], 0)


def rotate_video(query: torch.Tensor, key: torch.Tensor, rope, gen):
    """The stock RoPE table (cos, sin) [N, d] on the video rows [B, N, H, d], or at selective steps each sensitive
    row's own row of it, [B, K, d], gathered once per generation and shared by every block."""
    from diffusers.models.embeddings import apply_rotary_emb

    if gen is None or gen.kind != SELECTIVE:
        return tuple(apply_rotary_emb(t, rope, sequence_dim=1) for t in (query, key))
    cos, sin = gen.remember(("hunyuan-rope", tuple(rope[0].shape)),
                            lambda: tuple(gather_rows(t[None], gen.index) for t in rope))  # [B, K, d]
    return _rotate_rows(query, cos, sin), _rotate_rows(key, cos, sin)


def collect_prefix(runtime, gen, query: torch.Tensor, key: torch.Tensor, n_text: int,
                   text_valid: torch.Tensor | None) -> None:
    """PCSP on a joint [video; text] call whose valid keys are a prefix per sample (every video key, then
    ``text_valid`` [B, T]'s valid-first caption keys): the video-query x caption-key block of each sample's softmax
    over its valid keys, samples of one caption length in one call (warm-up only)."""
    n_video = query.shape[1] - n_text
    q = query[:, :n_video].transpose(1, 2)  # [B, H, N, d]
    k = key.transpose(1, 2)  # [B, H, N + T, d]
    if text_valid is None:
        probs = joint_image_to_text_probs(q, k, slice(n_video, n_video + n_text))
    else:
        counts = text_valid.bool().sum(1).tolist()  # valid caption tokens per sample
        probs = q.new_zeros(q.shape[0], n_video, n_text, dtype=torch.float32)
        for count in sorted(set(counts)):
            rows = torch.tensor([i for i, c in enumerate(counts) if c == count], device=q.device)
            keys = k.index_select(0, rows)[:, :, :n_video + count]
            probs[rows, :, :count] = joint_image_to_text_probs(q.index_select(0, rows), keys,
                                                               slice(n_video, n_video + count))
    gen.collect(probs, runtime.text_weights(text_valid, n_text, probs.device))


class SafeHunyuanVideo15AttnProcessor(SafeProcessor):
    """Drop-in for ``HunyuanVideo15AttnProcessor2_0``: same projections, RMS norms, RoPE on the video rows and
    [video; text] order; the pair mask decided once per forward and never built; SRSU; the PCSP tap."""

    stock = HunyuanVideo15AttnProcessor2_0

    def setup(self, model) -> None:
        self.layer = layer_of(self.name, "transformer_blocks")

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        query, key, value = _heads(attn, hidden_states, attn.to_q, attn.to_k, attn.to_v)  # [B, n, H, d]
        query, key = attn.norm_q(query), attn.norm_k(key)  # [B, n, H, d]
        gen = self.runtime.generation
        if image_rotary_emb is not None:
            query, key = rotate_video(query, key, image_rotary_emb, gen)
        n_text = 0
        if encoder_hidden_states is not None:
            eq, ek, ev = _heads(attn, encoder_hidden_states, attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)
            if attn.norm_added_q is not None:
                eq = attn.norm_added_q(eq)
            if attn.norm_added_k is not None:
                ek = attn.norm_added_k(ek)
            query, key, value = (torch.cat([a, b], dim=1) for a, b in ((query, eq), (key, ek), (value, ev)))
            n_text = encoder_hidden_states.shape[1]
        text_mask = attention_mask  # [B, T] bool, valid-first: the same object in every block of one forward
        if text_mask is not None and (text_mask.dim() != 2 or text_mask.shape[0] != query.shape[0]
                                      or text_mask.shape[1] > query.shape[1]):
            raise SafeDitError(UNKNOWN_MASK.format(where=self.name, shape=tuple(text_mask.shape)))

        if gen is not None:
            if gen.kind == SELECTIVE:  # SRSU: fresh rows [sensitive video; text] over the anchor's joint K/V
                key, value = gen.merged_kv(self.name, key, value, gen.joint_rows(n_text, False),
                                           gen.joint_valid(n_text, False))  # [B, N + T, H, d]
            elif gen.refreshes_cache:
                gen.store_kv(self.name, key, value)
            if n_text and gen.wants_probs(self.layer) and self.runtime.parallel is None:
                collect_prefix(self.runtime, gen, query, key, n_text, text_mask)

        if self.runtime.parallel is not None:  # the caption on every rank, the video tokens sharded
            out = sharded_joint_attention(self, gen, query, key, value, n_text, text_mask, text_mask, None)
        elif text_mask is None:  # the stock processor cannot run without it; nothing to rewrite
            out = attend(self.runtime, self.name, query, key, value, None, None, rewrite=self.rewrite_padding,
                         stock_mask=lambda: None, processor=self)
        else:
            def padded(m, length):  # [B, length]: the leading video rows (always valid), then the caption vector
                return torch.cat([m.new_ones(m.shape[0], length - m.shape[1], dtype=torch.bool), m.bool()], dim=1)

            lq, lk = query.shape[1], key.shape[1]

            def stock_mask():  # [B, 1, Lq, Lk]: v vᵀ, as the stock processor builds it (kept masks only)
                return padded(text_mask, lq)[:, None, :, None] & padded(text_mask, lk)[:, None, None, :]

            out = attend(self.runtime, self.name, query, key, value, text_mask, None, rewrite=self.rewrite_padding,
                         stock_mask=stock_mask, compact=lambda m: padded(m, lk), processor=self)  # [B, Lq, H, d]
            out = _zero_rows(out, padded(text_mask, lq))
        out = out.flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is None:
            return out, None
        video, text = out[:, :-n_text], out[:, -n_text:]
        if getattr(attn, "to_out", None) is not None:
            video = attn.to_out[1](attn.to_out[0](video))
        if getattr(attn, "to_add_out", None) is not None:
            text = attn.to_add_out(text)
        return video, text


def sharded_joint_attention(proc, gen, query, key, value, n_text: int, mask, text_valid, compact,
                            zero_padding_rows: bool = True) -> torch.Tensor:
    """A joint [video; text] attention call under context parallelism: this rank's video rows (or its sensitive
    rows) and every caption row, q [B, n + T, H, d], k/v [B, n' + T, H, d] -> [B, n + T, H, d]. The caption keys are
    attended locally with their padding rewritten exactly (``mask``, decided once per forward; ``compact`` gives its
    [B, T] valid-key form, default ``mask.bool()``), the video keys of every rank through the sequence-parallel call,
    the two merged by log-sum-exp (``engine.joint.replicated_text_attention``). ``zero_padding_rows``: padding
    caption query rows are 0, as SDPA answers the all-False rows of HunyuanVideo 1.5's pair mask. PCSP (warm-up)
    normalises by the joint log-sum-exp of every rank's keys. ``text_valid`` [B, T] or None: the valid captions."""
    n_video = key.shape[1] - n_text
    out, lse = replicated_text_attention(proc, query, key, value, text=slice(n_video, None),
                                         image=slice(0, n_video), text_mask=mask, compact=compact)
    valid = None if text_valid is None else text_valid.bool()  # [B, T]
    if gen is not None and n_text and gen.wants_probs(proc.layer):
        rows = query.shape[1] - n_text
        collect_replicated_text_probs(proc.runtime, gen, query[:, :rows], key[:, n_video:], lse[:, :rows], valid)
    if zero_padding_rows and valid is not None:
        rows = torch.cat([valid.new_ones(valid.shape[0], query.shape[1] - n_text), valid], dim=1)  # [B, n + T]
        out = _zero_rows(out, rows)
    return out


class SafeRefinerAttnProcessor(SafeProcessor):
    """Drop-in for ``AttnProcessor2_0`` on the token refiner's caption self-attention (``context_embedder``). The
    refiner's [B, 1, L, L] pair mask is v vᵀ (HunyuanVideo 1.5) or v vᵀ with its first column set (HunyuanVideo):
    every query row sees either the keys of v (run as key padding on v, mask-free) or the first key alone (its value,
    exactly: a softmax over one key is 1) or none (0, as SDPA answers an all-False row). That form is checked once
    per forward (``_refiner_keys``); a mask of any other form is kept as shipped."""

    stock = AttnProcessor2_0

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args,
                 **kwargs):
        if encoder_hidden_states is not None or hidden_states.dim() != 3 or attn.spatial_norm is not None \
                or attn.group_norm is not None:
            raise SafeDitError(f"{self.name}: safe-dit stands in for AttnProcessor2_0 only in the token refiner's "
                               "caption self-attention ([B, L, D] in, no cross-attention or spatial/group norm)")
        batch, length, _ = hidden_states.shape
        query, key, value = _heads(attn, hidden_states, attn.to_q, attn.to_k, attn.to_v)  # [B, L, H, d]
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        mask = attention_mask
        if mask is None:
            out = attend(self.runtime, self.name, query, key, value, None, None, rewrite=self.rewrite_padding,
                         stock_mask=lambda: None, processor=self, sequence=False)
        else:
            def stock_mask():  # as AttnProcessor2_0: repeated per head, [B, H, L, L]
                m = attn.prepare_attention_mask(mask, length, batch)
                return m.view(batch, attn.heads, -1, m.shape[-1])

            out = attend(self.runtime, self.name, query, key, value, mask, None, rewrite=self.rewrite_padding,
                         stock_mask=stock_mask, compact=_refiner_keys, processor=self, sequence=False)
            if mask.dtype == torch.bool and mask.dim() == 4 and mask.shape[1:3] == (1, length):
                rows = mask[:, 0]  # [B, L, L]; elementwise, no host sync
                first = (rows[:, :, 0] & ~rows[:, :, 1:].any(-1))[:, :, None, None]  # the first key alone: its value
                empty = ~rows.any(-1)[:, :, None, None]  # no key: 0
                out = torch.where(first, value[:, :1].to(out.dtype), torch.where(empty, 0, out))
        out = attn.to_out[1](attn.to_out[0](out.flatten(2, 3).to(query.dtype)))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


def _refiner_keys(mask: torch.Tensor) -> torch.Tensor | None:
    """The keys v [B, L] of a token refiner's boolean pair mask ([B, 1, L, L]) whose every row sees either all of v,
    the first key alone, or nothing; None for a mask of another form (kept as shipped). Reads values: once per
    forward, with the mask's decision."""
    if mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[2] != mask.shape[3]:
        return None
    rows = mask[:, 0]  # [B, L, L]
    keys = rows.any(1)  # [B, L]: the union of the rows
    full = (rows == keys[:, None]).all(-1)
    first = rows[:, :, 0] & ~rows[:, :, 1:].any(-1)
    return keys if bool((full | first | ~rows.any(-1)).all()) else None


POSITIONAL = ("hidden_states", "timestep", "encoder_hidden_states", "encoder_attention_mask")


def video_split_hooks(model, runtime, parallel) -> list:
    """Context parallelism's split points: the patch embedder's video tokens [B, N, D] and the rows of the 3-D RoPE
    table (cos, sin) [N, d] that go with them, both as this rank's shard (the token refiner's captions stay whole)."""

    def split_rope(_module, _inputs, rope):  # (cos, sin) [N, d] -> [N_local, d]
        return tuple(parallel.shard(t, 0, "video tokens") for t in rope)

    return [model.x_embedder.register_forward_hook(split_tokens(runtime, parallel, "video tokens")),
            model.rope.register_forward_hook(split_rope)]


def _make_processor(runtime, name, model, config):
    kind = SafeRefinerAttnProcessor if name.startswith("context_embedder.") else SafeHunyuanVideo15AttnProcessor
    return kind(runtime, name, model, config)


@register
class HunyuanVideo15Adapter(Adapter):
    name = "hunyuan-video-1.5"
    model_classes = (HunyuanVideo15Transformer3DModel,)
    notes = NOTES
    processor = staticmethod(_make_processor)
    replaces = (HunyuanVideo15AttnProcessor2_0, AttnProcessor2_0)
    tokens_in = "x_embedder"
    tokens_out = "proj_out"
    context_parallel = True  # video tokens split after x_embedder with their rows of the RoPE table; the caption
    # (valid-first) on every rank, its padding rewritten exactly on the caption keys; gathered after proj_out

    def token_grid(self, model):
        """(frames, h, w) of a [B, C, F, H, W] latent: the temporal and spatial patch sizes."""
        cfg = model.config
        return cfg.patch_size_t, cfg.patch_size, cfg.patch_size

    def parallel_hooks(self, model, runtime, parallel) -> list:
        return video_split_hooks(model, runtime, parallel)

    def guidance(self, model, runtime, handle):
        separate = SeparateCallGuidance(lambda: getattr(getattr(runtime.pipe, "guider", None), "guidance_scale", None))

        def guide(rt, gen, output):  # a [cond; uncond] batch (safe_dit.generation(..., cfg_batch=True)) or two calls
            return sensitivity_weighted(rt, gen, output) if gen.cfg_batch else separate(rt, gen, output)

        return guide

    def hooks(self, model, runtime, handle) -> list:
        hooks = [model.register_forward_pre_hook(caption_mask_check(name, text, POSITIONAL), with_kwargs=True)
                 for name, text in (("encoder_attention_mask", "encoder_hidden_states"),
                                    ("encoder_attention_mask_2", "encoder_hidden_states_2"))]
        if not runtime.config.scheduled:
            return hooks
        runtime.cfg_calls = True  # the guider: a conditional, then an unconditional call per step

        def check(_model, args, kwargs):  # before the step tracker: image-to-video, and this pipeline call's CFG
            image = kwargs.get("image_embeds")
            if image is not None and bool((image != 0).any()):
                raise SafeDitError(IMAGE_TO_VIDEO)
            scheduler = getattr(runtime.pipe, "scheduler", None)
            if not runtime.explicit_generation and scheduler is not None and scheduler.step_index is None:
                runtime.pipeline_cfg = _guider_cfg(getattr(runtime.pipe, "guider", None), runtime.config.mode)

        return hooks + [model.register_forward_pre_hook(check, with_kwargs=True)]


def _guider_cfg(guider, mode: str) -> bool:
    """Whether the pipeline's guider makes a conditional and an unconditional call at every step of this call."""
    from diffusers import ClassifierFreeGuidance

    if guider is None:
        return False
    if type(guider) is not ClassifierFreeGuidance:
        raise SafeDitError(GUIDER.format(what=f"this pipeline's guider is {type(guider).__name__}"))
    neutral = 0.0 if guider.use_original_formulation else 1.0  # the scale at which the guider makes one call
    partial = guider._start > 0 or guider._stop < 1
    if guider._enabled and not math.isclose(guider.guidance_scale, neutral) and partial:
        raise SafeDitError(GUIDER.format(what=f"this guider guides from {guider._start} to {guider._stop} of it"))
    if guider.num_conditions == 1:
        return False
    if mode == "safe-sw" and (guider.guidance_rescale > 0 or guider.use_original_formulation):
        raise SafeDitError(GUIDER.format(what="safe-sw weights u + g (c - u); this guider rescales it or uses the "
                                              "original formulation c + g (c - u)"))
    return True
