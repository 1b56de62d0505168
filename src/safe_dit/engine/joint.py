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

from safe_dit.engine.attend import _is_native, attend
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
