"""Row gathers and scatters of SRSU, and the polynomial extrapolation of the forecasts: tensor helpers that know
no model and no schedule."""

from __future__ import annotations

import torch


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [B, N, ...], index [B, K] -> [B, K, ...]. A batch-1 x is broadcast to index's batch."""
    if x.shape[0] != index.shape[0]:
        x = x.expand(index.shape[0], *x.shape[1:])
    idx = index.view(*index.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:])
    return torch.gather(x, 1, idx)


def _row_index(index: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """index [B, K] broadcast (a view, no copy) over the trailing dims of ``like`` [B, K, ...]."""
    return index.view(*index.shape, *([1] * (like.dim() - 2))).expand(-1, -1, *like.shape[2:])


def extrapolation_weights(nodes: list[float], x: float) -> list[float]:
    """Lagrange weights w_j with sum_j w_j f(nodes[j]) the polynomial through the points, evaluated at x
    (one node: 1; two: the line through both). Invariant under affine maps of the variable, so a step's
    timestep works in any pipeline's convention."""
    out = []
    for j, xj in enumerate(nodes):
        w = 1.0
        for m, xm in enumerate(nodes):
            if m != j:
                w *= (x - xm) / (xj - xm)
        out.append(w)
    return out


def combine(tensors: list[torch.Tensor], weights) -> torch.Tensor:
    """sum_j weights[j] * tensors[j], as a new tensor. ``weights``: Python floats, or a 1-D tensor (under
    torch.compile: graph inputs, so a new step's weights do not recompile the graph)."""
    out = tensors[-1] * weights[-1]
    for j, t in enumerate(tensors[:-1]):
        if isinstance(weights, torch.Tensor):
            out.add_(t * weights[j].to(t.dtype))
        else:
            out.add_(t, alpha=weights[j])
    return out


def scatter_rows(base: torch.Tensor, index: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """A copy of base [B, N, ...] with rows [B, K, ...] written at index [B, K]."""
    return base.scatter(1, _row_index(index, rows), rows.to(base.dtype))
