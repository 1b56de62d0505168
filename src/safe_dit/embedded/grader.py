"""Automatic checker for images of the synthetic shapes world (:mod:`safe_dit.embedded.world`).

:func:`detect` reads an image and says what it sees (background, and per grid cell an object's
colour and shape); :func:`grade` compares that with the intended :class:`~safe_dit.embedded.world.Scene`
attribute by attribute; :func:`accuracy` averages grades. Everything is deterministic, numpy only,
and meant to hold up on images from a diffusion model: noise, slight blur, colours off by some
tens of levels, stray speckles, imperfect shapes.

How :func:`detect` works (pixel sizes are given at 64 px and scaled by ``size / 64``):

1. Background: the per-channel median of all pixels (objects cover at most ~10% of the image),
   named by the nearest ``world.BACKGROUNDS`` colour.
2. Foreground: pixels farther (RGB distance) than a threshold from the background. The threshold
   is half the background's distance to the nearest object colour, clipped to
   ``THRESHOLD_RANGE``. A second pass measures the distance from a per-channel plane fitted to
   the first pass's background pixels, so a background that drifts smoothly is not foreground.
3. 8-connected components of the foreground; those under ``MIN_COMPONENT_FRACTION`` of an
   object's area are speckles and dropped. A component larger than ``SPLIT_EXTENT`` object
   diameters (neighbouring objects blurred together, a smear) is split by colour, then what is
   still too large along the grid lines. Each piece goes to the grid cell holding its centroid,
   so an object that spills a little over a cell boundary still counts for its own cell.
4. A cell holds an object when its pieces reach ``MIN_OBJECT_FRACTION`` of ``OBJECT_AREA``.
   Colour: the ``world.COLORS`` entry nearest the median of its more saturated half of pixels
   (blurred edges, mixed with the background, do not vote). Shape: the pixels (plus a one-pixel
   ring) whose coverage along background -> object colour is at least 1/2 (a blurred edge is
   cut at half contrast, which keeps the geometry), compared with an anti-aliased
   ``world.shape_mask`` template of each shape with the same area and centroid; the highest
   IoU wins (a circle only by ``CIRCLE_MARGIN``).
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np

from safe_dit.config import SafeDitError
from safe_dit.embedded import world

#: Area of one object at ``world.IMAGE_SIZE`` in pixels (circle ~201, square ~207, triangle ~128).
OBJECT_AREA = 200.0
#: A cell holds an object when its foreground pixels reach this fraction of ``OBJECT_AREA``.
MIN_OBJECT_FRACTION = 0.25
#: Connected components smaller than this fraction of ``OBJECT_AREA`` are speckles and ignored.
MIN_COMPONENT_FRACTION = 0.05
#: A component whose height or width exceeds this many object diameters is split (by colour, then
#: along the grid lines).
SPLIT_EXTENT = 1.5
#: Foreground threshold (RGB distance from the background) is half the background's distance to
#: the nearest object colour, clipped to this range.
THRESHOLD_RANGE = (40.0, 90.0)
#: Blur rounds corners: it turns squares and triangles towards circles, never the reverse. So the
#: circle template's IoU must beat the others by this margin to win.
CIRCLE_MARGIN = 0.02
#: Below this fraction of background pixels no background plane is fitted (module docstring, 2.).
MIN_BACKGROUND_FRACTION = 0.5
#: Smallest accepted image side in pixels.
MIN_SIZE = 16
#: Keys of a :func:`grade` result, in order; ``all`` is every other one at once.
ATTRIBUTES = ("background", "color", "shape", "position", "count")

_COLOR_NAMES = tuple(sorted(world.COLORS))
_COLOR_RGB = np.array([world.COLORS[c] for c in _COLOR_NAMES], np.float64)
_BACKGROUND_NAMES = tuple(sorted(world.BACKGROUNDS))
_BACKGROUND_RGB = np.array([world.BACKGROUNDS[b] for b in _BACKGROUND_NAMES], np.float64)


@dataclasses.dataclass(frozen=True)
class Found:
    """One detected object: names as in :mod:`safe_dit.embedded.world`, ``cell`` = (row, col).

    ``pixels`` is its foreground pixel count, ``color_share`` the fraction of its more saturated
    half of pixels whose nearest object colour is ``color`` (1.0 = uniformly that colour),
    ``shape_iou`` the soft IoU of its shape with the best-fitting anti-aliased template (0.93 to
    1.0 on clean renders, where the second-best shape scores about 0.1 less).
    """

    color: str
    shape: str
    cell: tuple[int, int]
    pixels: int
    color_share: float
    shape_iou: float


@dataclasses.dataclass(frozen=True)
class Detection:
    """What :func:`detect` saw: the nearest background name, the measured background colour
    (RGB, the per-channel median) and the objects, one per occupied cell in row-major order."""

    background: str
    background_rgb: tuple[float, float, float]
    objects: tuple[Found, ...]


def _as_rgb(image) -> np.ndarray:
    """float64 [S, S, 3] in 0..255 from a PIL image, an integer array in [0, 255] (uint8), or a
    float array in [0, 1]."""
    if hasattr(image, "convert") and hasattr(image, "mode"):  # PIL.Image, without importing PIL
        image = np.asarray(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.ndim != 3:
        raise SafeDitError(f"expected an image of shape [H, W, 3], got {arr.ndim} dimension(s) {arr.shape}")
    if arr.shape[2] != 3:
        raise SafeDitError(f"expected 3 (RGB) channels in the last axis, got shape {arr.shape}")
    if arr.shape[0] != arr.shape[1]:
        raise SafeDitError(f"expected a square image, got {arr.shape[0]}x{arr.shape[1]}")
    if arr.shape[0] < MIN_SIZE:
        raise SafeDitError(f"image side {arr.shape[0]} is below the minimum of {MIN_SIZE} pixels")
    if np.issubdtype(arr.dtype, np.integer):
        if arr.min() < 0 or arr.max() > 255:
            raise SafeDitError("an integer image must hold values in [0, 255]")
        return arr.astype(np.float64)
    if np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all() or arr.min() < 0.0 or arr.max() > 1.0:
            raise SafeDitError("a float image must hold finite values in [0, 1]")
        return arr.astype(np.float64) * 255.0
    raise SafeDitError(f"expected integer values in [0, 255] or floats in [0, 1], got dtype {arr.dtype}")


def _label(mask: np.ndarray) -> np.ndarray:
    """8-connected component labels of a boolean mask (0 = background); labels are arbitrary
    positive ints, equal within a component. Max-label propagation with pointer jumping."""
    h, w = mask.shape
    ids = np.arange(1, h * w + 1, dtype=np.int64).reshape(h, w)
    lab = np.where(mask, ids, 0)
    while True:
        p = np.pad(lab, 1)
        nb = lab.copy()
        for dy in (0, 1, 2):
            for dx in (0, 1, 2):
                np.maximum(nb, p[dy:dy + h, dx:dx + w], out=nb)
        nb = np.where(mask, nb, 0)
        # pointer jumping: a label names a pixel; take that pixel's (possibly larger) label
        flat = np.concatenate(([0], nb.ravel()))
        nb = np.where(mask, flat[nb], 0)
        if np.array_equal(nb, lab):
            return lab
        lab = nb


def _dilate(mask: np.ndarray) -> np.ndarray:
    """3x3 (8-neighbour) binary dilation."""
    h, w = mask.shape
    p = np.pad(mask, 1)
    out = mask.copy()
    for dy in (0, 1, 2):
        for dx in (0, 1, 2):
            out |= p[dy:dy + h, dx:dx + w]
    return out


def _background_plane(img: np.ndarray, is_bg: np.ndarray, fallback: np.ndarray) -> np.ndarray:
    """Per-channel least-squares plane a + b*y + c*x through the pixels ``is_bg``, as an image
    [S, S, 3]; the constant ``fallback`` colour when under ``MIN_BACKGROUND_FRACTION`` of the
    image is background (a noise image, say)."""
    size = img.shape[0]
    if is_bg.mean() < MIN_BACKGROUND_FRACTION:
        return np.broadcast_to(fallback, img.shape)
    yy, xx = np.mgrid[0:size, 0:size] / size - 0.5
    design = np.stack([np.ones_like(yy), yy, xx], axis=-1)
    coef, *_ = np.linalg.lstsq(design[is_bg], img[is_bg], rcond=None)
    return design @ coef


def _segment_colour(rgb: np.ndarray, bg: np.ndarray) -> np.ndarray:
    """Index of the object colour whose segment background -> colour passes nearest each pixel
    (``rgb``, ``bg``: [N, 3]): a blurred edge, a mix of object and background, still gets its
    object's colour."""
    axes = _COLOR_RGB[None, :, :] - bg[:, None, :]  # [N, K, 3]
    off = (rgb - bg)[:, None, :]
    t = np.clip((off * axes).sum(-1) / np.maximum((axes * axes).sum(-1), 1e-9), 0.0, 1.0)
    return (((off - t[..., None] * axes) ** 2).sum(-1)).argmin(1)


def _extent(pix: np.ndarray, size: int) -> int:
    """Larger side of the bounding box of flat pixel indices ``pix``."""
    ys, xs = np.divmod(pix, size)
    return int(max(ys.max() - ys.min(), xs.max() - xs.min())) + 1


def _grid_split(pix: np.ndarray, size: int) -> list[np.ndarray]:
    """Flat pixel indices ``pix`` cut along the grid lines, one array per grid cell touched."""
    ys, xs = np.divmod(pix, size)
    step = size / world.GRID
    cells = (np.minimum((ys / step).astype(int), world.GRID - 1) * world.GRID
             + np.minimum((xs / step).astype(int), world.GRID - 1))
    return [pix[cells == c] for c in np.unique(cells)]


def _nearest(rgb: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """Index of the nearest palette colour for each row of ``rgb`` [N, 3]."""
    d = ((rgb[:, None, :] - palette[None, :, :]) ** 2).sum(-1)
    return d.argmin(1)


def _template(shape: str, area: float, cy: float, cx: float, size: int, ss: int) -> np.ndarray:
    """Anti-aliased ``world.shape_mask`` of ``shape`` with the given area and centroid in a
    [size, size] window (pixel centres at +0.5): float coverage in [0, 1] from ``ss`` x ``ss``
    subsamples per pixel."""
    if shape == "circle":
        r = math.sqrt(area / math.pi)
    elif shape == "square":
        r = math.sqrt(area) / 1.8  # side 2 * 0.9 r
    else:  # triangle: base 2r, height 2r, centroid r/3 below the bounding-box centre
        r = math.sqrt(area / 2.0)
        cy -= r / 3.0
    fine = world.shape_mask(shape, cy * ss, cx * ss, r * ss, size * ss)
    return fine.reshape(size, ss, size, ss).mean(axis=(1, 3))


def _classify_shape(ys: np.ndarray, xs: np.ndarray, image_size: int) -> tuple[str, float]:
    """Best-fitting shape of the pixel set (``ys``, ``xs``) and its IoU.

    Each ``world.SHAPES`` template gets the set's area and centroid and is anti-aliased (so a
    pixel-aligned square is not penalised for sub-pixel placement); the score is the soft IoU
    (sum of minima over sum of maxima) with the set. The highest score wins, except that the
    circle must win by ``CIRCLE_MARGIN``.
    """
    area = float(len(ys))
    cy, cx = float(ys.mean()) + 0.5, float(xs.mean()) + 0.5
    # a window around the centroid that holds every template (the triangle reaches 1.34 r up)
    h = math.ceil(1.4 * math.sqrt(area / 2.0)) + 2
    y0, x0 = int(cy) - h, int(cx) - h
    win = 2 * h + 1
    wy, wx = ys - y0, xs - x0
    inside = (wy >= 0) & (wy < win) & (wx >= 0) & (wx < win)
    obj = np.zeros((win, win))
    obj[wy[inside], wx[inside]] = 1.0
    outside = float((~inside).sum())
    ss = max(1, math.ceil(4 * world.IMAGE_SIZE / image_size))
    scores = {}
    for s in world.SHAPES:
        t = _template(s, area, cy - y0, cx - x0, win, ss)
        scores[s] = float(np.minimum(t, obj).sum() / (np.maximum(t, obj).sum() + outside))
    best = max(scores, key=lambda s: scores[s] - (CIRCLE_MARGIN if s == "circle" else 0.0))
    return best, scores[best]


def _foreground(img: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Steps 1-2 of :func:`detect`: (median background colour [3], background image [S, S, 3],
    foreground mask [S, S])."""
    bg_rgb = np.median(img.reshape(-1, 3), axis=0)
    contrast = float(np.sqrt(((_COLOR_RGB - bg_rgb) ** 2).sum(-1)).min())
    threshold = float(np.clip(0.5 * contrast, *THRESHOLD_RANGE))
    fg = np.sqrt(((img - bg_rgb) ** 2).sum(-1)) > threshold
    bg_map = _background_plane(img, ~_dilate(fg), bg_rgb)
    fg = np.sqrt(((img - bg_map) ** 2).sum(-1)) > threshold
    return bg_rgb, bg_map, fg


def _pieces_by_cell(img: np.ndarray, bg_map: np.ndarray, fg: np.ndarray) -> dict[tuple[int, int], np.ndarray]:
    """Step 3 of :func:`detect`: flat indices of the foreground pixels that belong to each cell."""
    size = img.shape[0]
    scale = size / world.IMAGE_SIZE
    min_component = MIN_COMPONENT_FRACTION * OBJECT_AREA * scale * scale
    max_extent = SPLIT_EXTENT * 2 * world.RADIUS * scale
    step = size / world.GRID
    flat_rgb, flat_bg = img.reshape(-1, 3), bg_map.reshape(-1, 3)
    idx = np.flatnonzero(fg)
    if not idx.size:
        return {}
    labs = _label(fg).ravel()[idx]
    order = np.argsort(labs, kind="stable")
    idx, labs = idx[order], labs[order]
    cells: dict[tuple[int, int], list[np.ndarray]] = {}
    for comp in np.split(idx, np.flatnonzero(labs[1:] != labs[:-1]) + 1):
        if comp.size < min_component:
            continue
        pieces = [comp]
        if _extent(comp, size) > max_extent:  # by colour first, then along the grid lines
            k = _segment_colour(flat_rgb[comp], flat_bg[comp])
            pieces = [comp[k == c] for c in np.unique(k)]
            pieces = [q for p in pieces for q in (_grid_split(p, size) if _extent(p, size) > max_extent else [p])]
        for piece in pieces:
            ys, xs = np.divmod(piece, size)
            cell = (min(int((ys.mean() + 0.5) / step), world.GRID - 1),
                    min(int((xs.mean() + 0.5) / step), world.GRID - 1))
            cells.setdefault(cell, []).append(piece)
    return {c: np.concatenate(p) for c, p in sorted(cells.items())}


def _describe(img: np.ndarray, bg_map: np.ndarray, pix: np.ndarray, cell: tuple[int, int]) -> Found:
    """Step 4 of :func:`detect`: colour and shape of the object made of flat pixel indices ``pix``."""
    size = img.shape[0]
    flat_rgb, flat_bg = img.reshape(-1, 3), bg_map.reshape(-1, 3)
    dist = np.sqrt(((flat_rgb[pix] - flat_bg[pix]) ** 2).sum(-1))
    core = flat_rgb[pix[dist >= np.median(dist)]]
    obj_rgb = np.median(core, axis=0)
    k = int(_nearest(obj_rgb[None], _COLOR_RGB)[0])
    share = float((_nearest(core, _COLOR_RGB) == k).mean())
    # geometry: the pixels and a one-pixel ring around them (blurred edges under the foreground
    # threshold) whose coverage along background -> object colour is at least 1/2
    region = np.zeros(size * size, bool)
    region[pix] = True
    region = _dilate(region.reshape(size, size))
    axis = obj_rgb - flat_bg[pix].mean(axis=0)
    coverage = (img - bg_map) @ axis / max(float(axis @ axis), 1e-9)
    ys, xs = np.nonzero(region & (coverage >= 0.5))
    if ys.size < 0.5 * pix.size:  # no usable colour axis: fall back to the foreground pixels
        ys, xs = np.divmod(pix, size)
    shape, iou = _classify_shape(ys, xs, size)
    return Found(_COLOR_NAMES[k], shape, cell, int(pix.size), share, iou)


def detect(image) -> Detection:
    """Background and objects seen in ``image`` (see the module docstring for how).

    ``image``: a square RGB image as a uint8 (or other integer) array [S, S, 3] in [0, 255], a
    float array in [0, 1], or a PIL image (converted to RGB); any side length (geometry is scaled by ``S / 64``).
    Raises
    :class:`~safe_dit.config.SafeDitError` (a ``ValueError``) for anything else.
    """
    img = _as_rgb(image)
    scale = img.shape[0] / world.IMAGE_SIZE
    bg_rgb, bg_map, fg = _foreground(img)
    background = _BACKGROUND_NAMES[int(_nearest(bg_rgb[None], _BACKGROUND_RGB)[0])]
    objects = tuple(
        _describe(img, bg_map, pix, cell)
        for cell, pix in _pieces_by_cell(img, bg_map, fg).items()
        if pix.size >= MIN_OBJECT_FRACTION * OBJECT_AREA * scale * scale
    )
    return Detection(background, tuple(float(v) for v in bg_rgb), objects)


def _match(intended: tuple[world.Obj, ...], found: tuple[Found, ...]) -> list[Found | None]:
    """For each intended object, the detected object it is judged against (or None).

    The injective assignment that, in this order of priority, leaves the fewest intended objects
    unmatched, puts the most of them on a detection at their own cell, has the smallest summed
    grid distance, and the fewest colour and shape disagreements. So an object at its own cell
    is always matched there, and an object drawn at another cell is still judged on its colour
    and shape.
    """
    best, best_key = None, None
    for choice in itertools.product([None, *range(len(found))], repeat=len(intended)):
        used = [c for c in choice if c is not None]
        if len(used) != len(set(used)):
            continue
        pairs = [(o, found[c]) for o, c in zip(intended, choice) if c is not None]
        key = (len(intended) - len(pairs),
               sum(f.cell != o.cell for o, f in pairs),
               round(sum(math.dist(o.cell, f.cell) for o, f in pairs), 9),
               sum((f.color != o.color) + (f.shape != o.shape) for o, f in pairs))
        if best_key is None or key < best_key:
            best, best_key = choice, key
    return [None if c is None else found[c] for c in best]


def grade(image, scene: world.Scene) -> dict[str, bool]:
    """Per-attribute verdict of ``image`` against the intended ``scene``.

    Each intended object is matched to one detected object (nearest grid cell first, see
    :func:`_match`). Then:

    - ``background``: the detected background name equals the scene's;
    - ``color`` / ``shape``: every intended object has a match of that colour / shape (wherever
      it was found: a red circle drawn one cell off is right on colour and shape, wrong on
      position);
    - ``position``: every intended object has a match at its own cell;
    - ``count``: exactly as many objects were detected as the scene holds;
    - ``all``: every one of the above.

    An intended object with no match makes ``color``, ``shape`` and ``position`` false.
    """
    det = detect(image)
    matches = _match(scene.objects, det.objects)
    g = {
        "background": det.background == scene.background,
        "color": all(m is not None and m.color == o.color for o, m in zip(scene.objects, matches)),
        "shape": all(m is not None and m.shape == o.shape for o, m in zip(scene.objects, matches)),
        "position": all(m is not None and m.cell == o.cell for o, m in zip(scene.objects, matches)),
        "count": len(det.objects) == len(scene.objects),
    }
    g["all"] = all(g.values())
    return g


def accuracy(grades: list[dict], attributes: tuple[str, ...] = ATTRIBUTES) -> dict[str, float]:
    """Fraction of grades right per attribute (keys ``attributes``, by default this checker's, and ``all``)."""
    grades = list(grades)
    if not grades:
        raise SafeDitError("accuracy of an empty list of grades is undefined")
    return {k: sum(bool(g[k]) for g in grades) / len(grades) for k in (*attributes, "all")}
