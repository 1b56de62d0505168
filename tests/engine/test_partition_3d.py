"""PCSP on a space-time token grid (frames x height x width): 3-D smoothing and the partition it gives."""

import pytest
import torch

from safe_dit.config import SafeConfig
from safe_dit.engine.generation import Generation
from safe_dit.engine.guidance import pixel_gamma
from safe_dit.engine.partition import select_sensitive, sensitivity_map, smooth


def test_3d_smoothing_is_a_box_mean_over_frames_rows_and_columns():
    f, h, w = 3, 4, 5
    x = torch.rand(2, f * h * w, generator=torch.Generator().manual_seed(0))
    out = smooth(x, (f, h, w), radius=1).view(2, f, h, w)
    grid = x.view(2, f, h, w)
    for t, i, j in [(1, 2, 2), (0, 0, 0), (2, 3, 4), (1, 0, 3)]:  # inside, corners and an edge: renormalised means
        box = grid[:, max(t - 1, 0):t + 2, max(i - 1, 0):i + 2, max(j - 1, 0):j + 2]
        assert torch.allclose(out[:, t, i, j], box.mean((1, 2, 3)), atol=1e-6)
    flat = torch.full((1, f * h * w), 0.3)
    assert torch.allclose(smooth(flat, (f, h, w), radius=2), flat)  # a box wider than the 3 frames


def test_3d_smoothing_spreads_across_frames_where_2d_per_frame_would_not():
    f, h, w = 4, 6, 6
    x = torch.zeros(1, f, h, w)
    x[0, 1, 3, 3] = 1.0
    out = smooth(x.view(1, -1), (f, h, w), radius=1).view(f, h, w)
    assert out[0, 3, 3] > 0 and out[2, 3, 3] > 0 and out[3, 3, 3] == 0  # one frame either side, not two
    assert out[2, 3, 3] == out[1, 3, 4] == pytest.approx(1 / 27)  # the 3x3x3 box: a next frame weighs as a next patch


def test_a_sensitive_blob_stays_a_blob_across_frames():
    """A moving blob's noisy score map: after 3-D smoothing the top-K tokens are the blob in every frame, and the
    isolated noise spikes (one token in one frame) are not chosen."""
    f, h, w = 5, 12, 12
    g = torch.Generator().manual_seed(1)
    score = 0.2 * torch.rand(f, h, w, generator=g)
    blob = torch.zeros(f, h, w, dtype=torch.bool)
    for t in range(f):  # a 3x3 blob drifting one column per frame
        blob[t, 4:7, 2 + t:5 + t] = True
    score[blob] += 1.0
    spikes = [(0, 10, 10), (2, 0, 11), (4, 11, 0)]
    for t, i, j in spikes:
        score[t, i, j] = 1.5  # brighter than the blob, but alone
    s = sensitivity_map(score.view(1, -1), (f, h, w), radius=1)
    index = select_sensitive(s, int(blob.sum()) / (f * h * w))[0]  # K = the blob's size
    chosen = torch.zeros(f * h * w, dtype=torch.bool)
    chosen[index] = True
    chosen = chosen.view(f, h, w)
    assert (chosen & blob).sum() >= 0.8 * blob.sum()  # the blob is found in space and time
    assert all(not chosen[t, i, j] for t, i, j in spikes)
    assert all(chosen[t].any() for t in range(f))  # in every frame
    unsmoothed = select_sensitive(score.view(1, -1), int(blob.sum()) / (f * h * w))[0]
    assert all(i * w + j + t * h * w in unsmoothed.tolist() for t, i, j in spikes)  # what smoothing removed


def test_grids_of_other_ranks_are_refused():
    with pytest.raises(ValueError, match="rank 2 or 3"):
        smooth(torch.zeros(1, 16), (2, 2, 2, 2))


def test_a_generation_takes_a_3d_grid_and_sw_cfg_upsamples_per_axis():
    grid = (2, 3, 4)
    n = 24
    gen = Generation(SafeConfig("safe-core", keep_ratio=0.25, warmup_steps=1, anchor_interval=2), num_steps=3)
    gen.begin_step(0, n, grid, batch=2)
    probs = torch.rand(2, n, 5, generator=torch.Generator().manual_seed(0))
    gen.collect(probs, torch.ones(2, 5))
    gen.cfg_batch = True
    gen.begin_step(1, n, grid, batch=2)
    assert gen.global_index.shape == (2, 6) and torch.equal(gen.global_index[0], gen.global_index[1])
    assert gen.sensitivity.shape == (2, n)
    config = SafeConfig("safe-sw", cfg_context=2.0, cfg_sensitive=6.0)
    gamma = pixel_gamma(config, gen, 2, (2, 6, 8), torch.float32)  # output frames 2 (temporal patch 1), 6 x 8
    assert gamma.shape == (1, 1, 2, 6, 8)
    expect = 2.0 + 4.0 * gen.sensitivity[0].view(2, 3, 4)
    assert torch.allclose(gamma[0, 0, :, ::2, ::2], expect) and torch.allclose(gamma[0, 0, :, 1::2, 1::2], expect)
