"""The pipelines a ``--model`` names (the embedded default, a kit's tiny random pipeline, a local diffusers
pipeline), their native size, the size limits, and the keywords each pipeline's ``__call__`` takes. Shared by
``safe-dit generate`` and ``safe-dit study make``; torch and diffusers load only when a pipeline does."""

from __future__ import annotations

import inspect

from safe_dit.config import SafeDitError

DEFAULT_MODEL = "default"
ROPE_TOKENS = 384  # LuminaPipeline builds its 2-D RoPE table for 384 x 384 tokens
MAX_SIDE = ROPE_TOKENS * 16  # patch 2 over a VAE of factor 8: the most pixels per token side of any shipped pipeline
EMBEDDED_MAX_SIDE = ROPE_TOKENS * 4  # the embedded model: patch 4 on pixels (no VAE), 4 pixels a token side
SEED_MAX = 2**32 - 1  # torch's CPU generator keeps the low 32 bits of a seed: larger ones repeat smaller ones


def tiny_pipelines() -> dict:
    """Tiny-pipeline name -> builder, one per kit: offline, randomly initialised, every code path in seconds, but
    they draw noise."""
    from safe_dit.testing.kits import KITS

    return {kit.tiny_name: kit.text_pipeline for kit in KITS.values()}


def load_pipeline(model: str, dtype, device: str, height: int | None = None, width: int | None = None):
    """The embedded default (the one trained at the requested size, 64 or 128 px), a tiny random pipeline, or a local
    diffusers pipeline of a supported backbone."""
    from safe_dit.adapters import adapter_for, supported_classes

    if model == DEFAULT_MODEL:
        from safe_dit.embedded.model import load_default_pipeline, size_for

        return load_default_pipeline(dtype=dtype, size=size_for(height, width)).to(device)
    tiny = tiny_pipelines()
    if model in tiny:
        return tiny[model]().to(device, dtype)
    from diffusers import DiffusionPipeline

    try:
        pipe = DiffusionPipeline.from_pretrained(model, dtype=dtype, local_files_only=True)
    except (OSError, ValueError) as err:
        raise SafeDitError(
            f"could not load a diffusers pipeline from {model!r} without downloading ({err.__class__.__name__}: "
            f"{str(err).splitlines()[0][:200]}). Pass a local pipeline directory (model classes: "
            f"{', '.join(supported_classes())}), '{DEFAULT_MODEL}', or one of {', '.join(tiny)}"
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
    import torch

    params = inspect.signature(pipe.__call__).parameters
    kwargs = dict(height=args.height, width=args.width, num_inference_steps=args.steps, guidance_scale=args.guidance,
                  generator=torch.Generator().manual_seed(args.seed))
    if "guidance_scale" not in params:  # HunyuanVideo 1.5: its guider component holds the scale
        held = getattr(getattr(pipe, "guider", None), "guidance_scale", None)
        if held is not None and held != args.guidance:
            raise SafeDitError(f"{type(pipe).__name__} takes its guidance scale from its guider component "
                               f"({held:g}), not --guidance: pass --guidance {held:g}, or set the guider's scale in "
                               "the pipeline directory")
        del kwargs["guidance_scale"]
    if "true_cfg_scale" in params:  # FLUX: guidance-distilled; a negative prompt would need true CFG
        if args.negative_prompt:
            raise SafeDitError("FLUX is guidance-distilled (--guidance sets its guidance embedding): FluxPipeline "
                               "ignores a negative prompt unless true CFG runs two transformer calls per step, which "
                               "safe-dit's scheduled modes refuse. Drop --negative-prompt")
    else:
        kwargs["negative_prompt"] = args.negative_prompt
    if "clean_caption" in params:
        kwargs["clean_caption"] = False  # needs bs4/ftfy; the prompt is used as typed
    if "use_resolution_binning" in params and pipe.transformer.config.sample_size not in (32, 64, 128, 256):
        kwargs["use_resolution_binning"] = False  # PixArt has aspect-ratio bins only for its real sample sizes
    return kwargs


def check_size(args) -> None:
    """``args.height``/``args.width`` (None: the model's native size) are positive multiples of 16 within
    ``MAX_SIDE`` (a one-line SafeDitError otherwise)."""
    if any(v is not None and (v < 16 or v % 16) for v in (args.height, args.width)):
        raise SafeDitError("--height and --width must be positive multiples of 16")
    if any(v is not None and v > MAX_SIDE for v in (args.height, args.width)):
        raise SafeDitError(f"--height and --width must be at most {MAX_SIDE} pixels (Lumina-Next's RoPE table covers "
                           f"{ROPE_TOKENS} tokens a side; larger sizes fail inside diffusers or on allocation)")


def rope_side(pipe) -> int | None:
    """Largest image side in pixels Lumina's pipeline has RoPE rows for (None: no such table)."""
    from diffusers import LuminaNextDiT2DModel

    if not isinstance(pipe.transformer, LuminaNextDiT2DModel):
        return None
    return ROPE_TOKENS * pipe.transformer.config.patch_size * int(getattr(pipe, "vae_scale_factor", 8))


def check_rope(pipe, args) -> None:
    side = rope_side(pipe)
    if side is not None and max(args.height, args.width) > side:
        raise SafeDitError(f"--height and --width must be at most {side} pixels for this model: its pipeline has RoPE "
                           f"rows for {ROPE_TOKENS} tokens a side")


def is_video(pipe) -> bool:
    """A text-to-video pipeline: its ``__call__`` takes ``num_frames`` (and returns ``.frames``)."""
    return "num_frames" in inspect.signature(pipe.__call__).parameters


def native_video(pipe, model: str) -> tuple[int | None, int | None, int | None]:
    """(height, width, frames) of a video pipeline's default call: a tiny pipeline's kit run, else the defaults of
    the pipeline's own ``__call__`` (``WanPipeline``: 480 x 832, 81 frames; None where it names none)."""
    from safe_dit.testing.kits import KITS

    kit = next((k for k in KITS.values() if k.tiny_name == model), None)
    if kit is not None and kit.tiny_run.frames:
        return kit.tiny_run.height, kit.tiny_run.width, kit.tiny_run.frames
    params = inspect.signature(pipe.__call__).parameters
    defaults = [params[name].default if name in params else None for name in ("height", "width", "num_frames")]
    return tuple(value if isinstance(value, int) else None for value in defaults)


def check_video(pipe, height: int, width: int, frames: int) -> None:
    """``frames`` fits the pipeline's VAE (1 + temporal factor x k) and the video's token grid fits the
    transformer's RoPE table where it has one (Wan: ``rope_max_seq_len`` positions per axis)."""
    temporal = int(getattr(pipe, "vae_scale_factor_temporal", 1) or 1)
    if (frames - 1) % temporal:
        raise SafeDitError(f"--frames must be 1 + {temporal} x k for this model's VAE (e.g. {1 + temporal}, "
                           f"{1 + 8 * temporal}, {1 + 20 * temporal}), got {frames}")
    cfg = pipe.transformer.config
    rope = cfg.get("rope_max_seq_len")
    patch = cfg.get("patch_size")
    spatial = int(getattr(pipe, "vae_scale_factor_spatial", 8) or 8)
    if rope is None or not isinstance(patch, (list, tuple)) or len(patch) != 3:
        return
    grid = (((frames - 1) // temporal + 1) // patch[0], height // (spatial * patch[1]), width // (spatial * patch[2]))
    if max(grid) > rope:
        raise SafeDitError(f"this model's RoPE table covers {rope} tokens an axis; {frames} frames of "
                           f"{height}x{width} make {grid[0]} x {grid[1]} x {grid[2]} (frames x rows x columns): "
                           "ask for fewer frames or pixels")
