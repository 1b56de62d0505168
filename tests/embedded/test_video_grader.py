"""The video checker (safe_dit.embedded.video_grader) against rendered ground truth and wrong videos.

Ground truth: seeded sampled scenes (one and two objects, every motion), clean and degraded (3x3 box blur,
then Gaussian noise of sigma 12 levels), must all be graded right on every attribute. Negative controls:
each kind of wrong video (reversed frames, a frozen frame, another colour, shape or background, a missing or an
extra object, a still object in another cell, noise) turns the attribute it breaks False.
"""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest

from safe_dit.config import SafeDitError
from safe_dit.embedded import video_grader as vg
from safe_dit.embedded import video_world as vw

KEYS = (*vg.ATTRIBUTES, "all")


def degrade(video: np.ndarray, rng: np.random.Generator, sigma: float = 12.0) -> np.ndarray:
    f = video.astype(np.float64)
    p = np.pad(f, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    h, w = video.shape[1:3]
    blur = sum(p[:, dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)) / 9.0
    return np.clip(blur + rng.normal(0.0, sigma, video.shape), 0, 255).round().astype(np.uint8)


def measure(name, videos_and_scenes) -> dict[str, float]:
    acc = vg.accuracy([vg.grade(v, s) for v, s in videos_and_scenes])
    print(f"\n{name}: " + ", ".join(f"{k} {acc[k]:.2%}" for k in KEYS))
    return acc


def test_ground_truth_is_graded_right_on_every_attribute():
    rng = random.Random(0)
    scenes = [vw.sample_scene(rng, two_object_prob=0.6) for _ in range(200)]
    assert {o.motion for s in scenes for o in s.objects} == set(vw.MOTIONS)
    acc = measure("clean renders, 200 scenes", [(vw.render(s, rng), s) for s in scenes])
    assert acc == {k: 1.0 for k in KEYS}


def test_degraded_ground_truth_is_graded_right():
    rng, noise = random.Random(1), np.random.default_rng(1)
    scenes = [vw.sample_scene(rng, two_object_prob=0.6) for _ in range(60)]
    acc = measure("blurred + noisy renders, 60 scenes", [(degrade(vw.render(s, rng), noise), s) for s in scenes])
    assert acc == {k: 1.0 for k in KEYS}


def test_float_videos_in_0_1_read_as_uint8_ones():
    s = vw.VideoScene("gray", (vw.VideoObj("blue", "square", "top-bottom"),))
    assert vg.grade(vw.render(s) / 255.0, s)["all"]


def test_tracks_report_direction_travel_and_cell():
    s = vw.VideoScene("black", (vw.VideoObj("red", "circle", "right-left"),
                                vw.VideoObj("green", "triangle", "static", (2, 1))))
    det = vg.detect_video(vw.render(s, random.Random(4)))
    assert len(det.tracks) == 2
    by_color = {t.color: t for t in det.tracks}
    assert by_color["red"].motion == "right-left" and by_color["red"].travel[1] < -15
    assert by_color["green"].motion == vw.STATIC and by_color["green"].cell == (2, 1)
    assert all(len(t.frames) == vw.NUM_FRAMES for t in det.tracks)


MOVING = vw.VideoScene("white", (vw.VideoObj("red", "circle", "left-right"),
                                 vw.VideoObj("blue", "square", "bottom-top")))


def wrong(video: np.ndarray, scene: vw.VideoScene) -> dict[str, bool]:
    g = vg.grade(video, scene)
    assert not g["all"]
    return g


def test_reversed_frames_get_the_direction_wrong_and_only_that():
    g = wrong(vw.render(MOVING)[::-1], MOVING)
    assert g == dict(background=True, color=True, shape=True, motion=False, count=True, all=False)


def test_a_frozen_frame_is_not_motion():
    video = np.repeat(vw.render(MOVING)[:1], vw.NUM_FRAMES, axis=0)
    assert not wrong(video, MOVING)["motion"]


def test_a_still_object_in_another_cell_is_wrong_motion():
    s = vw.VideoScene("gray", (vw.VideoObj("red", "circle", "static", (0, 0)),))
    other = vw.VideoScene("gray", (vw.VideoObj("red", "circle", "static", (0, 1)),))
    assert wrong(vw.render(other), s) == dict(background=True, color=True, shape=True, motion=False, count=True,
                                              all=False)


@pytest.mark.parametrize("field,value,attribute", [("color", "green", "color"), ("shape", "triangle", "shape")])
def test_another_colour_or_shape_is_caught(field, value, attribute):
    a, b = MOVING.objects
    drawn = vw.VideoScene(MOVING.background, (dataclasses.replace(a, **{field: value}), b))
    g = wrong(vw.render(drawn), MOVING)
    assert not g[attribute] and g["motion"] and g["count"]


def test_another_background_is_caught():
    drawn = vw.VideoScene("black", MOVING.objects)
    assert not wrong(vw.render(drawn), MOVING)["background"]


def test_a_missing_or_an_extra_object_is_a_wrong_count():
    one = vw.VideoScene(MOVING.background, MOVING.objects[:1])
    g = wrong(vw.render(one), MOVING)
    assert not g["count"] and not g["color"] and not g["motion"]
    assert not wrong(vw.render(MOVING), one)["count"]


def test_an_object_that_vanishes_for_some_frames_is_caught():
    video = vw.render(MOVING).copy()
    single = vw.render(vw.VideoScene(MOVING.background, MOVING.objects[:1]))
    video[2:6] = single[2:6]  # the square is gone for half the video
    g = wrong(video, MOVING)
    assert not g["count"]


def test_noise_and_blank_videos_pass_nothing_useful():
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (vw.NUM_FRAMES, vw.FRAME_SIZE, vw.FRAME_SIZE, 3), dtype=np.uint8)
    assert not vg.grade(noise, MOVING)["all"]
    blank = np.full_like(noise, 245)
    g = wrong(blank, MOVING)
    assert g["background"] and not g["count"] and not g["color"]


def test_bad_inputs_are_refused():
    with pytest.raises(SafeDitError):
        vg.detect_video(np.zeros((vw.FRAME_SIZE, vw.FRAME_SIZE, 3), np.uint8))  # one image, not a video
    with pytest.raises(SafeDitError):
        vg.detect_video(np.zeros((1, vw.FRAME_SIZE, vw.FRAME_SIZE, 3), np.uint8))
    with pytest.raises(SafeDitError):
        vg.accuracy([])


def test_two_touching_objects_of_one_colour_are_counted_as_two():
    frame = np.empty((vw.FRAME_SIZE, vw.FRAME_SIZE, 3), np.uint8)
    frame[:] = vw.world.BACKGROUNDS["gray"]
    for cx in (10.0, 20.0):  # radius 5: the circles touch
        frame[vw.world.shape_mask("circle", 16.0, cx, vw.RADIUS, vw.FRAME_SIZE)] = vw.world.COLORS["red"]
    _, objs = vg.detect_frame(frame)
    assert [o.color for o in objs] == ["red", "red"]
    assert [round(o.centroid[1]) for o in sorted(objs, key=lambda o: o.centroid[1])] == [10, 20]


def test_sixteen_frame_videos_are_graded_like_eight_frame_ones():
    rng = random.Random(3)
    for _ in range(10):
        s = vw.sample_scene(rng, frames=16)
        assert vg.grade(vw.render(s, rng, frames=16), s)["all"]
