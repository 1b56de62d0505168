"""Generate one image with a diffusers Lumina-Next pipeline under a safe-dit mode.

Writes the image, (for safe-core / safe-sw) the sensitivity map of the prompt as a PNG overlay,
and a JSON summary: mode, config, seconds, peak memory, tokens computed per step and the
fraction of dense token-work done (the FLOP ratio vs dense: linear layers scale with the tokens
computed, attention with sensitive queries x all keys). Files are written atomically: a
crashed or interrupted run never leaves a half-written image.

--model defaults to the embedded shapes model (``safe_dit.default_model``: a small trained
Lumina-Next, 64x64 pixels, offline). It also takes a local diffusers LuminaPipeline directory
(or a hub id already in your local cache; nothing is downloaded), or `tiny-random`, a tiny
randomly initialised pipeline that exercises every code path in seconds but draws noise.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

from .api import apply_safe_dit, runtime_of
from .config import MODES, SafeConfig, SafeDitError
from .envinfo import environment
from .report import DTYPES


DEFAULT_MODEL = "default"


def load_pipeline(model: str, dtype: torch.dtype, device: str):
    if model == DEFAULT_MODEL:
        from .default_model import load_default_pipeline

        return load_default_pipeline(dtype=dtype).to(device)
    if model == "tiny-random":
        from .models import build_tiny_text_pipeline

        return build_tiny_text_pipeline().to(device, dtype)
    from diffusers import LuminaPipeline

    try:
        pipe = LuminaPipeline.from_pretrained(model, torch_dtype=dtype, local_files_only=True)
    except (OSError, ValueError) as err:
        raise SafeDitError(
            f"could not load a Lumina-Next pipeline from {model!r} without downloading ({err.__class__.__name__}: "
            f"{str(err).splitlines()[0][:200]}). Pass a local diffusers pipeline directory, or --model tiny-random"
        ) from err
    return pipe.to(device)


def _atomic_save(image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=path.suffix, dir=path.parent, prefix=f".{path.stem}.")
    os.close(fd)
    try:
        image.save(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def sensitivity_overlay(image, sensitivity: torch.Tensor, grid: tuple[int, int]):
    """The image with the [N] sensitivity map (token grid ``grid``) blended over it as a heat map."""
    import numpy as np
    from matplotlib import colormaps
    from PIL import Image

    h, w = grid
    heat = sensitivity.float().view(1, 1, h, w)
    heat = torch.nn.functional.interpolate(heat, size=(image.height, image.width), mode="nearest")[0, 0].numpy()
    rgb = (colormaps["inferno"](heat)[..., :3] * 255).astype(np.uint8)
    return Image.blend(image.convert("RGB"), Image.fromarray(rgb), alpha=0.5)


def configure_parser(p) -> None:
    d = SafeConfig("safe-sw")
    p.add_argument("prompt", help="the text prompt")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="'default' (the embedded 64x64 shapes model, offline), a local diffusers "
                        "LuminaPipeline directory, or tiny-random (noise, for smoke tests)")
    p.add_argument("--mode", default="safe-core", choices=MODES, help="default safe-core")
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--height", type=int, default=None, help="pixels; default: the model's native size")
    p.add_argument("--width", type=int, default=None, help="pixels; default: the model's native size")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--guidance", type=float, default=4.0, help="classifier-free guidance scale")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep-ratio", type=float, default=d.keep_ratio)
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    p.add_argument("--anchor-interval", type=int, default=d.anchor_interval)
    p.add_argument("--tail-dense-steps", type=int, default=d.tail_dense_steps)
    p.add_argument("--cfg-context", type=float, default=d.cfg_context, help="safe-sw: guidance on context tokens")
    p.add_argument("--cfg-sensitive", type=float, default=d.cfg_sensitive, help="safe-sw: guidance on sensitive tokens")
    p.add_argument("--dtype", default="bfloat16" if torch.cuda.is_available() else "float32", choices=sorted(DTYPES))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="safe-dit.png", help="image path (PNG); the map and JSON go beside it")
    p.set_defaults(func=run)


def run(args) -> int:
    native = 64 if args.model == DEFAULT_MODEL else 1024
    args.height = args.height or native
    args.width = args.width or native
    if args.height < 16 or args.width < 16 or args.height % 16 or args.width % 16:
        raise SafeDitError("--height and --width must be positive multiples of 16")
    if args.steps < 1:
        raise SafeDitError("--steps must be >= 1")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SafeDitError("--device cuda requested but CUDA is not available")
    out = Path(args.out)
    if out.suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp"):
        raise SafeDitError(f"--out must end in .png, .jpg or .webp, got {out.name!r}")
    config = SafeConfig(args.mode, keep_ratio=args.keep_ratio, warmup_steps=args.warmup_steps,
                        anchor_interval=args.anchor_interval, tail_dense_steps=args.tail_dense_steps,
                        cfg_context=args.cfg_context, cfg_sensitive=args.cfg_sensitive)
    pipe = load_pipeline(args.model, DTYPES[args.dtype], args.device)
    apply_safe_dit(pipe, config)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    with torch.no_grad():
        image = pipe(args.prompt, negative_prompt=args.negative_prompt, height=args.height, width=args.width,
                     num_inference_steps=args.steps, guidance_scale=args.guidance, clean_caption=False,
                     generator=torch.Generator().manual_seed(args.seed)).images[0]
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    _atomic_save(image, out)
    rt = runtime_of(pipe)
    report = rt.last_report if rt is not None and config.scheduled else None
    files = {"image": str(out)}
    if report is not None and rt.last_sensitivity is not None:
        overlay = sensitivity_overlay(image, rt.last_sensitivity[0].cpu(), rt.last_grid)
        files["sensitivity_overlay"] = str(out.with_name(out.stem + ".sensitivity.png"))
        _atomic_save(overlay, Path(files["sensitivity_overlay"]))
    peak = (torch.cuda.max_memory_allocated() / 2**20 if args.device.startswith("cuda")
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    summary = {
        "prompt": args.prompt, "model": args.model, "mode": args.mode, "config": config.__dict__,
        "height": args.height, "width": args.width, "steps": args.steps, "seed": args.seed, "guidance": args.guidance,
        "seconds": seconds,
        "peak_memory_mb": peak, "peak_memory_kind": "cuda max allocated" if args.device.startswith("cuda") else "process max RSS",
        "tokens_per_step": report["tokens_per_step"] if report else None,
        "step_kinds": report["steps"] if report else None,
        "flop_ratio_vs_dense": report["token_fraction"] if report else 1.0,
        "cache_mb": report["cache_mb"] if report else 0.0,
        "files": files, "environment": environment(args.device),
    }
    files["summary"] = str(out.with_suffix(".json"))
    fd, tmp = tempfile.mkstemp(dir=out.parent or ".", prefix=f".{out.stem}.", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(summary, f, indent=1)
    os.chmod(tmp, 0o644)
    os.replace(tmp, files["summary"])
    print(f"wrote {', '.join(files.values())}  ({args.mode}, {seconds:.2f} s)", file=sys.stderr)
    sys.stdout.write(json.dumps(summary) + "\n")
    return 0
