"""Generate one image or video with a diffusers DiT pipeline under a safe-dit mode.

Writes the image, (for safe-core / safe-sw) the sensitivity map of the prompt as a PNG overlay,
and a JSON summary: mode, config, seconds, peak memory, tokens computed per step and the
fraction of dense token-work done (the FLOP ratio vs dense: linear layers scale with the tokens
computed, attention with sensitive queries x all keys). One line per file written is printed;
the summary goes to NAME.json (or to stdout with --json -). Files are written atomically: a
crashed or interrupted run never leaves a half-written image.

A video model writes an animated WebP (NAME.webp: --frames frames at --fps, looping), its sensitivity strip
(NAME.sensitivity.png: one map per latent frame, side by side, over the video frame at that time) and the JSON
summary (frames, size, fps, mode, token fraction, ...).

--model defaults to the embedded shapes model (``safe_dit.embedded.model``: a small trained
Lumina-Next, 64x64 pixels, offline). It also takes a local diffusers pipeline directory (or a hub
id already in your local cache; nothing is downloaded) of any supported image backbone:
{labels}
or video backbone:
{video_labels}
or a tiny randomly initialised pipeline that exercises every code path in seconds but draws noise:
{tiny}
or a tiny video pipeline (an animated WebP of noise):
{video_tiny}
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import sys
from pathlib import Path

from safe_dit.bench.files import check_out, write_together
from safe_dit.bench.pipelines import DEFAULT_MODEL, EMBEDDED_MAX_SIDE, ROPE_TOKENS, SEED_MAX, check_size
from safe_dit.bench.runs import context_parallel_setup, schedule_kwargs, selective_free
from safe_dit.commands.options import DTYPE_NAMES, add_guidance_weights, add_parallel_argument, add_schedule_arguments
from safe_dit.config import MODES, SafeConfig, SafeDitError
from safe_dit.testing import catalog

DEFAULT_OUT = "outputs/safe-dit.png"  # under the working directory; /outputs/ is git-ignored here
DEFAULT_VIDEO_OUT = "outputs/safe-dit.webp"
DEFAULT_FPS = 16.0  # Wan 2.1/2.2's frame rate
logger = logging.getLogger(__name__)
DEVICE = re.compile(r"(cpu|cuda|mps|xpu|meta)(:\d+)?")


def description() -> str:
    import textwrap

    def block(text):
        return textwrap.fill(text, 100, initial_indent="  ", subsequent_indent="  ")

    return __doc__.format(labels=block(catalog.labels(last="or", video=False)),
                          video_labels=block(catalog.labels(last="or", video=True)),
                          tiny=block(", ".join(catalog.tiny_names(video=False))),
                          video_tiny=block(", ".join(catalog.tiny_names(video=True, text_prompts=True))))


def sensitivity_overlay(image, sensitivity, grid: tuple[int, int]):
    """The image with the [N] sensitivity map (token grid ``grid``) blended over it as a heat map."""
    import numpy as np
    import torch
    from matplotlib import colormaps
    from PIL import Image

    h, w = grid
    heat = sensitivity.float().view(1, 1, h, w)
    heat = torch.nn.functional.interpolate(heat, size=(image.height, image.width), mode="nearest")[0, 0].numpy()
    rgb = (colormaps["inferno"](heat)[..., :3] * 255).astype(np.uint8)
    return Image.blend(image.convert("RGB"), Image.fromarray(rgb), alpha=0.5)


def configure_parser(p) -> None:
    from safe_dit.embedded.world import VOCABULARY_HINT

    p.add_argument("prompt", help="the text prompt; the embedded default model knows only its shapes world: "
                                  + VOCABULARY_HINT.replace("%", "%%"))
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"'{DEFAULT_MODEL}' (the embedded 64x64 shapes model, offline); a local diffusers pipeline "
                        f"directory of {catalog.labels(last='or')} (nothing is downloaded); or one of "
                        f"{', '.join(catalog.tiny_names(video=False))} (random weights: noise, for smoke "
                        f"tests; video: {', '.join(catalog.tiny_names(video=True, text_prompts=True))})")
    p.add_argument("--mode", default="safe-core", choices=MODES,
                   help="the mode to run (the Python API's SafeConfig starts from the exact dense-fp)")
    p.add_argument("--negative-prompt", default="", help="what CFG steers away from (not FLUX)")
    p.add_argument("--height", type=int, default=None, help="pixels, a multiple of 16 (None: the model's native size; "
                   "for the embedded model 128 with --width 128 picks the one trained at 128x128, 1024 tokens)")
    p.add_argument("--width", type=int, default=None, help="pixels, a multiple of 16 (None: the model's native size)")
    p.add_argument("--frames", type=int, default=None,
                   help="video models: frames of the video, 1 + (the VAE's temporal factor, 4) x k, e.g. 9, 33, 81 "
                        "(None: the pipeline's default; the tiny ones: a few)")
    p.add_argument("--fps", type=float, default=DEFAULT_FPS, help="video models: frames per second of the WebP")
    p.add_argument("--steps", type=int, default=30, help="sampling steps")
    p.add_argument("--guidance", type=float, default=4.0,
                   help="classifier-free guidance scale (FLUX: the distilled guidance embedding, e.g. 3.5)")
    p.add_argument("--seed", type=int, default=0, help=f"noise seed, 0..{SEED_MAX}")
    add_schedule_arguments(p)
    add_guidance_weights(p)
    p.add_argument("--dtype", default=None, choices=DTYPE_NAMES,
                   help="weights and activations (None: bfloat16 on CUDA, else float32)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N, mps (None: cuda when available, else cpu)")
    p.add_argument("--out", default=None,
                   help=f"image path (.png/.jpg/.webp; default {DEFAULT_OUT}) or, for a video model, animated WebP "
                        f"path (.webp; default {DEFAULT_VIDEO_OUT}); the sensitivity map or strip "
                        "(NAME.sensitivity.png) and the JSON summary (NAME.json) go beside it; the folder is made if "
                        "missing")
    p.add_argument("--json", metavar="PATH", default=None,
                   help="where the JSON summary goes: '-' prints it to stdout instead of a file (None: NAME.json "
                        "beside the image)")
    p.add_argument("--progress", action="store_true",
                   help="show the sampling progress bar even when stderr is not a terminal (a log file, a pipe)")
    add_parallel_argument(p)
    p.set_defaults(func=run)


def check_arguments(args) -> None:
    """Every check that needs no model, before anything is loaded or computed (one-line SafeDitErrors). Those that
    need no torch come first, so a bad argument is refused in well under a second."""
    check_size(args)
    if args.steps < 1:
        raise SafeDitError("--steps must be >= 1")
    for name in ("guidance", "cfg_context", "cfg_sensitive", "keep_ratio"):
        value = getattr(args, name)
        if not math.isfinite(value):
            raise SafeDitError(f"--{name.replace('_', '-')} must be a finite number, got {value}")
    if not 0 <= args.seed <= SEED_MAX:
        raise SafeDitError(f"--seed must be in 0..{SEED_MAX} (distinct seeds there give distinct noise), "
                           f"got {args.seed}")
    if args.device is not None:
        if not DEVICE.fullmatch(args.device):
            raise SafeDitError(f"--device {args.device!r} is not a torch device (use cpu, cuda, cuda:1, mps)")
        if args.device == "meta":
            raise SafeDitError("--device meta holds no data: generation needs a real device (cpu, cuda)")
    video = check_video_arguments(args)
    check_out(Path(args.out or DEFAULT_OUT), video=bool(video))
    if args.json not in (None, "-"):
        if not args.json.endswith(".json"):
            raise SafeDitError(f"--json must be '-' or a path ending in .json, got {args.json!r}")
    if args.model == DEFAULT_MODEL and max(args.height or 0, args.width or 0) > EMBEDDED_MAX_SIDE:
        raise SafeDitError(f"--height and --width must be at most {EMBEDDED_MAX_SIDE} pixels for the embedded model: "
                           f"its pipeline has RoPE rows for {ROPE_TOKENS} tokens a side")
    model, tiny = args.model, catalog.tiny_names()
    if model != DEFAULT_MODEL and model not in tiny and (os.sep in model or model.startswith(".")) \
            and not os.path.isdir(model):
        raise SafeDitError(f"--model {model!r}: no such directory (a local diffusers pipeline directory, "
                           f"'{DEFAULT_MODEL}', or one of {', '.join(tiny)})")
    import torch  # the checks that need torch: the device exists here, the embedded weights are installed

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.dtype is None:
        args.dtype = "bfloat16" if torch.device(args.device).type == "cuda" else "float32"
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        raise SafeDitError("--device cuda requested but CUDA is not available")
    if model == DEFAULT_MODEL:
        from safe_dit.embedded.model import IMAGE_SIZE, embedded_weights, size_for

        size = size_for(args.height, args.width)
        if size != IMAGE_SIZE:
            embedded_weights(size)  # the model for this size is installed (else say so now, before any work)


def check_video_arguments(args) -> bool | None:
    """The video options, and the tiny pipelines that cannot take a text prompt, checked from the kits' declarations
    (no torch). Returns whether ``--model`` is a video model (None: a directory, known once loaded)."""
    if args.frames is not None and args.frames < 1:
        raise SafeDitError(f"--frames must be >= 1, got {args.frames}")
    if not (math.isfinite(args.fps) and 0 < args.fps <= 1000):
        raise SafeDitError(f"--fps must be in (0, 1000], got {args.fps}")
    kit = catalog.declared(args.model)
    if kit is not None and not kit.text_prompts:
        works = catalog.tiny_names(video=kit.video, text_prompts=True)
        raise SafeDitError(f"--model {args.model}: {kit.label} has no offline tiny pipeline that takes a text prompt; "
                           f"use --model DIR with a local {kit.label} pipeline, or a tiny "
                           f"{'video ' if kit.video else ''}pipeline that does: {', '.join(works)}")
    video = kit.video if kit is not None else (False if args.model == DEFAULT_MODEL else None)
    if video is False:
        check_image_model(args)
    return video


def check_image_model(args) -> None:
    if args.frames is not None:
        raise SafeDitError(f"--frames is for video models ({catalog.labels(last='or', video=True)}); "
                           f"--model {args.model} makes images")


def run(args) -> int:
    check_arguments(args)  # before loading anything; the size again once the native size fills a missing side
    import resource
    import time

    import torch

    from safe_dit.adapters import adapter_for
    from safe_dit.api import apply_safe_dit, runtime_of
    from safe_dit.bench.pipelines import check_rope, check_video, is_video, native_size, native_video
    from safe_dit.bench.report import DTYPES
    from safe_dit.bench.video import Video, sensitivity_strip, video_frames
    from safe_dit.inspection.environment import environment

    cp, rank = context_parallel_setup(args)  # --context-parallel: torchrun's process group, this rank's device
    config = SafeConfig(args.mode, **schedule_kwargs(args), cfg_context=args.cfg_context,
                        cfg_sensitive=args.cfg_sensitive, context_parallel=cp)
    warning = selective_free(config, args.steps)
    if warning:
        logger.warning("%s", warning)
    if args.model == DEFAULT_MODEL:
        warn_outside_world(args.prompt)
    pipe = load_pipeline(args.model, DTYPES[args.dtype], args.device, args.height, args.width)
    video = is_video(pipe)
    if video:
        height, width, frames = native_video(pipe, args.model)
        args.height, args.width, args.frames = args.height or height, args.width or width, args.frames or frames
        missing = [f"--{name}" for name in ("height", "width", "frames") if getattr(args, name) is None]
        if missing:
            raise SafeDitError(f"{type(pipe).__name__} has no default {' or '.join(m[2:] for m in missing)}: pass "
                               f"{' and '.join(missing)}")
        args.out = args.out or DEFAULT_VIDEO_OUT
        check_out(Path(args.out), video=True)
        check_size(args)
        check_video(pipe, args.height, args.width, args.frames)
    else:
        check_image_model(args)
        args.out = args.out or DEFAULT_OUT
        args.height = args.height or native_size(pipe, args.model)
        args.width = args.width or native_size(pipe, args.model)
        check_size(args)
        check_rope(pipe, args)
    out = Path(args.out)
    native = None if video else native_size(pipe, args.model)
    if args.model == DEFAULT_MODEL and (args.height, args.width) != (native, native):
        logger.warning("the embedded models were trained at 64x64 and 128x128; at %dx%d the %d-px one draws what it "
                       "can, not its world", args.height, args.width, native)
    kwargs = call_kwargs(pipe, args)
    if video:
        kwargs["num_frames"] = args.frames
    # under torchrun every rank computes the same image; rank 0 alone shows progress (on a terminal) and writes files
    pipe.set_progress_bar_config(disable=True if rank else (False if args.progress else None))
    apply_safe_dit(pipe, config)
    cuda = torch.device(args.device).type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    rt = runtime_of(pipe)
    t0 = time.perf_counter()
    try:
        with torch.no_grad():
            result = pipe(args.prompt, **kwargs)
    finally:
        if rt is not None:
            rt.finish_generation()  # K/V caches go with the call, also when it fails or is interrupted
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    if rank:
        return 0
    report = rt.last_report if rt is not None and config.scheduled else None
    sensitivity = rt.last_sensitivity[0].cpu() if report is not None and rt.last_sensitivity is not None else None
    map_path = out.with_name(out.stem + ".sensitivity.png")
    if video:
        frames = video_frames(result.frames[0])
        outputs = {out: Video(frames, args.fps)}
        if sensitivity is not None:
            outputs[map_path] = sensitivity_strip(sensitivity, rt.last_grid, (args.height, args.width), frames)
        kinds = ("video", "sensitivity_strip")
    else:
        image = result.images[0]
        outputs = {out: image}
        if sensitivity is not None:
            outputs[map_path] = sensitivity_overlay(image, sensitivity, rt.last_grid)
        kinds = ("image", "sensitivity_overlay")
    peak = (torch.cuda.max_memory_allocated() / 2**20 if cuda
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    to_stdout = args.json == "-"
    json_path = out.with_suffix(".json") if args.json is None or to_stdout else Path(args.json)
    files = dict(zip(kinds, map(str, outputs)))
    if not to_stdout:
        files["summary"] = str(json_path)
    summary = {
        "prompt": args.prompt, "model": args.model, "backbone": adapter_for(pipe.transformer).name, "mode": args.mode,
        "config": dict(config.__dict__, context_parallel=args.context_parallel), "height": args.height,
        "width": args.width, "steps": args.steps, "seed": args.seed, "guidance": args.guidance, "seconds": seconds,
        "peak_memory_mb": peak, "peak_memory_kind": "cuda max allocated" if cuda else "process max RSS",
        "tokens_per_step": report["tokens_per_step"] if report else None,
        "step_kinds": report["steps"] if report else None,
        "flop_ratio_vs_dense": report["token_fraction"] if report else 1.0,
        "cache_mb": report["cache_mb"] if report else 0.0,
        "files": files, "environment": environment(args.device),
    }
    if video:
        summary |= {"frames": len(frames), "fps": args.fps, "format": "animated WebP",
                    "token_grid": list(rt.last_grid) if sensitivity is not None else None}
    write_together(outputs, summary, None if to_stdout else json_path)
    work = f", {summary['flop_ratio_vs_dense']:.0%} of dense token work" if report else ""
    shape = (f"{len(frames)} frames of {args.height}x{args.width} at {args.fps:g} fps" if video
             else f"{args.height}x{args.width}")
    lines = {kinds[0]: f"{args.mode}, {shape}, {args.steps} steps, {seconds:.2f} s{work}",
             "sensitivity_overlay": "the prompt's sensitivity map over the image",
             "sensitivity_strip": "the prompt's sensitivity map of each latent frame, side by side",
             "summary": "the JSON summary"}
    human = sys.stderr if to_stdout else sys.stdout  # with --json -, stdout holds the JSON alone
    for kind, path in files.items():
        print(f"wrote {path}  ({lines[kind]})", file=human)
    if to_stdout:
        sys.stdout.write(json.dumps(summary, allow_nan=False) + "\n")
    return 0


def load_pipeline(model: str, dtype, device: str, height: int | None = None, width: int | None = None):
    """``safe_dit.bench.pipelines.load_pipeline`` (named here so a test can stand in for it)."""
    from safe_dit.bench.pipelines import load_pipeline as load

    return load(model, dtype, device, height, width)


def call_kwargs(pipe, args) -> dict:
    from safe_dit.bench.pipelines import call_kwargs as kwargs

    return kwargs(pipe, args)


def warn_outside_world(prompt: str) -> None:
    """The embedded model knows only its shapes world: say so when a prompt does not parse into it."""
    from safe_dit.embedded import world

    if not world.in_world(prompt):
        logger.warning("this prompt is outside the embedded model's world (%s); it will draw noise or the nearest "
                       "scene it knows. See 'safe-dit generate --help' for the vocabulary", world.VOCABULARY_HINT)
