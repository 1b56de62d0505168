"""PixArt (PixArtTransformer2DModel): dense-fp exact and mask-free; safe-core/safe-sw through PixArtSigmaPipeline."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

import safe_dit
from safe_dit import SafeConfig, SafeDitError, apply_safe_dit, remove_safe_dit
from safe_dit.api import runtime_of
from safe_dit.audit import audit, trace_forward
from safe_dit.cli import main
from safe_dit.masks import DISCARD_BIAS, KeyPaddingPlan, key_padding_from_bias
from safe_dit.models import build_pixart, build_pixart_pipeline, pixart_inputs

TOL = {torch.float32: 2e-5, torch.bfloat16: 3e-2}  # max abs error relative to max |output|, as for Lumina

CASES = [  # (height tokens, width tokens, batch, valid caption lengths)
    (5, 7, 1, [8]),  # odd grid
    (3, 8, 2, [8, 3]),  # non-square, CFG batch with different caption lengths (split-batch)
    (4, 4, 2, [5, 5]),  # same padded length in both halves (slice)
    (1, 1, 1, [2]),  # a single image token
    (6, 5, 2, [8, 8]),  # no padding at all
]


def _forward(model, inputs):
    with torch.no_grad():
        return model(**inputs)[0]


def _processors(model):
    return {n: m.processor for n, m in model.named_modules() if hasattr(m, "processor")}


class SdpaSpy(TorchFunctionMode):
    """Every mask handed to F.scaled_dot_product_attention."""

    def __init__(self):
        super().__init__()
        self.masks = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            self.masks.append(kwargs.get("attn_mask", args[3] if len(args) > 3 else None))
        return func(*args, **kwargs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("h,w,b,valid", CASES)
def test_dense_fp_equals_dense(h, w, b, valid, dtype):
    model = build_pixart(dtype=dtype)
    inputs = pixart_inputs(model, h, w, batch=b, valid_lens=valid, seed=h * 10 + w)
    dense = _forward(model, inputs).float()
    apply_safe_dit(model, SafeConfig("dense-fp"))
    with SdpaSpy() as spy:
        fast = _forward(model, inputs).float()
    remove_safe_dit(model)
    assert spy.masks and all(m is None for m in spy.masks)  # no mask reaches SDPA
    assert torch.isfinite(fast).all() and fast.shape == dense.shape == (b, 8, h * 2, w * 2)
    assert (fast - dense).abs().max().item() <= TOL[dtype] * dense.abs().max().item()


def test_dense_fp_matches_float64_reference():
    model = build_pixart()
    inputs = pixart_inputs(model, 3, 8, batch=2, valid_lens=[8, 3])
    ref64 = _forward(model.double(), {k: (v.double() if torch.is_tensor(v) and v.is_floating_point() else v)
                                      for k, v in inputs.items()})
    model.float()
    dense = _forward(model, inputs).double()
    apply_safe_dit(model, SafeConfig("dense-fp"))
    fast = _forward(model, inputs).double()
    err_dense, err_fast = (dense - ref64).abs().max().item(), (fast - ref64).abs().max().item()
    assert err_fast <= 1e-5 * ref64.abs().max().item()
    assert err_fast <= 4 * err_dense + 1e-6


def test_padding_changes_the_output():
    """Guard against a vacuous equality: the caption padding bias really matters in this model."""
    model = build_pixart()
    padded = pixart_inputs(model, 4, 4, batch=1, valid_lens=[3])
    unpadded = dict(padded, encoder_attention_mask=torch.ones_like(padded["encoder_attention_mask"]))
    assert (_forward(model, padded) - _forward(model, unpadded)).abs().max() > 1e-3


def test_audit_self_attention_has_no_mask_and_cross_attention_is_rewritten():
    model = build_pixart(num_layers=3)
    inputs = pixart_inputs(model, 5, 6, batch=2, valid_lens=[8, 4])
    report = audit(model, inputs)
    stock, safe = report["stock"], report["safe"]
    assert all(c["mask"]["kind"] == "none" for c in stock if c["module"].endswith("attn1"))  # nothing to elide
    assert all(c["mask"]["kind"] == "additive float32" for c in stock if c["module"].endswith("attn2"))
    assert report["summary"]["safe_masked_calls"] == 0 and len(safe) == 3 * 3  # cross split in 2 by length
    assert all(c["verdict"] == "no mask" for c in safe if c["module"].endswith("attn1"))
    assert all(c["verdict"] == "rewritten: split-batch (exact)" for c in safe if c["module"].endswith("attn2"))
    assert not hasattr(model, "_safe_dit_handle")


def test_caption_mask_is_read_once_per_forward(monkeypatch):
    reads = []
    original = KeyPaddingPlan.from_key_mask
    monkeypatch.setattr(KeyPaddingPlan, "from_key_mask", staticmethod(lambda m: reads.append(tuple(m.shape)) or original(m)))
    model = build_pixart(num_layers=4)
    apply_safe_dit(model, SafeConfig("dense-fp"))
    _forward(model, pixart_inputs(model, 4, 4, batch=2, valid_lens=[8, 5]))
    assert reads == [(2, 8)]


def test_rewrite_padding_off_keeps_the_stock_bias():
    model = build_pixart()
    inputs = pixart_inputs(model, 4, 3, batch=2, valid_lens=[8, 2])
    dense = _forward(model, inputs)
    apply_safe_dit(model, SafeConfig("dense-fp", rewrite_padding=False))
    cross = [c for c in trace_forward(model, inputs) if c["module"].endswith("attn2")]
    assert cross and all(c["mask"]["kind"] == "additive float32" and c["verdict"] == "kept: padding" for c in cross)
    assert torch.equal(_forward(model, inputs), dense)  # the very computation of the stock processor


def test_key_padding_from_bias():
    bias = torch.tensor([[[0.0, 0.0, -10000.0]], [[0.0, -9984.0, float("-inf")]]])  # [2, 1, 3]
    assert key_padding_from_bias(bias, 2).tolist() == [[True, True, False], [True, False, False]]
    assert key_padding_from_bias(torch.tensor([[[0.0, -0.5, DISCARD_BIAS]]]), 1) is None  # a soft bias is semantic
    assert key_padding_from_bias(torch.zeros(4, 1, 3), 2) is None  # per-head masks are not per-sample padding
    with pytest.raises(SafeDitError, match="NaN"):
        key_padding_from_bias(torch.tensor([[float("nan"), 0.0]]), 1)


def test_soft_bias_is_kept_and_exact():
    model = build_pixart()
    inputs = pixart_inputs(model, 3, 3, batch=2)
    inputs["encoder_attention_mask"] = -torch.rand(2, 1, 8)  # a user bias, not padding
    dense = _forward(model, inputs)
    apply_safe_dit(model, SafeConfig("dense-fp"))
    cross = [c for c in trace_forward(model, inputs) if c["module"].endswith("attn2")]
    assert all(c["verdict"].startswith("kept: semantic") for c in cross)
    assert torch.equal(_forward(model, inputs), dense)


def test_apply_remove_round_trip_and_idempotence():
    model = build_pixart()
    inputs = pixart_inputs(model, 4, 4, batch=2, valid_lens=[8, 3])
    before, out_before = _processors(model), _forward(model, inputs)
    apply_safe_dit(model, SafeConfig("dense-fp"))
    patched = _processors(model)
    assert all(type(p).__name__ == "SafePixArtAttnProcessor" for p in patched.values())
    apply_safe_dit(model, SafeConfig("dense-fp"))
    assert all(_processors(model)[n] is patched[n] for n in patched)
    for cfg in (SafeConfig("dense-fp", rewrite_padding=False), SafeConfig("safe-core")):  # another config replaces
        apply_safe_dit(model, cfg)
    remove_safe_dit(model)
    assert all(_processors(model)[n] is before[n] for n in before)
    assert not model._forward_pre_hooks and not model._forward_hooks
    assert not model.pos_embed._forward_hooks and not model.proj_out._forward_hooks
    assert not hasattr(model, "_safe_dit_handle")
    assert torch.equal(_forward(model, inputs), out_before)


def test_audit_cli_has_a_pixart_model(tmp_path, capsys):
    path = tmp_path / "audit.json"
    assert main(["audit", "--model", "pixart", "--height-tokens", "3", "--width-tokens", "5", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "PixArtTransformer2DModel" in out and "masked SDPA calls: stock 2/4  ->  safe-dit 0/6" in out
    assert path.exists()
