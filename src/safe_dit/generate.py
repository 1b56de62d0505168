"""Generate one image with a diffusers DiT pipeline under a safe-dit mode.

Writes the image, (for safe-core / safe-sw) the sensitivity map of the prompt as a PNG overlay,
and a JSON summary: mode, config, seconds, peak memory, tokens computed per step and the
fraction of dense token-work done (the FLOP ratio vs dense: linear layers scale with the tokens
computed, attention with sensitive queries x all keys). Files are written atomically: a
crashed or interrupted run never leaves a half-written image.

--model defaults to the embedded shapes model (``safe_dit.embedded.model``: a small trained
Lumina-Next, 64x64 pixels, offline). It also takes a local diffusers pipeline directory of any
supported backbone -- Lumina-Next, PixArt-Sigma/Alpha, SD3/SD3.5, FLUX.1, Lumina-Image-2.0, Qwen-Image, Z-Image, Chroma -- (or a
hub id already in your local cache; nothing is downloaded), or `tiny-random[-pixart|-sd3|-flux|-lumina2|-z-image|-chroma]`, tiny randomly
initialised pipelines that exercise every code path in seconds but draw noise.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import os
import signal
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
from safe_dit.cli_args import add_parallel_argument, add_schedule_arguments, context_parallel_setup, schedule_kwargs
from safe_dit.testing.kits import KITS


DEFAULT_MODEL = "default"
DEFAULT_OUT = "outputs/safe-dit.png"  # under the working directory; /outputs/ is git-ignored here
logger = logging.getLogger(__name__)


# offline, randomly initialised: every code path in seconds, but they draw noise (one per backbone kit)
TINY_PIPELINES = {kit.tiny_name: kit.text_pipeline for kit in KITS.values()}


def load_pipeline(model: str, dtype: torch.dtype, device: str, height: int | None = None, width: int | None = None):
    """The embedded default (the one trained at the requested size, 64 or 128 px), a tiny random pipeline, or a local
    diffusers pipeline of a supported backbone."""
    if model == DEFAULT_MODEL:
        from safe_dit.embedded.model import load_default_pipeline, size_for

        return load_default_pipeline(dtype=dtype, size=size_for(height, width)).to(device)
    if model in TINY_PIPELINES:
        return TINY_PIPELINES[model]().to(device, dtype)
    from diffusers import DiffusionPipeline

    try:
        pipe = DiffusionPipeline.from_pretrained(model, dtype=dtype, local_files_only=True)
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
    """The pipeline's own default image side in pixels (the embedded models': 64 or 128, their training size)."""
    if model == DEFAULT_MODEL:
        return int(pipe.default_sample_size)  # pixel space: the size they were trained at
    sample = getattr(pipe, "default_sample_size", None) or pipe.transformer.config.get("sample_size")
    if sample is None:  # no sample size in its config (ZImagePipeline defaults to 1024 pixels)
        return 1024
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
    from safe_dit.embedded.world import VOCABULARY_HINT

    p.add_argument("prompt", help="the text prompt; the embedded default model knows only its shapes world: "
                                  + VOCABULARY_HINT.replace("%", "%%"))
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="'default' (the embedded 64x64 shapes model, offline); a local diffusers pipeline directory "
                        "of Lumina-Next, PixArt-Sigma/Alpha, SD3/SD3.5, FLUX.1, Lumina-Image-2.0, Qwen-Image, Z-Image or "
                        "Chroma (nothing is downloaded); or tiny-random[-pixart|-sd3|-flux|-lumina2|-z-image|-chroma] "
                        "(random weights: noise, for smoke tests)")
    p.add_argument("--mode", default="safe-core", choices=MODES,
                   help="the CLI shows the acceleration, safe-core; the Python API's SafeConfig defaults to the exact "
                        "dense-fp")
    p.add_argument("--negative-prompt", default="", help="what CFG steers away from (not FLUX)")
    p.add_argument("--height", type=int, default=None, help="pixels, a multiple of 16 (None: the model's native size; "
                   "for the embedded model 128 with --width 128 picks the one trained at 128x128, 1024 tokens)")
    p.add_argument("--width", type=int, default=None, help="pixels, a multiple of 16 (None: the model's native size)")
    p.add_argument("--steps", type=int, default=30, help="sampling steps")
    p.add_argument("--guidance", type=float, default=4.0,
                   help="classifier-free guidance scale (FLUX: the distilled guidance embedding, e.g. 3.5)")
    p.add_argument("--seed", type=int, default=0, help=f"noise seed, 0..{SEED_MAX}")
    add_schedule_arguments(p)
    p.add_argument("--cfg-context", type=float, default=d.cfg_context, help="safe-sw: guidance on context tokens")
    p.add_argument("--cfg-sensitive", type=float, default=d.cfg_sensitive, help="safe-sw: guidance on sensitive tokens")
    p.add_argument("--dtype", default="bfloat16" if torch.cuda.is_available() else "float32", choices=sorted(DTYPES),
                   help="weights and activations")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda, cuda:N, mps")
    p.add_argument("--out", default=DEFAULT_OUT,
                   help="image path (.png/.jpg/.webp); the sensitivity map (NAME.sensitivity.png) and the JSON summary "
                        "(NAME.json) go beside it; the folder is made if missing")
    add_parallel_argument(p)
    p.set_defaults(func=run)


def _check_size(args) -> None:
    if any(v is not None and (v < 16 or v % 16) for v in (args.height, args.width)):
        raise SafeDitError("--height and --width must be positive multiples of 16")
    if any(v is not None and v > MAX_SIDE for v in (args.height, args.width)):
        raise SafeDitError(f"--height and --width must be at most {MAX_SIDE} pixels (Lumina-Next's RoPE table covers "
                           f"{ROPE_TOKENS} tokens a side; larger sizes fail inside diffusers or on allocation)")


ROPE_TOKENS = 384  # LuminaPipeline builds its 2-D RoPE table for 384 x 384 tokens
MAX_SIDE = ROPE_TOKENS * 16  # patch 2 over a VAE of factor 8: the most pixels per token side of any shipped pipeline
SEED_MAX = 2**32 - 1  # torch's CPU generator keeps the low 32 bits of a seed: larger ones repeat smaller ones


def _rope_side(pipe) -> int | None:
    """Largest image side in pixels Lumina's pipeline has RoPE rows for (None: no such table)."""
    from diffusers import LuminaNextDiT2DModel

    if not isinstance(pipe.transformer, LuminaNextDiT2DModel):
        return None
    return ROPE_TOKENS * pipe.transformer.config.patch_size * int(getattr(pipe, "vae_scale_factor", 8))


def _check_rope(pipe, args) -> None:
    side = _rope_side(pipe)
    if side is not None and max(args.height, args.width) > side:
        raise SafeDitError(f"--height and --width must be at most {side} pixels for this model: its pipeline has RoPE "
                           f"rows for {ROPE_TOKENS} tokens a side")


EMBEDDED_MAX_SIDE = ROPE_TOKENS * 4  # the embedded model: patch 4 on pixels (no VAE), 4 pixels a token side


def check_arguments(args) -> None:
    """Every check that needs no model, before anything is loaded or computed (one-line SafeDitErrors)."""
    _check_size(args)
    if args.steps < 1:
        raise SafeDitError("--steps must be >= 1")
    for name in ("guidance", "cfg_context", "cfg_sensitive", "keep_ratio"):
        value = getattr(args, name)
        if not math.isfinite(value):
            raise SafeDitError(f"--{name.replace('_', '-')} must be a finite number, got {value}")
    if not 0 <= args.seed <= SEED_MAX:
        raise SafeDitError(f"--seed must be in 0..{SEED_MAX} (distinct seeds there give distinct noise), got {args.seed}")
    try:
        device = torch.device(args.device)
    except (RuntimeError, ValueError):
        raise SafeDitError(f"--device {args.device!r} is not a torch device (use cpu, cuda, cuda:1, mps)") from None
    if device.type == "meta":
        raise SafeDitError("--device meta holds no data: generation needs a real device (cpu, cuda)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SafeDitError("--device cuda requested but CUDA is not available")
    if device.type not in ("cpu", "cuda", "mps", "xpu"):
        raise SafeDitError(f"--device {args.device!r}: safe-dit runs on cpu, cuda, mps or xpu")
    check_out(Path(args.out))
    if args.model == DEFAULT_MODEL:
        from safe_dit.embedded.model import IMAGE_SIZE, embedded_weights, size_for

        size = size_for(args.height, args.width)
        if size != IMAGE_SIZE:
            embedded_weights(size)  # the model for this size is installed (else say so now, before any work)
    if args.model == DEFAULT_MODEL and max(args.height or 0, args.width or 0) > EMBEDDED_MAX_SIDE:
        raise SafeDitError(f"--height and --width must be at most {EMBEDDED_MAX_SIDE} pixels for the embedded model: "
                           f"its pipeline has RoPE rows for {ROPE_TOKENS} tokens a side")
    model = args.model
    if model != DEFAULT_MODEL and model not in TINY_PIPELINES and (os.sep in model or model.startswith(".")) \
            and not os.path.isdir(model):
        raise SafeDitError(f"--model {model!r}: no such directory (a local diffusers pipeline directory, "
                           f"'{DEFAULT_MODEL}', or one of {', '.join(TINY_PIPELINES)})")


def check_out(out: Path) -> None:
    """--out names a new or existing image file in a writable directory (checked before any work)."""
    if out.suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp"):
        raise SafeDitError(f"--out must end in .png, .jpg or .webp, got {out.name!r}")
    if out.is_dir():
        raise SafeDitError(f"--out {str(out)!r} is a directory: name the image file, e.g. {str(out / 'image.png')!r}")
    check_creatable(out, out.parent if str(out.parent) else Path("."))


def check_creatable(out: Path, folder: Path) -> None:
    """``folder`` (where ``--out`` writes) exists or can be made: its nearest existing ancestor is a writable folder."""
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise SafeDitError(f"--out {str(out)!r}: {str(probe)!r} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise SafeDitError(f"--out {str(out)!r}: the folder {str(probe)!r} is not writable")


def run(args) -> int:
    check_arguments(args)  # before loading anything; the size again once the native size fills a missing side
    out = Path(args.out)
    cp, rank = context_parallel_setup(args)  # --context-parallel: torchrun's process group, this rank's device
    config = SafeConfig(args.mode, **schedule_kwargs(args), cfg_context=args.cfg_context,
                        cfg_sensitive=args.cfg_sensitive, context_parallel=cp)
    if args.model == DEFAULT_MODEL:
        warn_outside_world(args.prompt)
    pipe = load_pipeline(args.model, DTYPES[args.dtype], args.device, args.height, args.width)
    args.height = args.height or native_size(pipe, args.model)
    args.width = args.width or native_size(pipe, args.model)
    _check_size(args)
    _check_rope(pipe, args)
    native = native_size(pipe, args.model)
    if args.model == DEFAULT_MODEL and (args.height, args.width) != (native, native):
        logger.warning("the embedded models were trained at 64x64 and 128x128; at %dx%d the %d-px one draws what it "
                       "can, not its world", args.height, args.width, native)
    kwargs = call_kwargs(pipe, args)
    if rank:  # under torchrun every rank computes the same image; rank 0 alone shows progress and writes files
        pipe.set_progress_bar_config(disable=True)
    apply_safe_dit(pipe, config)
    cuda = torch.device(args.device).type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    rt = runtime_of(pipe)
    t0 = time.perf_counter()
    try:
        with torch.no_grad():
            image = pipe(args.prompt, **kwargs).images[0]
    finally:
        if rt is not None:
            rt.finish_generation()  # K/V caches go with the call, also when it fails or is interrupted
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    if rank:
        return 0
    report = rt.last_report if rt is not None and config.scheduled else None
    images = {out: image}
    if report is not None and rt.last_sensitivity is not None:
        images[out.with_name(out.stem + ".sensitivity.png")] = sensitivity_overlay(image, rt.last_sensitivity[0].cpu(),
                                                                                   rt.last_grid)
    peak = (torch.cuda.max_memory_allocated() / 2**20 if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    files = {"image": str(out)}
    if len(images) > 1:
        files["sensitivity_overlay"] = str(list(images)[1])
    files["summary"] = str(out.with_suffix(".json"))
    summary = {
        "prompt": args.prompt, "model": args.model, "backbone": adapter_for(pipe.transformer).name, "mode": args.mode,
        "config": dict(config.__dict__, context_parallel=args.context_parallel), "height": args.height, "width": args.width, "steps": args.steps, "seed": args.seed,
        "guidance": args.guidance, "seconds": seconds,
        "peak_memory_mb": peak, "peak_memory_kind": "cuda max allocated" if cuda else "process max RSS",
        "tokens_per_step": report["tokens_per_step"] if report else None,
        "step_kinds": report["steps"] if report else None,
        "flop_ratio_vs_dense": report["token_fraction"] if report else 1.0,
        "cache_mb": report["cache_mb"] if report else 0.0,
        "files": files, "environment": environment(args.device),
    }
    write_together(images, summary, Path(files["summary"]))
    print(f"wrote {', '.join(files.values())}  ({args.mode}, {seconds:.2f} s)", file=sys.stderr)
    sys.stdout.write(json.dumps(summary, allow_nan=False) + "\n")
    return 0


def write_together(images: dict, summary: dict, json_path: Path, root: Path | None = None) -> None:
    """Write every file of one run to a temporary name first, then rename them all with SIGINT/SIGTERM held
    back, the JSON last and naming each image's sha256: after any signal, no temporary file is left, and the
    image, its map and its JSON appear together or not at all (a SIGKILL mid-rename shows as a hash mismatch).
    ``root``: the sha256 map names each image relative to it (a folder that may move), else as given."""
    json_path.parent.mkdir(parents=True, exist_ok=True)
    temps: list[tuple[str, Path]] = []
    try:
        for path, image in images.items():
            fd, tmp = tempfile.mkstemp(suffix=path.suffix, dir=path.parent, prefix=f".{path.stem}.")
            os.close(fd)
            temps.append((tmp, path))
            image.save(tmp)
        summary["sha256"] = {(Path(path).relative_to(root).as_posix() if root is not None else str(path)): _sha256(tmp)
                             for tmp, path in temps}
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


def warn_outside_world(prompt: str) -> None:
    """The embedded model knows only its shapes world: say so when a prompt does not parse into it."""
    from safe_dit.embedded import world

    if not world.in_world(prompt):
        logger.warning("this prompt is outside the embedded model's world (%s); it will draw noise or the nearest "
                       "scene it knows. See 'safe-dit generate --help' for the vocabulary", world.VOCABULARY_HINT)
