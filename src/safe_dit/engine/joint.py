"""Joint (MMDiT) attention for backbones whose image and text tokens share one sequence (SD3, FLUX).

Model-agnostic: an adapter's processor projects (and normalises, and rotates) the image and the text
parts, then hands both here. Text tokens are always computed in full; at selective steps the image
part holds only the sensitive rows, whose fresh K/V are written over the anchor's cached image K/V
(context rows keep the cache, RoPE already applied), so every query still sees every key. During
warm-up the image-query x text-key block of the joint softmax feeds PCSP.
"""

from __future__ import annotations

from typing import Callable

import torch

from safe_dit.engine.partition import joint_image_to_text_probs
from safe_dit.engine.schedule import SELECTIVE
from safe_dit.adapters.base import Runtime, attend

QKV = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def joint_attention(runtime: Runtime, name: str, layer: int, image: QKV, text: QKV | None, *, text_first: bool,
                    mask: torch.Tensor | None = None, stock_mask: Callable | None = None, compact: Callable | None = None,
                    rewrite: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """image q/k/v [B, n, H, d] (n = N, or K sensitive rows at selective steps), text q/k/v [B, T, H, d]
    or None (image-only attention) -> image rows [B, n, H, d], text rows [B, T, H, d] or None.

    ``text_first`` is the stock concatenation order ([text; image] in FLUX, [image; text] in SD3).
    ``mask`` (over the joint keys, as the stock processor would pass it) goes through ``attend``."""
    q_img, k_img, v_img = image
    gen = runtime.generation
    if gen is not None:
        if gen.kind == SELECTIVE:  # SRSU: fresh sensitive rows over the anchor's context K/V
            k_img, v_img = gen.merged_kv(name, k_img, v_img)  # [B, N, H, d]
        elif gen.refreshes_cache:
            gen.store_kv(name, k_img, v_img)
    parts = [(q_img, k_img, v_img)] if text is None else [text, (q_img, k_img, v_img)] if text_first \
        else [(q_img, k_img, v_img), text]
    query, key, value = (torch.cat([p[i].transpose(1, 2) for p in parts], dim=2) for i in range(3))  # [B, H, L, d]

    n_img, n_txt = q_img.shape[1], 0 if text is None else text[0].shape[1]
    if gen is not None and text is not None and gen.wants_probs(layer):  # PCSP (warm-up: n_img = N)
        text_keys = slice(0, n_txt) if text_first else slice(k_img.shape[1], k_img.shape[1] + n_txt)
        q_rows = query[:, :, n_txt:] if text_first else query[:, :, :n_img]  # [B, H, N, d]
        probs = joint_image_to_text_probs(q_rows, key, text_keys)  # [B, N, T]
        gen.collect(probs, runtime.text_weights(None, n_txt, probs.device))

    out = attend(runtime, name, query, key, value, mask, None, rewrite=rewrite,
                 stock_mask=stock_mask or (lambda: mask), compact=compact)  # [B, H, L, d]
    out = out.transpose(1, 2)  # [B, L, H, d]
    if text is None:
        return out, None
    if text_first:
        return out[:, n_txt:], out[:, :n_txt]
    return out[:, :n_img], out[:, n_img:]
