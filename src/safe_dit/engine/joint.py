"""Joint (MMDiT) attention for backbones whose image and text tokens share one sequence (SD3, FLUX).

Model-agnostic: an adapter's processor projects, normalises and rotates the joint sequence in its stock
order ([text; image] in FLUX, [image; text] in SD3) and hands it here. Text tokens are always computed in
full; at selective steps the image part holds only the sensitive rows, which are written, with the fresh
text rows, into the anchor's cached joint K/V in place (context rows keep the cache, RoPE already
applied), so every query still sees every key and no full-length copy is made. During warm-up the
image-query x text-key block of the joint softmax feeds PCSP.
"""

from __future__ import annotations

from typing import Callable

import torch

from safe_dit.config import SafeDitError
from safe_dit.engine.attend import ForwardState, _is_native, attend
from safe_dit.engine.generation import gather_rows
from safe_dit.engine.masks import _take_keys
from safe_dit.engine.parallel import MASK_UNDER_CP, attention_with_lse, sequence_attention_with_lse
from safe_dit.engine.partition import joint_image_to_text_probs, joint_text_probs_from_lse
from safe_dit.engine.schedule import SELECTIVE


def joint_attention(proc, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, n_text: int, *,
                    text_first: bool, mask: torch.Tensor | None = None, stock_mask: Callable | None = None,
                    compact: Callable | None = None, scale: float | None = None,
                    text_valid: torch.Tensor | None = None) -> torch.Tensor:
    """q/k/v [B, L, H, d], the joint sequence with ``n_text`` text rows first (``text_first``) or last, and
    N image rows (or K sensitive rows at selective steps) -> [B, L, H, d] in the same order.

    ``proc`` is the calling processor (its runtime, name, layer, rewrite_padding and dispatch settings);
    ``mask`` (over the joint keys, as the stock processor would pass it) goes through ``attend``; ``scale``
    (default 1/sqrt(d)) is the logits' scale, in the main call and in PCSP's; ``text_valid`` [B, T] says which
    text tokens PCSP may weigh (default all)."""
    runtime = proc.runtime
    gen = runtime.generation
    if gen is not None:
        if gen.kind == SELECTIVE:  # SRSU: fresh rows over the anchor's joint K/V, in place
            key, value = gen.merged_kv(proc.name, key, value, gen.joint_rows(n_text, text_first),
                                       gen.joint_valid(n_text, text_first))  # [B, T + N, H, d]
        elif gen.refreshes_cache:
            gen.store_kv(proc.name, key, value)
        if n_text and gen.wants_probs(proc.layer):  # PCSP (warm-up: all N image rows)
            n_img = query.shape[1] - n_text
            q_t = query.transpose(1, 2)  # [B, H, L, d]
            q_rows = q_t[:, :, n_text:] if text_first else q_t[:, :, :n_img]  # [B, H, N, d]
            fused = _attention_with_lse(proc, query, key, value, mask, scale)
            if fused is not None:  # the tap from the call's own log-sum-exp: no second pass over the keys
                out, lse = fused  # [B, L, H, d], [B, H, L]
                lse_rows = lse[:, :, n_text:] if text_first else lse[:, :, :n_img]  # [B, H, N]
                text_keys = slice(0, n_text) if text_first else slice(n_img, n_img + n_text)
                probs = joint_text_probs_from_lse(q_rows, key.transpose(1, 2), text_keys, lse_rows, scale)
                gen.collect(probs, runtime.text_weights(text_valid, probs.shape[-1], probs.device))
                runtime.record(proc.name, "no mask")
                return out
            keys, text_keys = _global_keys(runtime.parallel, key, n_text, text_first)  # [B, T + N, H, d], slice
            probs = joint_image_to_text_probs(q_rows, keys.transpose(1, 2), text_keys, scale=scale)  # [B, N, T]
            gen.collect(probs, runtime.text_weights(text_valid, probs.shape[-1], probs.device))
    return attend(runtime, proc.name, query, key, value, mask, scale, rewrite=proc.rewrite_padding,
                  stock_mask=stock_mask or (lambda: mask), compact=compact, processor=proc)  # [B, L, H, d]


def _attention_with_lse(proc, query, key, value, mask, scale):
    """The warm-up call of a PCSP block as one CPU flash-attention call that also returns each query's log-sum-exp
    ((out [B, L, H, d], lse [B, H, L])), or None where that would not be the very call ``attend`` makes: a mask, a
    chosen attention backend, context parallelism, GQA, torch.compile, or another device (those keep the extra
    mask-free SDPA pass of ``joint_image_to_text_probs``). CPU only: the flash kernel SDPA itself dispatches to
    there for mask-free float calls (tests/engine/test_partition.py checks the outputs are bit-identical)."""
    runtime = proc.runtime
    if (mask is not None or runtime.parallel is not None or query.device.type != "cpu"
            or query.dtype not in (torch.float32, torch.bfloat16) or key.shape[2] != query.shape[2]
            or getattr(proc, "_attention_backend", None) is not None or not _is_native(None)
            or torch.compiler.is_compiling()):
        return None
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # [B, H, L, d]
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, scale=scale)
    return out.transpose(1, 2), lse


def _global_keys(parallel, key: torch.Tensor, n_text: int, text_first: bool) -> tuple[torch.Tensor, slice]:
    """The joint keys of the whole sequence and where its text keys sit. Under context parallelism ``key`` is this
    rank's [text; image] shard: each part is all-gathered (warm-up only, the PCSP blocks only), so that every image
    query's probabilities are normalised over all keys as on one device."""
    n_img = key.shape[1] - n_text
    if parallel is not None:
        text = key[:, :n_text] if text_first else key[:, n_img:]
        image = key[:, n_text:] if text_first else key[:, :n_img]
        text, image = parallel.gather(text.contiguous(), 1), parallel.gather(image.contiguous(), 1)
        key = torch.cat([text, image] if text_first else [image, text], dim=1)
        n_text, n_img = text.shape[1], image.shape[1]
    return key, (slice(0, n_text) if text_first else slice(n_img, n_img + n_text))


# -- captions replicated, image tokens sharded (context parallelism) ------------------------------------------

def replicated_text_attention(proc, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, text: slice,
                              image: slice | torch.Tensor, text_mask: torch.Tensor | None = None,
                              compact: Callable | None = None, scale: float | None = None):
    """Joint attention under context parallelism when every rank holds all caption tokens and its own shard of
    the image tokens: q [B, L, H, d] (this rank's rows, any layout), k/v [B, L, Hkv, d] -> (out [B, L, H, d],
    lse [B, L, H]), equal to one device's joint softmax over all caption keys and every rank's image keys.

    The caption keys (rows ``text`` of k/v) are attended locally, the image keys (rows ``image``: a slice, or
    [B, n] per-sample rows) through the sequence-parallel call; the two partial softmaxes are merged by their
    log-sum-exp (as ring attention merges its chunks). A caption key-padding mask ``text_mask`` (its [B, T]
    valid-key form ``compact(text_mask)``, default ``text_mask.bool()``) is decided once per forward and rewritten
    exactly on the caption part: each group of samples with the same valid keys attends only to those. A kept
    mask (rewrite_padding=False, or a sample with no valid caption key) is refused: it cannot be sharded."""
    runtime = proc.runtime
    parallel = runtime.parallel
    n_rep = query.shape[2] // key.shape[2]
    if n_rep > 1:  # GQA: diffusers' templated CP attention has none
        key, value = (t.repeat_interleave(n_rep, dim=2) for t in (key, value))

    def rows(t):
        return t[:, image] if isinstance(image, slice) else gather_rows(t, image)

    out_i, lse_i = sequence_attention_with_lse(parallel, query, rows(key), rows(value), scale,
                                               getattr(proc, "_attention_backend", None))  # [B, L, H, d], [B, L, H]
    k_t, v_t = key[:, text], value[:, text]  # [B, T, H, d]
    verdict = "no mask"
    if text_mask is None:
        out_t, lse_t = attention_with_lse(query, k_t, v_t, scale)
    else:
        state = runtime.state if runtime.state is not None else ForwardState()
        decision = state.key_padding_decision(text_mask, proc.rewrite_padding,
                                              compact or (lambda m: m.bool() if m.dim() == 2 else None))
        if decision.keep:
            raise SafeDitError(MASK_UNDER_CP.format(where=f"{proc.name}, {decision.verdict}"))
        verdict = decision.verdict
        plan = decision.plan
        if plan.elide or len(plan.groups) == 1:
            keys = slice(None) if plan.elide else plan.groups[0].keys
            out_t, lse_t = attention_with_lse(query, _take_keys(k_t, keys, 1), _take_keys(v_t, keys, 1), scale)
        else:
            out_t, lse_t = torch.empty_like(out_i), torch.empty_like(lse_i)
            for g in plan.groups:
                o, lse = attention_with_lse(query.index_select(0, g.samples),
                                            _take_keys(k_t.index_select(0, g.samples), g.keys, 1),
                                            _take_keys(v_t.index_select(0, g.samples), g.keys, 1), scale)
                out_t.index_copy_(0, g.samples, o.to(out_t.dtype))
                lse_t.index_copy_(0, g.samples, lse.to(lse_t.dtype))
    runtime.record(proc.name, f"{verdict} (captions replicated, image keys sequence-parallel)")
    lse_t, lse_i = lse_t.float(), lse_i.float()
    weight = torch.sigmoid(lse_i - lse_t)[..., None]  # the image part's share of each query's softmax mass
    out = out_t.float() - weight * (out_t.float() - out_i.float())
    return out.to(query.dtype), lse_t - torch.nn.functional.logsigmoid(lse_t - lse_i)


def collect_replicated_text_probs(runtime, gen, query: torch.Tensor, key: torch.Tensor, lse: torch.Tensor,
                                  text_valid: torch.Tensor | None, weights_mask: torch.Tensor | None = None,
                                  scale: float | None = None) -> None:
    """PCSP under context parallelism with replicated captions: this rank's image queries [B, n, H, d] x the
    caption keys [B, T, Hkv, d], normalised by the joint log-sum-exp [B, n, H] of
    :func:`replicated_text_attention` (every rank's keys), as on one device; keys outside ``text_valid`` [B, T]
    weigh 0. ``weights_mask`` (default ``text_valid``) is the caption mask PCSP's text weights are read from."""
    k = key.repeat_interleave(query.shape[2] // key.shape[2], dim=2)
    probs = joint_text_probs_from_lse(query.transpose(1, 2), k.transpose(1, 2), slice(None), lse.transpose(1, 2),
                                      scale)  # [B, n, T]
    if text_valid is not None:
        probs = probs * text_valid[:, None].to(probs.dtype)
    mask = text_valid if weights_mask is None else weights_mask
    gen.collect(probs, runtime.text_weights(mask, probs.shape[-1], probs.device))
