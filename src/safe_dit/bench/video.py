"""Video files of a run: the frames as an animated WebP (Pillow, no extra dependency), read back frame by frame, and
the sensitivity strip (one heat map per latent frame, side by side). Shared by ``generate`` and any command that
writes a video; the writes go through ``write_together`` (atomic, nothing half-written).

WebP stores a duration per frame and its encoder merges identical consecutive frames into one longer frame, so
:func:`read_video` expands each stored frame by its duration: a still video reads back with all its frames."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

VIDEO_SUFFIXES = (".webp",)
QUALITY = 90  # lossy WebP quality (0..100)


def video_frames(frames) -> list:
    """RGB PIL images from a pipeline's frames of one video: a list of PIL images, or an array [F, H, W, 3]
    (floats in [0, 1] as diffusers' ``output_type="np"`` gives them, or uint8)."""
    import numpy as np
    from PIL import Image

    if isinstance(frames, (list, tuple)) and frames and isinstance(frames[0], Image.Image):
        return [f.convert("RGB") for f in frames]
    array = np.asarray(frames)
    if array.ndim != 4 or array.shape[-1] != 3:
        raise ValueError(f"video frames must be [F, H, W, 3], got shape {array.shape}")
    if array.dtype != np.uint8:
        array = (np.clip(array, 0.0, 1.0) * 255).round().astype(np.uint8)
    return [Image.fromarray(frame) for frame in array]


def _durations(count: int, fps: float) -> list[int]:
    """Whole milliseconds per frame whose running sums stay within half a millisecond of ``i * 1000 / fps``."""
    edges = [round(i * 1000 / fps) for i in range(count + 1)]
    return [b - a for a, b in zip(edges, edges[1:])]


def save_video(frames, path, fps: float) -> None:
    """Write ``frames`` (see :func:`video_frames`) to ``path`` as an animated WebP at ``fps``, looping (not atomic:
    :func:`write_video` and ``write_together`` are)."""
    images = video_frames(frames)
    if not images:
        raise ValueError("a video needs at least one frame")
    if not 0 < fps <= 1000:
        raise ValueError(f"fps must be in (0, 1000], got {fps}")
    images[0].save(path, format="WEBP", save_all=True, append_images=images[1:], duration=_durations(len(images), fps),
                   loop=0, quality=QUALITY, method=4)


@dataclass(frozen=True)
class Video:
    """Frames and a frame rate, saved like a PIL image (``write_together`` writes it beside images and a JSON)."""

    frames: list
    fps: float

    def save(self, path) -> None:
        save_video(self.frames, path, self.fps)


def write_video(frames, path: Path, fps: float) -> None:
    """Write ``frames`` (a list of PIL images or an array [F, H, W, 3]) to ``path`` (.webp) at ``fps``, atomically:
    a temporary file renamed into place, so an error or Ctrl-C leaves no half-written video."""
    from safe_dit.bench.files import write_together

    write_together({Path(path): Video(frames, fps)}, {}, None)


def read_video(path, fps: float) -> list:
    """The frames of a video :func:`save_video` wrote at ``fps``, as RGB PIL images: each stored frame repeated for
    as many frames as its duration spans (the encoder merges identical consecutive frames)."""
    from PIL import Image, ImageSequence

    frames, start = [], 0
    with Image.open(path) as video:
        for frame in ImageSequence.Iterator(video):
            rgb = frame.convert("RGB")  # loads the frame, and with it its duration
            end = start + frame.info["duration"]
            frames += [rgb] * (round(end * fps / 1000) - round(start * fps / 1000))
            start = end
    return frames


def sensitivity_strip(sensitivity, grid: tuple[int, int, int], size: tuple[int, int], frames=None):
    """One PNG-ready image: the [N] sensitivity map of a (frames, h, w) token grid as one heat map per latent frame,
    each ``size`` = (height, width) pixels, side by side; with ``frames`` (the video's frames) each map is blended
    over the video frame at the same point in time."""
    import numpy as np
    import torch
    from matplotlib import colormaps
    from PIL import Image

    t, h, w = grid
    height, width = size
    heat = sensitivity.detach().float().cpu().view(t, 1, h, w)
    heat = torch.nn.functional.interpolate(heat, size=(height, width), mode="nearest")[:, 0].numpy()
    panels = [Image.fromarray((colormaps["inferno"](panel)[..., :3] * 255).astype(np.uint8)) for panel in heat]
    if frames is not None:
        video = video_frames(frames)
        at = [round(i * (len(video) - 1) / max(t - 1, 1)) for i in range(t)]  # latent frame i <-> this video frame
        panels = [Image.blend(video[j].resize((width, height)), panel, alpha=0.5) for j, panel in zip(at, panels)]
    strip = Image.new("RGB", (width * t, height))
    for i, panel in enumerate(panels):
        strip.paste(panel, (i * width, 0))
    return strip
