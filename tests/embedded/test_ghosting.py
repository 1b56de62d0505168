"""No ghosting: where no object is, safe-core at its defaults draws the same empty background as dense-fp.

The published schedule (anchors every 5 steps, frozen context K/V) left faint blobs in empty grid cells
(11% of their pixels off by more than 4/255 on the README's prompt, 5-13% on these white backgrounds). The
threshold below is one the published schedule fails on the same prompts, which the test checks too, so it cannot
pass vacuously."""

from __future__ import annotations

import statistics

import pytest

from safe_dit import SafeConfig, apply_safe_dit, remove_safe_dit
from safe_dit.bench.pareto_settings import PUBLISHED
from safe_dit.bench.quality import generate, ghosting
from safe_dit.embedded import world

THRESHOLD = 0.03  # mean fraction of empty-cell pixels off by more than 4/255
OLD_DEFAULTS = SafeConfig("safe-core", **PUBLISHED)
# Faint grey shows on white: the README's prompt and two more (none from the set the defaults were chosen on)
SCENES = [world.parse_caption(c) for c in (
    "a blue triangle at the bottom right on a white background",
    "a red circle at the top left on a white background",
    "a green square at the center and a yellow circle at the top right on a white background")]


@pytest.fixture(scope="module")
def ghosting_by_config(embedded_pipe):
    pipe = embedded_pipe
    out = {"defaults": [], "old": []}
    for i, scene in enumerate(SCENES):
        caption = world.caption(scene)
        apply_safe_dit(pipe, SafeConfig("dense-fp"))
        reference, _ = generate(pipe, caption, i, 30, 4.0)
        for name, config in (("defaults", SafeConfig("safe-core")), ("old", OLD_DEFAULTS)):
            apply_safe_dit(pipe, config)
            image, _ = generate(pipe, caption, i, 30, 4.0)
            out[name].append(ghosting(image, reference, scene))
    remove_safe_dit(pipe)
    return out


def test_safe_core_defaults_leave_the_empty_cells_as_dense_fp_draws_them(ghosting_by_config):
    assert statistics.fmean(ghosting_by_config["defaults"]) < THRESHOLD, ghosting_by_config


def test_the_threshold_is_one_the_old_defaults_fail(ghosting_by_config):
    assert statistics.fmean(ghosting_by_config["old"]) > THRESHOLD, ghosting_by_config


def test_ghosting_counts_only_empty_cells():
    import numpy as np

    scene = world.parse_caption("a red circle at the top left on a white background")
    reference = np.full((64, 64, 3), 255, dtype=np.uint8)
    image = reference.copy()
    image[:21, :21] = 0  # a change inside the occupied cell: not ghosting
    assert ghosting(image, reference, scene) == 0.0
    image[40:, 40:] = 252  # a faint blob in an empty cell, within tolerance
    assert ghosting(image, reference, scene) == 0.0
    image[40:, 40:] = 240
    assert ghosting(image, reference, scene) == pytest.approx(24 * 24 / (64 * 64 - 22 * 22), rel=0.05)
