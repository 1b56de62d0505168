"""Attention masks: the exact-elision criterion and exact mask-free rewrites.

Model-agnostic. Softmax is invariant to adding a constant to a whole row, so a mask whose
every query row is one finite constant changes nothing and can be dropped. Key-padding masks
(the same valid key set for every query of a sample) change the result, but attending to only
the valid keys is exactly the same computation without a mask.

Reading mask values is a host synchronisation: the functions here that read values are meant
to run once per model forward on a compact mask, never per attention call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from safe_dit.config import SafeDitError


def validate_mask(mask: torch.Tensor, query: torch.Tensor, key: torch.Tensor) -> None:
    """Check that ``mask`` is an SDPA-compatible mask for ``query``/``key`` (no value reads)."""
    if not isinstance(mask, torch.Tensor):
        raise SafeDitError(f"attention mask must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool and not mask.dtype.is_floating_point:
        raise SafeDitError(
            f"attention mask must be bool (True = attend) or floating (additive), got {mask.dtype}"
        )
    b, h, lq, _ = query.shape
    lk = key.shape[-2]
    full = (b, h, lq, lk)
    if mask.dim() > 4 or mask.dim() < 1:
        raise SafeDitError(f"attention mask must have 1 to 4 dims, got shape {tuple(mask.shape)}")
    shape = (1,) * (4 - mask.dim()) + tuple(mask.shape)
    for got, want in zip(shape, full):
        if got not in (1, want):
            raise SafeDitError(
                f"attention mask of shape {tuple(mask.shape)} does not broadcast to "
                f"[B, H, Lq, Lk] = {list(full)}"
            )


def _as4d(mask: torch.Tensor) -> torch.Tensor:
    return mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))


def _check_nan(mask: torch.Tensor) -> None:
    if mask.dtype.is_floating_point and bool(torch.isnan(mask).any()):
        raise SafeDitError("attention mask contains NaN; refusing to guess what it means")


# Largest |row constant| that is elided. SDPA adds the mask to the logits in float32 (or
# wider), so a larger constant rounds the logits' low bits away: a row of finfo.min (the usual
# "masked" sentinel) makes that row uniform, no longer the mask-free result. With |c| <= 2**14
# the rounding of ``logit + c`` in float32 stays near 2**-10 (diffusers' -10000 still qualifies).
MAX_ELIDED_ROW_CONSTANT = 2.0**14


def is_row_constant(mask: torch.Tensor) -> bool:
    """True iff every query row of ``mask`` adds one finite constant to the logits.

    A bool row qualifies only if it is all True; an all-False row turns the output into
    NaN/undefined, which differs from the mask-free result. An additive constant also has to be
    small enough not to swamp the logits (``MAX_ELIDED_ROW_CONSTANT``). Reads values (host sync).
    """
    _check_nan(mask)
    m = _as4d(mask)
    if m.dtype == torch.bool:
        return bool(m.all())
    if not bool(torch.isfinite(m).all()):
        return False
    if not bool((m == m[..., :1]).all()):
        return False
    return bool((m.abs() <= MAX_ELIDED_ROW_CONSTANT).all())


@dataclass(frozen=True)
class _Group:
    samples: torch.Tensor | None  # [G] batch indices, None = the whole batch in order
    keys: torch.Tensor | slice  # valid key positions: a prefix slice or an index tensor [L]


@dataclass(frozen=True)
class KeyPaddingPlan:
    """Exact mask-free execution of a key-padding mask.

    ``groups`` partition the batch by their valid key set; each group becomes one SDPA call on
    its valid keys only. An empty tuple means the mask is all-valid: drop it.
    """

    batch: int
    groups: tuple[_Group, ...]
    verdict: str  # "elided: all-valid", "rewritten: slice", "rewritten: gather", "rewritten: split-batch"

    @property
    def elide(self) -> bool:
        return not self.groups

    @staticmethod
    def from_key_mask(valid: torch.Tensor) -> "KeyPaddingPlan | None":
        """Plan for a compact key-padding mask ``valid`` [B, Lk] (True/nonzero = attend).

        Returns None when no exact rewrite exists (a sample with no valid key). Host sync.
        """
        if valid.dim() != 2:
            raise SafeDitError(f"key-padding mask must be [B, Lk], got shape {tuple(valid.shape)}")
        if valid.dtype.is_floating_point:
            _check_nan(valid)
        v = valid.bool().cpu()  # [B, Lk], the one host sync
        b, lk = v.shape
        if bool(v.all()):
            return KeyPaddingPlan(b, (), "elided: all-valid")
        counts = v.sum(1)
        if bool((counts == 0).any()):
            return None
        device = valid.device
        by_pattern: dict[bytes, list[int]] = {}
        for i in range(b):
            by_pattern.setdefault(v[i].numpy().tobytes(), []).append(i)
        groups = []
        gathered = False
        for members in by_pattern.values():
            row = v[members[0]]
            n = int(row.sum())
            if bool(row[:n].all()):
                keys: torch.Tensor | slice = slice(0, n)
            else:
                keys = row.nonzero().flatten().to(device)
                gathered = True
            samples = None if len(members) == b else torch.tensor(members, device=device)
            groups.append(_Group(samples, keys))
        if len(groups) > 1:
            verdict = "rewritten: split-batch"
        else:
            verdict = "rewritten: gather" if gathered else "rewritten: slice"
        return KeyPaddingPlan(b, tuple(groups), verdict)


def key_padding_form(mask: torch.Tensor, batch: int, key_len: int) -> torch.Tensor | None:
    """If a bool mask is the same for every head and query of a sample, return it as [B, Lk]."""
    if mask.dtype != torch.bool:
        return None
    m = _as4d(mask).expand(batch, -1, -1, key_len)  # [B, h, q, Lk]
    first = m[:, :1, :1, :]
    if not bool((m == first).all()):
        return None
    return first.reshape(batch, key_len)


# An additive key bias at or below this discards its key: the key's softmax weight is below e^-1000
# times a valid key's, which is exactly 0 in every float format unless the logits spread by more than
# ~900. diffusers' padding bias is -10000 (-9984 after bfloat16 rounding).
DISCARD_BIAS = -1000.0


# exp(x) is exactly 0 in float32 below about -103.97 (the smallest subnormal is e^-103.28): a discarded key whose
# logit sits this far below the row's maximum has exactly zero weight, as if it were not there.
EXP_UNDERFLOW = 110.0


def discarded_bias_max(mask: torch.Tensor, valid: torch.Tensor) -> float | None:
    """The largest additive bias among the keys ``valid`` [B, Lk] discards (None for bool masks or when none is
    discarded). Reads values (host sync; once per forward with the decision)."""
    if not mask.dtype.is_floating_point or mask.numel() != valid.numel():
        return None
    dropped = mask.reshape(valid.shape)[~valid.bool()]
    return float(dropped.max()) if dropped.numel() else None


def key_padding_from_bias(mask: torch.Tensor, batch: int) -> torch.Tensor | None:
    """The valid-key form [B, Lk] of a per-sample key mask ([B, Lk] or [B, 1, Lk]) that is bool
    (True = attend) or an additive bias holding only 0 (attend) and <= ``DISCARD_BIAS`` (discard);
    None for any other mask (it is semantic: keep it). Reads values (host sync)."""
    if mask.dim() not in (2, 3) or mask.shape[0] != batch or mask.numel() != batch * mask.shape[-1]:
        return None
    m = mask.reshape(batch, mask.shape[-1])  # [B, Lk]
    if m.dtype == torch.bool:
        return m
    if not m.dtype.is_floating_point:
        return None
    _check_nan(m)
    valid = m == 0
    return valid if bool((valid | (m <= DISCARD_BIAS)).all()) else None


def sdpa_with_plan(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    plan: KeyPaddingPlan,
    scale: float | None = None,
    attend=None,
    seq_dim: int = 2,
) -> torch.Tensor:
    """Run attention mask-free according to ``plan``; equal to SDPA with the planned-away mask.

    query [B, H, Lq, D], key/value [B, H, Lk, D] -> [B, H, Lq, Dv] (``seq_dim`` 2), or the
    [B, L, H, D] layout with ``seq_dim`` 1. ``attend(q, k, v)`` is the mask-free attention to use
    (default: torch SDPA with ``scale``). No host sync.
    """
    if attend is None:
        def attend(q, k, v):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale)
    if plan.elide:
        return attend(query, key, value)
    if len(plan.groups) == 1:
        g = plan.groups[0]
        return attend(query, _take_keys(key, g.keys, seq_dim), _take_keys(value, g.keys, seq_dim))
    out = query.new_empty(query.shape[:-1] + (value.shape[-1],))  # [B, H, Lq, Dv] / [B, Lq, H, Dv]
    for g in plan.groups:
        q = query.index_select(0, g.samples)
        k = _take_keys(key.index_select(0, g.samples), g.keys, seq_dim)
        v = _take_keys(value.index_select(0, g.samples), g.keys, seq_dim)
        out.index_copy_(0, g.samples, attend(q, k, v))
    return out


def _take_keys(t: torch.Tensor, keys: torch.Tensor | slice, dim: int = 2) -> torch.Tensor:
    if isinstance(keys, slice):
        return t[(slice(None),) * dim + (keys,)]
    return t.index_select(dim, keys)


@dataclass(frozen=True)
class MaskDecision:
    """What to do with one mask: drop it, rewrite it exactly, or pass it through unchanged."""

    verdict: str
    plan: KeyPaddingPlan | None = None
    # An additive bias rewrite drops keys whose bias is at most ``-discard_margin`` below the others': exact only
    # while the logits spread less than ``discard_margin - EXP_UNDERFLOW`` (checked per call, see engine.attend).
    discard_margin: float | None = None

    @property
    def keep(self) -> bool:
        return self.plan is None


def decide(mask: torch.Tensor, query: torch.Tensor, key: torch.Tensor, rewrite: bool = True) -> MaskDecision:
    """Decide by value, for a mask of unknown origin (host sync; call once per forward)."""
    validate_mask(mask, query, key)
    b, lk = query.shape[0], key.shape[-2]
    if is_row_constant(mask):
        return MaskDecision("elided: row-constant (by value)", KeyPaddingPlan(b, (), "elided: all-valid"))
    if rewrite:
        kp = key_padding_form(mask, b, lk)
        if kp is not None:
            plan = KeyPaddingPlan.from_key_mask(kp)
            if plan is not None:
                return MaskDecision(plan.verdict + " (by value)", plan)
    return MaskDecision("kept: semantic")


def attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
    rewrite: bool = True,
) -> torch.Tensor:
    """SDPA that drops redundant masks and rewrites padding masks exactly (decides by value).

    The standalone entry point for masks of unknown origin; model adapters decide once per
    forward instead and call :func:`sdpa_with_plan` per layer.
    """
    if mask is None:
        return torch.nn.functional.scaled_dot_product_attention(query, key, value, scale=scale)
    d = decide(mask, query, key, rewrite)
    if d.keep:
        # As 4-D: SDPA rejects a 1-D mask that validate_mask (and broadcasting) accepts.
        return torch.nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=_as4d(mask), scale=scale
        )
    return sdpa_with_plan(query, key, value, d.plan, scale)
