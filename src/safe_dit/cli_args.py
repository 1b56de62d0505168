"""The scheduling flags shared by ``generate``, ``eval`` and ``bench e2e``: one table, so every command
offers the same knobs with the same help and SafeConfig's defaults."""

from __future__ import annotations

from safe_dit.config import SafeConfig

#: (SafeConfig field, type, help)
SCHEDULE_FLAGS = (
    ("keep_ratio", float, "fraction of image tokens recomputed at selective steps"),
    ("warmup_steps", int, "leading dense steps whose image->text attention builds the partition"),
    ("anchor_interval", int, "steps from the last warm-up step to the first dense anchor (the gap between anchors)"),
    ("anchor_growth", float, "the gap between anchors grows by this after each anchor (0: periodic)"),
    ("tail_dense_steps", int, "trailing dense steps"),
    ("context_forecast", int, "0: sensitive rows attend to the anchor's context K/V; 1/2: its linear/quadratic forecast"),
    ("reuse_every", int, "every n-th step after an anchor skips the model and forecasts its output (0: never)"),
    ("reuse_order", int, "a reuse step's forecast: 0 the last output, 1 the line through the last two"),
)


def add_schedule_arguments(parser, with_defaults: bool = True) -> None:
    """``--keep-ratio`` ... ``--reuse-order``; defaults SafeConfig's (or None: the mode's own)."""
    import argparse

    d = SafeConfig("safe-core")
    shows_defaults = issubclass(parser.formatter_class, argparse.ArgumentDefaultsHelpFormatter) and with_defaults
    for field, kind, text in SCHEDULE_FLAGS:
        default = getattr(d, field)
        parser.add_argument("--" + field.replace("_", "-"), type=kind, default=default if with_defaults else None,
                            help=text if shows_defaults else f"{text} (default {default})")


def schedule_kwargs(args) -> dict:
    """The schedule fields the command line set (those left None keep SafeConfig's defaults)."""
    return {f: getattr(args, f) for f, _, _ in SCHEDULE_FLAGS if getattr(args, f, None) is not None}
