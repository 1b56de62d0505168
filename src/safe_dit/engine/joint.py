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

from safe_dit.engine.attend import attend
from safe_dit.engine.partition import joint_image_to_text_probs
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
            keys, text_keys = _global_keys(runtime.parallel, key, n_text, text_first)  # [B, T + N, H, d], slice
            q_t = query.transpose(1, 2)  # [B, H, L, d]
            q_rows = q_t[:, :, n_text:] if text_first else q_t[:, :, :n_img]  # [B, H, N, d]
            probs = joint_image_to_text_probs(q_rows, keys.transpose(1, 2), text_keys, scale=scale)  # [B, N, T]
            gen.collect(probs, runtime.text_weights(text_valid, probs.shape[-1], probs.device))
    return attend(runtime, proc.name, query, key, value, mask, scale, rewrite=proc.rewrite_padding,
                  stock_mask=stock_mask or (lambda: mask), compact=compact, processor=proc)  # [B, L, H, d]


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
