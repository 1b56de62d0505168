"""PCSP and CAR building blocks on constructed cases."""

import pytest
import torch

from safe_dit.engine.partition import (
    SensitivityAccumulator,
    image_to_text_probs,
    select_sensitive,
    sensitivity_map,
    smooth,
)
from safe_dit.engine.schedule import StepPlan


def test_sensitivity_lands_on_the_prompted_region():
    """Tokens in the top-left 4x4 block look at the content word; the rest look at <bos>."""
    h = w = 8
    d = 16
    torch.manual_seed(0)
    keys = torch.zeros(1, 1, 3, d)  # <bos>, "red", padding
    keys[0, 0, 0, 0] = 4.0
    keys[0, 0, 1, 1] = 4.0
    keys[0, 0, 2, 1] = 9.0  # a padding key that would dominate if padding were not ignored
    q = torch.zeros(1, 1, h, w, d)
    q[..., 0] = 4.0
    q[0, 0, :4, :4, 0] = 0.0
    q[0, 0, :4, :4, 1] = 4.0
    q = q.view(1, 1, h * w, d)
    valid = torch.tensor([[True, True, False]])
    probs = image_to_text_probs(q, keys, valid)  # [1, N, 3]
    assert torch.all(probs[..., 2] == 0)
    acc = SensitivityAccumulator()
    acc.add(probs, torch.tensor([[0.0, 1.0, 0.0]]))  # <bos> and padding carry no weight
    s = sensitivity_map(acc.mean(), (h, w), radius=1)
    idx = select_sensitive(s, 16 / 64)[0]
    rows, cols = idx // w, idx % w
    assert idx.numel() == 16
    assert torch.all(rows < 4) and torch.all(cols < 4)


def test_select_is_deterministic_sorted_and_sized():
    s = torch.tensor([[0.5, 0.5, 0.5, 0.9, 0.1, 0.5]])
    assert select_sensitive(s, 0.5).tolist() == [[0, 1, 3]]  # ties broken by position
    assert select_sensitive(s, 1e-6).shape == (1, 1)
    assert select_sensitive(s, 1.0).tolist() == [[0, 1, 2, 3, 4, 5]]


def test_smooth_preserves_constants_and_range():
    x = torch.full((2, 12), 0.3)
    assert torch.allclose(smooth(x, (3, 4)), x)
    m = sensitivity_map(torch.rand(2, 35), (5, 7))
    assert m.min() >= 0 and m.max() <= 1 and torch.allclose(m.amax(1), torch.ones(2))


@pytest.mark.parametrize("steps,warm,interval,tail,expected", [
    (6, 2, 2, 1, "WWSAST"),
    (5, 1, 1, 0, "WAAAA"),
    (4, 4, 3, 0, "WWWW"),
    (8, 2, 3, 2, "WWSSASTT"),
    (20, 2, 5, 1, "WWSSSSASSSSASSSSASST"),
])
def test_step_plan(steps, warm, interval, tail, expected):
    letter = {"warmup": "W", "anchor": "A", "selective": "S", "tail": "T"}
    assert "".join(letter[k] for k in StepPlan(steps, warm, interval, tail).kinds()) == expected


def test_dense_fraction():
    plan = StepPlan(10, 2, 4, 1)  # W W S S S A S S S T
    assert plan.dense_fraction(0.25) == pytest.approx((4 + 6 * 0.25) / 10)


def test_the_joint_pcsp_tap_from_the_calls_own_log_sum_exp_is_exact_and_changes_no_output():
    """Warm-up steps of joint-attention backbones read PCSP's image->text probabilities from the log-sum-exp that
    the CPU flash kernel returns with the attention itself, instead of a second mask-free pass over all keys: the
    same probabilities as the full softmax, and the very output SDPA gives."""
    import torch.nn.functional as F

    from safe_dit.engine.partition import joint_image_to_text_probs, joint_text_probs_from_lse

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 14, 8, generator=g) for _ in range(3))  # [B, H, L, d]: 10 image + 4 text
    scale = 0.3
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, scale=scale)
    assert torch.equal(out, F.scaled_dot_product_attention(q, k, v, scale=scale))  # what attend() computes
    full = (torch.einsum("bhnd,bhld->bhnl", q.double(), k.double()) * scale).softmax(-1)
    for image, text in ((slice(0, 10), slice(10, 14)), (slice(4, 14), slice(0, 4))):  # SD3 and FLUX orders
        ref = full[:, :, image, text].mean(1)
        fused = joint_text_probs_from_lse(q[:, :, image], k, text, lse[:, :, image], scale)
        assert torch.allclose(fused.double(), ref, atol=1e-6)
        assert torch.allclose(fused, joint_image_to_text_probs(q[:, :, image], k, text, scale=scale), atol=1e-6)
        assert torch.allclose(joint_text_probs_from_lse(q[:, :, image], k, text, lse[:, :, image], scale,
                                                        chunk_bytes=1).double(), ref, atol=1e-6)  # head by head


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_joint_backbones_take_the_fused_tap_and_keep_their_outputs(name, monkeypatch):
    """Through a whole safe-core generation: the fused tap runs (no second SDPA pass in warm-up) and every step's
    output equals the one computed with the two-pass tap."""
    import safe_dit
    from safe_dit import SafeConfig, apply_safe_dit, remove_safe_dit
    from safe_dit.api import runtime_of
    from safe_dit.engine import joint
    from safe_dit.testing.kits import kit_for

    kit = kit_for(name)
    model = kit.build()
    x = kit.inputs(model, 4, 4, batch=2 if name == "sd3" else 1, text_len=6)

    def run():
        outs = []
        apply_safe_dit(model, SafeConfig("safe-core", keep_ratio=0.25))
        with torch.no_grad(), safe_dit.generation(model, num_steps=5):
            for _ in range(5):
                outs.append(model(**x)[0].clone())
        sensitivity = runtime_of(model).last_sensitivity.clone()
        remove_safe_dit(model)
        return outs, sensitivity

    calls = []
    real = joint._attention_with_lse
    def spy(*args):
        result = real(*args)
        calls.append(result is not None)
        return result

    monkeypatch.setattr(joint, "_attention_with_lse", spy)
    fused, fused_map = run()
    assert calls and all(calls)  # every tapped warm-up call took the fused path
    monkeypatch.setattr(joint, "_attention_with_lse", lambda *a: None)  # the two-pass tap
    two_pass, two_pass_map = run()
    assert torch.allclose(fused_map, two_pass_map, atol=1e-6)
    for a, b in zip(fused, two_pass):
        assert torch.allclose(a, b, atol=1e-6)
