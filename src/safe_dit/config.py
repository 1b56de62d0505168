"""User-facing configuration: one frozen dataclass, validated on construction."""

from __future__ import annotations

import math
from dataclasses import dataclass

MODES = ("dense", "dense-fp", "safe-core", "safe-sw")
PARTITIONS = ("pcsp", "uniform", "random")


class SafeDitError(ValueError):
    """Raised for invalid configuration or input that safe-dit refuses to handle."""


@dataclass(frozen=True)
class SafeConfig:
    """How safe-dit should run a model.

    The safe-core defaults (keep 0.2, warm-up 2, anchor gaps 2, 3, 4, ..., one dense tail step before a final
    selective one, linear context K/V forecast, every 2nd step after an anchor reused) were chosen on a held-out
    prompt set (seed 23, both embedded models) as the fastest schedule tried whose worst prompt stays above 35 dB
    and whose median stays above 42 dB against dense-fp (``benchmarks/results/tail-sweep-cpu.txt``);
    ``SafeConfig(..., **PUBLISHED)`` in ``safe_dit.bench.pareto_settings`` is the published schedule.

    mode:
        ``dense``     the stock model, masks as shipped (baseline; applying it changes nothing).
        ``dense-fp``  the exact fast path: provenance-certified redundant masks are elided,
                      semantics-bearing masks are kept or rewritten exactly.
        ``safe-core`` fast path + PCSP partition + SRSU selective updates + CAR anchors.
        ``safe-sw``   ``safe-core`` + sensitivity-weighted CFG (``cfg_context``/``cfg_sensitive``).
    rewrite_padding:
        Rewrite key-padding masks (e.g. caption padding in cross-attention) into exact mask-free
        calls by gathering each sample's valid keys. ``False`` keeps them as shipped.
    keep_ratio:
        Fraction of image tokens marked sensitive and recomputed at selective steps (0, 1].
    warmup_steps:
        Leading dense steps whose image->text attention builds the partition (>= 1).
    anchor_interval:
        The gap from the last warm-up step to the first dense anchor (anchors refresh all tokens and
        the K/V caches); with ``anchor_growth=0`` every ``anchor_interval``-th step is an anchor
        (>= 1; 1 means every step is dense).
    tail_dense_steps:
        Dense steps at the end, before the final selective steps (>= 0); they refresh the caches.
    final_selective_steps:
        The last steps, after the dense tail, update only the sensitive rows (against the tail's K/V and output;
        anchors that would fall there are dropped). On the held-out set one such step instead of a second dense
        tail step cost 0.1-0.2 dB at 20, 28 and 30 steps and saves a ninth of the dense work at 30 (>= 0).
    smooth_radius:
        Box-filter radius on the token grid for the sensitivity map (>= 0).
    pcsp_blocks:
        Indices of the blocks whose cross-attention feeds PCSP; ``None`` = all blocks.
    text_importance:
        Optional per-caption-token weights (one float per token position) for PCSP.
    cfg_context / cfg_sensitive:
        ``safe-sw`` only: guidance scale on context (s=0) and on sensitive (s=1) tokens.

    Ablation knobs (defaults = the method; each switches off one component, for measuring what it
    contributes; ``safe-dit pareto`` runs them):

    mask_elision:
        ``False`` keeps every mask as the stock model ships it (no provenance elision, no padding
        rewrite) under ``safe-core``/``safe-sw``: the "no fast path" ablation; the scheduling still runs.
    partition:
        ``"pcsp"`` (the method), or the same number of tokens chosen without the prompt:
        ``"uniform"`` (evenly strided over the token grid) or ``"random"`` (seeded by
        ``partition_seed``). The non-PCSP partitions skip the warm-up image->text attention.
    srsu:
        ``False``: no selective updates, every step after warm-up computes every row (dense).
    car:
        ``False``: no dense refresh after warm-up, neither periodic anchors nor tail steps;
        context tokens reuse the last warm-up step's K/V and outputs to the end.
    context_forecast:
        Between anchors, the sensitive rows attend to the context tokens' keys/values of the last anchor
        (0, the published method) or to their polynomial forecast of this order (1 linear, 2 quadratic)
        in the timestep, through the last order+1 dense steps (warm-up steps included; lower order until
        there are enough). Context outputs keep the anchor's velocity either way.
    anchor_growth:
        The gap between anchors grows by this many steps after each anchor (from ``anchor_interval``; 0:
        periodic): anchors dense while the trajectory changes fast, sparse as it settles.
    anchor_steps:
        Explicit anchor step indices (after warm-up), replacing the periodic ``anchor_interval``: denser
        where the trajectory changes fast.
    reuse_every:
        Step-level reuse composed with SRSU: every ``reuse_every``-th step after an anchor that would be
        selective skips the model and forecasts every row's output (0: never).
    reuse_order:
        The forecast of a reuse step: the last computed model output (0) or the line through the last
        two (1), in the timestep.
    anchor_drift:
        Drift-triggered anchors: a step planned selective or reuse runs as a dense anchor when, at the last
        selective step, the fresh sensitive rows' keys and values differed from what the context cache (or its
        forecast) held for those rows by more than this relative amount (RMS error over RMS, all layers). The
        sensitive rows are computed anyway, so the estimate is nearly free; it stands in for the forecast error
        of the context rows, which cannot be checked (0: off).
    sw_map:
        ``safe-sw`` only. ``False`` replaces the per-token map by its per-image mean: the same
        average guidance, without the spatial weighting.
    context_parallel:
        A diffusers ``ContextParallelConfig`` (ulysses, ring, or their ``*_anything`` variants) to split the image
        (and, in SD3/FLUX/Chroma, text) tokens over the ranks of an initialised process group (torchrun); models
        with caption padding in joint attention keep the whole caption on every rank.
        safe-dit splits after the token embedders and gathers after the last per-token layer in its own hooks;
        sequence attention goes through diffusers' dispatcher with the parallel config, caption cross-attention
        stays local, and lengths (proportional scale, PCSP top-K) are global. ``None``: one device.
    """

    mode: str = "dense-fp"
    rewrite_padding: bool = True
    keep_ratio: float = 0.2
    warmup_steps: int = 2
    anchor_interval: int = 2
    tail_dense_steps: int = 1
    final_selective_steps: int = 1
    smooth_radius: int = 1
    pcsp_blocks: tuple[int, ...] | None = None
    text_importance: tuple[float, ...] | None = None
    cfg_context: float = 3.0
    cfg_sensitive: float = 5.0
    mask_elision: bool = True
    partition: str = "pcsp"
    partition_seed: int = 0
    srsu: bool = True
    car: bool = True
    sw_map: bool = True
    context_forecast: int = 1
    anchor_growth: float = 1.0
    anchor_steps: tuple[int, ...] | None = None
    reuse_every: int = 2
    reuse_order: int = 1
    anchor_drift: float = 0.0
    context_parallel: object | None = None  # diffusers.ContextParallelConfig

    def __post_init__(self) -> None:
        if not isinstance(self.mode, str) or self.mode not in MODES:
            raise SafeDitError(f"invalid mode {self.mode!r}; choose one of {', '.join(MODES)}")
        _check(isinstance(self.rewrite_padding, bool), "rewrite_padding must be a bool")
        _check(_real(self.keep_ratio) and 0 < self.keep_ratio <= 1,
               f"keep_ratio must be in (0, 1], got {self.keep_ratio!r}")
        _check(_int(self.warmup_steps) and self.warmup_steps >= 1,
               f"warmup_steps must be an int >= 1, got {self.warmup_steps!r}")
        _check(_int(self.anchor_interval) and self.anchor_interval >= 1,
               f"anchor_interval must be an int >= 1, got {self.anchor_interval!r}")
        _check(_int(self.tail_dense_steps) and self.tail_dense_steps >= 0,
               f"tail_dense_steps must be an int >= 0, got {self.tail_dense_steps!r}")
        _check(_int(self.final_selective_steps) and self.final_selective_steps >= 0,
               f"final_selective_steps must be an int >= 0, got {self.final_selective_steps!r}")
        _check(_int(self.smooth_radius) and self.smooth_radius >= 0,
               f"smooth_radius must be an int >= 0, got {self.smooth_radius!r}")
        if self.pcsp_blocks is not None:
            _check(isinstance(self.pcsp_blocks, tuple) and len(self.pcsp_blocks) > 0
                   and all(_int(i) and i >= 0 for i in self.pcsp_blocks),
                   f"pcsp_blocks must be a non-empty tuple of block indices >= 0, got {self.pcsp_blocks!r}")
        if self.text_importance is not None:
            _check(isinstance(self.text_importance, tuple) and len(self.text_importance) > 0
                   and all(_real(w) and w >= 0 for w in self.text_importance),
                   "text_importance must be a non-empty tuple of finite weights >= 0")
        for name in ("cfg_context", "cfg_sensitive"):
            _check(_real(getattr(self, name)), f"{name} must be a finite number")
        for name in ("mask_elision", "srsu", "car", "sw_map"):
            _check(isinstance(getattr(self, name), bool), f"{name} must be a bool, got {getattr(self, name)!r}")
        _check(isinstance(self.partition, str) and self.partition in PARTITIONS,
               f"partition must be one of {', '.join(PARTITIONS)}, got {self.partition!r}")
        _check(_int(self.partition_seed), f"partition_seed must be an int, got {self.partition_seed!r}")
        _check(_int(self.context_forecast) and self.context_forecast in (0, 1, 2),
               f"context_forecast must be 0 (frozen), 1 (linear) or 2 (quadratic), got {self.context_forecast!r}")
        if self.anchor_steps is not None:
            _check(isinstance(self.anchor_steps, tuple) and all(_int(i) and i >= 0 for i in self.anchor_steps)
                   and list(self.anchor_steps) == sorted(set(self.anchor_steps)),
                   f"anchor_steps must be a tuple of increasing step indices >= 0, got {self.anchor_steps!r}")
        _check(_real(self.anchor_growth) and self.anchor_growth >= 0,
               f"anchor_growth must be a number >= 0, got {self.anchor_growth!r}")
        _check(_int(self.reuse_every) and self.reuse_every >= 0,
               f"reuse_every must be an int >= 0, got {self.reuse_every!r}")
        _check(_real(self.anchor_drift) and self.anchor_drift >= 0,
               f"anchor_drift must be a number >= 0 (0: off), got {self.anchor_drift!r}")
        _check(_int(self.reuse_order) and self.reuse_order in (0, 1),
               f"reuse_order must be 0 (last output) or 1 (linear), got {self.reuse_order!r}")
        if self.context_parallel is not None:
            from diffusers.models._modeling_parallel import ContextParallelConfig

            _check(isinstance(self.context_parallel, ContextParallelConfig),
                   "context_parallel must be a diffusers ContextParallelConfig, "
                   f"got {type(self.context_parallel).__name__}")
            _check(self.mode != "dense",
                   "mode='dense' is the stock model, which safe-dit leaves untouched: run it under "
                   "diffusers' enable_parallelism, or use dense-fp (exactly equal) with context_parallel")
            _check(self.mask_elision, "mask_elision=False keeps the stock masks, which cannot be sharded under "
                   "context_parallel (Lumina-Next's is [B, H, N, N])")
        _check(self.mask_elision or self.mode != "dense-fp",
               "dense-fp without its fast path is dense: use mode='dense' "
               "(mask_elision=False is a safe-core/safe-sw ablation)")

    @property
    def ablations(self) -> tuple[str, ...]:
        """Names of the components switched off (empty for the method as published)."""
        out = []
        if not self.mask_elision and self.mode != "dense":
            out.append("no-fast-path")
        if self.scheduled:
            if self.partition != "pcsp":
                out.append(f"{self.partition}-partition")
            if not self.srsu:
                out.append("no-srsu")
            if not self.car:
                out.append("no-car")
        if self.mode == "safe-sw" and not self.sw_map:
            out.append("flat-sw-map")
        return tuple(out)

    @property
    def fast_path(self) -> bool:
        """Every mode but ``dense`` patches the model (processors, hooks); the patch elides masks
        unless ``mask_elision=False``."""
        return self.mode != "dense"

    @property
    def scheduled(self) -> bool:
        """True for the modes that partition tokens and update only the sensitive ones."""
        return self.mode in ("safe-core", "safe-sw")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise SafeDitError(message)


def _real(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)
