"""Z-Image (ZImageTransformer2DModel), the exact fast path: its batch-padding masks rewritten into mask-free calls;
safe-core refused."""

from __future__ import annotations

import pytest
import torch

from safe_dit import SafeConfig, SafeDitError, apply_safe_dit, remove_safe_dit
from safe_dit.census import RECIPES, _build
from helpers import SdpaSpy, forward, processors

RECIPE = next(r for r in RECIPES if r.cls == "ZImageTransformer2DModel")


@pytest.mark.parametrize("lens", [[40, 10], [40, 40], [20], [5, 33, 70]], ids=["different", "equal", "one", "three"])
def test_dense_fp_equals_dense_with_no_mask(lens):
    model = _build(RECIPE, 0)
    inputs = RECIPE.inputs(model, len(lens), lens, (4, 6), torch.Generator().manual_seed(1))
    with SdpaSpy() as stock:
        dense = forward(model, inputs)
    before = processors(model)
    apply_safe_dit(model, SafeConfig("dense-fp"))
    with SdpaSpy() as spy:
        fast = forward(model, inputs)
    remove_safe_dit(model)
    padded = {-(-n // 32) for n in lens}  # captions pad to multiples of 32: the batch differs if these do
    assert any(m is not None for m in stock.masks) == (len(padded) > 1)
    assert spy.masks and all(m is None for m in spy.masks)
    for f, d in zip(fast, dense):  # one output per sample (a list, as ZImagePipeline gets it)
        assert (f - d).abs().max() <= 1e-5 * d.abs().max()
    assert all(processors(model)[k] is before[k] for k in before) and not model._forward_pre_hooks


def test_scheduled_modes_are_refused():
    model = _build(RECIPE, 0)
    for mode in ("safe-core", "safe-sw"):
        with pytest.raises(SafeDitError, match="not supported on Z-Image yet"):
            apply_safe_dit(model, SafeConfig(mode))
    assert not model._forward_pre_hooks
