"""The automatic checker (safe_dit.embedded.grader) against rendered ground truth.

Accuracy is measured on ``world.render`` with jitter over seeded sampled scenes (one and two
objects) plus every one-object scene, clean, degraded (3x3 box blur, then Gaussian noise of
sigma 12 levels) and upscaled to 128 px. Negative controls check that each attribute goes False
when that attribute of the scene is wrong, and that empty or random images are not passed.
Every measured accuracy is printed (``pytest -s`` shows it).
"""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest
from PIL import Image

from safe_dit.config import SafeDitError
from safe_dit.embedded import grader, world

KEYS = (*grader.ATTRIBUTES, "all")


def scene_set(n_sampled: int = 500, seed: int = 0) -> list[world.Scene]:
    """``n_sampled`` seeded scenes (about half with two objects), then every one-object scene."""
    rng = random.Random(seed)
    return [world.sample_scene(rng) for _ in range(n_sampled)] + world.all_single_scenes()


def box_blur(img: np.ndarray, k: int = 3) -> np.ndarray:
    """k x k mean filter (edge-padded), float."""
    f = img.astype(np.float64)
    p = np.pad(f, ((k // 2, k // 2), (k // 2, k // 2), (0, 0)), mode="edge")
    h, w = img.shape[:2]
    return sum(p[dy:dy + h, dx:dx + w] for dy in range(k) for dx in range(k)) / (k * k)


def degrade(img: np.ndarray, rng: np.random.Generator, sigma: float = 12.0) -> np.ndarray:
    """Slight blur (3x3 box), then Gaussian noise of ``sigma`` levels, back to uint8."""
    return np.clip(box_blur(img) + rng.normal(0.0, sigma, img.shape), 0, 255).round().astype(np.uint8)


def measure(name: str, images_and_scenes) -> dict[str, float]:
    grades = [grader.grade(img, scene) for img, scene in images_and_scenes]
    acc = grader.accuracy(grades)
    print(f"\n{name} ({len(grades)} images): " + ", ".join(f"{k} {acc[k]:.2%}" for k in KEYS))
    return acc


def single(color="red", shape="circle", cell=(1, 1), background="gray") -> world.Scene:
    return world.Scene(background, (world.Obj(color, shape, cell),))


# ---------------------------------------------------------------- accuracy on ground truth


def test_clean_renders_with_jitter():
    scenes = scene_set()
    assert len(scenes) >= 500 + 324 and any(len(s.objects) == 2 for s in scenes)
    acc = measure("clean", ((world.render(s, random.Random(i)), s) for i, s in enumerate(scenes)))
    for k in KEYS:
        assert acc[k] >= 0.99, (k, acc[k])


def test_blurred_noisy_renders():
    scenes = scene_set(seed=1)
    rng = np.random.default_rng(1)
    acc = measure("blur 3x3 + noise sigma 12",
                  ((degrade(world.render(s, random.Random(i)), rng), s) for i, s in enumerate(scenes)))
    for k in KEYS:
        assert acc[k] >= 0.97, (k, acc[k])


def test_upscaled_128_renders():
    scenes = scene_set(n_sampled=150, seed=2)[:150] + world.all_single_scenes()[::4]
    acc = measure("128 px", ((world.render(s, random.Random(i), size=128), s) for i, s in enumerate(scenes)))
    for k in KEYS:
        assert acc[k] >= 0.99, (k, acc[k])
    rng = np.random.default_rng(2)
    acc = measure("128 px, blur 3x3 + noise sigma 12",
                  ((degrade(world.render(s, random.Random(i), size=128), rng), s) for i, s in enumerate(scenes)))
    for k in KEYS:
        assert acc[k] >= 0.97, (k, acc[k])


def test_detection_contents():
    scene = world.Scene("white", (world.Obj("blue", "triangle", (0, 2)), world.Obj("yellow", "square", (2, 0))))
    det = grader.detect(world.render(scene, random.Random(0)))
    assert det.background == "white"
    assert [(f.color, f.shape, f.cell) for f in det.objects] == [("blue", "triangle", (0, 2)),
                                                                ("yellow", "square", (2, 0))]
    for f in det.objects:
        assert f.pixels > 100 and 0.9 <= f.color_share <= 1.0 and 0.8 < f.shape_iou <= 1.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        det.background = "black"
    # deterministic, and the same for a PIL image, a float image and an int64 array
    img = world.render(scene, random.Random(0))
    assert grader.detect(img) == det
    assert grader.detect(Image.fromarray(img)) == det
    assert grader.detect(img.astype(np.float32) / 255.0).objects == det.objects
    assert grader.detect(img.astype(np.int64)) == det
    assert grader.detect(Image.fromarray(img).convert("RGBA")) == det


def test_adjacent_objects_blurred_together():
    """Neighbouring objects jittered towards each other and blurred still count as two."""
    rng = np.random.default_rng(3)
    for color2 in ("red", "blue"):  # same colour (split along the grid line) and different colours
        scene = world.Scene("black", (world.Obj("red", "square", (1, 0)), world.Obj(color2, "square", (1, 1))))
        img = np.empty((64, 64, 3), np.uint8)
        img[:] = world.BACKGROUNDS["black"]
        for o, dx in zip(scene.objects, (+2, -2)):
            cy, cx = world.cell_center(o.cell)
            img[world.shape_mask(o.shape, cy, cx + dx, world.RADIUS)] = world.COLORS[o.color]
        g = grader.grade(degrade(img, rng), scene)
        assert g["all"], (color2, g)


# ---------------------------------------------------------------- negative controls


def _others_true(g: dict, wrong: str) -> None:
    assert g[wrong] is False and g["all"] is False, g
    for k in grader.ATTRIBUTES:
        if k != wrong:
            assert g[k] is True, (wrong, k, g)


@pytest.mark.parametrize("noisy", [False, True])
def test_each_wrong_attribute_is_caught(noisy):
    rng = random.Random(4)
    nrng = np.random.default_rng(4)
    for i in range(60):
        scene = world.sample_scene(rng)
        img = world.render(scene, random.Random(i))
        if noisy:
            img = degrade(img, nrng)
        assert grader.grade(img, scene)["all"]
        objs = list(scene.objects)
        o = objs[0]
        other_colors = [c for c in sorted(world.COLORS) if c != o.color]
        other_shapes = [s for s in world.SHAPES if s != o.shape]
        free = [c for c in sorted(world.POSITIONS) if c not in {x.cell for x in objs}]
        wrong = {
            "color": dataclasses.replace(o, color=rng.choice(other_colors)),
            "shape": dataclasses.replace(o, shape=rng.choice(other_shapes)),
            "position": dataclasses.replace(o, cell=rng.choice(free)),
        }
        for attr, obj in wrong.items():
            _others_true(grader.grade(img, world.Scene(scene.background, (obj, *objs[1:]))), attr)
        bg = rng.choice([b for b in sorted(world.BACKGROUNDS) if b != scene.background])
        _others_true(grader.grade(img, dataclasses.replace(scene, background=bg)), "background")


def test_object_count_mismatch():
    two = world.Scene("gray", (world.Obj("red", "circle", (0, 0)), world.Obj("blue", "square", (2, 2))))
    img = world.render(two, random.Random(0))
    # the image holds an extra object: only count is wrong
    _others_true(grader.grade(img, world.Scene("gray", two.objects[:1])), "count")
    # the image misses the second object: count, and that object's colour/shape/position
    g = grader.grade(world.render(world.Scene("gray", two.objects[:1]), random.Random(0)), two)
    assert g == dict(background=True, color=False, shape=False, position=False, count=False, all=False)


def test_empty_background_fails_count():
    for bg, rgb in world.BACKGROUNDS.items():
        img = np.empty((64, 64, 3), np.uint8)
        img[:] = rgb
        det = grader.detect(img)
        assert det.background == bg and det.objects == ()
        g = grader.grade(img, single(background=bg))
        assert g["background"] and not g["count"] and not g["all"]
        assert not (g["color"] or g["shape"] or g["position"])
        # with noise as well
        noisy = degrade(img, np.random.default_rng(5))
        assert grader.detect(noisy).objects == ()


def test_random_noise_is_not_all_correct():
    rng = np.random.default_rng(6)
    scenes = scene_set(n_sampled=20, seed=6)[:20]
    for scene in scenes:
        img = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
        assert not grader.grade(img, scene)["all"]
        smooth = np.clip(box_blur(img, 5), 0, 255).astype(np.uint8)  # low-contrast mush
        assert not grader.grade(smooth, scene)["all"]


def test_matching_rules():
    # drawn one cell off: colour and shape are still judged, position is wrong
    img = world.render(single("green", "triangle", (0, 0)), random.Random(0))
    g = grader.grade(img, single("green", "triangle", (0, 1)))
    assert g == dict(background=True, color=True, shape=True, position=False, count=True, all=False)
    # two objects with their colours swapped: positions right, colour wrong, shapes right
    a, b = world.Obj("red", "circle", (0, 1)), world.Obj("blue", "circle", (2, 1))
    img = world.render(world.Scene("white", (a, b)), random.Random(0))
    swapped = world.Scene("white", (dataclasses.replace(a, color="blue"), dataclasses.replace(b, color="red")))
    _others_true(grader.grade(img, swapped), "color")
    # an object at its own cell is matched there even when a tie would allow a swap
    scene = world.Scene("gray", (world.Obj("red", "square", (0, 1)), world.Obj("blue", "circle", (0, 0))))
    drawn = world.Scene("gray", (world.Obj("blue", "circle", (0, 1)), world.Obj("red", "square", (0, 2))))
    g = grader.grade(world.render(drawn, random.Random(0)), scene)
    assert g["count"] and not g["position"] and not g["color"]


def test_accuracy():
    t = dict.fromkeys(KEYS, True)
    f = dict(t, shape=False, all=False)
    acc = grader.accuracy([t, f, t, t])
    assert acc == dict(background=1.0, color=1.0, shape=0.75, position=1.0, count=1.0, all=0.75)
    with pytest.raises(SafeDitError):
        grader.accuracy([])


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("bad, match", [
    (np.zeros((64, 64), np.uint8), "dimension"),
    (np.zeros((2, 64, 64, 3), np.uint8), "dimension"),
    (np.zeros((64, 64, 4), np.uint8), "channels"),
    (np.zeros((64, 64, 1), np.uint8), "channels"),
    (np.zeros((3, 64, 64), np.uint8), "channels"),
    (np.zeros((64, 48, 3), np.uint8), "square"),
    (np.zeros((8, 8, 3), np.uint8), "minimum"),
    (np.full((64, 64, 3), 2.0), r"\[0, 1\]"),
    (np.full((64, 64, 3), np.nan), r"\[0, 1\]"),
    (np.full((64, 64, 3), 300), r"\[0, 255\]"),
    (np.zeros((64, 64, 3), bool), "dtype"),
])
def test_bad_input(bad, match):
    with pytest.raises(SafeDitError, match=match):
        grader.detect(bad)
    with pytest.raises(ValueError):  # SafeDitError is a ValueError
        grader.grade(bad, single())
