"""Replaying an adaptive cache's trained-weight decisions at scale: what is recorded is what ran, and the
replay computes exactly the recorded share of blocks per step, then undoes cleanly."""

from __future__ import annotations

import torch

from safe_dit.bench.replay import BlockRecorder, apply_replay, scaled_plan
from safe_dit.testing.kits import build_lumina_pipeline

from helpers import run_lumina


def test_scaled_plan_keeps_the_recorded_share_of_block_steps():
    fractions = [1.0, 1 / 6, 1 / 6, 1 / 6, 0.5, 0.0, 5 / 6]
    plan = scaled_plan(fractions, 2)
    assert all(0 <= n <= 2 for n in plan) and plan[0] == 2 and plan[5] == 0
    assert sum(plan) == round(sum(fractions) * 2)
    assert sum(scaled_plan([0.5] * 4, 1)) == 2 and max(scaled_plan([0.5] * 4, 1)) == 1


def test_recorder_sees_skipped_blocks_and_replay_reproduces_the_pattern():
    pipe = build_lumina_pipeline()
    blocks = list(pipe.transformer.layers)
    recorder = BlockRecorder(pipe, blocks)
    recorder.attach()
    run_lumina(pipe, steps=4)
    recorder.remove()
    pattern = recorder.median_pattern()
    assert pattern["fractions"] == [1.0] * 4 and pattern["computed"] == 4 * len(blocks)  # no cache: all ran

    fractions = [1.0, 0.0, 0.5, 1.0]
    undo = apply_replay(pipe, blocks, fractions)
    recorder.attach()
    out = run_lumina(pipe, steps=4)
    recorder.remove()
    undo()
    ran = [len(s) for s in recorder.calls[-1]]
    assert ran == scaled_plan(fractions, len(blocks))  # the replay computed exactly the planned blocks
    assert torch.isfinite(out).all()
    assert all(not getattr(b, "_diffusers_hook", None) or not b._diffusers_hook.hooks for b in blocks)
    assert all(b.forward.__func__ is type(b).forward for b in blocks)
