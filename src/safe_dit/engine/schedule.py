"""CAR: which sampling steps are dense, which update only the sensitive tokens, and which reuse a forecast."""

from __future__ import annotations

import bisect
import functools
import math
from dataclasses import dataclass

WARMUP, ANCHOR, SELECTIVE, TAIL = "warmup", "anchor", "selective", "tail"
DENSE = "dense"  # a dense step that neither uses nor refreshes the SRSU caches (the no-SRSU ablation)
REUSE = "reuse"  # step-level reuse: the model does not run, every row's output is forecast


@dataclass(frozen=True)
class StepPlan:
    """Steps ``0..warmup_steps-1`` are dense and feed PCSP. The last warm-up step also fills the
    SRSU caches (they hold every token's K/V and output, whatever the partition), so it counts as
    the first anchor: afterwards every ``anchor_interval``-th step is a dense anchor refreshing all
    tokens and the caches (or the steps listed in ``anchor_steps``), the others are selective; the
    ``tail_dense_steps`` before the last ``final_selective_steps`` are dense (and refresh the caches), and those
    final steps update only the sensitive rows, never dense (the image has settled). With ``reuse_every = r > 0``,
    every r-th step after an anchor that would be selective skips the model instead (``REUSE``).

    Ablations: ``srsu=False`` makes every would-be selective step a plain dense step;
    ``car=False`` drops every refresh after warm-up (no anchors, no tail)."""

    num_steps: int
    warmup_steps: int
    anchor_interval: int
    tail_dense_steps: int = 0
    srsu: bool = True
    car: bool = True
    anchor_steps: tuple[int, ...] | None = None
    reuse_every: int = 0
    anchor_growth: float = 0.0
    final_selective_steps: int = 0

    @classmethod
    def of(cls, config, num_steps: int) -> StepPlan:
        """The plan a ``SafeConfig`` gives a sampling run of ``num_steps`` steps."""
        return cls(num_steps, config.warmup_steps, config.anchor_interval, config.tail_dense_steps,
                   srsu=config.srsu, car=config.car, anchor_steps=config.anchor_steps,
                   reuse_every=config.reuse_every, anchor_growth=config.anchor_growth,
                   final_selective_steps=config.final_selective_steps)

    def anchors(self) -> tuple[int, ...]:
        return self._anchors

    @functools.cached_property
    def _anchor_set(self) -> frozenset[int]:
        return frozenset(self._anchors)

    @functools.cached_property
    def _anchors(self) -> tuple[int, ...]:
        """The anchor steps: listed, periodic, or with gaps ``anchor_interval + floor(i * anchor_growth)``
        (i = 0, 1, ...) from the last warm-up step, so they thin out as the trajectory settles."""
        if self.anchor_steps is not None:
            return tuple(s for s in self.anchor_steps if s >= self.warmup_steps)
        out, position, i = [], self.warmup_steps - 1, 0
        while True:
            position += self.anchor_interval + math.floor(i * self.anchor_growth + 1e-9)
            i += 1
            if position >= self.num_steps:
                return tuple(out)
            out.append(position)

    def is_anchor(self, step: int) -> bool:
        return step >= self.warmup_steps and step in self._anchor_set

    def kind(self, step: int) -> str:
        if not 0 <= step < self.num_steps:
            raise IndexError(f"step {step} outside 0..{self.num_steps - 1}")
        if step < self.warmup_steps:
            return WARMUP
        tail_end = self.num_steps - self.final_selective_steps  # first of the final steps
        final = self.car and step >= tail_end
        if self.car and not final and step >= tail_end - self.tail_dense_steps:
            return TAIL
        if self.car and not final and self.is_anchor(step):
            return ANCHOR
        if not self.srsu:
            return DENSE
        if self.reuse_every:
            before = bisect.bisect_left(self._anchors, min(step, tail_end)) if self.car else 0
            last = self._anchors[before - 1] if before else self.warmup_steps - 1  # the last refresh
            if final and self.tail_dense_steps:
                last = max(last, tail_end - 1)  # the tail's last step
            if (step - last) % self.reuse_every == 0:
                return REUSE
        return SELECTIVE

    def kinds(self) -> list[str]:
        return [self.kind(i) for i in range(self.num_steps)]

    def dense_fraction(self, keep_ratio: float) -> float:
        """Fraction of dense token-steps (a FLOP proxy for linear layers): 1 for dense sampling."""
        ks = self.kinds()
        cost = {SELECTIVE: keep_ratio, REUSE: 0.0}
        return sum(cost.get(k, 1.0) for k in ks) / max(1, len(ks))
