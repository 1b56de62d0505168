"""Mask elision and exact mask-free rewrites against an explicit float64 reference.

Every path of :func:`safe_dit.engine.masks.attention` (elide, slice, gather, split-batch, keep) is
compared with ``ref_attention``, written out by hand in float64. ``decide`` must name the path,
semantic masks must be kept, and malformed masks must raise ``SafeDitError``.

Fully masked rows: the reference gives NaN there (0/0). torch's SDPA (2.13, CPU) returns 0 for
such rows instead, so :func:`assert_matches_ref` requires the same rows to be "empty" in the
output (NaN or 0, whatever SDPA does with the mask) and never a real attention value.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from safe_dit.config import SafeDitError
from safe_dit.engine.masks import (
    MAX_ELIDED_ROW_CONSTANT,
    KeyPaddingPlan,
    attention,
    decide,
    is_row_constant,
    key_padding_form,
    sdpa_with_plan,
    validate_mask,
)

# float32 inputs: SDPA against the float64 reference of the same (float32) values.
F32_TOL = dict(atol=1e-5, rtol=1e-5)
# bfloat16 inputs: the output is rounded to bf16 (8-bit mantissa, relative step 2**-8 ~ 4e-3)
# and SDPA may round intermediates (probabilities) to bf16 as well; 2e-2 covers a few steps.
BF16_TOL = dict(atol=2e-2, rtol=2e-2)
TOL = {torch.float32: F32_TOL, torch.bfloat16: BF16_TOL}

ELIDED = "elided: row-constant (by value)"
SLICE = "rewritten: slice (by value)"
GATHER = "rewritten: gather (by value)"
SPLIT = "rewritten: split-batch (by value)"
KEPT = "kept: semantic"


# ----------------------------------------------------------------------------- reference


def ref_attention(q, k, v, mask=None, scale=None) -> torch.Tensor:
    """softmax(Q Kᵀ · scale + M) · V in float64, written out; an all -inf row gives NaN.

    q [B, H, Lq, D], k [B, H, Lk, D], v [B, H, Lk, Dv]; mask broadcastable to [B, H, Lq, Lk],
    bool (True = attend -> 0, False -> -inf) or additive (added as float64).
    """
    q, k, v = q.double(), k.double(), v.double()
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    logits = torch.einsum("bhqd,bhkd->bhqk", q, k) * scale  # [B, H, Lq, Lk]
    if mask is not None:
        if mask.dtype == torch.bool:
            add = torch.zeros(mask.shape, dtype=torch.float64)
            add = add.masked_fill(~mask, float("-inf"))
        else:
            add = mask.double()
        logits = logits + add  # broadcasts like SDPA (right-aligned)
    row_max = logits.amax(dim=-1, keepdim=True)  # [B, H, Lq, 1]; -inf for an all -inf row
    e = torch.exp(logits - row_max)  # NaN for an all -inf row (-inf - -inf)
    p = e / e.sum(dim=-1, keepdim=True)  # [B, H, Lq, Lk]
    return torch.einsum("bhqk,bhkd->bhqd", p, v)  # [B, H, Lq, Dv]


def assert_matches_ref(out: torch.Tensor, ref: torch.Tensor, atol: float, rtol: float) -> None:
    """``out`` equals the float64 reference; reference-NaN rows are empty rows in ``out``."""
    assert out.shape == ref.shape, (out.shape, ref.shape)
    out = out.double()
    nan = torch.isnan(ref)
    assert not torch.isnan(out[~nan]).any(), "NaN where the reference is finite"
    empty = out[nan]
    assert bool((torch.isnan(empty) | (empty == 0)).all()), (
        "a fully masked row produced a real attention value instead of SDPA's empty-row result"
    )
    torch.testing.assert_close(out[~nan], ref[~nan], atol=atol, rtol=rtol)


def make_qkv(b, h, lq, lk, d=8, dv=None, dtype=torch.float32, seed=0):
    """Random q/k/v with logits of order a few units (so masks visibly change the softmax)."""
    g = torch.Generator().manual_seed(seed)
    dv = d if dv is None else dv
    q = (torch.randn(b, h, lq, d, generator=g) * 1.5).to(dtype)  # [B, H, Lq, D]
    k = (torch.randn(b, h, lk, d, generator=g) * 1.5).to(dtype)  # [B, H, Lk, D]
    v = torch.randn(b, h, lk, dv, generator=g).to(dtype)  # [B, H, Lk, Dv]
    return q, k, v


def check(q, k, v, mask, verdict, scale=None, rewrite=True):
    """attention() under ``mask`` takes ``verdict`` and equals the reference; returns output."""
    d = decide(mask, q, k, rewrite)
    assert d.verdict == verdict
    assert d.keep == verdict.startswith("kept")
    out = attention(q, k, v, mask, scale=scale, rewrite=rewrite)
    assert out.dtype == q.dtype
    assert_matches_ref(out, ref_attention(q, k, v, mask, scale), **TOL[q.dtype])
    if d.keep:
        # Kept masks go to SDPA as they are: same numbers as calling SDPA directly.
        m4 = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
        assert torch.equal(
            out.nan_to_num(123.0),
            F.scaled_dot_product_attention(q, k, v, attn_mask=m4, scale=scale).nan_to_num(123.0),
        )
    elif d.plan.elide:
        # Elided: bit-for-bit the mask-free call.
        assert torch.equal(out, F.scaled_dot_product_attention(q, k, v, scale=scale))
    return out


SIZES = [  # (B, H, Lq, Lk)
    (1, 1, 1, 1),
    (2, 3, 7, 7),
    (1, 3, 33, 33),
    (2, 1, 33, 7),
    (2, 3, 1, 33),
]
DTYPES = [torch.float32, torch.bfloat16]


# ----------------------------------------------------------------------------- elision


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,h,lq,lk", SIZES)
@pytest.mark.parametrize("form", ["[Lk]", "[Lq,Lk]", "[B,1,1,Lk]", "[B,1,1,Lk]->expanded", "[B,H,Lq,Lk]"])
def test_all_true_bool_mask_is_elided(form, b, h, lq, lk, dtype):
    q, k, v = make_qkv(b, h, lq, lk, dtype=dtype, seed=lq * 100 + lk)
    mask = {
        "[Lk]": lambda: torch.ones(lk, dtype=torch.bool),
        "[Lq,Lk]": lambda: torch.ones(lq, lk, dtype=torch.bool),
        "[B,1,1,Lk]": lambda: torch.ones(b, 1, 1, lk, dtype=torch.bool),
        # What diffusers' Lumina-Next does: an all-ones [B, N] mask expanded per call.
        "[B,1,1,Lk]->expanded": lambda: torch.ones(b, lk, dtype=torch.bool)[:, None, None, :].expand(b, h, lq, lk),
        "[B,H,Lq,Lk]": lambda: torch.ones(b, h, lq, lk, dtype=torch.bool),
    }[form]()
    check(q, k, v, mask, ELIDED)
    check(q, k, v, mask, ELIDED, scale=0.3)
    check(q, k, v, mask, ELIDED, rewrite=False)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,h,lq,lk", SIZES)
def test_all_zero_additive_mask_is_elided(b, h, lq, lk, dtype):
    q, k, v = make_qkv(b, h, lq, lk, dtype=dtype, seed=7)
    for mask in (torch.zeros(b, h, lq, lk, dtype=dtype), torch.zeros(lk), torch.zeros(b, 1, lq, 1)):
        check(q, k, v, mask, ELIDED)


@pytest.mark.parametrize("b,h,lq,lk", SIZES)
def test_row_constant_additive_mask_is_elided(b, h, lq, lk):
    """A different finite constant per (sample, head, query) row, up to -1e4 and the bound."""
    q, k, v = make_qkv(b, h, lq, lk, seed=11)
    pool = torch.tensor([0.0, -1e4, 1e4, -3.5, 2.25, -MAX_ELIDED_ROW_CONSTANT, 1e-3, -0.0])
    idx = torch.arange(b * h * lq) % len(pool)
    consts = pool[idx].reshape(b, h, lq, 1)  # [B, H, Lq, 1]
    check(q, k, v, consts.expand(b, h, lq, lk).contiguous(), ELIDED)  # materialised
    check(q, k, v, consts, ELIDED)  # Lk broadcast
    check(q, k, v, consts.expand(b, h, lq, lk), ELIDED)  # expanded view


def test_row_constant_bf16_mask_with_bf16_inputs_is_elided():
    q, k, v = make_qkv(2, 3, 7, 9, dtype=torch.bfloat16, seed=3)
    consts = torch.tensor([-1e4, 5.0, 0.0]).repeat(14)[: 2 * 3 * 7].reshape(2, 3, 7, 1)
    check(q, k, v, consts.to(torch.bfloat16).expand(2, 3, 7, 9), ELIDED)


@pytest.mark.parametrize(
    "const",
    [torch.finfo(torch.float32).min, -1e30, -1e9, MAX_ELIDED_ROW_CONSTANT * 1.5, 1e8],
)
def test_huge_row_constant_is_kept(const):
    """A constant that swamps the logits is not a no-op for SDPA: keep it (regression).

    A row of finfo.min (the usual additive "masked" sentinel) makes SDPA's row uniform, which
    the float64 reference agrees with; dropping the mask would give real attention instead.
    """
    q, k, v = make_qkv(2, 2, 5, 6, seed=5)
    mask = torch.full((2, 2, 5, 6), const)
    assert not is_row_constant(mask)
    out = check(q, k, v, mask, KEPT) if abs(const) > 1e20 else None
    if out is None:  # SDPA in float32 vs the float64 reference differ by design here; only keep.
        d = decide(mask, q, k)
        assert d.keep and d.verdict == KEPT
        out = attention(q, k, v, mask)
        assert torch.equal(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    if abs(const) > 1e20:
        uniform = v.mean(dim=2, keepdim=True).expand_as(out)  # [B, H, Lq, Dv]
        torch.testing.assert_close(out, uniform, **F32_TOL)


# ----------------------------------------------------------------------------- rewrites


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,h,lq,lk", [(1, 1, 1, 7), (2, 3, 7, 7), (1, 3, 33, 33), (2, 1, 7, 33)])
def test_key_padding_equal_lengths_is_sliced(b, h, lq, lk, dtype):
    q, k, v = make_qkv(b, h, lq, lk, dtype=dtype, seed=13)
    n = max(1, lk - 3)
    valid = torch.zeros(b, lk, dtype=torch.bool)
    valid[:, :n] = True
    for mask in (
        valid[:, None, None, :],  # [B, 1, 1, Lk]
        valid[:, None, None, :].expand(b, h, lq, lk),  # expanded per call
        valid[0],  # [Lk]
        valid[0].expand(lq, lk),  # [Lq, Lk] with identical rows
    ):
        verdict = ELIDED if n == lk else SLICE
        check(q, k, v, mask, verdict)
        if verdict == SLICE:
            assert decide(mask, q, k).plan.groups[0].keys == slice(0, n)
            check(q, k, v, mask, KEPT, rewrite=False)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("h,lq,lk", [(1, 1, 7), (3, 7, 7), (1, 33, 33), (3, 5, 33)])
def test_key_padding_per_sample_lengths_is_split(h, lq, lk, dtype):
    lengths = [lk, 1, lk - 2, 1]  # samples 1 and 3 share a pattern, 0 is all-valid
    b = len(lengths)
    q, k, v = make_qkv(b, h, lq, lk, dtype=dtype, seed=17)
    valid = torch.arange(lk)[None, :] < torch.tensor(lengths)[:, None]  # [B, Lk]
    mask = valid[:, None, None, :].expand(b, h, lq, lk)
    check(q, k, v, mask, SPLIT)
    plan = decide(mask, q, k).plan
    assert sorted(sorted(g.samples.tolist()) for g in plan.groups) == [[0], [1, 3], [2]]
    # Two samples only, batch 2 (the CFG batch): lengths differ.
    check(q[:2], k[:2], v[:2], mask[:2], SPLIT)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,h,lq,lk", [(1, 1, 1, 7), (2, 3, 7, 7), (2, 1, 33, 33)])
def test_key_padding_non_prefix_is_gathered(b, h, lq, lk, dtype):
    q, k, v = make_qkv(b, h, lq, lk, dtype=dtype, seed=19)
    row = torch.arange(lk) % 3 != 1  # [Lk], holes inside
    row[0] = False
    mask = row.expand(b, 1, 1, lk)
    check(q, k, v, mask, GATHER)
    keys = decide(mask, q, k).plan.groups[0].keys
    assert torch.equal(keys, row.nonzero().flatten())
    if b > 1:  # different non-prefix patterns per sample: split-batch with gathered keys
        mask2 = mask.clone()
        mask2[1, 0, 0, -1] = not bool(mask2[1, 0, 0, -1])
        check(q, k, v, mask2, SPLIT)


def test_single_valid_key():
    q, k, v = make_qkv(2, 3, 7, 7, seed=23)
    valid = torch.zeros(2, 1, 1, 7, dtype=torch.bool)
    valid[:, :, :, 4] = True  # the same single non-prefix key
    out = check(q, k, v, valid, GATHER)
    torch.testing.assert_close(out, v[:, :, 4:5].expand_as(out), **F32_TOL)


# ----------------------------------------------------------------------------- kept masks


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,h,lq,lk", [(1, 1, 7, 7), (2, 3, 7, 7), (2, 1, 33, 33), (1, 3, 7, 33), (2, 3, 33, 7)])
def test_semantic_masks_are_kept(b, h, lq, lk, dtype):
    q, k, v = make_qkv(b, h, lq, lk, dtype=dtype, seed=29)
    g = torch.Generator().manual_seed(31)
    causal = torch.ones(lq, lk, dtype=torch.bool).tril(diagonal=lk - lq)  # [Lq, Lk]
    block = (torch.arange(lq)[:, None] * 3 // lq) == (torch.arange(lk)[None, :] * 3 // lk)
    rand = torch.rand(b, h, lq, lk, generator=g) < 0.6
    rand[..., 0] = True  # every row has a key ...
    rand[..., 0, :] = ~rand[..., 1 % lq, :] | (torch.arange(lk) == 0)  # ... and rows differ
    bias = (torch.randn(b, 1, lq, lk, generator=g) * 2).to(dtype)  # non-uniform additive
    masks = {"causal": causal, "block-diagonal": block, "random": rand, "bias": bias}
    if lq > 1:
        masks["causal 4-D"] = causal.expand(b, h, lq, lk)
    for name, mask in masks.items():
        check(q, k, v, mask, KEPT)


@pytest.mark.parametrize("b,h,lq,lk", [(2, 1, 7, 7), (2, 3, 1, 33), (2, 3, 33, 7)])
def test_sample_with_no_valid_key_is_kept(b, h, lq, lk):
    """Key padding where one sample has no valid key: no exact mask-free form, keep."""
    q, k, v = make_qkv(b, h, lq, lk, seed=37)
    valid = torch.ones(b, lk, dtype=torch.bool)
    valid[1] = False
    valid[0, lk // 2 :] = False
    mask = valid[:, None, None, :]
    assert KeyPaddingPlan.from_key_mask(valid) is None
    out = check(q, k, v, mask, KEPT)
    assert torch.isnan(ref_attention(q, k, v, mask)[1]).all()
    assert not torch.isnan(out[0]).any()


def test_all_false_rows_and_neg_inf_rows_are_kept():
    q, k, v = make_qkv(2, 3, 7, 9, seed=41)
    bool_mask = torch.ones(2, 3, 7, 9, dtype=torch.bool)
    bool_mask[1, 2, 3] = False  # one query row attends to nothing
    check(q, k, v, bool_mask, KEPT)
    add = torch.zeros(2, 3, 7, 9)
    add[0, :, 5] = float("-inf")  # an additive row of -inf
    check(q, k, v, add, KEPT)
    add2 = torch.zeros(7, 9)
    add2[:, 2] = float("-inf")  # -inf entries (additive key padding) are kept as shipped
    check(q, k, v, add2, KEPT)
    allfalse = torch.zeros(9, dtype=torch.bool)  # [Lk], nothing valid anywhere
    check(q, k, v, allfalse, KEPT)


def test_near_constant_rows_are_kept():
    q, k, v = make_qkv(2, 3, 7, 9, seed=43)
    for c, delta in [(0.0, 1e-3), (-1e4, 1.0), (5.0, -0.5), (0.0, 1e-30)]:
        mask = torch.full((2, 3, 7, 9), c)
        mask[1, 0, 6, 8] = c + delta
        assert bool((mask != mask[..., :1]).any())
        d = decide(mask, q, k)
        assert d.keep and d.verdict == KEPT
        out = attention(q, k, v, mask)
        assert torch.equal(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
        # SDPA adds the mask in float32: |c| * eps32 of rounding in the logits.
        tol = 1e-5 + 4 * abs(c) * torch.finfo(torch.float32).eps
        assert_matches_ref(out, ref_attention(q, k, v, mask), atol=tol, rtol=1e-5)


def test_kept_one_dim_masks_reach_sdpa():
    """1-D masks pass validation; kept ones must not crash SDPA (which rejects 1-D masks)."""
    q, k, v = make_qkv(2, 3, 7, 9, seed=47)
    bias = torch.linspace(-2, 2, 9)  # [Lk], non-uniform
    check(q, k, v, bias, KEPT)
    pad = torch.arange(9) < 4  # [Lk] prefix padding, kept when rewriting is off
    check(q, k, v, pad, KEPT, rewrite=False)


# ----------------------------------------------------------------------------- verdict table


@pytest.mark.parametrize(
    "name,build,verdict",
    [
        ("all-true [Lk]", lambda b, h, lq, lk: torch.ones(lk, dtype=torch.bool), ELIDED),
        ("zeros [B,H,Lq,Lk]", lambda b, h, lq, lk: torch.zeros(b, h, lq, lk), ELIDED),
        ("row const", lambda b, h, lq, lk: torch.arange(lq, dtype=torch.float32)[:, None].expand(lq, lk) * -7, ELIDED),
        ("prefix equal", lambda b, h, lq, lk: (torch.arange(lk) < 3).expand(b, 1, 1, lk), SLICE),
        ("prefix per sample",
         lambda b, h, lq, lk: torch.arange(lk)[None, None, None, :] < torch.tensor([3, 5]).view(2, 1, 1, 1), SPLIT),
        ("non-prefix", lambda b, h, lq, lk: (torch.arange(lk) % 2 == 1).expand(b, h, 1, lk), GATHER),
        ("causal", lambda b, h, lq, lk: torch.ones(lq, lk, dtype=torch.bool).tril(), KEPT),
        ("all false", lambda b, h, lq, lk: torch.zeros(b, 1, 1, lk, dtype=torch.bool), KEPT),
        ("-inf padding", lambda b, h, lq, lk: torch.where(torch.arange(lk) < 3, 0.0, float("-inf")), KEPT),
        ("bias", lambda b, h, lq, lk: torch.arange(lk, dtype=torch.float32) * 0.5, KEPT),
    ],
)
def test_decide_verdicts(name, build, verdict):
    b, h, lq, lk = 2, 3, 7, 7
    q, k, v = make_qkv(b, h, lq, lk, seed=53)
    check(q, k, v, build(b, h, lq, lk), verdict)


# ----------------------------------------------------------------------------- errors


def test_errors_are_safedit_errors():
    q, k, v = make_qkv(2, 3, 7, 9, seed=59)
    nan = torch.zeros(2, 3, 7, 9)
    nan[1, 2, 3, 4] = float("nan")
    bad = {
        "NaN": nan,
        "NaN [Lk]": torch.tensor([0.0] * 8 + [float("nan")]),
        "all NaN": torch.full((7, 9), float("nan")),
        "int64": torch.ones(2, 3, 7, 9, dtype=torch.int64),
        "int32": torch.zeros(9, dtype=torch.int32),
        "uint8": torch.ones(7, 9, dtype=torch.uint8),
        "complex": torch.zeros(7, 9, dtype=torch.complex64),
        "wrong Lk": torch.ones(2, 1, 1, 8, dtype=torch.bool),
        "wrong Lq": torch.ones(6, 9, dtype=torch.bool),
        "wrong B": torch.ones(3, 1, 1, 9, dtype=torch.bool),
        "wrong H": torch.zeros(2, 2, 7, 9),
        "5-D": torch.ones(1, 2, 3, 7, 9, dtype=torch.bool),
        "0-D": torch.tensor(True),
    }
    for name, mask in bad.items():
        with pytest.raises(SafeDitError):
            decide(mask, q, k)
        with pytest.raises(SafeDitError):
            attention(q, k, v, mask)
    for obj in ([[True] * 9] * 7, 1.0, "mask", torch.ones(9, dtype=torch.bool).numpy()):
        with pytest.raises(SafeDitError, match="torch.Tensor"):
            validate_mask(obj, q, k)
        with pytest.raises(SafeDitError):
            attention(q, k, v, obj)
    with pytest.raises(SafeDitError, match="NaN"):
        is_row_constant(nan)
    with pytest.raises(SafeDitError, match="Lk"):
        KeyPaddingPlan.from_key_mask(torch.ones(2, 1, 9, dtype=torch.bool))
    with pytest.raises(SafeDitError, match="NaN"):
        KeyPaddingPlan.from_key_mask(torch.tensor([[1.0, float("nan")]]))


def test_error_messages_are_clear():
    q, k, v = make_qkv(2, 3, 7, 9)
    with pytest.raises(SafeDitError, match=r"does not broadcast to \[B, H, Lq, Lk\] = \[2, 3, 7, 9\]"):
        attention(q, k, v, torch.ones(2, 1, 1, 8, dtype=torch.bool))
    with pytest.raises(SafeDitError, match="1 to 4 dims"):
        attention(q, k, v, torch.ones(1, 2, 3, 7, 9, dtype=torch.bool))
    with pytest.raises(SafeDitError, match="bool .* or floating"):
        attention(q, k, v, torch.ones(7, 9, dtype=torch.int64))


# ----------------------------------------------------------------------------- building blocks


def test_is_row_constant_units():
    assert is_row_constant(torch.ones(3, dtype=torch.bool))
    assert not is_row_constant(torch.tensor([True, False]))
    assert is_row_constant(torch.tensor([[1.0, 1.0], [-2.0, -2.0]]))
    assert not is_row_constant(torch.tensor([[1.0, 1.0], [-2.0, -2.5]]))
    assert not is_row_constant(torch.tensor([float("-inf")] * 3))
    assert not is_row_constant(torch.tensor([float("inf")] * 3))
    assert is_row_constant(torch.full((2, 3), -MAX_ELIDED_ROW_CONSTANT))
    assert not is_row_constant(torch.full((2, 3), torch.finfo(torch.float32).min))


def test_key_padding_form():
    m = torch.tensor([True, True, False])[None, None, None, :].expand(2, 3, 4, 3)
    assert torch.equal(key_padding_form(m, 2, 3), torch.tensor([[True, True, False]] * 2))
    varying = m.clone()
    varying[1, 2, 3, 2] = True
    assert key_padding_form(varying, 2, 3) is None
    assert key_padding_form(torch.zeros(4, 3), 2, 3) is None  # additive: not a padding form


@pytest.mark.parametrize("dtype", [torch.bool, torch.int64, torch.float32])
def test_key_padding_plan_direct(dtype):
    """[B, Lk] validity (True/nonzero = attend), as adapters pass it, then sdpa_with_plan."""
    q, k, v = make_qkv(3, 2, 5, 9, dv=4, seed=61)
    valid = torch.tensor(
        [[1] * 9, [1] * 4 + [0] * 5, [0, 1, 1, 0, 1, 0, 0, 0, 1]], dtype=torch.int64
    ).to(dtype)
    plan = KeyPaddingPlan.from_key_mask(valid)
    assert plan.verdict == "rewritten: split-batch" and not plan.elide and plan.batch == 3
    mask = valid.bool()[:, None, None, :]
    for scale in (None, 0.7):
        out = sdpa_with_plan(q, k, v, plan, scale)
        assert_matches_ref(out, ref_attention(q, k, v, mask, scale), **F32_TOL)
    full = KeyPaddingPlan.from_key_mask(torch.ones(3, 9, dtype=dtype))
    assert full.elide and full.verdict == "elided: all-valid"
    assert torch.equal(sdpa_with_plan(q, k, v, full), F.scaled_dot_product_attention(q, k, v))
    none = valid.clone()
    none[2] = 0
    assert KeyPaddingPlan.from_key_mask(none) is None
