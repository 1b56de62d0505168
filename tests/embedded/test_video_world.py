"""The moving-shapes world (safe_dit.embedded.video_world): captions, rendering, layouts, prompt sets."""

from __future__ import annotations

import random

import numpy as np
import pytest

from safe_dit.embedded import video_world as vw
from safe_dit.embedded import world


def obj(color="red", shape="circle", motion="left-right", cell=None) -> vw.VideoObj:
    return vw.VideoObj(color, shape, motion, cell)


def test_captions_read_as_the_issue_words_them_and_parse_back():
    one = vw.VideoScene("white", (obj(),))
    assert vw.caption(one) == "a red circle moving from the left to the right on a white background"
    two = vw.VideoScene("black", (obj("green", "triangle", "bottom-top"), obj("blue", "square", "static", (0, 0))))
    assert vw.caption(two) == ("a green triangle moving from the bottom to the top and a blue square at the top left "
                               "on a black background")
    rng = random.Random(0)
    for _ in range(300):
        s = vw.sample_scene(rng)
        assert vw.parse_caption(vw.caption(s)) == s
        assert vw.in_world(vw.caption(s))
    assert not vw.in_world("a red circle at the top left on a gray background and a dog")
    assert not vw.in_world("a red circle moving from the left to the top on a white background")
    assert not vw.in_world("a purple circle moving from the left to the right on a white background")


def test_objects_are_kept_in_caption_order_whatever_order_they_are_given_in():
    a, b = obj("red", "circle", "static", (2, 2)), obj("blue", "square", "top-bottom")
    assert vw.VideoScene("gray", (a, b)) == vw.VideoScene("gray", (b, a))
    assert vw.VideoScene("gray", (a, b)).objects == (b, a)  # moving before still, in MOTIONS order


def test_invalid_scenes_are_refused():
    with pytest.raises(ValueError):
        obj(motion="static")  # a still object needs a cell
    with pytest.raises(ValueError):
        obj(cell=(0, 0))  # a moving one has none
    with pytest.raises(ValueError):
        obj(motion="sideways")
    with pytest.raises(ValueError):
        vw.VideoScene("gray", (obj(motion="static", cell=(1, 1)), obj("blue", motion="static", cell=(1, 1))))
    with pytest.raises(ValueError):
        vw.VideoScene("pink", (obj(),))
    with pytest.raises(ValueError):
        vw.render(vw.VideoScene("gray", (obj(),)), frames=17)


def centroid(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    return np.array([ys.mean(), xs.mean()])


@pytest.mark.parametrize("motion", [m for m in vw.MOTIONS if m != vw.STATIC])
def test_a_moving_object_crosses_the_frame_from_edge_to_edge_in_its_direction(motion):
    scene = vw.VideoScene("white", (obj(motion=motion),))
    video = vw.render(scene, random.Random(3))
    assert video.shape == (vw.NUM_FRAMES, vw.FRAME_SIZE, vw.FRAME_SIZE, 3) and video.dtype == np.uint8
    track = np.stack([centroid((f != world.BACKGROUNDS["white"]).any(-1)) for f in video])
    travel = track[-1] - track[0]
    dy, dx = vw.MOTIONS[motion][1]
    along = travel[0] * dy + travel[1] * dx
    assert along > 0.6 * vw.FRAME_SIZE, travel  # edge to edge, the right way
    assert abs(travel[0] * dx + travel[1] * dy) < 1e-6  # straight, in its lane
    steps = np.diff(track, axis=0) @ np.array([dy, dx], float)
    assert np.allclose(steps, steps[0], atol=0.6)  # constant speed (pixel rounding aside)
    assert (video == np.array(world.COLORS["red"], np.uint8)).all(-1).any(axis=(1, 2)).all()  # fully drawn


def test_a_still_object_stays_in_its_cell_and_render_without_rng_is_fixed():
    scene = vw.VideoScene("gray", (obj("yellow", "triangle", "static", (2, 0)),))
    video = vw.render(scene)
    assert (video == video[0]).all()
    cy, cx = centroid((video[0] != world.BACKGROUNDS["gray"]).any(-1))
    step = vw.FRAME_SIZE / world.GRID
    assert (int(cy // step), int(cx // step)) == (2, 0)
    assert (vw.render(scene) == video).all()
    longer = vw.render(scene, frames=16)
    assert longer.shape[0] == 16


def test_two_objects_never_touch_in_any_frame():
    rng = random.Random(1)
    for _ in range(60):
        s = vw.sample_scene(rng, two_object_prob=1.0)
        paths = vw.layout(s, rng)
        masks = [vw._masks(o.shape, p, vw.FRAME_SIZE) for o, p in zip(s.objects, paths)]
        for a, b in zip(*masks):
            assert not (vw._dilate(a) & b).any()


def test_prompt_sets_are_fixed_distinct_and_a_seed_apart():
    a = vw.prompt_set(10, 10, seed=0)
    assert a == vw.prompt_set(10, 10, seed=0)
    assert len(set(a)) == 20
    assert all(len(s.objects) == 1 for s in a[:10]) and all(len(s.objects) == 2 for s in a[10:])
    assert a != vw.prompt_set(10, 10, seed=1)


def test_the_sampler_covers_every_motion_colour_shape_and_background():
    rng = random.Random(2)
    scenes = [vw.sample_scene(rng) for _ in range(400)]
    objs = [o for s in scenes for o in s.objects]
    assert {o.motion for o in objs} == set(vw.MOTIONS)
    assert {o.color for o in objs} == set(world.COLORS) and {o.shape for o in objs} == set(world.SHAPES)
    assert {s.background for s in scenes} == set(world.BACKGROUNDS)
    assert 0.3 < np.mean([len(s.objects) == 2 for s in scenes]) < 0.7
