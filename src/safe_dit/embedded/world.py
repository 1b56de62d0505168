"""The synthetic "shapes" world the embedded default model is trained on.

A scene is one or two flat-coloured objects (circle, square, triangle) on a plain background,
each in one cell of a 3x3 grid. ``render`` draws it, ``caption`` describes it in words. The same
vocabulary is used by the checker that grades generated images (``safe_dit.embedded.grader``).
"""

from __future__ import annotations

import dataclasses
import random

import numpy as np

IMAGE_SIZE = 64
GRID = 3
#: Object colours (RGB) and background colours. No object colour equals a background colour.
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (235, 205, 40),
}
BACKGROUNDS = {
    "white": (245, 245, 245),
    "gray": (128, 128, 128),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle")
#: Grid cell (row, col) -> words, row-major from the top left.
POSITIONS = {
    (0, 0): "top left", (0, 1): "top center", (0, 2): "top right",
    (1, 0): "middle left", (1, 1): "center", (1, 2): "middle right",
    (2, 0): "bottom left", (2, 1): "bottom center", (2, 2): "bottom right",
}
CELL_OF = {words: cell for cell, words in POSITIONS.items()}
RADIUS = 8  # half the object's extent in pixels at IMAGE_SIZE 64
JITTER = 2  # max offset of an object's centre from its cell centre, pixels


@dataclasses.dataclass(frozen=True)
class Obj:
    color: str
    shape: str
    cell: tuple[int, int]

    def __post_init__(self):
        if self.color not in COLORS:
            raise ValueError(f"unknown colour {self.color!r}; choose from {sorted(COLORS)}")
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; choose from {list(SHAPES)}")
        if self.cell not in POSITIONS:
            raise ValueError(f"cell {self.cell!r} is not on the {GRID}x{GRID} grid")

    @property
    def position(self) -> str:
        return POSITIONS[self.cell]


@dataclasses.dataclass(frozen=True)
class Scene:
    background: str
    objects: tuple[Obj, ...]

    def __post_init__(self):
        if self.background not in BACKGROUNDS:
            raise ValueError(f"unknown background {self.background!r}; choose from {sorted(BACKGROUNDS)}")
        if not 1 <= len(self.objects) <= 2:
            raise ValueError("a scene holds one or two objects")
        if len({o.cell for o in self.objects}) != len(self.objects):
            raise ValueError("two objects cannot share a grid cell")


def caption(scene: Scene) -> str:
    """``"a red circle at the top left on a gray background"``; two objects joined by "and", listed in
    reading order (top to bottom, left to right). The fixed order is part of the world's grammar: it gives
    the small embedded model a second cue (order, besides the position words) for which attributes belong to
    which object; with objects listed in random order it placed both objects right but swapped their colours
    and shapes about half the time."""
    parts = [f"a {o.color} {o.shape} at the {o.position}" for o in sorted(scene.objects, key=lambda o: o.cell)]
    return " and ".join(parts) + f" on a {scene.background} background"


VOCABULARY_HINT = (f"'a COLOR SHAPE at the POSITION [and a COLOR SHAPE at the POSITION] on a BACKGROUND background', "
                   f"COLOR {'/'.join(COLORS)}, SHAPE {'/'.join(SHAPES)}, POSITION {'/'.join(CELL_OF)}, "
                   f"BACKGROUND {'/'.join(BACKGROUNDS)}")


def in_world(text: str) -> bool:
    """True iff ``text`` is a caption of this world, every word in its vocabulary."""
    try:
        scene = parse_caption(text)
    except ValueError:
        return False
    return scene.background in BACKGROUNDS and 1 <= len(scene.objects) <= 2 and all(
        o.color in COLORS and o.shape in SHAPES for o in scene.objects)


def parse_caption(text: str) -> Scene:
    """Inverse of :func:`caption` (used to grade images generated from a prompt)."""
    words = text.strip().lower()
    if " on a " not in words or not words.endswith(" background"):
        raise ValueError(f"not a shapes caption: {text!r}")
    body, bg = words.rsplit(" on a ", 1)
    objects = []
    for part in body.split(" and "):
        tokens = part.split(" at the ")
        if len(tokens) != 2 or not tokens[0].startswith("a "):
            raise ValueError(f"not a shapes caption: {text!r}")
        color, _, shape = tokens[0][2:].partition(" ")
        if tokens[1] not in CELL_OF:
            raise ValueError(f"unknown position {tokens[1]!r} in {text!r}")
        objects.append(Obj(color, shape, CELL_OF[tokens[1]]))
    return Scene(bg.removesuffix(" background"), tuple(objects))


def sample_scene(rng: random.Random, two_object_prob: float = 0.5) -> Scene:
    background = rng.choice(sorted(BACKGROUNDS))
    n = 2 if rng.random() < two_object_prob else 1
    cells = sorted(rng.sample(sorted(POSITIONS), n))  # reading order, as captions list them
    objects = tuple(Obj(rng.choice(sorted(COLORS)), rng.choice(SHAPES), c) for c in cells)
    return Scene(background, objects)


def cell_center(cell: tuple[int, int], size: int = IMAGE_SIZE) -> tuple[float, float]:
    """(y, x) pixel centre of a grid cell."""
    step = size / GRID
    return (cell[0] + 0.5) * step, (cell[1] + 0.5) * step


def shape_mask(shape: str, cy: float, cx: float, radius: float, size: int = IMAGE_SIZE) -> np.ndarray:
    """Boolean [size, size] mask of one shape centred at (cy, cx) (pixel centres at +0.5)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    dy, dx = yy - cy, xx - cx
    if shape == "circle":
        return dy * dy + dx * dx <= radius * radius
    if shape == "square":
        r = radius * 0.9  # about the circle's area
        return (np.abs(dy) <= r) & (np.abs(dx) <= r)
    if shape == "triangle":  # apex up, base at the bottom
        t = (dy + radius) / (2 * radius)  # 0 at the apex, 1 at the base
        return (t >= 0) & (t <= 1) & (np.abs(dx) <= t * radius)
    raise ValueError(f"unknown shape {shape!r}")


def render(scene: Scene, rng: random.Random | None = None, size: int = IMAGE_SIZE) -> np.ndarray:
    """uint8 [size, size, 3]. With ``rng`` each object's centre is jittered by up to JITTER pixels
    (scaled with size); without it objects sit exactly at their cell centres."""
    scale = size / IMAGE_SIZE
    img = np.empty((size, size, 3), np.uint8)
    img[:] = BACKGROUNDS[scene.background]
    for o in scene.objects:
        cy, cx = cell_center(o.cell, size)
        if rng is not None:
            cy += rng.uniform(-JITTER, JITTER) * scale
            cx += rng.uniform(-JITTER, JITTER) * scale
        img[shape_mask(o.shape, cy, cx, RADIUS * scale, size)] = COLORS[o.color]
    return img


def all_single_scenes() -> list[Scene]:
    """Every one-object scene, in a fixed order."""
    return [
        Scene(bg, (Obj(c, s, cell),))
        for bg in sorted(BACKGROUNDS) for c in sorted(COLORS) for s in SHAPES for cell in sorted(POSITIONS)
    ]
