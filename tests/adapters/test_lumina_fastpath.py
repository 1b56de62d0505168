"""dense-fp on Lumina-Next: exact versus stock dense and a float64 reference, and provably mask-free."""

from __future__ import annotations

import pytest
import torch
from diffusers import LuminaNextDiT2DModel
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode

from safe_dit import SafeConfig, SafeDitError, apply_safe_dit, remove_safe_dit
from safe_dit.engine.masks import KeyPaddingPlan
from safe_dit.inspection.audit import audit, trace_forward
from safe_dit.testing.kits import build_lumina_next, lumina_inputs

# Documented tolerances for dense-fp vs stock dense (max abs error relative to max |output|):
# float32: the mask-free kernel sums in a different order; bfloat16: 8-bit mantissa.
TOL = {torch.float32: 2e-5, torch.bfloat16: 3e-2}

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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("h,w,b,valid", CASES)
def test_dense_fp_equals_dense(h, w, b, valid, dtype):
    model = build_lumina_next("tiny", dtype=dtype)
    inputs = lumina_inputs(model, h, w, batch=b, valid_lens=valid, seed=h * 10 + w)
    dense = _forward(model, inputs).float()
    apply_safe_dit(model, SafeConfig("dense-fp"))
    fast = _forward(model, inputs).float()
    remove_safe_dit(model)
    scale = dense.abs().max().item()
    assert torch.isfinite(fast).all()
    assert (fast - dense).abs().max().item() <= TOL[dtype] * scale
    assert fast.shape == dense.shape == (b, 8, h * 2, w * 2)


@pytest.mark.parametrize("h,w,b,valid", CASES[:3])
def test_dense_fp_matches_float64_reference(h, w, b, valid):
    """Both the stock model and dense-fp in float32 sit within float32 error of a float64 run."""
    model = build_lumina_next("tiny")
    inputs = lumina_inputs(model, h, w, batch=b, valid_lens=valid)
    ref64 = _forward(model.double(), {k: (v.double() if torch.is_tensor(v) and v.is_floating_point() else v)
                                      for k, v in inputs.items()})
    model.float()
    dense = _forward(model, inputs).double()
    apply_safe_dit(model, SafeConfig("dense-fp"))
    fast = _forward(model, inputs).double()
    err_dense = (dense - ref64).abs().max().item()
    err_fast = (fast - ref64).abs().max().item()
    assert err_fast <= 1e-5 * ref64.abs().max().item()
    assert err_fast <= 4 * err_dense + 1e-6  # no worse than the stock float32 path, up to rounding


def test_padding_changes_the_output():
    """Guard against a vacuous equality: the caption padding mask really matters in this model."""
    model = build_lumina_next("tiny")
    padded = lumina_inputs(model, 4, 4, batch=1, valid_lens=[3])
    unpadded = dict(padded, encoder_mask=torch.ones_like(padded["encoder_mask"]))
    assert (_forward(model, padded) - _forward(model, unpadded)).abs().max() > 1e-3


def test_patched_model_runs_only_mask_free_flash_calls():
    model = build_lumina_next("tiny", num_layers=3)
    inputs = lumina_inputs(model, 5, 6, batch=2, valid_lens=[8, 4])
    stock = trace_forward(model, inputs)
    assert all(c["mask"]["kind"] == "bool" for c in stock)
    assert any("aten::where" in c["mask_ops"] for c in stock)  # the bool mask is converted per call
    apply_safe_dit(model, SafeConfig("dense-fp"))
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):  # only the flash backend is allowed to run
        calls = trace_forward(model, inputs)
    assert len(calls) == 3 * 3  # per block: self-attention + cross-attention split into 2 by caption length
    for c in calls:
        assert c["mask"]["kind"] == "none"
        assert c["kernels"] == ["aten::_scaled_dot_product_flash_attention_for_cpu"]
        assert c["mask_ops"] == []
    self_calls = [c for c in calls if c["module"].endswith("attn1")]
    assert len(self_calls) == 3
    assert all(c["verdict"].startswith("elided: certified") for c in self_calls)
    assert all(c["verdict"].startswith("rewritten: split-batch") for c in calls if c["module"].endswith("attn2"))


def test_masks_are_read_once_per_forward_not_per_layer(monkeypatch):
    """The image mask is certified by provenance (never read); the caption mask is read once."""
    reads = []
    original = KeyPaddingPlan.from_key_mask

    def spy(mask):
        reads.append(tuple(mask.shape))
        return original(mask)

    monkeypatch.setattr(KeyPaddingPlan, "from_key_mask", staticmethod(spy))
    model = build_lumina_next("tiny", num_layers=4)
    inputs = lumina_inputs(model, 4, 4, batch=2, valid_lens=[8, 5], text_len=8)
    apply_safe_dit(model, SafeConfig("dense-fp"))
    _forward(model, inputs)
    assert reads == [(2, 8)]  # one read, of the compact caption mask; zero of the [2, 16] image mask
    _forward(model, inputs)
    assert reads == [(2, 8), (2, 8)]  # per-forward state: decided anew for the next call


class _HostSyncCounter(TorchDispatchMode):
    """Counts the ops that copy a tensor value to the host (``.item()``, ``bool(t)``, ``tolist``...):
    on CUDA each one is a device synchronisation."""

    SYNC_OPS = {"aten::_local_scalar_dense", "aten::is_nonzero", "aten::equal"}

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func._schema.name in self.SYNC_OPS
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("valid", [[8, 5], [8, 8]], ids=["padded", "all-valid"])
def test_fast_path_adds_no_host_sync_per_attention_call(valid):
    """Host syncs of a dense-fp forward do not grow with the number of attention calls: the image
    mask is never read and the caption mask's plan is decided once per forward."""
    counts = {}
    for layers in (2, 6):
        model = build_lumina_next("tiny", num_layers=layers)
        inputs = lumina_inputs(model, 4, 4, batch=2, valid_lens=valid, text_len=8)
        with _HostSyncCounter() as stock:
            _forward(model, inputs)
        apply_safe_dit(model, SafeConfig("dense-fp"))
        with _HostSyncCounter() as fast:
            _forward(model, inputs)
        counts[layers] = (stock.count, fast.count)
    (stock2, fast2), (_, fast6) = counts[2], counts[6]
    assert fast6 == fast2, counts  # 3x the attention calls (24 vs 8), not one more sync
    if valid == [8, 8]:  # nothing to rewrite: the one plan read is all it costs
        assert fast2 - stock2 <= 2, counts


def test_rewrite_padding_off_keeps_the_caption_mask():
    model = build_lumina_next("tiny")
    inputs = lumina_inputs(model, 4, 3, batch=2, valid_lens=[8, 2])
    dense = _forward(model, inputs)
    apply_safe_dit(model, SafeConfig("dense-fp", rewrite_padding=False))
    calls = trace_forward(model, inputs)
    cross = [c for c in calls if c["module"].endswith("attn2")]
    assert cross and all(c["mask"]["kind"] == "bool" and c["verdict"] == "kept: padding" for c in cross)
    assert all(c["mask"]["kind"] == "none" for c in calls if c["module"].endswith("attn1"))
    assert torch.allclose(_forward(model, inputs), dense, atol=2e-5)


class _CustomForwardLumina(LuminaNextDiT2DModel):
    """A user subclass whose forward could pass any mask: provenance no longer holds."""

    def forward(self, *args, **kwargs):
        return super().forward(*args, **kwargs)


def test_custom_model_falls_back_to_a_once_per_forward_value_check():
    ref = build_lumina_next("tiny")
    model = _CustomForwardLumina(**ref.config)
    model.load_state_dict(ref.state_dict())
    inputs = lumina_inputs(model, 3, 5, batch=2, valid_lens=[8, 6])
    dense = _forward(model, inputs)
    apply_safe_dit(model, SafeConfig("dense-fp"))
    calls = trace_forward(model, inputs)
    self_calls = [c for c in calls if c["module"].endswith("attn1")]
    assert all(c["verdict"].startswith("elided: all-valid (by value") for c in self_calls)
    assert torch.allclose(_forward(model, inputs), dense, atol=2e-5)


def test_apply_remove_round_trip_and_idempotence():
    model = build_lumina_next("tiny")
    inputs = lumina_inputs(model, 4, 4, batch=2, valid_lens=[8, 3])
    before = {n: m.processor for n, m in model.named_modules() if hasattr(m, "processor")}
    out_before = _forward(model, inputs)
    cfg = SafeConfig("dense-fp")
    apply_safe_dit(model, cfg)
    patched = {n: m.processor for n, m in model.named_modules() if hasattr(m, "processor")}
    n_hooks = (len(model._forward_pre_hooks), len(model._forward_hooks), len(model.patch_embedder._forward_hooks))
    assert n_hooks[0] >= 1 and n_hooks[2] == 1
    assert all(type(p).__name__ == "SafeLuminaAttnProcessor" for p in patched.values())
    apply_safe_dit(model, SafeConfig("dense-fp"))  # same config again: nothing changes
    again = {n: m.processor for n, m in model.named_modules() if hasattr(m, "processor")}
    assert all(again[n] is patched[n] for n in patched)
    assert (len(model._forward_pre_hooks), len(model._forward_hooks),
            len(model.patch_embedder._forward_hooks)) == n_hooks
    apply_safe_dit(model, SafeConfig("dense-fp", rewrite_padding=False))  # another config replaces
    assert (len(model._forward_pre_hooks), len(model._forward_hooks),
            len(model.patch_embedder._forward_hooks)) == n_hooks
    remove_safe_dit(model)
    after = {n: m.processor for n, m in model.named_modules() if hasattr(m, "processor")}
    assert all(after[n] is before[n] for n in before)
    assert not model._forward_pre_hooks and not model._forward_hooks
    assert not model.patch_embedder._forward_hooks
    assert not hasattr(model, "_safe_dit_handle")
    assert torch.equal(_forward(model, inputs), out_before)
    remove_safe_dit(model)  # removing twice is harmless


def test_dense_mode_leaves_the_model_stock():
    model = build_lumina_next("tiny")
    before = {n: m.processor for n, m in model.named_modules() if hasattr(m, "processor")}
    apply_safe_dit(model, SafeConfig("dense"))
    assert all(m.processor is before[n] for n, m in model.named_modules() if hasattr(m, "processor"))
    assert not model._forward_pre_hooks


def test_pipeline_like_objects_patch_their_transformer():
    class Pipe:
        def __init__(self, transformer):
            self.transformer = transformer

    pipe = Pipe(build_lumina_next("tiny"))
    assert apply_safe_dit(pipe, SafeConfig("dense-fp")) is pipe
    assert type(pipe.transformer.layers[0].attn1.processor).__name__ == "SafeLuminaAttnProcessor"
    remove_safe_dit(pipe)
    assert type(pipe.transformer.layers[0].attn1.processor).__name__ == "LuminaAttnProcessor2_0"


def test_audit_report_contrasts_stock_and_safe():
    model = build_lumina_next("tiny")
    report = audit(model, lumina_inputs(model, 4, 4, batch=2, valid_lens=[8, 5]))
    s = report["summary"]
    assert s["stock_masked_calls"] == s["stock_calls"] == 4
    assert s["safe_masked_calls"] == 0
    assert not hasattr(model, "_safe_dit_handle")  # audit removes what it applied


def test_bad_input_gets_clear_errors():
    with pytest.raises(SafeDitError, match="no adapter for Linear.*LuminaNextDiT2DModel"):
        apply_safe_dit(torch.nn.Linear(2, 2), SafeConfig())
    with pytest.raises(SafeDitError, match="invalid mode 'fast'"):
        SafeConfig("fast")
    with pytest.raises(SafeDitError, match="keep_ratio"):
        SafeConfig("safe-core", keep_ratio=0.0)
    with pytest.raises(SafeDitError, match="must be a SafeConfig"):
        apply_safe_dit(build_lumina_next("tiny"), {"mode": "dense-fp"})
    with pytest.raises(SafeDitError, match="pipeline or transformer"):
        apply_safe_dit(object(), SafeConfig())
    model = build_lumina_next("tiny")
    apply_safe_dit(model, SafeConfig())
    bad = lumina_inputs(model, 3, 3, batch=1)
    bad["encoder_mask"] = torch.full((1, 8), float("nan"))
    with pytest.raises(SafeDitError, match="NaN"):
        _forward(model, bad)
    wrong = lumina_inputs(model, 3, 3, batch=1)
    wrong["encoder_mask"] = torch.ones(1, 2, 8)
    with pytest.raises(SafeDitError):
        _forward(model, wrong)
