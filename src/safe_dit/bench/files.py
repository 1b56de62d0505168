"""Writing a run's files: checked before any work, written atomically together (shared by ``generate`` and
``study make``)."""

from __future__ import annotations

import json
import os
import signal
import tempfile
from pathlib import Path

from safe_dit.config import SafeDitError


def check_out(out: Path, video: bool = False) -> None:
    """--out names a new or existing image file (``video``: an animated .webp) in a writable directory (checked
    before any work)."""
    if video and out.suffix.lower() != ".webp":
        raise SafeDitError(f"--out must end in .webp for a video model (an animated WebP), got {out.name!r}")
    if video:
        from PIL import features

        if not features.check("webp"):
            raise SafeDitError("this Pillow was built without WebP, which a video is written as: install Pillow's "
                               "wheel from PyPI (pip install --force-reinstall pillow)")
    if out.suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp"):
        raise SafeDitError(f"--out must end in .png, .jpg or .webp, got {out.name!r}")
    if out.is_dir():
        example = "video.webp" if video else "image.png"
        raise SafeDitError(f"--out {str(out)!r} is a directory: name the {'video' if video else 'image'} file, "
                           f"e.g. {str(out / example)!r}")
    check_creatable(out, out.parent if str(out.parent) else Path("."))


def check_creatable(out: Path, folder: Path) -> None:
    """``folder`` (where ``--out`` writes) exists or can be made: its nearest existing ancestor is a writable
    folder."""
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise SafeDitError(f"--out {str(out)!r}: {str(probe)!r} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise SafeDitError(f"--out {str(out)!r}: the folder {str(probe)!r} is not writable")


def write_together(images: dict, summary: dict, json_path: Path | None, root: Path | None = None) -> None:
    """Write every file of one run to a temporary name first, then rename them all with SIGINT/SIGTERM held
    back, the JSON last and naming each image's sha256: after any signal, no temporary file is left, and the
    image, its map and its JSON appear together or not at all (a SIGKILL mid-rename shows as a hash mismatch).
    ``root``: the sha256 map names each image relative to it (a folder that may move), else as given.
    ``json_path`` None: the images alone (the caller shows ``summary``, sha256 map included, elsewhere)."""
    for folder in {path.parent for path in images} | ({json_path.parent} if json_path is not None else set()):
        folder.mkdir(parents=True, exist_ok=True)
    temps: list[tuple[str, Path]] = []
    try:
        for path, image in images.items():
            fd, tmp = tempfile.mkstemp(suffix=path.suffix, dir=path.parent, prefix=f".{path.stem}.")
            os.close(fd)
            temps.append((tmp, path))
            image.save(tmp)
        summary["sha256"] = {(Path(path).relative_to(root).as_posix() if root is not None else str(path)): _sha256(tmp)
                             for tmp, path in temps}
        if json_path is not None:
            fd, tmp = tempfile.mkstemp(suffix=".json", dir=json_path.parent, prefix=f".{json_path.stem}.")
            temps.append((tmp, json_path))
            with os.fdopen(fd, "w") as f:
                json.dump(summary, f, indent=1, allow_nan=False)
        held = {signal.SIGINT, signal.SIGTERM}
        old = signal.pthread_sigmask(signal.SIG_BLOCK, held)
        try:
            for tmp, path in temps:
                os.chmod(tmp, 0o644)
                os.replace(tmp, path)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
    finally:
        for tmp, _ in temps:
            if os.path.exists(tmp):
                os.unlink(tmp)


def _sha256(path) -> str:
    import hashlib

    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()
