"""The elision criterion and every exact rewrite against an explicit float64 reference."""

from __future__ import annotations

import pytest
import torch

from safe_dit.config import SafeDitError
from safe_dit.masks import KeyPaddingPlan, attention, decide, is_row_constant, sdpa_with_plan, validate_mask


def ref_attention(q, k, v, mask=None, scale=None):
    """softmax(q kᵀ·scale + M) v in float64, written out; a fully masked row gives NaN."""
    q, k, v = q.double(), k.double(), v.double()
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = q @ k.transpose(-1, -2) * scale  # [B, H, Lq, Lk]
    if mask is not None:
        if mask.dtype == torch.bool:
            bias = torch.zeros(mask.shape, dtype=torch.float64).masked_fill(~mask, float("-inf"))
        else:
            bias = mask.double()
        logits = logits + bias
    m = logits.amax(-1, keepdim=True)
    e = torch.exp(logits - m)
    return (e / e.sum(-1, keepdim=True)) @ v


def qkv(b=2, h=3, lq=7, lk=9, d=8, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, d, generator=g).to(dtype) for n in (lq, lk, lk)]


def close(out, ref, atol=2e-5):
    out = out.double()
    nan = torch.isnan(ref)
    assert torch.equal(torch.isnan(out), nan)
    assert torch.allclose(out[~nan], ref[~nan], atol=atol)


ELIDED = {
    "bool all-true [Lk]": lambda b, h, lq, lk: torch.ones(lk, dtype=torch.bool),
    "bool all-true [B,1,1,Lk] expanded": lambda b, h, lq, lk: torch.ones(b, 1, 1, lk, dtype=torch.bool).expand(b, h, lq, lk),
    "bool all-true [B,H,Lq,Lk]": lambda b, h, lq, lk: torch.ones(b, h, lq, lk, dtype=torch.bool),
    "additive zero": lambda b, h, lq, lk: torch.zeros(b, h, lq, lk),
    "additive row-constant": lambda b, h, lq, lk: torch.randn(b, h, lq, 1).expand(b, h, lq, lk) * 3,
    "additive large row-constant": lambda b, h, lq, lk: torch.full((b, 1, lq, lk), -1e4),
}


@pytest.mark.parametrize("b,h,lq,lk", [(1, 1, 1, 1), (2, 3, 7, 9), (1, 2, 33, 33)])
@pytest.mark.parametrize("name", list(ELIDED))
def test_redundant_masks_are_elided_exactly(name, b, h, lq, lk):
    q, k, v = qkv(b, h, lq, lk)
    mask = ELIDED[name](b, h, lq, lk)
    assert is_row_constant(mask)
    d = decide(mask, q, k)
    assert d.verdict.startswith("elided") and d.plan.elide
    ref_masked = ref_attention(q, k, v, mask)
    close(attention(q, k, v, mask), ref_masked)
    assert torch.allclose(ref_masked, ref_attention(q, k, v), atol=1e-9)  # the mask really is a no-op


@pytest.mark.parametrize("lens,verdict", [((5, 5), "rewritten: slice"), ((9, 4), "rewritten: split-batch"),
                                          ((1, 9), "rewritten: split-batch")])
def test_prefix_padding_is_rewritten_exactly(lens, verdict):
    q, k, v = qkv(2, 3, 7, 9)
    valid = torch.arange(9)[None] < torch.tensor(lens)[:, None]  # [B, Lk]
    mask = valid[:, None, None, :]
    d = decide(mask, q, k)
    assert d.verdict.startswith(verdict), d.verdict
    close(attention(q, k, v, mask), ref_attention(q, k, v, mask))


def test_scattered_padding_is_gathered_exactly():
    q, k, v = qkv(1, 2, 5, 9)
    valid = torch.tensor([[True, False, True, True, False, False, True, False, True]])
    plan = KeyPaddingPlan.from_key_mask(valid)
    assert plan.verdict == "rewritten: gather"
    close(sdpa_with_plan(q, k, v, plan), ref_attention(q, k, v, valid[:, None, None, :]))


def test_bfloat16_rewrites_within_bf16_tolerance():
    q, k, v = qkv(2, 3, 7, 9, dtype=torch.bfloat16)
    mask = (torch.arange(9)[None] < torch.tensor([[9], [3]]))[:, None, None, :]
    close(attention(q, k, v, mask), ref_attention(q, k, v, mask), atol=3e-2)


SEMANTIC = {
    "causal": lambda b, h, l: torch.ones(l, l, dtype=torch.bool).tril(),
    "block-diagonal": lambda b, h, l: (torch.arange(l)[:, None] // 3) == (torch.arange(l)[None] // 3),
    "random rows": lambda b, h, l: torch.rand(b, h, l, l, generator=torch.Generator().manual_seed(1)) > 0.3,
    "additive bias": lambda b, h, l: torch.randn(b, 1, l, l),
    "all keys masked for a sample": lambda b, h, l: torch.stack([torch.ones(l, dtype=torch.bool),
                                                                  torch.zeros(l, dtype=torch.bool)])[:, None, None, :],
    "one -inf row": lambda b, h, l: torch.zeros(b, h, l, l).index_fill_(2, torch.tensor([0]), float("-inf")),
}


@pytest.mark.parametrize("name", list(SEMANTIC))
def test_semantic_masks_are_kept_and_still_exact(name):
    q, k, v = qkv(2, 3, 8, 8)
    mask = SEMANTIC[name](2, 3, 8)
    d = decide(mask, q, k)
    assert d.keep, d.verdict
    ref = ref_attention(q, k, v, mask)
    assert not torch.allclose(torch.nan_to_num(ref, 0.0), ref_attention(q, k, v))  # it does change the output
    out = attention(q, k, v, mask)
    nan = torch.isnan(ref)
    # SDPA returns NaN or 0 for fully masked rows depending on kernel: compare the defined rows only
    assert torch.allclose(out.double()[~nan], ref[~nan], atol=2e-5)


def test_row_constant_criterion_details():
    assert not is_row_constant(torch.zeros(2, 2, dtype=torch.bool))  # all-False rows → NaN, not a no-op
    assert not is_row_constant(torch.full((2, 2), float("-inf")))
    m = torch.zeros(3, 4)
    m[1, 2] = 1e-6
    assert not is_row_constant(m)  # near-constant is not constant
    assert is_row_constant(torch.arange(3.0)[:, None].expand(3, 4))


@pytest.mark.parametrize("mask,match", [
    (torch.full((7, 9), float("nan")), "NaN"),
    (torch.ones(7, 9, dtype=torch.int64), "bool .* or floating"),
    (torch.ones(2, 3, 7, 8, dtype=torch.bool), "does not broadcast"),
    (torch.ones(1, 2, 3, 7, 9, dtype=torch.bool), "1 to 4 dims"),
    ([[True]], "must be a torch.Tensor"),
])
def test_bad_masks_get_clear_errors(mask, match):
    q, k, v = qkv(2, 3, 7, 9)
    with pytest.raises(SafeDitError, match=match):
        attention(q, k, v, mask)


def test_key_padding_plan_input_checks():
    with pytest.raises(SafeDitError, match=r"\[B, Lk\]"):
        KeyPaddingPlan.from_key_mask(torch.ones(3, dtype=torch.bool))
    assert KeyPaddingPlan.from_key_mask(torch.tensor([[1, 1], [0, 0]])) is None
    validate_mask(torch.ones(9, dtype=torch.bool), *qkv(2, 3, 7, 9)[:2])
