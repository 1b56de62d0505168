"""Z-Image adapter (diffusers ``ZImageTransformer2DModel``, ``ZImagePipeline``).

Masks in the stock model: Z-Image pads every caption and image sequence to a multiple of 32 with learned pad
tokens (ordinary, attended tokens) and then pads the batch to its longest sequence with a [B, L] mask, which
``ZSingleStreamAttnProcessor`` views as [B, 1, 1, L]: the noise refiner, the caption refiner and every unified
block get one whenever the samples' padded lengths differ (captions of different lengths in a batch or CFG
pair), none otherwise. It is key padding, decided once per forward on the [B, L] tensor the model hands a
whole stack, and rewritten exactly: keys sliced, or the batch split by length.

safe-core: the unified sequence of sample i is [image (N grid rows, then P learned pad rows up to Nx, a
multiple of 32); caption_i (its own multiple of 32); batch padding], so the image->text block PCSP reads is the
image queries [0, N) x the caption keys [Nx, Nx + cap_i) of each sample's joint softmax over its valid keys. At
selective steps the sensitive rows enter at the first noise-refiner block (gathered with their own RoPE rows;
the P image pad rows always ride along, like the caption rows, which are always computed: the caption refiner
runs in full); the stock forward then lays out [sensitive; pad; caption_i] itself, and each unified block gets
the matching rows of the stock RoPE table while keeping the stock full-length mask, which is the right one for
the anchor's K/V that every query attends (written in place with the fresh rows). The final layer's output is
cut to its image rows and scattered over the anchor's, so the stock unpatchify reads all N rows.

safe-sw: ``ZImagePipeline`` guides pred = c + g (c - u) = u + (1 + g)(c - u) on its [cond; uncond] batch, so the
conditional outputs are rewritten c' = u + gamma_i / (1 + g) (c - u), which its own formula turns into
u + gamma_i (c - u), gamma_i = cfg_context + (cfg_sensitive - cfg_context) s_i in the usual u + gamma (c - u) form
(its guidance_scale 4 is gamma 5). Refused with ``cfg_normalization`` (it rescales by the norm of c).

Context parallelism: at the first noise-refiner block the N grid rows and the P image pad rows are each split over
the ranks (this rank's rows: its grid shard, then its pad shard), with their RoPE rows in every refiner and unified
block; the caption refiner runs locally in full, and in the unified blocks every rank holds each whole caption: the
caption keys are attended locally (their batch padding rewritten exactly) and the image keys of every rank through
the sequence-parallel call, merged by log-sum-exp. The final layer's grid rows are gathered. Omni inputs and
images of different sizes in one batch are refused under it.

Refused in the scheduled modes the omni inputs (several images, SigLIP features), ControlNet residuals,
images of different sizes in one batch, a batch or caption change inside a generation (``cfg_truncation`` < 1 drops the
unconditional half), and a model whose forward is not the stock one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.models.transformers.transformer_z_image import (
    SEQ_MULTI_OF,
    ZImageTransformer2DModel,
    ZSingleStreamAttnProcessor,
)

from safe_dit.adapters.contract import Adapter, SafeProcessor, register
from safe_dit.config import SafeDitError
from safe_dit.engine.attend import attend
from safe_dit.engine.generation import gather_rows
from safe_dit.engine.guidance import pixel_gamma
from safe_dit.engine.hooks import layer_of
from safe_dit.engine.joint import collect_replicated_text_probs, replicated_text_attention
from safe_dit.engine.partition import joint_image_to_text_probs
from safe_dit.engine.schedule import SELECTIVE

NOTES = ("Z-Image: a [B, L] batch-padding mask in the noise refiner, caption refiner and unified blocks whenever the "
         "samples' (32-padded) sequence lengths differ; key padding, rewritten exactly (keys sliced, batch split by "
         "length), decided once per forward.")

NO_SW_NORMALIZED = ("safe-sw on Z-Image cannot follow cfg_normalization "
                    "(ZImagePipeline rescales the guided prediction "
                    "by the norm of the conditional one, which SW-CFG rewrites): use cfg_normalization=False, or "
                    "mode='safe-core'")

NOT_STOCK = ("safe-core on {cls} needs the stock ZImageTransformer2DModel.forward with noise-refiner blocks and one "
             "final layer (the sensitive rows are laid out through them); this model differs. Use dense-fp")

OMNI = ("safe-core on Z-Image supports text-to-image only: {what}. Use dense-fp for the omni / editing inputs")

BATCH_CHANGED = ("the batch changed inside one safe-core generation (ZImagePipeline with cfg_truncation < 1 drops the "
                 "unconditional half for the last steps): the cached rows no longer match. Use cfg_truncation=1 or "
                 "dense-fp")


CAPTIONS_CHANGED = ("the caption lengths changed inside one safe-core generation (the cached rows are laid out for "
                    "the first ones): use the same captions at every step")


def _padded(n: int) -> int:
    return n + (-n) % SEQ_MULTI_OF


@dataclass(frozen=True)
class Layout:
    """Where one forward's rows sit: N image grid rows, padded to ``nx``; captions of ``real`` tokens, each
    padded to ``caps``; the unified sequence of sample i is [image; caption_i; batch padding]."""

    n: int
    nx: int
    caps: tuple[int, ...]
    real: tuple[int, ...]


class SafeZImageAttnProcessor(SafeProcessor):
    """Drop-in for ``ZSingleStreamAttnProcessor``: same projections, QK-norm and complex RoPE; the [B, L] padding
    mask decided by ``engine.attend`` (dropped or rewritten exactly), attention through diffusers' dispatcher;
    SRSU in the noise refiner and unified blocks; the PCSP tap in the unified blocks."""

    stock = ZSingleStreamAttnProcessor

    def setup(self, model) -> None:
        self.stack = self.name.split(".")[0]  # noise_refiner / context_refiner / layers
        self.layer = layer_of(self.name, "layers")

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, freqs_cis=None):
        query = attn.to_q(hidden_states).unflatten(-1, (attn.heads, -1))  # [B, L, H, d]
        key = attn.to_k(hidden_states).unflatten(-1, (attn.heads, -1))
        value = attn.to_v(hidden_states).unflatten(-1, (attn.heads, -1))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if freqs_cis is not None:  # at selective steps the hooks handed each row its own RoPE rows
            query, key = _rotate(query, freqs_cis), _rotate(key, freqs_cis)
        dtype = query.dtype
        mask = attention_mask

        gen = self.runtime.generation
        parallel = self.runtime.parallel is not None
        if gen is not None and self.stack in ("noise_refiner", "layers"):
            layout = _layout(gen)
            if gen.kind == SELECTIVE:  # SRSU: fresh rows written over the anchor's K/V, in place
                rows = _refiner_rows(gen, layout) if self.stack == "noise_refiner" else _unified_rows(gen, layout)
                key, value = gen.merged_kv(self.name, key, value, rows)  # [B, L_full, H, d]
            elif gen.refreshes_cache:
                gen.store_kv(self.name, key, value)
            if self.stack == "layers" and gen.wants_probs(self.layer) and not parallel:
                self._collect(gen, query, key, layout)

        if parallel and self.stack == "layers":  # the caption on every rank, the image tokens sharded
            local = self.runtime.state.layout["z-image"]
            nx, t = local.nx, max(local.caps)
            out, lse = replicated_text_attention(self, query, key, value, text=slice(nx, nx + t), image=slice(0, nx),
                                                 text_mask=local.text_mask)
            if gen is not None and gen.wants_probs(self.layer):
                collect_replicated_text_probs(self.runtime, gen, query[:, :local.n], key[:, nx:nx + t],
                                              lse[:, :local.n], local.text_mask, local.weights)
            return self._out(attn, out, dtype)

        def stock_mask():  # as the stock processor passes it
            return mask[:, None, None, :] if mask.ndim == 2 else mask

        out = attend(self.runtime, self.name, query, key, value, mask, None, rewrite=self.rewrite_padding,
                     stock_mask=stock_mask, compact=lambda m: m.bool() if m.dim() == 2 else None, processor=self,
                     sequence=self.stack != "context_refiner")
        return self._out(attn, out, dtype)

    @staticmethod
    def _out(attn, out, dtype):
        out = out.flatten(2, 3).to(dtype)
        output = attn.to_out[0](out)
        if len(attn.to_out) > 1:
            output = attn.to_out[1](output)
        return output

    def _collect(self, gen, query, key, layout: Layout) -> None:
        """PCSP: per sample, the image-query x caption-key block of its softmax over its own valid keys
        (image, image pad rows, its padded caption), as the model attends; the caption's pad tokens weigh 0."""
        n, nx, t = layout.n, layout.nx, max(layout.caps)
        probs = query.new_zeros(query.shape[0], n, t, dtype=torch.float32)  # [B, N, T]
        q, k = query[:, :n].transpose(1, 2), key.transpose(1, 2)  # [B, H, N, d], [B, H, L, d]
        if len(set(layout.caps)) == 1:
            probs[:] = joint_image_to_text_probs(q, k[:, :, :nx + t], slice(nx, nx + t))
        else:
            for i, c in enumerate(layout.caps):
                probs[i, :, :c] = joint_image_to_text_probs(q[i:i + 1], k[i:i + 1, :, :nx + c], slice(nx, nx + c))[0]
        valid = torch.arange(t, device=probs.device)[None] < torch.tensor(layout.real, device=probs.device)[:, None]
        gen.collect(probs, self.runtime.text_weights(valid, t, probs.device))


def _rotate(x, freqs):
    """Z-Image's complex RoPE on x [B, L, H, d] with freqs [B, L, d/2], in float32 as the stock processor."""
    with torch.amp.autocast("cuda", enabled=False):
        rotated = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2)) * freqs.unsqueeze(2)
        return torch.view_as_real(rotated).flatten(3).type_as(x)


def _layout(gen) -> Layout:
    return gen.remember(("z-image", "layout"), _missing)


def _missing():
    raise SafeDitError("Z-Image: this forward's sequence layout is unknown (the model's forward did not run through "
                       "safe-dit's hooks); call the model through its stock forward")


def _refiner_rows(gen, layout: Layout) -> torch.Tensor:
    """[B, K + P]: the noise refiner's rows at a selective step, the sensitive rows then the image pad rows."""
    def make():
        idx = gen.index  # [B, K]
        pad = torch.arange(layout.n, layout.nx, device=idx.device).expand(idx.shape[0], -1)
        return torch.cat([idx, pad], dim=1)

    return gen.remember(("z-image", "refiner-rows"), make)


def _unified_rows(gen, layout: Layout) -> torch.Tensor:
    """[B, K + P + T]: where a selective step's unified rows [sensitive; image pad; caption_i; batch padding] sit in
    the full [image; caption_i; batch padding] sequence (caption and padding rows keep their offset from Nx)."""
    def make():
        rows = _refiner_rows(gen, layout)
        text = torch.arange(layout.nx, layout.nx + max(layout.caps), device=rows.device).expand(rows.shape[0], -1)
        return torch.cat([rows, text], dim=1)

    return gen.remember(("z-image", "unified-rows"), make)


def _token_grid(args, kwargs):
    """(h, w) of the image tokens: each sample's latent [C, F, H, W] patchified by ``patch_size`` (default 2)."""
    x = kwargs.get("x", args[0] if args else None)
    if not isinstance(x, (list, tuple)) or not x or isinstance(x[0], (list, tuple)):
        raise SafeDitError(OMNI.format(what="x is a nested list (omni mode: several images per sample)"))
    p, fp = kwargs.get("patch_size", 2), kwargs.get("f_patch_size", 1)
    shapes = {tuple(xi.shape[1:]) for xi in x}
    if len(shapes) != 1:
        raise SafeDitError(OMNI.format(what=f"the batch holds images of different sizes {sorted(shapes)}"))
    f, h, w = shapes.pop()
    if f // fp != 1:
        raise SafeDitError(OMNI.format(what=f"{f // fp} frames of tokens per sample"))
    return h // p, w // p


def _sw_cfg(runtime, gen, output):
    """SW-CFG through ZImagePipeline's c + g (c - u): the conditional outputs become u + gamma_i / (1 + g) (c - u)."""
    pipe = runtime.pipe
    g = float(getattr(pipe, "guidance_scale", 0.0) or 0.0)
    if not gen.cfg_batch or g <= 0.0:
        return output
    if getattr(pipe, "_cfg_normalization", False):
        raise SafeDitError(NO_SW_NORMALIZED)
    outs = output[0]  # B x [C, 1, H, W], the pipeline's per-sample list
    sample = torch.stack(list(outs))[:, :, 0]  # [B, C, H, W]
    cond, uncond = gen.cfg_rows(sample.shape[0])
    gamma = pixel_gamma(runtime.config, gen, sample.shape[0], sample.shape[-1], sample.dtype)  # [b, 1, H, W]
    guided = list(outs)
    for i, (c, u) in enumerate(zip(sample[cond], sample[uncond])):
        guided[range(sample.shape[0])[cond][i]] = (u + gamma[i] / (1 + g) * (c - u))[:, None]  # [C, 1, H, W]
    if isinstance(output, tuple):
        return (guided, *output[1:])
    output.sample = guided
    return output


def _final_layer(model):
    return next(iter(model.all_final_layer.values()))


@register
class ZImageAdapter(Adapter):
    name = "z-image"
    model_classes = (ZImageTransformer2DModel,)
    notes = NOTES
    processor = SafeZImageAttnProcessor
    replaces = (ZSingleStreamAttnProcessor,)
    tokens_in = None  # the first noise-refiner block's pre-hook gathers the sensitive rows with their RoPE rows
    tokens_out = staticmethod(_final_layer)
    grid = staticmethod(_token_grid)
    refused_inputs = ("controlnet_block_samples",)
    step_inputs = ("x", "t")
    cfg_pairs = True  # ZImagePipeline batches [cond; uncond] in one call
    context_parallel = True  # the image rows (grid and pad rows, each split) at the first noise-refiner block with
    # their RoPE rows; the caption refiner local, the caption on every rank in the unified blocks; the grid rows
    # gathered after the final layer
    # ZImagePipeline wraps each prompt in Qwen3's chat template (add_generation_prompt, enable_thinking): no prompt
    # words, so PCSP does not weigh them: "<|im_start|>", "user", "\n" before, and "<|im_end|>", "\n",
    # "<|im_start|>", "assistant", "\n" after
    special_leading_tokens = 3
    special_trailing_tokens = 5

    def check(self, model, config) -> None:
        if (config.scheduled or config.context_parallel is not None) and (
                type(model).forward is not ZImageTransformer2DModel.forward or len(model.noise_refiner) == 0
                or len(model.all_final_layer) != 1):
            raise SafeDitError(NOT_STOCK.format(cls=type(model).__name__))

    def parallel_hooks(self, model, runtime, parallel) -> list:
        from safe_dit.adapters.z_image_parallel import parallel_hooks  # the split points, in their own module

        return parallel_hooks(model, runtime, parallel)

    def guidance(self, model, runtime, handle):
        return _sw_cfg

    def hooks(self, model, runtime, handle) -> list:
        if not runtime.config.scheduled:
            return []
        current: dict = {}  # this forward's caption lengths; the generation and layout they were first seen with

        def on_forward(_model, args, kwargs):
            cap_feats = kwargs.get("cap_feats", args[2] if len(args) > 2 else None)
            x = kwargs.get("x", args[0] if args else None)
            if kwargs.get("siglip_feats") is not None or kwargs.get("image_noise_mask") is not None:
                raise SafeDitError(OMNI.format(what="siglip_feats / image_noise_mask (omni inputs) were given"))
            if cap_feats is None or isinstance(cap_feats[0], (list, tuple)):
                raise SafeDitError(OMNI.format(what="cap_feats is not one caption tensor per sample"))
            current["real"] = tuple(len(c) for c in cap_feats)
            gen = runtime.generation
            if gen is not None and gen.step >= 0 and x is not None and len(x) != gen.batch:
                runtime.generation = None
                raise SafeDitError(BATCH_CHANGED)
            pipe = runtime.pipe
            if not runtime.explicit_generation and hasattr(pipe, "do_classifier_free_guidance"):
                runtime.pipeline_cfg = bool(pipe.do_classifier_free_guidance)  # [cond; uncond] in one call
            return None

        def on_refiner(index):
            def hook(_block, args):  # (x [B, Nx, D], mask, freqs [B, Nx, d/2], adaln, ...)
                gen = runtime.generation
                if gen is None:
                    return None
                if index == 0:
                    _begin_layout(gen, args)
                if gen.kind != SELECTIVE:
                    return None
                rows = _refiner_rows(gen, _layout(gen))
                # [B, K + P, d/2]
                freqs = gen.remember(("z-image", "refiner-rope"), lambda: gather_rows(args[2], rows))
                x = gather_rows(args[0], rows) if index == 0 else args[0]  # [B, K + P, D]
                return (x, args[1], freqs, *args[3:])
            return hook

        def _begin_layout(gen, args):
            x, mask = args[0], args[1]
            if mask is not None:
                raise SafeDitError(OMNI.format(what="the batch's image sequences differ in length"))
            real = current.pop("real", None)
            if real is None:
                _missing()
            n = gen.local_tokens
            layout = Layout(n, x.shape[1], tuple(_padded(r) for r in real), real)
            if runtime.parallel is None and _padded(n) != layout.nx:
                raise SafeDitError(NOT_STOCK.format(cls=type(model).__name__))
            first = current.get("generation")
            if first is None or first[0] is not gen:
                first = current["generation"] = (gen, layout)
            if first[1] != layout or gen.remember(("z-image", "layout"), lambda: layout) != layout:
                runtime.generation = None
                raise SafeDitError(CAPTIONS_CHANGED)

        def on_block(_block, args):  # (unified [B, L, D], mask [B, L_full], freqs [B, L_full, d/2], adaln, ...)
            gen = runtime.generation
            if gen is None or gen.kind != SELECTIVE:
                return None
            rows = _unified_rows(gen, _layout(gen))
            # [B, K + P + T, d/2]
            freqs = gen.remember(("z-image", "unified-rope"), lambda: gather_rows(args[2], rows))
            return (args[0], args[1], freqs, *args[3:])

        def on_final(_module, _inputs, out):  # [B, L, C] unified -> [B, n, C] image rows, before the scatter
            gen = runtime.generation
            if gen is None:
                return None
            return out[:, :gen.index.shape[1] if gen.kind == SELECTIVE else _layout(gen).n]

        hooks = [model.register_forward_pre_hook(on_forward, with_kwargs=True)]
        hooks += [b.register_forward_pre_hook(on_refiner(i)) for i, b in enumerate(model.noise_refiner)]
        hooks += [b.register_forward_pre_hook(on_block) for b in model.layers]
        return hooks + [_final_layer(model).register_forward_hook(on_final, prepend=True)]
