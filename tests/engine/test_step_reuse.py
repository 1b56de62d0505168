"""Context forecasting, step-level reuse and explicit anchors (the composition of token- and step-level
reuse): exact where they claim it, really skipping work where they claim that, and undone cleanly."""

from __future__ import annotations

import pytest
import torch

from safe_dit import SafeConfig, SafeDitError, apply_safe_dit, remove_safe_dit
from safe_dit.api import runtime_of
from safe_dit.engine.generation import Generation, combine, extrapolation_weights
from safe_dit.engine.schedule import StepPlan
from safe_dit.testing.kits import build_lumina_pipeline

from helpers import SdpaSpy
from helpers import run_lumina as _run


@pytest.fixture(scope="module")
def pipe():
    return build_lumina_pipeline()


def test_extrapolation_weights_reproduce_polynomials_of_their_order():
    xs = [0.1, 0.25, 0.55]
    line = lambda x: 2.0 - 3.0 * x  # noqa: E731
    parabola = lambda x: 1.0 + x - 4.0 * x * x  # noqa: E731
    w2 = extrapolation_weights(xs[1:], 0.8)
    assert sum(w * line(x) for w, x in zip(w2, xs[1:])) == pytest.approx(line(0.8))
    w3 = extrapolation_weights(xs, 0.8)
    assert sum(w * parabola(x) for w, x in zip(w3, xs)) == pytest.approx(parabola(0.8))
    assert extrapolation_weights([0.3], 0.9) == [1.0]  # one node: hold the value


def test_plan_places_reuse_steps_after_each_refresh_and_explicit_anchors():
    plan = StepPlan(12, 2, 4, 1, reuse_every=2)
    assert plan.kinds() == ["warmup", "warmup", "selective", "reuse", "selective", "anchor", "selective", "reuse",
                            "selective", "anchor", "selective", "tail"]
    explicit = StepPlan(10, 2, 99, 0, anchor_steps=(3, 7))
    assert [i for i, k in enumerate(explicit.kinds()) if k == "anchor"] == [3, 7]
    assert StepPlan(10, 2, 3, 1).kinds() == StepPlan(10, 2, 3, 1, reuse_every=0).kinds()
    with pytest.raises(SafeDitError, match="anchor_steps"):
        SafeConfig("safe-core", anchor_steps=(5, 3))
    with pytest.raises(SafeDitError, match="reuse_every"):
        SafeConfig("safe-core", reuse_every=-1)
    with pytest.raises(SafeDitError, match="context_forecast"):
        SafeConfig("safe-core", context_forecast=3)


def test_final_selective_steps_follow_the_dense_tail_and_drop_anchors_there():
    plan = StepPlan(12, 2, 4, 1, reuse_every=2, final_selective_steps=2)
    # reuse counted from the tail, the last refresh
    assert plan.kinds()[-4:] == ["selective", "tail", "selective", "reuse"]
    assert StepPlan(8, 2, 2, 1, anchor_growth=0.0, final_selective_steps=1).kinds() == [
        "warmup", "warmup", "selective", "anchor", "selective", "anchor", "tail", "selective"]  # no anchor at 7
    assert StepPlan(8, 2, 2, 1, car=False, final_selective_steps=1).kinds()[-2:] == ["selective", "selective"]
    with pytest.raises(SafeDitError, match="final_selective_steps"):
        SafeConfig("safe-core", final_selective_steps=-1)


def test_the_final_selective_step_reuses_the_tails_context_not_an_older_anchors(pipe):
    """Tail steps refresh the caches: the final step's context rows keep the tail step's output (frozen
    context, no forecast), and only the sensitive rows change."""
    config = SafeConfig("safe-core", keep_ratio=0.25, anchor_interval=4, anchor_growth=0.0, tail_dense_steps=1,
                        final_selective_steps=1, context_forecast=0, reuse_every=0)
    apply_safe_dit(pipe, config)
    outputs = []
    hook = pipe.transformer.register_forward_hook(lambda _m, _i, out: outputs.append(out[0].clone()))
    _run(pipe, steps=8)
    hook.remove()
    kinds = runtime_of(pipe).last_report["steps"]
    assert kinds[-3:] == ["anchor", "tail", "selective"], kinds
    last, tail, anchor = (o.flatten(2) for o in (outputs[-1], outputs[-2], outputs[-3]))  # [B, C, pixels]
    same_as_tail = (last == tail).all(dim=1).float().mean().item()  # share of positions unchanged
    assert 0.6 <= same_as_tail < 1.0  # the context (3/4 of the tokens, every pixel of a token) kept the tail's output
    assert (last == anchor).all(dim=1).float().mean().item() < 0.1  # not the older anchor's
    remove_safe_dit(pipe)


def test_context_kv_forecast_follows_the_line_through_the_last_dense_steps():
    gen = Generation(SafeConfig("safe-core", context_forecast=1, warmup_steps=1, anchor_interval=2, anchor_growth=0.0,
                                reuse_every=0, tail_dense_steps=0, final_selective_steps=0), 8)
    gen._localise(torch.tensor([[0]]))  # the partition, fixed by hand
    for step, t, value in ((0, 0.0, 1.0), (1, 0.2, None), (2, 0.4, 3.0)):  # warm-up (first anchor), selective, anchor
        gen.begin_step(step, 3, (1, 3), timestep=t)
        if value is not None:
            assert gen.refreshes_cache
            gen.store_kv("layer", torch.full((1, 3, 1, 2), value), torch.full((1, 3, 1, 2), -value))
            gen.store_output(torch.zeros(1, 3, 1))
    assert gen.kinds == ["warmup", "selective", "anchor"] and gen.kv_steps == [0, 2]
    assert gen.begin_step(3, 3, (1, 3), timestep=0.5) == "selective"
    k, v = gen.merged_kv("layer", torch.full((1, 1, 1, 2), 9.0), torch.full((1, 1, 1, 2), -9.0))
    assert torch.equal(k[0, 0], torch.full((1, 2), 9.0))  # the sensitive row is fresh
    assert torch.allclose(k[0, 1:], torch.full((2, 1, 2), 3.5))  # 3 + (3 - 1) / 0.4 * 0.1, in the timestep
    assert torch.allclose(v[0, 1:], torch.full((2, 1, 2), -3.5))
    assert torch.equal(gen.kv["layer"][0], torch.full((1, 3, 1, 2), 3.0))  # the anchor's cache is left as it was
    weights = torch.tensor(gen.kv_weights)  # the tensor form a compiled graph takes gives the same forecast
    assert torch.allclose(combine([torch.tensor(1.0), torch.tensor(3.0)], weights), torch.tensor(3.5))


def test_forecasting_with_every_row_sensitive_reproduces_dense_fp(pipe):
    apply_safe_dit(pipe, SafeConfig("dense-fp"))
    dense_fp = _run(pipe, steps=8)
    for order in (1, 2):
        apply_safe_dit(pipe,
                       SafeConfig("safe-core", keep_ratio=1.0, reuse_every=0, context_forecast=order,
                                  anchor_interval=3))
        out = _run(pipe, steps=8)
        assert "selective" in runtime_of(pipe).last_report["steps"]
        assert torch.allclose(out, dense_fp, atol=1e-5), order
    apply_safe_dit(pipe, SafeConfig("safe-core", keep_ratio=0.25, context_forecast=1, anchor_interval=3))
    assert not torch.allclose(_run(pipe, steps=8), dense_fp, atol=1e-4)  # and it is not dense-fp otherwise
    remove_safe_dit(pipe)


def test_reuse_steps_skip_the_model_and_forecast_its_output(pipe):
    config = SafeConfig("safe-core", keep_ratio=0.5, warmup_steps=2, anchor_interval=4, tail_dense_steps=1,
                        reuse_every=2,
                        final_selective_steps=0)
    apply_safe_dit(pipe, config)
    transformer = pipe.transformer
    calls, outputs, spy = [], [], SdpaSpy()
    pre = transformer.register_forward_pre_hook(lambda *_: calls.append(len(spy.masks)))
    post = transformer.register_forward_hook(lambda _m, _i, out: outputs.append(out[0].clone()))
    with spy:
        _run(pipe, steps=9)
    pre.remove(), post.remove()
    report = runtime_of(pipe).last_report
    kinds = report["steps"]
    assert kinds == ["warmup", "warmup", "selective", "reuse", "selective", "anchor", "selective", "reuse", "tail"]
    per_step = [b - a for a, b in zip(calls, calls[1:] + [len(spy.masks)])]
    assert all((n == 0) == (k == "reuse") for n, k in zip(per_step, kinds))  # a reuse step runs no attention
    assert report["tokens_per_step"][3] == 0 and report["token_fraction"] < 0.75
    # order 1: the line through the two steps before, in the timestep
    t = [1 - float(s) / 1000 for s in pipe.scheduler.timesteps]
    w = extrapolation_weights([t[1], t[2]], t[3])
    assert torch.allclose(outputs[3], w[0] * outputs[1] + w[1] * outputs[2], atol=1e-6)
    remove_safe_dit(pipe)
    assert not hasattr(transformer, "_diffusers_hook") or not transformer._diffusers_hook.hooks
    assert transformer.forward.__func__ is type(transformer).forward  # the stock forward is back


def test_reuse_order_zero_repeats_the_last_computed_output(pipe):
    apply_safe_dit(pipe, SafeConfig("safe-core", keep_ratio=0.5, anchor_interval=4, reuse_every=2, reuse_order=0))
    outputs = []
    hook = pipe.transformer.register_forward_hook(lambda _m, _i, out: outputs.append(out[0].clone()))
    _run(pipe, steps=9)
    hook.remove()
    assert runtime_of(pipe).last_report["steps"][3] == "reuse"
    assert torch.equal(outputs[3], outputs[2])
    remove_safe_dit(pipe)


def test_drift_triggered_anchors_off_or_unreachable_change_nothing_and_a_low_threshold_adds_anchors(pipe):
    """anchor_drift: a threshold no drift reaches gives the plain schedule bit for bit; a threshold every drift
    exceeds turns each planned selective or reuse step after the first selective one into an anchor."""
    base = dict(keep_ratio=0.25, warmup_steps=2, anchor_interval=4, anchor_growth=0.0, tail_dense_steps=1,
                final_selective_steps=0, reuse_every=2)

    def sample(**kw):
        apply_safe_dit(pipe, SafeConfig("safe-core", **base, **kw))
        try:
            return _run(pipe, steps=12), runtime_of(pipe).last_report
        finally:
            remove_safe_dit(pipe)

    plain, plain_report = sample()
    unreachable, report = sample(anchor_drift=1e9)
    assert torch.equal(plain, unreachable) and report["steps"] == plain_report["steps"]
    assert report["drift_anchors"] == [] and plain_report["drift_anchors"] == []
    eager, report = sample(anchor_drift=1e-9)
    planned = plain_report["steps"]
    first = planned.index("selective")
    assert report["steps"][: first + 1] == planned[: first + 1]  # no drift is known before a selective step ran
    # every later step that was planned selective/reuse follows a selective step or is one: they alternate
    inserted = report["drift_anchors"]
    assert inserted and all(planned[s] in ("selective", "reuse") and report["steps"][s] == "anchor" for s in inserted)
    assert report["steps"].count("anchor") > planned.count("anchor")
    assert not torch.equal(eager, plain)
    with pytest.raises(SafeDitError, match="anchor_drift"):
        SafeConfig("safe-core", anchor_drift=-0.1)
