"""CAR: which sampling steps are dense and which update only the sensitive tokens."""

from __future__ import annotations

from dataclasses import dataclass

WARMUP, ANCHOR, SELECTIVE, TAIL = "warmup", "anchor", "selective", "tail"
DENSE = "dense"  # a dense step that neither uses nor refreshes the SRSU caches (the no-SRSU ablation)


@dataclass(frozen=True)
class StepPlan:
    """Steps ``0..warmup_steps-1`` are dense and feed PCSP. The last warm-up step also fills the
    SRSU caches (they hold every token's K/V and output, whatever the partition), so it counts as
    the first anchor: afterwards every ``anchor_interval``-th step is a dense anchor refreshing all
    tokens and the caches, the others are selective; the last ``tail_dense_steps`` are dense.

    Ablations: ``srsu=False`` makes every would-be selective step a plain dense step;
    ``car=False`` drops every refresh after warm-up (no anchors, no tail)."""

    num_steps: int
    warmup_steps: int
    anchor_interval: int
    tail_dense_steps: int = 0
    srsu: bool = True
    car: bool = True

    def kind(self, step: int) -> str:
        if not 0 <= step < self.num_steps:
            raise IndexError(f"step {step} outside 0..{self.num_steps - 1}")
        if step < self.warmup_steps:
            return WARMUP
        if not self.car:
            return SELECTIVE if self.srsu else DENSE
        if step >= self.num_steps - self.tail_dense_steps:
            return TAIL
        if (step - self.warmup_steps + 1) % self.anchor_interval == 0:
            return ANCHOR
        return SELECTIVE if self.srsu else DENSE

    def kinds(self) -> list[str]:
        return [self.kind(i) for i in range(self.num_steps)]

    def dense_fraction(self, keep_ratio: float) -> float:
        """Fraction of dense token-steps (a FLOP proxy for linear layers): 1 for dense sampling."""
        ks = self.kinds()
        return sum(1.0 if k != SELECTIVE else keep_ratio for k in ks) / max(1, len(ks))
