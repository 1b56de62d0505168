"""Generate one image with a diffusers DiT pipeline under a safe-dit mode.

Writes the image, (for safe-core / safe-sw) the sensitivity map of the prompt as a PNG overlay,
and a JSON summary: mode, config, seconds, peak memory, tokens computed per step and the
fraction of dense token-work done (the FLOP ratio vs dense: linear layers scale with the tokens
computed, attention with sensitive queries x all keys). Files are written atomically: a
crashed or interrupted run never leaves a half-written image.

--model defaults to the embedded shapes model (``safe_dit.embedded.model``: a small trained
Lumina-Next, 64x64 pixels, offline). It also takes a local diffusers pipeline directory of any
supported backbone -- Lumina-Next, PixArt-Sigma/Alpha, SD3/SD3.5, FLUX.1 -- (or a hub id already in
your local cache; nothing is downloaded), or `tiny-random[-pixart|-sd3|-flux]`, tiny randomly
initialised pipelines that exercise every code path in seconds but draw noise.
"""

from __future__ import annotations

import inspect
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

from safe_dit.adapters import adapter_for, supported_classes
from safe_dit.api import apply_safe_dit, runtime_of
from safe_dit.config import MODES, SafeConfig, SafeDitError
from safe_dit.environment import environment
from safe_dit.bench.report import DTYPES
from safe_dit.testing.kits import KITS


DEFAULT_MODEL = "default"


# offline, randomly initialised: every code path in seconds, but they draw noise (one per backbone kit)
TINY_PIPELINES = {kit.tiny_name: kit.text_pipeline for kit in KITS.values()}


def load_pipeline(model: str, dtype: torch.dtype, device: str):
    """The embedded default, a tiny random pipeline, or a local diffusers pipeline of a supported backbone."""
    if model == DEFAULT_MODEL:
        from safe_dit.embedded.model import load_default_pipeline

        return load_default_pipeline(dtype=dtype).to(device)
    if model in TINY_PIPELINES:
        return TINY_PIPELINES[model]().to(device, dtype)
    from diffusers import DiffusionPipeline

    try:
        pipe = DiffusionPipeline.from_pretrained(model, torch_dtype=dtype, local_files_only=True)
    except (OSError, ValueError) as err:
        raise SafeDitError(
            f"could not load a diffusers pipeline from {model!r} without downloading ({err.__class__.__name__}: "
            f"{str(err).splitlines()[0][:200]}). Pass a local pipeline directory (Lumina-Next, PixArt, SD3, FLUX), "
            f"'{DEFAULT_MODEL}', or one of {', '.join(TINY_PIPELINES)}"
        ) from err
    if getattr(pipe, "transformer", None) is None:
        raise SafeDitError(f"{model!r} loads a {type(pipe).__name__} without a transformer: safe-dit accelerates DiT "
                           f"pipelines ({', '.join(supported_classes())})")
    adapter_for(pipe.transformer)  # a clear error naming the supported classes, before any work
    return pipe.to(device)


def native_size(pipe, model: str) -> int:
    """The pipeline's own default image side in pixels (64 for the embedded model)."""
    if model == DEFAULT_MODEL:
        return 64
    sample = getattr(pipe, "default_sample_size", None) or pipe.transformer.config.sample_size
    return int(sample) * int(getattr(pipe, "vae_scale_factor", 8))


def call_kwargs(pipe, args) -> dict:
    """What this pipeline's ``__call__`` takes: backbones differ in caption cleaning, negative prompts, binning."""
    params = inspect.signature(pipe.__call__).parameters
    kwargs = dict(height=args.height, width=args.width, num_inference_steps=args.steps, guidance_scale=args.guidance,
                  generator=torch.Generator().manual_seed(args.seed))
    if "true_cfg_scale" in params:  # FLUX: guidance-distilled; a negative prompt would need true CFG
        if args.negative_prompt:
            raise SafeDitError("FLUX is guidance-distilled (--guidance sets its guidance embedding): FluxPipeline ignores "
                               "a negative prompt unless true CFG runs two transformer calls per step, which safe-dit's "
                               "scheduled modes refuse. Drop --negative-prompt")
    else:
        kwargs["negative_prompt"] = args.negative_prompt
    if "clean_caption" in params:
        kwargs["clean_caption"] = False  # needs bs4/ftfy; the prompt is used as typed
    if "use_resolution_binning" in params and pipe.transformer.config.sample_size not in (32, 64, 128, 256):
        kwargs["use_resolution_binning"] = False  # PixArt has aspect-ratio bins only for its real sample sizes
    return kwargs


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
                   help="'default' (the embedded 64x64 shapes model, offline); a local diffusers pipeline directory "
                        "of Lumina-Next, PixArt-Sigma/Alpha, SD3/SD3.5 or FLUX.1 (nothing is downloaded); or "
                        "tiny-random[-pixart|-sd3|-flux] (random weights: noise, for smoke tests)")
    p.add_argument("--mode", default="safe-core", choices=MODES, help="default safe-core")
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--height", type=int, default=None, help="pixels; default: the model's native size")
    p.add_argument("--width", type=int, default=None, help="pixels; default: the model's native size")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--guidance", type=float, default=4.0,
                   help="classifier-free guidance scale (FLUX: the distilled guidance embedding, e.g. 3.5)")
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


def _check_size(args) -> None:
    if any(v is not None and (v < 16 or v % 16) for v in (args.height, args.width)):
        raise SafeDitError("--height and --width must be positive multiples of 16")


def run(args) -> int:
    _check_size(args)  # before loading anything; again once the native size fills a missing side
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
    args.height = args.height or native_size(pipe, args.model)
    args.width = args.width or native_size(pipe, args.model)
    _check_size(args)
    kwargs = call_kwargs(pipe, args)
    apply_safe_dit(pipe, config)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    with torch.no_grad():
        image = pipe(args.prompt, **kwargs).images[0]
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
        "prompt": args.prompt, "model": args.model, "backbone": adapter_for(pipe.transformer).name, "mode": args.mode, "config": config.__dict__,
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
