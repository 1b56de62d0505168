"""The census's spy on SDPA and its mask kinds: what a mask, as SDPA receives it, means for safe-dit.

* ``none``; ``all-valid`` (an all-True bool mask, an all-zero bias): removable exactly;
* ``row-constant`` (every query row adds one finite constant): removable exactly;
* ``key-padding`` (the same valid keys for every head and query of a sample): rewritable exactly into
  mask-free calls (slice keys, split the batch by length);
* ``pair`` (a bool self-attention mask [B, 1|H, S, S] built from one validity vector v: every valid query row
  sees exactly the valid keys v, a padding query row a subset of them or none, as HunyuanVideo's m_i & m_j):
  rewritable exactly, the valid rows are key padding and no valid row reads a padding row's output;
* ``rank-1 bias`` (u_i v_j, e.g. Chroma's float m_i m_j): removable exactly, one extra q/k channel carries it;
* ``other`` (anything else: query x key masks, biases that are no padding, a 0/1 float mask used as a
  bias): semantic, kept.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode


class SdpaCensus(TorchFunctionMode):
    """Records q/k shapes and the mask of every SDPA call (keyword or positional, as diffusers' backends call it)."""

    def __init__(self):
        super().__init__()
        self.calls: list[dict] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            named = dict(zip(("query", "key", "value", "attn_mask"), args)) | kwargs
            self.calls.append(describe_call(named["query"], named["key"], named.get("attn_mask"),
                                            bool(named.get("enable_gqa", False))))
        return func(*args, **kwargs)


def mask_kind(mask: torch.Tensor | None, q_shape, k_shape) -> str:
    """none / all-valid / row-constant / key-padding / pair / rank-1 bias / other, for a mask as SDPA receives it
    (q [B, H, Lq, d], k [B, Hk, Lk, d]). Reads values: for the census, never on a hot path. A rank-1 bias
    u_i v_j (Chroma's float m_i m_j) is exactly removable too: one extra q/k channel carries it."""
    if mask is None:
        return "none"
    b, lq, lk = q_shape[0], q_shape[2], k_shape[2]
    m = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape)).expand(b, -1, lq, lk)  # [B, h|1, Lq, Lk]
    if m.dtype == torch.bool:
        if bool(m.all()):
            return "all-valid"
        first = m[:, :1, :1, :]
        if bool((m == first).all()) and bool(first.any(-1).all()):
            return "key-padding"
        return "pair" if _pair(m) else "other"
    m = m.float()
    if not bool(torch.isfinite(m).all()) and bool(torch.isnan(m).any()):
        return "other"
    if bool((m == 0).all()):
        return "all-valid"
    finite = torch.isfinite(m).all()
    if bool(finite) and bool((m == m[..., :1]).all()) and float(m.abs().max()) <= 2.0 ** 14:
        return "row-constant"
    first = m[:, :1, :1, :]
    padding = (first == 0) | (first <= -1000)
    if bool((m == first).all()) and bool(padding.all()) and bool((first == 0).any(-1).all()):
        return "key-padding"
    if bool(finite) and _rank_one_per_sample(m):
        return "rank-1 bias"
    return "other"


def _pair(m: torch.Tensor) -> bool:
    """m bool [B, h, S, S]: the same for every head, and per sample one validity vector v = diag(m) such that the
    valid rows equal v (at least one valid key) and the padding rows are subsets of v."""
    if m.shape[-1] != m.shape[-2] or not bool((m == m[:, :1]).all()):
        return False
    for sample in m[:, 0]:  # [S, S]
        v = sample.diagonal()
        if not bool(v.any()) or not bool((sample[v] == v).all()) or bool((sample[~v] & ~v).any()):
            return False
    return True


def _rank_one_per_sample(m: torch.Tensor) -> bool:
    """m [B, h, Lq, Lk] finite: the same [Lq, Lk] matrix for every head of a sample, and it is u v^T."""
    if not bool((m == m[:, :1]).all()):
        return False
    for sample in m[:, 0].double():  # [Lq, Lk]
        i, j = divmod(int(sample.abs().argmax()), sample.shape[1])
        outer = sample[:, j:j + 1] * sample[i:i + 1, :] / sample[i, j]
        if not torch.allclose(outer, sample, rtol=0, atol=1e-6 * float(sample.abs().max())):
            return False
    return True


def describe_call(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, gqa: bool) -> dict:
    kind = mask_kind(mask, q.shape, k.shape)
    out = {"q": list(q.shape), "k": list(k.shape), "kind": kind, "mask_shape": None, "mask_dtype": None,
           "valid_key_fraction": None}
    if mask is not None:
        out["mask_shape"], out["mask_dtype"] = list(mask.shape), str(mask.dtype).replace("torch.", "")
        if kind == "key-padding":
            m = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
            first = m[:, 0, 0, :] if m.dtype == torch.bool else m[:, 0, 0, :] == 0
            out["valid_key_fraction"] = round(float(first.float().mean()), 3)
    return out
