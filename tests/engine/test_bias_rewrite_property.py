"""The caption-padding bias rewrite (drop the keys a -1000 or lower bias discards) is exact, or the forward is
refused: never silently wrong, whatever the spread of the logits (the hardening issue's fuzz, as a property)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from safe_dit import SafeConfig, SafeDitError
from safe_dit.engine.attend import ForwardState, attend
from safe_dit.engine.masks import key_padding_from_bias
from safe_dit.engine.runtime import Runtime


def _rewritten(q, k, v, mask):
    """safe-dit's attend on q [B, Lq, H, d], k/v [B, Lk, H, d] with a per-sample bias [B, 1, Lk], as PixArt's
    processor calls it; returns (output [B, Lq, H, d], the forward's verification error or None)."""
    rt = Runtime(SafeConfig("dense-fp"))
    rt.state = ForwardState()
    b = q.shape[0]
    out = attend(rt, "attn2", q, k, v, mask, None, rewrite=True, stock_mask=lambda: mask[:, None],
                 compact=lambda m: key_padding_from_bias(m, b))
    try:
        rt.state.verify()
        return out, None
    except SafeDitError as err:
        return out, err


def _stock(q, k, v, mask):
    q, k, v = (t.transpose(1, 2).double() for t in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None].double()).transpose(1, 2)


@settings(max_examples=120, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), spread=st.floats(0.1, 60.0), bias=st.floats(-1500.0, -1000.0),
       lengths=st.lists(st.integers(1, 12), min_size=2, max_size=3))
def test_bias_rewrites_are_exact_or_refused(seed, spread, bias, lengths):
    g = torch.Generator().manual_seed(seed)
    b, lk, h, d = len(lengths), 12, 2, 8
    q = torch.randn(b, 5, h, d, generator=g) * spread
    k = torch.randn(b, lk, h, d, generator=g) * spread  # logit spread up to ~ spread^2 * d ** 0.5 (thousands)
    v = torch.randn(b, lk, h, d, generator=g)
    mask = torch.zeros(b, 1, lk)
    for i, n in enumerate(lengths):
        mask[i, 0, n:] = bias + torch.rand(lk - n, generator=g)  # -1500 .. -999: below DISCARD_BIAS
    out, refused = _rewritten(q, k, v, mask)
    if refused is None:  # accepted: must equal the stock computation
        ref = _stock(q, k, v, mask)
        assert torch.allclose(out.double(), ref, atol=1e-4 * (1 + ref.abs().max().item()), rtol=1e-4)


def test_ordinary_logits_keep_the_rewrite_and_a_huge_spread_is_refused():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 5, 2, 8, generator=g), torch.randn(2, 12, 2, 8, generator=g),
               torch.randn(2, 12, 2, 8, generator=g))
    mask = torch.zeros(2, 1, 12)
    mask[0, 0, 7:], mask[1, 0, 3:] = -10000.0, -10000.0  # diffusers' padding bias
    out, refused = _rewritten(q, k, v, mask)
    assert refused is None and torch.allclose(out.double(), _stock(q, k, v, mask), atol=1e-5)
    mask[mask < 0] = -1000.0
    out, refused = _rewritten(q * 40, k * 40, v, mask)  # logits spread by ~ 10^4: a dropped key would matter
    assert isinstance(refused, SafeDitError) and "rewrite_padding=False" in str(refused)
    assert not torch.allclose(out.double(), _stock(q * 40, k * 40, v, mask), atol=1e-3)  # it really would differ
