"""Ablation knobs of SafeConfig: each switches off one component and does only that."""

from __future__ import annotations

import pytest
import torch

from safe_dit import SafeConfig, SafeDitError, apply_safe_dit, remove_safe_dit
from safe_dit.api import runtime_of
from safe_dit.engine.guidance import config_guidance
from safe_dit.engine.partition import prompt_free_partition, sensitive_count
from safe_dit.engine.schedule import ANCHOR, DENSE, SELECTIVE, TAIL, StepPlan
from safe_dit.testing.kits import build_lumina_pipeline

from helpers import SdpaSpy

STEPS = 8


def _embeds(seed, t=8, d=32):
    return torch.randn((1, t, d), generator=torch.Generator().manual_seed(seed))


def _run(pipe, **kw):
    return pipe(
        prompt_embeds=_embeds(1), prompt_attention_mask=torch.tensor([[1] * 6 + [0] * 2]),
        negative_prompt_embeds=_embeds(2), negative_prompt_attention_mask=torch.tensor([[1] * 2 + [0] * 6]),
        height=64, width=96, num_inference_steps=STEPS, guidance_scale=4.0, output_type="latent",
        generator=torch.Generator().manual_seed(0), **kw,
    ).images


def _with(pipe, config):
    apply_safe_dit(pipe, config)
    out = _run(pipe)
    rt = runtime_of(pipe)
    report, index = rt.last_report, rt.last_index
    remove_safe_dit(pipe)
    return out, report, index


@pytest.fixture(scope="module")
def pipe():
    return build_lumina_pipeline()


@pytest.fixture(scope="module")
def dense_fp(pipe):
    return _with(pipe, SafeConfig("dense-fp"))[0]


SCHED = dict(keep_ratio=0.25, warmup_steps=2, anchor_interval=3, tail_dense_steps=1, anchor_growth=0.0,
             context_forecast=0,
             reuse_every=0)  # the published schedule, whose parts the ablations switch off


@pytest.fixture(scope="module")
def safe_core(pipe):
    return _with(pipe, SafeConfig("safe-core", **SCHED))


def test_step_plans_of_the_ablations():
    assert StepPlan(10, 2, 3, 1).kinds().count(ANCHOR) == 2
    no_car = StepPlan(10, 2, 3, 1, car=False).kinds()
    assert ANCHOR not in no_car and TAIL not in no_car and no_car[2:] == [SELECTIVE] * 8
    no_srsu = StepPlan(10, 2, 3, 1, srsu=False).kinds()
    assert SELECTIVE not in no_srsu and DENSE in no_srsu
    assert StepPlan(10, 2, 3, 1, srsu=False).dense_fraction(0.25) == 1.0


def test_prompt_free_partitions_have_the_pcsp_size():
    for n, keep in ((96, 0.25), (97, 0.3), (10, 1.0), (7, 0.01)):
        k = sensitive_count(n, keep)
        for kind in ("uniform", "random"):
            idx = prompt_free_partition(kind, 2, n, keep, seed=3)
            assert idx.shape == (2, k) and torch.equal(idx[0], idx[1])
            assert idx.unique().numel() == k and int(idx.min()) >= 0 and int(idx.max()) < n
            assert torch.equal(idx[0], idx[0].sort().values)
    assert not torch.equal(prompt_free_partition("random", 1, 96, 0.25, 0),
                           prompt_free_partition("random", 1, 96, 0.25, 1))
    assert torch.equal(prompt_free_partition("uniform", 1, 8, 0.5)[0], torch.tensor([0, 2, 4, 6]))


@pytest.mark.parametrize("kind", ["uniform", "random"])
def test_prompt_free_partition_is_made_where_the_latents_are(kind):
    """The seeded index is drawn on the CPU, then moved to the latents' device (a GPU run gathers rows
    of CUDA tensors with it); 'meta' stands in for a device other than the CPU here."""
    from safe_dit.engine.generation import Generation

    gen = Generation(SafeConfig("safe-core", keep_ratio=0.25, partition=kind, warmup_steps=1, anchor_interval=3),
                     num_steps=4)
    gen.begin_step(0, 16, (4, 4), batch=2, device="meta")
    gen.begin_step(1, 16, (4, 4), batch=2, device="meta")  # the partition is made when warm-up ends
    assert gen.index.device.type == "meta" and gen.sensitivity.device.type == "meta"
    assert gen.index.shape == (2, sensitive_count(16, 0.25))
    cpu = Generation(SafeConfig("safe-core", keep_ratio=0.25, partition=kind, warmup_steps=1, anchor_interval=3),
                     num_steps=4)
    cpu.begin_step(0, 16, (4, 4), batch=2)
    cpu.begin_step(1, 16, (4, 4), batch=2)
    assert cpu.index.device.type == "cpu" and torch.equal(cpu.sensitivity.sum(1), torch.full((2,), 4.0))


def test_random_and_uniform_partitions_replace_pcsp(pipe, safe_core):
    _, pcsp_report, pcsp_index = safe_core
    for kind in ("uniform", "random"):
        out, report, index = _with(pipe, SafeConfig("safe-core", partition=kind, **SCHED))
        assert index.shape == pcsp_index.shape  # same number of sensitive tokens
        assert not torch.equal(index, pcsp_index)
        assert report["steps"] == pcsp_report["steps"] and report["token_fraction"] == pcsp_report["token_fraction"]
        assert torch.isfinite(out).all()


def test_no_srsu_is_dense_every_step_and_equals_dense_fp(pipe, dense_fp):
    out, report, _ = _with(pipe, SafeConfig("safe-core", srsu=False, **SCHED))
    assert SELECTIVE not in report["steps"] and report["token_fraction"] == 1.0
    assert torch.allclose(out, dense_fp, atol=1e-5)


def test_no_car_has_no_anchor_after_warm_up(pipe, safe_core):
    out, report, _ = _with(pipe, SafeConfig("safe-core", car=False, **SCHED))
    assert report["steps"] == ["warmup"] * 2 + ["selective"] * (STEPS - 2)
    assert report["token_fraction"] < safe_core[1]["token_fraction"]
    assert not torch.allclose(out, safe_core[0], atol=1e-4)


def test_no_fast_path_keeps_the_stock_masks_and_changes_nothing_else(pipe, safe_core):
    with SdpaSpy() as spy:
        out, report, _ = _with(pipe, SafeConfig("safe-core", mask_elision=False, **SCHED))
    # every self- and cross-attention call of every step carries the stock expanded mask
    assert spy.masks and all(m is not None and m.dim() == 4 for m in spy.masks)
    assert report["steps"] == safe_core[1]["steps"]
    assert torch.allclose(out, safe_core[0], atol=1e-4)  # the masks it keeps are redundant or exact


def test_flat_sw_map_gives_every_token_the_mean_guidance(pipe):
    s = torch.tensor([[0.0, 0.5, 1.0, 0.5]])
    cfg = SafeConfig("safe-sw", cfg_context=3.0, cfg_sensitive=5.0)
    assert torch.allclose(config_guidance(cfg, s), torch.tensor([[3.0, 4.0, 5.0, 4.0]]))
    flat = config_guidance(SafeConfig("safe-sw", cfg_context=3.0, cfg_sensitive=5.0, sw_map=False), s)
    assert torch.allclose(flat, torch.full((1, 4), 4.0))
    sw = _with(pipe, SafeConfig("safe-sw", **SCHED))[0]
    sw_flat = _with(pipe, SafeConfig("safe-sw", sw_map=False, **SCHED))[0]
    assert not torch.allclose(sw, sw_flat, atol=1e-4)


@pytest.mark.parametrize("kwargs,match", [
    (dict(mode="dense-fp", mask_elision=False), "dense-fp without its fast path"),
    (dict(mode="safe-core", partition="checkerboard"), "partition"),
    (dict(mode="safe-core", srsu=1), "srsu"), (dict(mode="safe-core", car="no"), "car"),
    (dict(mode="safe-sw", sw_map=None), "sw_map"), (dict(mode="safe-core", partition_seed=1.5), "partition_seed"),
])
def test_ablation_knobs_are_validated(kwargs, match):
    with pytest.raises(SafeDitError, match=match):
        SafeConfig(**kwargs)


def test_ablation_names():
    assert SafeConfig("safe-core").ablations == ()
    assert SafeConfig("safe-core", mask_elision=False, partition="random", srsu=False, car=False).ablations == (
        "no-fast-path", "random-partition", "no-srsu", "no-car")
    assert SafeConfig("safe-sw", sw_map=False).ablations == ("flat-sw-map",)
