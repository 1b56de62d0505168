"""SRSU + CAR runtime state: one generation's partition and caches, model-agnostic.

Adapters call into a :class:`Generation` from their hooks: ``begin_step`` at each model forward,
``collect`` from cross-attention during warm-up, ``store_kv``/``merged_kv`` from self-attention,
``gather``/``scatter_output`` around the block stack. Created at a generation's first step and
dropped after its last, so nothing leaks from one pipeline call into the next.
"""

from __future__ import annotations

import logging
import math

import torch

from safe_dit.config import SafeConfig, SafeDitError
from safe_dit.engine.partition import SensitivityAccumulator, prompt_free_partition, select_sensitive, sensitivity_map
from safe_dit.engine.rows import (  # noqa: F401  (re-exported: the forecasts' and SRSU's row helpers)
    _row_index,
    combine,
    extrapolation_weights,
    gather_rows,
    scatter_rows,
)
from safe_dit.engine.schedule import ANCHOR, REUSE, SELECTIVE, TAIL, WARMUP, StepPlan

logger = logging.getLogger(__name__)


CALL_CACHES = ("kv", "kv_history", "output", "model_outputs", "output_template")  # one set per call of a step


def _empty_caches() -> dict:
    return {"kv": {}, "kv_history": {}, "output": None, "model_outputs": [], "output_template": None}


class Generation:
    """State of one sampling run under ``safe-core``/``safe-sw``."""

    def __init__(self, config: SafeConfig, num_steps: int, parallel=None):
        self.config = config
        # Context parallelism (engine.parallel.SequenceParallel): the partition is chosen on the gathered global
        # map; ``index`` then holds this rank's local rows (padded to one count on every rank, ``valid`` False on
        # placeholder rows of a sample with none here), ``global_index`` the partition itself.
        self.parallel = parallel
        self.valid: torch.Tensor | None = None  # [B, K] (None: every row real)
        self.global_index: torch.Tensor | None = None  # [B, K] over all N tokens
        self.local_tokens: int | None = None  # image tokens of this rank (N without context parallelism)
        self.plan = StepPlan.of(config, num_steps)
        self.step = -1
        self.kind = WARMUP
        self.accumulator = SensitivityAccumulator()
        self.grid: tuple[int, ...] | None = None  # the token grid, (h, w) or (f, h, w)
        self.cfg_batch = False  # batch = two halves (cond, uncond), as the pipeline call said
        self.first_timestep: float | None = None  # of the first step (a pipeline's scheduler that does not advance)
        self.cond_first = True  # [cond; uncond] (Lumina) or [uncond; cond] (PixArt)
        self.sensitivity: torch.Tensor | None = None  # [B, N] in [0, 1]
        self.index: torch.Tensor | None = None  # [B, K] sensitive token positions
        self.kv: dict = {}  # layer (index or attention name) -> K, V [B, N, Hkv, d]
        self.output: torch.Tensor | None = None  # per-token model output at the last anchor [B, N, C]
        self.anchor_step = -1  # the step that output comes from
        # context_forecast > 0: per layer, the K/V of the last order+1 cache-refreshing steps [(K, V)], taken at
        # the steps ``kv_steps``; ``kv_weights`` their extrapolation weights to this step (None: no forecast yet)
        self.kv_history: dict = {}
        self.kv_steps: list[int] = []
        self.kv_weights: list[float] | None = None
        self.kv_weights_tensor: torch.Tensor | None = None
        # per-step facts the processors branch on, fixed eagerly in begin_step: under torch.compile a bool guards
        # two graphs, where the step index would guard (and recompile) every step
        self.refresh = False
        self.last_step = False
        self.times: dict[int, float | None] = {}  # step -> its timestep (the forecasts' variable; else the step index)
        self.model_outputs: list[tuple[int, torch.Tensor]] = []  # reuse_every: the last computed model outputs
        self.output_template = None  # the structure (tuple / ModelOutput) of the last computed model output
        self.tokens_per_step: list[int] = []
        self.kinds: list[str] = []
        # A pipeline that runs CFG as separate calls (conditional first, then unconditional) makes
        # ``calls_per_step`` model calls per step: they share the step plan and the partition (read from the first,
        # the prompt's), and each keeps its own caches (the ``CALL_CACHES`` attributes, swapped per call).
        self.calls_per_step = 1
        self.call = 0
        self._other_calls: dict[int, dict] = {}
        self.batch = 1
        self.device: torch.device | None = None  # where the latents live; prompt-free partitions are made there
        self._memo: dict = {}  # values fixed with the partition (joint row positions)
        # anchor_drift > 0: the sensitive rows' relative change at the last selective step (a 0-d tensor, read in
        # the next begin_step), and the steps that became anchors because of it
        self.drift: torch.Tensor | None = None
        self.drift_sums: torch.Tensor | None = None  # [1, 2]: this step's squared error and squared norm so far
        self.drift_anchors: list[int] = []

    # -- step control -------------------------------------------------------------------------
    def begin_step(self, step: int, num_tokens: int, grid: tuple[int, ...], batch: int = 1,
                   device: torch.device | str | None = None, timestep: float | None = None) -> str:
        if step == self.step and self.call + 1 < self.calls_per_step:  # the step's next call (CFG's unconditional)
            return self._next_call(grid, batch)
        self._use_call(0)
        if self.grid is not None and grid != self.grid:
            raise RuntimeError(f"token grid changed from {self.grid} to {grid} inside one generation")
        self.grid = grid
        self.batch = batch
        self.device = torch.device(device) if device is not None else self.device
        self.step = step
        self.times[step] = timestep
        if self.parallel is None:
            self.local_tokens = num_tokens
        else:
            start, stop = self.parallel.local(num_tokens, "image tokens")
            self.local_tokens = stop - start
        if self.config.anchor_drift:
            self._close_drift()
        kind = self.plan.kind(step)
        if kind != WARMUP and self.index is None:
            self._finish_partition()
            self._memo = {}
        if kind == SELECTIVE and (self.output is None or not self.kv):
            kind = ANCHOR  # no anchor cache yet (e.g. anchor_interval larger than the run): stay dense
        if kind == REUSE and not self.model_outputs:
            kind = SELECTIVE if self.output is not None and self.kv else ANCHOR
        if kind in (SELECTIVE, REUSE) and self.drift is not None and float(self.drift) > self.config.anchor_drift:
            kind = ANCHOR  # the context has drifted too far since the last refresh
            self.drift_anchors.append(step)
        self.kind = kind
        self.kinds.append(kind)
        self.refresh = kind in (ANCHOR, TAIL) or (kind == WARMUP and step == self.plan.warmup_steps - 1)
        self.last_step = step >= self.plan.num_steps - 1 and self.calls_per_step == 1
        order = self.config.context_forecast
        if self.refresh:
            self.anchor_step = step
            self.drift = None
            if order:  # this step's K/V become the newest forecast node
                self.kv_steps = (self.kv_steps + [step])[-(order + 1):]
        elif len(self.kv_steps) > 1:
            self.kv_weights = self._weights(self.kv_steps)
            self.kv_weights_tensor = torch.tensor(self.kv_weights, dtype=torch.float32, device=self.device)
        self.tokens_per_step.append({SELECTIVE: self.global_index.shape[1] if self.index is not None else num_tokens,
                                     REUSE: 0}.get(kind, num_tokens))
        return kind

    @property
    def is_last_step(self) -> bool:
        """The generation's last model call (of its last step)."""
        return self.last_step

    def _next_call(self, grid: tuple[int, ...], batch: int) -> str:
        """The next call of the current step: the same step kind on its own caches, which the calls fill in lockstep
        (every call of a step runs the same kind)."""
        if grid != self.grid or batch != self.batch:
            raise SafeDitError(f"the calls of one sampling step differ in token grid or batch ({self.grid} x "
                               f"{self.batch}, then {grid} x {batch}): each call's caches must match its rows")
        self._use_call(self.call + 1)
        if (self.kind == SELECTIVE and (self.output is None or not self.kv)) or \
                (self.kind == REUSE and not self.model_outputs):
            raise SafeDitError(f"call {self.call} of step {self.step} has no caches of its own for a {self.kind} "
                               "step: every call of a sampling step must run at every step of the generation")
        self.last_step = self.step >= self.plan.num_steps - 1 and self.call == self.calls_per_step - 1
        return self.kind

    def _use_call(self, call: int) -> None:
        """Make ``call``'s caches the current ones (the others are kept aside)."""
        if call == self.call:
            return
        self._other_calls[self.call] = {name: getattr(self, name) for name in CALL_CACHES}
        saved = self._other_calls.pop(call, None) or _empty_caches()
        for name, value in saved.items():
            setattr(self, name, value)
        self.call = call

    def continued(self) -> "Generation":
        """The same trajectory continued by another model (Wan 2.2's second transformer): its step plan, position,
        partition (or the warm-up's running sensitivity) and report so far, but none of the caches: they hold this
        model's K/V and outputs, so the next model's first step is dense (an anchor)."""
        new = Generation(self.config, self.plan.num_steps, self.parallel)
        for name in ("step", "kind", "accumulator", "grid", "cfg_batch", "first_timestep", "cond_first", "sensitivity",
                     "index", "valid", "global_index", "local_tokens", "batch", "device", "calls_per_step"):
            setattr(new, name, getattr(self, name))
        new.call = self.calls_per_step - 1  # the last call of the step that ran
        new.times, new.kinds, new.tokens_per_step = dict(self.times), list(self.kinds), list(self.tokens_per_step)
        return new

    # -- PCSP ---------------------------------------------------------------------------------
    def wants_probs(self, layer: int) -> bool:
        blocks = self.config.pcsp_blocks
        return self.kind == WARMUP and self.call == 0 and self.config.partition == "pcsp" and \
            (blocks is None or layer in blocks)

    def collect(self, probs: torch.Tensor, text_weights: torch.Tensor) -> None:
        self.accumulator.add(probs, text_weights)

    def _finish_partition(self) -> None:
        if self.config.partition != "pcsp":  # ablation: same K, chosen without the prompt
            n = math.prod(self.grid)
            index = prompt_free_partition(self.config.partition, self.batch, n, self.config.keep_ratio,
                                          self.config.partition_seed)  # [B, K], made on the CPU (seeded)
            self._localise(index.to(self.device) if self.device is not None else index)
            self.sensitivity = torch.zeros(self.batch, n, device=self.global_index.device).scatter_(
                1, self.global_index, 1.0)
            return
        score = self.accumulator.mean()  # [B, N] ([B, N_local] under context parallelism)
        if self.parallel is not None:  # the top-K is global: exact against one device
            score = self.parallel.gather(score, 1)  # [B, N]
        if self.cfg_batch:
            cond = score[self.cfg_rows(score.shape[0])[0]]
            score = torch.cat([cond, cond])  # the unconditional half has no prompt
        self.sensitivity = sensitivity_map(score, self.grid, self.config.smooth_radius)
        self._localise(select_sensitive(self.sensitivity, self.config.keep_ratio))
        self.accumulator = SensitivityAccumulator()
        logger.info("PCSP: %d of %d tokens sensitive", self.global_index.shape[1], score.shape[1])

    def _localise(self, index: torch.Tensor) -> None:
        """Fix the partition: ``global_index`` [B, K]; ``index`` the rows this process computes."""
        self.global_index = index
        if self.parallel is None:
            self.index, self.valid = index, None
        else:
            self.index, self.valid = self.parallel.local_partition(index, math.prod(self.grid))

    # -- SRSU caches --------------------------------------------------------------------------
    @property
    def refreshes_cache(self) -> bool:
        """Anchors, tail steps (final selective steps may follow them) and the last warm-up step (the first
        anchor) refill the SRSU caches."""
        return self.refresh

    def store_kv(self, layer, key: torch.Tensor, value: torch.Tensor) -> None:
        order = self.config.context_forecast
        if order and self.kind != SELECTIVE:  # a forecast node (its step is in kv_steps)
            hist = self.kv_history.setdefault(layer, [])
            hist.append((key, value))
            del hist[:-(order + 1)]
        if self.refreshes_cache:
            self.kv[layer] = (key, value)

    def merged_kv(self, layer, key_rows: torch.Tensor, value_rows: torch.Tensor, rows_at: torch.Tensor | None = None,
                  valid: torch.Tensor | None = None):
        """Full K/V [B, L, Hkv, d]: the fresh rows written over the context's, in place. ``rows_at`` [B, n]
        says where the fresh rows [B, n, Hkv, d] go (default: the sensitive image rows). The context rows are
        the anchor's K/V (``context_forecast=0``; exact reuse: the partition is fixed between anchors, so every
        row a selective step wrote is written again by the next one) or their polynomial forecast through the
        last dense steps at this step's timestep (a new tensor per step and layer). ``valid`` [B, n] (default:
        this rank's ``valid``, for the sensitive image rows): placeholder rows keep the context's K/V."""
        at = self.index if rows_at is None else rows_at
        valid = self.valid if rows_at is None else valid
        hist = self.kv_history.get(layer)
        if hist and len(hist) > 1:
            weights = self.kv_weights_tensor if torch.compiler.is_compiling() else self.kv_weights
            k = combine([h[0] for h in hist], weights)  # [B, L, Hkv, d]
            v = combine([h[1] for h in hist], weights)
        else:
            k, v = self.kv[layer]
        if valid is not None:
            keep = valid.view(*valid.shape, *([1] * (key_rows.dim() - 2)))  # [B, n, 1, 1]
            key_rows = torch.where(keep, key_rows.to(k.dtype), gather_rows(k, at))
            value_rows = torch.where(keep, value_rows.to(v.dtype), gather_rows(v, at))
        if self.config.anchor_drift:
            self._measure_drift([key_rows, value_rows], [gather_rows(k, at), gather_rows(v, at)])
        k.scatter_(1, _row_index(at, key_rows), key_rows.to(k.dtype))
        v.scatter_(1, _row_index(at, value_rows), value_rows.to(v.dtype))
        return k, v

    def joint_rows(self, n_text: int, text_first: bool) -> torch.Tensor:
        """Where the rows of a selective step's joint sequence ([text; sensitive image rows] or the reverse) sit
        in the full joint sequence: [B, T + K] (text rows always fresh)."""
        def make():
            b, n = self.index.shape[0], self.local_tokens
            text = torch.arange(n_text, device=self.index.device).expand(b, -1)  # [B, T]
            return torch.cat([text, self.index + n_text] if text_first else [self.index, text + n], dim=1)

        return self.remember(("joint_rows", n_text, text_first), make)

    def joint_valid(self, n_text: int, text_first: bool) -> torch.Tensor | None:
        """``valid`` for ``joint_rows`` (text rows always real), or None when every row is real."""
        if self.valid is None:
            return None

        def make():
            text = torch.ones(self.valid.shape[0], n_text, dtype=torch.bool, device=self.valid.device)
            return torch.cat([text, self.valid] if text_first else [self.valid, text], dim=1)

        return self.remember(("joint_valid", n_text, text_first), make)

    def remember(self, key, make):
        """A value fixed with the partition (row positions, gathered RoPE rows), made once and shared by every
        block."""
        if key not in self._memo:
            self._memo[key] = make()
        return self._memo[key]

    def cfg_rows(self, batch: int) -> tuple[slice, slice]:
        """(conditional rows, unconditional rows) of a CFG batch of ``batch`` rows, in the pipeline's order."""
        half = batch // 2
        first, second = slice(0, half), slice(half, None)
        return (first, second) if self.cond_first else (second, first)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        return gather_rows(x, self.index)

    def scatter_output(self, rows: torch.Tensor) -> torch.Tensor:
        """The selective step's per-token output: fresh sensitive rows over the anchor's output. Context rows
        keep the anchor's velocity, which under an Euler step is the same as keeping its clean-image (x0)
        prediction: a linear forecast of the output itself was measured no better (benchmarks/forecast_probe.py)."""
        if self.valid is not None:  # placeholder rows (context parallelism) keep the anchor's output
            keep = self.valid.view(*self.valid.shape, *([1] * (rows.dim() - 2)))
            rows = torch.where(keep, rows.to(self.output.dtype), gather_rows(self.output, self.index))
        return scatter_rows(self.output, self.index, rows)

    def _measure_drift(self, fresh: list[torch.Tensor], guess: list[torch.Tensor]) -> None:
        """Add one layer's fresh rows' K and V and what the context cache (or its forecast) held for those rows to
        this step's sums of squared error and squared norm: the forecast error on the rows that can be checked,
        standing in for the context rows' that cannot."""
        err = sum((f.float() - g.float()).pow(2).sum() for f, g in zip(fresh, guess))
        norm = sum(f.float().pow(2).sum() for f in fresh)
        sums = torch.stack([err, norm]).view(1, 2)  # [1, 2]
        self.drift_sums = sums if self.drift_sums is None else self.drift_sums + sums

    def _close_drift(self) -> None:
        """The last selective step's relative K/V forecast error (summed over every rank under context
        parallelism, so all ranks decide alike), as a 0-d tensor for the next step's decision."""
        sums, self.drift_sums = self.drift_sums, None
        if sums is None:
            return
        if self.parallel is not None:
            sums = self.parallel.gather(sums, 0).sum(0, keepdim=True)
        self.drift = (sums[0, 0] / sums[0, 1].clamp_min(1e-30)).sqrt()

    def store_output(self, out: torch.Tensor) -> None:
        if self.refreshes_cache:
            self.output = out  # anchor_step is set in begin_step

    def _weights(self, steps: list[int]) -> list[float]:
        """Extrapolation weights from these steps to the current one, in the timestep (in the step index where
        the timesteps are not distinct, e.g. a model driven by hand with one timestep)."""
        xs = [self.times.get(s) for s in steps] + [self.times.get(self.step)]
        if None in xs or len(set(xs)) < len(xs):
            xs = [float(s) for s in steps] + [float(self.step)]
        return extrapolation_weights(xs[:-1], xs[-1])

    # -- step-level reuse ---------------------------------------------------------------------
    @torch.compiler.disable  # bookkeeping by step index: eager, outside any compiled graph
    def remember_model_output(self, sample: torch.Tensor) -> None:
        """The model's output at a step it ran (any layout): the nodes of a reuse step's forecast."""
        self.model_outputs.append((self.step, sample))
        del self.model_outputs[:-(self.config.reuse_order + 1)]

    @torch.compiler.disable
    def forecast_model_output(self) -> torch.Tensor:
        """A reuse step's model output: the last computed one (order 0) or the line through the last two."""
        nodes = self.model_outputs
        weights = self._weights([s for s, _ in nodes])
        return combine([t for _, t in nodes], weights)

    def cache_bytes(self) -> int:
        """The caches of every call of a step (one set without CFG calls)."""
        size = lambda t: t.numel() * t.element_size()  # noqa: E731
        total = 0
        for c in [{name: getattr(self, name) for name in CALL_CACHES}, *self._other_calls.values()]:
            total += sum(size(k) + size(v) for k, v in c["kv"].values())
            total += sum(size(k) + size(v) for hist in c["kv_history"].values() for k, v in hist[:-1])
            total += (0 if c["output"] is None else size(c["output"])) + sum(size(t) for _, t in c["model_outputs"])
        return total

    def report(self) -> dict:
        n = max(self.tokens_per_step) if self.tokens_per_step else 0
        return {
            "steps": self.kinds,
            "tokens_per_step": self.tokens_per_step,
            "token_fraction": (sum(self.tokens_per_step) / (n * len(self.tokens_per_step))) if n else 1.0,
            "sensitive_tokens": None if self.global_index is None else int(self.global_index.shape[1]),
            "cache_mb": self.cache_bytes() / 2**20,
            "drift_anchors": list(self.drift_anchors),
        }
