"""PCSP: prompt-conditioned sensitive-token partition from image->text attention.

Model-agnostic: adapters hand in per-block query/key projections; everything here works on
[B, H, N, T] probabilities and [B, N] scores on a token grid of rank 2 (h, w) or 3 (frames, h, w), as the
adapter declares it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def image_to_text_probs(
    query: torch.Tensor, key: torch.Tensor, key_valid: torch.Tensor | None, scale: float | None = None
) -> torch.Tensor:
    """softmax(q kᵀ·scale) over the valid text keys, averaged over heads: [B, N, T].

    query [B, H, N, d], key [B, H, T, d], key_valid [B, T] bool. Computed on its own (small N x T)
    so that the main attention stays a mask-free SDPA call.
    """
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    logits = torch.einsum("bhnd,bhtd->bhnt", query.float(), key.float()) * scale  # [B, H, N, T]
    if key_valid is not None:
        logits = logits.masked_fill(~key_valid[:, None, None, :], float("-inf"))
    return logits.softmax(-1).mean(1)  # [B, N, T]


def joint_image_to_text_probs(query: torch.Tensor, key: torch.Tensor, text: slice,
                              scale: float | None = None, chunk_bytes: int = 64 * 2**20) -> torch.Tensor:
    """The image-query x text-key block of a *joint* attention's probabilities, averaged over heads: [B, N, T].

    query [B, H, N, d] (image queries), key [B, H, L, d] (the whole joint sequence, image and text keys),
    ``text`` the text key positions. Each row is normalised over all L keys, as the model attends:
    p_it = m_i * softmax_t(q_i k_t), where the text mass m_i = sum_t p_it is read from one extra
    mask-free SDPA call whose value is the text indicator (flash-eligible: same head dim as q/k), and the
    N x T softmax over text keys is computed on its own. Exact, and never an N x L matrix; heads are taken
    a few at a time so that the float32 [B, h, N, T] block stays under ``chunk_bytes`` (T is 333 in SD3,
    512 in FLUX)."""
    b, h, n, d = query.shape
    t = len(range(key.shape[2])[text])
    scale = d ** -0.5 if scale is None else scale
    step = max(1, min(h, chunk_bytes // max(1, b * n * t * 4)))
    indicator = torch.zeros(b, 1, key.shape[2], d, dtype=query.dtype, device=query.device)  # [B, 1, L, d]
    indicator[:, :, text, 0] = 1
    total = torch.zeros(b, n, t, device=query.device)
    for h0 in range(0, h, step):
        q, k = query[:, h0:h0 + step], key[:, h0:h0 + step]  # [B, h', N, d], [B, h', L, d]
        ind = indicator.expand(-1, q.shape[1], -1, -1)
        mass = F.scaled_dot_product_attention(q, k, ind, scale=scale)[..., 0].float()  # [B, h', N]
        logits = torch.einsum("bhnd,bhtd->bhnt", q.float(), k[:, :, text].float()) * scale  # [B, h', N, T]
        total += (mass[..., None] * logits.softmax(-1)).sum(1)
    return total / h  # [B, N, T]


def joint_text_probs_from_lse(query: torch.Tensor, key: torch.Tensor, text: slice, lse: torch.Tensor,
                              scale: float | None = None, chunk_bytes: int = 64 * 2**20) -> torch.Tensor:
    """The same [B, N, T] block as :func:`joint_image_to_text_probs`, given the log-sum-exp of each image query's
    logits over all L keys (``lse`` [B, H, N], which a flash kernel returns with the attention itself):
    p_it = exp(s q_i k_t - lse_i), averaged over heads. No second pass over the L keys."""
    b, h, n, d = query.shape
    t = len(range(key.shape[2])[text])
    scale = d ** -0.5 if scale is None else scale
    step = max(1, min(h, chunk_bytes // max(1, b * n * t * 4)))
    total = torch.zeros(b, n, t, device=query.device)
    for h0 in range(0, h, step):
        q, k = query[:, h0:h0 + step].float(), key[:, h0:h0 + step, text].float()  # [B, h', N, d], [B, h', T, d]
        logits = torch.einsum("bhnd,bhtd->bhnt", q, k) * scale  # [B, h', N, T]
        total += (logits - lse[:, h0:h0 + step, :, None].float()).exp().sum(1)
    return total / h  # [B, N, T]


class SensitivityAccumulator:
    """Running mean over blocks and warm-up steps of each image token's attention to the prompt.

    ``text_weights`` [B, T] is 0 for padding and special tokens (BOS/CLS/SEP), else the word's
    importance (1 by default): score_i = sum_t w_t p_it, the attention mass on the prompt's
    content words."""

    def __init__(self) -> None:
        self.total: torch.Tensor | None = None  # [B, N]
        self.count = 0

    def add(self, probs: torch.Tensor, text_weights: torch.Tensor) -> None:
        score = (probs * text_weights[:, None, :].to(probs.dtype)).sum(-1)  # [B, N]
        self.total = score if self.total is None else self.total + score
        self.count += 1

    def mean(self) -> torch.Tensor:
        if self.total is None:
            raise RuntimeError("no image->text attention was collected during warm-up")
        return self.total / self.count


def normalize(score: torch.Tensor) -> torch.Tensor:
    """Per-sample min-max to [0, 1] ([B, N]); a flat map becomes all zeros."""
    lo = score.amin(1, keepdim=True)
    hi = score.amax(1, keepdim=True)
    return (score - lo) / (hi - lo).clamp_min(1e-12)


def smooth(score: torch.Tensor, grid: tuple[int, ...], radius: int = 1) -> torch.Tensor:
    """Box-smooth a [B, N] map on its token grid, (h, w) or (f, h, w) (N = the grid's product, row-major), edges
    renormalised. The box is ``2 * radius + 1`` tokens along every axis of the grid."""
    if radius <= 0:
        return score
    if len(grid) not in (2, 3):
        raise ValueError(f"token grids have rank 2 or 3, got {tuple(grid)}")
    pool = F.avg_pool2d if len(grid) == 2 else F.avg_pool3d
    x = score.float().view(-1, 1, *grid)  # [B, 1, (f,) h, w]
    k = 2 * radius + 1
    pad = (radius,) * (2 * len(grid))  # zero padding made explicit: the pooling kernels refuse a box wider than
    num = pool(F.pad(x, pad), k, stride=1)  # an axis (a video of 2 latent frames), however padded
    den = pool(F.pad(torch.ones_like(x), pad), k, stride=1)
    return (num / den).view(score.shape[0], math.prod(grid)).to(score.dtype)


def sensitivity_map(score: torch.Tensor, grid: tuple[int, ...], radius: int = 1) -> torch.Tensor:
    """Normalised, smoothed, renormalised sensitivity s in [0, 1], [B, N]."""
    return normalize(smooth(normalize(score), grid, radius))


def sensitive_count(n: int, keep_ratio: float) -> int:
    """K = ceil(keep_ratio * N), at least 1: how many tokens every partition marks sensitive."""
    return max(1, min(n, int(-(-keep_ratio * n // 1))))


def select_sensitive(sensitivity: torch.Tensor, keep_ratio: float) -> torch.Tensor:
    """Indices [B, K] (ascending) of the top ``keep_ratio`` tokens; K = ceil(keep_ratio * N) >= 1."""
    b, n = sensitivity.shape
    k = sensitive_count(n, keep_ratio)
    # stable tie-break by position keeps the partition deterministic
    order = torch.argsort(sensitivity, dim=1, descending=True, stable=True)[:, :k]
    return order.sort(dim=1).values


def prompt_free_partition(kind: str, batch: int, n: int, keep_ratio: float, seed: int = 0) -> torch.Tensor:
    """The PCSP ablations: K = ``sensitive_count(n, keep_ratio)`` tokens chosen without the prompt,
    the same for every sample, ascending indices [B, K]. ``"uniform"``: evenly strided over the
    row-major token order (floor(i*N/K)); ``"random"``: a seeded random subset."""
    k = sensitive_count(n, keep_ratio)
    if kind == "uniform":
        index = torch.div(torch.arange(k) * n, k, rounding_mode="floor")
    elif kind == "random":
        index = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k].sort().values
    else:
        raise ValueError(f"unknown prompt-free partition {kind!r}")
    return index.expand(batch, k).contiguous()
