"""Automatic checker for videos of the moving-shapes world (:mod:`safe_dit.embedded.video_world`).

:func:`detect_video` reads a video [F, S, S, 3] and says what it sees: per frame the background and the
objects (colour, shape, centroid), and the objects' tracks across frames with the motion each track makes.
:func:`grade` compares that with the intended :class:`~safe_dit.embedded.video_world.VideoScene`
attribute by attribute; :func:`accuracy` averages grades. Deterministic, numpy only.

How it works (pixel sizes at ``video_world.FRAME_SIZE`` and scaled by ``S / FRAME_SIZE``):

1. Each frame as the image checker reads an image (:mod:`safe_dit.embedded.grader`, whose steps it reuses):
   the background is the per-channel median named by the nearest background colour, the foreground is what
   lies farther than a threshold from a plane fitted to the background, split into 8-connected components.
   Components under ``MIN_OBJECT_FRACTION`` of an object's area are dropped; a component holding two
   object colours (two objects that touch) is split by colour, one of one colour larger than
   ``MAX_OBJECT_FRACTION`` objects is cut in two along its principal axis. Each object's colour and shape are the image
   checker's (the median of its more saturated half, named by the nearest object colour; the best-fitting
   anti-aliased shape template).
2. Tracks: objects are linked from frame to frame, nearest centroid first, a jump of at most ``MAX_JUMP`` of
   the frame side per frame; an object no track takes starts a new track. Tracks seen in fewer than half the
   frames are flicker, not objects.
3. Motion of a track: the least-squares slope of its centroid over the frames times the video's length is its
   travel (dy, dx). Under ``STATIC_TRAVEL`` of the full edge-to-edge travel it is still, in the grid cell of
   its mean centroid; otherwise its direction is the sign of the larger component.
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np

from safe_dit.config import SafeDitError
from safe_dit.embedded import grader, video_world, world

#: An object is a component of at least this fraction of a circle's area (smaller ones are speckles).
MIN_OBJECT_FRACTION = 0.25
#: A one-colour component larger than this many times the largest object's area is two objects that touch,
#: and is cut in two.
MAX_OBJECT_FRACTION = 1.5
#: Most a tracked object moves between consecutive frames, as a fraction of the frame side (the world's
#: objects move about 0.09 of it per frame at 8 frames).
MAX_JUMP = 0.3
#: A track that travels under this fraction of the edge-to-edge travel is still.
STATIC_TRAVEL = 0.25
#: An object's colour (shape) is right when it has it in at least this fraction of the video's frames
#: (a frame where it is not seen counts as wrong).
FRAME_AGREEMENT = 0.75
#: Keys of a :func:`grade` result, in order; ``all`` is every one of them at once.
ATTRIBUTES = ("background", "color", "shape", "motion", "count")


@dataclasses.dataclass(frozen=True)
class FrameObject:
    """One object seen in one frame: colour and shape names, centroid (y, x) in pixels, foreground pixels."""

    color: str
    shape: str
    centroid: tuple[float, float]
    pixels: int


@dataclasses.dataclass(frozen=True)
class Track:
    """One object followed through the video: the frames it is seen in and what it is in each, the majority
    colour and shape, its travel (dy, dx) in pixels, its motion (a ``video_world.MOTIONS`` key) and, when
    still, its grid cell."""

    frames: tuple[int, ...]
    colors: tuple[str, ...]
    shapes: tuple[str, ...]
    centroids: tuple[tuple[float, float], ...]
    color: str
    shape: str
    travel: tuple[float, float]
    motion: str
    cell: tuple[int, int] | None


@dataclasses.dataclass(frozen=True)
class VideoDetection:
    """What :func:`detect_video` saw: the majority background name, per frame the background name and the
    objects, and the tracks (flicker dropped) ordered by first frame, then by centroid."""

    background: str
    frame_backgrounds: tuple[str, ...]
    frames: tuple[tuple[FrameObject, ...], ...]
    tracks: tuple[Track, ...]


def _as_video(video) -> np.ndarray:
    arr = np.asarray(video)
    if arr.ndim != 4:
        raise SafeDitError(f"expected a video of shape [F, H, W, 3], got {arr.ndim} dimension(s) {arr.shape}")
    if arr.shape[0] < video_world.MIN_FRAMES:
        raise SafeDitError(f"a video needs at least {video_world.MIN_FRAMES} frames to show motion, "
                           f"got {arr.shape[0]}")
    return arr


def _halves(pix: np.ndarray, size: int) -> list[np.ndarray]:
    """Flat pixel indices ``pix`` cut in two along their principal axis (2-means on the projection, started at
    its ends): two objects of one colour that touch."""
    pts = np.stack(np.divmod(pix, size), axis=1).astype(np.float64)
    pts -= pts.mean(0)
    axis = np.linalg.svd(pts, full_matrices=False)[2][0]
    proj = pts @ axis
    lo, hi = proj.min(), proj.max()
    for _ in range(20):
        near_hi = np.abs(proj - hi) < np.abs(proj - lo)
        if near_hi.all() or not near_hi.any():
            return [pix]
        lo, hi = proj[~near_hi].mean(), proj[near_hi].mean()
    return [pix[~near_hi], pix[near_hi]]


def _describe(img: np.ndarray, bg_map: np.ndarray, pix: np.ndarray) -> tuple[str, str]:
    """Colour and shape of the object made of flat pixel indices ``pix``, as the image checker's step 4 finds
    them (:func:`safe_dit.embedded.grader._describe`), with shape templates anti-aliased by 4 x 4 subsamples per
    pixel (the image checker takes more at small sizes; 4 tell the shapes apart at 32 px, in a quarter of the
    time)."""
    size = img.shape[0]
    flat_rgb, flat_bg = img.reshape(-1, 3), bg_map.reshape(-1, 3)
    dist = np.sqrt(((flat_rgb[pix] - flat_bg[pix]) ** 2).sum(-1))
    obj_rgb = np.median(flat_rgb[pix[dist >= np.median(dist)]], axis=0)
    color = grader._COLOR_NAMES[int(grader._nearest(obj_rgb[None], grader._COLOR_RGB)[0])]
    region = np.zeros(size * size, bool)
    region[pix] = True
    region = grader._dilate(region.reshape(size, size))
    axis = obj_rgb - flat_bg[pix].mean(axis=0)
    coverage = (img - bg_map) @ axis / max(float(axis @ axis), 1e-9)
    ys, xs = np.nonzero(region & (coverage >= 0.5))
    if ys.size < 0.5 * pix.size:  # no usable colour axis: the foreground pixels
        ys, xs = np.divmod(pix, size)
    shape, _ = grader._classify_shape(ys, xs, world.IMAGE_SIZE)  # image_size sets the subsampling: 4 at 64
    return color, shape


def detect_frame(frame) -> tuple[str, tuple[FrameObject, ...]]:
    """(background name, objects) of one frame [S, S, 3] (uint8 in [0, 255] or floats in [0, 1])."""
    img = grader._as_rgb(frame)
    size = img.shape[0]
    bg_rgb, bg_map, fg = grader._foreground(img)
    background = grader._BACKGROUND_NAMES[int(grader._nearest(bg_rgb[None], grader._BACKGROUND_RGB)[0])]
    min_pixels = MIN_OBJECT_FRACTION * video_world.object_area("circle", size)
    max_pixels = MAX_OBJECT_FRACTION * max(video_world.object_area(s, size) for s in world.SHAPES)
    idx = np.flatnonzero(fg)
    if not idx.size:
        return background, ()
    labs = grader._label(fg).ravel()[idx]
    order = np.argsort(labs, kind="stable")
    idx, labs = idx[order], labs[order]
    flat_rgb, flat_bg = img.reshape(-1, 3), bg_map.reshape(-1, 3)
    objects = []
    for comp in np.split(idx, np.flatnonzero(labs[1:] != labs[:-1]) + 1):
        if comp.size < min_pixels:
            continue
        k = grader._segment_colour(flat_rgb[comp], flat_bg[comp])
        parts = [comp[k == c] for c in np.unique(k)]
        big = [p for p in parts if p.size >= min_pixels]
        pieces = big if len(big) > 1 else [comp]  # two objects that touch: one piece per colour
        pieces = [q for p in pieces for q in (_halves(p, size) if p.size > max_pixels else [p])]
        for pix in pieces:
            ys, xs = np.divmod(pix, size)
            color, shape = _describe(img, bg_map, pix)
            objects.append(FrameObject(color, shape, (float(ys.mean()) + 0.5, float(xs.mean()) + 0.5), int(pix.size)))
    return background, tuple(sorted(objects, key=lambda o: o.centroid))


def _majority(values: tuple[str, ...]) -> str:
    return max(sorted(set(values)), key=values.count)


def _motion(frames: tuple[int, ...], centroids, n_frames: int, size: int) -> tuple[tuple[float, float], str,
                                                                                     tuple[int, int] | None]:
    pts = np.asarray(centroids, np.float64)
    if len(frames) >= 2:
        t = np.asarray(frames, np.float64)
        slope = ((t - t.mean())[:, None] * (pts - pts.mean(0))).sum(0) / ((t - t.mean()) ** 2).sum()
        travel = slope * (n_frames - 1)
    else:
        travel = np.zeros(2)
    full = size - 2 * (video_world.RADIUS * size / video_world.FRAME_SIZE + 1.0)
    dy, dx = float(travel[0]), float(travel[1])
    if max(abs(dy), abs(dx)) < STATIC_TRAVEL * full:
        cy, cx = pts.mean(0)
        step = size / world.GRID
        cell = (min(int(cy / step), world.GRID - 1), min(int(cx / step), world.GRID - 1))
        return (dy, dx), video_world.STATIC, cell
    direction = (0, int(np.sign(dx))) if abs(dx) >= abs(dy) else (int(np.sign(dy)), 0)
    motion = next(m for m, (_, d) in video_world.MOTIONS.items() if d == direction)
    return (dy, dx), motion, None


def _link(frames: list[tuple[FrameObject, ...]], size: int) -> list[list[tuple[int, FrameObject]]]:
    """Tracks as lists of (frame index, object): greedy nearest-centroid linking frame by frame."""
    tracks: list[list[tuple[int, FrameObject]]] = []
    gate = MAX_JUMP * size
    for f, objs in enumerate(frames):
        pairs = sorted(
            (math.dist(tr[-1][1].centroid, o.centroid) / (f - tr[-1][0]), i, j)
            for i, tr in enumerate(tracks) for j, o in enumerate(objs)
        )
        taken_t, taken_o = set(), set()
        for d, i, j in pairs:
            if d <= gate and i not in taken_t and j not in taken_o and tracks[i][-1][0] < f:
                tracks[i].append((f, objs[j]))
                taken_t.add(i)
                taken_o.add(j)
        tracks += [[(f, o)] for j, o in enumerate(objs) if j not in taken_o]
    return tracks


def detect_video(video) -> VideoDetection:
    """Backgrounds, objects and tracks seen in ``video`` [F, S, S, 3] (see the module docstring for how)."""
    arr = _as_video(video)
    n, size = arr.shape[0], arr.shape[1]
    seen = [detect_frame(frame) for frame in arr]
    frames = [objs for _, objs in seen]
    tracks = []
    for tr in _link(frames, size):
        if 2 * len(tr) < n:
            continue
        idx = tuple(f for f, _ in tr)
        colors, shapes = tuple(o.color for _, o in tr), tuple(o.shape for _, o in tr)
        cents = tuple(o.centroid for _, o in tr)
        travel, motion, cell = _motion(idx, cents, n, size)
        tracks.append(Track(idx, colors, shapes, cents, _majority(colors), _majority(shapes), travel, motion, cell))
    tracks.sort(key=lambda t: (t.frames[0], t.centroids[0]))
    backgrounds = tuple(b for b, _ in seen)
    return VideoDetection(_majority(backgrounds), backgrounds, tuple(frames), tuple(tracks))


def _agrees(track: Track | None, attr: str, value: str, n_frames: int) -> bool:
    if track is None:
        return False
    return sum(v == value for v in getattr(track, attr + "s")) >= FRAME_AGREEMENT * n_frames


def _motion_right(track: Track | None, o: video_world.VideoObj) -> bool:
    return track is not None and track.motion == o.motion and track.cell == o.cell


def _match(scene: video_world.VideoScene, tracks: tuple[Track, ...], n_frames: int) -> list[Track | None]:
    """For each intended object, the track it is judged against (or None): the injective assignment with the
    fewest unmatched objects, then the fewest wrong motions, then the fewest wrong colours and shapes."""
    best, best_key = None, None
    for choice in itertools.product([None, *range(len(tracks))], repeat=len(scene.objects)):
        used = [c for c in choice if c is not None]
        if len(used) != len(set(used)):
            continue
        got = [None if c is None else tracks[c] for c in choice]
        key = (sum(t is None for t in got),
               sum(not _motion_right(t, o) for o, t in zip(scene.objects, got)),
               sum((not _agrees(t, "color", o.color, n_frames)) + (not _agrees(t, "shape", o.shape, n_frames))
                   for o, t in zip(scene.objects, got)))
        if best_key is None or key < best_key:
            best, best_key = got, key
    return best


def grade(video, scene: video_world.VideoScene) -> dict[str, bool]:
    """Per-attribute verdict of ``video`` [F, S, S, 3] against the intended ``scene``.

    Each intended object is matched to one track (:func:`_match`). Then:

    - ``background``: the background named in most frames is the scene's;
    - ``color`` / ``shape``: every intended object's track has that colour / shape in at least
      ``FRAME_AGREEMENT`` of the video's frames;
    - ``motion``: every intended object's track makes its motion: the direction it moves in, or, for a still
      object, staying still in its cell;
    - ``count``: every frame shows exactly as many objects as the scene holds;
    - ``all``: every one of the above.
    """
    det = detect_video(video)
    n = len(det.frames)
    got = _match(scene, det.tracks, n)
    g = {
        "background": det.background == scene.background,
        "color": all(_agrees(t, "color", o.color, n) for o, t in zip(scene.objects, got)),
        "shape": all(_agrees(t, "shape", o.shape, n) for o, t in zip(scene.objects, got)),
        "motion": all(_motion_right(t, o) for o, t in zip(scene.objects, got)),
        "count": all(len(objs) == len(scene.objects) for objs in det.frames),
    }
    g["all"] = all(g.values())
    return g


def accuracy(grades: list[dict]) -> dict[str, float]:
    """Fraction of grades right per attribute (keys ``ATTRIBUTES`` and ``all``): the image checker's average over
    this checker's attributes."""
    return grader.accuracy(grades, ATTRIBUTES)
