"""Lumina-Image-2.0 adapter (diffusers ``Lumina2Transformer2DModel``, ``Lumina2Pipeline``).

Masks in the stock model. Three attention stacks share one processor class:

* ``context_refiner`` (caption self-attention): the caption padding mask [B, T] as the pipeline gives it
  (Gemma padded to ``max_sequence_length``), viewed as [B, 1, 1, T];
* ``noise_refiner`` (image self-attention): no mask;
* ``layers`` (joint attention over each sample's [caption_i; image; padding]): the model builds a
  [B, L] mask with ``attention_mask[i, :cap_i + N] = True`` and passes it only when the samples' caption
  lengths differ (a CFG or prompt batch); for one length it passes none.

Both masks are key padding, decided once per forward on their compact [B, L] form: all valid -> dropped;
one valid length -> keys sliced; several -> the batch split by length, every piece a mask-free call.
Exact: every query row of a sample sees the same valid keys as in the stock call (padded query rows too;
the model discards their outputs).

safe-core: the rope embedder's output is where the sensitive rows enter (its patches, their RoPE rows, and
per sample the joint RoPE rows [caption_i; sensitive rows]; the model then lays out [caption_i; K
sensitive rows] and, where lengths differ, masks it itself); the noise refiner and every joint block run
only those rows against the anchor's K/V, written in place; ``norm_out``'s image rows are scattered over
the anchor's output. The stock forward's caption and sequence lengths (lists the rope embedder returns)
are then pointed at the image rows so that the stock unpatchify reads the full [B, N] output. That needs
the stock forward: scheduled modes refuse a model whose forward or rope embedder is not the stock one.
PCSP reads each sample's image-query x caption-key block of the joint softmax (normalised over all of
the sample's keys, as the model attends), warm-up only.

Context parallelism: the rope embedder's patches are split over the ranks with their RoPE rows; each rank's joint
sequence is [caption_i; its image shard; padding] (the joint RoPE rows and sequence lengths follow), the caption
refiner runs locally in full, and in the joint blocks every rank holds the whole caption: its keys are attended
locally (their padding rewritten exactly, as above) and the image keys of all ranks through the sequence-parallel
call, the two parts merged by log-sum-exp. ``norm_out``'s image rows are gathered. Proportional attention
(``base_sequence_length``) uses the global length. Needs the stock forward and rope embedder.

Refused: ``safe-sw`` (``Lumina2Pipeline`` makes separate conditional and unconditional calls and
renormalises the guided prediction; there is no batched pair to weight), and in the scheduled modes
two transformer calls per step, which is what ``Lumina2Pipeline`` does with ``guidance_scale > 1``.
"""

from __future__ import annotations

import math

import torch
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_lumina2 import (
    Lumina2AttnProcessor2_0,
    Lumina2RotaryPosEmbed,
    Lumina2Transformer2DModel,
)

from safe_dit.adapters.contract import Adapter, SafeProcessor, register
from safe_dit.config import SafeDitError
from safe_dit.engine.attend import attend
from safe_dit.engine.generation import gather_rows
from safe_dit.engine.hooks import caption_mask_check, layer_of
from safe_dit.engine.joint import collect_replicated_text_probs, replicated_text_attention
from safe_dit.engine.partition import joint_image_to_text_probs
from safe_dit.engine.schedule import SELECTIVE

NOTES = ("Lumina-Image-2.0: the caption refiner gets the caption padding mask; the joint blocks get a [B, L] "
         "prefix mask over each sample's [caption; image] whenever the batch's caption lengths differ (a CFG or "
         "prompt batch), none otherwise. Both are key padding: dropped when all valid, else rewritten exactly "
         "(keys sliced, the batch split by length), decided once per forward.")

NO_SW_CFG = ("safe-sw is not available for Lumina-Image-2.0: Lumina2Pipeline calls the transformer separately for "
             "the conditional and the unconditional prediction and renormalises the guided result "
             "(cfg_normalization), so there is no batched (eps_c - eps_u) whose weight SW-CFG could vary per token. "
             "Use mode='safe-core' or 'dense-fp'.")

TWO_CALLS = ("safe-core on Lumina-Image-2.0 needs one transformer call per sampling step, but Lumina2Pipeline calls "
             "it twice per step (conditional, then unconditional) when guidance_scale > 1: each call would overwrite "
             "the other's caches. Use dense-fp with guidance, guidance_scale <= 1 with safe-core, or call the "
             "transformer yourself with a [cond; uncond] batch inside safe_dit.generation(transformer, "
             "num_steps=..., cfg_batch=True)")

CAPTIONS_CHANGED = ("the caption lengths changed inside one safe-core generation (the cached rows are laid out for "
                    "the first ones): use the same captions at every step")

BATCH_CHANGED = ("the batch changed inside one safe-core generation (Lumina2Pipeline with cfg_trunc_ratio < 1 drops "
                 "the unconditional half for the last steps): the cached rows no longer match. Use cfg_trunc_ratio=1 "
                 "or dense-fp")

NOT_STOCK = ("safe-core/safe-sw on {cls} need the stock Lumina2Transformer2DModel.forward and rope embedder (the "
             "sensitive rows are laid out through them); this model overrides one of them. Use dense-fp")


class SafeLumina2AttnProcessor(SafeProcessor):
    """Drop-in for ``Lumina2AttnProcessor2_0``: same projections, QK-norm, RoPE and scale; GQA through the
    dispatcher; masks decided by ``engine.attend``; SRSU and the PCSP tap in the noise refiner and joint blocks."""

    stock = Lumina2AttnProcessor2_0

    def setup(self, model) -> None:
        self.stack = self.name.split(".")[0]  # context_refiner / noise_refiner / layers
        self.layer = layer_of(self.name, "layers")  # joint blocks only: what pcsp_blocks count

    def __call__(self, attn, hidden_states, encoder_hidden_states, attention_mask=None, image_rotary_emb=None,
                 base_sequence_length=None):
        batch, seq_len, _ = hidden_states.shape  # [B, L, D]
        query, key, value = (attn.to_q(hidden_states), attn.to_k(encoder_hidden_states),
                             attn.to_v(encoder_hidden_states))
        head_dim = query.shape[-1] // attn.heads
        dtype = query.dtype
        query = query.view(batch, -1, attn.heads, head_dim)  # [B, L, H, d]
        key = key.view(batch, -1, key.shape[-1] // head_dim, head_dim)  # [B, L, Hkv, d]
        value = value.view(batch, -1, value.shape[-1] // head_dim, head_dim)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, use_real=False)
            key = apply_rotary_emb(key, image_rotary_emb, use_real=False)
        query, key = query.to(dtype), key.to(dtype)

        gen = self.runtime.generation
        mask = attention_mask
        parallel = self.runtime.parallel is not None and self.stack != "context_refiner"
        if gen is not None and self.stack == "noise_refiner":
            if gen.kind == SELECTIVE:  # SRSU: sensitive image rows against fresh + cached context K/V
                key, value = gen.merged_kv(self.name, key, value)  # [B, N, Hkv, d]
            elif gen.refreshes_cache:
                gen.store_kv(self.name, key, value)
        elif gen is not None and self.stack == "layers":
            caps = _caption_lengths(gen)
            if gen.kind == SELECTIVE:  # [caption_i; sensitive rows; pad] written into the anchor's joint K/V
                key, value = gen.merged_kv(self.name, key, value, _selective_rows(gen, caps))  # [B, Lfull, Hkv, d]
                seq_len = key.shape[1]
                mask = None if attention_mask is None else _full_mask(gen, caps, key.device)
            elif gen.refreshes_cache:
                gen.store_kv(self.name, key, value)
            if gen.wants_probs(self.layer) and not parallel:
                self._collect(gen, query, key, caps)

        scale = attn.scale
        if parallel and base_sequence_length is not None:  # proportional attention follows the whole sequence
            seq_len = key.shape[1] + self.runtime.state.global_tokens - self.runtime.state.layout["lumina2"][2]
        if base_sequence_length is not None:  # proportional attention, as the stock processor (full length)
            scale = math.sqrt(math.log(seq_len, base_sequence_length)) * attn.scale

        if parallel and self.stack == "layers":  # the caption on every rank, the image tokens sharded
            caps, text_valid, n_local, weights = self.runtime.state.layout["lumina2"]
            rows = gen.index.shape[1] if gen is not None and gen.kind == SELECTIVE else n_local
            out, lse = replicated_text_attention(self, query, key, value, text=slice(0, max(caps)),
                                                 image=_image_rows(caps, n_local, key.device), text_mask=text_valid,
                                                 scale=scale)
            if gen is not None and gen.wants_probs(self.layer):
                at = _image_rows(caps, rows, key.device)

                def take(t):
                    return t[:, at] if isinstance(at, slice) else gather_rows(t, at)

                collect_replicated_text_probs(self.runtime, gen, take(query), key[:, :max(caps)], take(lse),
                                              text_valid, weights, scale)
            out = out.flatten(2, 3).to(dtype)
            return attn.to_out[1](attn.to_out[0](out))

        def stock_mask():  # as the stock processor passes it
            return mask.bool().view(batch, 1, 1, -1)

        out = attend(self.runtime, self.name, query, key, value, mask, scale, rewrite=self.rewrite_padding,
                     stock_mask=stock_mask, compact=_compact, processor=self,
                     sequence=self.stack != "context_refiner")  # [B, L, H, d]
        out = out.flatten(2, 3).to(dtype)
        return attn.to_out[1](attn.to_out[0](out))

    def _collect(self, gen, query, key, caps) -> None:
        """PCSP: per sample, softmax over its own [caption; image] keys, the image-query x caption-key block."""
        n = gen.grid[0] * gen.grid[1]
        t = max(caps)
        k = key.repeat_interleave(query.shape[2] // key.shape[2], dim=2)  # [B, L, H, d]: warm-up only
        probs = query.new_zeros(len(caps), n, t, dtype=torch.float32)  # [B, N, T]
        for i, c in enumerate(caps):
            q_i = query[i:i + 1, c:c + n].transpose(1, 2)  # [1, H, N, d]
            k_i = k[i:i + 1, :c + n].transpose(1, 2)  # [1, H, c + N, d]
            probs[i, :, :c] = joint_image_to_text_probs(q_i, k_i, slice(0, c))[0]
        valid = torch.arange(t, device=probs.device)[None] < torch.tensor(caps, device=probs.device)[:, None]
        gen.collect(probs, self.runtime.text_weights(valid, t, probs.device))


def _compact(mask):
    """The [B, L] valid-key form of a Lumina2 mask (bool or 0/1 integers: the stock processor calls ``.bool()``)."""
    return mask.bool() if mask.dim() == 2 else None


def _caption_lengths(gen) -> tuple[int, ...]:
    return gen.remember(("lumina2", "caps"), _missing)


def _missing():
    raise SafeDitError("Lumina2: the caption lengths of this forward are unknown (the rope embedder did not run "
                       "through safe-dit's hook); call the model through its stock forward")


def _image_rows(caps, n: int, device) -> torch.Tensor | slice:
    """Where the n image rows of each sample's [caption_i; image; padding] sit: a slice when all captions are alike."""
    if len(set(caps)) == 1:
        return slice(caps[0], caps[0] + n)
    return torch.tensor(caps, device=device)[:, None] + torch.arange(n, device=device)  # [B, n]


def _local_rows(caps, start: int, stop: int, n: int, device) -> torch.Tensor:
    """[B, max(cap) + n_local]: this rank's joint RoPE rows in the full [caption_i; image; padding] table: the
    caption, the image rows [start, stop), the padding rows."""
    rows = [torch.cat([torch.arange(c), c + torch.arange(start, stop), torch.arange(c + n, max(caps) + n)])
            for c in caps]
    return torch.stack(rows).to(device)


def _selective_rows(gen, caps) -> torch.Tensor:
    """[B, max(cap) + K]: where the rows of a selective step's joint sequence sit in the full one. Sample i:
    caption 0..cap_i-1, sensitive rows at cap_i + index, its padding rows on the full sequence's padding."""
    def make():
        idx = gen.index  # [B, K]
        n, t = gen.local_tokens, max(caps)
        rows = []
        for i, c in enumerate(caps):
            dev = idx.device
            rows.append(torch.cat([torch.arange(c, device=dev), idx[i] + c, torch.arange(c + n, t + n, device=dev)]))
        return torch.stack(rows)

    return gen.remember(("lumina2", "rows", caps), make)


def _full_mask(gen, caps, device) -> torch.Tensor:
    """[B, max(cap) + N] bool: sample i attends to its first cap_i + N keys (the stock joint mask of a dense step)."""
    n = gen.local_tokens
    return gen.remember(("lumina2", "mask", caps), lambda: torch.arange(max(caps) + n, device=device)[None]
                        < (torch.tensor(caps, device=device)[:, None] + n))


@register
class Lumina2Adapter(Adapter):
    name = "lumina2"
    model_classes = (Lumina2Transformer2DModel,)
    notes = NOTES
    processor = SafeLumina2AttnProcessor
    replaces = (Lumina2AttnProcessor2_0,)
    tokens_in = None  # the rope embedder's hook gathers the sensitive patches with their RoPE rows
    tokens_out = "norm_out"
    special_leading_tokens = 1  # Gemma's <bos>
    cfg_pairs = True  # a [cond; uncond] batch under safe_dit.generation(..., cfg_batch=True)
    context_parallel = True  # the image patches split at the rope embedder (their RoPE rows and the joint RoPE rows
    # with them); the caption refiner local, the caption on every rank in the joint blocks; gathered after norm_out

    def check(self, model, config) -> None:
        if config.mode == "safe-sw":
            raise SafeDitError(NO_SW_CFG)
        stock = (type(model).forward is Lumina2Transformer2DModel.forward
                 and type(model.rope_embedder).forward is Lumina2RotaryPosEmbed.forward)
        if (config.scheduled or config.context_parallel is not None) and not stock:
            raise SafeDitError(NOT_STOCK.format(cls=type(model).__name__))

    def hooks(self, model, runtime, handle) -> list:
        names = ("hidden_states", "timestep", "encoder_hidden_states", "encoder_attention_mask")
        hooks = [model.register_forward_pre_hook(
            caption_mask_check("encoder_attention_mask", "encoder_hidden_states", names), with_kwargs=True)]
        scheduled, parallel = runtime.config.scheduled, runtime.parallel
        if not scheduled and parallel is None:
            return hooks
        current: dict = {}  # this forward's caption and sequence length lists (the stock forward's own)

        def guard(_model, args, kwargs):
            gen = runtime.generation
            if gen is None:
                return None
            latents = kwargs.get("hidden_states", args[0] if args else None)
            if gen.step >= 0 and latents is not None and latents.shape[0] != gen.batch:
                runtime.generation = None
                raise SafeDitError(BATCH_CHANGED)
            scheduler = None if runtime.explicit_generation else getattr(runtime.pipe, "scheduler", None)
            if scheduler is not None and scheduler.step_index is not None and scheduler.step_index == gen.step:
                runtime.generation = None
                raise SafeDitError(TWO_CALLS)
            return None

        def on_rope(_module, _inputs, out):
            x, cap_rope, img_rope, rope, caps, seqs = out  # [B, N, p*p*C], [B, T, d], [B, N, d], [B, L, d], lists
            gen = runtime.generation if scheduled else None
            if gen is None and parallel is None:
                return None
            caps = tuple(int(c) for c in caps)
            if gen is not None:
                first = current.setdefault("generation", (gen, caps))
                if first[0] is not gen:
                    first = current["generation"] = (gen, caps)
                if first[1] != caps or gen.remember(("lumina2", "caps"), lambda: caps) != caps:
                    runtime.generation = None
                    raise SafeDitError(CAPTIONS_CHANGED if runtime.explicit_generation else TWO_CALLS)
            enc, seqs = list(caps), list(seqs)
            n = x.shape[1]
            if parallel is not None:  # this rank's patches, their RoPE rows and joint rows [caption_i; shard; pad]
                start, stop = parallel.local(n, "image tokens")
                x, img_rope = parallel.shard(x, 1, "image tokens"), parallel.shard(img_rope, 1, "image tokens")
                rope = gather_rows(rope, _local_rows(caps, start, stop, n, rope.device))
                seqs = [c + stop - start for c in caps]
                dev, t = x.device, max(caps)
                weights = torch.arange(t, device=dev)[None] < torch.tensor(caps, device=dev)[:, None]  # [B, T]
                state = runtime.state
                state.global_tokens = n
                state.layout["lumina2"] = (caps, None if len(set(caps)) == 1 else weights, stop - start, weights)
            if gen is not None and gen.kind == SELECTIVE:  # SRSU: only sensitive rows, each with its own RoPE rows
                x, img_rope = gen.gather(x), gen.gather(img_rope)
                rope = gather_rows(rope, _selective_rows(gen, caps))  # [B, max(cap) + K, d]
                seqs = [c + gen.index.shape[1] for c in caps]
            current.update(caps=caps, enc=enc, seqs=seqs, n=n)
            return x, cap_rope, img_rope, rope, enc, seqs

        def on_norm_out(_module, _inputs, out):  # [B, L, C] joint -> [B, n, C] image rows, before the scatter
            gen = runtime.generation if scheduled else None
            if "caps" not in current:
                return None
            caps, enc, seqs, n = current.pop("caps"), current.pop("enc"), current.pop("seqs"), current.pop("n")
            if gen is not None and gen.kind == SELECTIVE:
                rows = gen.index.shape[1]
            else:
                rows = n if parallel is None else parallel.local(n)[1] - parallel.local(n)[0]
            at = torch.tensor(caps, device=out.device)[:, None] + torch.arange(rows, device=out.device)  # [B, n]
            for i in range(len(enc)):  # the stock unpatchify now reads rows [0, N) of the scattered/gathered output
                enc[i], seqs[i] = 0, n
            return gather_rows(out, at)

        hooks.append(model.rope_embedder.register_forward_hook(on_rope))
        hooks.append(model.norm_out.register_forward_hook(on_norm_out, prepend=True))
        if scheduled:
            hooks.append(model.register_forward_pre_hook(guard, with_kwargs=True))
        return hooks
