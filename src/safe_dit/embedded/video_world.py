"""The moving-shapes world the embedded video model is trained on: the shapes world in motion.

A video scene is one or two flat-coloured objects (the colours, shapes and backgrounds of
:mod:`safe_dit.embedded.world`) that each either move straight across the frame (left to right,
right to left, top to bottom or bottom to top, from one edge to the other at constant speed) or
stay in one cell of the 3x3 grid. :func:`render` draws ``NUM_FRAMES`` frames, :func:`caption`
says it in words::

    a red circle moving from the left to the right on a white background
    a blue square at the top left and a green triangle moving from the bottom to the top on a black background

The lane a moving object travels in (its row for a horizontal motion, its column for a vertical
one) is not in the caption: :func:`render` draws it at random, so the model learns any lane. Two
objects never touch: :func:`render` redraws lanes and jitter until their paths keep at least a
pixel of background between them in every frame. The checker is :mod:`safe_dit.embedded.video_grader`.
"""

from __future__ import annotations

import dataclasses
import math
import random

import numpy as np

from safe_dit.embedded import world

FRAME_SIZE = 32
NUM_FRAMES = 8
#: Object radius in pixels at ``FRAME_SIZE`` (scaled with the frame side). A little larger than the image
#: world's (8 of 64) so that shapes stay distinct at 32 px.
RADIUS = 5.0
#: Max offset of a still object's centre from its cell centre, pixels at ``FRAME_SIZE``.
JITTER = 1.0
STATIC = "static"
#: Motion name -> (the caption's words, unit direction (dy, dx)). The order is the captions' order.
MOTIONS = {
    "left-right": ("moving from the left to the right", (0, 1)),
    "right-left": ("moving from the right to the left", (0, -1)),
    "top-bottom": ("moving from the top to the bottom", (1, 0)),
    "bottom-top": ("moving from the bottom to the top", (-1, 0)),
    STATIC: ("at the", (0, 0)),
}
MOTION_OF = {words: name for name, (words, _) in MOTIONS.items() if name != STATIC}
MIN_FRAMES, MAX_FRAMES = 2, 16
LAYOUT_ATTEMPTS = 500


@dataclasses.dataclass(frozen=True)
class VideoObj:
    """One object: colour and shape as in :mod:`safe_dit.embedded.world`, ``motion`` a key of ``MOTIONS``;
    ``cell`` (row, col) is where a still object stays, ``None`` for a moving one."""

    color: str
    shape: str
    motion: str
    cell: tuple[int, int] | None = None

    def __post_init__(self):
        if self.color not in world.COLORS:
            raise ValueError(f"unknown colour {self.color!r}; choose from {sorted(world.COLORS)}")
        if self.shape not in world.SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; choose from {list(world.SHAPES)}")
        if self.motion not in MOTIONS:
            raise ValueError(f"unknown motion {self.motion!r}; choose from {list(MOTIONS)}")
        if (self.motion == STATIC) != (self.cell is not None):
            raise ValueError("a still object has a cell, a moving one has none")
        if self.cell is not None and self.cell not in world.POSITIONS:
            raise ValueError(f"cell {self.cell!r} is not on the {world.GRID}x{world.GRID} grid")

    @property
    def direction(self) -> tuple[int, int]:
        return MOTIONS[self.motion][1]

    def words(self) -> str:
        if self.motion == STATIC:
            return f"a {self.color} {self.shape} at the {world.POSITIONS[self.cell]}"
        return f"a {self.color} {self.shape} {MOTIONS[self.motion][0]}"


def _order(o: VideoObj) -> tuple:
    return list(MOTIONS).index(o.motion), o.cell or (0, 0), o.color, o.shape


@dataclasses.dataclass(frozen=True)
class VideoScene:
    """A background name and one or two objects, kept in caption order (see :func:`caption`)."""

    background: str
    objects: tuple[VideoObj, ...]

    def __post_init__(self):
        if self.background not in world.BACKGROUNDS:
            raise ValueError(f"unknown background {self.background!r}; choose from {sorted(world.BACKGROUNDS)}")
        if not 1 <= len(self.objects) <= 2:
            raise ValueError("a video scene holds one or two objects")
        cells = [o.cell for o in self.objects if o.cell is not None]
        if len(set(cells)) != len(cells):
            raise ValueError("two still objects cannot share a grid cell")
        object.__setattr__(self, "objects", tuple(sorted(self.objects, key=_order)))


def caption(scene: VideoScene) -> str:
    """The objects' words joined by "and", then the background. Objects are listed in a fixed order (motion
    in ``MOTIONS`` order, a still one by its cell in reading order, then colour and shape), as the image world
    fixes its order: the order is a cue for which words belong to which object."""
    return " and ".join(o.words() for o in scene.objects) + f" on a {scene.background} background"


def parse_caption(text: str) -> VideoScene:
    """Inverse of :func:`caption`; raises ValueError for anything else."""
    words = " ".join(text.strip().lower().split())
    if " on a " not in words or not words.endswith(" background"):
        raise ValueError(f"not a moving-shapes caption: {text!r}")
    body, bg = words.rsplit(" on a ", 1)
    objects = []
    for part in body.split(" and "):
        head, sep, position = part.partition(" at the ")
        motion = STATIC if sep else None
        if not sep:
            for phrase, name in MOTION_OF.items():
                if part.endswith(" " + phrase):
                    head, motion = part[: -len(phrase) - 1], name
        if motion is None or not head.startswith("a ") or (sep and position not in world.CELL_OF):
            raise ValueError(f"not a moving-shapes caption: {text!r}")
        color, _, shape = head[2:].partition(" ")
        objects.append(VideoObj(color, shape, motion, world.CELL_OF[position] if sep else None))
    return VideoScene(bg.removesuffix(" background"), tuple(objects))


def in_world(text: str) -> bool:
    """True iff ``text`` is a caption of this world."""
    try:
        parse_caption(text)
    except ValueError:
        return False
    return True


VOCABULARY_HINT = ("'a COLOR SHAPE MOTION [and a COLOR SHAPE MOTION] on a BACKGROUND background', MOTION "
                   + "/".join(f"'{w}'" for w in MOTION_OF) + " or 'at the POSITION', "
                   + f"COLOR {'/'.join(world.COLORS)}, SHAPE {'/'.join(world.SHAPES)}, "
                   + f"POSITION {'/'.join(world.CELL_OF)}, BACKGROUND {'/'.join(world.BACKGROUNDS)}")


def sample_scene(rng: random.Random, two_object_prob: float = 0.5, static_prob: float = 0.2,
                 frames: int = NUM_FRAMES, size: int = FRAME_SIZE) -> VideoScene:
    """A random scene: one or two objects, each still (probability ``static_prob``, in a random cell) or moving
    in one of the four directions, with a random colour, shape and background. Every scene it returns can be
    rendered at ``frames`` x ``size`` (two objects whose paths always collide there are redrawn)."""
    while True:
        background = rng.choice(sorted(world.BACKGROUNDS))
        n = 2 if rng.random() < two_object_prob else 1
        cells = rng.sample(sorted(world.POSITIONS), n)
        moving = [m for m in MOTIONS if m != STATIC]
        objects = []
        for cell in cells:
            still = rng.random() < static_prob
            objects.append(VideoObj(rng.choice(sorted(world.COLORS)), rng.choice(world.SHAPES),
                                    STATIC if still else rng.choice(moving), cell if still else None))
        scene = VideoScene(background, tuple(objects))
        if layout(scene, random.Random(rng.random()), frames, size) is not None:
            return scene


def _path(o: VideoObj, rng: random.Random, frames: int, size: int) -> np.ndarray:
    """[frames, 2] (y, x) centres of one object in pixels."""
    scale = size / FRAME_SIZE
    if o.motion == STATIC:
        cy, cx = world.cell_center(o.cell, size)
        cy += rng.uniform(-JITTER, JITTER) * scale
        cx += rng.uniform(-JITTER, JITTER) * scale
        return np.tile([cy, cx], (frames, 1))
    margin = RADIUS * scale + 1.0
    lane = rng.uniform(margin, size - margin)
    dy, dx = o.direction
    along = np.linspace(margin, size - margin, frames)
    if dy + dx < 0:  # right to left, bottom to top
        along = along[::-1]
    ys = along if dy else np.full(frames, lane)
    xs = along if dx else np.full(frames, lane)
    return np.stack([ys, xs], axis=1)


def layout(scene: VideoScene, rng: random.Random, frames: int = NUM_FRAMES,
           size: int = FRAME_SIZE) -> np.ndarray | None:
    """Object centres [n_objects, frames, 2] (y, x) in pixels, drawn with ``rng`` until no two objects come
    closer than a pixel of background in any frame; None when ``LAYOUT_ATTEMPTS`` draws all collide."""
    if not MIN_FRAMES <= frames <= MAX_FRAMES:
        raise ValueError(f"a video has {MIN_FRAMES} to {MAX_FRAMES} frames, not {frames}")
    for _ in range(LAYOUT_ATTEMPTS):
        paths = np.stack([_path(o, rng, frames, size) for o in scene.objects])
        if len(scene.objects) == 1:
            return paths
        masks = [_masks(o.shape, p, size) for o, p in zip(scene.objects, paths)]
        if not any((_dilate(a) & b).any() for a, b in zip(*masks)):
            return paths
    return None


def _masks(shape: str, path: np.ndarray, size: int) -> list[np.ndarray]:
    r = RADIUS * size / FRAME_SIZE
    return [world.shape_mask(shape, cy, cx, r, size) for cy, cx in path]


def _dilate(mask: np.ndarray) -> np.ndarray:
    p = np.pad(mask, 1)
    h, w = mask.shape
    out = mask.copy()
    for dy in range(3):
        for dx in range(3):
            out |= p[dy:dy + h, dx:dx + w]
    return out


def render(scene: VideoScene, rng: random.Random | None = None, frames: int = NUM_FRAMES,
           size: int = FRAME_SIZE) -> np.ndarray:
    """uint8 [frames, size, size, 3]. ``rng`` draws the lanes of moving objects and the jitter of still ones;
    without it a fixed draw (``random.Random(0)``) is used, so the same scene renders the same."""
    paths = layout(scene, rng if rng is not None else random.Random(0), frames, size)
    if paths is None:
        raise ValueError(f"the objects of {caption(scene)!r} collide in every layout tried")
    video = np.empty((frames, size, size, 3), np.uint8)
    video[:] = world.BACKGROUNDS[scene.background]
    for o, path in zip(scene.objects, paths):
        for f, mask in enumerate(_masks(o.shape, path, size)):
            video[f][mask] = world.COLORS[o.color]
    return video


def object_area(shape: str, size: int = FRAME_SIZE) -> float:
    """Pixel area of one object of ``shape`` at frame side ``size``."""
    r = RADIUS * size / FRAME_SIZE
    return {"circle": math.pi * r * r, "square": (1.8 * r) ** 2, "triangle": 2 * r * r}[shape]


def prompt_set(n_single: int, n_two: int, seed: int = 0) -> list[VideoScene]:
    """A fixed prompt set: ``n_single`` distinct one-object scenes, then ``n_two`` distinct two-object scenes,
    drawn with ``seed``. The model is trained on seeds of its own; another seed gives a held-out set."""
    rng = random.Random(seed)
    out: list[VideoScene] = []
    for n, prob in ((n_single, 0.0), (n_two, 1.0)):
        chosen: list[VideoScene] = []
        while len(chosen) < n:
            s = sample_scene(rng, two_object_prob=prob)
            if s not in chosen:
                chosen.append(s)
        out += chosen
    return out
