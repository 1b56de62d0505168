"""The GPU suite's steps: what each ``bench e2e`` (or MIDT) run measures, in the real models' shapes, and the
committed H200 runs its time estimate scales (``safe_dit.bench.gpu_budget``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from safe_dit.testing.kits import KITS

RESULTS = Path(__file__).resolve().parents[3] / "benchmarks" / "results"
MODES = ("dense", "dense-fp", "safe-core")
FRAMES_480P = 21  # Wan 2.x at 480p, 81 frames: 21 latent frames x 30 x 52 tokens = 32,760 after its 1x2x2 patches


@dataclass(frozen=True)
class Step:
    """One ``bench e2e`` run of the suite and where its time estimate comes from."""

    name: str  # e2e-<tag>-<name>.json
    model: str  # kit name in KITS
    what: str  # one line for the plan and the summary
    tokens: int  # image tokens of the square latent grid (per frame where bench e2e takes --frames)
    steps: int  # sampling steps per timed call
    repeats: int  # timed calls per mode (median reported)
    guidance: float
    refs: tuple[tuple[str, int], ...]  # committed H200 runs (file in benchmarks/results, tokens) the estimate scales
    dense_ref: tuple[str, int] | None = None  # a masked run whose dense / dense-fp scales dense (refs mask-free)
    prompts: int = 1  # 2: two prompts of different caption lengths in one batch
    layers: int | None = None  # None: the real model's full depth
    frames: int = 1  # latent frames (video), where bench e2e takes --frames
    flat_tokens: int | None = None  # video where bench e2e drives one square grid: all frames' tokens in one grid
    dry_tokens: int = 64  # the dry run's grid
    preset: str | None = None  # None: the kit's real preset
    timed: bool = True  # False: warm-up and peak-memory calls only (does it run, at what peak)
    optional: bool = False  # run only where the budget leaves room (a test holds every other step to the budget)


@dataclass(frozen=True)
class MidtStep:
    """The MIDT sweep (``safe-dit midt``): one SDPA call with and without each redundant mask, the kernels seen."""

    name: str = "midt"
    what: str = "MIDT: one SDPA call, batch 2, 32 heads, with / without each mask"
    seq_lens: tuple[int, ...] = (1024, 2048, 4096, 8192, 16384)
    head_dims: tuple[int, ...] = (72, 128)  # Lumina-Next, FLUX / Qwen-Image / Wan
    heads: int = 32
    batch: int = 2
    repeats: int = 10
    warmup: int = 3
    ref: str = "midt-gpu.json"
    model: str | None = None
    optional: bool = False
    steps: int = 0
    timed: bool = True


STEPS = (
    MidtStep(),
    Step("lumina-next-1024", "lumina-next", "Lumina-Next-2B, 24 blocks, 1024², CFG batch 2", 4096, 30, 2, 4.0,
         refs=(("e2e-gpu.json", 4096),)),
    Step("lumina-next-2048", "lumina-next", "Lumina-Next-2B, 24 blocks, 2048², CFG batch 2", 16384, 20, 2, 4.0,
         refs=(("e2e-gpu-16384.json", 16384),)),
    Step("sd3-1024", "sd3", "SD3-Medium, 24 joint blocks, 1024², CFG batch 2", 4096, 28, 2, 7.0,
         refs=(("e2e-gpu-sd3.json", 4096),)),
    Step("flux-1024", "flux", "FLUX.1-dev, 19 double + 38 single blocks, 1024², batch 1", 4096, 28, 2, 3.5,
         refs=(("e2e-gpu-flux.json", 4096),)),
    Step("qwen-image-p2-1024", "qwen-image",
         "Qwen-Image, 60 blocks, 1024², 2 prompts (20 and 3 valid caption tokens) in one batch", 4096, 10, 2, 1.0,
         refs=(("e2e-gpu-flux.json", 4096),), dense_ref=("e2e-gpu.json", 4096), prompts=2),
    # 480p x 81 frames is 21 latent frames of 30 x 52 tokens (32,760): 21 frames of 40 x 40 where bench e2e takes
    # --frames, else one 184 x 184 grid (33,856): the same attention and weight work within 3%
    Step("wan-480p", "wan", "Wan, full depth, the token count of 480p x 81 frames, CFG batch 2", 1600, 10, 1, 5.0,
         refs=(("e2e-gpu-flux.json", 16384),), frames=FRAMES_480P, flat_tokens=33856),
    Step("lumina-next-2560-memory", "lumina-next", "Lumina-Next-2B, 24 blocks, 2560², CFG batch 2: peak memory only",
         25600, 30, 1, 4.0, refs=(("e2e-gpu-16384.json", 16384),), timed=False, optional=True),
)


def run_shape(step: Step, dry: bool = False) -> tuple[int, int]:
    """(tokens, frames) of the step's bench e2e call: its ``--tokens``, all frames' tokens together as bench e2e
    counts them (frames x side x side), and its ``--frames``."""
    if dry:
        frames = min(step.frames, 2)
        return step.dry_tokens * frames, frames
    return step.tokens * step.frames, step.frames


def skip_reason(step: Step) -> str | None:
    """Why a step cannot run with this checkout, or None."""
    if step.model is not None and step.model not in KITS:
        return f"no `{step.model}` kit in safe_dit.testing.kits.KITS (its adapter has not landed)"
    return None
