"""PCSP and CAR building blocks on constructed cases."""

import pytest
import torch

from safe_dit.engine.partition import SensitivityAccumulator, image_to_text_probs, select_sensitive, sensitivity_map, smooth
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
